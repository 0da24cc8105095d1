"""Start-up time of the command lines: each command's wall time, median of ``--repeats`` runs, as a ratio to
``python -c pass`` (the interpreter's own start-up). Commands that answer without building a model must not import
torch (``tests/test_cli_errors.py`` checks that); this script measures what that buys.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from tabulate import tabulate

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "parity --help": ["parity", "--help"],
    "parity map": ["parity", "map"],
    "parity diff (usage error)": ["parity", "diff", "--layer", "encoder.blocks.99"],
    "granite-speech --help": ["granite-speech", "--help"],
    "granite-speech (usage error)": ["granite-speech", "transcribe", "/no/such.wav"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    missing = [c[0] for c in COMMANDS.values() if shutil.which(c[0]) is None and c[0] != sys.executable]
    if missing:
        print(f"startup: error: {', '.join(sorted(set(missing)))} not on PATH; pip install -e . first", file=sys.stderr)
        return 2
    rows, base = [], None
    for name, cmd in COMMANDS.items():
        times = [_time(cmd) for _ in range(args.repeats)]
        median = statistics.median(times)
        base = base or median
        rows.append([name, f"{median:.3f}", f"{min(times):.3f}", f"{median / base:.1f}x"])
    print(tabulate(rows, headers=("command", "median s", "min s", "x python -c pass"), disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
