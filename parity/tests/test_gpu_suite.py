"""Full-size parity on a CUDA GPU: ``3.3-2b`` and ``3.3-8b`` with seeded realistic random weights.

bf16 and float32; a 30 s clip tiled from shipped speech, alone and in a mixed-length batch with a 7 s clip. The
engine compares each FMS activation with the stored HF one as it is produced (``compare.run_parity``), so only one
model's activations are ever held. Marked ``gpu``: skipped cleanly without CUDA.
"""

from __future__ import annotations

import gc

import pytest
import torch

from parity.compare import run_parity
from parity.fuzz import AudioClip, make_waveform
from parity.pair import build_inputs, build_pair

pytestmark = pytest.mark.gpu

SR = 16_000


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("variant", ["3.3-2b", "3.3-8b"])
def test_full_size_parity(cuda, record, variant, dtype):
    pair = build_pair(variant, seed=0, dtype=dtype, device="cuda")
    long_clip = make_waveform(AudioClip("ships", 0, 30 * SR))    # 30 s: 1500 encoder frames, 8 attention blocks
    short_clip = make_waveform(AudioClip("fox", 3000, 7 * SR + 123))
    try:
        for label, audio in (("30s", [long_clip]), ("mixed", [long_clip, short_clip])):
            inputs = build_inputs(pair, audio=audio, sampling_rate=SR)
            result = record(run_parity(pair, inputs), name=f"{variant}/{dtype}/{label}")
            failing = [(r.name, r.reason) for r in result.layers if not r.passed]
            assert failing == [], f"{variant} {dtype} {label}: first divergent {result.first_divergent}"
    finally:
        del pair
