"""Loading HF Granite Speech checkpoint folders (config.json, safetensors shards, peft LoRA adapter) into FMS.

A folder written by transformers holds ``config.json``, either ``model.safetensors`` or
``model.safetensors.index.json`` plus the shards it names, and optionally a peft adapter (``adapter_config.json``
+ ``adapter_model.safetensors``). ``load_checkpoint`` opens exactly those files with ``safetensors`` (never pickle),
converts them with the same adapter steps ``get_model(..., source="hf")`` uses (registered in
``fms_granite_speech.model``), and refuses a checkpoint that does not fit the model: one ``ValueError`` lists every
missing tensor, unexpected tensor and wrong shape.

FMS's own ``get_model`` globs every ``*.safetensors`` in a folder, so a folder holding a stale second shard set
would be mixed in silently; ``check_safetensors_folder(..., for_glob=True)`` (run by the ``granite_speech`` factory
inside ``get_model``) refuses such a folder instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from fms_granite_speech._strict import template_regex
from fms_granite_speech.config import GraniteSpeechConfig, LoRAConfig, get_config

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "check_safetensors_folder", "load_checkpoint", "read_lora_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"

# peft options that change what the adapter computes; this port merges plain LoRA (scale alpha / r) only.
_UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": "DoRA",
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r))",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "a subset of layers",
    "layer_replication": "layer replication",
    "modules_to_save": "fully trained extra modules",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "LoRA biases",
    "target_parameters": "parameter targets",
    "trainable_token_indices": "trainable tokens",
    "exclude_modules": "excluded modules",
    "use_qalora": "QA-LoRA",
}


def read_lora_config(path: Union[str, Path]) -> Optional[LoRAConfig]:
    """The LoRA adapter described by a folder's ``adapter_config.json`` (peft format), or None without one.

    ``target_modules`` may be a list of module names (peft matches a name or a dotted suffix, e.g. the released
    ``["q_proj", "v_proj"]``) or a regular expression over full module names (as ``add_adapter`` with a regex
    writes it); both are resolved to the decoder projections they select.

    Args:
        path: the checkpoint folder, or the ``adapter_config.json`` file itself.

    Returns:
        ``LoRAConfig(rank=r, alpha=lora_alpha, target_modules=(...))`` in ``model.LORA_TARGETS`` order, or None.

    Raises:
        ValueError: not a LoRA adapter, an option this port cannot merge (DoRA, rsLoRA, rank patterns, ...), or a
            target that is not one of the decoder projections (q/k/v/o_proj, gate/up/down_proj).
    """
    from fms_granite_speech.model import LORA_TARGETS

    path = Path(path)
    file = path / ADAPTER_CONFIG if path.is_dir() else path
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{file}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    for option, what in _UNSUPPORTED_PEFT_OPTIONS.items():
        if cfg.get(option):
            raise ValueError(f"{file}: {option}={cfg[option]!r} ({what}) is not supported by this port's LoRA merge")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{file}: needs an integer r >= 1 and a numeric lora_alpha, got r={rank!r}, "
                         f"lora_alpha={alpha!r}")

    # Full module names a decoder projection has in HF Granite Speech (5.x runtime and 4.x layouts).
    def names(target: str) -> list[str]:
        site = LORA_TARGETS[target].hf_site
        return [f"model.language_model.layers.0.{site}", f"language_model.model.layers.0.{site}"]

    spec = cfg.get("target_modules")
    if isinstance(spec, str):
        targets = [t for t in LORA_TARGETS if any(re.fullmatch(spec, n) for n in names(t))]
        if not targets:
            raise ValueError(
                f"{file}: target_modules regex {spec!r} selects none of the decoder projections this port can "
                f"merge ({', '.join(LORA_TARGETS)})"
            )
    elif isinstance(spec, (list, tuple)) and spec:
        targets = []
        for entry in spec:
            hits = [t for t in LORA_TARGETS if any(n == entry or n.endswith("." + entry) for n in names(t))]
            if not hits:
                raise ValueError(
                    f"{file}: LoRA target {entry!r} is not a decoder projection this port can merge; supported: "
                    f"{', '.join(LORA_TARGETS)}"
                )
            targets += hits
        targets = [t for t in LORA_TARGETS if t in targets]
    else:
        raise ValueError(f"{file}: target_modules must be a non-empty list or a regex string, got {spec!r}")
    return LoRAConfig(rank=rank, alpha=float(alpha), target_modules=tuple(targets))


def check_safetensors_folder(path: Union[str, Path], *, for_glob: bool = False) -> tuple[list[Path], Optional[Path]]:
    """The model weight files of a checkpoint folder, and its adapter weights file (or None).

    With ``model.safetensors.index.json`` the model files are exactly the shards the index names (each must exist);
    otherwise ``model.safetensors``.

    Args:
        path: the checkpoint folder.
        for_glob: also require that the folder's ``*.safetensors`` files are exactly those files plus
            ``adapter_model.safetensors`` -- what FMS's ``get_model`` (which loads every ``*.safetensors``) needs.

    Raises:
        FileNotFoundError: no such folder, no weights, or a shard named by the index is missing.
        ValueError: the index is unreadable, or (``for_glob``) other ``*.safetensors`` files would be mixed in.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index (needs a 'weight_map' object): {err}") from err
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index.name} names shards that are not in {path}: {', '.join(absent)}")
    elif (path / _SINGLE).is_file():
        files = [path / _SINGLE]
    else:
        raise FileNotFoundError(f"{path} has neither {_INDEX} nor {_SINGLE}: not a safetensors checkpoint folder")
    adapter = path / ADAPTER_WEIGHTS
    adapter = adapter if adapter.is_file() else None
    if for_glob:
        allowed = {f.name for f in files} | {ADAPTER_WEIGHTS}
        extra = sorted(p.name for p in path.glob("*.safetensors") if p.name not in allowed)
        if extra:
            source = f"the shards {_INDEX} names" if index.is_file() else _SINGLE
            raise ValueError(
                f"{path} holds safetensors files besides {source} and {ADAPTER_WEIGHTS}: {', '.join(extra)}. FMS's "
                "get_model loads every *.safetensors in a folder and would mix them in; remove them, or load with "
                "fms_granite_speech.checkpoint.load_checkpoint, which opens only the indexed shards"
            )
    return files, adapter


