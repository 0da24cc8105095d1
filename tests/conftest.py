"""Fixtures shared by the parity engine's unit tests."""

import pytest

from parity.pair import build_inputs, build_pair


@pytest.fixture(scope="module")
def pair():
    """The tiny variant, float32, seed 0: HF reference with a non-zero LoRA adapter and the FMS model converted
    from the same weights. Module-scoped: tests that plant a bug do so in a copy or restore it."""
    return build_pair("tiny", seed=0)


@pytest.fixture(scope="module")
def inputs(pair):
    """The shipped default clip and the default prompt, tokenized for both sides."""
    return build_inputs(pair)
