"""GraniteSpeech (fms_granite_speech.model) against transformers' GraniteSpeechForConditionalGeneration.

Tiny config, float32, CPU, seeded realistic weights with a non-zero LoRA adapter. The FMS model is loaded from a
checkpoint folder written by ``write_hf_checkpoint`` (the same path users take). Logits are compared as
``fms_logits * logits_scaling`` vs HF logits: FMS's Granite divides by ``logits_scaling``, transformers 5.x
``GraniteSpeechForConditionalGeneration`` does not (its ``forward`` returns ``lm_head``'s output as is).
"""

import pytest
import torch
from fms.models import get_model
from peft import LoraConfig
from transformers import GraniteSpeechForConditionalGeneration
from transformers.models.granite_speech.feature_extraction_granite_speech import (
    GraniteSpeechFeatureExtractor as HFExtractor,
)

from fms_granite_speech.checkpoint import load_checkpoint
from fms_granite_speech.config import LoRAConfig, get_config
from fms_granite_speech.features import load_wav, shipped_audio
from fms_granite_speech.lora import LORA_TARGETS
from fms_granite_speech.model import GraniteSpeech
from fms_granite_speech.testing import (
    add_lora_adapter,
    build_hf_model,
    lora_weights_are_nontrivial,
    random_input_ids,
    realistic_init_,
    write_hf_checkpoint,
)

TOL = 1e-5  # relative L2 error of the logits


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def hf(cfg):
    model = build_hf_model(cfg, seed=0)
    assert lora_weights_are_nontrivial(model)
    return model


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["load_checkpoint", "get_model"])
def fms(request, ckpt):
    if request.param == "get_model":
        return get_model("granite_speech", "tiny", model_path=str(ckpt), source="hf")
    return load_checkpoint(ckpt)


def _features(*names):
    clips = [load_wav(shipped_audio(n))[0][0] for n in names]
    return HFExtractor()(clips)


def _both(hf, fms, cfg, ids, feats=None):
    kwargs = {} if feats is None else dict(
        input_features=feats["input_features"], input_features_mask=feats["input_features_mask"]
    )
    with torch.no_grad():
        want = hf(input_ids=ids, **kwargs).logits
        got = fms(ids, **kwargs)
    assert got.shape == want.shape
    return got * cfg.decoder.logits_scaling, want


def test_single_clip_matches_hf(hf, fms, cfg):
    feats = _features("fox")
    ids = random_input_ids(cfg, feats["audio_embed_sizes"])
    got, want = _both(hf, fms, cfg, ids, feats)
    assert fms.adapter_enabled
    assert rel_l2(got, want) < TOL


def test_two_clips_of_different_lengths_match_hf(hf, fms, cfg):
    feats = _features("fox", "ships")
    sizes = feats["audio_embed_sizes"]
    assert sizes[0] != sizes[1] and not feats["input_features_mask"].all()
    ids = random_input_ids(cfg, sizes, seed=3)
    got, want = _both(hf, fms, cfg, ids, feats)
    assert rel_l2(got, want) < TOL
    # audio was merged into every batch item, not only the first: each row differs from a run without the audio
    # (the <|audio|> positions embedded as id 0, what they hold before the merge)
    with torch.no_grad():
        text_only = fms(ids.masked_fill(ids == cfg.audio_token_index, 0))
    for b in range(2):
        assert not torch.allclose(text_only[b], got[b] / cfg.decoder.logits_scaling)


def test_text_only_with_adapter_disabled_matches_hf(hf, fms, cfg):
    ids = random_input_ids(cfg, [0], text_len=12, seed=5)
    hf.disable_adapters()
    fms.set_adapter(False)
    try:
        got, want = _both(hf, fms, cfg, ids)
        assert not fms.adapter_enabled
        assert rel_l2(got, want) < TOL
    finally:
        hf.enable_adapters()
        fms.set_adapter(True)
    # and with the adapter on, both sides change the same way
    got_on, want_on = _both(hf, fms, cfg, ids)
    assert rel_l2(got_on, want_on) < TOL
    assert rel_l2(got_on, got) > 1e-3  # the adapter is not a no-op


def test_set_adapter_toggling_is_exact(fms, ckpt, cfg):
    feats = _features("transcribe")
    ids = random_input_ids(cfg, feats["audio_embed_sizes"], seed=7)
    args = (ids, feats["input_features"], feats["input_features_mask"])
    def live_weights(model):  # the tensors forward uses (state_dict() reports the un-merged rows by design)
        return {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("lora.")}

    weights_on = live_weights(fms)
    with torch.no_grad():
        on1 = fms(*args)
        fms.set_adapter(False)
        off = fms(*args)
        weights_off = live_weights(fms)
        fms.set_adapter(True)
        on2 = fms(*args)
    assert torch.equal(on1, on2)
    assert all(torch.equal(weights_on[k], v) for k, v in live_weights(fms).items())
    assert not torch.equal(on1, off)
    # "off" is bit-for-bit the base model: the same checkpoint loaded without its adapter
    base = load_checkpoint(ckpt, adapter=False)
    assert base.config.lora is None and not base.has_adapter
    with torch.no_grad():
        assert torch.equal(base(*args), off)
    assert all(torch.equal(weights_off[k], v) for k, v in live_weights(base).items())


