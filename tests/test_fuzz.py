"""The fuzzer: lengths land on the config's edges, audio is real speech, and a planted length-dependent bug is found,
shrunk to the shortest failing clip, and named by its projector layer."""

from __future__ import annotations

import json
import shlex

import pytest
import soundfile
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import fms_granite_speech.projector as projector_module
from fms_granite_speech.config import get_config
from fms_granite_speech.features import load_wav, shipped_audio
from parity.fuzz import (MIN_SAMPLES, AudioClip, audio_batches, check_parity, edge_frame_counts, encoder_frames,
                         fuzz_settings, make_waveform, samples_for_frames)
from parity.cli import main
from parity.pair import build_inputs

TINY = get_config("tiny")


def test_edges_come_from_the_config():
    w, c = TINY.projector.window_size, TINY.encoder.context_size
    edges = edge_frame_counts(TINY)
    for n in (1, w - 1, w, w + 1, 2 * w, c - 1, c, c + 1, 2 * c + 1):
        assert n in edges
    assert max(edges) > 3 * c  # a long clip spans several attention blocks


@pytest.mark.parametrize("frames", [1, 14, 15, 16, 31, 32, 33, 200])
@pytest.mark.parametrize("odd_mel", [False, True])
@pytest.mark.parametrize("offset", [0, 159])
def test_samples_for_frames_gives_that_many_frames_through_the_processor(pair, frames, odd_mel, offset):
    n = samples_for_frames(frames, odd_mel, offset)
    assert encoder_frames(n) == frames
    if frames in (1, 15, 32):  # checked against the real feature extractor, not only the formula
        inputs = build_inputs(pair, audio=[torch.zeros(n) + 0.01], sampling_rate=16_000)
        assert inputs.input_features.shape[1] == frames


def test_waveform_is_shipped_speech_cropped_and_tiled():
    speech, _ = load_wav(shipped_audio("fox"))
    speech = speech.mean(0)
    crop = make_waveform(AudioClip("fox", 100, 500))
    assert torch.equal(crop, speech[100:600])
    tiled = make_waveform(AudioClip("fox", 0, speech.numel() + 10))
    assert torch.equal(tiled[speech.numel():], speech[:10])


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "weekly")
    with pytest.raises(ValueError, match="ci, nightly"):
        fuzz_settings()


def _pad_with_ones(x, window_size):
    """Planted bug: the last window is padded with ones instead of zeros (wrong only when T % window != 0)."""
    b, t, he = x.shape
    nb = (t + window_size - 1) // window_size
    return F.pad(x, (0, 0, 0, nb * window_size - t), value=1.0).reshape(b * nb, window_size, he)


@pytest.mark.slow  # shrinking runs the pair a few hundred times: about 2 minutes on 2 cores
def test_planted_length_dependent_bug_is_found_shrunk_and_named(pair, monkeypatch, tmp_path):
    monkeypatch.setattr(projector_module, "split_windows", _pad_with_ones)
    monkeypatch.setenv("PARITY_FUZZ_DIR", str(tmp_path / "fuzz"))
    w = TINY.projector.window_size
    # the bug is length dependent: a clip of exactly two windows passes, one frame more fails
    check_parity(pair, [AudioClip("fox", 0, samples_for_frames(2 * w))], layers="projector")
    with pytest.raises(AssertionError, match="projector"):
        check_parity(pair, [AudioClip("fox", 0, samples_for_frames(2 * w + 1))], layers="projector")

    tried = []

    @settings(max_examples=15, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(batch=audio_batches(TINY, max_batch=2, max_frames=2 * w + 1))
    def prop(batch):
        tried.append(batch)
        check_parity(pair, batch, layers="projector")

    with pytest.raises(AssertionError) as err:
        prop()
    shrunk = tried[-1]  # hypothesis replays the minimal failing example last
    smallest_failing = min(n for n in range(1, 10 * w) if n % w)  # derived from the bug's condition
    assert len(shrunk) == 1
    assert encoder_frames(shrunk[0].samples) == smallest_failing
    assert shrunk[0].samples == MIN_SAMPLES
    assert "first divergent layer: projector.layers.0.cross_attn" in str(err.value)
    # the hand-over: the shrunk clip as a WAV file and one command that, run alone, fails at the same layer
    message = str(err.value)
    command = next(line for line in message.splitlines() if line.startswith("reproduce alone: "))
    argv = shlex.split(command.removeprefix("reproduce alone: "))[2:]  # after "parity diff"
    wav = argv[argv.index("--audio") + 1]
    assert soundfile.info(wav).frames == MIN_SAMPLES
    assert "standalone repro of projector.layers.0.cross_attn" in message
    report = tmp_path / "report"
    assert main(["diff", *argv, "--report-dir", str(report), "--quiet"]) == 1
    assert json.loads((report / "parity-report.json").read_text())["first_divergent"] == \
        "projector.layers.0.cross_attn"
