"""The gate: committed thresholds hold on the honest tiny model, three planted bugs each fail the check with the
introducing layer named first divergent, and the report/plot regenerate from JSON."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch.nn.functional as F

import fms_granite_speech.projector as projector_module
from parity.check import evaluate, layer_group, load_thresholds, run_cases, write_check_report
from parity.cli import main
from parity.metrics import default_tolerance
from parity.pair import build_pair, parse_dtype
from parity.report import write_report, write_suite_report


@pytest.fixture(scope="module")
def pair():
    return build_pair("tiny", seed=0)


@pytest.fixture(scope="module")
def honest(pair):
    return run_cases(pair)


def test_committed_thresholds_are_within_dtype_tolerance_and_above_observed():
    doc = load_thresholds()
    for key, table in doc["groups"].items():
        top = default_tolerance(parse_dtype(key.split("/")[1])).max_rel_l2
        for group, entry in table.items():
            assert entry["observed"] <= entry["bound"] <= top, (key, group)


def test_honest_model_passes_the_committed_thresholds(honest):
    outcome = evaluate(honest, load_thresholds())
    assert outcome.passed, outcome.regressions[:3]
    assert set(outcome.cases) == {"speech_b1", "speech_mixed_batch", "text_only"}


def test_unknown_variant_has_no_thresholds_and_fails(honest):
    outcome = evaluate(honest, {"schema_version": 1, "groups": {}})
    assert not outcome.passed and outcome.missing == ["tiny/float32"]


def test_layer_group():
    assert layer_group("encoder.blocks.12.attn") == "encoder.blocks.{}.attn"
    assert layer_group("projector.layers.1") == "projector.layers.{}"
    assert layer_group("logits") == "logits"


# -- planted bugs -----------------------------------------------------------------------------------------------------


def _residual_scale(fms):
    """Block 5 adds ff2 with weight 1.0 instead of the Conformer's 0.5."""
    blk = fms.encoder.blocks[5]

    def forward(x, dists):
        x = x + 0.5 * blk.ff1(x)
        x = x + blk.attn(x, dists)
        x = x + blk.conv(x)
        x = x + 1.0 * blk.ff2(x)
        return blk.post_norm(x)

    blk.forward = forward


def _transposed_windows(x, window_size):
    b, t, he = x.shape
    nb = (t + window_size - 1) // window_size
    x = F.pad(x, (0, 0, 0, nb * window_size - t))
    return x.reshape(b, window_size, nb, he).transpose(1, 2).reshape(b * nb, window_size, he)


def _ctc_off_by_one(fms):
    """The mid-layer CTC residual applied after block mid_layer + 1."""
    enc = fms.encoder

    def forward(feats, return_ctc_logits=False):
        x = enc.input_linear(feats)
        for i, blk in enumerate(enc.blocks):
            x = blk(x, enc.attention_dists)
            if i == enc.config.mid_layer + 1:
                x = x + enc.out_mid(enc.out(x).softmax(dim=-1))
        return x

    enc.forward = forward


@pytest.mark.parametrize("bug, introduced", [
    ("residual_scale", "encoder.blocks.5."),
    ("transposed_window", "projector.layers.0.cross_attn"),
    ("ctc_off_by_one", "encoder.out"),
])
def test_planted_bug_fails_the_check_and_names_its_layer(pair, monkeypatch, tmp_path, bug, introduced):
    fms = copy.deepcopy(pair.fms)
    if bug == "residual_scale":
        _residual_scale(fms)
    elif bug == "ctc_off_by_one":
        _ctc_off_by_one(fms)
    else:
        monkeypatch.setattr(projector_module, "split_windows", _transposed_windows)
    planted = dataclasses.replace(pair, fms=fms)
    results = run_cases(planted, ["speech_b1"])
    outcome = evaluate(results, load_thresholds())
    assert not outcome.passed
    first = outcome.first_divergent["speech_b1"]
    assert first == introduced or first.startswith(introduced)
    assert results["speech_b1"].first_divergent == first  # the engine agrees with the gate
    _, md = write_check_report(outcome, tmp_path)
    assert f"first divergent layer: {first}" in md.read_text()
    _, suite_md, png = write_suite_report(results, tmp_path)
    assert f"| FAIL | {first} |" in suite_md.read_text() and png.stat().st_size > 0


# -- report -----------------------------------------------------------------------------------------------------------


def test_report_has_header_plot_and_regenerates_from_json(honest, tmp_path, capsys):
    result = honest["speech_b1"]
    json_path, md_path = write_report(result, tmp_path / "a")
    md = md_path.read_text()
    for key in ("dtype", "device", "seed", "audio", "torch", "transformers", "env platform", "config", "reproduce",
                "parity-report.png"):
        assert key in md, key
    assert (tmp_path / "a" / "parity-report.png").read_bytes()[:4] == b"\x89PNG"
    # a second mode on the same plot
    compiled = dataclasses.replace(result, provenance={**result.provenance, "mode": "compiled"})
    _, _, png = write_suite_report({"eager": result, "compiled": compiled}, tmp_path / "s")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(json_path), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "parity-report.md").read_text() == md
    assert (tmp_path / "b" / "parity-report.png").is_file()
    assert main(["report", str(tmp_path / "s" / "parity-suite.json"), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "parity-depth.png").is_file()
    assert main(["report", str(tmp_path / "missing.json")]) == 2
