"""fms_granite_speech.conformer against transformers' GraniteSpeechCTCEncoder (the tiny config, seeded weights).

Everything runs in float32 on CPU. Outputs are captured with forward hooks that clone, on both sides, and compared
by relative L2 error ``||fms - hf|| / ||hf||`` against 1e-5: every block, the ff1/attn/conv/ff2 branches of a few
blocks, and the final output, on the features of a shipped speech clip and on random features whose length is not
a multiple of ``context_size`` (32 frames in the tiny config). Also: batches of different lengths, the position of
the mid-layer CTC residual, the weight conversion and its errors, and meta-device construction + ``post_init``.
"""

from __future__ import annotations

import pytest
import soundfile
import torch
from transformers.models.granite_speech.feature_extraction_granite_speech import (
    GraniteSpeechFeatureExtractor as HFExtractor,
)

from fms_granite_speech.config import get_config
from fms_granite_speech.conformer import (
    HF_ENCODER_KEY_MAP,
    ConformerEncoder,
    hf_encoder_to_fms,
    load_hf_encoder,
)
from fms_granite_speech.features import shipped_audio
from fms_granite_speech.testing import build_hf_model

TOL = 1e-5
CONFIG = get_config("tiny")
ENC = CONFIG.encoder
MID = ENC.mid_layer
BRANCH_BLOCKS = (0, MID, MID + 1, ENC.num_layers - 1)
RANDOM_LENGTHS = (77, 32, 33, 1, 95)  # 77, 33, 1, 95: padded last block; 32: exactly one block


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def hf_encoder():
    return build_hf_model(CONFIG, seed=0, lora=False).model.encoder


@pytest.fixture(scope="module")
def fms_encoder(hf_encoder):
    return load_hf_encoder(hf_encoder, ENC)


def _clip_features(*names: str) -> torch.Tensor:
    audio = [torch.from_numpy(soundfile.read(str(shipped_audio(n)), dtype="float32")[0]) for n in names]
    return HFExtractor()(audio if len(audio) > 1 else audio[0])["input_features"]


def _random_features(batch: int, frames: int, seed: int) -> torch.Tensor:
    # Same range as real features ((log10 mel - max)/4 + 1 lies in [-1, 1]).
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, ENC.input_dim, generator=gen) * 2 - 1


