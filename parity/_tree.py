"""One map over the tensors of a nested value (tuples, lists, dicts; a module's output, a recorded call), used by
every place the engine copies, moves or converts what it captured."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["map_tensors"]


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, nested tuples / lists / dicts rebuilt with their types
    (a ``NamedTuple`` too); anything else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value
