"""Generation with the KV cache (``fms_granite_speech.generation``), its CLI, and generation parity.

Every expectation comes from the HF reference: ``GraniteSpeechForConditionalGeneration.generate`` (greedy) with the
same weights (seeded realistic random weights, non-zero LoRA attached with peft, so HF's ``generate`` toggles it).

Two weight sets: the ``tiny`` variant as configured (tied head), and the same with an untied head. Random models
with a tied head fall into repeating one token (the last hidden state is dominated by the current token's embedding,
and a tied head then scores that token highest), so a token comparison on them would miss a cache or position bug
that changes everything but the argmax; with an untied head the greedy tokens vary from step to step. Per-step
logits are compared as well (``compare_generation``), which catches what tokens cannot.
"""

from __future__ import annotations

import json

import pytest
import torch

from fms_granite_speech.config import get_config
from fms_granite_speech.features import shipped_audio
from fms_granite_speech.generation import build_prompt, transcribe, transcribe_ids
from fms_granite_speech.processor import GraniteSpeechProcessor
from fms_granite_speech.testing import build_hf_model, fms_from_hf, lora_weights_are_nontrivial, write_hf_checkpoint
from fms_granite_speech.tokenizer_utils import build_test_tokenizer
from parity.generation import GenerationParity, compare_generation, format_table
from parity.metrics import compare_tensors

NEW = 32
PROMPT = "<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech?<|end_of_text|>\n" \
         "<|start_of_role|>assistant<|end_of_role|>"
TEXT_PROMPT = "<|start_of_role|>user<|end_of_role|>please write a sentence about the sea.<|end_of_text|>\n" \
              "<|start_of_role|>assistant<|end_of_role|>"


def _pair(config, seed=0):
    hf = build_hf_model(config, seed=seed)
    assert lora_weights_are_nontrivial(hf)
    return hf, fms_from_hf(hf, config)


@pytest.fixture(scope="module")
def untied():
    config = get_config("tiny")
    config = config.replace(decoder=config.decoder.updated(tie_heads=False))
    return (*_pair(config), config)


@pytest.fixture(scope="module")
def tied():
    config = get_config("tiny")
    return (*_pair(config), config)


@pytest.fixture(scope="module")
def processor():
    config = get_config("tiny")
    return GraniteSpeechProcessor(build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index))


def _audio_inputs(processor, *clips):
    return processor([PROMPT] * len(clips), audio=[shipped_audio(c) for c in clips])


def _hf_generate(hf, inputs, new=NEW, eos=None):
    kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")
              if k in inputs}
    with torch.no_grad():
        return hf.generate(**kwargs, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)


def _fms_generate(fms, inputs, new=NEW, **kw):
    return transcribe_ids(fms, inputs["input_ids"], inputs.get("input_features"), inputs.get("input_features_mask"),
                          attention_mask=inputs["attention_mask"], max_new_tokens=new, **kw)


# -- token identity with HF generate ---------------------------------------------------------------------------------


def test_single_clip_greedy_matches_hf(untied, processor):
    hf, fms, _ = untied
    inputs = _audio_inputs(processor, "fox")
    want = _hf_generate(hf, inputs)
    got = _fms_generate(fms, inputs)
    assert want.shape == (1, inputs["input_ids"].shape[1] + NEW)
    assert len(set(want[0, -NEW:].tolist())) > 5  # the comparison is not a repeated token
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_of_two_clip_lengths_matches_hf(untied, processor):
    hf, fms, _ = untied
    inputs = _audio_inputs(processor, "ships", "transcribe")
    assert (inputs["attention_mask"] == 0).any()  # different lengths: one row is left-padded
    want = _hf_generate(hf, inputs)
    got = _fms_generate(fms, inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want[0, -NEW:], want[1, -NEW:])


