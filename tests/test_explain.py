"""The reason, not just the layer: planted porting bugs are explained as the attribute that differs (with both values)
or the kernel / precision the FMS module uses that HF's does not, at the first divergent layer."""

from __future__ import annotations

import json

import pytest

from parity.cli import main
from parity.compare import run_parity
from parity.inputs import build_inputs
from parity.pair import build_pair
from parity.result import ParityResult


def _explained(plant, dtype="float32", layers=None):
    pair = build_pair("tiny", dtype=dtype)
    plant(pair.fms)
    result = run_parity(pair, build_inputs(pair), layers=layers)
    first = result.first_failure()
    assert first is not None and first.introduces, result.first_divergent
    assert first.explanation is not None
    return result, first


def _ln_eps(m):
    m.encoder.blocks[3].ff1.ln.eps = 1e-2


def _conv_padding(m):
    conv = m.encoder.blocks[2].conv
    conv.padding = (conv.padding[0] + 1, conv.padding[1] - 1)


def _bn_eps(m):
    m.encoder.blocks[1].conv.batch_norm.eps = 1e-1


def _no_bias(m):
    m.encoder.blocks[4].ff2.mlp.w2.bias = None


@pytest.mark.parametrize("plant, layer, words", [
    (_ln_eps, "encoder.blocks.3.ff1", "encoder.blocks.3.ff1.ln: eps 1e-05 on HF (pre_norm), 0.01 on FMS (ln)"),
    (_conv_padding, "encoder.blocks.2.conv", "encoder.blocks.2.conv: padding (7, 7) on HF (depth_conv), (8, 6) on FMS"),
    (_bn_eps, "encoder.blocks.1.conv", "batch_norm: eps 1e-05 on HF (batch_norm), 0.1 on FMS (batch_norm)"),
    (_no_bias, "encoder.blocks.4.ff2", "mlp.w2: bias present True on HF (down_proj), False on FMS (mlp.w2)"),
], ids=["layernorm_eps", "conv_padding", "batchnorm_eps", "missing_bias"])
def test_an_attribute_bug_is_named_with_both_values(plant, layer, words):
    result, first = _explained(plant, layers=["encoder"])
    assert first.name == layer
    assert words in first.explanation["text"], first.explanation["text"]
    assert len(first.explanation["attributes"]) == 1  # that attribute, and nothing else of the row
    # the reason travels with the result: JSON and the summary the terminal and the report print
    again = ParityResult.from_json(result.to_json()).layer(layer)
    assert again.explanation == first.explanation
    from parity.report import summary_lines

    assert any(line.startswith(f"why {layer}: ") and words in line for line in summary_lines(result))


def test_a_fused_attention_kernel_in_bf16_is_named_at_the_op():
    def fused(m):
        m.encoder.blocks[0].attn.math_sdpa = False

    _, first = _explained(fused, dtype="bfloat16", layers=["encoder.blocks.0"])
    assert first.name == "encoder.blocks.0.attn"
    text = first.explanation["text"]
    assert text.startswith("FMS runs aten._scaled_dot_product_flash_attention_for_cpu in bfloat16, which HF's module "
                           "does not"), text
    assert "_safe_softmax in float32" in text or "_softmax in float32" in text  # what HF computes instead


def test_a_normalisation_computed_in_half_precision_is_named_at_the_op():
    def half(m):
        m.decoder.base_model.layers[1].ff_ln.use_high_precision_pow = False

    _, first = _explained(half, dtype="bfloat16", layers=["decoder"])
    assert first.name == "decoder.layers.1.mlp_norm"
    text = first.explanation["text"]
    assert "FMS computes aten.pow in bfloat16 where HF's module computes it in float32" in text, text
    ops = first.explanation["ops"]
    assert ops and ops[0]["dtype"] == "bfloat16" and 0 < ops[0]["share"] <= 1


def test_the_honest_tree_has_nothing_to_explain_unless_asked(pair):
    result = run_parity(pair, build_inputs(pair), layers=["encoder.blocks.0"])
    assert result.passed and all(r.explanation is None for r in result.layers)
    asked = run_parity(pair, build_inputs(pair), layers=["encoder.blocks.0"], explain=["encoder.blocks.0.conv"])
    exp = asked.layer("encoder.blocks.0.conv").explanation
    assert exp["attributes"] == [] and exp["text"].startswith("no attribute, weight or kernel differs")
    assert exp["ops"] and exp["ops"][0]["rel_l2"] < 1e-6  # float32 rounding, op by op


