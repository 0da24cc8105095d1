"""Configs: named variants, the round trip through transformers' GraniteSpeechConfig, and refusals."""

import pytest
import soundfile

from fms_granite_speech.config import VARIANTS, EncoderConfig, GraniteSpeechConfig, ProjectorConfig, get_config
from fms_granite_speech.features import list_shipped_audio, shipped_audio


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_through_hf(variant):
    cfg = get_config(variant)
    hf = cfg.to_hf()
    assert GraniteSpeechConfig.from_hf(hf, lora=cfg.lora) == cfg
    assert GraniteSpeechConfig.from_hf(hf.to_dict(), lora=cfg.lora) == cfg
    # the widths HF builds are the widths FMS builds
    assert hf.text_config.intermediate_size == int(cfg.decoder.hidden_grow_factor * cfg.decoder.emb_dim + 0.5)
    assert hf.encoder_config.num_layers == cfg.encoder.num_layers
    assert hf.projector_config.encoder_hidden_size == cfg.encoder.output_width


def test_real_sizes_match_the_released_architecture():
    """Figures of the released 3.3 checkpoints (their published config.json files)."""
    two, eight = get_config("3.3-2b"), get_config("3.3-8b")
    for cfg in (two, eight):
        e, p = cfg.encoder, cfg.projector
        assert (e.num_layers, e.hidden_dim, e.num_heads, e.dim_head, e.context_size, e.max_pos_emb, e.output_dim) == (
            16, 1024, 8, 128, 200, 512, 256)
        assert (p.hidden_size, p.num_layers, p.num_heads, p.intermediate_size, p.window_size, p.num_queries) == (
            1024, 2, 16, 4096, 15, 3)
        assert cfg.lora.scaling == 0.5 and cfg.audio_token_index == 49159
    assert (two.decoder.emb_dim, two.decoder.logits_scaling, two.decoder.attention_multiplier) == (2048, 8.0, 0.015625)
    assert (eight.decoder.emb_dim, eight.decoder.logits_scaling, eight.decoder.attention_multiplier) == (
        4096, 16.0, 0.0078125)
    assert int(eight.decoder.hidden_grow_factor * 4096) == 12800


def test_4x_sizes_match_the_public_sources():
    """granite-4.0-1b-speech, granite-speech-4.1-2b and -plus (the sources cited at config._4_0_1B): the 3.3 encoder
    with a 348-wide CTC head, the 3.3 projector, no LoRA adapter, granite-4.0-1b's decoder, one audio token."""
    for name in ("4.0-1b", "4.1-2b", "4.1-2b-plus"):
        cfg = get_config(name)
        hf = cfg.to_hf()
        t = hf.text_config
        assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.intermediate_size, t.vocab_size) == ("granite", 2048, 40, 16, 4, 4096, 100353)
        assert (t.embedding_multiplier, t.attention_multiplier, t.residual_multiplier, t.logits_scaling) == (
            12.0, 0.0078125, 0.22, 8.0)
        assert t.rope_parameters["rope_theta"] == 1e7 and t.tie_word_embeddings
        assert hf.audio_token_index == 100352 and not hf.has_lora_adapter and cfg.lora is None
        e = hf.encoder_config
        assert (e.num_layers, e.hidden_dim, e.num_heads, e.dim_head, e.output_dim) == (16, 1024, 8, 128, 348)
        assert (hf.window_size, hf.downsample_rate, hf.projector_config.num_hidden_layers) == (15, 5, 2)
    assert get_config("4.1-2b-plus").encoder.cat_hidden_layers == (3,)
    assert get_config("4.1-2b-plus").projector.encoder_hidden_size == 2048
    assert get_config("4.0-1b") == get_config("4.1-2b")


def test_tiny_keeps_the_real_depth_and_distinct_widths():
    tiny, real = get_config("tiny"), get_config("3.3-2b")
    assert tiny.encoder.num_layers == real.encoder.num_layers and tiny.encoder.mid_layer == 7
    assert tiny.projector.num_layers == real.projector.num_layers
    e = tiny.encoder
    widths = [e.hidden_dim, e.num_heads * e.dim_head, e.output_dim, tiny.projector.hidden_size, tiny.decoder.emb_dim]
    assert len(set(widths)) == len(widths)
    # every shipped clip spans several attention blocks; the default clip ends inside a padded block, and one
    # clip ends exactly on a block boundary, so shipped speech covers both branches of the block padding
    frames = {}
    for name in list_shipped_audio():
        samples = soundfile.info(str(shipped_audio(name))).frames
        frames[name] = (samples // 160 + 1) // 2  # mel frames, then pairs of them (the HF extractor's formula)
    assert all(t > 2 * e.context_size for t in frames.values())
    default = shipped_audio().name.removeprefix("speech_").removesuffix(".wav")
    assert frames[default] % e.context_size != 0
    assert any(t % e.context_size == 0 for t in frames.values())
    assert tiny.lora.scaling != 0.5  # a hard-coded 0.5 LoRA scale cannot pass the tiny tests


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="unknown Granite Speech variant 'huge'.*tiny"):
        get_config("huge")
    with pytest.raises(ValueError, match="context_size"):
        EncoderConfig(context_size=600, max_pos_emb=512)
    with pytest.raises(ValueError, match="multiple of downsample_rate"):
        ProjectorConfig(window_size=16, downsample_rate=5)
    tiny = get_config("tiny")
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        tiny.replace(projector=ProjectorConfig(hidden_size=40, num_heads=4, encoder_hidden_size=45))
    with pytest.raises(ValueError, match="audio_token_index"):
        tiny.replace(audio_token_index=10_000)


def test_lora_config_refuses_what_cannot_be_merged():
    from fms_granite_speech.config import LoRAConfig

    assert LoRAConfig(rank=64, alpha=32.0).scaling == 32.0 / 64
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        LoRAConfig(alpha=0.0)
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoRAConfig(target_modules=())
