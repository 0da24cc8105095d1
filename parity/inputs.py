"""What the two models are fed: each side's own input pipeline, real speech clips, and the named edge cases.

By default each side runs its own pipeline on the same audio and prompt: the HF reference gets transformers'
``GraniteSpeechProcessor`` (with transformers' ``GraniteSpeechFeatureExtractor``), the FMS model the project's
``fms_granite_speech.processor.GraniteSpeechProcessor`` (with ``fms_granite_speech.features``). The pipelines' outputs
are the first rows of every parity run (``features.input_features``, ``features.input_features_mask``,
``features.audio_token_counts``, ``input_ids``), expected exactly equal; ``same_inputs=True`` feeds both models HF's
tensors, to look at the models alone.

Lengths are in samples (16 kHz): one mel frame per 160 samples (``hop_length``), two mel frames per encoder frame, so
one encoder frame is 320 samples (20 ms), and the encoder frame count of a clip is ``(samples // 160 + 1) // 2``
(``GraniteSpeechFeatureExtractor._get_num_audio_features`` in transformers 5.17). Audio is always real speech: a
shipped espeak-ng clip cropped, or tiled when too short, to the length wanted.

``CASES`` is the fixed, named set of inputs ``parity check`` runs on every call and ``parity diff --cases`` can run:
single clips whose encoder frame count is 1, one less / exactly / one more than the projector window and the
attention context, exact multiples of both, an odd mel-frame count, mixed-length batches with the short clip first
and last, a text-only prompt. Frame counts come from the config, so the same names test every variant's edges.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

if TYPE_CHECKING:  # torch and the model are imported where they are used: the CLI lists cases without them
    import torch

    from fms_granite_speech.config import GraniteSpeechConfig

__all__ = [
    "CASES",
    "DEFAULT_PROMPT",
    "HOP_SAMPLES",
    "MIN_SAMPLES",
    "SAMPLES_PER_FRAME",
    "SAMPLING_RATE",
    "TEXT_PROMPT",
    "AudioClip",
    "Case",
    "ParityInputs",
    "build_inputs",
    "case_inputs",
    "case_names",
    "encoder_frames",
    "make_waveform",
    "pipeline_extractors",
    "samples_for_frames",
]

DEFAULT_PROMPT = "USER: <|audio|> can you transcribe the speech? ASSISTANT:"
TEXT_PROMPT = "USER: can you say something? ASSISTANT:"
HOP_SAMPLES = 160                    # samples per mel frame (feature extractor hop_length at 16 kHz)
SAMPLES_PER_FRAME = 2 * HOP_SAMPLES  # one encoder frame = two stacked mel frames = 320 samples = 20 ms
MIN_SAMPLES = 257                    # the extractor's reflect padding (n_fft // 2 = 256) needs more samples than that
SAMPLING_RATE = 16_000


# -- clips ----------------------------------------------------------------------------------------------------------


def encoder_frames(samples: int) -> int:
    """Encoder frames for ``samples`` of audio: ``(samples // 160 + 1) // 2``."""
    return (samples // HOP_SAMPLES + 1) // 2


def samples_for_frames(frames: int, odd_mel: bool = False, offset: int = 0) -> int:
    """A sample count giving exactly ``frames`` encoder frames.

    ``frames`` encoder frames come from ``2*frames`` mel frames (``samples // 160 = 2*frames - 1``) or, with
    ``odd_mel``, from ``2*frames + 1`` mel frames whose last one is dropped (``samples // 160 = 2*frames``).
    ``offset`` (0..159 samples) moves within that hop. The result is raised to ``MIN_SAMPLES`` (which still gives one
    frame) when smaller.

    Raises:
        ValueError: ``frames < 1`` or ``offset`` outside 0..159.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1 encoder frame, got {frames}")
    if not 0 <= offset < HOP_SAMPLES:
        raise ValueError(f"offset must be in 0..{HOP_SAMPLES - 1} samples, got {offset}")
    hops = 2 * frames if odd_mel else 2 * frames - 1
    return max(MIN_SAMPLES, hops * HOP_SAMPLES + offset)


@dataclass(frozen=True)
class AudioClip:
    """A crop of a shipped speech clip: ``samples`` samples from ``offset`` on, tiled when the clip is too short."""

    name: str
    offset: int
    samples: int

    def __repr__(self) -> str:  # what hypothesis prints in a falsifying example
        return (f"AudioClip({self.name!r}, offset={self.offset}, samples={self.samples} "
                f"= {encoder_frames(self.samples)} encoder frames)")


@functools.lru_cache(maxsize=None)
def _speech(name: str) -> "torch.Tensor":
    from fms_granite_speech.features import load_wav, shipped_audio

    wav, sr = load_wav(shipped_audio(name))
    if sr != SAMPLING_RATE:
        raise ValueError(f"shipped clip {name!r} is {sr} Hz; the parity inputs expect {SAMPLING_RATE} Hz")
    return wav.mean(dim=0)


def make_waveform(clip: AudioClip) -> torch.Tensor:
    """The float32 waveform [clip.samples] of ``clip``: the shipped speech read circularly from ``clip.offset``.

    Raises:
        ValueError: unknown clip name (from ``features.shipped_audio``) or ``samples < 1``.
    """
    import torch

    if clip.samples < 1:
        raise ValueError(f"an audio clip needs at least 1 sample, got {clip.samples}")
    speech = _speech(clip.name)
    index = (torch.arange(clip.samples) + clip.offset) % speech.numel()
    return speech[index].to(torch.float32)


# -- inputs ---------------------------------------------------------------------------------------------------------


@dataclass
class ParityInputs:
    """The inputs of one parity run: the HF reference's (the fields) and the FMS model's (``fms``).

    Attributes:
        input_ids: int64 [B, L] prompt tokens, each ``<|audio|>`` expanded to its clip's audio-token count.
        input_features: float32 [B_audio, T, 160] stacked log-mels (T encoder frames of 20 ms), or None for
            text-only inputs; each model casts them to its dtype.
        input_features_mask: bool [B_audio, N] real audio tokens per clip, or None.
        attention_mask: int64 [B, L] (1 real token, 0 padding) or None.
        audio_token_counts: audio tokens per clip as the pipeline counted them, or None.
        audio: description of each clip (file path or ``tensor[samples]``); samples: each clip's length in samples.
        prompt: the prompt text(s) before expansion; case: the ``CASES`` name these inputs were built for, if any.
        fms: the FMS side's own pipeline output (a ``ParityInputs`` without ``fms``), or None when both models get
            these tensors (``same_inputs``).
    """

    input_ids: torch.Tensor
    input_features: Optional[torch.Tensor] = None
    input_features_mask: Optional[torch.Tensor] = None
    audio: list[str] = field(default_factory=list)
    prompt: Optional[Union[str, list[str]]] = None
    attention_mask: Optional[torch.Tensor] = None
    audio_token_counts: Optional[list[int]] = None
    samples: list[int] = field(default_factory=list)
    case: Optional[str] = None
    fms: Optional["ParityInputs"] = None

    @property
    def has_audio(self) -> bool:
        """True when the inputs carry audio (``input_features`` set)."""
        return self.input_features is not None

    def to(self, device: Union[str, "torch.device"]) -> "ParityInputs":
        """A copy with every tensor (both sides') on ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("input_ids", "input_features", "input_features_mask",
                                                         "attention_mask") if getattr(self, f) is not None}
        return replace(self, **moved, fms=None if self.fms is None else self.fms.to(device))

    def side(self, side: str) -> "ParityInputs":
        """The inputs one side is fed: ``"hf"`` these, ``"fms"`` the FMS pipeline's (these when ``fms`` is None)."""
        return self.fms if side == "fms" and self.fms is not None else self

    def describe(self) -> dict:
        """JSON-safe summary: case, audio sources, lengths (samples and encoder frames), prompt, shapes, pipelines."""
        def shape(t):
            return None if t is None else {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}

        return {"case": self.case, "audio": list(self.audio),
                "samples": list(self.samples), "encoder_frames": [encoder_frames(n) for n in self.samples],
                "prompt": self.prompt, "input_ids": shape(self.input_ids),
                "input_features": shape(self.input_features),
                "input_features_mask": shape(self.input_features_mask),
                "audio_tokens": None if self.input_features_mask is None
                else [int(n) for n in self.input_features_mask.sum(dim=1).tolist()],
                "pipelines": "same inputs: HF's processor output fed to both models" if self.fms is None
                else "own: transformers' GraniteSpeechProcessor for HF, fms_granite_speech's for FMS"}


AudioArg = Union[None, str, Path, "torch.Tensor", Sequence[Union[str, Path, "torch.Tensor"]]]


def _clips(audio: AudioArg) -> tuple[list[torch.Tensor], list[str], Optional[int]]:
    """Waveforms [samples] (mono float32), their descriptions, and the files' sample rate (None for tensors)."""
    import torch

    from fms_granite_speech.features import load_wav, shipped_audio

    if audio is None:
        audio = [shipped_audio()]
    elif isinstance(audio, (str, Path)) or (isinstance(audio, torch.Tensor) and audio.dim() == 1):
        audio = [audio]
    elif isinstance(audio, torch.Tensor):
        audio = list(audio)
    waves, described, rate = [], [], None
    for clip in audio:
        if isinstance(clip, (str, Path)):
            wave, sr = load_wav(clip)
            if wave.shape[0] != 1:
                raise ValueError(f"{clip} has {wave.shape[0]} channels; the parity inputs take mono audio (down-mix "
                                 "it first, e.g. with sox -c 1)")
            if rate is not None and sr != rate:
                raise ValueError(f"the clips have different sample rates ({rate} and {sr} Hz); give clips of one rate")
            waves.append(wave[0])
            described.append(str(clip))
            rate = sr
        elif isinstance(clip, torch.Tensor):
            if clip.dim() != 1 or not clip.is_floating_point():
                raise ValueError(f"a waveform tensor must be float [samples], got {clip.dtype} {list(clip.shape)}")
            waves.append(clip.float())
            described.append(f"tensor[{clip.numel()}]")
        else:
            raise TypeError(f"audio must be WAV paths or waveform tensors, got {type(clip).__name__}")
    return waves, described, rate


def pipeline_extractors(pair) -> tuple[Any, Any]:
    """(transformers' ``GraniteSpeechFeatureExtractor``, the project's) for ``pair``, each read the way its own
    library reads it: for a checkpoint, from the folder's processor / preprocessor config when it has one (transformers'
    ``from_pretrained``; the project's ``GraniteSpeechFeatureExtractor.from_pretrained``), else built from the model
    config's ``window_size`` and ``downsample_rate`` (as a user of either library would); for random weights, from
    the variant's projector config. Built once per pair (no file is read again for a second batch).

    Raises:
        ValueError: settings a library cannot read (the file is named).
    """
    cached = getattr(pair, "_extractors", None)
    if cached is not None:
        return cached
    from transformers import GraniteSpeechFeatureExtractor as HFExtractor

    from fms_granite_speech.features import GraniteSpeechFeatureExtractor

    window, rate = pair.config.projector.window_size, pair.config.projector.downsample_rate
    folder = None if pair.checkpoint is None else Path(pair.checkpoint)
    if folder is not None and any((folder / f).is_file() for f in ("processor_config.json",
                                                                    "preprocessor_config.json")):
        try:
            hf = HFExtractor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"transformers cannot read the feature extractor settings of {folder}: "
                             f"{str(err).strip().splitlines()[0]}") from None
        fms = GraniteSpeechFeatureExtractor.from_pretrained(folder)
    else:
        hf = HFExtractor(projector_window_size=window, projector_downsample_rate=rate)
        fms = GraniteSpeechFeatureExtractor(window_size=window, downsample_rate=rate)
    pair._extractors = (hf, fms)
    return hf, fms


