"""The preallocated-KV-cache decode step (``fms_granite_speech.static_cache``) against HF's ``generate`` and the eager
FMS path, and its compiled graph count.

Weights: ``tiny`` with an untied head (a tied random head repeats one token, see ``tests/test_generation.py``), seeded
realistic init with non-zero LoRA, so the adapter toggle and the padding mask both show in the tokens. Every expected
token sequence comes from HF's ``GraniteSpeechForConditionalGeneration.generate`` (greedy, float32).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fms_granite_speech.config import get_config
from fms_granite_speech.features import shipped_audio
from fms_granite_speech.generation import transcribe_ids
from fms_granite_speech.processor import GraniteSpeechProcessor
from fms_granite_speech.static_cache import StaticCache, StaticDecoder, generate_static
from fms_granite_speech.testing import build_hf_model, fms_from_hf
from fms_granite_speech.tokenizer_utils import build_test_tokenizer

NEW = 24
PROMPT = "<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech?<|end_of_text|>\n" \
         "<|start_of_role|>assistant<|end_of_role|>"
ASK = "<|start_of_role|>user<|end_of_role|><|audio|>what is said here?<|end_of_text|>\n<|start_of_role|>assistant" \
      "<|end_of_role|>"
TEXT = "<|start_of_role|>user<|end_of_role|>write about the sea.<|end_of_text|>\n<|start_of_role|>assistant" \
       "<|end_of_role|>"


@pytest.fixture(scope="module")
def models():
    config = get_config("tiny")
    config = config.replace(decoder=config.decoder.updated(tie_heads=False))
    hf = build_hf_model(config, seed=1)
    fms = fms_from_hf(hf, config)
    processor = GraniteSpeechProcessor(build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index))
    return hf, fms, processor


def _hf(hf, inputs, new=NEW, eos=None):
    kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")
              if k in inputs}
    with torch.no_grad():
        return hf.generate(**kwargs, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)


def _args(inputs):
    return inputs["input_ids"], inputs.get("input_features"), inputs.get("input_features_mask")


@pytest.mark.parametrize("clips", [("fox",), ("fox", "ships")], ids=["b1", "b2_padded"])
def test_tokens_match_hf_and_eager(models, clips):
    hf, fms, processor = models
    inputs = processor([PROMPT] * len(clips), audio=[shipped_audio(c) for c in clips])
    expected = _hf(hf, inputs)[:, -NEW:]
    assert len(set(expected.flatten().tolist())) >= 6, "the reference repeats too few tokens to test anything"
    static = generate_static(fms, *_args(inputs), attention_mask=inputs["attention_mask"], max_new_tokens=NEW)
    eager = transcribe_ids(fms, *_args(inputs), attention_mask=inputs["attention_mask"], max_new_tokens=NEW)
    assert torch.equal(static[:, -NEW:], expected)
    assert torch.equal(static, eager)


def test_text_only_turns_the_adapter_off(models):
    hf, fms, processor = models
    inputs = processor([TEXT])
    expected = _hf(hf, inputs)[:, -NEW:]
    static = generate_static(fms, inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW)
    assert torch.equal(static[:, -NEW:], expected)
    assert fms.adapter_enabled, "the caller's adapter state is restored"


def test_eos_checked_every_few_steps_still_stops_where_hf_does(models):
    hf, fms, processor = models
    inputs = processor([PROMPT, ASK], audio=[shipped_audio("fox"), shipped_audio("fox")])
    free = _hf(hf, inputs)[:, -NEW:]
    # a token both rows produce, first at steps far apart: one row ends long before the other
    first = [{t: row.tolist().index(t) for t in set(row.tolist())} for row in free]
    common = set(first[0]) & set(first[1])
    assert common, "the two rows share no token; pick other clips"
    eos = max((t for t in common if max(first[0][t], first[1][t]) + 1 < NEW),
              key=lambda t: abs(first[0][t] - first[1][t]))
    ends = sorted((first[0][eos], first[1][eos]))
    assert ends[1] - ends[0] >= 4, ends
    expected = _hf(hf, inputs, eos=eos)
    for check_every in (1, 3, 8):
        static = generate_static(fms, *_args(inputs), attention_mask=inputs["attention_mask"], max_new_tokens=NEW,
                                 eos_token_id=eos, check_every=check_every)
        eager = transcribe_ids(fms, *_args(inputs), attention_mask=inputs["attention_mask"], max_new_tokens=NEW,
                               eos_token_id=eos)
        assert torch.equal(static, eager), check_every
        new = static.shape[1] - inputs["input_ids"].shape[1]
        assert torch.equal(static[:, -new:], expected[:, -new:]), check_every
        assert new == ends[1] + 1, (check_every, new, ends)  # cut after the last row's EOS however late seen


def test_compiled_step_is_one_graph_with_hf_tokens(models):
    """Inductor, fullgraph: the first step compiles one graph; every later step, and a later prompt of another length
    through the same decoder, adds none (dynamo's counters)."""
    hf, fms, processor = models
    torch._dynamo.reset()
    decoder = StaticDecoder(fms, StaticCache.allocate(fms, 1, 128), compile=True)
    for n, clip in enumerate(("fox", "ships")):
        inputs = processor([PROMPT], audio=[shipped_audio(clip)])
        counters.clear()
        out = generate_static(fms, *_args(inputs), max_new_tokens=NEW, decoder=decoder)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == (1 if n == 0 else 0), dict(counters["stats"])
        assert torch.equal(out[:, -NEW:], _hf(hf, inputs)[:, -NEW:]), clip


def test_bad_arguments_are_named(models):
    _, fms, processor = models
    inputs = processor([PROMPT], audio=[shipped_audio("fox")])
    small = StaticDecoder(fms, StaticCache.allocate(fms, 1, 8))
    with pytest.raises(ValueError, match="cache holds"):
        generate_static(fms, *_args(inputs), max_new_tokens=4, decoder=small)
    with pytest.raises(ValueError, match="check_every"):
        generate_static(fms, *_args(inputs), max_new_tokens=4, check_every=0)
    with pytest.raises(ValueError, match="no input_features"):
        generate_static(fms, inputs["input_ids"], max_new_tokens=4)


@pytest.mark.parametrize("limit", [48, 64])
def test_every_generation_that_fits_the_positions_is_accepted_and_the_first_that_does_not_is_refused(models, limit):
    """A prompt of L tokens and n new tokens use L + n - 1 positions (the last token is never fed back): both
    generators accept n = limit - L + 1 with the same tokens, and the static one refuses n + 1 before any forward."""
    hf, fms, processor = models
    fms.config.decoder.max_expected_seq_len, saved = limit, fms.config.decoder.max_expected_seq_len
    try:
        inputs = processor(TEXT)
        length = inputs["input_ids"].shape[1]
        fits = limit - length + 1
        static = generate_static(fms, inputs["input_ids"], max_new_tokens=fits)
        eager = transcribe_ids(fms, inputs["input_ids"], max_new_tokens=fits)
        assert static.shape[1] == limit + 1 and torch.equal(static, eager)
        for n in (fits + 1, fits + 7):
            with pytest.raises(ValueError, match=f"reach position {length + n - 1} but the decoder has {limit} "
                                                 f"positions.*at most {fits} new tokens"):
                generate_static(fms, inputs["input_ids"], max_new_tokens=n)
    finally:
        fms.config.decoder.max_expected_seq_len = saved
