"""fms_granite_speech.projector against the HF reference projector (GraniteSpeechEncoderProjector + Blip2QFormer).

The reference is the projector of ``build_hf_model(get_config("tiny"))`` (seeded realistic weights: non-trivial
LayerNorms and biases); ours is loaded from it with ``load_hf_projector``. Float32 on CPU. For each case the final
output and every sub-module output captured by forward hooks (HF modules that return tuples: first element) must
agree within relative L2 error 1e-5, with identical shapes (window count and token count included). A planted
transposed-window bug shows the comparison catches a wrong window reshape; weight loading must name every missing,
unexpected and wrong-shape key.
"""

import math
import re
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechEncoderProjector

import fms_granite_speech.projector as projector_module
from fms_granite_speech.config import ProjectorConfig, get_config
from fms_granite_speech.projector import (
    HF_PROJECTOR_KEY_MAP,
    QFormerProjector,
    hf_projector_to_fms,
    load_hf_projector,
)
from fms_granite_speech.testing import build_hf_model, realistic_init_

TOL = 1e-5  # relative L2 error, float32


# -- fixtures and helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def hf_model(cfg):
    return build_hf_model(cfg, seed=0)


@pytest.fixture(scope="module")
def hf_proj(hf_model):
    return hf_model.model.projector


@pytest.fixture(scope="module")
def ours(hf_proj, cfg):
    return load_hf_projector(hf_proj, cfg.projector, cfg.decoder.emb_dim)


def encoder_output(hf_model, batch, frames, seed):
    """Encoder-like frames [B, T, He]: the HF encoder's last post_norm applied to random pre-norm activations."""
    gen = torch.Generator().manual_seed(seed)
    post_norm = hf_model.model.encoder.layers[-1].post_norm
    he = post_norm.normalized_shape[0]
    pre = torch.randn(batch, frames, he, generator=gen) * 3.0 + torch.randn(1, 1, he, generator=gen)
    with torch.no_grad():
        return post_norm(pre)


def module_pairs(config: ProjectorConfig):
    """(our module path, HF projector module path) whose outputs must agree."""
    pairs = [("norm", "qformer.layernorm")]
    for j in range(config.num_layers):
        hf = f"qformer.encoder.layer.{j}"
        pairs += [
            (f"layers.{j}.self_attn.attn", f"{hf}.attention.output.dense"),
            (f"layers.{j}.self_attn", f"{hf}.attention"),
        ]
        if j % config.cross_attention_frequency == 0:
            pairs += [
                (f"layers.{j}.cross_attn.dense", f"{hf}.crossattention.output.dense"),
                (f"layers.{j}.cross_attn", f"{hf}.crossattention"),
            ]
        pairs += [
            (f"layers.{j}.mlp.ff_sub_layer.a", f"{hf}.intermediate_query"),
            (f"layers.{j}.mlp.ff_sub_layer", f"{hf}.output_query.dense"),
            (f"layers.{j}.mlp", f"{hf}.output_query"),
            (f"layers.{j}", hf),
        ]
    return pairs + [("linear", "linear")]


@contextmanager
def capture(model, names):
    """Record a clone of each named sub-module's output (first element of a tuple) while the block runs."""
    store = {n: [] for n in names}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            store[name].append(out.detach().clone())

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_both(ours, hf_proj, config, x):
    """Outputs and per-module captures of both projectors on ``x``: (ours_out, hf_out, ours_caps, hf_caps)."""
    pairs = module_pairs(config)
    with torch.no_grad():
        with capture(ours, [p for p, _ in pairs]) as ours_caps:
            ours_out = ours(x)
        with capture(hf_proj, [h for _, h in pairs]) as hf_caps:
            hf_out = hf_proj(x)
    return ours_out, hf_out, ours_caps, hf_caps


def rel_l2(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def assert_rel_close(got, want, name, tol=TOL):
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)}, HF {list(want.shape)}"
    err = rel_l2(got, want)
    assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:.0e}"


def assert_parity(ours, hf_proj, config, x):
    """Final output and every paired sub-module output agree with HF (each module runs exactly once)."""
    ours_out, hf_out, ours_caps, hf_caps = run_both(ours, hf_proj, config, x)
    for mine, theirs in module_pairs(config):
        assert len(ours_caps[mine]) == 1 and len(hf_caps[theirs]) == 1, (mine, theirs)
        assert_rel_close(ours_caps[mine][0], hf_caps[theirs][0], f"{mine} vs HF {theirs}")
    assert_rel_close(ours_out, hf_out, "projector output")
    return ours_out, hf_out


