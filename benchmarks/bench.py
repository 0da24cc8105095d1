"""Speed and memory of Granite Speech: the HF reference against the FMS port, eager and compiled.

Run from the repository root::

    python benchmarks/bench.py --variant 3.3-2b --device cuda --dtype bfloat16 --compile --out bench-out
    python benchmarks/bench.py --variant tiny --device cpu --dtype float32 --clips 3,10 --new-tokens 8 --out DIR

Both models come from ``parity.pair.build_pair`` (same seeded random weights; FMS filled by the registered HF
adapter). Batch 1, greedy decoding, a fixed number of new tokens (EOS is never allowed to stop early). For every
engine (``hf``, ``fms``), mode (``eager``, ``compiled`` with ``--compile``) and clip length, one row holds:

* ``enc_proj_ms``: encoder + projector on the clip's features (HF ``get_audio_features``, FMS
  ``get_audio_embeddings``);
* ``prefill_ms``: one forward over the whole prompt with audio, KV cache on, logits of the last position only;
* ``decode_ms_per_token``: ``(e2e(n) - e2e(1)) / (n - 1)`` with ``e2e(k)`` the median generate time for ``k`` new
  tokens, i.e. the cost of one more token including the generation loop's own overhead;
* ``e2e_ms``: generate with ``--new-tokens`` tokens from features (feature extraction excluded);
* ``rtf``: real-time factor, ``e2e seconds / clip seconds``;
* ``peak_mib``: ``torch.cuda.max_memory_allocated`` during the end-to-end runs (None / "n/a" on CPU).

Extra rows: the decode step's memory-bandwidth floor (all decoder weight bytes, read once per token, divided by the
device's copy bandwidth measured with a large ``Tensor.copy_``; bytes read + written per second), and the cost of
the parity engine: ``parity.compare.run_parity`` over every layer against two plain forwards (one HF, one FMS) on the
same inputs. Every time is the median of ``--repeats`` runs after ``--warmup`` runs, with
``torch.cuda.synchronize()`` on both sides of each timed call on CUDA.

Audio: a shipped espeak-ng speech clip (``fms_granite_speech/data``), tiled to each requested length (never a tone).

Outputs: one table printed with ``tabulate``, plus ``bench.md`` and ``bench.json`` in ``--out`` (device name,
torch / transformers / ibm-fms versions, date, arguments, notes about skipped rows).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLE_RATE = 16000
COLUMNS = [
    ("name", "row"),
    ("clip_s", "clip s"),
    ("enc_proj_ms", "enc+proj ms"),
    ("prefill_ms", "prefill ms"),
    ("decode_ms_per_token", "decode ms/tok"),
    ("e2e_ms", "e2e ms"),
    ("rtf", "RTF"),
    ("peak_mib", "peak MiB"),
    ("note", "note"),
]


# -- timing primitives ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs, after ``warmup`` untimed runs.

    On CUDA the device is synchronized before and after every timed call, so queued kernels are counted.
    """
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def copy_bandwidth_gbs(device: torch.device, mib: int, repeats: int) -> float:
    """Device memory bandwidth in GB/s (1e9 bytes/s) measured with ``dst.copy_(src)`` of a ``mib`` MiB tensor.

    Counts bytes read plus bytes written (``2 * nbytes``) per copy, the same traffic convention as the weight-read
    floor it is divided into. Median of ``repeats`` copies after one warm-up.
    """
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=max(repeats, 3), warmup=1)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms / 1e3) / 1e9


def decoder_weight_bytes(fms_model: torch.nn.Module) -> int:
    """Bytes of every distinct decoder parameter (tied embedding/head counted once): what one decode step reads."""
    return sum(p.numel() * p.element_size() for p in fms_model.decoder.parameters())  # parameters() dedups ties


# -- audio and inputs -------------------------------------------------------------------------------------------------


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
    reps = math.ceil(samples / wave.numel())
    return wave.repeat(reps)[:samples].contiguous()


