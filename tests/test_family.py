"""The Granite Speech family beyond 3.3: Granite Speech Plus (granite-speech-4.1-2b-plus), whose encoder concatenates
the hidden state after block 3 with its output (transformers' GraniteSpeechPlusForConditionalGeneration).

Parity of the ``tiny-plus`` variant against transformers' class (both pipelines, every row, float32 and bfloat16),
bugs planted in the concatenation and named at the encoder's output row, the config's checks, and a folder written by
transformers' ``save_pretrained`` loading through FMS's ``get_model("hf_pretrained")``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fms_granite_speech.config import GraniteSpeechConfig, get_config
from parity.compare import run_parity
from parity.inputs import build_inputs
from parity.pair import build_pair


@pytest.fixture(scope="module")
def plus():
    return build_pair("tiny-plus", seed=0, dtype="float32")


def test_tiny_plus_is_transformers_plus_class(plus):
    assert type(plus.hf).__name__ == "GraniteSpeechPlusForConditionalGeneration"
    assert plus.hf.config.encoder_config.cat_hidden_layers == [3]
    assert plus.fms.projector.layers[0].cross_attn.key.in_features == 2 * 44


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_plus_passes_every_row(dtype, plus):
    pair = plus if dtype == "float32" else build_pair("tiny-plus", seed=0, dtype=dtype)
    result = run_parity(pair, build_inputs(pair))
    assert result.passed, (result.first_divergent, result.first_failure().reason)
    assert result.layer("encoder").diff is not None and len(result.layers) == 136


def _planted(plus, forward):
    original = type(plus.fms.encoder).forward
    plus.fms.encoder.forward = forward.__get__(plus.fms.encoder)
    try:
        return run_parity(plus, build_inputs(plus), layers=["encoder", "projector"])
    finally:
        del plus.fms.encoder.forward
        assert type(plus.fms.encoder).forward is original


def test_planted_concatenated_block_off_by_one(plus):
    encoder = plus.fms.encoder
    encoder.config.cat_hidden_layers = (4,)
    try:
        result = run_parity(plus, build_inputs(plus), layers=["encoder", "projector"])
    finally:
        encoder.config.cat_hidden_layers = (3,)
    assert not result.passed and result.first_divergent == "encoder"


def test_planted_concatenation_order_swapped(plus):
    from fms_granite_speech.conformer import ConformerEncoder

    def swapped(self, input_features, return_ctc_logits=False):
        out = ConformerEncoder.forward(self, input_features, return_ctc_logits)
        width = self.config.hidden_dim
        return torch.cat([out[..., -width:], out[..., :-width]], dim=-1)

    result = _planted(plus, swapped)
    assert not result.passed and result.first_divergent == "encoder"
    assert all(r.passed for r in result.layers if r.name.startswith("encoder.blocks."))


def test_export_after_the_mid_layer_holds_the_ctc_residual():
    """transformers adds the CTC residual in place after exporting the hidden state after block num_layers // 2: the
    exported copy holds it. The port exports after the residual: parity with cat_hidden_layers [8] proves it."""
    config = get_config("tiny-plus")
    config = config.replace(encoder=dataclasses.replace(config.encoder, cat_hidden_layers=(8,)))
    from fms_granite_speech.testing import build_hf_model, fms_from_hf

    hf = build_hf_model(config, seed=3)
    fms = fms_from_hf(hf, config)
    feats = torch.randn(1, 40, 160)
    with torch.no_grad():
        want = hf.model.encoder(feats).last_hidden_state
        got = fms.encoder(feats)
    assert got.shape == want.shape == (1, 40, 88)
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("cat,width,needle", [
    ((16,), 88, "must be distinct and in [0, num_layers=16)"),
    ((3, 3), 132, "must be distinct"),
    ((3,), 44, "must equal the encoder's output width 88 (hidden_dim=44 x 2: cat_hidden_layers=[3])"),
])
def test_plus_config_errors_name_the_field(cat, width, needle):
    tiny = get_config("tiny")
    with pytest.raises(ValueError) as err:
        tiny.replace(encoder=dataclasses.replace(tiny.encoder, cat_hidden_layers=cat),
                     projector=dataclasses.replace(tiny.projector, encoder_hidden_size=width))
    assert needle in str(err.value)


def test_plus_config_round_trips(tmp_path):
    config = get_config("tiny-plus")
    config.save(str(tmp_path / "c.json"))
    again = GraniteSpeechConfig.load(str(tmp_path / "c.json"))
    assert again.encoder.cat_hidden_layers == (3,) and again.as_dict() == config.as_dict()
    hf = config.to_hf()
    assert type(hf).__name__ == "GraniteSpeechPlusConfig" and hf.model_type == "granite_speech_plus"
    assert GraniteSpeechConfig.from_hf(hf, lora=config.lora).as_dict() == config.as_dict()
    assert GraniteSpeechConfig.from_hf(hf.to_dict(), lora=config.lora).encoder.cat_hidden_layers == (3,)


def test_plus_folder_loads_through_fms_get_model(tmp_path, plus):
    from fms.models import get_model

    from fms_granite_speech.testing import write_hf_checkpoint

    folder = write_hf_checkpoint(plus.hf, tmp_path / "plus")
    model = get_model("hf_pretrained", model_path=str(folder))
    assert model.config.encoder.cat_hidden_layers == (3,)
    x = build_inputs(plus)
    with torch.no_grad():
        got = model(x.input_ids, input_features=x.input_features, input_features_mask=x.input_features_mask)
        want = plus.fms(x.input_ids, input_features=x.input_features, input_features_mask=x.input_features_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("n", [4, 12, 16, 32])
def test_plus_generation_default_is_conclusive_and_token_identical(n):
    """``parity generate --variant tiny-plus`` with its default seed (parity.cli.GENERATE_SEEDS): conclusive at
    every length tried, tokens identical, logits within bounds."""
    from parity.cli import GENERATE_SEEDS
    from parity.generation import check_generation

    result, _, _ = check_generation(variant="tiny-plus", seed=GENERATE_SEEDS["tiny-plus"], max_new_tokens=n)
    assert result.varied and result.tokens_identical and result.logits_passed, result.verdict


# -- granite-4.0-1b-speech's structure: no modality LoRA adapter ----------------------------------------------------


@pytest.fixture(scope="module")
def no_adapter():
    return build_pair("tiny-4.0", seed=0, dtype="float32")


def test_tiny_4_0_has_no_adapter_and_says_so(no_adapter):
    assert no_adapter.config.lora is None and not no_adapter.hf.config.has_lora_adapter
    assert not getattr(no_adapter.hf, "_hf_peft_config_loaded", False)
    with pytest.raises(ValueError, match="this model has no LoRA adapter"):
        no_adapter.fms.set_adapter(True)
    no_adapter.fms.set_adapter(False)  # disabling nothing is allowed (text-only prompts do it)


@pytest.mark.parametrize("n", [4, 16, 32])
def test_tiny_4_0_generation_default_is_conclusive_and_token_identical(n):
    from parity.cli import GENERATE_SEEDS
    from parity.generation import check_generation

    result, _, _ = check_generation(variant="tiny-4.0", seed=GENERATE_SEEDS["tiny-4.0"], max_new_tokens=n)
    assert result.varied and result.tokens_identical and result.logits_passed, result.verdict


@pytest.mark.parametrize("n", [8, 16, 32])
def test_tiny_4_1_generation_default_is_conclusive_and_token_identical(n):
    """granite-speech-4.1-2b's structure (no adapter, a granite text_config): the default seed is conclusive."""
    from parity.cli import GENERATE_SEEDS
    from parity.generation import check_generation

    assert get_config("tiny-4.1").lora is None and get_config("tiny-4.1").decoder_type == "granite"
    result, _, _ = check_generation(variant="tiny-4.1", seed=GENERATE_SEEDS["tiny-4.1"], max_new_tokens=n)
    assert result.varied and result.tokens_identical and result.logits_passed, result.verdict


