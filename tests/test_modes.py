"""Parity modes (eager / compiled / drift), compile-report, generate and --attribute through the ``parity`` CLI.

The compile tests use backend "eager" (dynamo tracing, guards, hooks inside the graph, exactly as with inductor) or
"aot_eager" (adds AOTAutograd's functionalisation and decompositions) instead of inductor: the whole tiny model in
compiled mode with inductor costs 115-128 s cold on a 2-core CPU (``benchmarks/compile_depth.py``), mostly C++
compilation of the kernels, against ~13 s with these backends, which trace, guard and hook exactly as inductor
does. Inductor itself is exercised by ``benchmarks/compile_depth.py``, not here.
"""

import json

import pytest
import torch

from fms_granite_speech.compile import compile_modules, uncompile
from parity.capture import Capture
from parity.cli import main
from parity.compare import ParityResult, recheck, run_parity
from parity.metrics import Tolerance


@pytest.fixture(scope="module")
def pair_inputs(pair, inputs):
    """The shared tiny pair and its default inputs (tests/conftest.py), as one fixture."""
    return pair, inputs


def test_bad_mode_and_backend_raise(pair_inputs):
    pair, inputs = pair_inputs
    with pytest.raises(ValueError, match="mode"):
        run_parity(pair, inputs, "encoder.blocks.0", mode="fast")
    with pytest.raises(ValueError, match="compile_backend"):
        run_parity(pair, inputs, "encoder.blocks.0", mode="compiled", compile_backend="tvm")
    assert main(["diff", "--mode", "fast"]) == 2


def test_eager_mode_is_recorded(pair_inputs):
    pair, inputs = pair_inputs
    r = run_parity(pair, inputs, "encoder.blocks.0")
    assert r.mode == "eager" and r.compile_backend is None and r.hf_drift == []
    again = ParityResult.from_json(r.to_json())
    assert again.mode == "eager" and again.layer("encoder.blocks.0").diff == r.layer("encoder.blocks.0").diff