def _hf_pipeline(extractor, tokenizer, texts: list[str], waves: Optional[list[torch.Tensor]]) -> dict[str, Any]:
    """transformers' processor: ids, attention mask, features, mask, and its extractor's per-clip token counts (its
    own formula on the clip lengths: the spectrograms are computed once, by the processor)."""
    from transformers import GraniteSpeechProcessor

    processor = GraniteSpeechProcessor(extractor, tokenizer)
    out = processor(texts, audio=waves, return_tensors="pt") if waves else processor(texts, return_tensors="pt")
    result = {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}
    if waves:
        result["input_features"] = out["input_features"].float()
        result["input_features_mask"] = out["input_features_mask"].bool()
        result["audio_token_counts"] = [int(n) for n in extractor._get_num_audio_features([w.numel() for w in waves])]
    return result


def _fms_pipeline(extractor, tokenizer, texts: list[str], waves: Optional[list[torch.Tensor]]) -> dict[str, Any]:
    """The project's processor and feature extractor, the same outputs (spectrograms computed once)."""
    from fms_granite_speech.processor import GraniteSpeechProcessor

    processor = GraniteSpeechProcessor(tokenizer, feature_extractor=extractor)
    out = processor(texts, audio=waves) if waves else processor(texts)
    result = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
    if waves:
        result["input_features"] = out["input_features"]
        result["input_features_mask"] = out["input_features_mask"]
        result["audio_token_counts"] = extractor.token_counts([w.numel() for w in waves])
    return result


