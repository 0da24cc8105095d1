"""fms_granite_speech.processor against transformers' GraniteSpeechProcessor (built directly, no hub).

Both processors get the very same tokenizer (``build_test_tokenizer``, a real ``PreTrainedTokenizerFast``); HF's gets
HF's feature extractor, ours gets ours. ``input_ids``, ``attention_mask``, ``input_features`` and
``input_features_mask`` must be exactly equal (same dtype, shape and values) for single clips, batches of different
lengths on both padding sides, several clips in one prompt, text-only prompts and random prompts. Inputs HF accepts
silently but a model cannot use must raise ValueError naming the problem and the fix.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.granite_speech.feature_extraction_granite_speech import (
    GraniteSpeechFeatureExtractor as HFExtractor,
)
from transformers.models.granite_speech.processing_granite_speech import GraniteSpeechProcessor as HFProcessor

from fms_granite_speech.config import get_config
from fms_granite_speech.features import audio_token_count, load_wav, shipped_audio
from fms_granite_speech.processor import GraniteSpeechProcessor, InvalidTextError
from fms_granite_speech.tokenizer_utils import TEST_WORDS, build_test_tokenizer

TINY = get_config("tiny")
KEYS = ("input_ids", "attention_mask", "input_features", "input_features_mask")
PROMPT = "<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech into a written format?"


@pytest.fixture(scope="module", params=["left", "right"])
def pair(request):
    """(ours, HF's) processors sharing one tiny-vocab tokenizer padded on the given side."""
    tok = build_test_tokenizer(TINY.decoder.src_vocab_size, TINY.audio_token_index, padding_side=request.param)
    return GraniteSpeechProcessor(tok), HFProcessor(audio_processor=HFExtractor(), tokenizer=tok)


@pytest.fixture(scope="module")
def ours():
    return GraniteSpeechProcessor(build_test_tokenizer(TINY.decoder.src_vocab_size, TINY.audio_token_index))


@pytest.fixture(scope="module")
def clips():
    """The shipped clips as 1-D float32 tensors: fox 55015, ships 100711, transcribe 40971 samples."""
    return {name: load_wav(shipped_audio(name))[0][0] for name in ("fox", "ships", "transcribe")}


def _assert_same(got, ref, keys=KEYS):
    assert set(got) == set(keys)
    for key in keys:
        assert got[key].dtype == ref[key].dtype, key
        assert got[key].shape == ref[key].shape, key
        assert torch.equal(got[key], ref[key]), key


def _both(pair, text, audio=None):
    ours, hf = pair
    got = ours(text, audio)
    ref = hf(text=text, audio=audio, return_tensors="pt")
    _assert_same(got, ref, KEYS if audio is not None else KEYS[:2])
    return got


def test_one_prompt_one_clip(pair, clips):
    got = _both(pair, PROMPT, [clips["fox"]])
    n = audio_token_count(clips["fox"].numel())
    assert int((got["input_ids"] == TINY.audio_token_index).sum()) == n == int(got["input_features_mask"].sum())
    assert got["input_ids"].shape[0] == 1 and bool(got["attention_mask"].all())


def test_batch_of_two_clips_of_different_lengths(pair, clips):
    texts = [PROMPT, "<|audio|> what is said in this audio ?"]
    audio = [clips["transcribe"], clips["ships"]]  # the short clip first, so its prompt is the padded one
    got = _both(pair, texts, audio)
    counts = [audio_token_count(a.numel()) for a in audio]
    assert (got["input_ids"] == TINY.audio_token_index).sum(dim=1).tolist() == counts
    assert got["input_features_mask"].sum(dim=1).tolist() == counts
    assert not bool(got["attention_mask"].all())  # padding really happened, on the tokenizer's side
    pad_col = 0 if pair[0].tokenizer.padding_side == "left" else -1
    assert got["attention_mask"][0, pad_col] == 0


def test_two_placeholders_in_one_prompt(pair, clips):
    text = "compare <|audio|> with <|audio|> please"
    got = _both(pair, text, [clips["fox"], clips["transcribe"]])
    ids = got["input_ids"][0].tolist()
    first, second = audio_token_count(clips["fox"].numel()), audio_token_count(clips["transcribe"].numel())
    start = ids.index(TINY.audio_token_index)
    # clip order is placeholder order: fox's run, then one text token ("with"), then transcribe's run
    assert ids[start : start + first] == [TINY.audio_token_index] * first
    assert ids[start + first] != TINY.audio_token_index
    assert ids[start + first + 1 : start + first + 1 + second] == [TINY.audio_token_index] * second


def test_placeholders_are_matched_to_clips_in_order_across_the_batch(pair, clips):
    texts = ["<|audio|> and <|audio|>", "then <|audio|>"]
    audio = [clips["transcribe"], clips["ships"], clips["fox"]]
    got = _both(pair, texts, audio)
    counts = [audio_token_count(a.numel()) for a in audio]
    assert (got["input_ids"] == TINY.audio_token_index).sum(dim=1).tolist() == [counts[0] + counts[1], counts[2]]


@pytest.mark.parametrize("text", ["the quick brown fox", ["hello world", "can you transcribe the speech ?"]])
def test_text_only(pair, text):
    got = _both(pair, text)
    assert (got["input_ids"] != TINY.audio_token_index).all()


def test_two_dimensional_audio_batch(pair):
    audio = 0.1 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(1))
    _both(pair, ["<|audio|> a", "b <|audio|>"], audio)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_prompts_and_lengths_match_hf(ours, data):
    """Random batches: 1-3 prompts of known/unknown words, 0-2 placeholders each, clips of 257-12000 samples."""
    hf = HFProcessor(audio_processor=HFExtractor(), tokenizer=ours.tokenizer)
    words = st.sampled_from(list(TEST_WORDS[:60]) + ["zebra", "Fox", "<|end_of_text|>"])
    prompt = st.lists(st.one_of(words, st.just("<|audio|>")), max_size=8).map(" ".join)
    texts = data.draw(st.lists(prompt, min_size=1, max_size=3))
    n_clips = sum(t.count("<|audio|>") for t in texts)
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(257, 12000), min_size=n_clips, max_size=n_clips))
    audio = [0.1 * torch.randn(n, generator=gen) for n in lengths] or None
    got = ours(texts, audio)
    ref = hf(text=texts, audio=audio, return_tensors="pt")
    _assert_same(got, ref, KEYS if audio else KEYS[:2])


