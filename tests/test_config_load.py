"""Configs are not taken on trust: ``GraniteSpeechConfig.load`` checks every value of a saved config, and a decoder
activation the FMS decoder would compute differently is honoured or refused, never silently run as SiLU."""

from __future__ import annotations

import json

import pytest

from fms_granite_speech.config import GraniteSpeechConfig, get_config
from parity.compare import run_parity
from parity.inputs import build_inputs
from parity.pair import build_pair


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "config.json"
    get_config("tiny").save(path)
    return path, json.loads(path.read_text())


def test_a_saved_config_round_trips(saved):
    path, _ = saved
    assert GraniteSpeechConfig.load(path) == get_config("tiny")


def _edit(doc, where, value):
    doc = json.loads(json.dumps(doc))
    *parents, key = where.split(".")
    target = doc
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return doc


@pytest.mark.parametrize("where, value, words", [
    ("encoder.num_layers", "16", 'encoder.num_layers is "16" (a JSON string); it must be a JSON integer'),
    ("encoder.hidden_dim", 44.0, "encoder.hidden_dim is 44.0 (a JSON number); it must be a JSON integer"),
    ("encoder.num_heads", True, "encoder.num_heads is true"),
    ("fused_weights", "false", 'fused_weights is "false" (a JSON string); it must be true or false'),
    ("encoder", None, "'encoder' is a JSON null, not an object"),
    ("projector", [1, 2], "'projector' is a JSON array, not an object"),
    ("decoder", KeyError, "the 'decoder' section is missing"),
    ("encoder.context_sise", 3, "unknown config key 'encoder.context_sise'; did you mean 'context_size'?"),
    ("audio_token_indx", 3, "did you mean 'audio_token_index'?"),
    ("decoder.emb_dim", "64", "decoder.emb_dim is"),
])
def test_a_bad_value_is_one_line_naming_the_file_and_the_field(saved, where, value, words):
    path, doc = saved
    path.write_text(json.dumps(_edit(doc, where, value)))
    with pytest.raises(ValueError) as err:
        GraniteSpeechConfig.load(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message, message


def test_a_truncated_file_names_itself(saved):
    path, doc = saved
    path.write_text(json.dumps(doc)[:120])
    with pytest.raises(ValueError, match=f"{path} is not a valid JSON config"):
        GraniteSpeechConfig.load(path)


def test_no_adapter_is_a_null_lora(saved):
    path, doc = saved
    path.write_text(json.dumps(_edit(doc, "lora", None)))
    assert GraniteSpeechConfig.load(path).lora is None


def test_a_gelu_decoder_is_honoured_and_has_parity():
    config = get_config("tiny")
    hf = config.to_hf()
    hf.text_config.hidden_act = "gelu"
    gelu = GraniteSpeechConfig.from_hf(hf, config.lora)
    assert gelu.decoder.activation_fn == "gelu" and gelu.to_hf().text_config.hidden_act == "gelu"
    pair = build_pair("tiny", config=gelu)
    result = run_parity(pair, build_inputs(pair), layers=["decoder.layers.0.mlp", "logits"])
    assert result.passed, result.first_divergent
    # the same weights run as SiLU (what the port did before) diverge at the first MLP
    silu = build_pair("tiny", config=gelu)
    silu.fms.decoder.base_model.layers[0].ff_sub_layer.a = __import__("torch").nn.SiLU()
    assert run_parity(silu, build_inputs(silu), layers=["decoder"]).first_divergent == "decoder.layers.0.mlp"


def test_an_activation_fms_computes_differently_is_refused():
    config = get_config("tiny")
    hf = config.to_hf()
    hf.text_config.hidden_act = "gelu_new"
    with pytest.raises(ValueError, match="decoder hidden_act 'gelu_new' is not implemented by FMS Granite"):
        GraniteSpeechConfig.from_hf(hf, config.lora)
