"""Full-size parity on a CUDA GPU: ``3.3-2b`` and ``3.3-8b`` with seeded realistic random weights.

bf16 and float32; a 30 s clip tiled from shipped speech, alone and in a mixed-length batch with a 7 s clip. The
pair is built one model at a time (``memory="sequential"``: HF runs, what the comparison needs is kept, HF is freed,
then FMS is built from the HF folder ``save_pretrained`` wrote), so 3.3-8b in float32 (32 GB of weights) fits on one
80 GB GPU. In bf16 every layer's bound comes from HF's own rounding against a float64 run, one block at a time.
Marked ``gpu``: ``pytest -m gpu parity/`` without CUDA fails the run (see the repository's conftest.py);
``--gpu-suite-device cpu --gpu-suite-variants tiny`` runs the same code on a CPU machine (CI does).
"""

from __future__ import annotations

import gc

import pytest
import torch

from parity.compare import run_parity
from parity.inputs import AudioClip, build_inputs, make_waveform
from parity.pair import build_pair

pytestmark = pytest.mark.gpu

SR = 16_000


@pytest.fixture
def device(request):
    """``--gpu-suite-device`` (cuda by default; cpu runs the same code on a CPU machine, as CI does on tiny)."""
    name = request.config.getoption("gpu_suite_device")
    yield name
    gc.collect()
    if name.startswith("cuda"):
        torch.cuda.empty_cache()


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        names = [v.strip() for v in metafunc.config.getoption("gpu_suite_variants").split(",") if v.strip()]
        metafunc.parametrize("variant", names)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_full_size_parity(device, record, variant, dtype):
    # 30 s at full size: 1500 encoder frames, 8 attention blocks; on the CPU check of tiny 3 s keep it short
    seconds = 30 if device.startswith("cuda") else 3
    long_clip = make_waveform(AudioClip("ships", 0, seconds * SR))
    short_clip = make_waveform(AudioClip("fox", 3000, (7 * seconds // 30 + 1) * SR + 123))
    for label, audio in ((f"{seconds}s", [long_clip]), ("mixed", [long_clip, short_clip])):
        pair = build_pair(variant, seed=0, dtype=dtype, device=device, memory="sequential")
        inputs = build_inputs(pair, audio=audio, sampling_rate=SR)
        result = record(run_parity(pair, inputs), name=f"{variant}/{dtype}/{label}")
        failing = [(r.name, r.reason) for r in result.layers if not r.passed]
        assert failing == [], f"{variant} {dtype} {label}: first divergent {result.first_divergent}"
        del pair
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
