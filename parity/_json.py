"""Strict JSON for parity results: non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (the one place).

Every saved result (``ParityResult``, ``GenerationParity``, check outcomes) is written with ``allow_nan=False``, so a
NaN in a comparison never produces invalid JSON; ``float()`` reads the strings back.
"""

import json
import math
from typing import Any, Optional

__all__ = ["JsonResult", "from_json_float", "json_float", "json_safe"]


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


class JsonResult:
    """The JSON text of every saved result type, in one place: ``to_json`` is strict JSON of the class's
    ``to_dict`` (``allow_nan=False``: non-finite floats must already be the strings ``json_float`` writes), and
    ``from_json`` parses and hands the object to ``from_dict``; text that is not JSON raises ``ValueError`` naming
    ``WHAT`` (the result type the reader expected)."""

    WHAT = "a parity result"

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Strict JSON text of ``to_dict()``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str):
        """Inverse of ``to_json``.

        Raises:
            ValueError: not JSON (``not WHAT (invalid JSON: ...)``), or whatever ``from_dict`` refuses.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise cls._not_json(err) from None
        return cls.from_dict(data)

    @classmethod
    def _not_json(cls, err: Exception) -> ValueError:
        return ValueError(f"not {cls.WHAT} (invalid JSON: {err})")
