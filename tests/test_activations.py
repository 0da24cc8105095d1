"""Saved activations: every compared tensor of both sides and the replayed calls, on disk; ``parity recheck DIR``
recomputes each row exactly as the run measured it and judges it under new tolerances, without models."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from parity.activations import ActivationStore, recheck_activations
from parity.cli import main
from parity.compare import run_parity
from parity.inputs import build_inputs


def test_recheck_recomputes_every_row_exactly_as_the_run(pair, tmp_path):
    store = ActivationStore()
    result = run_parity(pair, build_inputs(pair), activations=store)
    store.save(tmp_path / "acts", pair.config.decoder.logits_scaling)
    rows = recheck_activations(tmp_path / "acts")
    model_rows = [r for r in result.layers if r.pair.tensor != "pipeline"]
    assert [name for name, _, _ in rows] == [r.name for r in model_rows]
    for name, diff, note in rows:
        run = result.layer(name).diff
        assert note is None and (diff.rel_l2, diff.max_abs, diff.cosine, diff.passed) == \
            (run.rel_l2, run.max_abs, run.cosine, run.passed), name
    # logits are saved as FMS returned them and rechecked on HF's scale again (the row's transform)
    index = json.loads((tmp_path / "acts" / "activations.json").read_text())
    assert index["rows"]["logits"]["transform"] == "logits_scaling"
    # the replayed rows' recorded inputs are there, by parameter name
    tensors = load_file(str(tmp_path / "acts" / "activations.safetensors"))
    assert any(k.startswith("call/encoder.blocks.8/0/") for k in tensors)
    # tighter bounds, no model: every row fails
    tight = recheck_activations(tmp_path / "acts", {"max_rel_l2": 0.0, "atol": 0.0, "rtol": 0.0, "min_cosine": 1.0})
    assert not any(d.passed for _, d, _ in tight if d is not None and d.rel_l2 > 0)


def test_the_cli_saves_what_is_asked_and_names_what_the_cap_cut(tmp_path, capsys):
    acts = tmp_path / "acts"
    assert main(["diff", "--layer", "encoder.blocks.8", "--save-activations", str(acts), "--save-max-mib", "0.05",
                 "--report-dir", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "MiB cap was reached: rows not (wholly) saved: encoder.blocks.8" in out
    index = json.loads((acts / "activations.json").read_text())
    assert all(e["layer"].startswith("encoder.blocks.8") for e in index["tensors"])  # --layer filters by default
    assert index["bytes"] <= 0.05 * 2**20 and index["cut"]
    complete = {e["layer"] for e in index["tensors"] if e["side"] == "hf"} & \
        {e["layer"] for e in index["tensors"] if e["side"] == "fms"}
    capsys.readouterr()
    if complete:  # rows with both sides are judged, the cut ones listed as not saved
        assert main(["recheck", str(acts)]) == 0 and "not saved" in capsys.readouterr().out
    else:  # nothing to judge: said in one line, not a pass
        assert main(["recheck", str(acts)]) == 2 and "has both sides saved" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["diff", "--save-layers", "encoder.blocks.1"], "go with --save-activations"),
    (["diff", "--save-activations", "A", "--mode", "compiled"], "drop --mode"),
    (["diff", "--save-activations", "A", "--save-max-mib", "0"], "--save-max-mib must be > 0"),
    (["diff", "--save-activations", "A", "--save-layers", "encoder.blocks.99"], "encoder.blocks.99"),
])
def test_bad_save_options_are_one_line(tmp_path, capsys, argv, words):
    argv = [str(tmp_path / a) if a == "A" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_recheck_of_a_folder_that_is_not_one_is_one_line(tmp_path, capsys):
    assert main(["recheck", str(tmp_path)]) == 2
    assert "without activations.json" in capsys.readouterr().err
