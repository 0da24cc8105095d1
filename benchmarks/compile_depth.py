"""Does compiled-mode parity grow with depth? ``parity diff --mode compiled`` on ``tiny`` and on deeper copies of it.

Each configuration runs in a fresh process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in a new
temporary folder, FX graph cache off), so every run pays its full compile cost; the configurations alternate
(tiny, deep, tiny, deep, ...) over ``--repeats`` rounds so machine drift hits both alike. Printed: min and median
wall seconds of the whole run (build, compile, compare) and of the compare phase alone, the layer count, and each
configuration's median over ``tiny``'s. Regional compilation (``parity.compare``: one graph per kind of block on
each side) should keep a deeper model's time close to ``tiny``'s.

    python benchmarks/compile_depth.py                       # tiny vs decoder x2 vs decoder x2 + encoder x2
    python benchmarks/compile_depth.py --backend aot_eager --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one run in a child process: prints {"seconds": ..., "layers": ..., "passed": ...} as its last line
CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
from fms_granite_speech.config import get_config
from parity.compare import run_parity
from parity.inputs import build_inputs
from parity.pair import build_pair
decoder_x, encoder_x, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
config = get_config("tiny")
config = config.replace(decoder=config.decoder.updated(nlayers=config.decoder.nlayers * decoder_x),
                        encoder=config.encoder.updated(num_layers=config.encoder.num_layers * encoder_x))
pair = build_pair("tiny", config=config)
inputs = build_inputs(pair)
compare = time.perf_counter()
result = run_parity(pair, inputs, mode="compiled", compile_backend=backend)
end = time.perf_counter()
print(json.dumps({"seconds": end - start, "compare_seconds": end - compare, "layers": len(result.layers),
                  "passed": bool(result.passed)}))
"""

CONFIGS = {"tiny": (1, 1), "decoder x2": (2, 1), "decoder+encoder x2": (2, 2)}


def run_one(decoder_x: int, encoder_x: int, backend: str, threads: int) -> dict:
    """One cold run in a child process; raises RuntimeError with the child's last output if it fails."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", CHILD, str(decoder_x), str(encoder_x), backend], cwd=ROOT,
                             env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"child failed ({run.returncode}): {(run.stderr or run.stdout).strip()[-800:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = wall
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--repeats", type=int, default=2, help="rounds (each config once per round)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each child")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--out", type=Path, default=None, help="write the samples as JSON here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or args.repeats < 1:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}" if unknown else "--repeats must be >= 1")
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            samples[name].append(run_one(*CONFIGS[name], args.backend, args.threads))
    from tabulate import tabulate

    base = statistics.median(s["wall_seconds"] for s in samples[names[0]])
    rows = []
    for name in names:
        wall = [s["wall_seconds"] for s in samples[name]]
        comp = [s["compare_seconds"] for s in samples[name]]
        rows.append([name, samples[name][0]["layers"], all(s["passed"] for s in samples[name]),
                     f"{statistics.median(wall):.1f} ({min(wall):.1f})", f"{statistics.median(comp):.1f} "
                     f"({min(comp):.1f})", f"{statistics.median(wall) / base:.2f}"])
    print(f"parity diff --mode compiled --compile-backend {args.backend}, cold inductor cache, "
          f"{args.threads} threads, median (min) of {args.repeats}")
    print(tabulate(rows, headers=["config", "layers", "pass", "process s", "compare s", f"x {names[0]}"],
                   disable_numparse=True))
    doc = {"backend": args.backend, "threads": args.threads, "samples": samples}
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
