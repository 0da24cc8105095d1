"""Smoke test of ``benchmarks/bench.py``: its ``main()`` runs in-process on the tiny variant and writes every row.

No timing is asserted (times on a shared CPU say nothing); only that each expected row exists and every measured
quantity is a finite positive number, and that peak memory is reported as not available on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("granite_speech_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    bench = _load_bench()
    out = tmp_path_factory.mktemp("bench")
    doc = bench.main(["--variant", "tiny", "--device", "cpu", "--dtype", "float32", "--clips", "1",
                      "--new-tokens", "3", "--repeats", "2", "--warmup", "0", "--threads", "1",
                      "--read-mib", "16", "--out", str(out)])
    return doc, out


def _positive(value, what) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what}={value!r}"


def test_json_written_and_equal_to_returned(bench_run):
    doc, out = bench_run
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(doc))
    md = (out / "bench.md").read_text()
    assert "| clip s" in md and "fms/hf" in md and "interleaved" in md
    for key in ("device_name", "torch", "transformers", "ibm-fms", "date"):
        assert doc["meta"][key], key
    assert doc["meta"]["order"] == "interleaved"


def test_every_quantity_for_every_engine_with_min_and_median(bench_run):
    doc, _ = bench_run
    timing = {r["quantity"]: r for r in doc["rows"] if r["kind"] == "timing"}
    assert set(timing) == {"enc+proj", "prefill", "decode/token", "e2e", "RTF", "decode x-floor", "peak MiB"}
    assert set(timing["e2e"]["engines"]) == {"hf", "fms", "fms static"}
    assert set(timing["prefill"]["engines"]) == {"hf", "fms"}  # the static cache changes decoding only
    for quantity, row in timing.items():
        assert row["clip_s"] == 1.0
        for engine, cell in row["engines"].items():
            if quantity == "peak MiB":
                assert cell["median"] is None, "CPU has no max_memory_allocated: peak memory must read n/a"
                continue
            assert len(cell["samples"]) == 2, (quantity, engine)
            assert cell["min"] == min(cell["samples"]) and cell["median"] == pytest.approx(
                sum(cell["samples"]) / 2), (quantity, engine)
            _positive(cell["min"], f"{quantity} {engine}")
    for engine, cell in timing["RTF"]["engines"].items():
        assert cell["samples"] == pytest.approx([t / 1e3 for t in timing["e2e"]["engines"][engine]["samples"]])


def test_floor_uses_decoder_weight_bytes_and_x_floor_divides_by_it(bench_run):
    """The floor's numerator is the decoder's parameter bytes, derived here from a fresh tiny FMS model."""
    import torch

    from fms_granite_speech.config import get_config
    from fms_granite_speech.model import GraniteSpeech

    with torch.device("meta"):
        model = GraniteSpeech(get_config("tiny"))
    params = {id(p): p for p in model.decoder.parameters()}.values()
    expected = sum(p.numel() * 4 for p in params)
    rows = bench_run[0]["rows"]
    floor = next(r for r in rows if r["kind"] == "floor")
    assert floor["weight_bytes"] == expected
    assert floor["median_ms"] == pytest.approx(expected / (floor["bandwidth_gbs"] * 1e9) * 1e3)
    decode = next(r for r in rows if r.get("quantity") == "decode/token")["engines"]
    x_floor = next(r for r in rows if r.get("quantity") == "decode x-floor")["engines"]
    for engine in decode:
        assert x_floor[engine]["median"] == pytest.approx(decode[engine]["median"] / floor["median_ms"])


def test_parity_row_ran_every_layer(bench_run):
    doc, _ = bench_run
    parity = next(r for r in doc["rows"] if r["kind"] == "parity")
    assert parity["layers"] > 0 and parity["passed"] is True


def test_interleaving_alternates_the_engines():
    bench = _load_bench()
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              bench.torch.device("cpu"), repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3 and {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


def test_a_failing_engine_is_dropped_and_named():
    bench = _load_bench()
    failed = {}

    def boom():
        raise RuntimeError("no C++ compiler\nmore")

    times = bench.interleaved({"ok": lambda: None, "bad": boom}, bench.torch.device("cpu"), 2, 1, failed)
    assert set(times) == {"ok"} and len(times["ok"]) == 2
    assert failed == {"bad": "RuntimeError: no C++ compiler"}


def test_bad_clip_argument_is_a_clear_error(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--clips", "3,-1"])
    assert "positive lengths" in capsys.readouterr().err


def _load_script(name: str):
    path = BENCH.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"granite_speech_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_step_times_every_engine_with_the_adapter_on(capsys):
    """``decode_step.py`` on tiny: the growing-cache steps of HF and FMS and FMS's static-cache step (eager), the
    adapter on as for a speech prompt; every engine gets a finite median."""
    script = _load_script("decode_step")
    assert script.main(["--variant", "tiny", "--dtype", "float32", "--steps", "2", "--warmup", "1", "--threads", "1",
                        "--adapter", "on", "--static", "eager"]) == 0
    out = capsys.readouterr().out
    assert "adapter on" in out
    for engine in ("hf", "fms", "fms (no mask)", "fms static"):
        line = next(ln for ln in out.splitlines() if ln.startswith(engine + "  "))
        _positive(float(line.split()[-3]), engine)


def test_decode_step_refuses_the_adapter_on_a_variant_without_one(capsys):
    script = _load_script("decode_step")
    with pytest.raises(SystemExit):
        script.main(["--variant", "tiny-4.1", "--steps", "1", "--adapter", "on"])
    assert "tiny-4.1 has no LoRA adapter" in capsys.readouterr().err


@pytest.mark.slow  # fresh processes that import torch and transformers, a few seconds each
def test_repro_cost_runs_a_repro_folder_and_the_import_floor(capsys):
    script = _load_script("repro_cost")
    assert script.main(["--repeats", "1", "--rows", "decoder.layers.1.mlp"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("repro.py: decoder.layers.1.mlp"))
    assert row.split()[-1] == "0"  # the honest tree's repro passes
    assert "import torch" in out
