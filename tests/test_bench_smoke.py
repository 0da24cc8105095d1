"""Smoke test of ``benchmarks/bench.py``: its ``main()`` runs in-process on the tiny variant and writes every row.

No timing is asserted (times on a shared CPU say nothing); only that each expected row exists and every measured
quantity is a finite positive number, and that peak memory is reported as not available on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("granite_speech_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    bench = _load_bench()
    out = tmp_path_factory.mktemp("bench")
    doc = bench.main(["--variant", "tiny", "--device", "cpu", "--dtype", "float32", "--clips", "1",
                      "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                      "--copy-mib", "16", "--out", str(out)])
    return doc, out


def _positive(row: dict, key: str) -> None:
    value = row.get(key)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{row['name']}: {key}={value!r}"


def test_json_written_and_equal_to_returned(bench_run):
    doc, out = bench_run
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(doc))
    md = (out / "bench.md").read_text()
    assert "| row" in md and "fms eager" in md and "hf eager" in md
    for key in ("device_name", "torch", "transformers", "ibm-fms", "date"):
        assert doc["meta"][key], key


def test_every_row_present_with_positive_numbers(bench_run):
    doc, _ = bench_run
    rows = doc["rows"]
    names = [r["name"] for r in rows]
    for expected in ("hf eager", "fms eager", "decode floor (weights / bandwidth)",
                     "parity run_parity (all layers)", "2 plain forwards (HF + FMS)"):
        assert names.count(expected) == 1, (expected, names)
    for row in rows:
        if row["kind"] == "engine":
            assert row["clip_s"] == 1.0
            for key in ("enc_proj_ms", "prefill_ms", "decode_ms_per_token", "e2e_ms", "rtf"):
                _positive(row, key)
            assert row["rtf"] == pytest.approx(row["e2e_ms"] / 1e3 / row["clip_s"])
        elif row["kind"] == "floor":
            for key in ("decode_ms_per_token", "weight_bytes", "bandwidth_gbs"):
                _positive(row, key)
        else:
            _positive(row, "e2e_ms")
        assert row.get("peak_mib") is None, "CPU has no max_memory_allocated: peak memory must read n/a"


def test_parity_row_ran_every_layer(bench_run):
    doc, _ = bench_run
    parity = next(r for r in doc["rows"] if r["kind"] == "parity")
    assert parity["layers"] > 0 and parity["passed"] is True


def test_floor_uses_decoder_weight_bytes(bench_run):
    """The floor's numerator is the decoder's parameter bytes, derived here from a fresh tiny FMS model."""
    import torch

    from fms_granite_speech.config import get_config
    from fms_granite_speech.model import GraniteSpeech

    with torch.device("meta"):
        model = GraniteSpeech(get_config("tiny"))
    params = {id(p): p for p in model.decoder.parameters()}.values()
    expected = sum(p.numel() * 4 for p in params)
    floor = next(r for r in bench_run[0]["rows"] if r["kind"] == "floor")
    assert floor["weight_bytes"] == expected
    assert floor["decode_ms_per_token"] == pytest.approx(expected / (floor["bandwidth_gbs"] * 1e9) * 1e3)


def test_bad_clip_argument_is_a_clear_error(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--clips", "3,-1"])
    assert "positive lengths" in capsys.readouterr().err
