"""The parity engine on the tiny model: FMS matches HF layer by layer, and a planted bug is located."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from parity.compare import ParityResult, recheck, run_parity
from parity.metrics import Tolerance, default_tolerance
from parity.pair import build_inputs, build_pair
from parity.pathmap import UnknownLayerError, expand
from parity.report import render_markdown, write_report


@pytest.fixture(scope="module")
def full(pair, inputs):
    """Every layer of the model, encoder to logits."""
    return run_parity(pair, inputs)


def _perturbed(pair, prefix: str, amount: float = 1e-2):
    """A copy of the pair whose FMS model has the first parameter under ``prefix`` nudged at one element."""
    fms = copy.deepcopy(pair.fms)
    name, param = next((n, p) for n, p in fms.named_parameters() if n.startswith(prefix + "."))
    with torch.no_grad():
        param.view(-1)[0] += amount
    return dataclasses.replace(pair, fms=fms), name


def test_inputs_are_real_audio_and_prompt(pair, inputs):
    assert inputs.input_features.shape[-1] == 160
    n_audio = int((inputs.input_ids == pair.config.audio_token_index).sum())
    assert n_audio == int(inputs.input_features_mask.sum()) > 0


def test_every_encoder_block_passes_in_float32(pair, inputs):
    result = run_parity(pair, inputs, "encoder")
    assert result.sections == ["features", "encoder"]  # the input pipelines, then only the encoders
    assert [r.name for r in result.layers] == [p.name for p in expand(pair.config)
                                               if p.section in ("features", "encoder")]
    for i in range(pair.config.encoder.num_layers):
        r = result.layer(f"encoder.blocks.{i}")
        assert r.diff.rel_l2 <= 1e-5, (r.name, r.diff.rel_l2)
        assert r.passed, r.reason
        assert r.diff.tolerance == default_tolerance(torch.float32)
    assert result.first_divergent is None
    assert result.passed


def test_full_model_passes_every_layer(pair, full):
    assert full.sections == ["features", "encoder", "projector", "decoder"]
    assert len(full.layers) == len(expand(pair.config))
    failing = [(r.name, r.reason) for r in full.layers if not r.passed]
    assert failing == []
    assert full.first_divergent is None
    logits = full.layer("logits")
    assert logits.pair.transform == "logits_scaling"
    assert logits.diff.shape[-1] == pair.config.decoder.src_vocab_size
    assert any("logits_scaling" in n and "does not" in n for n in full.notes)
    assert any("LoRA adapter enabled" in n for n in full.notes)


def test_logits_deviation_is_real(pair, inputs):
    # the transform is not decoration: without it the FMS logits are HF's divided by logits_scaling
    with torch.no_grad():
        hf = pair.hf(input_ids=inputs.input_ids, input_features=inputs.input_features,
                     input_features_mask=inputs.input_features_mask).logits
        fms = pair.fms(inputs.input_ids, input_features=inputs.input_features,
                       input_features_mask=inputs.input_features_mask)
    scale = pair.config.decoder.logits_scaling
    assert not torch.allclose(fms, hf, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fms * scale, hf, rtol=1e-4, atol=1e-4)


def test_planted_conv_bug_is_located(pair, inputs):
    bad, name = _perturbed(pair, "encoder.blocks.5.conv")
    result = run_parity(bad, inputs, "encoder.blocks.5")
    assert result.first_divergent == "encoder.blocks.5.conv", name
    assert result.layer("encoder.blocks.5.conv").introduces  # its own computation, not an inherited error
    names = [r.name for r in result.layers]
    before = names[: names.index("encoder.blocks.5.conv")]
    assert "encoder.blocks.4" in before and "encoder.blocks.5.attn" in before
    assert all(result.layer(n).passed for n in before)
    assert not result.passed
    assert not result.layer("encoder.blocks.5").passed
    # the perturbation lives in the copy only
    original = dict(pair.fms.named_parameters())[name]
    assert not torch.equal(original, dict(bad.fms.named_parameters())[name])


def test_planted_decoder_bug_is_located(pair, inputs):
    bad, _ = _perturbed(pair, "decoder.base_model.layers.2.ff_sub_layer", amount=0.5)
    result = run_parity(bad, inputs, "logits")
    assert result.first_divergent == "decoder.layers.2.mlp"
    names = [r.name for r in result.layers]
    assert all(result.layer(n).passed for n in names[: names.index("decoder.layers.2.mlp")])


def test_projector_layer_runs_encoder_and_projector(pair, inputs):
    result = run_parity(pair, inputs, "projector.layers.1.cross_attn")
    assert result.sections == ["features", "encoder", "projector"]
    assert result.requested == ["projector.layers.1.cross_attn"]
    assert not any(r.name.startswith("decoder") or r.name == "logits" for r in result.layers)
    assert result.passed


def test_unknown_layer(pair, inputs):
    with pytest.raises(UnknownLayerError, match="encoder.blocks.8"):
        run_parity(pair, inputs, "encoder.block.8")


def test_json_round_trip(full):
    text = full.to_json()
    json.loads(text)  # strict JSON
    back = ParityResult.from_json(text)
    assert back.to_dict() == full.to_dict()
    assert back.layer("encoder.blocks.3").diff == full.layer("encoder.blocks.3").diff
    with pytest.raises(ValueError, match="not a parity result"):
        ParityResult.from_json('{"layers": []}')


def test_recheck_without_rerunning(full):
    same = recheck(full, default_tolerance(torch.float32))
    assert [r.passed for r in same.layers] == [r.passed for r in full.layers]
    # a bound below every observed error makes the first layer with any error fail, and says so
    tight = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=0.0, min_cosine=1.0)
    strict = recheck(full, tight)
    first_nonzero = next(r.name for r in full.layers if r.diff.max_abs > 0)
    assert strict.first_divergent == first_nonzero
    assert strict.tolerance == tight.to_dict()
    # loosening the rel-L2 bound past every observed rel-L2 passes everything again, decided exactly
    loose = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=1.0, min_cosine=0.0)
    assert recheck(full, loose).first_divergent is None
    # a bound the saved statistics cannot settle is reported as undetermined, never passed on a guess
    unsure = recheck(full, Tolerance(atol=0.0, rtol=1.0, max_rel_l2=0.0, min_cosine=1.0))
    first = unsure.first_failure()
    assert first is not None and first.reason.startswith("propagated: undetermined")
    assert full.tolerance is None  # the input is not modified


def test_write_report(full, tmp_path):
    json_path, md_path = write_report(full, tmp_path / "rep")
    assert ParityResult.from_json(json_path.read_text()).to_dict() == full.to_dict()
    md = md_path.read_text()
    assert (md_path.parent / "parity-report.png").stat().st_size > 0
    assert md == render_markdown(full, png_name="parity-report.png")
    assert "logits_scaling" in md and "encoder.blocks.15" in md and "Parity report: PASS" in md
    assert "qkv_fused" in md  # exclusions are listed with their reason


def test_lora_state_is_compared(pair, inputs):
    # an FMS model stuck with its adapter off (HF runs with it on, as for audio) diverges at the first attention
    fms = copy.deepcopy(pair.fms)
    fms.set_adapter(False)
    fms.set_adapter = lambda enabled: None
    result = run_parity(dataclasses.replace(pair, fms=fms), inputs, "decoder.layers.0")
    assert result.first_divergent == "decoder.layers.0.attn"
    assert result.layer("decoder.merged_embeddings").passed


def _save_tiny_checkpoint(folder, seed: int = 3):
    """An HF-format tiny checkpoint as transformers + peft write it: base weights, then a non-zero adapter."""
    from transformers import PreTrainedModel

    from fms_granite_speech.config import get_config
    from fms_granite_speech.testing import add_lora_adapter, build_hf_model, lora_weights_are_nontrivial

    config = get_config("tiny")
    hf = build_hf_model(config, seed=seed, lora=False)
    hf.save_pretrained(folder)  # the base model first: saving with an adapter attached writes peft-wrapped names
    add_lora_adapter(hf, config.lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert lora_weights_are_nontrivial(hf)
    PreTrainedModel.save_pretrained(hf, folder)  # with peft loaded: writes adapter_config + adapter_model only


def test_checkpoint_folder_pair(tmp_path):
    _save_tiny_checkpoint(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    ck = build_pair(checkpoint=tmp_path)
    assert ck.checkpoint == str(tmp_path) and ck.variant is None
    assert ck.hf._hf_peft_config_loaded and ck.fms.has_adapter  # both sides carry the adapter
    result = run_parity(ck, build_inputs(ck))
    assert [(r.name, r.reason) for r in result.layers if not r.passed] == []
    assert result.provenance["lora"]["rank"] == ck.config.lora.rank


def test_bad_checkpoint_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_pair(checkpoint=tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        build_pair(checkpoint=tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type='llama', expected one of granite_speech, granite_speech_plus"):
        build_pair(checkpoint=tmp_path)


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="unsupported dtype"):
        build_pair(dtype="int8")
    with pytest.raises(ValueError, match="unknown Granite Speech variant"):
        build_pair("huge")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_pair(device="cuda")


def test_missing_audio_file(pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        build_inputs(pair, tmp_path / "nope.wav")


def test_map_names_real_modules_on_both_sides(pair):
    from parity.pathmap import check_completeness

    check_completeness(pair.hf, pair.config, pair.fms)


def test_text_only_inputs_run_the_decoder_with_the_adapter_off(pair, inputs):
    from parity.pair import ParityInputs

    ids = inputs.input_ids[:, inputs.input_ids[0] != pair.config.audio_token_index]
    text = ParityInputs(input_ids=ids, prompt="text only")  # one set of ids for both: no pipeline rows
    result = run_parity(pair, text, "decoder.layers.1")
    assert result.sections == ["decoder"]
    assert any("LoRA adapter disabled" in n for n in result.notes)
    assert result.passed and result.first_divergent is None
    # the previous adapter states are restored
    assert pair.fms.adapter_enabled
    assert pair.hf.model.language_model.layers[0].self_attn.q_proj.disable_adapters is False
    with pytest.raises(ValueError, match="need audio"):
        run_parity(pair, text, "encoder.blocks.0")


def test_one_transform_implementation():
    """generation uses compare's transform, and recheck uses metrics' verdict rule, so they cannot disagree."""
    import parity.compare
    import parity.generation
    import parity.metrics

    assert parity.generation.apply_transform is parity.compare.apply_transform
    assert parity.compare.recheck_diff is parity.metrics.recheck_diff
    assert not hasattr(parity.compare, "_recheck_diff")


def test_apply_transform_logits_scaling():
    from types import SimpleNamespace

    from parity.compare import apply_transform

    config = SimpleNamespace(decoder=SimpleNamespace(logits_scaling=3.0))
    x = torch.tensor([[1.0, -0.5, 1 / 3]], dtype=torch.bfloat16)
    out = apply_transform("logits_scaling", x, config)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.double() * 3.0).to(torch.bfloat16))  # one rounding, from float64
    assert apply_transform(None, x, config) is x
    with pytest.raises(ValueError, match="unknown transform"):
        apply_transform("nope", x, config)


def test_captures_are_exited_when_one_fails_to_enter():
    from parity.compare import _entered

    log = []

    class Manager:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def __enter__(self):
            if self.fail:
                raise RuntimeError("cannot hook")
            log.append(("enter", self.name))

        def __exit__(self, *exc):
            log.append(("exit", self.name))

    with pytest.raises(RuntimeError):
        with _entered([Manager("a"), Manager("b"), Manager("c", fail=True)]):
            pass
    assert log == [("enter", "a"), ("enter", "b"), ("exit", "b"), ("exit", "a")]
    log.clear()
    with _entered([Manager("a"), Manager("b")]):
        log.append("body")
    assert log == [("enter", "a"), ("enter", "b"), "body", ("exit", "b"), ("exit", "a")]
