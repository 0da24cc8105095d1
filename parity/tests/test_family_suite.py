"""The CPU parity suite on the Granite Speech family's other tiny variants: ``tiny-plus`` (Granite Speech Plus,
granite-speech-4.1-2b-plus's structure: block 3's hidden state concatenated with the encoder output), ``tiny-4.1``
(granite-speech-4.1-2b's structure: no modality LoRA adapter, a granite text_config) and ``tiny-4.0`` (the same read
from a granitemoehybrid text_config) on every named case in float32 and two in bfloat16,
each side on its own pipeline; ``parity check`` gates what this suite runs.
"""

from __future__ import annotations

import pytest

from parity.check import run_cases
from parity.inputs import CASES
from parity.pair import build_pair

FAMILY = ("tiny-plus", "tiny-4.1", "tiny-4.0")
BF16_CASES = ("speech_b1", "batch_short_last")


@pytest.fixture(scope="module", params=FAMILY)
def family_pair(request):
    return build_pair(request.param, seed=0, dtype="float32")


@pytest.mark.parametrize("case", list(CASES))
def test_family_every_case(family_pair, record, case):
    result = record(run_cases(family_pair, [case])[case], name=f"{family_pair.variant}/float32/{case}")
    failing = [(r.name, r.reason) for r in result.layers if not r.passed]
    assert failing == [], f"first divergent: {result.first_divergent}"
    if case != "text_only":
        assert result.layer("encoder").diff is not None


@pytest.mark.parametrize("variant", FAMILY)
@pytest.mark.parametrize("case", BF16_CASES)
def test_family_bfloat16(variant, case, record):
    pair = build_pair(variant, seed=0, dtype="bfloat16")
    result = record(run_cases(pair, [case])[case], name=f"{variant}/bfloat16/{case}")
    assert result.reference == "float64"
    assert all(r.passed for r in result.layers), result.first_divergent
