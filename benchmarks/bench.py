"""Speed of Granite Speech: the HF reference against the FMS port, measured side by side.

Run from the repository root::

    python benchmarks/bench.py --variant 3.3-2b --dtype bfloat16 --clips 10 --new-tokens 16 --out bench-2b-cpu
    python benchmarks/bench.py --variant 3.3-2b --device cuda --dtype bfloat16 --compile --out bench-2b-gpu
    python benchmarks/bench.py --variant tiny --dtype float32 --clips 3 --compile --out /tmp/bench-tiny

Both models come from ``parity.pair.build_pair`` (same seeded random weights, built directly in ``--dtype``) and take
the same inputs (HF's processor output for a shipped espeak-ng speech clip tiled to each ``--clips`` length). Batch 1,
greedy decoding, exactly ``--new-tokens`` tokens (EOS never stops a run).

**Interleaved.** Every measurement runs the engines in turn, one call each per round (HF, FMS, FMS static, HF, FMS,
...), ``--warmup`` untimed rounds then ``--repeats`` timed ones, so machine drift (other load, frequency, caches)
hits every engine alike and cannot bias a ratio. Each cell is the median of the timed rounds, with the minimum
beside it. On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``.

Engines: ``hf`` (``GraniteSpeechForConditionalGeneration``), ``fms`` (``GraniteSpeech`` with FMS's ``generate``,
``generation.transcribe_ids``), ``fms static`` (``static_cache.generate_static``: preallocated KV cache, eager).
With ``--compile``, after the eager rounds: ``hf compiled`` (``nn.Module.compile`` of encoder, projector and
language model), ``fms compiled`` (``compile.compile_model``, the three pieces), ``fms static compiled`` (the
static-cache decode step compiled fullgraph; ``mode="reduce-overhead"``, CUDA graphs, on CUDA).

Quantities (one table row each, per clip):

* ``enc+proj``: encoder + projector on the clip's features (HF ``get_audio_features``, FMS ``get_audio_embeddings``);
* ``prefill``: one forward over the whole prompt with audio, KV cache on, logits of the last position only;
* ``decode/token``: from the end-to-end runs, ``(t[token n] - t[token 1]) / (n - 1)`` with ``t`` a timestamp (after a
  device sync) taken as each token is handed out (HF's ``streamer`` protocol, FMS's ``step_callback``): one decode
  step including the generation loop's own overhead;
* ``e2e``: generate from features to ``--new-tokens`` tokens (feature extraction excluded); ``RTF`` = e2e / clip;
* ``decode x-floor``: decode/token over the memory-read floor, the least time a step can take when it must read
  every decoder weight once: decoder parameter bytes (tied embedding/head once) / the device's read bandwidth,
  measured with ``Tensor.sum`` over a ``--read-mib`` float32 tensor (bytes read per second).

Ratio columns, of medians (below 1: FMS is faster): ``fms/hf`` and ``static/hf`` eager, the same compiled, and
``compiled static/eager fms`` (the compiled static-cache step against FMS's eager path). A last pair of rows gives
the parity engine's cost: ``parity.compare.run_parity`` over every layer against two plain forwards, and its cost by phase
(``ParityResult.phase_s``: pipelines, reference, float64 bounds, the model under test, replay, assemble) (``--no-parity``
skips it). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, n/a on CPU.

Outputs: the table on stdout (``tabulate``), and with ``--out`` ``bench.md`` and ``bench.json`` (device, CPU threads,
torch / transformers / ibm-fms versions, date, arguments, every timed sample).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLE_RATE = 16000
QUANTITIES = ("enc+proj", "prefill", "decode/token", "e2e", "RTF", "decode x-floor", "peak MiB")


# -- timing primitives ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
                failed: Optional[dict[str, str]] = None) -> dict[str, list[float]]:
    """Wall times in ms of each call over ``repeats`` timed rounds, after ``warmup`` untimed rounds.

    A round calls every entry of ``calls`` once, in order; so the engines alternate (A, B, A, B, ...) and share the
    machine's state. On CUDA the device is synchronized before and after each timed call.

    Args:
        failed: where given, a call that raises is dropped from later rounds and its error recorded here
            (``{name: "ErrorType: first line"}``), so one engine's failure (e.g. a compiler error) leaves the others'
            numbers; where None, errors propagate.

    Returns:
        ``{name: [ms, ...]}``, ``repeats`` samples per name that never failed.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    live = dict(calls)
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, fn in list(live.items()):
                _sync(device)
                start = time.perf_counter()
                try:
                    fn()
                    _sync(device)
                except Exception as err:  # noqa: BLE001 - recorded and reported by the caller
                    if failed is None:
                        raise
                    text = str(err).strip()
                    failed[name] = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
                    del live[name], times[name]
                    continue
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return times


