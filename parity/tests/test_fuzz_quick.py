"""The honest tiny model under the fuzzer: lengths at the window / attention-block / odd-mel edges, mixed batches.

Runs the profile named by ``HYPOTHESIS_PROFILE`` (default ``ci``: a few examples, the same ones every run;
``nightly``: hundreds, random). The ``@example``s pin the edges the fuzzer must never skip: exact multiples of the
projector window and of the attention context, alone and in a batch with a short clip.
"""

from __future__ import annotations

import math

from hypothesis import example, given

from fms_granite_speech.config import get_config
from parity.fuzz import AudioClip, audio_batches, check_parity, fuzz_settings, samples_for_frames

TINY = get_config("tiny")
W, C = TINY.projector.window_size, TINY.encoder.context_size


@fuzz_settings()
@given(batch=audio_batches(TINY, max_batch=3))
@example(batch=[AudioClip("fox", 0, samples_for_frames(2 * W))])
@example(batch=[AudioClip("ships", 500, samples_for_frames(math.lcm(W, C)))])
@example(batch=[AudioClip("transcribe", 0, samples_for_frames(W - 1)), AudioClip("fox", 0, samples_for_frames(C))])
def test_honest_model_has_parity_at_every_length(tiny_pair, batch):
    check_parity(tiny_pair, batch)
