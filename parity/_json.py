"""Strict JSON for parity results: non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (the one place).

Every saved result (``ParityResult``, ``GenerationParity``, check outcomes) is written with ``allow_nan=False``, so a
NaN in a comparison never produces invalid JSON; ``float()`` reads the strings back.
"""

import math
from typing import Any, Optional

__all__ = ["from_json_float", "json_float", "json_safe"]


def json_float(x: Optional[float]) -> Any:
    """``x`` for strict JSON: a finite float or None as is, NaN / +-inf as ``"nan"`` / ``"inf"`` / ``"-inf"``."""
    if x is None or not isinstance(x, float) or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def from_json_float(x: Any) -> Optional[float]:
    """Inverse of ``json_float`` (None stays None)."""
    return None if x is None else float(x)


def json_safe(x: Any) -> Any:
    """``x`` with every float made strict-JSON safe (``json_float``) and tuples as lists, recursively."""
    if isinstance(x, float):
        return json_float(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
