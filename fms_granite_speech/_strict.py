"""The strict state-dict check shared by the component loaders (encoder, projector)."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch


def state_dict_problems(
    expected: Mapping[str, Sequence[int]],
    got: Mapping[str, torch.Tensor],
    *,
    describe_missing: Callable[[str], str] = str,
    describe_unexpected: Callable[[str], str] = str,
) -> list[str]:
    """Every way ``got`` (converted FMS keys -> tensors) fails to fit a model whose tensors have ``expected`` shapes.

    Returns one line per problem, in this order: ``missing: KEY``, ``unexpected: KEY`` and
    ``wrong shape: KEY is [..] in the checkpoint, the model expects [..]``; empty when everything fits. The
    ``describe_*`` callables add where a key came from (its HF
    name), so the message names what the user can look up in their checkpoint.
    """
    problems = [f"missing: {describe_missing(k)}" for k in expected if k not in got]
    problems += [f"unexpected: {describe_unexpected(k)}" for k in got if k not in expected]
    problems += [
        f"wrong shape: {describe_missing(k)} is {list(got[k].shape)} in the checkpoint, the model expects "
        f"{list(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    return problems


def template_regex(template: str) -> re.Pattern:
    """A key template with ``{}`` for layer numbers (``"layers.{}.attn.to_q.weight"``) as an anchored regex whose
    groups capture the numbers."""
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")
