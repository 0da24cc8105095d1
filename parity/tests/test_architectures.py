"""Every FMS architecture with a transformers twin, through the map derived from FMS's own adapter.

Each registered pair (``parity.models.ARCHITECTURES``) that FMS 1.13.1 can build from transformers 5.17's model is
compared on every case that applies to it, in float32 and bfloat16, with bounds from HF's float64 run of the same
weights; ``parity check`` gates the results. The pairs FMS cannot take fail at a named build step, and the one
known FMS divergence (mistral ignores its sliding window) fails where it starts: both are asserted as such, so a
change in either shows here.
"""

from __future__ import annotations

import pytest

from parity.engine import run_architecture
from parity.models import ARCHITECTURES, BuildError, plugin

BROKEN_IN_FMS = {"mixtral": "FMS model", "gpt_oss": "coverage", "mpnet": "coverage"}
WORKING = [name for name in ARCHITECTURES if name not in BROKEN_IN_FMS]
KNOWN_DIVERGENCE = {("mistral", "beyond_window"): "base_model.layers.0.attn.dense.input"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", WORKING)
def test_architecture_passes_every_case(name, dtype, record):
    p = plugin(name)
    built = p.build(dtype)
    for case in p.cases(built.hf_config):
        result = run_architecture(p, dtype=dtype, case=case, built=built)
        expected = KNOWN_DIVERGENCE.get((name, case))
        if expected is not None:
            assert result.first_divergent == expected
            continue
        record(result, name=f"{name}/{dtype}/{case}")
        assert result.passed, (case, result.first_divergent, result.first_failure().reason)
        assert len(result.layers) >= 30 and all(r.diff is not None for r in result.layers)


@pytest.mark.parametrize("name", sorted(BROKEN_IN_FMS))
def test_pairs_fms_cannot_take_fail_at_their_step(name):
    with pytest.raises(BuildError) as err:
        plugin(name).build("float32")
    assert err.value.step == BROKEN_IN_FMS[name]


CAUSAL = [n for n in WORKING if ARCHITECTURES[n].causal and ARCHITECTURES[n].default_case == "prompt"]


@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_generation_is_token_identical(name):
    """HF generate against FMS generate with its KV cache, 12 tokens, conclusive (the continuation varies)."""
    from parity.arch_generate import generate_architecture

    g = generate_architecture(plugin(name), max_new_tokens=12, seed=1)
    assert g.varied, g.verdict()
    if name == "mistral":  # FMS's mistral ignores the sliding window: tokens part once the sequence passes it
        assert g.first_mismatch is not None and 12 + g.first_mismatch >= plugin(name).tiny["sliding_window"]
        return
    assert g.passed, g.verdict()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ctc_decoding_is_identical(dtype):
    """Granite Speech 5.0: greedy CTC on both sides (each on its own pipeline), conclusive (blanks, repeats and 3+
    tokens in HF's path), every frame's argmax identical but near ties, every layer within bounds."""
    from parity.ctc import check_ctc

    r = check_ctc(plugin("granite_speech5"), dtype=dtype, seed=1)
    assert r.varied and r.passed, r.verdict()