def test_text_only_matches_hf_with_adapter_off(untied, processor):
    hf, fms, _ = untied
    inputs = processor([TEXT_PROMPT])
    assert fms.adapter_enabled
    want = _hf_generate(hf, inputs)  # HF's generate disables the adapter: no input_features
    got = _fms_generate(fms, inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(set(want[0, -NEW:].tolist())) > 3
    assert fms.adapter_enabled  # restored after text-only generation

    # The adapter state matters: with it on, the same text prompt gives different logits, on both sides alike.
    ids, scale = inputs["input_ids"], fms.config.decoder.logits_scaling
    with torch.no_grad():
        on = fms(ids) * scale
        fms.set_adapter(False)
        off = fms(ids) * scale
        fms.set_adapter(True)
        hf.enable_adapters()
        hf_on = hf(input_ids=ids).logits
        hf.disable_adapters()
        hf_off = hf(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-2 * off.abs().max()  # far above float32 rounding
    assert compare_tensors(on, hf_on).passed and compare_tensors(off, hf_off).passed


def test_eos_ends_rows_like_hf(untied, processor):
    """A row that ends is padded while the other goes on; generation stops when both ended (HF's rule)."""
    hf, fms, _ = untied
    inputs = _audio_inputs(processor, "ships", "transcribe")
    free = _hf_generate(hf, inputs)[:, -NEW:].tolist()
    # An EOS id that row 0 emits for the first time at some step s >= 2, and row 1 not up to step s + 1.
    s = next(s for s in range(2, NEW - 2) if free[0][s] not in free[0][:s] and free[0][s] not in free[1][:s + 2])
    eos = free[0][s]
    want = _hf_generate(hf, inputs, eos=eos)
    got = _fms_generate(fms, inputs, eos_token_id=eos)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    new = want[:, inputs["input_ids"].shape[1]:]
    assert new.shape[1] > s + 1 and (new[0, s + 1:] == 0).all()  # row 0 padded after its EOS, row 1 went on


# -- mechanics ---------------------------------------------------------------------------------------------------------


def test_audio_encoded_once_and_one_forward_per_token(tied, processor):
    _, fms, _ = tied
    inputs = _audio_inputs(processor, "fox")
    calls = {"encoder": 0, "model": 0}
    hooks = [fms.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)),
             fms.register_forward_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))]
    try:
        out = _fms_generate(fms, inputs, new=6)
    finally:
        for h in hooks:
            h.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert calls == {"encoder": 1, "model": 6}


def test_sampling_is_reproducible_and_leaves_global_rng(untied, processor):
    _, fms, _ = untied
    inputs = _audio_inputs(processor, "fox")
    state = torch.get_rng_state()
    a = _fms_generate(fms, inputs, new=12, do_sample=True, temperature=1.5, top_k=40, seed=7)
    b = _fms_generate(fms, inputs, new=12, do_sample=True, temperature=1.5, top_k=40, seed=7)
    c = _fms_generate(fms, inputs, new=12, do_sample=True, temperature=1.5, top_k=40, seed=8)
    greedy = _fms_generate(fms, inputs, new=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, greedy)


