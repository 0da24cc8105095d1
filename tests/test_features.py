"""fms_granite_speech.features against transformers' GraniteSpeechFeatureExtractor (built directly, no hub).

Features, masks and token counts must be exactly equal to HF's (max abs diff 0), for the shipped speech clips,
batches of different lengths, and lengths around frame boundaries; bad input must raise ValueError naming the fix.
"""


import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from transformers.models.granite_speech.feature_extraction_granite_speech import (
    GraniteSpeechFeatureExtractor as HFExtractor,
)

from fms_granite_speech.features import (
    AudioFeatures,
    GraniteSpeechFeatureExtractor,
    audio_token_count,
    list_shipped_audio,
    load_wav,
    shipped_audio,
)

SHIPPED = list_shipped_audio()


@pytest.fixture(scope="module")
def hf():
    return HFExtractor()


@pytest.fixture(scope="module")
def ours():
    return GraniteSpeechFeatureExtractor()


def _read_mono(name):
    """The shipped clip as HF users load it: soundfile float32, 1-D."""
    data, rate = soundfile.read(str(shipped_audio(name)), dtype="float32")
    assert rate == 16000 and data.ndim == 1
    return torch.from_numpy(data)


def _noise(num_samples, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(num_samples, generator=gen)


def _assert_same(got: AudioFeatures, want, lengths):
    assert got.input_features.dtype == torch.float32
    assert got.input_features.shape == want["input_features"].shape
    assert (got.input_features - want["input_features"]).abs().max().item() == 0.0
    assert torch.equal(got.input_features_mask, want["input_features_mask"])
    assert got.input_features_mask.dtype == torch.bool
    assert got.audio_token_counts == list(want["audio_embed_sizes"])
    assert got.audio_lengths == list(lengths)


def test_shipped_audio_listing():
    assert len(SHIPPED) >= 3 and SHIPPED == sorted(SHIPPED)
    for name in SHIPPED:
        path = shipped_audio(name)
        assert path.is_file() and path.name == f"speech_{name}.wav"
        assert shipped_audio(path.name) == path == shipped_audio(path.stem)
    assert shipped_audio() == shipped_audio(SHIPPED[0])
    with pytest.raises(ValueError, match="available: " + ", ".join(SHIPPED)):
        shipped_audio("no_such_clip")


def test_load_wav_matches_soundfile():
    wave, rate = load_wav(shipped_audio(SHIPPED[0]))
    assert rate == 16000 and wave.dtype == torch.float32 and wave.ndim == 2 and wave.shape[0] == 1
    assert torch.equal(wave[0], _read_mono(SHIPPED[0]))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_clip_equals_hf(hf, ours, name):
    audio = _read_mono(name)
    want = hf(audio)
    _assert_same(ours(shipped_audio(name)), want, [audio.numel()])
    _assert_same(ours(audio), want, [audio.numel()])
    _assert_same(ours(audio.numpy()), want, [audio.numel()])


def test_batch_of_two_shipped_clips_equals_hf(hf, ours):
    a, b = _read_mono(SHIPPED[0]), _read_mono(SHIPPED[1])
    assert a.numel() != b.numel()
    want = hf([a, b])
    _assert_same(ours([shipped_audio(SHIPPED[0]), shipped_audio(SHIPPED[1])]), want, [a.numel(), b.numel()])
    _assert_same(ours([a, b.numpy()]), want, [a.numel(), b.numel()])
    assert not want["input_features_mask"].all()  # the shorter clip really is padded


@pytest.mark.parametrize("num_samples", [257, 319, 320, 4001, 15999, 16000, 16159, 16160, 16161, 16320, 24000])
def test_lengths_around_frame_boundaries(hf, ours, num_samples):
    audio = _noise(num_samples, seed=num_samples)
    want = hf(audio)
    _assert_same(ours(audio), want, [num_samples])
    assert audio_token_count(num_samples) == hf._get_num_audio_features([num_samples])[0]
    mel_frames = num_samples // 160 + 1
    assert ours(audio).input_features.shape[1] == mel_frames // 2  # odd frame counts drop their last frame


def test_token_count_helper_matches_hf_over_a_range(hf):
    lengths = list(range(0, 3 * 16000, 37))
    assert [audio_token_count(n) for n in lengths] == hf._get_num_audio_features(lengths)


def test_2d_batch_and_float64_numpy_equal_hf(hf, ours):
    batch = torch.stack([_noise(8000, seed=1), _noise(8000, seed=2)])
    want = hf(batch)
    _assert_same(ours(batch), want, [8000, 8000])
    _assert_same(ours(batch.double().numpy()), hf(batch.double()), [8000, 8000])


def test_variable_length_list_with_channel_dim(hf, ours):
    clips = [_noise(5000, 3)[None, :], _noise(12345, 4), _noise(700, 5)]
    _assert_same(ours(clips), hf(clips), [5000, 12345, 700])


def test_mapping_access(ours):
    feats = ours(_noise(4000))
    assert feats["input_features"] is feats.input_features
    assert set(dict(**feats)) == {"input_features", "input_features_mask", "audio_token_counts", "audio_lengths"}
    with pytest.raises(KeyError, match="audio_embed_sizes"):
        feats["audio_embed_sizes"]


def _with_nonfinite(value, count):
    audio = _noise(4000)
    audio[10 : 10 + count] = value
    return audio


@pytest.mark.parametrize(
    "audio, kwargs, words",
    [
        (torch.zeros(0), {}, "clip 0 is empty"),
        ([_noise(4000), torch.zeros(0)], {}, "clip 1 is empty"),
        ([], {}, "no audio"),
        ([_noise(4000), _with_nonfinite(float("nan"), 3)], {}, "clip 1 has 3 NaN/Inf"),
        (_with_nonfinite(float("inf"), 2), {}, "clip 0 has 2 NaN/Inf"),
        (_noise(4000), {"sampling_rate": 8000}, "8000 Hz.*pass resample=True"),
        ([torch.stack([_noise(4000), _noise(4000, 1)])], {}, "2 channels.*downmix=True"),
        ((_noise(4000).numpy() * 32767).astype(np.int16), {}, "int16.*32768"),
        (torch.zeros(4000, dtype=torch.int32), {}, "int32.*floating point"),
        (torch.zeros(2, 1, 4000), {}, "1-D.*2-D"),
        ([torch.zeros(1, 1, 4000)], {}, "clip 0 must be 1-D"),
        (_noise(256), {}, "too short.*at least 257"),
    ],
)
def test_bad_input_raises_value_error(ours, audio, kwargs, words):
    with pytest.raises(ValueError, match=words):
        ours(audio, **kwargs)


def test_unsupported_type_raises_type_error(ours):
    with pytest.raises(TypeError, match="tensor, numpy array"):
        ours(12345)
    with pytest.raises(TypeError, match="clip 1 is a int"):
        ours([_noise(400), 3])


def test_wav_path_rate_conflict(ours):
    with pytest.raises(ValueError, match="16000 Hz but sampling_rate=8000"):
        ours(shipped_audio(SHIPPED[0]), sampling_rate=8000)


@pytest.mark.parametrize("rate", [8000, 22050])
def test_resample(hf, rate, tmp_path):
    audio = _noise(rate, seed=rate)  # one second
    expected_wave = torchaudio.functional.resample(audio, rate, 16000)
    assert expected_wave.numel() == 16000
    extractor = GraniteSpeechFeatureExtractor(resample=True)
    _assert_same(extractor(audio, sampling_rate=rate), hf(expected_wave), [16000])
    path = tmp_path / f"clip_{rate}.wav"
    soundfile.write(str(path), audio.numpy(), rate, subtype="FLOAT")
    _assert_same(extractor(path), hf(expected_wave), [16000])
    with pytest.raises(ValueError, match="pass resample=True"):
        GraniteSpeechFeatureExtractor()(path)


def test_downmix_stereo_wav(hf, tmp_path):
    stereo = torch.stack([_noise(9000, 7), _noise(9000, 8)], dim=1).numpy()  # [samples, channels]
    path = tmp_path / "stereo.wav"
    soundfile.write(str(path), stereo, 16000)  # 16-bit PCM
    written, _ = soundfile.read(str(path), dtype="float32")
    mono = torch.from_numpy(written.mean(axis=1, dtype=np.float32))
    want = hf(mono)
    _assert_same(GraniteSpeechFeatureExtractor(downmix=True)(path), want, [9000])
    _assert_same(GraniteSpeechFeatureExtractor(downmix=True)([torch.from_numpy(written.T.copy())]), want, [9000])
    with pytest.raises(ValueError, match="stereo.wav has 2 channels.*downmix=True"):
        GraniteSpeechFeatureExtractor()(path)
