"""The HF <-> FMS path map: complete over the real HF model, names resolve, unknown names get suggestions."""

from __future__ import annotations

import re

import pytest

from fms_granite_speech.config import get_config
from fms_granite_speech.testing import build_hf_model
from parity import pathmap
from parity.pathmap import EXCLUDED, PATH_MAP, UnknownLayerError, check_completeness, expand, resolve


@pytest.fixture(scope="module")
def config():
    return get_config("tiny")


@pytest.fixture(scope="module")
def hf_model(config):
    return build_hf_model(config, seed=0)


def test_every_hf_parameter_is_covered(hf_model, config):
    # the real HF model (LoRA adapter included) has no parameter or persistent buffer the map leaves out
    assert pathmap.uncovered_parameters(hf_model, config) == []
    check_completeness(hf_model, config)


def test_every_expanded_hf_path_exists(hf_model, config):
    modules = dict(hf_model.named_modules())
    assert [p.hf for p in expand(config) if p.tensor != "pipeline" and p.hf not in modules] == []


def test_the_input_pipelines_are_the_first_rows(config):
    names = [p.name for p in expand(config)]
    assert names[:4] == ["features.input_features", "features.input_features_mask", "features.audio_token_counts",
                         "input_ids"]
    assert all(p.section == "features" and p.kind is None for p in expand(config)[:4])
    assert [p.name for p in resolve("features", config)] == names[:3]


def test_variant_layer_counts_match_the_configs():
    """The torch-free counts the CLI answers with are the configs' own."""
    from fms_granite_speech.config import VARIANTS

    assert set(pathmap.VARIANT_LAYERS) == set(VARIANTS)
    for name, cfg in VARIANTS.items():
        assert pathmap.VARIANT_LAYERS[name] == pathmap.LayerCounts.of(cfg), name
        assert expand(pathmap.VARIANT_LAYERS[name]) == expand(cfg)


def test_unknown_index_states_the_valid_range(config):
    with pytest.raises(UnknownLayerError, match=r"encoder\.blocks has 16 blocks: encoder\.blocks\.0 \.\. "
                                                r"encoder\.blocks\.15"):
        resolve("encoder.blocks.99", config)
    with pytest.raises(UnknownLayerError, match=r"decoder\.layers has 4 layers"):
        resolve("decoder.layers.4.attn", config)


def test_completeness_check_catches_a_missing_row(hf_model, config, monkeypatch):
    # dropping the conv row must leave the depthwise conv, BatchNorm stats etc. uncovered
    trimmed = tuple(e for e in PATH_MAP if e.name != "encoder.blocks.{}.conv")
    monkeypatch.setattr(pathmap, "PATH_MAP", trimmed)
    missing = pathmap.uncovered_parameters(hf_model, config)
    assert "model.encoder.layers.5.conv.batch_norm.running_mean" in missing
    assert "model.encoder.layers.0.conv.depth_conv.conv.weight" in missing
    with pytest.raises(ValueError, match="no row covers"):
        check_completeness(hf_model, config)


def test_expand_covers_every_row_and_layer(config):
    pairs = expand(config)
    names = [p.name for p in pairs]
    assert len(names) == len(set(names))
    templates = {re.sub(r"\.\d+(?=\.|$)", ".{}", n) for n in names}
    assert templates == {e.name for e in PATH_MAP}
    e, p, d = config.encoder, config.projector, config.decoder
    for i in range(e.num_layers):
        for sub in ("", ".ff1", ".attn", ".conv", ".ff2", ".post_norm"):
            assert f"encoder.blocks.{i}{sub}" in names
    for j in range(p.num_layers):
        for sub in ("", ".self_attn", ".mlp"):
            assert f"projector.layers.{j}{sub}" in names
        assert (f"projector.layers.{j}.cross_attn" in names) == (j % p.cross_attention_frequency == 0)
    for i in range(d.nlayers):
        for sub in ("", ".attn_norm", ".attn", ".mlp_norm", ".mlp"):
            assert f"decoder.layers.{i}{sub}" in names
    for single in ("encoder.input_linear", "encoder.out", "encoder.out_mid", "projector",
                   "decoder.merged_embeddings", "decoder.norm", "logits"):
        assert single in names