def test_right_padding_is_repacked_left(tied, processor):
    _, fms, _ = tied
    left = _audio_inputs(processor, "ships", "transcribe")
    ids, mask = left["input_ids"], left["attention_mask"]
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for r in range(ids.shape[0]):
        real = ids[r][mask[r] != 0]
        right_ids[r, : len(real)], right_mask[r, : len(real)] = real, 1
    a = _fms_generate(fms, left, new=5)
    b = _fms_generate(fms, {**left, "input_ids": right_ids, "attention_mask": right_mask}, new=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("case, error", [
    ("features_without_audio_tokens", "no audio token"),
    ("audio_tokens_without_features", "no input_features"),
    ("mask_without_features", "without input_features"),
    ("middle_padding", "padding in the middle"),
    ("zero_new_tokens", "max_new_tokens"),
    ("bad_temperature", "temperature"),
    ("one_dim_ids", "[B, L]"),
])
def test_bad_input_is_a_clear_error(tied, processor, case, error):
    _, fms, _ = tied
    audio = _audio_inputs(processor, "fox")
    text = processor([TEXT_PROMPT])
    ids, feats, fmask = audio["input_ids"], audio["input_features"], audio["input_features_mask"]
    calls = {
        "features_without_audio_tokens": lambda: transcribe_ids(fms, text["input_ids"], feats),
        "audio_tokens_without_features": lambda: transcribe_ids(fms, ids),
        "mask_without_features": lambda: transcribe_ids(fms, text["input_ids"], None, fmask),
        "middle_padding": lambda: transcribe_ids(
            fms, text["input_ids"], attention_mask=torch.tensor([[1, 1, 0] + [1] * (text["input_ids"].shape[1] - 3)])),
        "zero_new_tokens": lambda: transcribe_ids(fms, text["input_ids"], max_new_tokens=0),
        "bad_temperature": lambda: transcribe_ids(fms, text["input_ids"], do_sample=True, temperature=0.0),
        "one_dim_ids": lambda: transcribe_ids(fms, text["input_ids"][0]),
    }
    with pytest.raises(ValueError, match=__import__("re").escape(error)):
        calls[case]()
    assert fms.adapter_enabled


# -- text level --------------------------------------------------------------------------------------------------------


def test_transcribe_decodes_transcribe_ids(untied, processor, capsys):
    _, fms, _ = untied
    clips = [shipped_audio("fox"), shipped_audio("transcribe")]
    texts = transcribe(fms, processor, clips, max_new_tokens=6, eos_token_id=None, progress=True)
    tok = processor.tokenizer
    prompt = build_prompt(tok)
    assert prompt.count("<|audio|>") == 1 and prompt.endswith("<|start_of_role|>assistant<|end_of_role|>")
    want = []
    for clip in clips:  # batch_size 1: each clip alone
        inputs = processor([prompt], audio=[clip])
        out = _fms_generate(fms, inputs, new=6)
        want.append(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert texts == want and all(texts)
    assert "tok" in capsys.readouterr().err  # the tqdm bar went to stderr

    batched = transcribe(fms, processor, clips, max_new_tokens=6, eos_token_id=None, batch_size=2)
    inputs = processor([prompt] * 2, audio=clips)  # one padded batch
    out = _fms_generate(fms, inputs, new=6)[:, inputs["input_ids"].shape[1]:]
    assert batched == [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


# -- parity ------------------------------------------------------------------------------------------------------------


def test_compare_generation_honest_pair(tied, processor):
    hf, fms, config = tied
    inputs = _audio_inputs(processor, "ships", "transcribe")
    result = compare_generation(hf, fms, inputs, max_new_tokens=NEW)
    assert result.divergence is None and result.row_first_divergence == [None, None]
    assert result.passed and len(result.steps) == NEW and result.adapter == "on"
    assert all(s.rel_l2 < 1e-5 for s in result.steps)
    want = _hf_generate(hf, inputs)[:, -NEW:].tolist()
    assert result.hf_tokens == want == result.fms_tokens
    assert result.logits_scaling == config.decoder.logits_scaling
    again = GenerationParity.from_json(result.to_json())
    assert again.to_dict() == result.to_dict()
    table = format_table(result, tokenizer=processor.tokenizer)
    assert "tokens identical" in table and "logits_scaling" in table


def test_compare_generation_finds_planted_divergence(untied, processor):
    hf, fms, _ = untied
    inputs = _audio_inputs(processor, "fox")
    with torch.no_grad():
        ref = hf.generate(**{k: inputs[k] for k in inputs}, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = ref.sequences[0, -NEW:].tolist()
    logits = [lg[0] for lg in ref.logits]
    # Zeroing FMS head row t sets logit t to 0 at every step. Pick a step k whose token t is new (not chosen before)
    # where every earlier step's winner has a positive logit (so it still wins) and the runner-up at k is positive
    # (so it wins at k instead of t).
    k = next(k for k in range(3, NEW) if tokens[k] not in tokens[:k]
             and all(logits[j].max() > 0 for j in range(k)) and logits[k].topk(2).values[1] > 0)
    t = tokens[k]
    runner_up = int(logits[k].topk(2).indices[1])
    head = fms.decoder.head.weight
    saved = head.detach()[t].clone()
    with torch.no_grad():
        head[t] = 0
    try:
        result = compare_generation(hf, fms, inputs, max_new_tokens=NEW)
    finally:
        with torch.no_grad():
            head[t] = saved
    d = result.divergence
    assert (d.row, d.step, d.hf_token, d.fms_token) == (0, k, t, runner_up)
    assert result.fms_tokens[0][:k] == tokens[:k] and result.hf_tokens[0] == tokens
    assert d.kind == "logits-mismatch" and not result.passed
    assert [tok for tok, _ in d.hf_top][:2] == [t, runner_up] and d.fms_top[0][0] == runner_up
    assert d.hf_margin == pytest.approx(float(logits[k][t] - logits[k][runner_up]) / result.logits_scaling, rel=1e-5)
    json.dumps(result.to_dict(), allow_nan=False)
    assert f"step {k}" in format_table(result)


def test_parity_generate_cli(capsys):
    from parity.cli import main

    assert main(["generate", "--text-only", "--max-new-tokens", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "adapter off" in out and "tokens identical" in out
    assert main(["generate", "--audio", "/no/such.wav"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1


# -- granite-speech CLI ------------------------------------------------------------------------------------------------


def test_cli_tiny_and_checkpoint_agree(tmp_path, capsys):
    from fms_granite_speech.cli import main

    clip = str(shipped_audio("fox"))
    assert main(["transcribe", clip, "--variant", "tiny", "--seed", "3", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "meaningless" in out[0] and len(out) == 2 and out[1]  # special tokens shown for random weights
    config = get_config("tiny")
    folder = write_hf_checkpoint(build_hf_model(config, seed=3), tmp_path / "ckpt")
    build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index).save_pretrained(folder)
    assert main(["transcribe", clip, clip, "--checkpoint", str(folder), "--max-new-tokens", "5",
                 "--special-tokens", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{clip}: {out[1]}"] * 2  # same weights, same text


@pytest.mark.parametrize("argv, error", [
    (["transcribe", "/no/such.wav", "--variant", "tiny"], "audio file not found"),
    (["transcribe", "CLIP", "--variant", "huge"], "invalid choice: 'huge'"),
    (["transcribe", "CLIP"], "--checkpoint"),
    (["transcribe", "CLIP", "--checkpoint", "/no/such/dir"], "checkpoint folder not found"),
    (["transcribe", "CLIP", "--checkpoint", "TMP"], "no tokenizer"),
    (["transcribe", "CLIP", "--variant", "tiny", "--max-new-tokens", "0"], "max-new-tokens"),
])
def test_cli_errors_are_one_line(argv, error, tmp_path, capsys):
    from fms_granite_speech.cli import main

    argv = [str(shipped_audio("fox")) if a == "CLIP" else str(tmp_path) if a == "TMP" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert error in err and len(err.splitlines()) == 1


def test_transcribe_when_the_tokenizer_pads_wider_than_the_prompt(untied, processor):
    """A tokenizer built with pad_to_multiple_of pads every prompt wider than its longest real row; the text must
    still be the generated tokens (transcribe_ids re-packs the prompt to its longest real row)."""
    import copy

    _, fms, _ = untied
    wide = copy.deepcopy(processor)
    wide.tokenizer.init_kwargs["pad_to_multiple_of"] = 64
    clip = shipped_audio("fox")
    prompt = build_prompt(wide.tokenizer)
    padded = wide([prompt], audio=[clip])
    assert padded["input_ids"].shape[1] > int(padded["attention_mask"].sum())  # really padded wider
    want = transcribe(fms, processor, [clip], max_new_tokens=6, eos_token_id=None)
    assert want[0]
    assert transcribe(fms, wide, [clip], max_new_tokens=6, eos_token_id=None) == want


def test_transcribe_takes_a_numpy_waveform(untied, processor):
    from fms_granite_speech.features import load_wav

    _, fms, _ = untied
    wave = load_wav(shipped_audio("fox"))[0][0]
    want = transcribe(fms, processor, shipped_audio("fox"), max_new_tokens=4, eos_token_id=None)
    assert transcribe(fms, processor, wave.numpy(), max_new_tokens=4, eos_token_id=None) == want


# -- each fact checked once ------------------------------------------------------------------------------------------


def test_the_prompt_is_checked_once_on_every_path(tied, processor, monkeypatch):
    """One input check (``GraniteSpeech.check_inputs``) serves the forward, the merge and both generators: the
    audio-token count of a prompt is counted once per call, whichever entry point takes it; a direct call of the
    merge checks its own arguments."""
    from fms_granite_speech import model as model_module
    from fms_granite_speech.static_cache import generate_static

    _, fms, _ = tied
    audio = _audio_inputs(processor, "fox")
    ids, feats, fmask = audio["input_ids"], audio["input_features"], audio["input_features_mask"]
    counts = {"check_inputs": 0, "merge": 0}
    real_check, real_merge = model_module.GraniteSpeech.check_inputs, model_module._check_merge

    def check_inputs(self, *args, **kwargs):
        if kwargs.get("input_ids", args[0] if args else None).shape[1] > 1:  # prompts (decode steps are L = 1)
            counts["check_inputs"] += 1
        return real_check(self, *args, **kwargs)

    def check_merge(*args):
        counts["merge"] += 1
        return real_merge(*args)

    monkeypatch.setattr(model_module.GraniteSpeech, "check_inputs", check_inputs)
    monkeypatch.setattr(model_module, "_check_merge", check_merge)
    calls = {
        "forward": lambda: fms(ids, input_features=feats, input_features_mask=fmask),
        "embed_inputs": lambda: fms.embed_inputs(ids, feats, fmask),
        "transcribe_ids": lambda: transcribe_ids(fms, ids, feats, fmask, max_new_tokens=3),
        "generate_static": lambda: generate_static(fms, ids, feats, fmask, max_new_tokens=3),
    }
    with torch.no_grad():
        for name, call in calls.items():
            counts.update(check_inputs=0, merge=0)
            call()
            assert counts == {"check_inputs": 1, "merge": 0}, name
        counts.update(check_inputs=0, merge=0)
        embeds = fms.decoder.base_model.embedding(ids.masked_fill(ids == fms.config.audio_token_index, 0))
        fms.merge_audio_embeddings(ids, embeds, fms.get_audio_embeddings(feats), fmask)
        assert counts == {"check_inputs": 0, "merge": 1}