def read_bandwidth_gbs(device: torch.device, mib: int, repeats: int) -> float:
    """Device memory read bandwidth in GB/s (1e9 bytes/s): bytes of a ``mib`` MiB float32 tensor over the median time
    of ``Tensor.sum`` on it (one read of every byte, a scalar written), after one warm-up."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    ms = statistics.median(interleaved({"sum": src.sum}, device, repeats=max(repeats, 5), warmup=1)["sum"])
    nbytes = src.numel() * src.element_size()
    del src
    return nbytes / (ms / 1e3) / 1e9


def decoder_weight_bytes(fms_model: torch.nn.Module) -> int:
    """Bytes of every distinct decoder parameter (tied embedding/head counted once): what one decode step reads."""
    return sum(p.numel() * p.element_size() for p in fms_model.decoder.parameters())  # parameters() dedups ties


class PeakMemory:
    """Context manager: peak ``torch.cuda.max_memory_allocated`` inside the block, in MiB (``mib``; None on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20


# -- audio ------------------------------------------------------------------------------------------------------------


def tiled_speech(seconds: float, name: Optional[str] = None) -> torch.Tensor:
    """A float32 waveform [round(seconds * 16000)] made by repeating a shipped speech clip (mono, 16 kHz).

    Raises:
        ValueError: ``seconds`` not > 0, or the shipped clip is not 16 kHz.
    """
    from fms_granite_speech.features import load_wav, shipped_audio

    if not seconds > 0:
        raise ValueError(f"clip length must be > 0 seconds, got {seconds}")
    wave, rate = load_wav(shipped_audio(name))
    if rate != SAMPLE_RATE:
        raise ValueError(f"the shipped clip is {rate} Hz, expected {SAMPLE_RATE}")
    wave = wave.mean(dim=0)
    samples = int(round(seconds * SAMPLE_RATE))
    return wave.repeat(math.ceil(samples / wave.numel()))[:samples].contiguous()


def model_inputs(inputs, device: torch.device, dtype: torch.dtype):
    """HF's processor output on ``device`` with the features in the models' ``dtype`` (HF's modules do not cast
    their input; both engines get the same tensors)."""
    import dataclasses

    inputs = inputs.to(device)
    return dataclasses.replace(inputs, input_features=inputs.input_features.to(dtype), fms=None)


# -- the engines ------------------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """One way of running the model on one clip's inputs.

    ``enc_proj`` / ``prefill``: zero-argument calls (None where the engine shares another's, e.g. the static cache
    changes decoding only). ``generate(stamp)``: a zero-argument call generating ``new_tokens`` tokens that calls
    ``stamp()`` as each new token is handed out.
    """

    name: str
    generate: Callable[[Callable[[], None]], Callable[[], Any]]
    enc_proj: Optional[Callable[[], Any]] = None
    prefill: Optional[Callable[[], Any]] = None
    decode: list = field(default_factory=list)  # ms per token of each end-to-end run


def hf_engine(hf, inputs, new_tokens: int, pad_id: int, name: str = "hf") -> Engine:
    """HF: ``get_audio_features``, a ``logits_to_keep=1`` forward, ``generate`` with a streamer for the stamps."""
    ids, feats, mask = inputs.input_ids, inputs.input_features, inputs.input_features_mask

    def generate(stamp):
        class Stamps:  # transformers' streamer protocol: put(prompt ids), then put(token) after every step
            def put(self, value):
                stamp()

            def end(self):
                pass

        return lambda: hf.generate(input_ids=ids, input_features=feats, input_features_mask=mask,
                                   attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, streamer=Stamps())

    return Engine(name, generate,
                  enc_proj=lambda: hf.get_audio_features(feats).pooler_output,
                  prefill=lambda: hf(input_ids=ids, input_features=feats, input_features_mask=mask, use_cache=True,
                                     logits_to_keep=1))


def fms_engine(fms, inputs, new_tokens: int, pad_id: int, name: str = "fms") -> Engine:
    """FMS: ``get_audio_embeddings``, a ``last_n_tokens=1`` forward, ``transcribe_ids`` (FMS ``generate``)."""
    from fms_granite_speech.generation import transcribe_ids

    ids, feats, mask = inputs.input_ids, inputs.input_features, inputs.input_features_mask

    def generate(stamp):
        return lambda: transcribe_ids(fms, ids, feats, mask, max_new_tokens=new_tokens, pad_token_id=pad_id,
                                      step_callback=lambda step, logits, tokens: stamp())

    return Engine(name, generate, enc_proj=lambda: fms.get_audio_embeddings(feats),
                  prefill=lambda: fms(ids, input_features=feats, input_features_mask=mask, use_cache=True,
                                      last_n_tokens=1))


def static_engine(fms, inputs, new_tokens: int, pad_id: int, compiled: bool, device: torch.device,
                  backend: str) -> Engine:
    """FMS with the preallocated KV cache (``static_cache.generate_static``); one ``StaticDecoder`` reused by every
    run, so a compiled step is compiled once (in the warm-up rounds)."""
    from fms_granite_speech.static_cache import StaticCache, StaticDecoder, generate_static

    ids, feats, mask = inputs.input_ids, inputs.input_features, inputs.input_features_mask
    mode = "reduce-overhead" if compiled and device.type == "cuda" else None
    decoder = StaticDecoder(fms, StaticCache.allocate(fms, ids.shape[0], ids.shape[1] + new_tokens),
                            compile=compiled, mode=mode, backend=backend)

    def generate(stamp):
        return lambda: generate_static(fms, ids, feats, mask, max_new_tokens=new_tokens, pad_token_id=pad_id,
                                       decoder=decoder, step_callback=lambda step, logits, tokens: stamp())

    return Engine("fms static compiled" if compiled else "fms static", generate)


def measure(engines: Sequence[Engine], clip_s: float, device: torch.device, args,
            notes: Optional[list[str]] = None) -> list[dict]:
    """The rows of one clip for ``engines`` (one mode), every quantity measured interleaved across them.

    An engine whose call raises (e.g. inductor failing to build a kernel) is dropped from that quantity on, and the
    error is appended to ``notes``; the other engines' rows are kept.

    Returns:
        one dict per quantity: ``{"kind": "timing", "clip_s", "quantity", "unit", "engines": {name: {"median",
        "min", "samples"}}}``; ``decode/token`` comes from the ``e2e`` runs' stamps; peak MiB per engine (CUDA).
    """
    r, w, n = args.repeats, args.warmup, args.new_tokens
    failed: dict[str, str] = {}
    rows = []
    for quantity, attr in (("enc+proj", "enc_proj"), ("prefill", "prefill")):
        calls = {e.name: getattr(e, attr) for e in engines if getattr(e, attr) is not None and e.name not in failed}
        rows.append(_row(clip_s, quantity, "ms", interleaved(calls, device, r, w, failed)))

    stamps: list[float] = []
    peaks: dict[str, Optional[float]] = {}

    def stamp() -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    def e2e(engine: Engine) -> Callable[[], None]:
        run = engine.generate(stamp)

        def call() -> None:
            stamps.clear()
            with PeakMemory(device) as peak:
                run()
            if len(stamps) < n:
                raise RuntimeError(f"{engine.name} handed out {len(stamps)} tokens, expected {n}")
            engine.decode.append((stamps[-1] - stamps[-n]) * 1e3 / (n - 1))
            peaks[engine.name] = None if peak.mib is None else max(peak.mib, peaks.get(engine.name) or 0.0)
        return call

    times = interleaved({e.name: e2e(e) for e in engines if e.name not in failed}, device, r, w, failed)
    rows.append(_row(clip_s, "decode/token", "ms", {e.name: e.decode[w:] for e in engines if e.name in times}))
    rows.append(_row(clip_s, "e2e", "ms", times))
    rows.append(_row(clip_s, "RTF", "", {k: [t / 1e3 / clip_s for t in v] for k, v in times.items()}))
    rows.append({"kind": "timing", "clip_s": clip_s, "quantity": "peak MiB", "unit": "MiB",
                 "engines": {k: {"median": peaks.get(k), "min": peaks.get(k), "samples": []} for k in times}})
    if notes is not None:
        notes += [f"{name} ({clip_s:g} s clip) dropped: {error}" for name, error in failed.items()]
    return rows


def _row(clip_s: float, quantity: str, unit: str, samples: dict[str, list[float]]) -> dict:
    return {"kind": "timing", "clip_s": clip_s, "quantity": quantity, "unit": unit,
            "engines": {k: {"median": statistics.median(v), "min": min(v), "samples": v} for k, v in samples.items()}}


def floor_rows(rows: list[dict], floor_ms: float) -> list[dict]:
    """``decode x-floor`` rows: each decode/token row's medians and minimums over the floor (ms)."""
    out = []
    for row in rows:
        if row["quantity"] == "decode/token":
            out.append({**row, "quantity": "decode x-floor", "unit": "x",
                        "engines": {k: {"median": v["median"] / floor_ms, "min": v["min"] / floor_ms,
                                        "samples": [s / floor_ms for s in v["samples"]]}
                                    for k, v in row["engines"].items()}})
    return out



def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per (clip, quantity) with the engines of every pass (eager, compiled) side by side, in clip then
    ``QUANTITIES`` order."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (row["clip_s"], row["quantity"])
        if key in merged:
            merged[key]["engines"].update(row["engines"])
        else:
            merged[key] = {**row, "engines": dict(row["engines"])}
    return sorted(merged.values(), key=lambda r: (r["clip_s"], QUANTITIES.index(r["quantity"])))

# -- compile ----------------------------------------------------------------------------------------------------------


def compile_hf(hf, backend: str = "inductor") -> None:
    """``torch.compile`` HF's encoder, projector and language model in place (``nn.Module.compile``)."""
    for module in (hf.model.encoder, hf.model.projector, hf.model.language_model):
        module.compile(backend=backend)


def compile_fms(fms, backend: str = "inductor"):
    """``fms_granite_speech.compile.compile_model`` on the encoder, projector and decoder (in place)."""
    from fms_granite_speech.compile import compile_model

    return compile_model(fms, backend=backend)


# -- parity engine cost -----------------------------------------------------------------------------------------------


def measure_parity(pair, inputs, clip_s: float, device: torch.device, args) -> list[dict]:
    """Two rows: ``run_parity`` over all layers, and two plain forwards (HF then FMS) on the same inputs."""
    from parity.compare import run_parity

    def plain():
        pair.hf(input_ids=inputs.input_ids, input_features=inputs.input_features,
                input_features_mask=inputs.input_features_mask)
        pair.fms(inputs.input_ids, input_features=inputs.input_features,
                 input_features_mask=inputs.input_features_mask)

    box = {}
    times = interleaved({"plain": plain, "parity": lambda: box.update(r=run_parity(pair, inputs))}, device,
                        args.repeats, min(args.warmup, 1))
    res = box["r"]
    plain_ms, parity_ms = statistics.median(times["plain"]), statistics.median(times["parity"])
    phases = [{"kind": "parity_phase", "name": f"parity phase: {name}", "clip_s": clip_s, "median_ms": 1000 * sec,
               "min_ms": 1000 * sec, "note": f"last timed run; x{1000 * sec / plain_ms:.2f} of 2 plain forwards"}
              for name, sec in res.phase_s.items()]
    return phases + [
        {"kind": "parity", "name": "parity run_parity (all layers)", "clip_s": clip_s, "median_ms": parity_ms,
         "min_ms": min(times["parity"]), "layers": len(res.layers), "passed": bool(res.passed),
         "note": f"{len(res.layers)} layers, {'pass' if res.passed else 'FAIL'}; x{parity_ms / plain_ms:.2f} of 2 "
                 "plain forwards"},
        {"kind": "parity_baseline", "name": "2 plain forwards (HF + FMS)", "clip_s": clip_s, "median_ms": plain_ms,
         "min_ms": min(times["plain"]), "note": "no hooks, no cache"},
    ]


# -- report -----------------------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Device name, library versions, date: the JSON's ``meta``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
            name = model.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            pass
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "ibm-fms": _version("ibm-fms"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


ENGINE_ORDER = ("hf", "fms", "fms static", "hf compiled", "fms compiled", "fms static compiled")
RATIOS = (("fms/hf", "fms", "hf"), ("static/hf", "fms static", "hf"),
          ("compiled fms/hf", "fms compiled", "hf compiled"),
          ("compiled static/hf", "fms static compiled", "hf compiled"),
          ("compiled static/eager fms", "fms static compiled", "fms"))


def table(rows: Sequence[dict], tablefmt: str) -> str:
    """The timing rows as one ``tabulate`` table: per engine a cell ``median (min)``, then the median ratios; the
    parity-cost and floor rows after it."""
    from tabulate import tabulate

    timing = [r for r in rows if r["kind"] == "timing"]
    seen = list(dict.fromkeys(name for r in timing for name in r["engines"]))
    engines = [e for e in ENGINE_ORDER if e in seen] + [e for e in seen if e not in ENGINE_ORDER]
    ratios = [(label, a, b) for label, a, b in RATIOS if a in engines and b in engines]
    headers = ["clip s", "quantity"] + engines + [label for label, _, _ in ratios]
    body = []
    for r in timing:
        cells = [_fmt(r["clip_s"]), r["quantity"] + (f" {r['unit']}" if r["unit"] in ("ms",) else "")]
        for e in engines:
            v = r["engines"].get(e)
            if v is None:
                cells.append("")
            elif v["median"] is None or len(v["samples"]) <= 1:
                cells.append(_fmt(v["median"]))
            else:
                cells.append(f"{_fmt(v['median'])} ({_fmt(v['min'])})")
        for _, a, b in ratios:
            va, vb = r["engines"].get(a), r["engines"].get(b)
            ok = va and vb and va["median"] is not None and vb["median"]
            cells.append(f"{va['median'] / vb['median']:.2f}" if ok else "")
        body.append(cells)
    text = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True) if body else ""
    extra = [[r["name"], _fmt(r.get("median_ms")), _fmt(r.get("min_ms")), r.get("note", "")]
             for r in rows if r["kind"] != "timing"]
    if extra:
        text += ("\n\n" if text else "") + tabulate(extra, headers=["row", "median ms", "min ms", "note"], tablefmt=tablefmt,
                                  disable_numparse=True)
    return text


# -- main -------------------------------------------------------------------------------------------------------------


def _clips(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clips takes comma-separated seconds like 3,10,30, got {text!r}")
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--clips needs positive lengths in seconds, got {text!r}")
    return values


def _positive(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring); bad values exit with an argparse error naming the flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny", help="tiny, 3.3-2b or 3.3-8b (seeded random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16")
    p.add_argument("--clips", type=_clips, default=[10.0], help="clip lengths in seconds (default 10)")
    p.add_argument("--new-tokens", type=_positive(2), default=64, help="greedy tokens per generate (>= 2)")
    p.add_argument("--repeats", type=_positive(1), default=5, help="timed rounds per measurement")
    p.add_argument("--warmup", type=_positive(0), default=2, help="untimed rounds before each measurement")
    p.add_argument("--compile", action="store_true", help="also measure the compiled engines")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile (inductor; aot_eager to check tracing only)")
    p.add_argument("--no-static", action="store_true", help="skip the static-KV-cache engines")
    p.add_argument("--no-parity", action="store_true", help="skip the parity-engine cost rows")
    p.add_argument("--parity-only", action="store_true",
                   help="only the parity-engine cost rows (no generation engines, no floor): the engine's cost at "
                        "full size in minutes instead of half an hour")
    p.add_argument("--parity-clip", type=float, default=None,
                   help="clip seconds for the parity-cost rows (default: the shortest of --clips)")
    p.add_argument("--read-mib", type=_positive(1), default=None,
                   help="tensor size for the read-bandwidth measurement (default 2048 on CUDA, 1024 on CPU)")
    p.add_argument("--audio", default=None, help="shipped clip name to tile (fox, ships, transcribe)")
    p.add_argument("--threads", type=_positive(1), default=None, help="torch CPU intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for bench.md and bench.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; print the table; write ``bench.md`` / ``bench.json`` when ``--out`` is given.

    Returns:
        the JSON document: ``{"meta": ..., "args": ..., "rows": [...], "notes": [...]}``.

    Raises:
        SystemExit: bad arguments (argparse), including CUDA asked for on a machine without it.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from parity.pair import build_inputs, build_pair, parse_dtype

    try:
        dtype = parse_dtype(args.dtype)
        pair = build_pair(args.variant, seed=args.seed, dtype=dtype, device=args.device)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    device = pair.device
    notes: list[str] = []
    pad_id = getattr(pair.get_tokenizer(), "pad_token_id", None) or 0
    if args.parity_only and args.no_parity:
        parser.error("--parity-only and --no-parity leave nothing to measure")
    inputs = {c: model_inputs(build_inputs(pair, audio=tiled_speech(c, args.audio), sampling_rate=SAMPLE_RATE),
                              device, dtype) for c in ([] if args.parity_only else args.clips)}
    n = args.new_tokens

    rows: list[dict] = []
    for clip_s in inputs:
        x = inputs[clip_s]
        engines = [hf_engine(pair.hf, x, n, pad_id), fms_engine(pair.fms, x, n, pad_id)]
        if not args.no_static:
            engines.append(static_engine(pair.fms, x, n, pad_id, False, device, args.compile_backend))
        rows += measure(engines, clip_s, device, args, notes)

    floor = None
    if not args.parity_only:
        read_mib = args.read_mib or (2048 if device.type == "cuda" else 1024)
        bandwidth = read_bandwidth_gbs(device, read_mib, args.repeats)
        weights = decoder_weight_bytes(pair.fms)
        floor_ms = weights / (bandwidth * 1e9) * 1e3
        floor = {"kind": "floor", "name": "decode floor (decoder weights / read bandwidth)", "median_ms": floor_ms,
                 "weight_bytes": weights, "bandwidth_gbs": bandwidth,
                 "note": f"{weights / 1e9:.4g} GB decoder weights / {bandwidth:.1f} GB/s (sum over {read_mib} MiB)"}

    if not args.no_parity:
        clip = args.parity_clip if args.parity_clip is not None else min(args.clips)
        x = inputs.get(clip) or model_inputs(build_inputs(pair, audio=tiled_speech(clip, args.audio),
                                                          sampling_rate=SAMPLE_RATE), device, dtype)
        extra = measure_parity(pair, x, clip, device, args)
    else:
        extra = []

    if args.compile and not args.parity_only:
        try:
            compile_hf(pair.hf, args.compile_backend)
            compile_fms(pair.fms, args.compile_backend)
            for clip_s in args.clips:
                x = inputs[clip_s]
                engines = [hf_engine(pair.hf, x, n, pad_id, "hf compiled"),
                           fms_engine(pair.fms, x, n, pad_id, "fms compiled")]
                if not args.no_static:
                    engines.append(static_engine(pair.fms, x, n, pad_id, True, device, args.compile_backend))
                rows += measure(engines, clip_s, device, args, notes)
        except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor: reported, eager rows kept
            first = str(err).splitlines()[0] if str(err) else ""
            notes.append(f"compiled rows stopped: {type(err).__name__}: {first}")
            traceback.print_exc(file=sys.stderr)

    if floor is not None:
        rows = merge_rows(rows + floor_rows(rows, floor["median_ms"]))
        rows += [floor]
    rows += extra
    doc = {
        "meta": {**environment(device), "variant": args.variant, "dtype": str(dtype).removeprefix("torch."),
                 "batch": 1, "decoding": "greedy", "new_tokens": n, "repeats": args.repeats, "warmup": args.warmup,
                 "order": "interleaved", "audio": "shipped speech clip tiled",
                 "weights": pair.provenance()["weights"]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "notes": notes,
    }
    text = table(rows, "simple")
    print(f"{args.variant} {doc['meta']['dtype']} on {doc['meta']['device_name']}: cells are median (min) ms of "
          f"{args.repeats} interleaved rounds")
    print(text)
    for note in notes:
        print(f"note: {note}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = doc["meta"]
        md = [f"# Granite Speech benchmark: {args.variant}, {meta['dtype']}, {meta['device_name']}", "",
              f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, ibm-fms "
              f"{meta['ibm-fms']}; {meta['cpu_threads']} CPU threads; batch 1, greedy, {n} new tokens; engines "
              f"interleaved; each cell median (min) of {args.repeats} rounds after {args.warmup} warm-up.", "",
              table(rows, "github"), ""]
        md += [f"- {note}" for note in notes]
        (args.out / "bench.md").write_text("\n".join(md) + "\n")
        (args.out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
