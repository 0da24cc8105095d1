"""Audio -> log-mel features for the Granite Speech encoder, bit-for-bit equal to the HF extractor.

The math follows ``transformers.models.granite_speech.feature_extraction_granite_speech`` (transformers 5.17,
``GraniteSpeechFeatureExtractor._extract_mel_spectrograms`` and ``_get_num_audio_features``):

1. zero-pad the batch of float32 waveforms to the longest clip;
2. ``torchaudio.transforms.MelSpectrogram(16000, n_fft=512, win_length=400, hop_length=160, n_mels=80)``
   (hann window, power 2, centred with reflect padding) -> [B, 80, T], transposed to [B, T, 80];
3. ``log10(clip(x, 1e-10))``, then per clip ``max(x, mx - 8) / 4 + 1`` with ``mx`` the clip's maximum over all
   frames and mels (padding frames included, as HF does);
4. drop the last frame when T is odd and stack frame pairs -> [B, T // 2, 160] (one encoder frame = 20 ms).

Units: samples at 16 kHz; one mel frame per 160 samples (10 ms); one audio token per 5 encoder frames (10 tokens/s).
Input validation (rank, dtype, NaN/Inf, sample rate, channels, length) happens here, before any torch kernel runs,
so bad audio gives a ``ValueError``/``TypeError`` naming the fix instead of a traceback from inside torch.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import soundfile
import torch
import torchaudio

__all__ = [
    "AudioFeatures",
    "GraniteSpeechFeatureExtractor",
    "audio_token_count",
    "list_shipped_audio",
    "load_wav",
    "shipped_audio",
]

_DATA_PACKAGE = "fms_granite_speech"
_MAX_CHANNELS = 8        # a 2-D array with at most this many columns and more rows is [samples, channels]
_INT16_SCALE_PEAK = 2.0  # float samples beyond this peak are PCM integers stored as floats, not [-1, 1] audio
_DATA_DIR = "data"
_PREFIX = "speech_"


def list_shipped_audio() -> list[str]:
    """Short names of the speech clips shipped as package data, sorted (``fms_granite_speech/data/speech_*.wav``).

    The clips are 16 kHz mono 16-bit WAVs synthesised with espeak-ng; ``"fox"`` names ``speech_fox.wav``.
    """
    root = importlib.resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR)
    names = [p.name for p in root.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(".wav")]
    return sorted(n[len(_PREFIX) : -len(".wav")] for n in names)


def shipped_audio(name: Optional[str] = None) -> Path:
    """Filesystem path of one shipped speech clip.

    Args:
        name: short name (``"fox"``), stem (``"speech_fox"``) or file name (``"speech_fox.wav"``); ``None`` gives
            the first name of ``list_shipped_audio()``.

    Raises:
        ValueError: unknown name; the message lists the available names.
        FileNotFoundError: the package data is missing (package installed without its ``data`` folder).
    """
    available = list_shipped_audio()
    if not available:
        raise FileNotFoundError(f"no speech_*.wav found in {_DATA_PACKAGE}/{_DATA_DIR}; reinstall the package")
    short = available[0] if name is None else str(name).removesuffix(".wav").removeprefix(_PREFIX)
    if short not in available:
        raise ValueError(f"unknown shipped audio {name!r}; available: {', '.join(available)}")
    resource = importlib.resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, f"{_PREFIX}{short}.wav")
    return Path(str(resource))


def load_wav(path: Union[str, Path]) -> tuple[torch.Tensor, int]:
    """Read an audio file with ``soundfile``.

    Returns:
        ``(waveform, sample_rate)``: waveform float32 [channels, samples] in [-1, 1] (16-bit PCM is divided by
        32768 by soundfile), sample_rate in Hz.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: soundfile cannot decode the file, or a WAV whose header declares more audio than the file holds
            (a truncated file: libsndfile would return the part that is there without a word).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    _check_wav_data_size(path)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"cannot decode audio file {path}: {err}; give a WAV/FLAC/OGG file") from err
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def _check_wav_data_size(path: Path) -> None:
    """A RIFF/WAVE file whose ``data`` chunk declares more bytes than follow it is truncated: refuse it. Sizes of 0 and
    0xFFFFFFFF (written by streaming encoders that never came back to fill them in) mean "unknown" and pass."""
    import struct

    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size = path.stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                available = size - f.tell()
                if length not in (0, 0xFFFFFFFF) and length > available:
                    raise ValueError(f"{path} is truncated: its WAV header declares {length} bytes of audio but the "
                                     f"file holds {available} ({100 * available / length:.0f}%); re-export or "
                                     "re-download it")
                return
            f.seek(length + (length & 1), 1)


