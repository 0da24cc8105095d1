"""What a long run is doing, on stderr: a tqdm status bar on a terminal, one plain line per step otherwise.

``reporter(quiet)`` returns the ``progress(message)`` callable the engine, ``parity check`` and the CLIs call as each
step starts (building HF, building FMS, each section, each case), or None with ``quiet``. Every line carries the time
since the command started, so a slow step is visible in CI logs.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

__all__ = ["reporter"]


class _Reporter:
    def __init__(self, prog: str):
        self.prog = prog
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", file=sys.stderr, leave=False)

    def __call__(self, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{self.prog}: {message}")
            self.bar.refresh()
        else:
            print(f"{self.prog}: [{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def reporter(prog: str, quiet: bool = False) -> Optional[Callable[[str], None]]:
    """A ``progress(message)`` callable for ``prog`` (``"parity diff"``), or None when ``quiet``; ``.close()`` ends
    the terminal bar."""
    return None if quiet else _Reporter(prog)