def test_planted_lora_where_the_folder_has_none(no_adapter):
    """FMS merging an adapter the 4.0 folder does not have (a rank-4 q/v delta in decoder layer 0) is named at the
    attention it changes, introduced there."""
    attn = no_adapter.fms.decoder.base_model.layers[0].attn.in_proj.qkv_fused
    saved = attn.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    q_rows = no_adapter.config.decoder.nheads * no_adapter.config.decoder.head_dim
    delta = (torch.randn(q_rows, 4, generator=gen) @ torch.randn(4, attn.weight.shape[1], generator=gen)) * 0.05
    with torch.no_grad():
        attn.weight[:q_rows] += delta
    try:
        result = run_parity(no_adapter, build_inputs(no_adapter), layers=["decoder"])
    finally:
        with torch.no_grad():
            attn.weight.copy_(saved)
    first = result.first_failure()
    assert first is not None and first.name == "decoder.layers.0.attn" and first.introduces


def test_tiny_4_0_folder_has_no_adapter_files_and_loads_strictly(tmp_path, no_adapter):
    from fms.models import get_model

    from fms_granite_speech.testing import write_hf_checkpoint

    folder = write_hf_checkpoint(no_adapter.hf, tmp_path / "v40")
    assert not (folder / "adapter_config.json").exists()
    model = get_model("hf_pretrained", model_path=str(folder))
    assert model.config.lora is None
    x = build_inputs(no_adapter)
    with torch.no_grad():
        got = model(x.input_ids, input_features=x.input_features, input_features_mask=x.input_features_mask)
        want = no_adapter.fms(x.input_ids, input_features=x.input_features, input_features_mask=x.input_features_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tiny_4_0_decoder_is_transformers_granitemoehybrid(no_adapter):
    """granite-4.0-1b's text model is GraniteMoeHybrid (all attention, no experts, RoPE): HF runs that class, FMS its
    Granite decoder, the checkpoint's shared_mlp split into gate and up rows by the adapter."""
    lm = no_adapter.hf.model.language_model
    assert type(lm).__name__ == "GraniteMoeHybridModel"
    assert no_adapter.config.decoder_type == "granitemoehybrid"
    assert "model.language_model.layers.0.shared_mlp.input_linear.weight" in no_adapter.hf.state_dict()


@pytest.mark.parametrize("change,needle", [
    (dict(layer_types=["mamba", "attention", "attention", "attention"]), "Mamba layers are not ported"),
    (dict(num_local_experts=4, num_experts_per_tok=2), "expert layers are not ported"),
    (dict(position_embedding_type="nope"), "without positional embeddings (nope) is not ported"),
])
def test_granitemoehybrid_decoders_this_port_cannot_run_are_refused(change, needle):
    hf = get_config("tiny-4.0").to_hf().to_dict()
    hf["text_config"].update(change)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        GraniteSpeechConfig.from_hf(hf)


def test_a_text_model_type_fms_granite_cannot_build_is_named():
    hf = get_config("tiny").to_hf().to_dict()
    hf["text_config"]["model_type"] = "llama"
    with pytest.raises(ValueError, match="text_config.model_type='llama'"):
        GraniteSpeechConfig.from_hf(hf)


@pytest.mark.parametrize("variant", ["tiny-plus", "tiny-4.0", "tiny-4.1"])
def test_one_model_at_a_time_gives_the_same_rows(variant):
    """``--memory sequential`` on each 4.x member (the HF model freed before FMS is built, the FMS side loaded from the
    folder HF's weights were written to): every row's propagated and introduced errors equal the run that holds
    both models."""
    together = build_pair(variant, seed=0, dtype="float32")
    x = build_inputs(together)
    want = run_parity(together, x)
    one_at_a_time = build_pair(variant, seed=0, dtype="float32", memory="sequential")
    got = run_parity(one_at_a_time, build_inputs(one_at_a_time))
    assert got.memory == "sequential" and one_at_a_time.hf is None and got.passed
    assert [(r.name, r.diff.rel_l2, r.introduced and r.introduced.rel_l2) for r in got.layers] == \
        [(r.name, r.diff.rel_l2, r.introduced and r.introduced.rel_l2) for r in want.layers]