# -- the two engines --------------------------------------------------------------------------------------------------


def _hf_engine(hf, inputs, new_tokens: int, pad_id: int):
    ids, feats, mask = inputs.input_ids, inputs.input_features, inputs.input_features_mask

    def enc_proj():
        return hf.get_audio_features(feats).pooler_output

    def prefill():
        return hf(input_ids=ids, input_features=feats, input_features_mask=mask, use_cache=True, logits_to_keep=1)

    def generate(n: int, stamp: Callable[[], None]):
        class Stamps:  # transformers' streamer protocol: put(prompt ids), then put(token) after every step
            def put(self, value):
                stamp()

            def end(self):
                pass

        return lambda: hf.generate(input_ids=ids, input_features=feats, input_features_mask=mask,
                                   attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=pad_id, streamer=Stamps())

    return enc_proj, prefill, generate


def _fms_engine(fms, inputs, new_tokens: int, pad_id: int):
    from fms_granite_speech.generation import transcribe_ids

    ids, feats, mask = inputs.input_ids, inputs.input_features, inputs.input_features_mask

    def enc_proj():
        return fms.get_audio_embeddings(feats)

    def prefill():
        return fms(ids, input_features=feats, input_features_mask=mask, use_cache=True, last_n_tokens=1)

    def generate(n: int, stamp: Callable[[], None]):
        return lambda: transcribe_ids(fms, ids, feats, mask, max_new_tokens=n, eos_token_id=None,
                                      pad_token_id=pad_id, step_callback=lambda step, logits, tokens: stamp())

    return enc_proj, prefill, generate


def measure_engine(name: str, mode: str, engine, clip_s: float, device: torch.device, args) -> dict:
    """One table row: enc+proj, prefill, decode ms/token, e2e, RTF and peak memory of one engine on one clip.

    Decode ms/token comes from the end-to-end runs themselves: a timestamp (after a device sync) is taken as each
    new token is handed out (HF: the ``streamer`` protocol; FMS: ``transcribe_ids``'s ``step_callback``), and
    ``(t[token n] - t[token 1]) / (n - 1)`` is the per-token cost of the decode loop after prefill; the median over
    the repeats is reported.
    """
    enc_proj, prefill, generate = engine
    r, w, n = args.repeats, args.warmup, args.new_tokens
    row = {"kind": "engine", "name": f"{name} {mode}", "engine": name, "mode": mode, "clip_s": clip_s}
    row["enc_proj_ms"] = time_ms(enc_proj, device, r, w)
    row["prefill_ms"] = time_ms(prefill, device, r, w)

    stamps: list[float] = []

    def stamp() -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    run = generate(n, stamp)
    decode: list[float] = []

    def e2e() -> None:
        stamps.clear()
        run()
        if len(stamps) < n:
            raise RuntimeError(f"{name} generate reported {len(stamps)} tokens, expected {n}")
        decode.append((stamps[-1] - stamps[-n]) * 1e3 / (n - 1))

    with PeakMemory(device) as peak:
        row["e2e_ms"] = time_ms(e2e, device, r, w)
    row["decode_ms_per_token"] = statistics.median(decode[w:])
    row["rtf"] = row["e2e_ms"] / 1e3 / clip_s
    row["peak_mib"] = peak.mib
    row["note"] = f"{n} tokens, greedy"
    return row


# -- compile ----------------------------------------------------------------------------------------------------------


def compile_hf(hf, backend: str = "inductor") -> None:
    """``torch.compile`` HF's encoder, projector and language model in place (``nn.Module.compile``), as in the
    reference anchors (BENCHMARKS.md)."""
    for module in (hf.model.encoder, hf.model.projector, hf.model.language_model):
        module.compile(backend=backend)


def compile_fms(fms, backend: str = "inductor"):
    """The project's ``fms_granite_speech.compile.compile_model`` (raises ImportError while it is not there)."""
    module = importlib.import_module("fms_granite_speech.compile")
    out = module.compile_model(fms, backend=backend)
    return fms if out is None else out


