"""The two models under comparison, holding the same weights, and the inputs both of them are fed.

``build_pair()`` makes the HF reference (``transformers.GraniteSpeechForConditionalGeneration``) and the FMS model
(``fms_granite_speech.model.GraniteSpeech``) from one set of weights:

* default (no checkpoint): the HF model with seeded, realistic random weights (``testing.build_hf_model``, a
  non-zero LoRA adapter included), converted into the FMS model by the adapter registered with FMS
  (``fms.utils.serialization.load_state_dict_into_model(..., "granite_speech", "hf")``), i.e. the real loading code;
* ``checkpoint=DIR``: HF loads the folder with ``from_pretrained`` (and its peft adapter when the folder has one),
  FMS with ``fms_granite_speech.checkpoint.load_checkpoint(DIR)``.

Both are put in ``eval()`` (dropout off, BatchNorm on running statistics), in the same dtype, on the same device.
``build_inputs()`` turns audio + a prompt into the one set of tensors both models get.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from fms_granite_speech.config import GraniteSpeechConfig, get_config

__all__ = ["DEFAULT_PROMPT", "DTYPES", "ModelPair", "ParityInputs", "build_inputs", "build_pair", "parse_dtype"]

DEFAULT_PROMPT = "USER: <|audio|> can you transcribe the speech? ASSISTANT:"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` or a name (``"float32"``, ``"bf16"``...) -> a floating ``torch.dtype``.

    Raises:
        ValueError: an unknown name or a non-floating dtype (the message lists the accepted names).
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _parse_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"bad device {device!r}: {err}; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported by the parity engine; use 'cpu' or 'cuda'")
    return dev


@dataclass
class ModelPair:
    """The HF reference and the FMS model, same weights, same dtype and device, both in eval mode.

    Attributes:
        hf: ``GraniteSpeechForConditionalGeneration`` (with a peft LoRA adapter when the config has one).
        fms: ``fms_granite_speech.model.GraniteSpeech``.
        config: the ``GraniteSpeechConfig`` both were built for.
        variant: the named variant (None for a checkpoint), checkpoint: the folder (None for random weights).
        seed: the weight seed of a random-weight pair (None for a checkpoint).
        tokenizer: the tokenizer ``build_inputs`` uses (the checkpoint's, else ``build_test_tokenizer``).
    """

    hf: nn.Module
    fms: nn.Module
    config: GraniteSpeechConfig
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    variant: Optional[str] = None
    checkpoint: Optional[str] = None
    seed: Optional[int] = None
    tokenizer: Any = None

    def provenance(self) -> dict:
        """JSON-safe description of where the weights came from and how both models run."""
        has_lora = bool(getattr(self.hf, "_hf_peft_config_loaded", False))
        return {
            "variant": self.variant,
            "checkpoint": self.checkpoint,
            "weights": "checkpoint" if self.checkpoint else f"seeded random (testing.build_hf_model, seed {self.seed})",
            "conversion": "fms_granite_speech.checkpoint.load_checkpoint" if self.checkpoint
            else 'fms load_state_dict_into_model(..., "granite_speech", "hf")',
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "lora": None if not has_lora or self.config.lora is None else {
                "rank": self.config.lora.rank, "alpha": self.config.lora.alpha,
                "targets": list(self.config.lora.target_modules)},
        }

    def get_tokenizer(self):
        """The tokenizer for this pair (built on first use)."""
        if self.tokenizer is None:
            from fms_granite_speech.tokenizer_utils import build_test_tokenizer

            self.tokenizer = build_test_tokenizer(self.config.decoder.src_vocab_size, self.config.audio_token_index)
        return self.tokenizer


def build_pair(
    variant: str = "tiny",
    checkpoint: Union[None, str, Path] = None,
    seed: int = 0,
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> ModelPair:
    """Build the HF reference and the FMS model with the same weights.

    Args:
        variant: named config (``tiny``, ``3.3-2b``, ``3.3-8b``) for random weights; ignored with ``checkpoint``.
        checkpoint: an HF-format Granite Speech folder (``config.json`` + safetensors, optional peft adapter).
        seed: weight seed for random weights.
        dtype: both models' dtype (weights are made in float32 and cast, so both sides round identically).
        device: ``cpu`` or ``cuda``.

    Raises:
        ValueError: unknown variant or dtype, CUDA requested without CUDA, a folder that is not an HF Granite
            Speech checkpoint.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    dtype = parse_dtype(dtype)
    dev = _parse_device(device)
    if checkpoint is not None:
        return _pair_from_checkpoint(Path(checkpoint), dtype, dev)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = get_config(variant)

    from fms.utils.serialization import load_state_dict_into_model

    from fms_granite_speech.model import GraniteSpeech
    from fms_granite_speech.testing import build_hf_model

    hf = build_hf_model(config, seed=seed, dtype=torch.float32, device="cpu")
    # Built on the meta device, as FMS's get_model does: every tensor must then come from the HF state dict, and
    # post_init() refuses a model with a tensor no key filled (the adapter's last step refuses unknown keys).
    with torch.device("meta"):
        fms = GraniteSpeech(config)
    load_state_dict_into_model(fms, dict(hf.state_dict()), "granite_speech", "hf")
    fms.post_init()
    hf = hf.to(device=dev, dtype=dtype).eval()
    fms = fms.to(device=dev, dtype=dtype).eval()
    return ModelPair(hf=hf, fms=fms, config=config, dtype=dtype, device=dev, variant=variant, seed=seed)


def _pair_from_checkpoint(path: Path, dtype: torch.dtype, device: torch.device) -> ModelPair:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"{path} is not an HF checkpoint folder (no config.json); give the folder save_pretrained "
                         "wrote or a downloaded ibm-granite/granite-speech-3.3-* snapshot")
    import json

    from transformers import GraniteSpeechForConditionalGeneration

    from fms_granite_speech.checkpoint import load_checkpoint

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as err:
        raise ValueError(f"{path / 'config.json'} is not readable JSON: {err}") from None
    if model_type != "granite_speech":
        raise ValueError(f"{path} holds a {model_type!r} checkpoint, not granite_speech")
    try:
        hf = GraniteSpeechForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"transformers cannot load {path}: {str(err).splitlines()[0]}") from None
    if (path / "adapter_config.json").is_file() and not getattr(hf, "_hf_peft_config_loaded", False):
        hf.load_adapter(str(path))
    fms = load_checkpoint(path, dtype=dtype, device=device)
    config = fms.config
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    hf = hf.to(device=device, dtype=dtype).eval()
    fms = fms.to(device=device, dtype=dtype).eval()
    return ModelPair(hf=hf, fms=fms, config=config, dtype=dtype, device=device, checkpoint=str(path),
                     tokenizer=tokenizer)


