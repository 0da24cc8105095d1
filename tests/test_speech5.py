"""Granite Speech 5.0 (granite-speech-5.0-470m-turboctc): the FMS ``granite_speech5`` model against transformers'
``GraniteSpeech5ForCTC``, its feature extractor against transformers', its config checks, its folder loading, and
bugs planted in the subsampling, the pooled residual and the CTC blank, each named where it starts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fms_granite_speech.features import load_wav, shipped_audio
from fms_granite_speech.speech5 import (VARIANTS, GraniteSpeech5, GraniteSpeech5Config, GraniteSpeech5FeatureExtractor,
                                        ctc_collapse, ctc_greedy, output_lengths)
from parity.ctc import check_ctc
from parity.engine import run_architecture
from parity.models import plugin


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_CACHE_DIR", str(tmp_path / "derived"))


@pytest.fixture(scope="module")
def built():
    return plugin("granite_speech5").build("float32", seed=1)


@pytest.mark.parametrize("samples", [257, 320, 321, 479, 480, 481, 16000, 48_123])
def test_feature_extractor_matches_transformers(samples):
    import transformers

    gen = torch.Generator().manual_seed(samples)
    wave = torch.randn(samples, generator=gen) * 0.1
    want = transformers.GraniteSpeech5FeatureExtractor()(wave.numpy(), sampling_rate=16000, return_tensors="pt")
    got = GraniteSpeech5FeatureExtractor()(wave)
    assert got["input_features"].shape == want["input_features"].shape
    torch.testing.assert_close(got["input_features"], want["input_features"], rtol=0, atol=0)
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_feature_extractor_batch_and_bad_input():
    import transformers

    waves = [load_wav(shipped_audio(n))[0][0] for n in ("fox", "ships")]
    want = transformers.GraniteSpeech5FeatureExtractor()([w.numpy() for w in waves], sampling_rate=16000,
                                                           return_tensors="pt")
    got = GraniteSpeech5FeatureExtractor()(waves)
    torch.testing.assert_close(got["input_features"], want["input_features"], rtol=0, atol=0)
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    with pytest.raises(ValueError, match="clip 0 must be a non-empty 1-D waveform"):
        GraniteSpeech5FeatureExtractor()(torch.zeros(0))
    with pytest.raises(ValueError, match="8000 Hz"):
        GraniteSpeech5FeatureExtractor()(torch.zeros(100), sampling_rate=8000)
    for samples in (1, 160, 256):  # transformers' extractor fails here too (reflect padding of n_fft // 2)
        with pytest.raises(RuntimeError):
            transformers.GraniteSpeech5FeatureExtractor()(torch.zeros(samples).numpy(), sampling_rate=16000)
        with pytest.raises(ValueError, match=f"the longest clip has {samples} samples"):
            GraniteSpeech5FeatureExtractor()(torch.zeros(samples))


def test_config_round_trip_and_refusals():
    tiny = VARIANTS["tiny"]
    assert GraniteSpeech5Config.from_hf(tiny.to_hf()).as_dict() == tiny.as_dict()
    assert GraniteSpeech5Config.from_hf(tiny.to_hf().to_dict()).subsample_layers == (0, 1)
    with pytest.raises(ValueError, match="num_kv_heads=1 != num_heads=3"):
        dataclasses.replace(tiny, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"subsample_layers \[0, 16\]: \[16\] are not blocks"):
        dataclasses.replace(tiny, subsample_layers=(0, 16))
    with pytest.raises(ValueError, match="blank_id=61 is outside the vocabulary"):
        dataclasses.replace(tiny, blank_id=61)
    full = VARIANTS["5.0-470m"]
    assert (full.hidden_size, full.num_layers, full.num_heads, full.context_size, full.conv_kernel_size,
            full.subsample_layers, full.vocab_size, full.num_mel_bins) == (1024, 16, 8, 128, 7, (0, 1), 16384, 80)


def test_forward_refuses_bad_features_in_one_line(built):
    with pytest.raises(ValueError, match=r"input_features must be \[B, T>0, 320\]"):
        built.fms(torch.zeros(1, 5, 160))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \[1, 5\]"):
        built.fms(torch.zeros(1, 5, 320), attention_mask=torch.ones(1, 6))


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_fewer_frames_than_the_subsampling_needs_is_one_line(built, frames):
    feats = torch.zeros(1, frames, 320)
    with pytest.raises(RuntimeError):  # transformers' model: unfold on a single frame
        built.hf(input_features=feats)
    with pytest.raises(ValueError, match=f"input_features has {frames} frame"):
        built.fms(feats)


@pytest.mark.parametrize("frames", [4, 5, 6, 7, 8, 15, 16, 17, 63, 64, 65, 130])
def test_every_frame_count_around_the_subsampling_and_context_edges(built, frames):
    """Frame counts at and around each halving (odd counts drop a frame) and the attention context (16 frames after
    two halvings is 64 input frames), with and without a mask: the logits agree with transformers' and have
    ``output_lengths`` frames."""
    gen = torch.Generator().manual_seed(frames)
    feats = torch.randn(2, frames, 320, generator=gen)
    mask = torch.ones(2, frames, dtype=torch.long)
    mask[1, max(1, frames - 3):] = 0
    for m in (None, mask):
        with torch.no_grad():
            want = built.hf(input_features=feats, attention_mask=m).logits
            got = built.fms(feats, attention_mask=m)
        assert got.shape[1] == int(output_lengths(torch.tensor(frames), built.fms.config))
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=2e-5)


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    logits = torch.full((1, 7, 4), -1.0)
    for t, tok in enumerate([0, 2, 2, 0, 2, 3, 3]):
        logits[0, t, tok] = 1.0
    assert ctc_greedy(logits, blank_id=0) == [[2, 2, 3]]
    assert ctc_greedy(logits, blank_id=0, lengths=torch.tensor([3])) == [[2]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ctc_decoding_identical_and_conclusive(dtype):
    r = check_ctc(plugin("granite_speech5"), dtype=dtype, seed=1)
    assert r.varied and r.passed, r.verdict()
    assert len(r.forward.layers) > 700 and r.forward.layer("features.input_features").diff.max_abs == 0


def test_folder_round_trip_through_fms_get_model(tmp_path, built):
    from fms.models import get_model

    built.hf.save_pretrained(tmp_path / "s5")
    model = get_model("hf_pretrained", model_path=str(tmp_path / "s5")).eval()  # BatchNorm: running statistics
    assert isinstance(model, GraniteSpeech5) and model.ctc_head.weight is model.encoder.out.weight
    feats = torch.randn(1, 40, 320)
    with torch.no_grad():
        torch.testing.assert_close(model(feats), built.fms(feats), rtol=0, atol=0)


# -- planted bugs ---------------------------------------------------------------------------------------------------


def _first(result):
    f = result.first_failure()
    assert f is not None, "the planted bug was not caught"
    return f


def test_planted_subsampling_stride():
    """Block 0's depthwise convolution with stride 1: its output keeps every frame, the block's rows cannot align."""
    p = plugin("granite_speech5")
    b = p.build("float32", seed=1)
    b.fms.encoder.blocks[0].conv.depthwise.stride = (1,)
    f = _first(run_architecture(p, built=b))
    assert f.name == "encoder.blocks.0.conv.depthwise" and "HF's tensor is" in (f.error or "")


def test_planted_residual_pooling():
    """The subsampling block's residual taking every other frame instead of the mean of each pair: named at the
    first row after it, the input of ff2's norm, introduced in encoder.blocks.1's own forward."""
    from fms_granite_speech import speech5

    p = plugin("granite_speech5")
    b = p.build("float32", seed=1)
    block = b.fms.encoder.blocks[1]

    def strided(self, x, dists, mask):
        x = x + 0.5 * self.ff1(self.ff1_norm(x))
        x = x + self.attn(self.attn_norm(x), dists, mask)
        conv = self.conv(self.conv_norm(x), mask)
        pooled = x[:, 0: 2 * (x.shape[1] // 2): 2]
        x = pooled + conv[:, : pooled.shape[1]]
        x = x + 0.5 * self.ff2(self.ff2_norm(x))
        return self.post_norm(x)

    block.forward = strided.__get__(block, speech5._Block)
    f = _first(run_architecture(p, built=b))
    assert f.name == "encoder.blocks.1.ff2_norm.input"
    assert f.explanation["introduced_in"] == "encoder.blocks.1"


def test_planted_ctc_blank_index():
    """FMS decoding with blank 1 where transformers' pad_token_id is 0: every frame and layer agrees, the decoded
    sequences do not, and the verdict says the decoding differs."""
    p = plugin("granite_speech5")
    seed = check_ctc(p, seed=1).weight_seed  # the first weight seed whose HF path is conclusive
    b = p.build("float32", seed=seed)
    b.fms.config.blank_id = 1
    r = check_ctc(p, built=b)
    assert r.varied
    assert not r.passed and r.forward.passed and all(m is None for m in r.first_frame_mismatch)
    assert "the decoding (blank id, collapse) differs" in r.verdict()


# -- granite-speech transcribe ---------------------------------------------------------------------------------------


def _hf_reference_ids(seed: int, clip: str):
    """transformers' GraniteSpeech5ForCTC with the CLI's random weights: generate (per-frame argmax), collapsed."""
    import transformers

    from fms_granite_speech.testing import realistic_init_

    config = VARIANTS["tiny"]
    torch.manual_seed(seed)
    hf = realistic_init_(transformers.GraniteSpeech5ForCTC(config.to_hf()), seed).eval()
    wave, _ = load_wav(clip)
    x = transformers.GraniteSpeech5FeatureExtractor()(wave[0].numpy(), sampling_rate=16000, return_tensors="pt")
    frames = hf.generate(**x)[0]
    n = int(output_lengths(x["attention_mask"].sum(1), config)[0])
    return hf, ctc_collapse(frames[:n].tolist(), config.blank_id)


def test_transcribe_random_5_0_matches_transformers_ids(capsys):
    from granite_speech_cli import main

    clip = str(shipped_audio("fox"))
    assert main(["transcribe", clip, "--variant", "5.0-tiny", "--seed", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("# random weights (variant 5.0-tiny, seed 3)")
    got = [int(t.strip("<>")) for t in out[1].split()]
    _, want = _hf_reference_ids(3, clip)
    assert got == want and got


def test_transcribe_5_0_folder_with_its_tokenizer(tmp_path, capsys):
    from fms_granite_speech.tokenizer_utils import build_test_tokenizer
    from granite_speech_cli import main

    clip = str(shipped_audio("ships"))
    hf, ids = _hf_reference_ids(4, clip)
    hf.save_pretrained(tmp_path / "ctc")
    tokenizer = build_test_tokenizer(VARIANTS["tiny"].vocab_size, VARIANTS["tiny"].vocab_size - 1)
    tokenizer.save_pretrained(tmp_path / "ctc")
    assert main(["transcribe", clip, "--checkpoint", str(tmp_path / "ctc"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(ids)
    # a file that cannot be read is named, the others still transcribed (exit 1)
    assert main(["transcribe", clip, str(tmp_path), "--checkpoint", str(tmp_path / "ctc"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert f"{clip}: {tokenizer.decode(ids)}" in captured.out and "is a folder, not an audio file" in captured.err
