"""The CPU parity suite on the tiny variant: every named case of ``parity.inputs.CASES`` in float32, and two of them
in bfloat16 (bounds from HF's own rounding against float64), every mapped layer within its bound.

``parity check`` gates exactly what this suite runs; each result is recorded for the suite report.
"""

from __future__ import annotations

import pytest

from parity.check import run_cases
from parity.inputs import CASES
from parity.pathmap import expand

BF16_CASES = ("speech_b1", "batch_short_last")


def _expected(config, case: str) -> list[str]:
    if case == "text_only":
        return ["input_ids"] + [p.name for p in expand(config) if p.section == "decoder"]
    return [p.name for p in expand(config)]


@pytest.mark.parametrize("case", list(CASES))
def test_every_mapped_layer_within_tolerance(tiny_pair, record, case):
    result = record(run_cases(tiny_pair, [case])[case], name=f"tiny/float32/{case}")
    assert [r.name for r in result.layers] == _expected(tiny_pair.config, case)  # every layer of what ran
    failing = [(r.name, r.reason) for r in result.layers if not r.passed]
    assert failing == [], f"first divergent: {result.first_divergent}"
    assert result.first_divergent is None
    # the input pipelines agree exactly (HF's processor and the project's)
    for name in ("features.input_features", "features.input_features_mask", "features.audio_token_counts",
                 "input_ids"):
        if any(r.name == name for r in result.layers):
            assert result.layer(name).diff.max_abs == 0, name
    frames = result.inputs["encoder_frames"]
    if case.startswith("batch_"):
        assert len(frames) == 2 and len(set(frames)) == 2
        assert (frames[0] < frames[1]) == (case == "batch_short_first")
    if case == "text_only":
        assert result.sections == ["features", "decoder"]


@pytest.mark.parametrize("case", BF16_CASES)
def test_bfloat16_layers_within_their_rounding_bounds(tiny_bf16_pair, record, case):
    result = record(run_cases(tiny_bf16_pair, [case])[case], name=f"tiny/bfloat16/{case}")
    assert result.reference == "float64"
    failing = [(r.name, r.reason) for r in result.layers if not r.passed]
    assert failing == [], f"first divergent: {result.first_divergent}"
    worst = max((r.ratio, r.name) for r in result.layers)
    assert worst[0] <= 0.8, worst  # every layer well inside its bound: room for noise, none for a real bug
