"""The FMS model contract beyond FMS's own suites (tests/models): config save/load, kwargs merged into a copy, fused
and unfused weights, FMS's ``generate`` with audio (token-identical to HF's ``generate``), the whole forward compiled
as one graph, and a model package whose modules do not import each other in a circle.

Expectations come from the HF reference (``GraniteSpeechForConditionalGeneration``, seeded realistic weights, a
non-zero peft LoRA adapter) or from the model's own other layout (fused vs unfused), never from stored numbers.
"""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fms.models import get_model
from fms.utils.fusion import apply_unfuse_weights
from fms.utils.generation import generate, pad_input_ids
from torch._dynamo.utils import counters

import fms_granite_speech as fgs
from fms_granite_speech.compile import compile_model, explain_graph_breaks, uncompile
from fms_granite_speech.config import GraniteSpeechConfig, LoRAConfig, get_config
from fms_granite_speech.features import shipped_audio
from fms_granite_speech.model import GraniteSpeech
from fms_granite_speech.processor import GraniteSpeechProcessor
from fms_granite_speech.testing import build_hf_model, fms_from_hf, write_hf_checkpoint
from fms_granite_speech.tokenizer_utils import build_test_tokenizer

PACKAGE = Path(fgs.__file__).parent
NEW = 32
PROMPT = ("<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech?<|end_of_text|>\n"
          "<|start_of_role|>assistant<|end_of_role|>")
TEXT = ("<|start_of_role|>user<|end_of_role|>please write a sentence about the sea.<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>")


@pytest.fixture(scope="module")
def untied():
    """tiny with an untied head, weight seed 1: random weights with a tied head repeat one token (see
    test_generation), these give greedy continuations of 8 to 20 distinct tokens in 32 for every prompt used here."""
    config = get_config("tiny")
    config = config.replace(decoder=config.decoder.updated(tie_heads=False))
    hf = build_hf_model(config, seed=1)
    return hf, fms_from_hf(hf, config), config


@pytest.fixture(scope="module")
def processor():
    config = get_config("tiny")
    return GraniteSpeechProcessor(build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index))


# -- config and constructor ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, {"lora": None}, {"fused_weights": False},
                                     {"lora": LoRAConfig(rank=2, alpha=3.0, target_modules=("q_proj", "down_proj"))}])
def test_config_round_trips_through_fms_save_and_load(tmp_path, changes):
    config = get_config("tiny").replace(**changes)
    config.save(tmp_path / "config.json")
    loaded = GraniteSpeechConfig.load(tmp_path / "config.json")
    assert loaded == config and loaded.as_dict() == config.as_dict()
    for name in ("encoder", "projector", "decoder"):
        assert type(getattr(loaded, name)) is type(getattr(config, name))
    assert loaded.lora is None if config.lora is None else isinstance(loaded.lora, LoRAConfig)


def test_config_from_as_dict_and_updated_validate_like_construction():
    config = get_config("tiny")
    assert GraniteSpeechConfig(**config.as_dict()) == config  # nested dicts become their dataclasses
    bigger = config.updated(decoder={"nlayers": 2}, lora={"alpha": 8.0})
    assert bigger.decoder.nlayers == 2 and bigger.lora.alpha == 8.0 and config.decoder.nlayers == 4
    with pytest.raises(ValueError, match="audio_token_index"):
        config.updated(audio_token_index=10_000)
    with pytest.raises(TypeError, match=r"unknown Granite Speech config fields \['nlayer'\]"):
        config.updated(nlayer=2)


def test_constructor_merges_kwargs_into_a_copy():
    config = get_config("tiny")
    model = GraniteSpeech(config, lora=None, decoder={"nlayers": 2})
    assert model.get_config() is not config and config.lora is not None and config.decoder.nlayers == 4
    assert model.config.lora is None and len(model.decoder.base_model.layers) == 2
    plain = GraniteSpeech(config)
    assert plain.get_config() is not config and plain.get_config() == config
    with torch.device("meta"):
        assert isinstance(GraniteSpeech(), GraniteSpeech)  # config=None: the 3.3-2b architecture
        assert GraniteSpeech().config == get_config("3.3-2b")


