"""The module map derived from FMS's own adapter (parity.derive) and the engine that runs it (parity.engine).

Every pair here is built from its transformers config class with seeded realistic weights (parity.models); no row of
any map is written by hand. Planted bugs live in the FMS model only and must be named at the row that introduces
them, with the module the explanation blames.
"""

from __future__ import annotations

import json

import pytest
import torch
from parity.derive import CONCAT, GATHER, SAME, DeriveError, derive
from parity.engine import derived_map, run_architecture
from parity.models import ARCHITECTURES, BuildError, PairPlugin, plugin

@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_CACHE_DIR", str(tmp_path / "derived"))


_BUILT: dict = {}


def built(name: str, dtype: str = "float32"):
    """One build per (architecture, dtype) per process; tests that plant a bug build their own."""
    key = (name, dtype)
    if key not in _BUILT:
        _BUILT[key] = plugin(name).build(dtype)
    return _BUILT[key]


def _map(name: str):
    p = plugin(name)
    b = built(name)
    return derived_map(b, p, p.inputs(p.default_case, b.hf_config), cache=False)


# -- the derived map --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["granite", "llama", "mistral", "qwen3", "granite_moe_hybrid", "gpt_bigcode"])
def test_every_hf_leaf_with_parameters_is_compared(name):
    """Each HF module that holds parameters and has no sub-modules (Linear, Embedding, norms) gets a row."""
    b = built(name)
    dmap = _map(name)
    compared = {p.hf for p in dmap.pairs}
    leaves = [n for n, m in b.hf.named_modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    assert leaves and [n for n in leaves if n not in compared] == []


def test_fused_qkv_and_gate_up_become_output_channel_gathers():
    dmap = _map("llama")
    rows = {p.name: p for p in dmap.pairs}
    qkv = [rows[f"base_model.layers.0.attn.in_proj.qkv_fused[{x}]"] for x in ("q_proj", "k_proj", "v_proj")]
    assert [p.relation for p in qkv] == [GATHER] * 3
    assert [len(p.index) for p in qkv] == [64, 32, 32]
    channels = sorted(i for p in qkv for i in p.index)
    assert channels == list(range(128))  # disjoint, every fused output channel used once
    # RoPE: FMS orders q rows per head differently from HF, so q's gather is not the plain first 64 channels
    assert list(qkv[0].index) != list(range(64))
    gate = rows["base_model.layers.0.ff_sub_layer.wg1_fused[gate_proj]"]
    assert gate.relation == GATHER and list(gate.index) == list(range(128))
    assert dmap.tensors["base_model.layers.0.attn.in_proj.qkv_fused.weight"].startswith("fused <- ")
    assert dmap.tensors["base_model.layers.0.attn.dense.weight"] == "identity <- model.layers.0.self_attn.o_proj.weight"


def test_split_tensor_becomes_a_concatenation():
    """Granite Speech's HF to_kv is split into FMS key and value: one row, both FMS outputs concatenated."""
    dmap = _map("granite_speech")
    row = dmap.pair("encoder.blocks.0.attn.key+encoder.blocks.0.attn.value[to_kv]")
    assert row.relation == CONCAT and row.parts == ("encoder.blocks.0.attn.key", "encoder.blocks.0.attn.value")
    assert row.hf == "model.encoder.layers.0.attn.to_kv"


def test_unfused_fms_rows_are_permuted_one_to_one():
    """With fused_weights=False, q_proj pairs 1:1 with FMS's query Linear through RoPE's row permutation."""
    p = plugin("llama")
    b = p.build("float32", fused_weights=False)
    dmap = derived_map(b, p, p.inputs("prompt", b.hf_config), cache=False)
    q = next(r for r in dmap.pairs if r.hf == "model.layers.0.self_attn.q_proj")
    assert q.relation == GATHER and q.fms.endswith("in_proj.query") and sorted(q.index) == list(range(64))
    v = next(r for r in dmap.pairs if r.hf == "model.layers.0.self_attn.v_proj")
    assert v.relation == SAME and v.fms.endswith("in_proj.value")
    assert run_architecture(p, built=b).passed


def test_unpaired_modules_carry_a_reason():
    dmap = _map("roberta")
    assert dmap.unpaired and all(u.reason for u in dmap.unpaired)
    reasons = {u.path: u.reason for u in dmap.unpaired}
    assert "Dropout" in reasons["roberta.embeddings.dropout"]
    assert "straddle" in reasons["roberta.embeddings"]


def test_derived_granite_speech_map_equals_the_hand_map_but_the_named_overrides(pair, inputs):
    """Every module row of PATH_MAP is a derived row, except DERIVED_OVERRIDES (each with its reason)."""
    from parity import pathmap
    from parity.derive import probe_outputs

    def run_hf(m):
        return m(input_ids=inputs.input_ids, input_features=inputs.input_features,
                 input_features_mask=inputs.input_features_mask)

    def run_fms(m):
        x = inputs.fms or inputs
        return m(x.input_ids, input_features=x.input_features, input_features_mask=x.input_features_mask)

    probe = {"hf": probe_outputs(pair.hf, run_hf), "fms": probe_outputs(pair.fms, run_fms)}
    dmap = derive(pair.hf, pair.fms, "granite_speech", to_checkpoint=None, exclude=[r"lora_"], probe=probe,
                  cache=False)
    derived = {(p.hf, p.fms) for p in dmap.pairs}
    not_derived = {"features.{}" if lp.name.startswith("features.") else pathmap.template_of(lp.name)
                   for lp in pathmap.expand(pair.config) if (lp.hf, lp.fms) not in derived}
    assert not_derived == set(pathmap.DERIVED_OVERRIDES)
    # rows the hand map excludes (fused in FMS) are compared by the derived map through gathers
    gathered = {p.hf for p in dmap.pairs if p.relation == GATHER}
    lm = "model.language_model.layers.0"
    assert {f"{lm}.self_attn.q_proj", f"{lm}.self_attn.k_proj", f"{lm}.self_attn.v_proj", f"{lm}.mlp.gate_proj",
            f"{lm}.mlp.up_proj"} <= gathered


def test_cache_returns_the_same_map_and_survives_a_damaged_entry(tmp_path):
    p = plugin("granite")
    b = built("granite")
    x = p.inputs("prompt", b.hf_config)
    first = derived_map(b, p, x)
    again = derived_map(b, p, x)
    assert not first.cached and again.cached
    assert [d.to_dict() for d in again.pairs] == [d.to_dict() for d in first.pairs]
    (entry,) = list((tmp_path / "derived").glob("granite-*.json"))
    entry.write_text("{not json")
    third = derived_map(b, p, x)
    assert not third.cached and len(third.pairs) == len(first.pairs)
    json.loads(entry.read_text())  # rewritten whole


def test_a_failing_adapter_is_a_derive_error_naming_the_step():
    b = built("llama")
    with pytest.raises(DeriveError, match="step 'checkpoint layout'.*ZeroDivisionError"):
        derive(b.hf, b.fms, "llama", to_checkpoint=lambda sd: 1 / 0, cache=False)

    def drop_layer_norm(sd):
        return {k.replace("input_layernorm", "attention_norm"): v for k, v in sd.items()}

    # a key the adapter does not know passes through under its own name: FMS would leave the tensor unfilled
    dmap = derive(b.hf, b.fms, "llama", to_checkpoint=drop_layer_norm, cache=False)
    assert dmap.tensors["base_model.layers.0.ln.weight"] == "not filled by the adapter"
    assert "base_model.layers.0.attention_norm.weight" in dmap.unused


# -- every architecture passes in float32 and bfloat16, every case: parity/tests/test_architectures.py (gated by
#    `parity check`); the one known FMS divergence:


def test_mistral_beyond_its_sliding_window_fails_in_the_attention():
    """FMS 1.13.1's mistral keeps config.sliding_window but no attention reads it: a prompt longer than the window
    diverges inside the first attention, which the engine names."""
    result = run_architecture(plugin("mistral"), case="beyond_window", built=built("mistral"))
    assert not result.passed
    assert result.first_divergent == "base_model.layers.0.attn.dense.input"
    assert result.first_failure().explanation["introduced_in"] == "base_model.layers.0.attn"


@pytest.mark.parametrize("name,step,needles", [
    ("mixtral", "FMS model", ("nheads % self.config.kvheads", "kv_heads")),
    ("gpt_oss", "coverage", ("cond_ffn.w13", "experts.gate_up_proj")),
    ("mpnet", "coverage", ("base_model.word_embedding.weight",)),
])
def test_pairs_fms_cannot_take_fail_at_the_named_step(name, step, needles):
    with pytest.raises(BuildError) as err:
        plugin(name).build("float32")
    assert err.value.step == step
    for needle in needles:
        assert needle in str(err.value)


# -- planted bugs, each named where it starts ------------------------------------------------------------------------


def _first(result):
    f = result.first_failure()
    assert f is not None, "the planted bug was not caught"
    return f.name, f.explanation or {}


@pytest.mark.parametrize("name,weight,rows,expected", [
    # a q row swap in llama's fused q/k/v: named at the q channels of qkv_fused
    ("llama", lambda m: m.base_model.layers[1].attn.in_proj.qkv_fused.weight, [0, 5],
     "base_model.layers.1.attn.in_proj.qkv_fused[q_proj]"),
    # qwen3's q/k norms act on RoPE-permuted channels in FMS: the derived gather lines them up, so two swapped
    # channels of one k_norm weight show at that norm
    ("qwen3", lambda m: m.base_model.layers[1].attn.in_proj.k_norm.weight, [0, 3],
     "base_model.layers.1.attn.in_proj.k_norm[k_norm]"),
])
def test_planted_row_swap(name, weight, rows, expected):
    p = plugin(name)
    b = p.build("float32")
    w = weight(b.fms)
    with torch.no_grad():
        w[rows] = w[rows[::-1]]
    found, why = _first(run_architecture(p, built=b))
    assert found == expected
    assert why["introduced_in"] == expected.split("[")[0]


def test_planted_norm_epsilon_granite():
    p = plugin("granite")
    b = p.build("float32")
    b.fms.base_model.layers[0].ff_ln.eps = 1e-2
    name, why = _first(run_architecture(p, built=b))
    assert name == "base_model.layers.0.ff_ln"
    assert why["introduced_in"] == "base_model.layers.0.ff_ln"


def test_planted_rope_theta_mistral():
    base = plugin("mistral")
    p = PairPlugin("mistral", base.hf_class, base.model_type, base.tiny, fms_overrides={"rope_base": 5e5})
    name, why = _first(run_architecture(p, built=p.build("float32")))
    assert name == "base_model.layers.0.attn.dense.input"
    assert why["introduced_in"] == "base_model.layers.0.attn"


def test_planted_gate_up_order_granite_swa():
    p = plugin("granite_swa")
    b = p.build("float32")
    w = b.fms.base_model.layers[2].ff_sub_layer.wg1_fused.weight
    half = w.shape[0] // 2
    with torch.no_grad():
        w.copy_(torch.cat([w[half:], w[:half]]))
    name, _ = _first(run_architecture(p, built=b))
    assert name == "base_model.layers.2.ff_sub_layer.wg1_fused[gate_proj]"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planted_embedding_scale_granite_moe_hybrid(dtype):
    p = plugin("granite_moe_hybrid")
    b = p.build(dtype)
    b.fms.base_model.config.embedding_multiplier = 12.5  # HF's is 12
    name, why = _first(run_architecture(p, built=b))
    assert name == "base_model.layers.0.input"
    assert why["introduced_in"] == "base_model"
    assert why["scale"] == pytest.approx(12.5 / 12, rel=5e-3)


def test_planted_layernorm_bias_gpt_bigcode():
    p = plugin("gpt_bigcode")
    b = p.build("float32")
    with torch.no_grad():
        b.fms.base_model.layers[1].ln.bias.zero_()
    name, _ = _first(run_architecture(p, built=b))
    assert name == "base_model.layers.1.ln"


def test_planted_vision_patch_bias_llava_next():
    p = plugin("llava_next")
    b = p.build("float32")
    emb = b.fms.vision_tower.base_model.embeddings.patch_embedding
    with torch.no_grad():
        emb.bias.mul_(-1)
    name, _ = _first(run_architecture(p, built=b))
    assert name == "vision_tower.base_model.embeddings.patch_embedding"


# -- the CLI ----------------------------------------------------------------------------------------------------------


def test_cli_diff_and_map(tmp_path, capsys):
    from parity.cli import main

    assert main(["diff", "--architecture", "llama", "--quiet", "--report-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "first divergent layer: none" in out and (tmp_path / "r" / "parity-report.json").is_file()
    assert main(["map", "--architecture", "gpt_bigcode"]) == 0
    out = capsys.readouterr().out
    assert "0 written by hand" in out and "unpaired" in out


@pytest.mark.parametrize("argv,needle", [
    (["diff", "--architecture", "lama"], "did you mean 'llama'"),
    (["diff", "--architecture", "llama", "--audio", "x.wav"], "--audio belongs to the Granite Speech pair"),
    (["diff", "--architecture", "llama", "--cases", "nope"], "unknown case(s) ['nope']"),
    (["diff", "--architecture", "llama", "--dtype", "float64"], "float64 is the bounds' reference"),
    (["diff", "--architecture", "llama", "--layer", "base_model.nope"], "no row 'base_model.nope'"),
    (["map", "--architecture", "llama", "--expand"], "--expand belongs to the Granite Speech map"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    from parity.cli import main

    assert main(argv + (["--report-dir", str(tmp_path), "--quiet"] if argv[0] == "diff" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_mixtral_is_a_fail_verdict(capsys, tmp_path):
    from parity.cli import main

    assert main(["diff", "--architecture", "mixtral", "--quiet", "--report-dir", str(tmp_path)]) == 1
    assert "FAIL: step 'FMS model' failed" in capsys.readouterr().out


def test_registry_names_match_fms_architectures():
    from fms_granite_speech._fms_compat import hf_architectures

    fms_arch = hf_architectures()
    for name, p in ARCHITECTURES.items():
        assert fms_arch.get(p.hf_class) == name, name


# -- generation -------------------------------------------------------------------------------------------------------


def test_generate_llama_is_token_identical_and_conclusive():
    from parity.arch_generate import generate_architecture, required_distinct

    g = generate_architecture(plugin("llama"), max_new_tokens=12, seed=1)
    assert g.varied and len(set(g.hf_tokens)) >= required_distinct(12)
    assert g.hf_tokens == g.fms_tokens and g.passed, g.verdict()
    assert len(g.forward.layers) >= 40 and g.forward.passed


def test_generate_names_a_kv_cache_bug_only_generation_shows():
    """A planted decode-only bug: cached steps read the cached values halved (the prompt's forward is right, so
    the teacher-forced comparison passes; only the tokens catch it)."""
    from parity.arch_generate import generate_architecture

    p = plugin("llama")
    b = p.build("float32", seed=1)
    forward = b.fms.forward

    def halved_cache(x, *args, past_key_value_states=None, **kw):
        if past_key_value_states:
            past_key_value_states = [(k, v * 0.5) for k, v in past_key_value_states]
        return forward(x, *args, past_key_value_states=past_key_value_states, **kw)

    b.fms.forward = halved_cache
    g = generate_architecture(p, max_new_tokens=12, built=b)
    assert g.varied and g.first_mismatch is not None and not g.passed
    assert g.forward.passed  # the forward on HF's sequence is right: the cache path is what differs
    assert g.verdict().startswith(f"FAIL: token {g.first_mismatch} differs")


def test_generate_mistral_fails_once_the_sequence_passes_its_window():
    from parity.arch_generate import generate_architecture

    g = generate_architecture(plugin("mistral"), max_new_tokens=12, seed=1)
    window = plugin("mistral").tiny["sliding_window"]
    assert g.first_mismatch is not None and 12 + g.first_mismatch >= window
    assert g.forward.first_divergent == "base_model.layers.0.attn.dense.input"


def test_cli_generate_architecture(capsys):
    from parity.cli import main

    assert main(["generate", "--architecture", "qwen3", "--max-new-tokens", "9", "--quiet"]) == 0
    assert "PASS: tokens identical" in capsys.readouterr().out
    assert main(["generate", "--architecture", "bert"]) == 2
    assert "not a causal LM" in capsys.readouterr().err


def test_checkpoint_folder_through_fms_own_reader(tmp_path, capsys):
    """--checkpoint DIR: HF from_pretrained, FMS filled by its own folder reader and adapter; a folder whose weights
    are a pickle is refused before anything is read (the HF side is not reached either)."""
    from parity.cli import main

    b = built("llama")
    b.hf.save_pretrained(tmp_path / "llama")
    assert main(["diff", "--architecture", "llama", "--checkpoint", str(tmp_path / "llama"), "--quiet",
                 "--report-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'llama'}" in out and "first divergent layer: none" in out
    (tmp_path / "llama" / "model.safetensors").rename(tmp_path / "llama" / "pytorch_model.bin")
    assert main(["diff", "--architecture", "llama", "--checkpoint", str(tmp_path / "llama"), "--quiet",
                 "--report-dir", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert "FAIL: step 'checkpoint read' failed" in out and "safetensors" in out


@pytest.mark.parametrize("make,needle", [
    (lambda d: d, "checkpoint folder not found"),
    (lambda d: (d.mkdir(), d)[1], "has no config.json"),
    (lambda d: (d.write_text("x"), d)[1], "is a file, not a checkpoint folder"),
])
def test_cli_checkpoint_argument_errors_are_one_line(tmp_path, capsys, make, needle):
    from parity.cli import main

    path = make(tmp_path / "ckpt")
    assert main(["diff", "--architecture", "llama", "--checkpoint", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