def build_inputs(pair, audio: AudioArg = None, prompt: Union[None, str, Sequence[str]] = DEFAULT_PROMPT,
                 sampling_rate: Optional[int] = None, *, same_inputs: bool = False, text_only: bool = False,
                 case: Optional[str] = None) -> ParityInputs:
    """Both sides' inputs for ``pair`` from one audio batch and prompt, each through its own pipeline.

    Args:
        pair: a ``parity.pair.ModelPair`` (its tokenizer and config are used; no model is built).
        audio: a WAV path, a float waveform tensor [samples] at 16 kHz, or a list of them; None means the default
            shipped clip (``features.shipped_audio()``). Ignored with ``text_only``.
        prompt: text with one ``<|audio|>`` per clip, or one prompt per clip; a single prompt with one placeholder
            is repeated for every clip. None: ``DEFAULT_PROMPT`` (``TEXT_PROMPT`` with ``text_only``).
        sampling_rate: Hz of tensor audio; only 16000 is accepted (both extractors take 16 kHz), it is checked.
        same_inputs: feed both models HF's pipeline output (``fms`` None), to isolate the models.
        text_only: no audio: a text prompt, tokenized by both pipelines.
        case: the ``CASES`` name, recorded in the result.

    Raises:
        FileNotFoundError: an audio path does not exist.
        ValueError: undecodable or non-16 kHz audio, a placeholder count that does not match the clips, or a
            tokenizer whose audio token id differs from ``config.audio_token_index``.
    """
    from fms_granite_speech.processor import DEFAULT_AUDIO_TOKEN

    tokenizer = pair.get_tokenizer()
    audio_id = tokenizer.convert_tokens_to_ids(DEFAULT_AUDIO_TOKEN)
    if audio_id != pair.config.audio_token_index:
        raise ValueError(f"the tokenizer maps {DEFAULT_AUDIO_TOKEN} to id {audio_id} but the model expects "
                         f"audio_token_index={pair.config.audio_token_index}; use the checkpoint's own tokenizer")
    if text_only:
        waves, described, rate = [], [], None
        prompt = TEXT_PROMPT if prompt in (None, DEFAULT_PROMPT) else prompt
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if any(DEFAULT_AUDIO_TOKEN in t for t in texts):
            raise ValueError(f"a text-only prompt must not contain {DEFAULT_AUDIO_TOKEN}")
    else:
        waves, described, rate = _clips(audio)
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        texts = [prompt] * len(waves) if isinstance(prompt, str) and prompt.count(DEFAULT_AUDIO_TOKEN) == 1 \
            else ([prompt] if isinstance(prompt, str) else list(prompt))
    rate = rate if rate is not None else (sampling_rate if sampling_rate is not None else SAMPLING_RATE)
    if waves and rate != SAMPLING_RATE:
        raise ValueError(f"the audio is {rate} Hz; both feature extractors take {SAMPLING_RATE} Hz (resample it "
                         f"first, e.g. sox in.wav -r {SAMPLING_RATE} out.wav)")
    common = dict(audio=described, prompt=prompt if isinstance(prompt, str) else list(prompt),
                  samples=[int(w.numel()) for w in waves], case=case)
    # the project's pipeline first: its checks (empty, too short or int16-scaled clips, a placeholder count that
    # does not match the clips) answer in one line before transformers' processor fails inside itself
    hf_extractor, fms_extractor = pipeline_extractors(pair)
    fms = ParityInputs(**_fms_pipeline(fms_extractor, tokenizer, texts, waves or None), **common)
    try:
        hf = ParityInputs(**_hf_pipeline(hf_extractor, tokenizer, texts, waves or None), **common)
    except (ValueError, RuntimeError, IndexError, TypeError, StopIteration) as err:
        from parity._shell import first_line

        raise ValueError(f"transformers' GraniteSpeechProcessor cannot take these inputs ({first_line(err)}); the project's "
                         "pipeline took them: check the clips and the <|audio|> placeholders") from None
    limit = pair.config.decoder.max_expected_seq_len
    if hf.input_ids.shape[1] > limit:
        raise ValueError(f"the prompt is {hf.input_ids.shape[1]} tokens (audio included) but the decoder has {limit} "
                         "positions (max_expected_seq_len); shorten the prompt or the audio")
    return hf if same_inputs else replace(hf, fms=fms)


