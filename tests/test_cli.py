"""The ``parity`` command line, driven through ``main([...])``: tables, exit codes, one-line errors, reports."""

from __future__ import annotations

import json

import pytest

from parity.cli import main


def _errors(err: str) -> list[str]:
    """The error lines of stderr (progress lines, ``parity <command>: [  t s] step``, are not errors)."""
    return [line for line in err.strip().splitlines() if line and " s] " not in line]


def test_map(capsys):
    assert main(["map"]) == 0
    out = capsys.readouterr().out
    assert "encoder.blocks.{}.attn" in out and "model.encoder.layers.{}.attn" in out
    assert "0..15" in out  # the tiny variant's block indices
    assert "logits_scaling" in out and "qkv_fused" in out


def test_map_expanded(capsys):
    assert main(["map", "--expand"]) == 0
    out = capsys.readouterr().out
    assert "encoder.blocks.15.post_norm" in out and "decoder.base_model.layers.3.ff_sub_layer" in out


def test_map_unknown_variant(capsys):
    assert main(["map", "--variant", "huge"]) == 2
    err = capsys.readouterr().err
    assert "tiny" in err and len(err.strip().splitlines()) == 1


def test_diff_layer(capsys, tmp_path):
    code = main(["diff", "--layer", "encoder.blocks.8", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for sub in ("encoder.blocks.8.ff1", "encoder.blocks.8.attn", "encoder.blocks.8.conv", "encoder.blocks.8.post_norm"):
        assert sub in out
    for header in ("rel-L2", "bound", "introduced", "obs/bound", "mismatched", "max ULP"):
        assert header in out
    assert "first divergent layer: none" in out
    report = json.loads((tmp_path / "parity-report.json").read_text())
    assert report["passed"] is True and report["sections"] == ["features", "encoder"]
    assert (tmp_path / "parity-report.md").read_text().startswith("# Parity report: PASS")


def test_diff_unknown_layer_suggests(capsys):
    assert main(["diff", "--layer", "encoder.block.8"]) == 2
    err = capsys.readouterr().err
    assert "encoder.blocks.8" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_diff_missing_audio(capsys, tmp_path):
    assert main(["diff", "--layer", "encoder.blocks.0", "--audio", str(tmp_path / "nope.wav")]) == 2
    err = capsys.readouterr().err
    assert "audio file not found" in err and len(err.strip().splitlines()) == 1


def test_diff_bad_checkpoint(capsys, tmp_path):
    assert main(["diff", "--layer", "encoder.blocks.0", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(_errors(err)) == 1
    assert main(["diff", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_diff_bad_dtype_is_a_usage_error(capsys):
    assert main(["diff", "--dtype", "int8"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_diff_bfloat16_runs(capsys, tmp_path):
    code = main(["diff", "--layer", "encoder.blocks.2", "--dtype", "bfloat16", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "encoder.blocks.2.attn" in out and "bfloat16" in out
    report = json.loads((tmp_path / "parity-report.json").read_text())
    assert report["provenance"]["dtype"] == "bfloat16"
    assert report["layers"][0]["diff"]["dtype"] == "torch.float32"  # the pipelines' features, before the cast
    assert report["reference"] == "float64"
    # on CPU both sides run the same bf16 kernels in the same order: every requested layer is bit-exact
    requested = [r for r in report["layers"] if r["pair"]["name"] in set(report["requested"])]
    assert len(requested) == 6 and all(r["diff"]["max_abs"] == 0.0 for r in requested)
    assert all(r["diff"]["dtype"] == "torch.bfloat16" for r in requested)


def test_recheck_tightened(capsys, tmp_path):
    assert main(["diff", "--layer", "encoder.blocks.1", "--report-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    saved = tmp_path / "run" / "parity-report.json"
    args = ["recheck", str(saved), "--atol", "0", "--rtol", "0", "--max-rel-l2", "0", "--min-cosine", "1",
            "--report-dir", str(tmp_path / "re")]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "first divergent layer" in out
    assert json.loads((tmp_path / "re" / "parity-report.json").read_text())["tolerance"]["max_rel_l2"] == 0.0
    assert main(["recheck", str(saved), "--report-dir", str(tmp_path / "same")]) == 0


def test_recheck_missing_report(capsys, tmp_path):
    assert main(["recheck", str(tmp_path / "none.json")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    assert main(["diff", "--layer", "encoder.blocks.1", "--report-dir", str(out)]) == 0
    return out / "parity-report.json"


def test_recheck_bad_report_dir_is_one_line_error(saved_report, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["recheck", str(saved_report), "--report-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and len(_errors(err)) == 1 and "Traceback" not in err


def test_recheck_exit_code_counts_hf_drift(saved_report, capsys, tmp_path):
    """A drift report whose HF-side drift fails a requested layer fails recheck, as it fails ``diff``."""
    doc = json.loads(saved_report.read_text())
    doc["mode"] = "drift"
    doc["hf_drift"] = json.loads(json.dumps(doc["layers"]))
    drift = tmp_path / "drift.json"
    drift.write_text(json.dumps(doc))
    assert main(["recheck", str(drift), "--report-dir", str(tmp_path / "ok")]) == 0
    bad = next(r for r in doc["hf_drift"] if r["pair"]["name"] == "encoder.blocks.1")
    bad["diff"].update(max_abs=1.0, mean_abs=0.5, rel_l2=0.5, cosine=0.5, n_mismatched=bad["diff"]["numel"],
                       passed=False)
    drift.write_text(json.dumps(doc))
    assert main(["recheck", str(drift), "--report-dir", str(tmp_path / "bad")]) == 1
    capsys.readouterr()


def test_diff_recompile_limit_is_one_line_error_exit_1(monkeypatch, capsys, tmp_path):
    import parity.compare
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def hit(*args, **kwargs):
        raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=False\nmore detail")

    monkeypatch.setattr(parity.compare, "run_parity", hit)
    code = main(["diff", "--layer", "encoder.blocks.0", "--mode", "compiled", "--compile-backend", "eager",
                 "--report-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "recompile limit" in err and len(_errors(err)) == 1 and "Traceback" not in err


def test_diff_engine_type_error_is_not_a_usage_error(monkeypatch, tmp_path):
    """A TypeError from inside the engine is a bug: it surfaces, it is not reported as the caller's exit 2."""
    import parity.compare

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'Tensor'")

    monkeypatch.setattr(parity.compare, "run_parity", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["diff", "--layer", "encoder.blocks.0", "--report-dir", str(tmp_path)])