# -- forward parity -------------------------------------------------------------------------------------------------

CASES = [(1, 15), (1, 14), (1, 16), (1, 1), (1, 44), (1, 150), (2, 37)]


@pytest.mark.parametrize("batch,frames", CASES, ids=[f"B{b}-T{t}" for b, t in CASES])
def test_matches_hf_every_module(ours, hf_proj, hf_model, cfg, batch, frames):
    x = encoder_output(hf_model, batch, frames, seed=frames)
    ours_out, hf_out = assert_parity(ours, hf_proj, cfg.projector, x)
    windows = math.ceil(frames / cfg.projector.window_size)
    assert ours_out.shape == hf_out.shape == (batch, windows * cfg.projector.num_queries, cfg.decoder.emb_dim)
    assert ours.num_tokens(frames) == hf_out.shape[1]


def test_batch_item_matches_hf_run_alone(ours, hf_proj, hf_model):
    """Windows never mix batch items: item 1 of a batch gives HF's tokens for that item run alone."""
    x = encoder_output(hf_model, 2, 37, seed=7)
    with torch.no_grad():
        assert_rel_close(ours(x)[1:], hf_proj(x[1:]), "item 1 in a batch vs HF alone")


def test_planted_transposed_window_reshape_is_caught(ours, hf_proj, hf_model, cfg, monkeypatch):
    """view(B, window, nb, He) (frames dealt round-robin to windows) instead of view(B*nb, window, He) must fail."""

    def transposed_windows(x, window_size):
        b, t, he = x.shape
        nb = (t + window_size - 1) // window_size
        x = F.pad(x, (0, 0, 0, nb * window_size - t))
        return x.view(b, window_size, nb, he).transpose(1, 2).reshape(b * nb, window_size, he)

    x = encoder_output(hf_model, 1, 44, seed=44)  # 3 windows, the last one padded
    assert_parity(ours, hf_proj, cfg.projector, x)  # the unpatched projector passes on this input
    monkeypatch.setattr(projector_module, "split_windows", transposed_windows)
    ours_out, hf_out, ours_caps, hf_caps = run_both(ours, hf_proj, cfg.projector, x)
    assert ours_out.shape == hf_out.shape  # the bug keeps every shape: only the numbers can catch it
    with pytest.raises(AssertionError, match="relative L2 error"):
        assert_rel_close(ours_out, hf_out, "projector output")
    with pytest.raises(AssertionError, match="relative L2 error"):
        assert_rel_close(ours_caps["layers.0.cross_attn"][0], hf_caps["qformer.encoder.layer.0.crossattention"][0], "x")
    assert rel_l2(ours_out, hf_out) > 1e-2  # far outside the tolerance, not a near miss


def test_non_cross_attention_layers_match_hf(cfg):
    """3 layers with cross_attention_frequency=2: layer 1 has no cross-attention, in HF and here."""
    pcfg = ProjectorConfig(**{**vars(cfg.projector), "num_layers": 3, "cross_attention_frequency": 2})
    hf = GraniteSpeechEncoderProjector(cfg.replace(projector=pcfg).to_hf())
    realistic_init_(hf, seed=3).eval()
    ours = load_hf_projector(hf, pcfg, cfg.decoder.emb_dim)
    assert ours.layers[1].cross_attn is None and ours.layers[2].cross_attn is not None
    gen = torch.Generator().manual_seed(5)
    assert_parity(ours, hf, pcfg, torch.randn(2, 31, pcfg.encoder_hidden_size, generator=gen))
    every_layer = ProjectorConfig(**{**vars(pcfg), "cross_attention_frequency": 1})
    with pytest.raises(ValueError, match=re.escape("missing: layers.1.cross_attn.query.weight (HF qformer.encoder")):
        load_hf_projector(hf, every_layer, cfg.decoder.emb_dim)


