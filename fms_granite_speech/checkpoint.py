"""Loading HF Granite Speech checkpoint folders (config.json, safetensors shards, peft LoRA adapter) into FMS, strictly.

``load_checkpoint`` checks the folder first (``folder.check_checkpoint_folder``: safetensors only, one weight set,
complete files), opens exactly the files the folder's index names with ``safetensors`` (never pickle), converts them
group by group with the same ``granite_speech`` "hf" adapter ``get_model(..., source="hf")`` uses
(``fms_granite_speech.registration``), and refuses a checkpoint that does not fit the model: one ``ValueError`` lists
every missing tensor, unexpected tensor and wrong shape. Tensors are read lazily, one layer's group at a time, and
cast to the requested dtype as they are read, so no full-precision copy of the model is ever held.
"""

import json
from pathlib import Path
from typing import Optional, Union

import torch

from fms_granite_speech import _fms_compat
from fms_granite_speech.config import MODEL_TYPES, GraniteSpeechConfig, LoRAConfig, get_config
from fms_granite_speech.folder import (ADAPTER_WEIGHTS, CheckpointFolderError, check_checkpoint_folder,
                                       check_safetensors_folder, read_config_json, read_json)
from fms_granite_speech.lora import ADAPTER_CONFIG, read_lora_config

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "check_checkpoint", "check_safetensors_folder", "load_checkpoint",
           "read_config",
           "read_lora_config"]


