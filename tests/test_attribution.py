"""Error attribution on the tiny model: an honest pair introduces nothing, a planted bug is pinned to the row that
computes it, and every row downstream of it is recognised as inheriting the error."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from parity.attribution import AttributionResult, attributable, attribute, kind_of, noise_floor
from parity.metrics import Tolerance, default_tolerance
from parity.pathmap import UnknownLayerError, expand

BUDGET = default_tolerance(torch.float32).max_rel_l2


@pytest.fixture(scope="module")
def honest(pair, inputs):
    return attribute(pair, inputs, with_noise_floor=True)


def _planted(pair, param: str, factor: float = 1.5):
    """A copy of ``pair`` whose FMS parameter ``param`` is multiplied by ``factor`` (HF untouched)."""
    fms = copy.deepcopy(pair.fms)
    with torch.no_grad():
        fms.get_parameter(param).mul_(factor)
    return dataclasses.replace(pair, fms=fms)


def test_every_row_with_a_replay_is_attributed(pair, honest):
    cfg = pair.config
    names = [r.name for r in honest.layers]
    assert names == [p.name for p in attributable(cfg)]
    assert names[0] == "encoder.input_linear" and names[-1] == "logits"
    # every Conformer block and every one of its sub-modules, every Q-Former row, every decoder row
    assert sum(n.startswith("encoder.blocks.") for n in names) == 6 * cfg.encoder.num_layers
    assert {"decoder.merged_embeddings", "decoder.layers.2.attn", "decoder.norm", "projector"} <= set(names)
    assert kind_of("encoder.blocks.3.conv") == "module" and kind_of("features.input_features") is None
    assert kind_of("decoder.merged_embeddings") == "merge"
    # rows without a replay: the input pipelines, and the encoder's output (its own computation, Granite Speech
    # Plus's concatenation, is isolated by the propagated comparison once every block before it agrees)
    assert [p.name for p in expand(cfg) if p.kind is None] == ["features.input_features",
                                                                "features.input_features_mask",
                                                                "features.audio_token_counts", "input_ids",
                                                                "encoder"]


def test_honest_pair_introduces_nothing(honest):
    assert honest.first_introducing_layer is None
    assert honest.first_divergent is None
    for r in honest.layers:
        assert r.error is None and r.introduced_passed and not r.over_budget, (r.name, r.reason, r.error)
        assert r.budget == BUDGET
        assert r.introduced_rel_l2 < 1e-6 and r.propagated_rel_l2 < 1e-5, r.name
        # a module on HF's exact input can only lose its own rounding; end to end it also carries upstream drift
        assert r.introduced_rel_l2 <= 1.5 * r.propagated_rel_l2 + 1e-8, (r.name, r.introduced_rel_l2,
                                                                          r.propagated_rel_l2)
    assert honest.layer("encoder.input_linear").propagated_rel_l2 == 0.0  # fed the same features: bit-identical
    b15 = honest.layer("encoder.blocks.15")
    assert b15.propagated_rel_l2 > 3 * b15.introduced_rel_l2  # deep in the encoder drift is inherited


def test_noise_floor_float32_against_float64(pair, inputs, honest):
    assert honest.noise_floor
    for r in honest.layers:
        if r.name == "decoder.merged_embeddings":  # an input row: copies, measured by the engine in reduced precision
            continue
        nf = r.noise_floor_rel_l2
        assert nf is not None and 0 <= nf < 1e-5, (r.name, nf)
    # FMS's float32 drift from HF is of the order of HF's own float32 rounding error
    for i in range(pair.config.encoder.num_layers):
        r = honest.layer(f"encoder.blocks.{i}")
        assert r.propagated_rel_l2 <= 4 * r.noise_floor_rel_l2 + 1e-9, (r.name, r.propagated_rel_l2,
                                                                           r.noise_floor_rel_l2)
    enc = noise_floor(pair, inputs, "encoder")
    assert set(enc) == {p.name for p in attributable(pair.config, ["encoder"])}
    assert enc["encoder.blocks.7"] == honest.layer("encoder.blocks.7").noise_floor_rel_l2


def test_result_round_trips_through_json(honest):
    back = AttributionResult.from_json(honest.to_json())
    assert back.to_dict() == honest.to_dict()
    assert back.dtype == "float32"
    assert any(n.startswith("decoder_layer:") for n in back.notes)
    with pytest.raises(ValueError, match="not an attribution result"):
        AttributionResult.from_json('{"layers": []}')


def test_planted_encoder_conv_bug_is_attributed_to_the_conv(pair, inputs):
    bad = _planted(pair, "encoder.blocks.5.conv.depthwise.weight")
    result = attribute(bad, inputs, layers="encoder")
    assert result.sections == ["features", "encoder"]
    assert result.first_introducing_layer == "encoder.blocks.5.conv" == result.first_divergent
    over = [r.name for r in result.layers if r.over_budget]
    assert over == ["encoder.blocks.5.conv", "encoder.blocks.5"]  # the module and the block holding it
    # the point of attribution: downstream blocks fail end to end but compute correctly on HF's input
    for i in range(6, pair.config.encoder.num_layers):
        r = result.layer(f"encoder.blocks.{i}")
        assert r.introduced_rel_l2 < BUDGET and not r.over_budget, (r.name, r.introduced_rel_l2)
        assert r.propagated_rel_l2 > 100 * BUDGET and not r.propagated_passed, (r.name, r.propagated_rel_l2)


def test_planted_ctc_residual_bug_is_attributed_to_out_mid(pair, inputs):
    # out_mid's residual is added in place on HF's mid block output: block 8 must still get the right HF input
    bad = _planted(pair, "encoder.out_mid.weight")
    result = attribute(bad, inputs, layers="encoder")
    assert result.first_introducing_layer == "encoder.out_mid"
    assert [r.name for r in result.layers if r.over_budget] == ["encoder.out_mid"]
    assert not result.layer("encoder.blocks.8").propagated_passed


def test_planted_qformer_bug_is_attributed_to_the_cross_attention(pair, inputs):
    bad = _planted(pair, "projector.layers.1.cross_attn.value.weight")
    result = attribute(bad, inputs, layers="projector")
    assert result.sections == ["features", "encoder", "projector"]
    assert result.first_introducing_layer == "projector.layers.1.cross_attn"
    # only that module, the layer holding it, and the projector holding both compute wrongly
    assert [r.name for r in result.layers if r.over_budget] == ["projector.layers.1.cross_attn",
                                                                "projector.layers.1", "projector"]


def test_planted_decoder_mlp_bug_is_attributed_to_the_mlp(pair, inputs):
    bad = _planted(pair, "decoder.base_model.layers.2.ff_sub_layer.w2.weight")
    result = attribute(bad, inputs)
    assert result.first_introducing_layer == "decoder.layers.2.mlp"
    assert [r.name for r in result.layers if r.over_budget] == ["decoder.layers.2.mlp", "decoder.layers.2"]
    for name in ("decoder.layers.3", "decoder.norm", "logits"):
        r = result.layer(name)
        assert r.introduced_rel_l2 < BUDGET, (name, r.introduced_rel_l2)
        assert r.propagated_rel_l2 > 100 * BUDGET and not r.propagated_passed, (name, r.propagated_rel_l2)


def test_custom_tolerance_sets_the_budget(pair, inputs):
    tight = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=1e-9, min_cosine=1.0 - 1e-9)
    result = attribute(pair, inputs, tol=tight, layers="encoder.blocks.0")
    assert all(r.budget == 1e-9 for r in result.layers)
    # the first row that rounds differently from HF at all is over a 1e-9 budget; earlier ones are bit-identical
    first = result.first_introducing_layer
    assert first is not None and first.startswith("encoder.blocks.0")
    rows = [r.name for r in result.layers]
    assert all(result.layer(n).introduced_rel_l2 == 0.0 for n in rows[: rows.index(first)])


def test_bad_arguments_raise_clear_errors(pair, inputs):
    with pytest.raises(TypeError, match="ParityInputs"):
        attribute(pair, {"input_ids": inputs.input_ids})
    with pytest.raises(TypeError, match="Tolerance"):
        attribute(pair, inputs, tol=1e-5)
    with pytest.raises(UnknownLayerError):
        attribute(pair, inputs, layers="encoder.blockz.3")
    text_only = dataclasses.replace(inputs, input_features=None, input_features_mask=None, fms=None)
    with pytest.raises(ValueError, match="text-only"):
        noise_floor(pair, text_only, "encoder")
