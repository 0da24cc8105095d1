"""Error attribution on the tiny model: an honest pair introduces nothing, a planted bug is pinned to its block."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from parity.attribution import AttributionResult, attributable, attribute, kind_of, noise_floor
from parity.metrics import Tolerance, default_tolerance
from parity.pathmap import UnknownLayerError

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


def test_attributed_layers_are_the_whole_blocks(pair, honest):
    cfg = pair.config
    names = [r.name for r in honest.layers]
    assert names == [p.name for p in attributable(cfg)]
    assert names[0] == "encoder.input_linear" and names[-1] == "logits"
    assert sum(n.startswith("encoder.blocks.") for n in names) == cfg.encoder.num_layers
    assert sum(n.startswith("projector.layers.") for n in names) == cfg.projector.num_layers
    assert sum(n.startswith("decoder.layers.") for n in names) == cfg.decoder.nlayers
    assert {"encoder.out", "encoder.out_mid", "projector", "decoder.norm"} <= set(names)
    assert kind_of("encoder.blocks.3.conv") is None and kind_of("decoder.merged_embeddings") is None
    assert all(r.calls == 1 for r in honest.layers)


def test_honest_pair_introduces_nothing(honest):
    assert honest.first_introducing_layer is None
    assert honest.first_divergent is None
    for r in honest.layers:
        assert r.error is None and r.introduced_passed and not r.over_budget, (r.name, r.reason, r.error)
        assert r.budget == BUDGET
        assert r.introduced_rel_l2 < 1e-5 and r.propagated_rel_l2 < 1e-5, r.name
        # a block on HF's exact input can only lose its own rounding; end to end it also carries upstream drift
        assert r.introduced_rel_l2 <= 1.5 * r.propagated_rel_l2 + 1e-8, (r.name, r.introduced_rel_l2,
                                                                          r.propagated_rel_l2)
    # block 0 is fed the exact same tensor end to end (input_linear is bit-identical), so both numbers agree
    assert honest.layer("encoder.input_linear").propagated_rel_l2 == 0.0
    b0 = honest.layer("encoder.blocks.0")
    assert b0.introduced_rel_l2 == pytest.approx(b0.propagated_rel_l2, rel=1e-6)
    # deep in the encoder the end-to-end drift is several times what any one block adds
    b15 = honest.layer("encoder.blocks.15")
    assert b15.propagated_rel_l2 > 3 * b15.introduced_rel_l2


def test_noise_floor_float32_against_float64(pair, inputs, honest):
    assert honest.noise_floor
    for r in honest.layers:
        nf = r.noise_floor_rel_l2
        assert nf is not None and 0 < nf < 1e-5, (r.name, nf)
    # FMS's float32 drift from HF is of the order of HF's own float32 rounding error
    for i in range(pair.config.encoder.num_layers):
        r = honest.layer(f"encoder.blocks.{i}")
        assert r.propagated_rel_l2 <= 4 * r.noise_floor_rel_l2, (r.name, r.propagated_rel_l2, r.noise_floor_rel_l2)
    enc = noise_floor(pair, inputs, "encoder")
    assert set(enc) == {p.name for p in attributable(pair.config, ["encoder"])}
    assert enc["encoder.blocks.7"] == honest.layer("encoder.blocks.7").noise_floor_rel_l2


def test_result_round_trips_through_json(honest):
    text = honest.to_json()
    back = AttributionResult.from_json(text)
    assert back.to_dict() == honest.to_dict()
    assert back.tolerance == default_tolerance(torch.float32).to_dict() and back.dtype == "float32"
    assert any(n.startswith("decoder_layer:") for n in back.notes)
    with pytest.raises(ValueError, match="not an attribution result"):
        AttributionResult.from_json('{"layers": []}')


def test_planted_encoder_block_bug_is_attributed_to_that_block(pair, inputs):
    bad = _planted(pair, "encoder.blocks.5.conv.depthwise.weight")
    result = attribute(bad, inputs, layers="encoder")
    assert result.sections == ["encoder"]
    assert result.first_introducing_layer == "encoder.blocks.5"
    assert result.first_divergent.startswith("encoder.blocks.5")  # run_parity also sees it first here
    b5 = result.layer("encoder.blocks.5")
    assert b5.over_budget and b5.introduced_rel_l2 > 100 * BUDGET
    for i in range(5):
        assert not result.layer(f"encoder.blocks.{i}").over_budget
    # the point of attribution: downstream blocks fail end to end but compute correctly on HF's input
    for i in range(6, pair.config.encoder.num_layers):
        r = result.layer(f"encoder.blocks.{i}")
        assert r.introduced_rel_l2 < BUDGET and not r.over_budget, (r.name, r.introduced_rel_l2)
        assert r.propagated_rel_l2 > 100 * BUDGET and not r.propagated_passed, (r.name, r.propagated_rel_l2)
    assert not result.layer("encoder.out").over_budget and not result.layer("encoder.out_mid").over_budget


def test_planted_ctc_residual_bug_is_attributed_to_out_mid(pair, inputs):
    # out_mid's residual is added in place on HF's mid block output: block 8 must still get the right HF input
    bad = _planted(pair, "encoder.out_mid.weight")
    result = attribute(bad, inputs, layers="encoder")
    assert result.first_introducing_layer == "encoder.out_mid"
    over = [r.name for r in result.layers if r.over_budget]
    assert over == ["encoder.out_mid"]
    assert not result.layer("encoder.blocks.8").propagated_passed


def test_planted_qformer_layer_bug_is_attributed_to_that_layer(pair, inputs):
    bad = _planted(pair, "projector.layers.1.cross_attn.value.weight")
    result = attribute(bad, inputs, layers="projector")
    assert result.sections == ["encoder", "projector"]
    assert result.first_introducing_layer == "projector.layers.1"
    # only that layer and the projector containing it compute wrongly
    assert [r.name for r in result.layers if r.over_budget] == ["projector.layers.1", "projector"]


def test_planted_decoder_layer_bug_is_attributed_to_that_layer(pair, inputs):
    bad = _planted(pair, "decoder.base_model.layers.2.ff_sub_layer.w2.weight")
    result = attribute(bad, inputs)
    assert result.first_introducing_layer == "decoder.layers.2"
    assert [r.name for r in result.layers if r.over_budget] == ["decoder.layers.2"]
    for name in ("decoder.layers.3", "decoder.norm", "logits"):
        r = result.layer(name)
        assert r.introduced_rel_l2 < BUDGET, (name, r.introduced_rel_l2)
        assert r.propagated_rel_l2 > 100 * BUDGET and not r.propagated_passed, (name, r.propagated_rel_l2)


def test_custom_tolerance_sets_the_budget(pair, inputs):
    tight = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=1e-9, min_cosine=1.0 - 1e-9)
    result = attribute(pair, inputs, tol=tight, layers="encoder.blocks.0")
    assert all(r.budget == 1e-9 for r in result.layers)
    # block 0 rounds differently from HF (rel-L2 ~5e-8): over a 1e-9 budget; input_linear is bit-identical
    assert result.first_introducing_layer == "encoder.blocks.0"


def test_bad_arguments_raise_clear_errors(pair, inputs):
    with pytest.raises(TypeError, match="ModelPair"):
        attribute(object(), inputs)
    with pytest.raises(TypeError, match="ParityInputs"):
        attribute(pair, {"input_ids": inputs.input_ids})
    with pytest.raises(TypeError, match="Tolerance"):
        attribute(pair, inputs, tol=1e-5)
    with pytest.raises(UnknownLayerError):
        attribute(pair, inputs, layers="encoder.blockz.3")
    text_only = dataclasses.replace(inputs, input_features=None, input_features_mask=None)
    with pytest.raises(ValueError, match="text-only"):
        noise_floor(pair, text_only, "encoder")