# -- parity engine cost -----------------------------------------------------------------------------------------------


def measure_parity(pair, inputs, clip_s: float, device: torch.device, args) -> list[dict]:
    """Two rows: ``run_parity`` over all layers, and two plain forwards (HF then FMS) on the same inputs."""
    from parity.compare import run_parity

    def plain():
        pair.hf(input_ids=inputs.input_ids, input_features=inputs.input_features,
                input_features_mask=inputs.input_features_mask)
        pair.fms(inputs.input_ids, input_features=inputs.input_features,
                 input_features_mask=inputs.input_features_mask)

    result_box = {}

    def parity():
        result_box["r"] = run_parity(pair, inputs)

    with PeakMemory(device) as peak_plain:
        plain_ms = time_ms(plain, device, args.repeats, args.warmup)
    with PeakMemory(device) as peak_parity:
        parity_ms = time_ms(parity, device, args.repeats, min(args.warmup, 1))
    res = result_box["r"]
    ratio = parity_ms / plain_ms
    mem = ("" if peak_parity.mib is None or peak_plain.mib is None
           else f", memory x{peak_parity.mib / peak_plain.mib:.2f}")
    return [
        {"kind": "parity", "name": "parity run_parity (all layers)", "clip_s": clip_s, "e2e_ms": parity_ms,
         "peak_mib": peak_parity.mib, "layers": len(res.layers), "passed": bool(res.passed),
         "note": f"{len(res.layers)} layers, {'pass' if res.passed else 'FAIL'}; time x{ratio:.2f} of 2 forwards{mem}"},
        {"kind": "parity_baseline", "name": "2 plain forwards (HF + FMS)", "clip_s": clip_s, "e2e_ms": plain_ms,
         "peak_mib": peak_plain.mib, "note": "no hooks, no cache"},
    ]


