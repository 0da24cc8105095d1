"""The honest tiny model under the fuzzer: lengths at the window / attention-block / odd-mel edges, mixed batches.

Runs the profile named by ``HYPOTHESIS_PROFILE`` (default ``ci``: a few examples; ``nightly``: hundreds).
"""

from __future__ import annotations

from hypothesis import given

from fms_granite_speech.config import get_config
from parity.fuzz import audio_batches, check_parity, fuzz_settings

TINY = get_config("tiny")


@fuzz_settings()
@given(batch=audio_batches(TINY, max_batch=3))
def test_honest_model_has_parity_at_every_length(tiny_pair, batch):
    check_parity(tiny_pair, batch)