def _read_config(path: Path, variant: Optional[str], lora: Optional[LoRAConfig]) -> GraniteSpeechConfig:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not an HF Granite Speech checkpoint folder")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if raw.get("model_type") != "granite_speech":
        raise ValueError(f"{file}: model_type={raw.get('model_type')!r}, expected 'granite_speech'")
    config = GraniteSpeechConfig.from_hf(raw).replace(lora=lora)
    if variant is None:
        return config
    named = get_config(variant).replace(lora=lora)
    if named != config:
        fields = [f for f in ("encoder", "projector", "decoder", "audio_token_index") if getattr(named, f) !=
                  getattr(config, f)]
        raise ValueError(
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
):
    """Build a ``GraniteSpeech`` from an HF checkpoint folder, strictly.

    Reads config.json (and adapter_config.json for the LoRA rank / alpha / targets), opens only the shards
    ``model.safetensors.index.json`` names (or ``model.safetensors``) plus ``adapter_model.safetensors`` with
    ``safetensors``, converts the tensors group by group with the registered ``granite_speech`` "hf" adapter, and
    calls ``post_init`` (LoRA merged and enabled, eval mode).

    Args:
        path: the checkpoint folder.
        variant: a named variant ("tiny", "3.3-2b", "3.3-8b") the folder must match; None takes config.json as is.
        dtype: cast every tensor to this dtype; None keeps the checkpoint's dtypes.
        device: where the tensors are loaded.
        adapter: False ignores the LoRA adapter files (base model only, ``config.lora = None``).

    Returns:
        the model, in eval mode.

    Raises:
        FileNotFoundError: missing folder / config.json / weights / indexed shard.
        ValueError: config.json declares a LoRA adapter (``has_lora_adapter``) but the folder has none (pass
            ``adapter=False``), an unsupported adapter, a config that does not match ``variant``, or tensors that do
            not fit: one message naming every missing tensor, unexpected tensor and wrong shape (expected vs got).
    """
    from safetensors import safe_open

    from fms.utils import serialization

    from fms_granite_speech.conformer import FMS_OPTIONAL_KEYS
    from fms_granite_speech.model import GraniteSpeech, expected_shapes

    path = Path(path)
    files, adapter_file = check_safetensors_folder(path)
    lora = read_lora_config(path) if adapter else None
    if adapter and lora is None:
        declared = json.loads((path / "config.json").read_text()).get("has_lora_adapter", False) if (
            path / "config.json").is_file() else False
        if declared:
            raise ValueError(
                f"{path}/config.json declares has_lora_adapter=true but the folder has no {ADAPTER_CONFIG}; pass "
                "adapter=False to load the base model without the audio LoRA"
            )
    if lora is not None and adapter_file is None:
        raise FileNotFoundError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = _read_config(path, variant, lora)
    if lora is not None:
        files = files + [adapter_file]

    device = torch.device(device)
    with torch.device("meta"):
        model = GraniteSpeech(config)
    shapes = expected_shapes(config)
    hf_adapter = serialization._get_adapter("granite_speech", "hf")

    handles = [safe_open(str(f), framework="pt", device=str(device)) for f in files]
    where: dict[str, int] = {}
    problems: list[tuple[str, str]] = []  # (key, message)
    for n, handle in enumerate(handles):
        for key in handle.keys():
            if key in where:
                problems.append((key, f"tensor {key!r} is stored twice ({files[where[key]].name} and {files[n].name})"))
            where[key] = n

    loaded: set[str] = set()
    remaining = set(where)
    while remaining:
        # The same grouping FMS's loader uses (keys up to the first layer number travel together).
        key = min(remaining)
        group = {key, *serialization._find_key_neighbors(key, remaining - {key})}
        remaining -= group
        partial = {k: handles[where[k]].get_tensor(k) for k in group}
        adapted = hf_adapter(partial, model_config=config, problems=problems)
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in adapted.items()}
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded.update(tensors)

    optional = [template_regex("encoder." + t) for t in FMS_OPTIONAL_KEYS]
    tied = {"decoder.head.weight"} if config.decoder.tie_heads else set()
    present = loaded | {key for key, _ in problems}
    missing = [k for k in shapes if k not in present and k not in tied and not any(p.match(k) for p in optional)]
    messages = [f"missing tensor {k!r}" for k in missing] + [message for _, message in problems]
    if messages:
        raise ValueError(f"checkpoint {path} does not fit the model ({len(messages)} problems): " + "; ".join(messages))
    model.post_init()
    return model