# -- inputs -----------------------------------------------------------------------------------------------------------


@dataclass
class ParityInputs:
    """One set of inputs for both models.

    Attributes:
        input_ids: int64 [B, L] prompt tokens, each ``<|audio|>`` expanded to its clip's audio-token count.
        input_features: [B, T, 160] stacked log-mels in the pair's dtype (T encoder frames of 20 ms), or None for
            text-only inputs.
        input_features_mask: bool [B, N] real audio tokens per clip, or None.
        audio: description of each clip (file path or ``tensor[samples]``).
        prompt: the prompt text(s) before expansion.
    """

    input_ids: torch.Tensor
    input_features: Optional[torch.Tensor] = None
    input_features_mask: Optional[torch.Tensor] = None
    audio: list[str] = field(default_factory=list)
    prompt: Optional[Union[str, list[str]]] = None

    def describe(self) -> dict:
        """JSON-safe summary: audio sources, prompt, tensor shapes and dtypes."""
        def shape(t):
            return None if t is None else {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}

        return {"audio": list(self.audio), "prompt": self.prompt, "input_ids": shape(self.input_ids),
                "input_features": shape(self.input_features),
                "input_features_mask": shape(self.input_features_mask),
                "audio_tokens": None if self.input_features_mask is None
                else [int(n) for n in self.input_features_mask.sum(dim=1).tolist()]}


AudioArg = Union[None, str, Path, torch.Tensor, Sequence[Union[str, Path, torch.Tensor]]]


def build_inputs(pair: ModelPair, audio: AudioArg = None, prompt: Union[str, Sequence[str]] = DEFAULT_PROMPT,
                 sampling_rate: Optional[int] = None) -> ParityInputs:
    """Features and token ids for ``pair`` (the same tensors go to both models).

    Args:
        pair: the ``ModelPair`` (its tokenizer, dtype and device are used).
        audio: a WAV path, a float waveform tensor [samples] (16 kHz unless ``sampling_rate``), or a list of them;
            None means the default shipped clip (``features.shipped_audio()``).
        prompt: text with one ``<|audio|>`` per clip, or one prompt per clip; a single prompt with one placeholder
            is repeated for every clip.
        sampling_rate: Hz of tensor audio.

    Raises:
        FileNotFoundError: an audio path does not exist.
        ValueError: undecodable audio, a placeholder count that does not match the clips, or a tokenizer whose
            audio token id differs from ``config.audio_token_index``.
    """
    from fms_granite_speech.features import shipped_audio
    from fms_granite_speech.processor import GraniteSpeechProcessor

    if audio is None:
        clips: list = [shipped_audio()]
    elif isinstance(audio, (str, Path)) or (isinstance(audio, torch.Tensor) and audio.dim() == 1):
        clips = [audio]
    elif isinstance(audio, torch.Tensor):
        clips = list(audio)
    else:
        clips = list(audio)
    described = []
    for clip in clips:
        if isinstance(clip, (str, Path)):
            if not Path(clip).is_file():
                raise FileNotFoundError(f"audio file not found: {clip}")
            described.append(str(clip))
        elif isinstance(clip, torch.Tensor):
            described.append(f"tensor{list(clip.shape)}")
        else:
            raise TypeError(f"audio must be WAV paths or waveform tensors, got {type(clip).__name__}")
    texts = [prompt] * len(clips) if isinstance(prompt, str) and prompt.count("<|audio|>") == 1 else prompt
    processor = GraniteSpeechProcessor(pair.get_tokenizer())
    if processor.audio_token_id != pair.config.audio_token_index:
        raise ValueError(f"the tokenizer maps <|audio|> to id {processor.audio_token_id} but the model expects "
                         f"audio_token_index={pair.config.audio_token_index}; use the checkpoint's own tokenizer")
    out = processor(texts, audio=clips, sampling_rate=sampling_rate)
    return ParityInputs(
        input_ids=out["input_ids"].to(pair.device),
        input_features=out["input_features"].to(device=pair.device, dtype=pair.dtype),
        input_features_mask=out["input_features_mask"].to(pair.device),
        audio=described,
        prompt=prompt if isinstance(prompt, str) else list(prompt),
    )