# -- the named edge cases -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One named input of the parity suite: clips (encoder frame counts, odd mel count) or a text-only prompt.

    ``frames(config)`` gives the clips' encoder frame counts for a config, so a case means the same edge on every
    variant (the projector window and the attention context come from the config).
    """

    name: str
    frames: Callable[[GraniteSpeechConfig], list[int]]
    odd_mel: bool = False
    text_only: bool = False
    clip: Optional[str] = None  # a shipped clip as it is (no crop)
    what: str = ""

    def inputs(self, pair, same_inputs: bool = False) -> ParityInputs:
        """The case's ``ParityInputs`` for ``pair``."""
        from fms_granite_speech.features import shipped_audio

        if self.text_only:
            return build_inputs(pair, text_only=True, same_inputs=same_inputs, case=self.name)
        if self.clip is not None:
            return build_inputs(pair, audio=[str(shipped_audio(self.clip))], same_inputs=same_inputs, case=self.name)
        names = ("ships", "transcribe", "fox")
        clips = [AudioClip(names[k % 3], 1000 * k, samples_for_frames(n, odd_mel=self.odd_mel))
                 for k, n in enumerate(self.frames(pair.config))]
        return build_inputs(pair, audio=[make_waveform(c) for c in clips], sampling_rate=SAMPLING_RATE,
                            same_inputs=same_inputs, case=self.name)