def audio_token_count(num_samples: int, window_size: int = 15, downsample_rate: int = 5, hop_length: int = 160) -> int:
    """Number of projector outputs (audio tokens in the prompt) for one clip of ``num_samples`` samples.

    ``mel = samples // hop + 1``; ``encoder = mel // 2``; ``tokens = ceil(encoder / window) * (window // downsample)``
    (HF ``GraniteSpeechFeatureExtractor._get_num_audio_features``; the Q-Former emits ``window // downsample``
    queries per window of encoder frames). 16000 samples (1 s) -> 21 tokens.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    encoder_frames = (num_samples // hop_length + 1) // 2
    return math.ceil(encoder_frames / window_size) * (window_size // downsample_rate)


@dataclass
class AudioFeatures:
    """Output of ``GraniteSpeechFeatureExtractor``; also usable as a mapping (``features["input_features"]``).

    Attributes:
        input_features: float32 [B, T, 2 * n_mels] stacked log-mel pairs, T = encoder frames of the longest clip.
        input_features_mask: bool [B, max(audio_token_counts)], True for each clip's real audio tokens.
        audio_token_counts: audio tokens per clip (``audio_token_count`` of its length).
        audio_lengths: samples per clip after resampling / down-mixing.
    """

    input_features: torch.Tensor
    input_features_mask: torch.Tensor
    audio_token_counts: list[int]
    audio_lengths: list[int]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"{key!r}; AudioFeatures has {self.keys()}")
        return getattr(self, key)


AudioInput = Union[str, Path, torch.Tensor, np.ndarray, Sequence[Union[str, Path, torch.Tensor, np.ndarray]]]


class GraniteSpeechFeatureExtractor:
    """Waveforms -> ``AudioFeatures`` exactly as HF's ``GraniteSpeechFeatureExtractor`` computes them.

    Args:
        sample_rate, n_fft, win_length, hop_length, n_mels: the mel spectrogram (Hz, samples, mel bins).
        window_size, downsample_rate: the projector's window (encoder frames) and downsampling, for token counts.
        resample: resample audio at another rate to ``sample_rate`` (``torchaudio.functional.resample``) instead
            of raising.
        downmix: average multi-channel clips to mono instead of raising.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
        window_size: int = 15,
        downsample_rate: int = 5,
        resample: bool = False,
        downmix: bool = False,
    ):
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.win_length = win_length
        self.window_size, self.downsample_rate = window_size, downsample_rate
        self.resample, self.downmix = resample, downmix
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length, n_mels=n_mels
        )

    # -- settings, in transformers' format --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The settings in transformers' ``GraniteSpeechFeatureExtractor`` format (what its ``save_pretrained``
        writes as a processor's ``audio_processor`` section, or a ``preprocessor_config.json``), so either library
        reads what the other wrote. ``resample`` / ``downmix`` are this project's input conveniences, not kept."""
        return {
            "feature_extractor_type": "GraniteSpeechFeatureExtractor",
            "feature_size": self.n_mels,
            "sampling_rate": self.sample_rate,
            "melspec_kwargs": {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                               "hop_length": self.hop_length, "n_mels": self.n_mels},
            "projector_window_size": self.window_size,
            "projector_downsample_rate": self.downsample_rate,
            "padding_value": 0.0,
            "padding_side": "right",
            "return_attention_mask": True,
        }

    @classmethod
    def from_dict(cls, settings: dict, source: str = "the settings", **kwargs) -> "GraniteSpeechFeatureExtractor":
        """An extractor from transformers-format settings (``to_dict``; ``melspec_kwargs`` nested or flat keys as
        transformers' ``__init__`` takes them); ``kwargs`` (``resample``, ``downmix``) are passed on.

        Raises:
            ValueError: a setting that is not a positive integer, a ``padding_value`` other than 0 (both extractors
                zero-pad), or a ``feature_extractor_type`` of another model; the message names ``source``.
        """
        if not isinstance(settings, dict):
            raise ValueError(f"{source}: the feature extractor settings are a JSON {type(settings).__name__}, not an "
                             "object")
        kind = settings.get("feature_extractor_type", "GraniteSpeechFeatureExtractor")
        if kind != "GraniteSpeechFeatureExtractor":
            raise ValueError(f"{source}: feature_extractor_type is {kind!r}, not GraniteSpeechFeatureExtractor")
        mel = settings.get("melspec_kwargs") or {}
        if not isinstance(mel, dict):
            raise ValueError(f"{source}: melspec_kwargs is a JSON {type(mel).__name__}, not an object")
        values = {
            "sample_rate": mel.get("sample_rate", settings.get("sampling_rate", 16000)),
            "n_fft": mel.get("n_fft", settings.get("n_fft", 512)),
            "win_length": mel.get("win_length", settings.get("win_length", 400)),
            "hop_length": mel.get("hop_length", settings.get("hop_length", 160)),
            "n_mels": mel.get("n_mels", settings.get("n_mels", settings.get("feature_size", 80))),
            "window_size": settings.get("projector_window_size", 15),
            "downsample_rate": settings.get("projector_downsample_rate", 5),
        }
        bad = [f"{k}={v!r}" for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{source}: feature extractor settings must be positive integers: {', '.join(bad)}")
        if settings.get("padding_value", 0.0) not in (0, 0.0):
            raise ValueError(f"{source}: padding_value {settings['padding_value']!r}; Granite Speech pads with 0.0")
        return cls(**values, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], **kwargs) -> "GraniteSpeechFeatureExtractor":
        """The extractor a checkpoint folder describes, read as transformers reads it: ``processor_config.json``'s
        ``audio_processor`` (or ``feature_extractor``) section, else ``preprocessor_config.json``, else the model's
        ``config.json`` (its ``window_size`` and ``downsample_rate``; the mel settings at their defaults).

        Raises:
            FileNotFoundError: none of the three files is in ``folder``.
            ValueError: a file that is not JSON, or settings ``from_dict`` refuses (the file is named).
        """
        import json

        folder = Path(folder)
        for name, section in (("processor_config.json", ("audio_processor", "feature_extractor")),
                              ("preprocessor_config.json", None), ("config.json", "model")):
            path = folder / name
            if not path.is_file():
                continue
            try:
                doc = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path} is a JSON {type(doc).__name__}, not an object")
            if section == "model":
                settings = {"projector_window_size": doc.get("window_size", 15),
                            "projector_downsample_rate": doc.get("downsample_rate", 5)}
            elif section is None:
                settings = doc
            else:
                settings = next((doc[k] for k in section if k in doc), None)
                if settings is None:
                    continue  # a processor file without audio settings: the next file says them
            return cls.from_dict(settings, source=str(path), **kwargs)
        raise FileNotFoundError(f"{folder} has no processor_config.json, preprocessor_config.json or config.json to "
                                "read the feature extractor settings from")

    def token_counts(self, num_samples: Sequence[int]) -> list[int]:
        """Audio tokens of clips of ``num_samples`` samples each (``audio_token_count`` with these settings): what
        ``__call__`` reports as ``audio_token_counts``, without computing a spectrogram."""
        return [audio_token_count(int(n), self.window_size, self.downsample_rate, self.hop_length) for n in num_samples]

    def __call__(
        self, audio: AudioInput, sampling_rate: Optional[int] = None, device: Union[str, torch.device, None] = None
    ) -> AudioFeatures:
        """Compute features for one clip or a batch.

        Args:
            audio: one of
                * 1-D tensor / numpy array [samples]: one mono clip;
                * 2-D tensor / numpy array [batch, samples]: equal-length mono clips;
                * list of clips, each 1-D [samples] or 2-D [channels, samples] (tensor or numpy), any lengths;
                * a file path (str / Path) or a list of paths (and clips), read with ``load_wav``.
                Samples are floating point in [-1, 1]; integer PCM is rejected (divide int16 by 32768 first).
            sampling_rate: Hz of the array inputs; ``None`` means ``self.sample_rate``. Files carry their own rate.
            device: where to compute; ``None`` keeps the audio's device (CPU for numpy and files).

        Returns:
            ``AudioFeatures`` (see its docstring for shapes).

        Raises:
            TypeError: unsupported input type (not a tensor, numpy array or path).
            ValueError: non-floating dtype (e.g. int16 PCM), no clips, an empty clip, NaN/Inf samples, float samples
                at integer scale (a peak above 2.0: int16 PCM not divided by 32768), wrong rank, a sample rate other
                than ``self.sample_rate`` without ``resample=True``, several channels without ``downmix=True`` (a 2-D
                array with at most 8 columns and more rows is one clip in soundfile's [samples, channels] layout),
                or a batch shorter than ``n_fft // 2 + 1`` samples (reflect padding needs more).
        """
        clips = [self._mono(wave, rate, name) for wave, rate, name in self._split(audio, sampling_rate)]
        lengths = [int(c.shape[-1]) for c in clips]
        if max(lengths) <= self.n_fft // 2:
            raise ValueError(
                f"audio too short: the longest clip has {max(lengths)} samples, need at least {self.n_fft // 2 + 1}"
                f" ({(self.n_fft // 2 + 1) / self.sample_rate * 1000:.1f} ms at {self.sample_rate} Hz)"
            )
        batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True, padding_value=0.0)
        if device is not None:
            batch = batch.to(device)
        counts = [audio_token_count(n, self.window_size, self.downsample_rate, self.hop_length) for n in lengths]
        counts_t = torch.tensor(counts, device=batch.device)
        mask = torch.arange(max(counts), device=batch.device)[None, :] < counts_t[:, None]
        return AudioFeatures(self.log_mel(batch), mask, counts, lengths)

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Stacked log-mel features of a padded batch: float32 [B, samples] -> float32 [B, T // 2, 2 * n_mels].

        T = samples // hop_length + 1 mel frames; the formula is HF's ``_extract_mel_spectrograms``.
        """
        mel_module = self.mel.to(waveforms.device)
        with torch.no_grad():
            logmel = mel_module(waveforms.float()).transpose(-1, -2).clip(min=1e-10).log10()
            peak = logmel.amax(dim=(-2, -1), keepdim=True)
            logmel = torch.maximum(logmel, peak - 8.0) / 4 + 1
            frames = logmel.shape[1] - logmel.shape[1] % 2
            return logmel[:, :frames].reshape(logmel.shape[0], frames // 2, 2 * logmel.shape[-1])

    def _split(self, audio: AudioInput, sampling_rate: Optional[int]) -> list[tuple[torch.Tensor, int, str]]:
        """Turn any accepted input into a list of (clip [samples] or [channels, samples], sample rate, name), the name
        being the file path, or ``clip i`` for arrays, for error messages."""
        rate = self.sample_rate if sampling_rate is None else int(sampling_rate)
        if isinstance(audio, (str, Path)):
            return [self._read(audio, sampling_rate)]
        if isinstance(audio, (torch.Tensor, np.ndarray)):
            tensor = _as_float_tensor(audio, "audio")
            if tensor.ndim == 1:
                return [(tensor, rate, "clip 0")]
            if tensor.ndim == 2:
                if tensor.shape[1] <= _MAX_CHANNELS < tensor.shape[0]:
                    # soundfile's [samples, channels] layout, not [batch, samples] (a batch of 1..8-sample clips)
                    if not self.downmix:
                        raise ValueError(
                            f"audio has shape {tuple(tensor.shape)}: soundfile's [samples, channels] layout of one "
                            f"{tensor.shape[1]}-channel clip; pass downmix=True to average the channels, or give "
                            "audio.T with downmix=True ([channels, samples])")
                    return [(tensor.T, rate, "clip 0")]
                return [(row, rate, f"clip {i}") for i, row in enumerate(tensor)]
            raise ValueError(
                f"audio tensor must be 1-D [samples] or 2-D [batch, samples], got shape {tuple(tensor.shape)};"
                " pass multi-channel clips as a list of [channels, samples] tensors with downmix=True"
            )
        if isinstance(audio, Sequence):
            if len(audio) == 0:
                raise ValueError("no audio given: the list of clips is empty")
            out = []
            for i, item in enumerate(audio):
                if isinstance(item, (str, Path)):
                    out.append(self._read(item, sampling_rate))
                    continue
                if not isinstance(item, (torch.Tensor, np.ndarray)):
                    raise TypeError(f"clip {i} is a {type(item).__name__}; give a tensor, numpy array or WAV path")
                tensor = _as_float_tensor(item, f"clip {i}")
                if tensor.ndim not in (1, 2):
                    raise ValueError(
                        f"clip {i} must be 1-D [samples] or 2-D [channels, samples], got shape {tuple(tensor.shape)}"
                    )
                out.append((tensor, rate, f"clip {i}"))
            return out
        raise TypeError(
            f"unsupported audio input {type(audio).__name__}; give a tensor, numpy array, WAV path or a list of these"
        )

    def _read(self, path: Union[str, Path], sampling_rate: Optional[int]) -> tuple[torch.Tensor, int, str]:
        wave, rate = load_wav(path)
        if sampling_rate is not None and int(sampling_rate) != rate:
            raise ValueError(f"{path} is {rate} Hz but sampling_rate={sampling_rate} was given; drop sampling_rate")
        return wave, rate, str(path)

    def _mono(self, wave: torch.Tensor, rate: int, index: str) -> torch.Tensor:
        """Check one clip and return it as float32 [samples] at ``self.sample_rate``."""
        if wave.ndim == 2:
            if wave.shape[0] > 1 and not self.downmix:
                raise ValueError(
                    f"{index} has {wave.shape[0]} channels ([channels, samples] = {tuple(wave.shape)});"
                    " the model takes mono audio: pass downmix=True to average the channels"
                )
            wave = wave.mean(dim=0) if wave.shape[0] > 1 else wave[0]
        if wave.shape[-1] == 0:
            raise ValueError(f"{index} is empty (0 samples)")
        bad = int((~torch.isfinite(wave)).sum())
        if bad:
            raise ValueError(f"{index} has {bad} NaN/Inf samples out of {wave.shape[-1]}; clean the audio first")
        peak = float(wave.abs().max())
        if peak > _INT16_SCALE_PEAK:
            raise ValueError(f"{index} peaks at {peak:.6g}: integer PCM stored as floats (int16 peaks near "
                             "32767), not samples in [-1, 1]; divide by 32768 (or read the file with load_wav)")
        if rate != self.sample_rate:
            if not self.resample:
                raise ValueError(
                    f"{index} is sampled at {rate} Hz but the model expects {self.sample_rate} Hz;"
                    " pass resample=True to resample it"
                )
            wave = torchaudio.functional.resample(wave, rate, self.sample_rate)
        return wave


def _as_float_tensor(audio: Union[torch.Tensor, np.ndarray], what: str) -> torch.Tensor:
    """float32 copy/view of ``audio``; ValueError for integer, bool, complex or object dtypes."""
    is_float = (
        torch.is_floating_point(audio) if isinstance(audio, torch.Tensor) else np.issubdtype(audio.dtype, np.floating)
    )
    if not is_float:
        raise ValueError(
            f"{what} has dtype {audio.dtype}; samples must be floating point in [-1, 1]"
            " (for int16 PCM divide by 32768, or read the file with load_wav)"
        )
    if isinstance(audio, np.ndarray):
        return torch.from_numpy(np.array(audio, dtype=np.float32))  # a copy: writable, native byte order
    return audio.float()