def read_config(path: Union[str, Path], variant: Optional[str] = None, lora: Optional[LoRAConfig] = None
                ) -> GraniteSpeechConfig:
    """The ``GraniteSpeechConfig`` of a checkpoint folder's config.json, with ``lora`` (None: no adapter).

    Raises:
        CheckpointFolderError (a ValueError): no / unreadable config.json, not granite_speech, a feature this port
            does not implement, or a config that is not the named ``variant`` (the differing parts are named).
    """
    path = Path(path)
    file = path / "config.json"
    try:
        raw = read_config_json(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFolderError(f"{file} is not readable JSON ({err}); restore the checkpoint's config.json") \
            from None
    if not isinstance(raw, dict) or raw.get("model_type") not in MODEL_TYPES:
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointFolderError(f"{file}: model_type={got!r}, expected one of {', '.join(MODEL_TYPES)}")
    try:
        config = GraniteSpeechConfig.from_hf(raw).replace(lora=lora)
    except (TypeError, KeyError, AttributeError) as err:
        raise CheckpointFolderError(f"{file} is not a valid Granite Speech config: {err}") from None
    if variant is None:
        return config
    named = get_config(variant).replace(lora=lora)
    if named != config:
        fields = [f for f in ("encoder", "projector", "decoder", "audio_token_index")
                  if getattr(named, f) != getattr(config, f)]
        raise CheckpointFolderError(
            f"{file} does not describe the {variant!r} variant (differs in: {', '.join(fields)}); pass variant=None "
            "to take the architecture from config.json"
        )
    return named


def load_checkpoint(
    path: Union[str, Path],
    *,
    variant: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    adapter: bool = True,
    fused_weights: bool = True,
    check_only: bool = False,
):
    """Build a ``GraniteSpeech`` from an HF checkpoint folder, strictly.

    Reads config.json (and adapter_config.json for the LoRA rank / alpha / targets), opens only the shards
    ``model.safetensors.index.json`` names (or ``model.safetensors``) plus ``adapter_model.safetensors`` with
    ``safetensors``, converts the tensors group by group with the registered ``granite_speech`` "hf" adapter, and
    calls ``post_init`` (LoRA merged and enabled, eval mode).

    Args:
        path: the checkpoint folder.
        variant: a named variant ("tiny", "3.3-2b", "3.3-8b") the folder must match; None takes config.json as is.
        dtype: cast every floating tensor to this dtype as it is read; None keeps the checkpoint's dtypes.
        device: where the tensors are loaded.
        adapter: False ignores the LoRA adapter files (base model only, ``config.lora = None``).
        fused_weights: False builds the decoder with FMS's unfused q/k/v and gate/up weights.
        check_only: read only the safetensors headers (names, shapes, dtypes: no tensor data) and run the same
            conversion on meta tensors, so a folder that does not fit its config is refused in a second or two,
            before anything is built (``check_checkpoint``); returns None.

    Returns:
        the model, in eval mode (None with ``check_only``).

    Raises:
        FileNotFoundError: missing folder or indexed shard.
        ValueError: a folder ``folder.check_checkpoint_folder`` refuses, config.json declares a LoRA adapter
            (``has_lora_adapter``) but the folder has none (pass ``adapter=False``), an unsupported adapter, a config
            that does not match ``variant``, or tensors that do not fit: one message naming every missing tensor,
            unexpected tensor and wrong shape (expected vs got).
    """
    from safetensors import SafetensorError, safe_open

    from fms_granite_speech.model import GraniteSpeech
    from fms_granite_speech.registration import ARCHITECTURE, expected_shapes

    path = check_checkpoint_folder(path)
    files, adapter_file = check_safetensors_folder(path, for_glob=True)
    lora = read_lora_config(path) if adapter else None
    if adapter and lora is None and read_json(path / "config.json").get("has_lora_adapter", False):
        raise CheckpointFolderError(
            f"{path}/config.json declares has_lora_adapter=true but the folder has no {ADAPTER_CONFIG}; pass "
            "adapter=False to load the base model without the audio LoRA"
        )
    if lora is not None and adapter_file is None:
        raise FileNotFoundError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = read_config(path, variant, lora).replace(fused_weights=fused_weights)
    if lora is not None:
        files = files + [adapter_file]

    device = torch.device(device)
    with torch.device("meta"):
        model = GraniteSpeech(config)
    config = model.config  # the model's copy (fused_weights applied to the decoder config)
    shapes = expected_shapes(config)
    hf_adapter = _fms_compat.adapter(ARCHITECTURE, "hf")

    try:
        where: dict[str, int] = {}
        problems: list[tuple[str, str]] = []  # (key, message)
        for n, f in enumerate(files):
            with safe_open(str(f), framework="pt", device=str(device)) as handle:
                for key in handle.keys():
                    if key in where:
                        problems.append((key, f"tensor {key!r} is stored twice ({files[where[key]].name} and "
                                              f"{files[n].name})"))
                    where[key] = n

        loaded: set[str] = set()
        remaining = set(where)
        while remaining:
            # The same grouping FMS's loader uses (keys up to the first layer number travel together).
            key = min(remaining)
            group = {key, *_fms_compat.key_neighbors(key, remaining - {key})}
            remaining -= group
            partial = {}
            # Each group opens the shards it needs and closes them after: tensors are copied out of the memory map
            # (``copy=True``), so no mapping outlives its group and the process holds one copy of the weights, not
            # the model plus every mapped shard page it has read (3.3-2b bf16: 9.9 GB anonymous + 5.9 GB mapped
            # file pages before, about the model's 6 GB after).
            for n in sorted({where[k] for k in group}):
                with safe_open(str(files[n]), framework="pt", device=str(device)) as handle:
                    for k in sorted(k for k in group if where[k] == n):
                        if check_only:  # the header's shape and dtype, no data
                            info = handle.get_slice(k)
                            t = torch.empty(info.get_shape(), dtype=_SAFETENSORS_DTYPES.get(info.get_dtype(),
                                                                                              torch.uint8),
                                            device="meta")
                        else:
                            t = handle.get_tensor(k)
                        partial[k] = t.to(dtype if dtype is not None and t.is_floating_point() else t.dtype,
                                          copy=not check_only)
            try:
                adapted = hf_adapter(partial, model_config=config, problems=problems)
            except (RuntimeError, ValueError, IndexError) as err:  # a step's reshape met a tensor of another size
                shown = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(partial.items())[:6])
                problems.append((key, f"tensors of {key.rsplit('.', 2)[0]}... do not fit config.json ({shown}"
                                      f"{' ...' if len(partial) > 6 else ''}): {str(err).strip().splitlines()[0]}"))
                continue
            model.load_state_dict(adapted, strict=False, assign=True)
            loaded.update(adapted)
    except SafetensorError as err:
        raise CheckpointFolderError(f"cannot read the safetensors files of {path}: {err}; re-download or re-save "
                                    "the checkpoint") from None

    tied = {"decoder.head.weight"} if config.decoder.tie_heads else set()
    present = loaded | {key for key, _ in problems}
    missing = [k for k in shapes if k not in present and k not in tied]
    messages = [message for _, message in problems] + [f"missing tensor {k!r}" for k in missing]
    if messages:
        raise ValueError(f"checkpoint {path} does not fit the model ({len(messages)} problems): " + "; ".join(messages))
    if check_only:
        return None
    model.post_init()
    return model


def check_checkpoint(path: Union[str, Path], *, adapter: bool = True, fused_weights: bool = True) -> None:
    """Refuse a folder whose tensors do not fit its config.json (and adapter_config.json), reading only the
    safetensors headers: the checks of ``load_checkpoint`` (every missing, unexpected and mis-shaped tensor, an adapter
    whose rank differs from its tensors) before either side of a comparison is built, in one message.

    Raises:
        FileNotFoundError / ValueError: as ``load_checkpoint``.
    """
    load_checkpoint(path, adapter=adapter, fused_weights=fused_weights, check_only=True)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
