"""Prompt text + audio -> model inputs, token-for-token equal to HF's ``GraniteSpeechProcessor``.

Reference: ``transformers.models.granite_speech.processing_granite_speech`` and the generic ``ProcessorMixin.__call__``
of transformers 5.17. What HF does, and this module does too:

1. the feature extractor turns the clips into ``input_features`` [B_audio, T, 160] and counts each clip's audio
   tokens (``ceil((samples // 160 + 1) // 2 / 15) * 3``, see ``features.audio_token_count``);
2. the k-th ``<|audio|>`` in the text, counting in order across the whole batch of prompts, is replaced by that many
   copies of ``<|audio|>`` (clip k's token count);
3. the expanded prompts are tokenized in one call with ``padding=True`` (pad to the longest, on the tokenizer's own
   ``padding_side``), plus any tokenizer-call option the tokenizer was constructed with (e.g. ``padding_side``).

Where HF's processor is silent or fails obscurely, this module raises a ValueError naming the fix: a placeholder count
that differs from the clip count (HF ignores spare clips, raises a bare ``StopIteration`` on spare placeholders and
keeps a lone placeholder as one token when no audio is given), audio without any placeholder, a tokenizer that truncates
audio tokens away (HF truncates silently), and a tokenizer that does not map ``<|audio|>`` to one id of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from fms_granite_speech.features import GraniteSpeechFeatureExtractor
from fms_granite_speech.tokenizer_utils import build_test_tokenizer

__all__ = ["DEFAULT_AUDIO_TOKEN", "GraniteSpeechProcessor", "InvalidTextError", "build_test_tokenizer"]

DEFAULT_AUDIO_TOKEN = "<|audio|>"

# Tokenizer-call options that HF's processor copies from the tokenizer's constructor arguments
# (``ProcessorMixin._merge_kwargs``: the processor's ``text_kwargs`` names found in ``tokenizer.init_kwargs``).
_TOKENIZER_CALL_OPTIONS = (
    "add_special_tokens",
    "padding",
    "truncation",
    "max_length",
    "stride",
    "pad_to_multiple_of",
    "padding_side",
)


class InvalidTextError(TypeError, ValueError):
    """``text`` is not a string or a non-empty list of strings (both a ``TypeError`` and a ``ValueError``)."""


class GraniteSpeechProcessor:
    """Tokenizer + feature extractor for Granite Speech prompts.

    Args:
        tokenizer: a ``transformers`` tokenizer (e.g. the checkpoint's, or ``build_test_tokenizer``) that knows
            ``audio_token`` as one token of its own.
        feature_extractor: turns audio into features and token counts; ``None`` builds a default
            ``GraniteSpeechFeatureExtractor()`` (16 kHz, 80 mels, window 15, downsample 5).
        audio_token: the placeholder string. ``None`` takes the tokenizer's ``audio_token`` attribute when it has one
            (HF's processor does the same), else ``"<|audio|>"``.

    Attributes:
        audio_token (str), audio_token_id (int): the placeholder and its id.

    Raises:
        TypeError: ``tokenizer`` is not a transformers-style tokenizer.
        ValueError: ``audio_token`` differs from the one the tokenizer declares, or the tokenizer does not map
            ``audio_token`` to a single id of its own (the message names the id it maps to and how to add the token).
    """

    def __init__(self, tokenizer: Any, feature_extractor: Optional[Any] = None, audio_token: Optional[str] = None):
        for method in ("__call__", "convert_tokens_to_ids", "encode", "decode", "batch_decode"):
            if not callable(getattr(tokenizer, method, None)):
                raise TypeError(
                    f"tokenizer {type(tokenizer).__name__} has no {method}(); give a transformers tokenizer"
                    " (PreTrainedTokenizerFast, e.g. from AutoTokenizer or build_test_tokenizer)"
                )
        declared = getattr(tokenizer, "audio_token", None)
        declared = declared if isinstance(declared, str) else None
        if audio_token is not None and declared is not None and audio_token != declared:
            raise ValueError(
                f"audio_token={audio_token!r} but the tokenizer declares audio_token={declared!r};"
                " drop the audio_token argument or give the tokenizer's"
            )
        self.audio_token: str = audio_token or declared or DEFAULT_AUDIO_TOKEN
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor if feature_extractor is not None else GraniteSpeechFeatureExtractor()
        self.audio_token_id: int = self._resolve_audio_token_id()

    def _resolve_audio_token_id(self) -> int:
        """The id of ``self.audio_token``; ValueError unless the tokenizer maps it (and runs of it) to one id each."""
        tok, token = self.tokenizer, self.audio_token
        token_id = tok.convert_tokens_to_ids(token)
        unk_id = getattr(tok, "unk_token_id", None)
        encoded = list(tok.encode(token * 2, add_special_tokens=False))
        known = isinstance(token_id, int) and not (token_id == unk_id and token != getattr(tok, "unk_token", None))
        if known and encoded == [token_id, token_id]:
            return token_id
        shown = "no id (None)" if token_id is None else f"id {token_id}"
        if isinstance(token_id, int):
            shown += f" ({tok.convert_ids_to_tokens(token_id)!r}{', the unknown token' if token_id == unk_id else ''})"
        raise ValueError(
            f"the tokenizer does not know the audio token {token!r}: it maps to {shown}, and {token * 2!r} encodes"
            f" to {encoded} instead of two copies of one id. Add it as a special token, e.g."
            f" tokenizer.add_special_tokens({{'extra_special_tokens': [{token!r}]}}) (and size the model's vocabulary"
            " to match), or pass the audio_token this tokenizer uses"
        )

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        audio: Any = None,
        sampling_rate: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompts, expanding each ``<|audio|>`` to its clip's audio-token count.

        Args:
            text: one prompt or a list of B prompts. Each clip needs exactly one ``<|audio|>``; clips are matched to
                placeholders in order, across prompts (prompt 0's placeholders first).
            audio: anything ``feature_extractor`` accepts (a 1-D [samples] clip, a list of clips of any lengths, a
                2-D [clips, samples] tensor, WAV paths), or ``None`` for text-only prompts.
            sampling_rate: Hz of array audio, passed to the feature extractor (``None``: its default, 16000).
            device: where every returned tensor goes (``None``: token ids on CPU, features where the extractor
                computed them).

        Returns:
            dict with
              * ``input_ids`` int64 [B, L]: L the longest expanded prompt in tokens, shorter ones padded with the
                tokenizer's pad id on its ``padding_side``;
              * ``attention_mask`` int64 [B, L]: 1 for real tokens, 0 for padding;
              and when audio is given
              * ``input_features`` float32 [B_audio, T, 160]: stacked log-mels, T encoder frames (20 ms each) of the
                longest clip;
              * ``input_features_mask`` bool [B_audio, max audio tokens]: True for each clip's real audio tokens.

        Raises:
            InvalidTextError (a TypeError and a ValueError): ``text`` is not a string or a non-empty list of strings.
            ValueError: the number of ``<|audio|>`` in the text differs from the number of clips (no audio at all
                included), audio is given but the text has no ``<|audio|>``, or the tokenizer truncated audio tokens
                away; plus any ValueError/TypeError of the feature extractor for bad audio.
        """
        prompts = self._validate_text(text)
        per_prompt = [p.count(self.audio_token) for p in prompts]
        total = sum(per_prompt)
        features = None
        if audio is None:
            if total:
                raise ValueError(
                    f"the text has {total} {self.audio_token} placeholder(s) (per prompt: {per_prompt}) but no audio"
                    f" was given; pass audio= with one clip per {self.audio_token}, or remove the placeholders"
                )
            expanded = prompts
        else:
            features = self.feature_extractor(audio, sampling_rate=sampling_rate, device=device)
            counts = list(features.audio_token_counts)
            if total == 0:
                raise ValueError(
                    f"{len(counts)} audio clip(s) were given but the text has no {self.audio_token} placeholder;"
                    f" put one {self.audio_token} in the prompt where each clip belongs"
                )
            if total != len(counts):
                raise ValueError(
                    f"the text has {total} {self.audio_token} placeholder(s) (per prompt: {per_prompt}) but"
                    f" {len(counts)} audio clip(s) were given; use exactly one {self.audio_token} per clip, in the"
                    " order of the clips across the batch"
                )
            expanded = self._expand(prompts, counts)

        encoded = self.tokenizer(expanded, **self._tokenizer_options())
        input_ids, attention_mask = encoded["input_ids"].long(), encoded["attention_mask"].long()
        self._check_audio_tokens(expanded, input_ids)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if features is not None:
            out["input_features"] = features.input_features
            out["input_features_mask"] = features.input_features_mask
        if device is not None:
            out = {name: t.to(device) for name, t in out.items()}
        return out

    # -- a folder, as transformers' processors use one ------------------------------------------------------------

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write the tokenizer (its own ``save_pretrained``) and ``processor_config.json`` (the feature extractor's
        settings as its ``audio_processor`` section, the audio token, ``processor_class``) to ``folder``, in
        transformers' layout, so ``GraniteSpeechProcessor.from_pretrained`` of either library reads it back. The
        JSON is written to a temporary name and renamed: an interrupted save leaves no half-written file.

        Returns:
            the folder.
        """
        import json
        import os
        import tempfile

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        doc = {"audio_processor": self.feature_extractor.to_dict(), "audio_token": self.audio_token,
               "processor_class": "GraniteSpeechProcessor"}
        fd, tmp = tempfile.mkstemp(prefix=".processor_config.", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, folder / "processor_config.json")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return folder

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], **extractor_kwargs) -> "GraniteSpeechProcessor":
        """The processor of a checkpoint folder: its tokenizer (``AutoTokenizer``, local files only), the feature
        extractor settings ``GraniteSpeechFeatureExtractor.from_pretrained`` reads there (a processor config, else a
        preprocessor config, else the model config's window and downsample rate), and the audio token the processor
        config names. ``extractor_kwargs`` (``resample``, ``downmix``) go to the extractor.

        Raises:
            FileNotFoundError: the folder has no tokenizer files, or nothing to read the extractor settings from.
            ValueError: unreadable settings or tokenizer (the file is named).
        """
        import json

        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot load the tokenizer of {folder}: {str(err).splitlines()[0]}") from None
        extractor = GraniteSpeechFeatureExtractor.from_pretrained(folder, **extractor_kwargs)
        audio_token = None
        path = folder / "processor_config.json"
        if path.is_file():
            doc = json.loads(path.read_text())  # valid JSON: the extractor just read it
            audio_token = doc.get("audio_token") if isinstance(doc, dict) else None
        return cls(tokenizer, feature_extractor=extractor, audio_token=audio_token)

    def _validate_text(self, text: Any) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            return list(text)
        if isinstance(text, (list, tuple)) and not text:
            raise InvalidTextError("text is an empty list; give a prompt string or a list of prompt strings")
        kinds = sorted({type(t).__name__ for t in text}) if isinstance(text, (list, tuple)) else None
        got = f"a {type(text).__name__} of {', '.join(kinds)}" if kinds else f"a {type(text).__name__}"
        raise InvalidTextError(
            f"text must be a str or a list of str, got {got}; token ids are not accepted here (pass the prompt text)"
        )

    def _expand(self, prompts: list[str], counts: list[int]) -> list[str]:
        """Replace the k-th placeholder (in batch order) by ``counts[k]`` copies of it."""
        clip_counts = iter(counts)
        expanded = []
        for prompt in prompts:
            pieces = prompt.split(self.audio_token)
            parts = [pieces[0]]
            for piece in pieces[1:]:
                parts.append(self.audio_token * next(clip_counts))
                parts.append(piece)
            expanded.append("".join(parts))
        return expanded

    def _tokenizer_options(self) -> dict[str, Any]:
        """HF's processor call: ``padding=True`` overridden by options the tokenizer was constructed with."""
        options: dict[str, Any] = {"padding": True}
        init_kwargs = getattr(self.tokenizer, "init_kwargs", None) or {}
        for name in _TOKENIZER_CALL_OPTIONS:
            if name in init_kwargs:
                options[name] = getattr(self.tokenizer, name, init_kwargs[name])
        options.update(return_tensors="pt", return_attention_mask=True)
        return options

    def _check_audio_tokens(self, expanded: list[str], input_ids: torch.Tensor) -> None:
        """Every expanded placeholder must come out as exactly one ``audio_token_id`` (truncation can drop some)."""
        want = [p.count(self.audio_token) for p in expanded]
        got = (input_ids == self.audio_token_id).sum(dim=1).tolist()
        if want != got:
            raise ValueError(
                f"audio tokens per prompt after tokenization {got} differ from the expanded text {want}: the"
                " tokenizer truncated the prompt (max_length / truncation in its settings) or maps other text to"
                f" id {self.audio_token_id}; raise max_length or turn truncation off"
            )

    def batch_decode(self, *args, **kwargs):
        """``tokenizer.batch_decode`` unchanged: ids [B, L] -> list of B strings."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """``tokenizer.decode`` unchanged: ids [L] -> string."""
        return self.tokenizer.decode(*args, **kwargs)
