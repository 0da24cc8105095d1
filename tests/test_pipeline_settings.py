"""Each side's input pipeline takes its settings from the checkpoint folder: the processor (or preprocessor) config
when the folder has one, else the model config's projector window and downsample rate, as either library's user
would build it; and the project's processor round-trips through a folder in transformers' layout."""

from __future__ import annotations

import json

import pytest
import torch

from fms_granite_speech.config import get_config
from fms_granite_speech.features import GraniteSpeechFeatureExtractor, load_wav, shipped_audio
from fms_granite_speech.processor import GraniteSpeechProcessor
from fms_granite_speech.testing import build_hf_model, write_hf_checkpoint
from fms_granite_speech.tokenizer_utils import build_test_tokenizer
from parity.cli import main


def _config(window: int, rate: int):
    config = get_config("tiny")
    return config.replace(projector=config.projector.updated(window_size=window, downsample_rate=rate))


@pytest.fixture(scope="module")
def folder_12_4(tmp_path_factory):
    """A 3.3-structure checkpoint with window 12 and downsample 4, saved by transformers without any processor file
    (the case transformers runs with an extractor built from the config's two values)."""
    config = _config(12, 4)
    folder = write_hf_checkpoint(build_hf_model(config, seed=2), tmp_path_factory.mktemp("ckpt") / "w12")
    build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index).save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists() and not (folder / "processor_config.json").exists()
    return folder


def test_a_window_12_downsample_4_folder_passes_parity_diff(folder_12_4, tmp_path, capsys):
    assert main(["diff", "--checkpoint", str(folder_12_4), "--report-dir", str(tmp_path), "--quiet"]) == 0, \
        capsys.readouterr()
    report = json.loads((tmp_path / "parity-report.json").read_text())
    rows = {r["pair"]["name"]: r for r in report["layers"]}
    wave, _ = load_wav(shipped_audio("fox"))
    expected = GraniteSpeechFeatureExtractor(window_size=12, downsample_rate=4).token_counts([wave.shape[-1]])
    assert report["inputs"]["audio_tokens"] in (expected, expected[0], sum(expected))
    assert rows["features.audio_token_counts"]["diff"]["max_abs"] == 0


def test_a_processor_config_in_the_folder_is_what_both_sides_read(folder_12_4, tmp_path):
    """A processor saved into the folder (the project's save_pretrained, transformers' layout) with a different
    window is read by both sides: the pipelines agree with each other and with that file, not the model config."""
    import shutil

    folder = tmp_path / "with_processor"
    shutil.copytree(folder_12_4, folder)
    tokenizer = build_test_tokenizer(get_config("tiny").decoder.src_vocab_size, get_config("tiny").audio_token_index)
    GraniteSpeechProcessor(tokenizer, GraniteSpeechFeatureExtractor(window_size=12, downsample_rate=4)) \
        .save_pretrained(folder)
    from parity.inputs import pipeline_extractors
    from parity.pair import build_pair

    pair = build_pair(checkpoint=str(folder), memory="sequential")
    hf, fms = pipeline_extractors(pair)
    assert (hf.projector_window_size, hf.projector_downsample_rate) == (12, 4)
    assert (fms.window_size, fms.downsample_rate) == (12, 4)


def test_the_processor_round_trips_through_a_folder_and_transformers_reads_it(tmp_path):
    from transformers import GraniteSpeechProcessor as HFProcessor

    config = get_config("tiny")
    tokenizer = build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index)
    original = GraniteSpeechProcessor(tokenizer, GraniteSpeechFeatureExtractor(window_size=12, downsample_rate=4))
    original.save_pretrained(tmp_path)
    again = GraniteSpeechProcessor.from_pretrained(tmp_path)
    assert again.feature_extractor.to_dict() == original.feature_extractor.to_dict()
    assert again.audio_token == original.audio_token and again.audio_token_id == original.audio_token_id
    assert again.tokenizer.get_vocab() == tokenizer.get_vocab()
    wave, _ = load_wav(shipped_audio("fox"))
    prompt = "USER: <|audio|> what is said? ASSISTANT:"
    mine, theirs = again(prompt, audio=wave[0]), HFProcessor.from_pretrained(str(tmp_path))(
        prompt, audio=[wave[0]], return_tensors="pt")
    for name in ("input_ids", "input_features", "input_features_mask"):
        assert torch.equal(mine[name], theirs[name].to(mine[name].dtype)), name
    assert not list(tmp_path.glob(".processor_config*"))  # no temporary file left


@pytest.mark.parametrize("settings, words", [
    ({"projector_window_size": "12"}, "positive integers"),
    ({"projector_downsample_rate": 0}, "positive integers"),
    ({"melspec_kwargs": [1]}, "not an object"),
    ({"feature_extractor_type": "WhisperFeatureExtractor"}, "not GraniteSpeechFeatureExtractor"),
    ({"padding_value": 1.0}, "pads with 0.0"),
])
def test_bad_extractor_settings_are_one_clear_error_naming_the_file(tmp_path, settings, words):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=words) as err:
        GraniteSpeechFeatureExtractor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in str(err.value)


def test_one_clip_is_feature_extracted_once_per_side(pair, monkeypatch):
    from transformers import GraniteSpeechFeatureExtractor as HFExtractor

    from parity.inputs import build_inputs

    calls = {"hf": 0, "fms": 0}
    hf_mel, fms_mel = HFExtractor._extract_mel_spectrograms, GraniteSpeechFeatureExtractor.log_mel

    def count(side, real):
        def counted(self, *args, **kwargs):
            calls[side] += 1
            return real(self, *args, **kwargs)
        return counted

    monkeypatch.setattr(HFExtractor, "_extract_mel_spectrograms", count("hf", hf_mel))
    monkeypatch.setattr(GraniteSpeechFeatureExtractor, "log_mel", count("fms", fms_mel))
    inputs = build_inputs(pair)
    assert calls == {"hf": 1, "fms": 1}
    assert inputs.audio_token_counts == inputs.fms.audio_token_counts == [int(inputs.input_features_mask.sum())]