def test_compiles_without_graph_breaks_for_any_length(ours, hf_model):
    """fullgraph compile (no .item(), no data-dependent branches); one graph serves several frame counts."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    for frames in (44, 150):
        x = encoder_output(hf_model, 2, frames, seed=frames)
        torch._dynamo.mark_dynamic(x, 1)
        with torch.no_grad():
            assert torch.equal(compiled(x), ours(x))
    assert counter.frame_count == 1


def test_bad_input_raises_value_error(ours, cfg):
    he = cfg.projector.encoder_hidden_size
    for bad, needle in [
        (torch.randn(20, he), "must be \\[B, T"),
        (torch.randn(1, 20, he + 1), "encoder_hidden_size=44"),
        (torch.randn(1, 0, he), "empty"),
        (torch.ones(1, 20, he, dtype=torch.long), "floating-point"),
    ]:
        with pytest.raises(ValueError, match=needle):
            ours(bad)
    with pytest.raises(TypeError, match="ProjectorConfig"):
        QFormerProjector(cfg, 56)
    with pytest.raises(ValueError, match="out_dim"):
        QFormerProjector(cfg.projector, 0)


# -- weight conversion ----------------------------------------------------------------------------------------------


def test_key_map_covers_every_parameter_both_ways(hf_proj, cfg):
    hf_sd = hf_proj.state_dict()
    converted = hf_projector_to_fms(hf_sd)
    fms_keys = set(QFormerProjector(cfg.projector, cfg.decoder.emb_dim).state_dict())
    assert set(converted) == fms_keys
    assert {re.sub(r"\.layer\.\d+\.", ".layer.{}.", k) for k in hf_sd} == set(HF_PROJECTOR_KEY_MAP)
    for hf_key, tensor in hf_sd.items():  # tensors pass through untouched
        assert any(v is tensor for v in converted.values()), hf_key


def test_conversion_of_a_partial_prefixed_state_dict(hf_proj):
    """One layer's keys under a runtime prefix are renamed; keys outside the projector map are left alone."""
    layer1 = {k: v for k, v in hf_proj.state_dict().items() if k.startswith("qformer.encoder.layer.1.")}
    other = {"model.encoder.layers.0.attn.to_q.weight": torch.zeros(1), "model.projector.not_a_weight": torch.ones(1)}
    sd = {**{f"model.projector.{k}": v for k, v in layer1.items()}, **other}
    out = hf_projector_to_fms(sd, hf_prefix="model.projector", fms_prefix="projector.")
    assert len(out) == len(sd)
    for fms_key, hf_key in [
        ("layers.1.cross_attn.key.weight", "crossattention.attention.key.weight"),
        ("layers.1.mlp.ff_sub_layer.w2.bias", "output_query.dense.bias"),
        ("layers.1.self_attn.attn.in_proj.value.weight", "attention.attention.value.weight"),
    ]:
        assert out["projector." + fms_key] is layer1["qformer.encoder.layer.1." + hf_key]
    assert {k: out[k] for k in other} == other
    assert all(k in other or k.startswith("projector.layers.1.") for k in out)


def test_loaded_weights_are_copies(ours, hf_proj):
    assert not ours.training
    assert ours.query.data_ptr() != hf_proj.query.data_ptr()
    assert torch.equal(ours.query, hf_proj.query)


def test_missing_key_is_named(hf_proj, cfg):
    sd = dict(hf_proj.state_dict())
    del sd["qformer.encoder.layer.1.crossattention.attention.key.weight"]
    msg = "missing: layers.1.cross_attn.key.weight (HF qformer.encoder.layer.1.crossattention.attention.key.weight)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_hf_projector(sd, cfg.projector, cfg.decoder.emb_dim)


def test_unexpected_key_is_named(hf_proj, cfg):
    sd = {**hf_proj.state_dict(), "qformer.encoder.layer.0.intermediate.dense.weight": torch.zeros(72, 40)}
    with pytest.raises(ValueError, match=re.escape("unexpected: qformer.encoder.layer.0.intermediate.dense.weight")):
        load_hf_projector(sd, cfg.projector, cfg.decoder.emb_dim)


def test_wrong_shapes_are_named(hf_proj, cfg):
    sd = dict(hf_proj.state_dict())
    sd["qformer.encoder.layer.0.crossattention.attention.value.weight"] = torch.zeros(40, 45)
    with pytest.raises(ValueError) as err:
        load_hf_projector(sd, cfg.projector, cfg.decoder.emb_dim + 1)  # out_dim mismatch too
    text = str(err.value)
    assert "wrong shape: layers.0.cross_attn.value.weight (HF qformer.encoder.layer.0.crossattention" in text
    assert "is [40, 45] in the checkpoint, the model expects [40, 44]" in text
    assert "wrong shape: linear.weight is [56, 40] in the checkpoint, the model expects [57, 40]" in text
    assert "wrong shape: linear.bias" in text


def test_loader_rejects_non_state_dict(cfg):
    with pytest.raises(TypeError, match="state dict"):
        load_hf_projector([1, 2], cfg.projector, 56)