# -- errors -----------------------------------------------------------------------------------------------------------


def test_more_placeholders_than_clips(ours, clips):
    words = r"2 <\|audio\|> placeholder\(s\).*1 audio clip\(s\).*exactly one <\|audio\|> per clip"
    with pytest.raises(ValueError, match=words):
        ours("<|audio|> and <|audio|>", [clips["fox"]])


def test_more_clips_than_placeholders_across_a_batch(ours, clips):
    with pytest.raises(ValueError, match=r"2 <\|audio\|> placeholder\(s\) \(per prompt: \[1, 1\]\) but 3 audio clip"):
        ours(["<|audio|> a", "b <|audio|>"], [clips["fox"], clips["ships"], clips["transcribe"]])


def test_placeholder_without_audio(ours):
    with pytest.raises(ValueError, match=r"1 <\|audio\|> placeholder\(s\).*no audio was given; pass audio="):
        ours(PROMPT)


def test_audio_without_placeholder(ours, clips):
    with pytest.raises(ValueError, match=r"1 audio clip\(s\) were given but the text has no <\|audio\|>"):
        ours("transcribe this", clips["fox"])


@pytest.mark.parametrize("text", [42, [1, 2, 3], None, torch.tensor([1, 2]), [], ["ok", 7]])
def test_text_must_be_str_or_list_of_str(ours, text):
    with pytest.raises(ValueError, match="text") as info:
        ours(text)
    assert isinstance(info.value, (TypeError, InvalidTextError))  # HF raises TypeError here; ours is both


def _word_level(vocab, specials):
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def test_tokenizer_without_the_audio_token():
    tok = _word_level({"<pad>": 0, "<unk>": 1, "hello": 2}, ["<pad>", "<unk>"])
    with pytest.raises(ValueError, match=r"does not know the audio token '<\|audio\|>': it maps to id 1 \('<unk>'"):
        GraniteSpeechProcessor(tok)
    # the fix the message names works
    tok.add_special_tokens({"extra_special_tokens": ["<|audio|>"]})
    assert GraniteSpeechProcessor(tok).audio_token_id == 3