def test_state_dict_round_trip_merges_the_adapter_once(fms, cfg):
    """state_dict() holds un-merged weights + lora.*, like a checkpoint: reloading and post_init merges exactly once,
    into a fresh model and back into the same one."""
    feats = _features("fox")
    ids = random_input_ids(cfg, feats["audio_embed_sizes"], seed=11)
    args = (ids, feats["input_features"], feats["input_features_mask"])
    sd = {k: v.clone() for k, v in fms.state_dict().items()}
    with torch.no_grad():
        want_on = fms(*args)
        fms.set_adapter(False)
        want_off = fms(*args)
        fms.set_adapter(True)

    fresh = GraniteSpeech(cfg)
    fresh.load_state_dict(sd)
    fresh.post_init()
    fms.load_state_dict(sd)  # the same model: the old merge is forgotten, not applied on top
    fms.post_init()
    with torch.no_grad():
        for model in (fresh, fms):
            assert model.adapter_enabled
            assert torch.equal(model(*args), want_on)
            model.set_adapter(False)
            assert torch.equal(model(*args), want_off)
            model.set_adapter(True)
    # a second post_init without reloading is also a no-op on the logits
    fresh.post_init()
    with torch.no_grad():
        assert torch.equal(fresh(*args), want_on)


def test_merge_scale_comes_from_config(hf, cfg, tmp_path):
    """A rank-8 adapter on all seven decoder projections, alpha 3: merge scale 3/8, q/k rows RoPE-permuted."""
    lora = LoRAConfig(rank=8, alpha=3.0, target_modules=tuple(LORA_TARGETS))
    cfg_all = cfg.replace(lora=lora)
    model = GraniteSpeechForConditionalGeneration(cfg_all.to_hf())
    # testing.add_lora_adapter selects self_attn modules only; the MLP targets need their own regex
    model.add_adapter(LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(lora.target_modules) + ")",
        lora_dropout=0.0,
    ))
    model = realistic_init_(model, seed=11).eval()
    assert lora_weights_are_nontrivial(model)
    fms_all = load_checkpoint(write_hf_checkpoint(model, tmp_path))
    assert fms_all.config.lora == lora
    feats = _features("transcribe")
    ids = random_input_ids(cfg_all, feats["audio_embed_sizes"], seed=2)
    got, want = _both(model, fms_all, cfg_all, ids, feats)
    assert rel_l2(got, want) < TOL


def test_cached_decoding_matches_full_forward(fms, cfg):
    """The fms.utils.generation contract: audio on the prefill step only, then (logits, cache) with new ids."""
    feats = _features("fox")
    ids = random_input_ids(cfg, feats["audio_embed_sizes"], seed=9)
    with torch.no_grad():
        full = fms(ids, feats["input_features"], feats["input_features_mask"])
        logits, cache = fms(ids[:, :-1], feats["input_features"], feats["input_features_mask"], use_cache=True)
        step, _ = fms(ids[:, -1:], past_key_value_states=cache, use_cache=True)
    assert rel_l2(logits, full[:, :-1]) < TOL
    assert rel_l2(step[:, -1], full[:, -1]) < TOL


def test_audio_token_count_mismatch_is_a_clear_error(fms, cfg):
    feats = _features("fox")
    n = feats["audio_embed_sizes"][0]
    ids = random_input_ids(cfg, [n - 1])
    with pytest.raises(ValueError, match=rf"{n - 1} <\|audio\|> tokens .* gives {n} audio embeddings"):
        fms(ids, feats["input_features"], feats["input_features_mask"])
    with pytest.raises(TypeError, match="input_features_mask must be a bool"):
        fms(random_input_ids(cfg, [n]), feats["input_features"], feats["input_features_mask"].long())
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, L\]"):
        fms(ids[0])
    with pytest.raises(TypeError, match="input_ids must be an integer torch.Tensor"):
        fms(ids > 5)
    vocab = cfg.decoder.src_vocab_size
    with pytest.raises(ValueError, match=rf"ids in \[0, {vocab}\] but the decoder vocabulary is \[0, {vocab - 1}\]"):
        fms(torch.tensor([[0, vocab]]))


@pytest.mark.parametrize("variant", ["3.3-2b", "3.3-8b"])
def test_full_size_parameter_count_equals_hf(variant):
    """Built on meta. Tied embedding/head counted once on both sides (``parameters()`` deduplicates shared
    tensors). LoRA counted identically: HF with its peft adapter attached, ours with ``lora.*``; the counts
    without LoRA are compared too."""
    cfg = get_config(variant)
    with torch.device("meta"):
        ours = GraniteSpeech(cfg)
        hf_model = GraniteSpeechForConditionalGeneration(cfg.to_hf())
        hf_base = sum(p.numel() for p in hf_model.parameters())
        add_lora_adapter(hf_model, cfg.lora)
    hf_total = sum(p.numel() for p in hf_model.parameters())
    ours_total = sum(p.numel() for p in ours.parameters())
    ours_lora = sum(p.numel() for p in ours.lora.parameters())
    assert ours.decoder.head.weight is ours.decoder.base_model.embedding.weight
    assert ours_total - ours_lora == hf_base
    assert ours_total == hf_total
    d = cfg.decoder
    q_out, kv_out = d.nheads * d.head_dim, d.kvheads * d.head_dim
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert ours_lora == d.nlayers * cfg.lora.rank * ((d.emb_dim + q_out) + (d.emb_dim + kv_out))


def test_post_init_refuses_unloaded_tensors(cfg):
    with torch.device("meta"):
        model = GraniteSpeech(cfg)
    sd = {k: torch.zeros(v.shape) for k, v in model.state_dict().items() if k != "projector.linear.bias"}
    model.load_state_dict(sd, strict=False, assign=True)
    with pytest.raises(ValueError, match=r"1 model tensors were not filled .*projector\.linear\.bias"):
        model.post_init()
