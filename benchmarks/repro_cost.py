"""What a standalone repro folder costs to run: wall time and peak resident memory of ``python repro.py`` in a fresh
process, per row kind, beside the imports it cannot avoid.

    python benchmarks/repro_cost.py [--variant tiny] [--repeats 3]

Writes one repro folder per row (``parity.repro.write_repro`` on the seeded pair of ``--variant``, the shipped clip)
into a temporary folder, then runs every folder and every import-floor command ``--repeats`` times, in turn (row 1,
row 2, ..., floor 1, ...; then again), each as a child process whose peak RSS comes from ``os.wait4``'s rusage (the
kernel's ``ru_maxrss``: resident pages, file-backed library pages included), launched from a small interpreter of its
own (a child forked from the process that built the pair would inherit that process's peak). Prints median (min) seconds and median
MB per command, and each repro's exit status (0: the row agrees).
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

from tabulate import tabulate

ROWS = ("encoder.blocks.1", "encoder.blocks.1.conv", "encoder.blocks.1.attn", "projector.layers.0",
        "projector.layers.0.cross_attn", "decoder.layers.1", "decoder.layers.1.attn", "decoder.layers.1.mlp",
        "logits")

FLOOR = {
    "import torch": "import torch",
    "import torch, transformers' Granite Speech, fms_granite_speech.model": (
        "import torch, safetensors.torch; "
        "from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration; "
        "import fms_granite_speech.model"),
}


def _run(cmd: list[str], cwd: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit status) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def _measure(spec: str) -> int:
    """``--measure FILE``: run the commands of FILE (JSON: commands, repeats, cwd) in turn and print the results as
    JSON. Runs in a fresh interpreter that imports neither torch nor parity: Linux hands a child the peak RSS of the
    process it was forked from (``ru_maxrss`` survives fork and exec), so children of the process holding the pair
    would all report its size."""
    job = json.loads(Path(spec).read_text())
    runs = {name: [] for name in job["commands"]}
    for _ in range(job["repeats"]):
        for name, cmd in job["commands"].items():
            runs[name].append(_run(cmd, job["cwd"]))
    print(json.dumps(runs))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        return _measure(argv[1])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", nargs="*", default=list(ROWS))
    args = p.parse_args(argv)
    from parity.inputs import build_inputs
    from parity.pair import build_pair
    from parity.repro import write_repro

    pair = build_pair(args.variant)
    inputs = build_inputs(pair, same_inputs=True)
    with tempfile.TemporaryDirectory(prefix="repro-cost-") as tmp:
        commands = {}
        for row in args.rows:
            folder = write_repro(pair, inputs, row, Path(tmp) / row.replace(".", "_"))
            commands[f"repro.py: {row}"] = [sys.executable, str(folder / "repro.py")]
        for name, code in FLOOR.items():
            commands[name] = [sys.executable, "-c", code + "; import os; os._exit(0)"]
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"commands": commands, "repeats": args.repeats, "cwd": tmp}))
        done = subprocess.run([sys.executable, __file__, "--measure", str(job)], capture_output=True, text=True,
                              check=True)
        runs = json.loads(done.stdout)
    table = []
    for name, results in runs.items():
        secs = [r[0] for r in results]
        table.append([name, f"{statistics.median(secs):.2f} ({min(secs):.2f})",
                      f"{statistics.median(r[1] for r in results):.0f}",
                      ",".join(sorted({str(r[2]) for r in results}))])
    print(f"fresh-process cost, {args.variant}, {args.repeats} runs each, interleaved")
    print(tabulate(table, headers=["command", "s, median (min)", "peak RSS MB, median", "exit"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