def test_tokenizer_that_splits_the_audio_token():
    tok = _word_level({"<pad>": 0, "<unk>": 1, "<|audio|>": 2}, ["<pad>", "<unk>"])  # in the vocab, not special
    words = r"it maps to id 2 \('<\|audio\|>'\), and '<\|audio\|><\|audio\|>' encodes to \[1,"
    with pytest.raises(ValueError, match=words):
        GraniteSpeechProcessor(tok)


def test_audio_token_conflicting_with_the_tokenizer():
    tok = build_test_tokenizer(40, 5, audio_token="<|sound|>")
    assert GraniteSpeechProcessor(tok).audio_token_id == 5  # taken from the tokenizer, as HF does
    words = r"audio_token='<\|audio\|>' but the tokenizer declares audio_token='<\|sound\|>'"
    with pytest.raises(ValueError, match=words):
        GraniteSpeechProcessor(tok, audio_token="<|audio|>")


def test_truncating_tokenizer_raises_where_hf_truncates_silently(clips):
    vocab = {"<pad>": 0, "<unk>": 1, "<|audio|>": 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<unk>", "<|audio|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", truncation=True, max_length=5
    )
    hf = HFProcessor(audio_processor=HFExtractor(), tokenizer=tok)
    ref = hf(text="a <|audio|>", audio=clips["fox"], return_tensors="pt")
    assert ref["input_ids"].shape == (1, 5)  # HF dropped most of the clip's audio tokens without a word
    with pytest.raises(ValueError, match=r"truncated the prompt.*raise max_length or turn truncation off"):
        GraniteSpeechProcessor(tok)("a <|audio|>", clips["fox"])


def test_bad_audio_is_reported_by_the_feature_extractor(ours, clips):
    with pytest.raises(ValueError, match="8000 Hz"):
        ours("<|audio|>", clips["fox"], sampling_rate=8000)


# -- decode and the test tokenizer ------------------------------------------------------------------------------------


def test_decode_passes_through(ours):
    ids = ours(["the quick brown fox jumps over the lazy dog .", "hello world"])["input_ids"]
    decoded = ours.batch_decode(ids, skip_special_tokens=True)
    assert decoded == ours.tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert decoded == ["the quick brown fox jumps over the lazy dog .", "hello world"]
    assert ours.decode(ids[1], skip_special_tokens=True) == "hello world"


def test_test_tokenizer_matches_the_tiny_config():
    tok = build_test_tokenizer(TINY.decoder.src_vocab_size, TINY.audio_token_index)
    assert len(tok) == TINY.decoder.src_vocab_size == 211
    assert tok.convert_tokens_to_ids("<|audio|>") == TINY.audio_token_index == 210
    assert tok.pad_token_id == TINY.decoder.pad_id and tok.eos_token_id is not None
    assert sorted(tok.get_vocab().values()) == list(range(211))
    # every id decodes to a readable, distinct token
    tokens = tok.convert_ids_to_tokens(list(range(211)))
    assert len(set(tokens)) == 211 and all(t.strip() for t in tokens)
    assert tok.padding_side == "left"


def test_test_tokenizer_is_deterministic_and_sized_exactly():
    assert build_test_tokenizer().get_vocab() == build_test_tokenizer().get_vocab()
    for vocab_size, audio_index in [(7, 0), (50, 17), (400, 399)]:
        tok = build_test_tokenizer(vocab_size, audio_index)
        assert len(tok) == vocab_size and tok.convert_tokens_to_ids("<|audio|>") == audio_index
        assert GraniteSpeechProcessor(tok).audio_token_id == audio_index
    big = build_test_tokenizer(400, 399)
    assert "w0" in big.get_vocab()  # beyond the word list: filler words, still single readable tokens


def test_test_tokenizer_chat_template():
    tok = build_test_tokenizer()
    messages = [{"role": "user", "content": "<|audio|>transcribe"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|start_of_role|>user<|end_of_role|><|audio|>transcribe<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>"
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(vocab_size=5), "too small"),
        (dict(vocab_size=20, audio_token_index=20), r"audio_token_index=20 must be in \[0, vocab_size=20\)"),
        (dict(padding_side="middle"), "padding_side"),
        (dict(words=["hello", "hello"]), "unique"),
        (dict(words=["Hello"]), "lower-case"),
    ],
)
def test_test_tokenizer_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build_test_tokenizer(**kwargs)
