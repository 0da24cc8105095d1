"""A small, real, offline tokenizer for tests, the ``parity`` CLI's default run and generation examples.

No tokenizer can be downloaded here, so ``build_test_tokenizer`` makes one with the ``tokenizers`` library: a
word-level model over a fixed English word list (lower-cased, split on whitespace and punctuation), Granite's chat
special tokens, and ``<|audio|>`` at exactly the id the model config names (``audio_token_index``). It is wrapped as a
``transformers.PreTrainedTokenizerFast``, so HF's ``GraniteSpeechProcessor`` and this package's processor can both be
given the very same object, and ``decode`` of any id gives a readable word.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["AUDIO_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "ROLE_TOKENS", "TEST_WORDS", "build_test_tokenizer"]

AUDIO_TOKEN = "<|audio|>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|end_of_text|>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|start_of_role|>", "<|end_of_role|>")

# Granite's chat layout: <|start_of_role|>ROLE<|end_of_role|>CONTENT<|end_of_text|> per message, newline-separated.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)

# Punctuation and the words of the shipped clips and of typical speech prompts first (so even a small vocabulary
# reads well), then common English words.
TEST_WORDS: tuple[str, ...] = tuple(
    """
    . , ? ! ' : ; -
    the quick brown fox jumps over lazy dog ships sail across sea can you transcribe speech into a written format
    please this audio what is said in user assistant system translate to english french german summarize text
    hello world yes no and of it that for on with as was he she they we i be at by not are from or have an but
    had his her their there been one all were when which would if will do each about how up out them then so
    some these many time has look two more write go see number way could people my than first water who its now
    find long down day did get come made may part sound word say good new year work place live back give most
    very after thing our just name sentence man think great where help through much before line right too mean
    old any same tell boy follow came want show also around form three small set put end does another well large
    must big even such because turn here why ask went men read need land different home us move try kind hand
    picture again change off play spell air away animal house point page letter mother answer found study still
    learn should high every near add food between own below country plant last school father keep tree never
    start city earth eye light thought head under story saw left few while along might close something seem next
    hard open example begin life always those both paper together got group often run important until children
    side feet car mile night walk white began grow took river four carry state once book hear stop without
    second later miss idea enough eat face watch far real almost let above girl sometimes mountain cut young
    talk soon list song being leave family morning
    """.split()
)


def build_test_tokenizer(
    vocab_size: int = 211,
    audio_token_index: int = 210,
    *,
    padding_side: str = "left",
    words: Optional[Sequence[str]] = None,
    audio_token: str = AUDIO_TOKEN,
    pad_token: str = PAD_TOKEN,
    eos_token: str = EOS_TOKEN,
    unk_token: str = UNK_TOKEN,
):
    """A deterministic word-level ``transformers.PreTrainedTokenizerFast`` with exactly ``vocab_size`` entries.

    Layout: id ``audio_token_index`` is ``audio_token``; the other ids, in increasing order, are ``pad_token``,
    ``eos_token``, ``unk_token``, the two Granite role tokens, then ``words`` (default ``TEST_WORDS``), then filler
    words ``w0, w1, ...`` if the vocabulary is larger than the list, or the word list cut short if it is smaller. So
    with the defaults (the ``tiny`` variant: vocab 211, audio 210) pad is 0 and eos is 1, and the pad id matches the
    tiny decoder's ``pad_id``.

    Text is lower-cased and split into words and punctuation (``tokenizers``' ``Whitespace`` pre-tokenizer); unknown
    words become ``unk_token``. No special token is added around a sequence (Granite adds no BOS either); special
    tokens are never split and are matched before lower-casing. ``decode`` joins tokens with single spaces. The
    tokenizer carries ``audio_token`` as its ``audio_token`` attribute and a Granite-style ``chat_template``.

    Args:
        vocab_size: number of ids, ``len(tokenizer)`` of the result.
        audio_token_index: id of ``audio_token``, in ``[0, vocab_size)``.
        padding_side: ``"left"`` (the default: batched generation appends on the right) or ``"right"``.
        words: the ordinary vocabulary; must be unique, lower-case single words or punctuation marks.

    Raises:
        ValueError: ``vocab_size`` too small for the special tokens plus one word, ``audio_token_index`` out of
            range, a bad ``padding_side``, or duplicate / non-lower-case / multi-word entries in ``words``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [pad_token, eos_token, unk_token, *ROLE_TOKENS]
    if len(set(specials + [audio_token])) != len(specials) + 1:
        raise ValueError(f"special tokens must be distinct, got audio={audio_token!r} and {specials}")
    minimum = len(specials) + 2
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {minimum} (special tokens + one word)")
    if not 0 <= audio_token_index < vocab_size:
        raise ValueError(f"audio_token_index={audio_token_index} must be in [0, vocab_size={vocab_size})")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    words = list(TEST_WORDS if words is None else words)
    bad = [w for w in words if not w or w != w.lower() or len(pre_tokenizers.Whitespace().pre_tokenize_str(w)) != 1]
    if bad:
        raise ValueError(f"words must be lower-case single words or punctuation marks; bad entries: {bad[:5]}")
    if len(set(words)) != len(words) or set(words) & set(specials + [audio_token]):
        raise ValueError("words must be unique and must not repeat a special token")

    n_ordinary = vocab_size - 1 - len(specials)
    taken = set(words)
    fillers = (f"w{i}" for i in range(vocab_size * 2) if f"w{i}" not in taken)
    ordinary = words[:n_ordinary] + [next(fillers) for _ in range(n_ordinary - len(words))]
    others = iter(specials + ordinary)
    vocab = {}
    for token_id in range(vocab_size):
        vocab[audio_token if token_id == audio_token_index else next(others)] = token_id

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials + [audio_token])  # already in the vocab: keeps their ids, marks them unsplit
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad_token,
        eos_token=eos_token,
        unk_token=unk_token,
        audio_token=audio_token,
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side=padding_side,
        chat_template=_CHAT_TEMPLATE,
    )
    if len(tokenizer) != vocab_size or tokenizer.convert_tokens_to_ids(audio_token) != audio_token_index:
        raise AssertionError(  # a tokenizers/transformers change broke the layout above; fail loudly, never silently
            f"test tokenizer layout broken: len={len(tokenizer)} (want {vocab_size}), "
            f"{audio_token}={tokenizer.convert_tokens_to_ids(audio_token)} (want {audio_token_index})"
        )
    return tokenizer