@pytest.mark.compile
def test_diff_compiled_mode_cli(capsys, tmp_path, pair_inputs):
    code = main(["diff", "--layer", "encoder.blocks.8", "--mode", "compiled", "--compile-backend", "eager",
                 "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mode compiled, backend eager" in out
    for sub in ("encoder.blocks.8.ff1", "encoder.blocks.8.attn", "encoder.blocks.8.conv", "encoder.blocks.8.post_norm"):
        assert sub in out
    report = json.loads((tmp_path / "parity-report.json").read_text())
    assert report["mode"] == "compiled" and report["compile_backend"] == "eager"
    # regional compilation: one graph per kind of block per side (16 hooked blocks each), not one per block
    assert ": 2 graph(s)" in " ".join(report["notes"])
    # compiled FMS vs compiled HF records what eager FMS vs eager HF records (the eager backend runs the same ops)
    pair, inputs = pair_inputs
    eager = run_parity(pair, inputs, "encoder.blocks.8")
    by_name = {r["pair"]["name"]: r for r in report["layers"]}
    for r in eager.requested_results():
        assert by_name[r.name]["diff"]["rel_l2"] == pytest.approx(r.diff.rel_l2, rel=1e-6, abs=1e-12)
        assert by_name[r.name]["introduced"] is None  # compiled modes compare propagated errors only
    md = (tmp_path / "parity-report.md").read_text()
    assert "| compile backend" in md and "| mode" in md and "compiled" in md


@pytest.mark.compile
def test_drift_mode_reports_both_sides(pair_inputs, tmp_path):
    pair, inputs = pair_inputs
    r = run_parity(pair, inputs, "encoder", mode="drift", compile_backend="eager")
    blocks = [f"encoder.blocks.{i}" for i in range(pair.config.encoder.num_layers)]
    hf = {x.name: x for x in r.hf_drift}
    assert [x.name for x in r.hf_drift] == [x.name for x in r.layers]
    for b in blocks:
        # backend "eager" replays the traced ops one by one: zero drift on both sides is the exact expectation
        assert hf[b].diff is not None and r.layer(b).diff is not None
        assert hf[b].diff.max_abs == 0.0 and r.layer(b).diff.max_abs == 0.0
        assert hf[b].calls == r.layer(b).calls == 1
    assert r.passed and r.mode == "drift"
    # a zero-tolerance recheck keeps both sides' statistics, and the report shows both
    strict = recheck(r, Tolerance(atol=0, rtol=0, max_rel_l2=0, min_cosine=1))
    assert strict.passed and len(strict.hf_drift) == len(r.hf_drift)
    assert main(["report", str(_write(r, tmp_path))]) == 0
    md = (tmp_path / "parity-report.md").read_text()
    assert "hf drift rel-L2" in md and "fms drift rel-L2" in md and "first HF drift layer" in md


def _write(result, folder):
    from parity.report import write_report

    return write_report(result, folder)[0]


@pytest.mark.compile
@pytest.mark.slow  # inductor on both sides: about 19 s on 2 cores (the slower tier)
def test_hooks_do_not_change_compiled_outputs_and_drift_is_small(pair_inputs):
    """Block 3 of each encoder compiled with aot_eager (functionalised, decomposed ops: not a replay of the eager
    ones), the other blocks eager: the hooked run returns bitwise what the unhooked run returns, and the compiled
    block's sub-module outputs match the eager ones (torch.testing's float32 tolerance)."""
    pair, inputs = pair_inputs
    feats = inputs.input_features
    subs = ["ff1", "attn", "conv", "ff2", "post_norm"]
    sides = ((pair.fms, pair.fms.encoder, pair.fms.encoder.blocks[3], "encoder.blocks.3"),
             (pair.hf, pair.hf.model.encoder, pair.hf.model.encoder.layers[3], "model.encoder.layers.3"))
    torch._dynamo.reset()
    with torch.no_grad():
        for root, enc, block, prefix in sides:
            paths = [f"{prefix}.{s}" for s in subs]
            with Capture(root, paths) as eager_cap:
                enc(feats)
            compile_modules([block], backend="aot_eager")
            try:
                plain = _first(enc(feats))
                with Capture(root, paths) as cap:
                    hooked = _first(enc(feats))
            finally:
                uncompile([block])
            assert torch.equal(plain, hooked), f"{prefix}: hooks changed the compiled output"
            for p in paths:
                assert len(cap.outputs[p]) == 1
                torch.testing.assert_close(cap.outputs[p][0], eager_cap.outputs[p][0])
    torch._dynamo.reset()


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.compile
@pytest.mark.slow  # dynamo explain of the whole forward and each piece: about 17 s on 2 cores (the slower tier)
def test_compile_report(capsys):
    assert main(["compile-report", "--variant", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "graphs" in out and "breaks" in out and "reasons" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in ("forward", "encoder", "projector", "decoder")}
    assert {piece: row[1:3] for piece, row in rows.items()} == {p: ["1", "0"] for p in ("forward", "encoder",
                                                                                         "projector", "decoder")}
    assert "graph breaks: 0" in out


def test_generate_subcommand(capsys, tmp_path):
    code = main(["generate", "--variant", "tiny", "--max-new-tokens", "32", "--json", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("parity generate: variant tiny")
    doc = json.loads((tmp_path / "g.json").read_text())
    # the default check's continuation varies (untied head on random weights): a token match means something
    assert min(doc["distinct_tokens"]) >= 8 and doc["required_distinct"] == 8 and doc["passed"]
    assert len(doc["steps"]) == 32 and all(s["passed"] for s in doc["steps"])  # every step's logits compared
    assert main(["generate", "--max-new-tokens", "0"]) == 2
    # the tied head of random weights repeats one token: the check says it proves nothing, and fails
    assert main(["generate", "--tied-head", "--max-new-tokens", "32"]) == 1
    assert "inconclusive" in capsys.readouterr().out


def test_generate_json_folder_is_one_line_error(capsys, tmp_path):
    assert main(["generate", "--variant", "tiny", "--max-new-tokens", "1", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "folder" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_diff_attribute(capsys, tmp_path):
    code = main(["diff", "--layer", "encoder.blocks.2", "--attribute", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "introduced rel-L2" in out and "first introducing layer: none" in out
    report = json.loads((tmp_path / "parity-report.json").read_text())
    rows = {r["pair"]["name"]: r for r in report["layers"]}
    assert rows["encoder.blocks.2"]["introduced"]["passed"]  # the introduced error is in every report
    md = (tmp_path / "parity-report.md").read_text()
    assert "| introduced" in md and "encoder.blocks.15" in md


@pytest.mark.compile
def test_compiled_graph_count_does_not_grow_with_depth(pair_inputs):
    """Whole model, compiled mode: tiny and a copy whose decoder is deeper than dynamo's recompile limit compile the
    same graphs. Expected 8 = 2 sides x (1 Conformer block + 2 Q-Former layer calls: the first layer's queries have
    batch 1, the next layers' one row per window + 1 decoder layer). A per-layer guard (as HF's DynamicCache
    state was, one recompile per decoder layer) would add a graph per layer and hit the limit."""
    import re

    from fms_granite_speech.config import get_config
    from parity.inputs import build_inputs
    from parity.pair import build_pair

    pair, inputs = pair_inputs
    config = get_config("tiny")
    depth = torch._dynamo.config.recompile_limit + 2
    deep = build_pair("tiny", config=config.replace(decoder=config.decoder.updated(nlayers=depth)))
    counts = []
    for p, x in ((pair, inputs), (deep, build_inputs(deep))):
        r = run_parity(p, x, mode="compiled", compile_backend="eager")
        assert r.passed, r.first_divergent
        counts.append(int(re.search(r": (\d+) graph\(s\)", " ".join(r.notes)).group(1)))
    assert counts == [8, 8]
