"""The gate: committed thresholds hold on the honest tiny model, three planted bugs each fail the check with the
introducing layer named first divergent, and the report/plot regenerate from JSON."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch.nn.functional as F

import fms_granite_speech.projector as projector_module
import json
import subprocess
from pathlib import Path

import parity.check
from parity.check import evaluate, layer_group, load_thresholds, run_cases, run_check, write_check_report
from parity.cli import main
from parity.inputs import CASES
from parity.metrics import default_tolerance
from parity.pair import parse_dtype
from parity.report import write_report, write_suite_report


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
    assert outcome.cases == list(CASES)  # every named case, in a fixed order
    for case, rows in outcome.tables.items():  # the observed-vs-bound table of every case
        assert rows and all(row[-1] == "pass" for row in rows), case


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


def test_text_only_case_requests_the_whole_decoder(honest):
    requested = honest["text_only"].requested
    assert "decoder.norm" in requested and requested[-1] == "logits"
    assert "load_suite" in parity.check.__all__


# -- run_check around a faked pytest run ------------------------------------------------------------------------------


def _suite_doc(results) -> str:
    return json.dumps({"results": {name: json.loads(r.to_json()) for name, r in results.items()}})


def _fake_pytest(monkeypatch, results=None, rc=0):
    """Replace the pytest subprocess: record the call, write ``results`` as the plugin would, exit ``rc``."""
    calls = []

    def call(cmd, cwd=None, **kwargs):
        calls.append(cmd)
        out = cmd[cmd.index("--parity-report") + 1]
        if results is not None:
            (Path(out) / "parity-suite.json").write_text(_suite_doc(results))
        return rc

    monkeypatch.setattr(subprocess, "call", call)
    return calls


def test_update_baseline_refuses_a_failed_pytest_run(honest, monkeypatch, tmp_path):
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps(load_thresholds()))
    before = thresholds.read_text()
    _fake_pytest(monkeypatch, honest, rc=1)
    assert run_check(tmp_path / "out", workers="0", thresholds=thresholds, update_baseline=True) == 1
    assert thresholds.read_text() == before
    _fake_pytest(monkeypatch, honest, rc=0)
    assert run_check(tmp_path / "out", workers="0", thresholds=thresholds, update_baseline=True) == 0
    assert load_thresholds(thresholds)["groups"]["tiny/float32"]


def test_run_check_never_judges_a_previous_runs_results(honest, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    _fake_pytest(monkeypatch, honest, rc=0)
    assert run_check(out, workers="0") == 0  # a passing run: suite, verdict and junit side by side
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"parity-suite.json", "parity-check.md", "parity-check.json"} <= set(before)
    _fake_pytest(monkeypatch, results=None, rc=0)  # this run records nothing
    assert run_check(out, workers="0") == 1
    assert "recorded no parity results" in capsys.readouterr().err
    # judged nothing, published nothing: the previous run's files are byte-identical, no stale verdict is left
    # beside new results
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_check_validates_thresholds_before_running_the_suite(monkeypatch, tmp_path, capsys):
    calls = _fake_pytest(monkeypatch)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["check", "--out", str(tmp_path / "o"), "--thresholds", str(bad)]) == 2
    assert main(["check", "--out", str(tmp_path / "o"), "--thresholds", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "not found" in err
    assert calls == []
