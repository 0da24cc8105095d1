"""CPU parity suite on the tiny variant: float32, every mapped layer within tolerance, on shipped speech.

The cases are those of ``parity.check.CASES`` (batch 1, a mixed-length batch, text-only), so ``parity check`` gates
exactly what this suite runs; each result is recorded for the suite report.
"""

from __future__ import annotations

import pytest

from parity.check import CASES, run_cases
from parity.pathmap import expand


@pytest.mark.parametrize("case", list(CASES))
def test_every_mapped_layer_within_tolerance(tiny_pair, record, case):
    result = record(run_cases(tiny_pair, [case])[case], name=f"tiny/float32/{case}")
    expected = [p.name for p in expand(tiny_pair.config) if case != "text_only" or p.section == "decoder"]
    assert [r.name for r in result.layers] == expected  # every mapped layer of every section that ran
    failing = [(r.name, r.reason) for r in result.layers if not r.passed]
    assert failing == [], f"first divergent: {result.first_divergent}"
    assert result.first_divergent is None
    if case == "speech_mixed_batch":
        tokens = result.inputs["audio_tokens"]
        assert len(tokens) == 3 and len(set(tokens)) == 3  # three different lengths, padded into one batch
    if case == "text_only":
        assert result.sections == ["decoder"]