def _w(c: GraniteSpeechConfig) -> int:
    return c.projector.window_size


def _c(c: GraniteSpeechConfig) -> int:
    return c.encoder.context_size


# fmt: off
CASES: dict[str, Case] = {case.name: case for case in (
    Case("speech_b1",         lambda c: [],                       clip="fox", what="a shipped clip as it is"),
    Case("frames_1",          lambda c: [1],                      what="one encoder frame"),
    Case("window_minus_1",    lambda c: [_w(c) - 1],              what="one frame short of a projector window"),
    Case("window",            lambda c: [_w(c)],                  what="exactly one projector window"),
    Case("window_plus_1",     lambda c: [_w(c) + 1],              what="one frame into a second window"),
    Case("window_x2",         lambda c: [2 * _w(c)],              what="exactly two projector windows"),
    Case("context_minus_1",   lambda c: [_c(c) - 1],              what="one frame short of an attention block"),
    Case("context",           lambda c: [_c(c)],                  what="exactly one attention block"),
    Case("context_plus_1",    lambda c: [_c(c) + 1],              what="one frame into a second attention block"),
    Case("common_multiple",   lambda c: [math.lcm(_w(c), _c(c))], what="an exact multiple of window and context"),
    Case("odd_mel",           lambda c: [_w(c) + 3], odd_mel=True, what="an odd mel-frame count (last frame dropped)"),
    Case("batch_short_first", lambda c: [_w(c) - 1, 2 * _c(c) + 3], what="mixed batch, the short clip first"),
    Case("batch_short_last",  lambda c: [2 * _c(c) + 3, _w(c) - 1], what="mixed batch, the short clip last"),
    Case("speech_mixed_batch", lambda c: [2 * _c(c) + 3, _w(c) - 1, _w(c) + 1], odd_mel=True,
         what="three clip lengths in one batch, odd mel counts"),
    Case("text_only",         lambda c: [], text_only=True,       what="a text prompt, adapter off"),
)}
# fmt: on


def case_names(names: Union[None, str, Sequence[str]] = None) -> list[str]:
    """Validated case names: all of ``CASES`` for None, else the given names (a comma-separated string or a list).

    Raises:
        ValueError: an unknown name (the message lists ``CASES``).
    """
    if names is None:
        return list(CASES)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ValueError(f"unknown parity case(s) {unknown or names}; known: {', '.join(CASES)}")
    return list(dict.fromkeys(names))


def case_inputs(pair, name: str, same_inputs: bool = False) -> ParityInputs:
    """The ``ParityInputs`` of case ``name`` for ``pair``.

    Raises:
        ValueError: unknown case (the message lists ``CASES``).
    """
    return CASES[case_names([name])[0]].inputs(pair, same_inputs=same_inputs)