# -- fused and unfused weights -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(build_hf_model(get_config("tiny"), seed=4), tmp_path_factory.mktemp("ckpt"))


def _logits(model, inputs):
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"])


def _adapter_cycle(model, inputs):
    on = _logits(model, inputs)
    model.set_adapter(False)
    off = _logits(model, inputs)
    model.set_adapter(True)
    assert torch.equal(_logits(model, inputs), on)
    return on, off


def test_fused_and_unfused_layouts_give_the_same_logits_with_and_without_the_adapter(checkpoint, processor):
    inputs = processor([PROMPT], audio=[shipped_audio("fox")])
    fused = fgs.get_model("tiny", model_path=checkpoint)
    unfused = get_model("granite_speech", "tiny", model_path=str(checkpoint), source="hf", fused_weights=False)
    strict = fgs.load_checkpoint(checkpoint, fused_weights=False)
    assert hasattr(fused.decoder.base_model.layers[0].attn.in_proj, "qkv_fused")
    for model in (unfused, strict):
        block = model.decoder.base_model.layers[0]
        assert hasattr(block.attn.in_proj, "query") and hasattr(block.ff_sub_layer, "wg")
        assert model.config.decoder.fused_weights is False
    want_on, want_off = _adapter_cycle(fused, inputs)
    assert not torch.equal(want_on, want_off)  # the adapter matters
    for model in (unfused, strict):
        on, off = _adapter_cycle(model, inputs)
        torch.testing.assert_close(on, want_on, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(off, want_off, rtol=1e-6, atol=1e-6)
    # FMS's unfuse helper on a loaded, merged model: the adapter still toggles exactly, the logits stay the same
    after = apply_unfuse_weights(fgs.load_checkpoint(checkpoint))
    assert hasattr(after.decoder.base_model.layers[0].attn.in_proj, "query")
    on, off = _adapter_cycle(after, inputs)
    torch.testing.assert_close(on, want_on, rtol=1e-6, atol=1e-6)  # split matmuls round differently from fused
    torch.testing.assert_close(off, want_off, rtol=1e-6, atol=1e-6)
    # the parity map names real modules on both layouts
    from parity.pathmap import check_completeness

    check_completeness(build_hf_model(get_config("tiny")), get_config("tiny"), after)


def test_unfused_state_dict_round_trip_merges_the_adapter_once(checkpoint, processor):
    inputs = processor([PROMPT], audio=[shipped_audio("transcribe")])
    model = fgs.load_checkpoint(checkpoint, fused_weights=False)
    want = _logits(model, inputs)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = GraniteSpeech(model.config)
    fresh.load_state_dict(sd)
    fresh.post_init()
    assert torch.equal(_logits(fresh, inputs), want)


# -- FMS's own generate with audio ----------------------------------------------------------------------------------


def _fms_generate(model, inputs, new=NEW):
    rows = [ids[mask != 0] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    ids, padding = pad_input_ids(rows, pad_token_id=0, padding_side="left")
    audio = {k: inputs[k] for k in ("input_features", "input_features_mask") if k in inputs}
    with torch.no_grad():
        return generate(model, ids, max_seq_len=ids.shape[1] + new, max_new_tokens=new, do_sample=False,
                        use_cache=True, prepare_model_inputs_hook=model.prepare_inputs_for_generation,
                        extra_kwargs={**padding, **audio})[:, -new:]


def _hf_generate(hf, inputs, new=NEW):
    with torch.no_grad():
        return hf.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)[:, -new:]


@pytest.mark.parametrize("clips", [["fox"], ["ships", "transcribe"], []], ids=["one_clip", "mixed_batch", "text"])
def test_fms_generate_with_the_model_hook_is_token_identical_to_hf(untied, processor, clips):
    hf, fms, _ = untied
    if clips:
        inputs = processor([PROMPT] * len(clips), audio=[shipped_audio(c) for c in clips])
    else:
        inputs = processor([TEXT])
    want = _hf_generate(hf, inputs)
    got = _fms_generate(fms, inputs)
    assert torch.equal(got, want)
    assert all(len(set(row.tolist())) >= 8 for row in want)  # a continuation that varies proves something
    assert fms.adapter_enabled is bool(clips)  # set as HF's generate sets it: on with audio, off for text
    fms.set_adapter(True)


def test_fms_generate_encodes_the_audio_once(untied, processor):
    _, fms, _ = untied
    inputs = processor([PROMPT] * 2, audio=[shipped_audio("fox"), shipped_audio("ships")])
    calls = []
    handle = fms.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        _fms_generate(fms, inputs, new=5)
    finally:
        handle.remove()
    assert calls == [2]  # one encoder call, for both clips of the batch


def test_generate_without_the_hook_is_a_clear_error(untied, processor):
    _, fms, _ = untied
    inputs = processor([PROMPT], audio=[shipped_audio("fox")])
    with pytest.raises(ValueError, match="prepare_model_inputs_hook=model.prepare_inputs_for_generation"):
        generate(fms, inputs["input_ids"], max_new_tokens=3, do_sample=False, use_cache=True,
                 extra_kwargs={"input_features": inputs["input_features"],
                               "input_features_mask": inputs["input_features_mask"]})


# -- the whole forward compiles ----------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.slow  # inductor compiles the whole forward three times over: about a minute on 2 cores
def test_whole_forward_compiles_to_one_graph_and_new_lengths_add_none(untied, processor):
    _, fms, _ = untied
    clips = [processor([PROMPT], audio=[shipped_audio(c)]) for c in ("fox", "ships", "transcribe")]
    assert len({c["input_features"].shape[1] for c in clips}) == 3
    eager = [_logits(fms, c) for c in clips]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fms, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for inputs, want in zip(clips, eager):
            got = compiled(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"])
            assert torch.equal(got, want)
            assert counters["stats"]["unique_graphs"] == 1  # two more clip lengths, no new graph
    assert not counters["graph_break"]
    # the project's helper: same single graph, with the host-value checks run eagerly before the compiled call
    torch._dynamo.reset()
    counters.clear()
    compile_model(fms, whole=True, backend="eager")
    try:
        for inputs, want in zip(clips, eager):
            assert torch.equal(_logits(fms, inputs), want)
        assert counters["stats"]["unique_graphs"] == 1
        ids = clips[0]["input_ids"]
        bad = dict(clips[0], input_ids=ids.masked_fill(ids == fms.config.audio_token_index, 5))
        with pytest.raises(ValueError, match=r"the prompt has 0 <\|audio\|> tokens"):
            _logits(fms, bad)  # checked eagerly, before the compiled graph (which would not notice)
    finally:
        uncompile([fms])
        torch._dynamo.reset()
    reports = explain_graph_breaks(fms, type("I", (), {k: v for k, v in clips[0].items()})())
    assert [r.piece for r in reports] == ["forward", "encoder", "projector", "decoder"]
    assert [(r.graph_count, r.graph_break_count) for r in reports] == [(1, 0)] * 4


# -- the package's shape -------------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n.removeprefix("fms_granite_speech.") for n in names if n.startswith("fms_granite_speech")}


def test_model_and_checkpoint_are_not_in_an_import_circle():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    assert "checkpoint" not in graph["model"] and "registration" not in graph["model"]
    assert "model" not in graph["lora"] and "checkpoint" not in graph["registration"]

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    for module in graph:  # no module imports, directly or through others, one that imports it back
        assert not reaches(module, module), module


def test_no_frame_inspection_and_private_fms_names_only_in_the_compat_module():
    private = ("_getframe", "__adapter_steps", "_get_adapter", "_find_key_neighbors", "_FMS_MODEL_CONFIG_REGISTRY")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_fms_compat.py":
            continue
        text = path.read_text()
        assert not [p for p in private if p in text], path.name


def test_another_fms_version_fails_at_import_with_one_clear_message():
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda d: '1.99.0' if d == 'ibm-fms' else real(d); import fms_granite_speech")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "needs ibm-fms 1.13.1 but 1.99.0 is installed" in last and "pip install ibm-fms==1.13.1" in last


def test_config_dataclasses_have_real_annotations():
    for cls in (GraniteSpeechConfig, fgs.EncoderConfig, fgs.ProjectorConfig, LoRAConfig):
        assert all(not isinstance(f.type, str) for f in dataclasses.fields(cls)), cls.__name__