def test_expand_is_in_execution_order(config):
    names = [p.name for p in expand(config)]
    mid = config.encoder.mid_layer
    assert names[4] == "encoder.input_linear"  # after the four pipeline rows
    assert names[-1] == "logits"
    # the CTC head runs right after the mid block, before the next block
    k = names.index(f"encoder.blocks.{mid}")
    assert names[k + 1 : k + 3] == ["encoder.out", "encoder.out_mid"]
    assert names[k + 3] == f"encoder.blocks.{mid + 1}.ff1"
    # sub-modules come before their block; sections in model order
    assert names.index("encoder.blocks.3.post_norm") < names.index("encoder.blocks.3")
    assert names.index("encoder.blocks.15") < names.index("projector.layers.0.self_attn")
    assert names.index("projector.layers.0.cross_attn") < names.index("projector.layers.0.mlp")
    assert names.index("projector") < names.index("decoder.merged_embeddings") < names.index("decoder.layers.0.attn")
    assert names.index("decoder.layers.3") < names.index("decoder.norm")


def test_cross_attention_frequency_is_respected():
    cfg = get_config("tiny")
    cfg.projector.cross_attention_frequency = 2
    names = [p.name for p in expand(cfg)]
    assert "projector.layers.0.cross_attn" in names
    assert "projector.layers.1.cross_attn" not in names


def test_logits_carry_the_logits_scaling_transform(config):
    (logits,) = resolve("logits", config)
    assert logits.transform == "logits_scaling"
    assert logits.transform in pathmap.TRANSFORMS
    # and nothing else is silently transformed
    assert [p.name for p in expand(config) if p.transform] == ["logits"]


def test_merged_embeddings_compare_inputs(config):
    (emb,) = resolve("decoder.merged_embeddings", config)
    assert emb.tensor == "input"
    assert (emb.hf, emb.fms) == ("model.language_model", "decoder.base_model")


def test_exclusions_name_fused_projections(config):
    excluded = {e.name for e in EXCLUDED}
    assert {"decoder.layers.{}.attn.q_proj", "decoder.layers.{}.attn.k_proj"} <= excluded
    assert all(e.reason for e in EXCLUDED)


def test_resolve_gives_the_layer_and_its_submodules(config):
    names = [p.name for p in resolve("encoder.blocks.8", config)]
    assert names == ["encoder.blocks.8.ff1", "encoder.blocks.8.attn", "encoder.blocks.8.conv",
                     "encoder.blocks.8.ff2", "encoder.blocks.8.post_norm", "encoder.blocks.8"]
    # blocks.1 must not drag in blocks.10..15
    assert all(p.name.startswith("encoder.blocks.1.") or p.name == "encoder.blocks.1"
               for p in resolve("encoder.blocks.1", config))
    assert [p.name for p in resolve("projector.layers.1.cross_attn", config)] == ["projector.layers.1.cross_attn"]
    assert len(resolve("encoder", config)) == sum(p.section == "encoder" for p in expand(config))
    assert resolve("decoder.layers.3", config)[-1].fms == "decoder.base_model.layers.3"


@pytest.mark.parametrize("bad, expected", [
    ("encoder.block.8", "encoder.blocks.8"),
    ("encoder.blocks.99", "encoder.blocks.9"),
    ("decoder.layer.3.attn", "decoder.layers.3.attn"),
    ("projector.layers.1.crossattn", "projector.layers.1.cross_attn"),
])
def test_unknown_name_suggests_close_names(config, bad, expected):
    with pytest.raises(UnknownLayerError) as info:
        resolve(bad, config)
    assert expected in info.value.suggestions
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unrelated_name_lists_top_level_names(config):
    with pytest.raises(UnknownLayerError) as info:
        resolve("zzz", config)
    assert set(info.value.suggestions) == {"features", "input_ids", "encoder", "projector", "decoder", "logits"}


def test_resolve_decoder_covers_the_whole_decoder_section(config):
    """``--layer decoder`` must judge everything the decoder section runs, the final norm and logits included."""
    names = [p.name for p in resolve("decoder", config)]
    section = [p.name for p in expand(config) if p.section == "decoder"]
    assert names == section
    assert names[-2:] == ["decoder.norm", "logits"] and names[0] == "decoder.merged_embeddings"
    assert [p.name for p in resolve("decoder.layers", config)][-1] == f"decoder.layers.{config.decoder.nlayers - 1}"


def test_suggest_is_public():
    assert "suggest" in pathmap.__all__