def test_parity_diff_explain_prints_the_reason(tmp_path, capsys, monkeypatch):
    import fms_granite_speech.conformer as conformer

    real = conformer.BatchNorm1d.__init__

    def planted(self, num_features, **kwargs):
        real(self, num_features, **kwargs)
        self.eps = 1e-1

    monkeypatch.setattr(conformer.BatchNorm1d, "__init__", planted)
    assert main(["diff", "--layer", "encoder.blocks.0", "--report-dir", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "why encoder.blocks.0.conv: encoder.blocks.0.conv.batch_norm: eps 1e-05 on HF" in out, out
    assert "why encoder.blocks.0.conv" in (tmp_path / "parity-report.md").read_text()
    report = json.loads((tmp_path / "parity-report.json").read_text())
    assert any(r["explanation"] for r in report["layers"])


def test_explain_needs_a_layer_that_exists(capsys):
    assert main(["diff", "--explain", "encoder.blocks.99"]) == 2
    assert "encoder.blocks.99" in capsys.readouterr().err


@pytest.mark.parametrize("plant, layer, words", [
    (lambda m: setattr(m.decoder.base_model.layers[0].config, "residual_multiplier", 0.5), "decoder.layers.0",
     "decoder.layers.0.config: residual_multiplier 0.22 on HF (the row module), 0.5 on FMS (config)"),
    (lambda m: setattr(m.decoder.base_model.layers[0].attn, "scale_factor", 0.5), "decoder.layers.0.attn",
     "scale 0.07"),
    (lambda m: setattr(m.encoder.blocks[5].conv.depthwise, "dilation", (2,)), "encoder.blocks.5.conv",
     "depthwise: dilation (1,) on HF (depth_conv.conv), (2,) on FMS (depthwise)"),
    (lambda m: setattr(m.encoder.blocks[6].ff1.mlp, "a", __import__("torch").nn.GELU()), "encoder.blocks.6.ff1",
     "activation 'SiLU' on HF (silu), 'GELU' on FMS (mlp.a)"),
    # the Q-Former feed-forward spreads over two HF modules (intermediate_query holds the activation): the row's
    # covered modules are compared, and a GELU is told from its tanh approximation
    (lambda m: setattr(m.projector.layers[0].mlp.ff_sub_layer, "a",
                       __import__("torch").nn.GELU(approximate="tanh").eval()), "projector.layers.0.mlp",
     "activation 'GELUActivation' on HF (intermediate_query.intermediate_act_fn), \"GELU(approximate='tanh')\" on "
     "FMS (ff_sub_layer.a)"),
    (lambda m: m.encoder.blocks[0].conv.batch_norm.train(), "encoder.blocks.0.conv",
     "encoder.blocks.0.conv.batch_norm: training False on HF (batch_norm), True on FMS (batch_norm)"),
    (lambda m: [setattr(m.encoder.blocks[3].post_norm, k, v)
                for k, v in (("weight", None), ("bias", None), ("elementwise_affine", False))],
     "encoder.blocks.3.post_norm",
     "encoder.blocks.3.post_norm: elementwise_affine True on HF (the row module), False on FMS (the row module)"),
], ids=["residual_multiplier", "attention_scale", "conv_dilation", "activation", "gelu_tanh_across_covered_modules",
        "batchnorm_in_training_mode", "layernorm_without_affine"])
def test_other_planted_settings_are_explained_at_the_row_that_introduces_them(plant, layer, words):
    pair = build_pair("tiny")
    plant(pair.fms)
    result = run_parity(pair, build_inputs(pair), layers=[layer.split(".")[0]])
    explained = {r.name: r.explanation["text"] for r in result.layers if r.explanation}
    assert layer in explained and result.layer(layer).introduces, (result.first_divergent, explained)
    assert words in explained[layer], explained[layer]


def _q_rows(m):  # two q rows of one decoder layer's fused projection swapped (a RoPE permutation applied twice)
    w = m.decoder.base_model.layers[1].attn.in_proj.qkv_fused.weight
    w[[0, 1]] = w[[1, 0]].clone()


def _gate_up_halves(m):  # the halves of a fused gate/up weight in the wrong order
    w = m.decoder.base_model.layers[1].ff_sub_layer.wg1_fused.weight
    half = w.shape[0] // 2
    w.copy_(__import__("torch").cat([w[half:], w[:half]]))


def _kv_swapped(m):  # an encoder block's key and value projections loaded from each other's rows
    k, v = m.encoder.blocks[1].attn.key.weight, m.encoder.blocks[1].attn.value.weight
    k_old = k.clone()
    k.copy_(v)
    v.copy_(k_old)


@pytest.mark.parametrize("plant, layer, words", [
    (_q_rows, "decoder.layers.1.attn",
     "decoder.base_model.layers.1.attn.in_proj.qkv_fused.weight: row 0 holds what FMS's adapter puts at row 1; "
     "row 1 holds what FMS's adapter puts at row 0"),
    (_gate_up_halves, "decoder.layers.1.mlp",
     "ff_sub_layer.wg1_fused.weight: rows 0-135 hold what FMS's adapter puts at rows 136-271; rows 136-271 hold "
     "what FMS's adapter puts at rows 0-135"),
    (lambda m: m.encoder.blocks[2].attn.dense.weight.mul_(2), "encoder.blocks.2.attn",
     "encoder.blocks.2.attn.dense.weight: every row 2 x what FMS's adapter makes of HF's tensors"),
    (_kv_swapped, "encoder.blocks.1.attn",
     "encoder.blocks.1.attn.key.weight: rows 0-59 hold what FMS's adapter puts in encoder.blocks.1.attn.value.weight "
     "at rows 0-59 (two tensors swapped"),
], ids=["q_rows_permuted", "fused_halves_swapped", "weight_scaled", "key_value_swapped"])
def test_a_weight_conversion_bug_is_named_against_what_the_fms_adapter_makes_of_hf(plant, layer, words):
    """Bugs in the weights themselves, which no attribute shows: the row's FMS tensors are compared with what FMS's
    own checkpoint adapter makes of HF's tensors (the LoRA adapter merged as the model merges it)."""
    import torch

    pair = build_pair("tiny")
    with torch.no_grad():
        plant(pair.fms)
    result = run_parity(pair, build_inputs(pair), layers=[layer.split(".")[0]])
    first = result.first_failure()
    assert first is not None and first.name == layer and first.introduces, result.first_divergent
    assert any(words in line for line in first.explanation["weights"]), first.explanation["weights"]
    assert first.explanation["weights"][0] in first.explanation["text"]  # the line reaches the verdict's text


@pytest.mark.parametrize("variant, dtype", [("tiny", "bfloat16"), ("tiny-plus", "float32")])
def test_the_honest_weights_are_what_the_fms_adapter_makes_of_hf(variant, dtype):
    """No weight line and no attribute (rope theta included) on an honest pair, on a block of every kind and its sub-rows (the LoRA adapter merged in bf16
    on tiny): what ``expected_weights`` reproduces is bit for bit what the model holds."""
    pair = build_pair(variant, dtype=dtype)
    rows = ["encoder.input_linear", "encoder.blocks.1", "encoder.out", "projector.layers.0", "projector",
            "decoder.merged_embeddings", "decoder.layers.1", "decoder.norm", "logits"]
    result = run_parity(pair, build_inputs(pair), explain=rows)
    explained = [r for r in result.layers if r.explanation]
    assert result.passed and len(explained) >= 20, [r.name for r in explained]
    assert [(r.name, r.explanation["weights"]) for r in explained if r.explanation["weights"]] == []
    assert [(r.name, r.explanation["attributes"]) for r in explained if r.explanation["attributes"]] == []
    assert not [r.name for r in explained if (r.explanation.get("note") or "").startswith("weights")]


def test_a_rope_theta_bug_is_named_at_the_attention_that_uses_it():
    """The rotary embedding lives outside every row (one per model on both sides): its base is compared for the
    decoder's attention rows."""
    pair = build_pair("tiny")
    rot = pair.fms.decoder.base_model.rot_emb
    rot.rope_scaling.ratio = 5000.0
    rot.cached_freqs.clear()
    rot.max_seq_len_cached.clear()
    result = run_parity(pair, build_inputs(pair), layers=["decoder"])
    first = result.first_failure()
    assert first is not None and first.name == "decoder.layers.0.attn" and first.introduces
    assert ("decoder.layers.0.attn: rope theta 10000.0 on HF (model.language_model.rotary_emb.inv_freq), 5000.0 on "
            "FMS (decoder.base_model.rot_emb.rope_scaling)") in first.explanation["text"]


@pytest.mark.parametrize("plant, layer, words", [
    (lambda m: setattr(m.decoder.config, "logits_scaling", 4.0), "logits",
     "logits: logits_scaling 8.0 on HF (text_config.logits_scaling), 4.0 on FMS (decoder.config.logits_scaling)"),
    (lambda m: setattr(m.decoder.base_model.config, "embedding_multiplier", 6.0), "decoder.layers.0.attn_norm",
     "embedding_multiplier 12.0 on HF (text_config.embedding_multiplier), 6.0 on FMS "
     "(decoder.base_model.config.embedding_multiplier)"),
], ids=["logits_scaling", "embedding_multiplier"])
def test_a_mup_scalar_outside_every_row_is_named_at_the_first_row_it_reaches(plant, layer, words):
    """Granite's multipliers are applied between rows (before the first layer, after the head): the decoder's
    config scalars are compared for every decoder row explained."""
    pair = build_pair("tiny")
    plant(pair.fms)
    result = run_parity(pair, build_inputs(pair), layers=["decoder"])
    first = result.first_failure()
    assert first is not None and first.name == layer, result.first_divergent
    assert words in first.explanation["text"], first.explanation["text"]


def test_weight_diff_on_tensors_alone():
    """``weight_diff`` without models: each kind of departure from the expected tensor, one line each."""
    import torch

    from parity.explain import weight_diff

    gen = torch.Generator().manual_seed(0)
    want = torch.randn(6, 4, generator=gen)
    assert weight_diff("w", want.clone(), want) is None
    assert weight_diff("w", want[:5], want) == "w: shape (5, 4), FMS's adapter makes (6, 4) of HF's tensors"
    assert weight_diff("w", 3 * want, want) == "w: every row 3 x what FMS's adapter makes of HF's tensors"
    swapped = want[[0, 1, 3, 2, 4, 5]]
    assert weight_diff("w", swapped, want).startswith(
        "w: row 2 holds what FMS's adapter puts at row 3; row 3 holds what FMS's adapter puts at row 2")
    other = torch.randn(6, 4, generator=gen)
    assert "in v at rows 0-5 (two tensors swapped" in weight_diff("k", other, want, {"k": want, "v": other})
    bumped = want.clone()
    bumped[4, 1] += 1.0
    assert weight_diff("w", bumped, want).startswith("w: 1 of 6 rows differ from what FMS's adapter makes")
    bias = torch.randn(5, generator=gen)
    assert weight_diff("b", 0.5 * bias, bias) == "b: every element 0.5 x what FMS's adapter makes of HF's tensors"
    # a full-size permutation: the search is bounded and says how much of it ran
    big = torch.randn(5000, 3, generator=gen)
    line = weight_diff("big", big.flip(0), big)
    assert "(rows permuted" in line and "the first 4096 of 5000 differing rows searched" in line, line


def _sequential_run_with(monkeypatch, plant, section: str):
    """``run_parity`` on tiny one model at a time (HF freed before FMS is loaded from the folder HF was saved to),
    with ``plant`` applied to the FMS model as ``load_checkpoint`` returns it."""
    import torch

    import fms_granite_speech.checkpoint as checkpoint

    real = checkpoint.load_checkpoint

    def planted(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            plant(model)
        return model

    monkeypatch.setattr(checkpoint, "load_checkpoint", planted)
    pair = build_pair("tiny", memory="sequential")
    return run_parity(pair, build_inputs(pair), layers=[section])


def test_one_model_at_a_time_compares_the_weights_from_the_checkpoint_folder(monkeypatch):
    """``--memory sequential`` frees HF before FMS runs: the row's HF tensors are read from the folder the pair was
    built from (transformers' saved layout mapped back to the row), so a weight bug is still named there."""
    result = _sequential_run_with(monkeypatch, _q_rows, "decoder")
    first = result.first_failure()
    assert first is not None and first.name == "decoder.layers.1.attn"
    assert "row 0 holds what FMS's adapter puts at row 1" in first.explanation["text"], first.explanation
    assert first.explanation["note"].endswith("weights read from the checkpoint folder")


@pytest.mark.parametrize("plant, layer, words", [
    (_bn_eps, "encoder.blocks.1.conv", "encoder.blocks.1.conv.batch_norm: eps 1e-05 on HF (batch_norm), 0.1 on FMS"),
    (lambda m: setattr(m.encoder.blocks[5].conv.depthwise, "dilation", (2,)), "encoder.blocks.5.conv",
     "encoder.blocks.5.conv.depthwise: dilation (1,) on HF (depth_conv.conv), (2,) on FMS (depthwise)"),
    (lambda m: setattr(m.decoder.config, "logits_scaling", 4.0), "logits",
     "logits: logits_scaling 8.0 on HF (text_config.logits_scaling), 4.0 on FMS"),
], ids=["batchnorm_eps", "conv_dilation", "logits_scaling"])
def test_one_model_at_a_time_compares_attributes_on_a_meta_build_of_hf(monkeypatch, plant, layer, words):
    """HF freed: its modules' configuration comes from a meta-device build of the checkpoint folder's class, paired
    with FMS's by class (FMS's BatchNorm1d subclass included) and, where a class repeats, by parameter shapes."""
    result = _sequential_run_with(monkeypatch, plant, layer.split(".")[0])
    first = result.first_failure()
    assert first is not None and first.name == layer, result.first_divergent
    assert words in first.explanation["text"], first.explanation["text"]
    assert first.explanation["note"].startswith("HF was freed (one model at a time): attributes compared on a meta")