class _Capture:
    """Forward hooks storing a clone of each named module's output (clone: HF adds the CTC residual in place)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.outputs[name] = output.clone()

        return hook

    def __enter__(self):
        return self.outputs

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _pairs() -> list[tuple[str, str]]:
    pairs = [("input_linear", "input_linear")]
    pairs += [(f"layers.{i}", f"blocks.{i}") for i in range(ENC.num_layers)]
    for i in BRANCH_BLOCKS:
        pairs += [(f"layers.{i}.{hf}", f"blocks.{i}.{fms}") for hf, fms in
                  (("ff1", "ff1"), ("attn", "attn"), ("conv", "conv"), ("ff2", "ff2"), ("post_norm", "post_norm"))]
    return pairs


def _compare_layerwise(hf_encoder, fms_encoder, features: torch.Tensor) -> None:
    pairs = _pairs()
    with _Capture(hf_encoder, [h for h, _ in pairs]) as hf_out:
        want = hf_encoder(features).last_hidden_state
    with _Capture(fms_encoder, [f for _, f in pairs]) as fms_out:
        got = fms_encoder(features)
    errors = {f: rel_l2(fms_out[f], hf_out[h]) for h, f in pairs}
    errors["output"] = rel_l2(got, want)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"rel-L2 above {TOL}: {bad}"
    assert got.shape == want.shape == (*features.shape[:2], ENC.hidden_dim)


# -- parity --------------------------------------------------------------------------------------------------------


def test_speech_clip_every_block_matches_hf(hf_encoder, fms_encoder):
    features = _clip_features("speech_fox")
    assert features.shape[1] % ENC.context_size != 0  # the last attention block is padded
    _compare_layerwise(hf_encoder, fms_encoder, features)


@pytest.mark.parametrize("frames", RANDOM_LENGTHS)
def test_random_features_every_block_matches_hf(hf_encoder, fms_encoder, frames):
    _compare_layerwise(hf_encoder, fms_encoder, _random_features(2, frames, seed=frames))


def test_batch_of_two_lengths_matches_hf_batched(hf_encoder, fms_encoder):
    long, short = _random_features(1, 77, seed=1), _random_features(1, 40, seed=2)
    batch = torch.cat([long, torch.nn.functional.pad(short, (0, 0, 0, 77 - 40))])
    want = hf_encoder(batch).last_hidden_state
    got = fms_encoder(batch)
    for i in range(2):
        assert rel_l2(got[i], want[i]) < TOL
    # No padding mask (as in HF): the short item's frames see the padded ones, so batching changes its output, and
    # matching HF's batched output is a different claim from matching each item alone.
    alone = fms_encoder(short)[0]
    assert rel_l2(got[1, :40], alone) > 1e-3


def test_batch_of_two_speech_clips_matches_hf(hf_encoder, fms_encoder):
    features = _clip_features("speech_fox", "speech_transcribe")  # zero-padded waveforms, shape [2, T_max, 160]
    want = hf_encoder(features).last_hidden_state
    assert rel_l2(fms_encoder(features), want) < TOL


# -- the mid-layer CTC residual ---------------------------------------------------------------------------------------


def _run_with_residual_after(fms_encoder, features, after):
    x = fms_encoder.input_linear(features)
    for i, block in enumerate(fms_encoder.blocks):
        x = block(x, fms_encoder.attention_dists)
        if i == after:
            x = x + fms_encoder.out_mid(fms_encoder.out(x).softmax(-1))
    return x


def test_ctc_residual_sits_after_block_mid_layer(hf_encoder, fms_encoder):
    assert MID == 7
    features = _random_features(1, 77, seed=3)
    want = hf_encoder(features).last_hidden_state
    errors = {after: rel_l2(_run_with_residual_after(fms_encoder, features, after), want) for after in (6, 7, 8)}
    assert errors[7] < TOL
    assert errors[6] > 1e-2 and errors[8] > 1e-2, errors  # moving it by one block is caught
    assert rel_l2(_run_with_residual_after(fms_encoder, features, None), want) > 1e-2  # so is dropping it


def test_mid_block_hook_sees_pre_residual_output_and_ctc_logits(hf_encoder, fms_encoder):
    features = _random_features(1, 50, seed=4)
    stored = {}
    handle = hf_encoder.layers[MID].register_forward_hook(lambda m, a, o: stored.update(raw=o))  # no clone
    try:
        with _Capture(hf_encoder, [f"layers.{MID}", f"layers.{MID + 1}"]) as hf_out:
            hf_encoder(features)
    finally:
        handle.remove()
    with _Capture(fms_encoder, [f"blocks.{MID}", "out"]) as fms_out:
        hidden, ctc_logits = fms_encoder(features, return_ctc_logits=True)
    # FMS's block output is the pre-residual value, the one a cloning hook sees on HF.
    assert rel_l2(fms_out[f"blocks.{MID}"], hf_out[f"layers.{MID}"]) < TOL
    # HF's uncloned tensor was modified in place: it holds block MID's output plus the residual.
    assert rel_l2(stored["raw"], hf_out[f"layers.{MID}"]) > 1e-2
    residual_added = fms_out[f"blocks.{MID}"] + fms_encoder.out_mid(ctc_logits.softmax(-1))
    assert rel_l2(residual_added, stored["raw"]) < TOL
    # CTC logits are HF's `out` applied to block MID's (pre-residual) output; `out` runs once.
    assert rel_l2(ctc_logits, hf_encoder.out(hf_out[f"layers.{MID}"])) < TOL
    assert ctc_logits.shape == (1, 50, ENC.output_dim)
    assert torch.equal(fms_out["out"], ctc_logits)
    assert torch.equal(hidden, fms_encoder(features))


# -- weight conversion ---------------------------------------------------------------------------------------------


def test_conversion_covers_every_hf_key_exactly(hf_encoder, fms_encoder):
    hf_sd = hf_encoder.state_dict()
    converted = hf_encoder_to_fms(hf_sd)
    assert set(converted) == set(fms_encoder.state_dict())  # HF's num_batches_tracked dropped, as FMS keeps none
    assert not any(k.endswith("num_batches_tracked") for k in converted)
    used = {t for k in hf_sd for t in HF_ENCODER_KEY_MAP if t.replace("{}", "0") == k}
    assert used == set(HF_ENCODER_KEY_MAP)  # no stale row in the map


def test_conversion_of_one_layer_with_prefixes(hf_encoder):
    hf_sd = {f"encoder.{k}": v for k, v in hf_encoder.state_dict().items() if k.startswith("layers.3.")}
    hf_sd["projector.linear.weight"] = torch.ones(2)  # outside the prefix: left untouched
    out = hf_encoder_to_fms(hf_sd, hf_prefix="encoder.", fms_prefix="encoder.")
    assert out["projector.linear.weight"] is hf_sd["projector.linear.weight"]
    assert all(k.startswith("encoder.blocks.3.") for k in out if k != "projector.linear.weight")
    assert len(out) == len(hf_sd)  # to_kv became key + value; BatchNorm's num_batches_tracked was dropped
    kv = hf_sd["encoder.layers.3.attn.to_kv.weight"]
    inner = ENC.num_heads * ENC.dim_head
    assert torch.equal(out["encoder.blocks.3.attn.key.weight"], kv[:inner])
    assert torch.equal(out["encoder.blocks.3.attn.value.weight"], kv[inner:])
    up = hf_sd["encoder.layers.3.conv.up_conv.weight"]
    assert up.shape[-1] == 1 and torch.equal(out["encoder.blocks.3.conv.up_proj.weight"], up[..., 0])
    for stat in ("running_mean", "running_var"):
        assert torch.equal(
            out[f"encoder.blocks.3.conv.batch_norm.{stat}"], hf_sd[f"encoder.layers.3.conv.batch_norm.{stat}"]
        )


def test_missing_key_is_named(hf_encoder):
    sd = hf_encoder.state_dict()
    del sd["layers.3.attn.to_q.weight"]
    with pytest.raises(ValueError, match=r"missing: blocks\.3\.attn\.query\.weight \(from HF layers\.3\.attn"):
        load_hf_encoder(sd, ENC)


def test_unexpected_key_is_named(hf_encoder):
    sd = hf_encoder.state_dict()
    sd["layers.3.attn.to_k.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected: layers\.3\.attn\.to_k\.weight \(not an HF encoder key\)"):
        load_hf_encoder(sd, ENC)


def test_wrong_shape_is_named(hf_encoder):
    sd = hf_encoder.state_dict()
    sd["layers.5.attn.to_q.weight"] = torch.zeros(7, ENC.hidden_dim)
    inner = ENC.num_heads * ENC.dim_head
    h = ENC.hidden_dim
    expected = (rf"wrong shape: blocks\.5\.attn\.query\.weight \(from HF layers\.5\.attn\.to_q\.weight\) is \[7, {h}\] "
                rf"in the checkpoint, the model expects \[{inner}, {h}\]")
    with pytest.raises(ValueError, match=expected):
        load_hf_encoder(sd, ENC)


def test_config_mismatch_lists_surplus_layers(hf_encoder):
    import dataclasses

    last = ENC.num_layers - 1
    shallower = dataclasses.replace(ENC, num_layers=last)
    expected = rf"unexpected: blocks\.{last}\.ff1\.ln\.weight \(from HF layers\.{last}\.ff1\.pre_norm\.weight\)"
    with pytest.raises(ValueError, match=expected):
        load_hf_encoder(hf_encoder, shallower)


def test_bad_source_type_raises_type_error():
    with pytest.raises(TypeError, match="state dict"):
        load_hf_encoder([1, 2], ENC)


def test_num_batches_tracked_is_dropped_present_or_not(hf_encoder, fms_encoder):
    """BatchNorm's int64 step counter is not kept: the encoder's state dict is one dtype, and HF state dicts load
    with or without it (a plain torch load_state_dict of a dict holding it too)."""
    assert {v.dtype for v in fms_encoder.state_dict().values()} == {torch.float32}
    sd = {k: v for k, v in hf_encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(hf_encoder.state_dict())
    model = load_hf_encoder(sd, ENC)
    assert model.blocks[0].conv.batch_norm.num_batches_tracked is None
    features = _random_features(1, 33, seed=5)
    assert torch.equal(model(features), fms_encoder(features))
    with_counter = dict(model.state_dict(), **{"blocks.0.conv.batch_norm.num_batches_tracked": torch.tensor(7)})
    model.load_state_dict(with_counter, strict=True)
    norm = model.blocks[0].conv.batch_norm
    norm.reset_parameters()  # resets the running statistics, without a counter
    assert torch.equal(norm.running_var, torch.ones_like(norm.running_var)) and not norm.running_mean.any()


def test_loaded_encoder_owns_its_weights(hf_encoder, fms_encoder):
    w = fms_encoder.blocks[0].attn.key.weight
    assert w.untyped_storage().data_ptr() != hf_encoder.layers[0].attn.to_kv.weight.untyped_storage().data_ptr()
    assert not fms_encoder.training


# -- meta-device construction --------------------------------------------------------------------------------------


def test_meta_build_load_post_init_rebuilds_attention_dists(hf_encoder):
    with torch.device("meta"):
        model = ConformerEncoder(ENC)
    assert model.attention_dists.is_meta
    assert "attention_dists" not in model.state_dict()  # non-persistent: no checkpoint carries it
    model.to_empty(device="cpu")  # as FMS's loader does: buffers become uninitialised memory
    model.load_state_dict(hf_encoder_to_fms(hf_encoder.state_dict()), strict=True)
    model.post_init()
    model.eval()
    assert model.attention_dists.device.type == "cpu"
    assert torch.equal(model.attention_dists, hf_encoder.attention_dists)
    features = _random_features(1, 77, seed=6)
    assert rel_l2(model(features), hf_encoder(features).last_hidden_state) < TOL


def test_fresh_encoder_has_hf_attention_dists(hf_encoder):
    assert torch.equal(ConformerEncoder(ENC).attention_dists, hf_encoder.attention_dists)


# -- input checking and compile -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features, error",
    [
        (torch.zeros(5, ENC.input_dim), ValueError),  # no batch dimension
        (torch.zeros(1, 5, 80), ValueError),  # mel bins not stacked in pairs
        (torch.zeros(1, 0, ENC.input_dim), ValueError),  # no frames
        (torch.zeros(1, 5, ENC.input_dim, dtype=torch.long), TypeError),
    ],
)
def test_bad_input_raises(fms_encoder, features, error):
    with pytest.raises(error, match="input_features"):
        fms_encoder(features)


@pytest.mark.compile
def test_compiles_to_one_graph_without_breaks():
    """Dynamo traces the whole forward as one graph (``fullgraph=True`` fails on any graph break, ``.item()`` or
    Python branching on tensor values). Static shapes, a padded last block, and a 2-block encoder to keep tracing
    fast (the code path is the same as 16 blocks, mid-layer residual included)."""
    import dataclasses

    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = ConformerEncoder(dataclasses.replace(ENC, num_layers=2)).eval()
    model.reset_parameters()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    try:
        features = _random_features(2, 77, seed=7)
        hidden, logits = compiled(features, return_ctc_logits=True)
        want_hidden, want_logits = model(features, return_ctc_logits=True)
        assert torch.equal(hidden, want_hidden) and torch.equal(logits, want_logits)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_fused_sdpa_option_agrees_in_float32(hf_encoder, fms_encoder):
    """``math_sdpa=False`` lets PyTorch pick a fused kernel: still within tolerance in float32 (the forced MATH
    backend matters for bf16/fp16 numerics, where MATH upcasts the softmax to float32)."""
    fused = ConformerEncoder(ENC, math_sdpa=False).eval()
    fused.load_state_dict(fms_encoder.state_dict())
    features = _random_features(2, 77, seed=8)
    assert rel_l2(fused(features), hf_encoder(features).last_hidden_state) < TOL