# -- report -----------------------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Device name, library versions, date: the JSON's ``meta``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                              platform.machine())
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
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(rows: Sequence[dict], tablefmt: str) -> str:
    """The rows as one ``tabulate`` table (missing cells blank, peak memory "n/a" where not measured)."""
    from tabulate import tabulate

    body = []
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            if key not in row:
                cells.append("")
            else:
                cells.append(_fmt(row[key]))
        body.append(cells)
    return tabulate(body, headers=[h for _, h in COLUMNS], tablefmt=tablefmt, disable_numparse=True)


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
    p.add_argument("--clips", type=_clips, default=[3.0, 10.0, 30.0], help="clip lengths in seconds (3,10,30)")
    p.add_argument("--new-tokens", type=_positive(2), default=64, help="greedy tokens per generate (>= 2)")
    p.add_argument("--repeats", type=_positive(1), default=5, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=_positive(0), default=2, help="untimed runs before each measurement")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile (inductor; aot_eager to check tracing on CPU)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity-engine cost rows")
    p.add_argument("--parity-clip", type=float, default=None,
                   help="clip seconds for the parity-cost rows (default: the shortest of --clips)")
    p.add_argument("--copy-mib", type=_positive(1), default=None,
                   help="tensor size for the bandwidth copy (default 1024 on CUDA, 256 on CPU)")
    p.add_argument("--audio", default=None, help="shipped clip name to tile (fox, ships, transcribe)")
    p.add_argument("--threads", type=_positive(1), default=None,
                   help="torch CPU intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
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
    rows: list[dict] = []
    pad_id = getattr(pair.get_tokenizer(), "pad_token_id", None) or 0

    inputs = {}
    for clip_s in args.clips:
        wave = tiled_speech(clip_s, args.audio)
        inputs[clip_s] = build_inputs(pair, audio=wave, sampling_rate=SAMPLE_RATE)

    try:
        importlib.import_module("fms_granite_speech.generation")
        fms_ok = True
    except ImportError as err:
        fms_ok = False
        notes.append(f"FMS rows skipped: fms_granite_speech.generation is not importable ({err})")

    def run_mode(mode: str, hf, fms) -> None:
        for clip_s in args.clips:
            x = inputs[clip_s]
            if hf is not None:
                rows.append(measure_engine("hf", mode, _hf_engine(hf, x, args.new_tokens, pad_id), clip_s, device,
                                           args))
            if fms is not None:
                rows.append(measure_engine("fms", mode, _fms_engine(fms, x, args.new_tokens, pad_id), clip_s,
                                           device, args))

    run_mode("eager", pair.hf, pair.fms if fms_ok else None)

    # bandwidth floor of one decode step
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 256)
    bandwidth = copy_bandwidth_gbs(device, copy_mib, args.repeats)
    weights = decoder_weight_bytes(pair.fms)
    rows.append({"kind": "floor", "name": "decode floor (weights / bandwidth)",
                 "decode_ms_per_token": weights / (bandwidth * 1e9) * 1e3, "weight_bytes": weights,
                 "bandwidth_gbs": bandwidth,
                 "note": f"{weights / 1e6:.4g} MB decoder weights / {bandwidth:.0f} GB/s copy ({copy_mib} MiB)"})

    if not args.no_parity:
        parity_clip = args.parity_clip if args.parity_clip is not None else min(args.clips)
        x = inputs.get(parity_clip) or build_inputs(pair, audio=tiled_speech(parity_clip, args.audio),
                                                    sampling_rate=SAMPLE_RATE)
        rows.extend(measure_parity(pair, x, parity_clip, device, args))

    if args.compile:
        hf_c, fms_c = pair.hf, None
        try:
            compile_hf(pair.hf, args.compile_backend)
        except Exception as err:  # noqa: BLE001 - a backend failure is reported, not fatal
            hf_c = None
            notes.append(f"HF compiled rows skipped: torch.compile failed ({type(err).__name__}: {err})")
        if fms_ok:
            try:
                fms_c = compile_fms(pair.fms, args.compile_backend)
            except ImportError as err:
                notes.append(f"FMS compiled rows skipped: fms_granite_speech.compile is not importable ({err})")
            except Exception as err:  # noqa: BLE001
                notes.append(f"FMS compiled rows skipped: compile_model failed ({type(err).__name__}: {err})")
        for label, hf_m, fms_m in (("HF", hf_c, None), ("FMS", None, fms_c)):
            if hf_m is None and fms_m is None:
                continue
            try:
                run_mode("compiled", hf_m, fms_m)
            except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor on CPU
                first = str(err).splitlines()[0] if str(err) else ""
                notes.append(f"{label} compiled rows stopped: {type(err).__name__}: {first}")
                traceback.print_exc(file=sys.stderr)

    doc = {
        "meta": {**environment(device), "variant": args.variant, "dtype": str(dtype).removeprefix("torch."),
                 "batch": 1, "decoding": "greedy", "new_tokens": args.new_tokens, "repeats": args.repeats,
                 "warmup": args.warmup, "statistic": "median", "audio": "shipped speech clip tiled",
                 "weights": pair.provenance()["weights"]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "notes": notes,
    }
    text = table(rows, "simple")
    print(text)
    for note in notes:
        print(f"note: {note}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = doc["meta"]
        md = [f"# Granite Speech benchmark: {args.variant}, {meta['dtype']}, {meta['device_name']}", "",
              f"torch {meta['torch']}, transformers {meta['transformers']}, ibm-fms {meta['ibm-fms']}; "
              f"{meta['date']}; batch 1, greedy, {args.new_tokens} new tokens, median of {args.repeats} "
              f"(warm-up {args.warmup}).", "", table(rows, "github"), ""]
        md += [f"- {n}" for n in notes]
        (args.out / "bench.md").write_text("\n".join(md) + "\n")
        (args.out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
