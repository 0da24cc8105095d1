"""Every registered model pair through its derived map: the table README.md shows.

    python benchmarks/architectures.py [--names granite,llama,...]

For each architecture in ``parity.models.ARCHITECTURES``: build the tiny pair in float32 and bfloat16, derive the map
from FMS's adapter, run every case that applies, and print one row: the HF class, rows derived (0 written by hand),
modules left unpaired, the verdict per dtype over all cases (the failing case and first divergent row when one fails,
the broken build step when the pair cannot be built) and the wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tabulate import tabulate


def _verdict(p, dtype: str) -> tuple[str, int, int]:
    from parity.derive import DeriveError
    from parity.engine import run_architecture
    from parity.models import BuildError

    try:
        built = p.build(dtype)
    except BuildError as err:
        return f"FAIL: {err}"[:140], 0, 0
    failed, rows, unpaired = [], 0, 0
    for case in p.cases(built.hf_config):
        try:
            r = run_architecture(p, dtype=dtype, case=case, built=built)
        except DeriveError as err:
            return f"FAIL: {err}"[:140], 0, 0
        if case == p.default_case:
            rows = sum(1 for x in r.layers if x.pair.tensor == "output")
            unpaired = len(r.excluded)
        if not r.passed:
            failed.append(f"{case} at {r.first_divergent}")
    cases = len(p.cases(built.hf_config))
    return ("PASS" if not failed else "FAIL " + "; ".join(failed)) + f" ({cases} cases)", rows, unpaired


def main(argv=None) -> int:
    from parity.models import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default=None, help="comma-separated architectures (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = args.names.split(",") if args.names else list(ARCHITECTURES)
    table = []
    for name in names:
        p = ARCHITECTURES[name]
        start = time.perf_counter()
        f32, rows, unpaired = _verdict(p, "float32")
        bf16, _, _ = _verdict(p, "bfloat16")
        table.append((name, p.hf_class, rows or "-", unpaired if rows else "-", f32, bf16,
                      f"{time.perf_counter() - start:.1f}"))
    print(tabulate(table, headers=("architecture", "transformers class", "rows derived", "unpaired", "float32",
                                   "bfloat16", "s"), tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
