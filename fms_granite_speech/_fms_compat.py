"""Every private ibm-fms name this project uses, in one place, checked against the pinned ibm-fms version.

FMS 1.13.1 offers public hooks for most of what a new model needs (``register_model``, ``register_adapter_step``,
``register_adapter``, ``get_adapted``, ``load_state_dict_into_model``). Four things it does not expose publicly:

* the adapter steps another architecture registered (``serialization.__adapter_steps``): the LoRA B rows of q/k
  must go through FMS granite's own ``hf_to_fms_rope`` step so they line up with the permuted base rows;
* the assembled adapter of an architecture (``serialization._get_adapter``), applied group by group by
  ``checkpoint.load_checkpoint``;
* FMS's grouping of checkpoint keys into per-layer partial state dicts (``serialization._find_key_neighbors``), so
  the project's strict loader hands the adapter exactly what ``get_model`` would;
* the HF-config registry behind ``get_model("hf_pretrained", model_path=DIR)``
  (``fms.models.hf.config_utils._FMS_MODEL_CONFIG_REGISTRY``).

Importing this module checks the installed ibm-fms version: these names are not part of FMS's API and may move in
another release, so any other version fails here with one clear message instead of somewhere deep in a load.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable, Mapping, Set

__all__ = [
    "FMS_VERSION",
    "SUPPORTED_FMS_VERSIONS",
    "adapter",
    "hf_architectures",
    "hf_config_params",
    "key_neighbors",
    "model_instance",
    "register_hf_config",
    "registered_step",
]

SUPPORTED_FMS_VERSIONS = ("1.13.1",)


def _installed_version() -> str:
    try:
        return importlib.metadata.version("ibm-fms")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("ibm-fms is not installed; install this project with `pip install -e .` (it pins "
                          f"ibm-fms=={SUPPORTED_FMS_VERSIONS[0]})") from None


FMS_VERSION = _installed_version()
if FMS_VERSION not in SUPPORTED_FMS_VERSIONS:
    raise ImportError(
        f"fms_granite_speech needs ibm-fms {' or '.join(SUPPORTED_FMS_VERSIONS)} but {FMS_VERSION} is installed: it "
        "relies on FMS internals (serialization.__adapter_steps, _get_adapter, _find_key_neighbors, "
        f"_FMS_MODEL_CONFIG_REGISTRY) that other releases may change; `pip install ibm-fms=={SUPPORTED_FMS_VERSIONS[0]}`"
    )

from fms.utils import serialization as _serialization  # noqa: E402  (after the version check)


def registered_step(architecture: str, name: str) -> Callable[..., Mapping[str, Any]]:
    """The adapter step ``name`` that ``architecture`` registered with ``serialization.register_adapter_step``.

    Raises:
        RuntimeError: no such step (an ibm-fms change; the message names the step).
    """
    steps = vars(_serialization)["__adapter_steps"].get(architecture, {})
    if name not in steps:
        raise RuntimeError(f"FMS {architecture} adapter step {name!r} is not registered in ibm-fms {FMS_VERSION}")
    return steps[name]


def adapter(architecture: str, source: str) -> Callable[..., Mapping[str, Any]]:
    """The whole registered adapter (all steps, in order) of ``architecture`` for checkpoints from ``source``."""
    return _serialization._get_adapter(architecture, source)


def key_neighbors(key: str, keys: Set[str]) -> list[str]:
    """The keys FMS's loader hands to an adapter together with ``key``: everything up to the first layer number."""
    return _serialization._find_key_neighbors(key, keys)


def register_hf_config(hf_architecture: str, fms_architecture: str, param_builder: Callable[[Any], dict]) -> None:
    """Map a transformers ``architectures`` entry to an FMS architecture for ``get_model("hf_pretrained")``."""
    from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY

    _FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info(hf_architecture, fms_architecture, param_builder)


def hf_config_params(hf_config: Any) -> dict:
    """FMS's ``get_model`` keyword arguments for a transformers config (``architecture``, ``variant`` and the model's
    fields), as ``get_model("hf_pretrained", ...)`` derives them, through FMS's HF-config registry; ``model_path`` is
    left out.

    Raises:
        KeyError: the config's ``architectures[0]`` is not in FMS's registry (FMS's own message);
        ValueError: the config names no architecture.
    """
    from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY

    params = dict(_FMS_MODEL_CONFIG_REGISTRY.hf_config_to_fms_config_params(hf_config, model_path=None))
    params.pop("model_path", None)
    return params


def hf_architectures() -> dict[str, str]:
    """transformers ``architectures`` entry -> FMS architecture, as FMS's HF-config registry maps them."""
    from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY

    return dict(_FMS_MODEL_CONFIG_REGISTRY.model_arch_mappings)


def model_instance(architecture: str, variant: str, params: Mapping[str, Any]) -> Any:
    """An FMS model of ``architecture`` / ``variant`` with ``params``, built on the meta device and materialised on
    the CPU without ``reset_parameters`` (``fms.models._get_model_instance`` + ``to_empty`` + ``post_init``), which
    is what ``get_model`` does when it loads a checkpoint. Some FMS models cannot be built with random weights
    through ``get_model`` (ibm-fms 1.13.1's siglip_vision ``reset_parameters`` recurses into itself)."""
    import torch
    from fms import models as _models

    model = _models._get_model_instance(architecture, variant, dtype=torch.float32, device=torch.device("meta"),
                                        extra_args=dict(params))
    model.to_empty(device="cpu")
    post = getattr(model, "post_init", None)
    if callable(post):
        post()
    return model
