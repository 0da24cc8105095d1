"""Fixtures of the parity suite: the tiny pairs (one per process / xdist worker) and result recording."""

from __future__ import annotations

import pytest

from parity.pair import build_pair


@pytest.fixture(scope="session")
def tiny_pair():
    """The tiny variant, float32, seeded random weights (LoRA adapter included), HF and FMS."""
    return build_pair("tiny", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def tiny_bf16_pair():
    """The tiny variant in bfloat16, the same seed (built directly in bf16)."""
    return build_pair("tiny", seed=0, dtype="bfloat16")


@pytest.fixture
def record(request):
    """``record(result, name=None)``: the plugin's ``parity_record`` when the plugin is loaded, else a no-op."""
    if request.config.pluginmanager.has_plugin("parity.plugin"):
        return request.getfixturevalue("parity_record")
    return lambda result, name=None: result
