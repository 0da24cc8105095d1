"""Why a layer diverges: the configuration attribute that differs, or the aten op that introduces the error.

``run_parity`` names the first layer that *introduces* an error; this module says why, in two ways a porter can act
on (``explain_row``):

1. **Attributes.** Sub-modules of the HF and FMS row are paired by their weights (the same values, after the
   checkpoint adapter: a tensor equal element for element, reshaped or not, pairs the modules that hold it; torch.nn
   leaves of one class left over on both sides, as many on each, are paired in order); every pair is compared on
   its configuration: the plain attributes both carry (``eps`` and its aliases ``variance_epsilon``, ``epsilon``;
   ``padding``, ``stride``, ``dilation``, ``groups``, ``momentum``, ``affine``, ``elementwise_affine``,
   ``track_running_stats``...), whether a weight and a bias are present, training mode where it changes the result
   (a BatchNorm on batch statistics, a dropout with p > 0), and the function each activation computes (its class;
   ``nn.GELU``'s tanh approximation told from the erf form). A row whose computation HF spreads over several modules
   (``pathmap`` ``covers``) is compared against all of them (``covering_module``). Attributes of the wrappers
   around them (modules that are not ``torch.nn`` leaves, e.g. HF's ``depth_conv`` with its ``padding`` and FMS's
   conv module with its own) are compared by name where the name occurs once on each side. Each difference is one
   line: ``encoder.blocks.0.conv: padding (7, 7) on HF (conv.depth_conv), (8, 6) on FMS (conv)``.
2. **Ops.** The FMS module is run on HF's exact recorded call (the row's replay) under a dispatch-level recorder
   (``torch.utils._python_dispatch.TorchDispatchMode``: every aten op with its inputs and output); each op is run again
   on the same inputs in float64, and the rounding it introduces on its own is its output's rel-L2 against that
   float64 result. The op with the largest share of the summed per-op error is named, with its dtype and share
   (a fused SDPA kernel where HF forces the math one, a normalisation computed in bf16 instead of float32).

Both need the two models in memory (``pair.memory == "together"``); ``run_parity`` explains the first divergent row
and any row asked with ``explain=`` (``parity diff --explain LAYER``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from parity._tree import map_tensors
from parity.pathmap import _covered

__all__ = ["AttributeDiff", "Explanation", "OpError", "attribute_diffs", "config_diffs", "covering_module",
           "expected_weights", "explain_row", "kernel_differences", "meta_reference", "op_errors", "record",
           "rotary_diffs", "weight_diff", "weight_diffs"]

# attribute names that mean the same thing on either side -> one name
ALIASES = {"variance_epsilon": "eps", "epsilon": "eps", "layer_norm_eps": "eps", "norm_eps": "eps",
           "scaling": "scale", "scale_factor": "scale"}
_SIMPLE = (bool, int, float, str)
_IGNORED = {"training", "inplace", "dump_patches", "call_super_init"}  # training: compared on its own


@dataclass
class AttributeDiff:
    """One configuration attribute that differs between paired modules (paths relative to the row's modules)."""

    attribute: str
    hf_value: Any
    fms_value: Any
    hf_path: str
    fms_path: str
    absolute: bool = False  # the paths are the models' own (a module outside the row, e.g. the shared rotary one)

    def line(self, row: str) -> str:
        """``ROW.PATH: ATTRIBUTE HF_VALUE on HF (HF_PATH), FMS_VALUE on FMS (FMS_PATH)``."""
        if self.absolute:
            return (f"{row}: {self.attribute} {self.hf_value!r} on HF ({self.hf_path}), {self.fms_value!r} on FMS "
                    f"({self.fms_path})")
        return (f"{row}.{self.fms_path}: " if self.fms_path else f"{row}: ") + (
            f"{self.attribute} {self.hf_value!r} on HF ({self.hf_path or 'the row module'}), {self.fms_value!r} on "
            f"FMS ({self.fms_path or 'the row module'})")


@dataclass
class OpError:
    """The rounding one aten op introduces on its own: its output against the same op on float64 inputs."""

    index: int
    op: str
    dtype: str
    shape: list
    rel_l2: float
    share: float


@dataclass
class Explanation:
    """Why a row diverges: attribute differences, the ops ranked by the error they introduce, and one summary line."""

    layer: str
    attributes: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    kernels: list = field(default_factory=list)
    text: str = ""
    note: Optional[str] = None
    weights: list = field(default_factory=list)

    def to_dict(self) -> dict:
        from parity._json import json_safe

        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        return cls(layer=data["layer"], attributes=[AttributeDiff(**a) for a in data.get("attributes", [])],
                   ops=[OpError(**{**o, "rel_l2": float(o["rel_l2"]), "share": float(o["share"])})
                        for o in data.get("ops", [])], kernels=list(data.get("kernels", [])),
                   text=data.get("text", ""), note=data.get("note"), weights=list(data.get("weights", [])))


# -- attributes -------------------------------------------------------------------------------------------------------


def _config(module: nn.Module) -> dict:
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _IGNORED:
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
            out[ALIASES.get(key, key)] = value
    for name in ("weight", "bias"):
        if name in module._parameters:
            out[f"{name} present"] = module._parameters[name] is not None
    return out


def _torch_class(module: nn.Module) -> Optional[type]:
    """The torch.nn class a module is, or derives from (FMS's ``BatchNorm1d`` subclass -> ``nn.BatchNorm1d``); None
    for a module of neither."""
    for cls in type(module).__mro__:
        if cls is not nn.Module and cls.__module__.startswith("torch.nn"):
            return cls
    return None


def _is_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


def _direct_weight(module: nn.Module) -> Optional[torch.Tensor]:
    w = module._parameters.get("weight")
    return None if w is None else w.detach()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # a meta-device reference (one model at a time) has no values to pair by
        return False
    return a.numel() == b.numel() and a.numel() > 1 and torch.equal(a.reshape(-1), b.reshape(-1).to(a.dtype))


def _pairs_by_weight(hf: nn.Module, fms: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """Leaf modules of the two rows paired by equal weights; then the torch.nn leaves of one class (or subclasses of
    it) left unpaired on both sides, in module order, when each side has as many of them (a norm whose weight FMS dropped, a Linear
    whose rows a conversion moved: their configuration is still compared)."""
    candidates = [(p, m, _direct_weight(m)) for p, m in fms.named_modules() if _direct_weight(m) is not None]
    used, hf_used, out = set(), set(), []
    for path, module in hf.named_modules():
        w = _direct_weight(module)
        if w is None:
            continue
        for fpath, fmodule, fw in candidates:
            if fpath not in used and _same_values(w, fw):
                used.add(fpath)
                hf_used.add(path)
                out.append((path, module, fpath, fmodule))
                break

    def left(root: nn.Module, taken: set) -> dict:
        by_class: dict = {}
        for path, module in root.named_modules():
            base = _torch_class(module)
            if (path not in taken and base is not None and next(module.children(), None) is None
                    and not _is_activation(module) and (module._parameters or module._buffers)):
                by_class.setdefault(base, []).append((path, module))
        return by_class

    def shapes(module: nn.Module) -> dict:
        return {n: tuple(t.shape) for n, t in module._parameters.items() if t is not None}

    hf_left, fms_left = left(hf, hf_used), left(fms, used)
    for cls, hf_mods in hf_left.items():
        fms_mods = fms_left.get(cls, [])
        # in order, and only where every parameter both hold has one shape: a Linear is never paired with another
        # Linear of other sizes (a meta-device reference has nothing else to pair by)
        if len(fms_mods) == len(hf_mods) and all(
                all(shapes(hm)[n] == shapes(fm)[n] for n in set(shapes(hm)) & set(shapes(fm)))
                for (_, hm), (_, fm) in zip(hf_mods, fms_mods)):
            out.extend((hp, hm, fp, fm) for (hp, hm), (fp, fm) in zip(hf_mods, fms_mods))
            continue
        # else the modules whose parameter shapes occur once on each side (a depthwise Conv1d among pointwise ones)
        hf_by, fms_by = {}, {}
        for side, mods in ((hf_by, hf_mods), (fms_by, fms_mods)):
            for path, module in mods:
                side.setdefault(tuple(sorted(shapes(module).items())), []).append((path, module))
        for key, found in hf_by.items():
            other = fms_by.get(key, [])
            if key and len(found) == 1 and len(other) == 1:
                out.append((*found[0], *other[0]))
    return out


def attribute_diffs(hf: nn.Module, fms: nn.Module) -> list[AttributeDiff]:
    """Configuration differences between the HF and FMS modules of one row (see the module docstring), in HF's
    module order; empty when every paired module is configured alike."""
    diffs: list[AttributeDiff] = []
    pairs = _pairs_by_weight(hf, fms)
    for hpath, hmod, fpath, fmod in pairs:
        a, b = _config(hmod), _config(fmod)
        if type(hmod) is type(fmod) or isinstance(fmod, type(hmod)) or isinstance(hmod, type(fmod)):
            keys = [k for k in sorted(set(a) & set(b)) if a[k] != b[k] and not _close(a[k], b[k])]
            if {"elementwise_affine", "affine"} & set(keys):  # the weight and bias follow from it: one line
                keys = [k for k in keys if k not in ("weight present", "bias present")]
            diffs.extend(AttributeDiff(k, a[k], b[k], hpath, fpath) for k in keys)
        elif "bias present" in a and "bias present" in b and a["bias present"] != b["bias present"]:
            diffs.append(AttributeDiff("bias present", a["bias present"], b["bias present"], hpath, fpath))
    # eval against training mode (BatchNorm on batch statistics, dropout active): paired modules first, then any
    # module of one side in training mode while the other side's row has none
    for hpath, hmod, fpath, fmod in pairs:
        if hmod.training != fmod.training and _mode_matters(hmod):
            diffs.append(AttributeDiff("training", hmod.training, fmod.training, hpath, fpath))
    if not any(d.attribute == "training" for d in diffs):
        hf_train = [p for p, m in hf.named_modules() if m.training and _mode_matters(m)]
        fms_train = [p for p, m in fms.named_modules() if m.training and _mode_matters(m)]
        if bool(hf_train) != bool(fms_train):
            hpath, fpath = (hf_train or [""])[-1], (fms_train or [""])[-1]
            diffs.append(AttributeDiff("training", bool(hf_train), bool(fms_train), hpath, fpath))
    seen = {(d.hf_path, d.fms_path, d.attribute) for d in diffs}

    def wrappers(root: nn.Module) -> dict:
        found: dict = {}
        for path, module in root.named_modules():
            if _is_leaf(module):
                continue
            own = _config(module)
            attrs = dict(own)
            # a module that keeps its settings in a config object (FMS blocks: self.config) -> those fields too
            cfg = getattr(module, "config", None)
            fields = getattr(cfg, "__dataclass_fields__", None)
            if fields:
                for name in fields:
                    value = getattr(cfg, name, None)
                    if isinstance(value, _SIMPLE) and ALIASES.get(name, name) not in attrs:
                        attrs[ALIASES.get(name, name)] = value
            for key, value in attrs.items():
                where = path if key in own else (f"{path}.config" if path else "config")
                found.setdefault(key, []).append((where, value))
        return found

    hw, fw = wrappers(hf), wrappers(fms)
    # a config object's field (HF's Q-Former config: layer_norm_eps) says nothing the paired leaves do not say
    # themselves when they carry that attribute: the leaves are compared, the config field is not
    leaf_keys = {k for hpath, hmod, fpath, fmod in pairs for k in set(_config(hmod)) & set(_config(fmod))}
    for key in sorted(set(hw) & set(fw)):
        hvals, fvals = {repr(v) for _, v in hw[key]}, {repr(v) for _, v in fw[key]}
        if len(hvals) == 1 and len(fvals) == 1:  # one value per side (repeated, e.g. by a config, is one value)
            (hpath, hv), (fpath, fv) = hw[key][0], fw[key][0]
            from_config = hpath.endswith("config") or fpath.endswith("config")
            if from_config and key in leaf_keys:
                continue
            if hv != fv and not _close(hv, fv) and (hpath, fpath, key) not in seen:
                diffs.append(AttributeDiff(key, hv, fv, hpath, fpath))
    # activations: the same position among the activation modules of each side, different classes
    acts = [(p, m) for p, m in hf.named_modules() if _is_activation(m)]
    facts = [(p, m) for p, m in fms.named_modules() if _is_activation(m)]
    if len(acts) == len(facts):
        for (hp, hm), (fp, fm) in zip(acts, facts):
            if _act_function(hm) != _act_function(fm):
                diffs.append(AttributeDiff("activation", _act_name(hm), _act_name(fm), hp, fp))
    return diffs


def _mode_matters(module: nn.Module) -> bool:
    """Whether training mode changes what a torch.nn module computes: batch statistics in a norm that tracks running
    ones, a dropout with p > 0."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return bool(module.track_running_stats)
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return False


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.modules.activation") or type(module).__name__.endswith(
        ("Activation", "GELUActivation", "SiLUActivation"))


# activation classes (torch.nn's and transformers.activations') -> the function they compute; the GELU forms per
# transformers/activations.py: GELUActivation is erf GELU, NewGELU / GELUTanh / PytorchGELUTanh / FastGELU /
# AccurateGELU compute the tanh approximation (Hendrycks & Gimpel 2016, eq. 2), QuickGELU x * sigmoid(1.702 x)
_ACT_FUNCTIONS = {"gelu": "gelu", "new": "gelu_tanh", "gelutanh": "gelu_tanh", "pytorchgelutanh": "gelu_tanh",
                  "fastgelu": "gelu_tanh", "accurategelu": "gelu_tanh", "quickgelu": "quick_gelu", "swish": "silu",
                  "silu": "silu"}


def _act_function(module: nn.Module) -> str:
    """The function an activation module computes (its class, and for ``nn.GELU`` its ``approximate``)."""
    name = type(module).__name__.lower().replace("activation", "")
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is not None:
        return "gelu"
    return _ACT_FUNCTIONS.get(name, name)


def _act_name(module: nn.Module) -> str:
    """How an activation is shown: its class, with ``approximate`` for a tanh ``nn.GELU``."""
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return f"GELU(approximate={module.approximate!r})"
    return type(module).__name__


def covering_module(model: nn.Module, paths: list[str]) -> nn.Module:
    """One module holding the modules at ``paths`` of ``model`` (a row whose computation HF spreads over several
    modules, e.g. the Q-Former feed-forward over ``intermediate_query`` and ``output_query``), each registered under
    its path relative to their common prefix (dots as ``_``), so their attributes are compared as one row's. A single
    path (or one that contains all the others) is that module itself."""
    paths = [p for p in dict.fromkeys(paths) if not any(p != q and p.startswith(q + ".") for q in paths)]
    if len(paths) == 1:
        return model.get_submodule(paths[0])
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    paths.sort(key=lambda p: order.get(p, len(order)))  # the model's own module order: leaves pair in order
    parts = [p.split(".") for p in paths]
    common = 0
    while all(len(x) > common + 1 and x[common] == parts[0][common] for x in parts):
        common += 1
    holder = nn.Module()
    for path, split in zip(paths, parts):
        holder.add_module("_".join(split[common:]), model.get_submodule(path))
    return holder.eval()


def rotary_diffs(hf_rotary: nn.Module, fms_rotary: Any, hf_path: str, fms_path: str) -> list[AttributeDiff]:
    """The rotary position embedding both decoders share across layers (HF computes cos/sin once per forward and
    hands them to every attention; FMS's attention calls its ``RotaryEmbedding``), outside any row's modules:
    its inverse frequencies ``theta ** (-2i / d)`` (RoFormer, Su et al. 2021, eq. 15) from HF's ``inv_freq`` buffer
    against FMS's ``rope_scaling.compute_scaled_freqs``, reported as the base ``theta`` each implies, or as the
    rotated width when that differs. Empty when they agree (rtol 1e-6) or a side has no such attributes."""
    inv = getattr(hf_rotary, "inv_freq", None)
    scaling = getattr(fms_rotary, "rope_scaling", None)
    if not isinstance(inv, torch.Tensor) or inv.is_meta or not callable(getattr(scaling, "compute_scaled_freqs",
                                                                                   None)):
        return []
    try:
        fms_freqs = scaling.compute_scaled_freqs("cpu", 1)
    except (RuntimeError, TypeError, ValueError):
        return []
    hf_freqs = inv.detach().to("cpu", torch.float64)
    fms_freqs = fms_freqs.detach().to(torch.float64)
    if hf_freqs.shape != fms_freqs.shape:
        return [AttributeDiff("rotary dims", 2 * hf_freqs.numel(), 2 * fms_freqs.numel(), f"{hf_path}.inv_freq",
                              f"{fms_path}.rope_scaling.dim", absolute=True)]
    if torch.allclose(hf_freqs, fms_freqs, rtol=1e-6, atol=0):
        return []
    half = hf_freqs.numel()

    def theta(freqs: torch.Tensor) -> float:  # freqs[1] = theta ** (-2 / d), d = 2 * half
        return float(freqs[1] ** (-half)) if half > 1 else float("nan")

    # theta recovered from float32 frequencies carries their rounding (10000.00283): 6 significant digits
    return [AttributeDiff("rope theta", float(f"{theta(hf_freqs):.6g}"), float(f"{theta(fms_freqs):.6g}"),
                          f"{hf_path}.inv_freq",
                          f"{fms_path}.rope_scaling", absolute=True)]


def config_diffs(hf_config: Any, hf_path: str, fms_configs: dict[str, Any], keys: tuple[str, ...]) -> list[AttributeDiff]:
    """Model-level scalars both sides keep in a config object rather than in any row's module (Granite's muP
    multipliers: ``embedding_multiplier`` before the first layer, ``logits_scaling`` after the head): the field
    ``key`` of ``hf_config`` against the same field of every FMS config object in ``fms_configs`` (path -> config; the
    ones the FMS model reads), one line per FMS config that differs."""
    out = []
    for key in keys:
        hv = getattr(hf_config, key, None)
        for path, cfg in fms_configs.items():
            fv = getattr(cfg, key, None)
            if isinstance(hv, (int, float)) and isinstance(fv, (int, float)) and hv != fv and not _close(
                    float(hv), float(fv)):
                out.append(AttributeDiff(key, hv, fv, f"{hf_path}.{key}", f"{path}.{key}", absolute=True))
    return out


# -- weights ------------------------------------------------------------------------------------------------------------


def meta_reference(folder: str) -> nn.Module:
    """The HF model of a checkpoint folder built on the meta device from its config.json: every module with its
    configuration and no weight, for explanations once the real HF model was freed (one model at a time)."""
    import transformers

    from fms_granite_speech.folder import read_config_json

    config = transformers.AutoConfig.for_model(**read_config_json(folder))
    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])(config).eval()


def _checkpoint_keys(folder: str, hf_paths: list[str], skeleton: Optional[nn.Module] = None) -> set[str]:
    """The names the folder stores the HF model's tensors under ``hf_paths`` by: transformers saves a layout of its
    own (``revert_weight_conversion``: Granite Speech's ``model.language_model.layers.1...`` is written as
    ``language_model.model...``), so the runtime names of a meta-device build of the folder's class
    (``meta_reference``) are reverted."""
    from transformers.core_model_loading import revert_weight_conversion

    skeleton = skeleton if skeleton is not None else meta_reference(folder)
    state = {k: t for k, t in skeleton.state_dict().items() if _covered(k, hf_paths)}
    return set(revert_weight_conversion(skeleton, state)) if state else set()


def _folder_tensors(folder: str, hf_paths: list[str], adapter: bool,
                    skeleton: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint folder that lie under ``hf_paths`` (``_checkpoint_keys``, with ``skeleton``
    the folder's ``meta_reference`` when the caller has it; the adapter file's peft names are runtime names behind
    ``base_model.model.``), read with safetensors, nothing else of the folder."""
    from safetensors import safe_open

    from fms_granite_speech.folder import check_safetensors_folder

    files, adapter_file = check_safetensors_folder(folder, for_glob=True)
    wanted = _checkpoint_keys(folder, hf_paths, skeleton)
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            out.update((k, handle.get_tensor(k)) for k in handle.keys() if k in wanted)
    if adapter and adapter_file is not None:
        with safe_open(str(adapter_file), framework="pt", device="cpu") as handle:
            out.update((k, handle.get_tensor(k)) for k in handle.keys()
                       if _covered(k.removeprefix("base_model.model."), hf_paths))
    return out


def expected_weights(hf: Optional[nn.Module], fms: nn.Module, hf_paths: list[str], architecture: str,
                     source: str = "hf", folder: Optional[str] = None,
                     skeleton: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """What FMS's own checkpoint adapter makes of the HF tensors under ``hf_paths``: a shadow of ``fms`` built on the
    meta device from its config, given only those tensors through ``fms.utils.serialization.
    load_state_dict_into_model`` (the loader every checkpoint goes through), then, where ``fms`` has its LoRA
    adapter merged (``adapter_enabled``), the adapter merged into the shadow's rows exactly as ``set_adapter`` merges
    it (``base`` in float32 plus ``(alpha / r) B @ A``, cast to the weight's dtype). The HF tensors come from the
    model ``hf``'s state dict, or, when ``hf`` is None (one model at a time: HF was freed), from the checkpoint
    ``folder`` it was built from (``_folder_tensors``; ``skeleton``: the folder's ``meta_reference`` if already
    built). Returns FMS parameter and buffer names -> tensors (only those
    the HF tensors filled), in ``fms``'s dtypes."""
    from fms.utils.serialization import load_state_dict_into_model

    if hf is not None:
        state = hf.state_dict()
        given = {k: state[k] for k in state if _covered(k, hf_paths)}
    elif folder is not None:
        given = _folder_tensors(folder, hf_paths, adapter=getattr(fms.config, "lora", None) is not None,
                                skeleton=skeleton)
    else:
        return {}
    if not given:
        return {}
    with torch.device("meta"):
        shadow = type(fms)(fms.config)
    load_state_dict_into_model(shadow, given, architecture, source)
    live = dict(fms.named_parameters())
    live.update(fms.named_buffers())
    out = {n: t.detach() for n, t in list(shadow.named_parameters()) + list(shadow.named_buffers())
           if not t.is_meta and n in live}
    out = {n: t.to(dtype=live[n].dtype, device=live[n].device) for n, t in out.items()}
    if getattr(fms, "adapter_enabled", False) and callable(getattr(shadow, "lora_sites", None)):
        scale = fms.config.lora.scaling
        names = {id(t): n for n, t in shadow.named_parameters()}
        for site in shadow.lora_sites():
            name = names.get(id(site.weight))
            if name not in out or site.pair.A.is_meta or site.pair.B.is_meta:
                continue
            merged = out[name].clone()
            merged[site.rows] = (merged[site.rows].to(torch.float32) + site.delta(scale)).to(merged.dtype)
            out[name] = merged
    return out


def _runs(rows: list[int], homes: list[int]) -> list[tuple[int, int, int]]:
    """``(first row, its home, length)`` of each run where consecutive rows hold consecutive homes."""
    runs: list[list[int]] = []
    for r, h in zip(rows, homes):
        if runs and r == runs[-1][0] + runs[-1][2] and h == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([r, h, 1])
    return [tuple(x) for x in runs]


def _span(first: int, n: int, unit: str = "") -> str:
    """``row 3`` / ``rows 3-9`` (no unit: ``3`` / ``3-9``)."""
    if not unit:
        return str(first) if n == 1 else f"{first}-{first + n - 1}"
    return f"{unit[:-1]} {first}" if n == 1 else f"{unit} {first}-{first + n - 1}"


_MAX_SEARCHED_ROWS = 4096


def weight_diff(name: str, got: torch.Tensor, want: torch.Tensor,
                others: Optional[dict[str, torch.Tensor]] = None) -> Optional[str]:
    """How ``got`` (an FMS tensor) departs from ``want`` (what FMS's adapter makes of HF's tensors), or None when
    they are equal: a shape; rows that hold other rows of ``want``, or rows of another tensor of the row in
    ``others`` (name -> what the adapter makes of it): a permutation, the parts of a fused weight in another order,
    two weights swapped; one factor on every row; else how many rows (elements of a 1-D tensor) differ and by how
    much."""
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)}, FMS's adapter makes {tuple(want.shape)} of HF's tensors"
    if torch.equal(got, want):
        return None
    if not got.is_floating_point():
        n = int((got != want).sum())
        return f"{name}: {n} of {got.numel()} elements differ from what FMS's adapter makes of HF's tensors"
    g = got.detach().to(torch.float64).reshape(got.shape[0], -1) if got.dim() else got.reshape(1, 1).double()
    w = want.detach().to(torch.float64).reshape(g.shape)
    unit = "rows" if got.dim() >= 2 else "elements"
    if got.dim() < 2:
        g, w = g.reshape(-1, 1), w.reshape(-1, 1)
    rel = float((g - w).norm() / w.norm()) if float(w.norm()) else float((g - w).norm())
    differ = torch.nonzero((g != w).any(dim=1)).flatten().tolist()
    ratio = g.norm(dim=1) / w.norm(dim=1).clamp(min=1e-300)
    cos = (g * w).sum(dim=1) / (g.norm(dim=1) * w.norm(dim=1)).clamp(min=1e-300)
    sel = torch.tensor(differ)
    if g.shape[1] > 1 and bool((cos[sel] > 1 - 1e-9).all()):
        lo, hi = float(ratio[sel].min()), float(ratio[sel].max())
        if hi - lo <= 1e-6 * max(abs(hi), 1e-30):
            spans = ", ".join(_span(a, n) for a, _, n in _runs(differ, differ)[:4])
            whole = "every row" if len(differ) == g.shape[0] else f"{unit} {spans}"
            return f"{name}: {whole} {lo:.6g} x what FMS's adapter makes of HF's tensors"
    if g.shape[1] > 1:  # rows of a matrix: where does each differing row come from?
        # candidate homes: this tensor's expected rows first, then those of the row's other tensors of this width
        pools = [(None, w)] + [(n, t.detach().to(torch.float64).reshape(t.shape[0], -1))
                               for n, t in (others or {}).items()
                               if n != name and t.is_floating_point() and t.dim() >= 2 and t[0].numel() == g.shape[1]]
        searched = differ[:_MAX_SEARCHED_ROWS]  # a bound on the cdist work for a full-size weight
        homes: list = [None] * len(searched)
        for pool_name, pool in pools:
            norms = pool.norm(dim=1)
            for start in range(0, len(searched), 1024):
                todo = [k for k in range(start, min(start + 1024, len(searched))) if homes[k] is None]
                if not todo:
                    continue
                idx = torch.tensor([searched[k] for k in todo])
                near, home = torch.cdist(g[idx], pool).min(dim=1)  # nearest expected row, Euclidean
                exact = near <= 1e-6 * norms[home].clamp(min=1e-30)
                for k, i, h, e in zip(todo, idx.tolist(), home.tolist(), exact.tolist()):
                    if e and (pool_name is not None or h != i):
                        homes[k] = (pool_name, h)
        if searched and all(h is not None for h in homes):
            groups: dict = {}
            for r, (pool_name, h) in zip(searched, homes):
                groups.setdefault(pool_name, ([], []))
                groups[pool_name][0].append(r)
                groups[pool_name][1].append(h)
            said = []
            for pool_name, (rows, hs) in groups.items():
                where = "" if pool_name is None else f"in {pool_name} "
                said += [f"{_span(a, n, unit)} {'holds' if n == 1 else 'hold'} what FMS's adapter puts {where}at "
                         f"{_span(b, n, unit)}" for a, b, n in _runs(rows, hs)]
            more = f"; ... ({len(said)} runs)" if len(said) > 3 else ""
            why = ("two tensors swapped, or rows taken from the wrong one" if set(groups) - {None} else
                   "rows permuted, or the parts of a fused weight in another order")
            part = (f"; the first {len(searched)} of {len(differ)} differing {unit} searched"
                    if len(searched) < len(differ) else "")
            return f"{name}: {'; '.join(said[:3])}{more} ({why}{part})"
    if g.shape[1] == 1 and len(differ) == g.shape[0]:
        q = (g / w.where(w != 0, torch.ones_like(w))).flatten()
        if bool((w != 0).all()) and float(q.max() - q.min()) <= 1e-6 * abs(float(q.mean())):
            return f"{name}: every element {float(q.mean()):.6g} x what FMS's adapter makes of HF's tensors"
    return (f"{name}: {len(differ)} of {g.shape[0]} {unit} differ from what FMS's adapter makes of HF's tensors "
            f"(rel-L2 {rel:.3e}; first at {unit[:-1]} {differ[0]})")


def weight_diffs(hf: Optional[nn.Module], fms: nn.Module, hf_paths: list[str], fms_path: str, architecture: str,
                 source: str = "hf", folder: Optional[str] = None,
                 skeleton: Optional[nn.Module] = None) -> Optional[list[str]]:
    """One line per FMS tensor of the row (``fms_path``, and the LoRA tensors the row's HF tensors fill) that is not
    what FMS's adapter makes of the HF tensors under ``hf_paths`` (``expected_weights``, ``weight_diff``): the
    conversion bugs no configuration attribute shows (RoPE rows permuted twice, the halves of a fused gate/up
    swapped, a scale folded in twice). None when no tensor of the row could be compared (the HF tensors under
    ``hf_paths`` were not found, or the adapter filled none of the row's)."""
    lines = []
    expected = expected_weights(hf, fms, hf_paths, architecture, source, folder=folder, skeleton=skeleton)
    params = dict(fms.named_parameters())
    compared = 0
    for name, want in expected.items():
        if fms_path and not (name.startswith(fms_path + ".") or name.startswith("lora.")):
            continue
        compared += 1
        got = params[name] if name in params else fms.get_buffer(name)
        line = weight_diff(name, got.detach(), want, expected)
        if line is not None:
            lines.append(line)
    return lines if compared else None


# -- ops ----------------------------------------------------------------------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Every aten op run under it: ``(op, inputs cloned before the op, output)``."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = map_tensors(lambda t: t.detach().clone(), (args, kwargs))
        out = func(*args, **kwargs)
        self.ops.append((func, before, out))
        return out


def _first_float(value: Any) -> Optional[torch.Tensor]:
    found = []
    map_tensors(lambda t: found.append(t) if t.is_floating_point() else None, value)
    return found[0] if found else None


def _as64(value: Any) -> Any:
    def conv(t):
        return t.to(torch.float64) if t.is_floating_point() else t

    out = map_tensors(conv, value)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) and "dtype" in out[1]:
        if isinstance(out[1]["dtype"], torch.dtype) and out[1]["dtype"].is_floating_point:
            out = (out[0], dict(out[1], dtype=torch.float64))
    return out


def record(run) -> list:
    """The aten ops of ``run()``: ``[(op, (args, kwargs) cloned before it ran, output)]``, in order."""
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        run()
    return recorder.ops


def _recorded(run_or_ops) -> list:
    return run_or_ops if isinstance(run_or_ops, list) else record(run_or_ops)


def _op_name(func) -> str:
    return str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)


def op_errors(run, top: int = 5) -> list[OpError]:
    """The ops of ``run()`` (a call of the FMS module on HF's inputs; or ops ``record`` already took) ranked by the
    rounding each introduces: its output against the same op on float64 copies of its inputs (view and metadata ops
    excluded; an op float64 cannot run is skipped). ``share`` is an op's rel-L2 over the sum over all ops."""
    errors = []
    with torch.no_grad():
        for k, (func, (args, kwargs), out) in enumerate(_recorded(run)):
            got = _first_float(out)
            if got is None or got.numel() == 0 or getattr(func, "is_view", False):
                continue
            try:
                args64, kwargs64 = _as64((args, kwargs))
                want = _first_float(func(*args64, **kwargs64))
            except (RuntimeError, TypeError, NotImplementedError, ValueError):
                continue
            if want is None or want.shape != got.shape:
                continue
            want = want.to(torch.float64)
            denom = float(want.norm())
            rel = float((got.to(torch.float64) - want).norm()) / denom if denom > 0 else 0.0
            if not math.isfinite(rel):
                continue
            errors.append((k, _op_name(func), str(got.dtype).removeprefix("torch."), list(got.shape), rel))
    total = sum(e[4] for e in errors) or 1.0
    ranked = sorted(errors, key=lambda e: -e[4])[:top]
    return [OpError(index=k, op=op, dtype=dt, shape=shape, rel_l2=rel, share=rel / total)
            for k, op, dt, shape, rel in ranked]


_NOT_COMPUTE = {"_to_copy", "copy_", "clone", "empty", "empty_like", "zeros", "zeros_like", "ones", "full",
                "full_like", "arange", "new_zeros", "new_empty", "fill_", "detach", "lift_fresh", "alias",
                "_unsafe_view", "contiguous", "expand", "lift_fresh_copy", "scalar_tensor"}


def _kinds(run) -> dict:
    """``{(op, dtype): count}`` of the computing aten ops of ``run()`` (or of recorded ops; views, copies and
    allocations left out)."""
    out: dict = {}
    for func, _, value in _recorded(run):
        got = _first_float(value)
        name = _op_name(func)
        name = name[:-1] if name.endswith("_") and not name.endswith("__") else name  # in-place = its out-of-place op
        if got is None or getattr(func, "is_view", False) or name in _NOT_COMPUTE:
            continue
        key = (name, str(got.dtype).removeprefix("torch."))
        out[key] = out.get(key, 0) + 1
    return out


def kernel_differences(hf_run, fms_run) -> list[str]:
    """What the FMS module computes with ops, or in precisions, that HF's module on the same call does not: one line
    per difference (``FMS runs aten._scaled_dot_product_flash_attention_for_cpu in bfloat16; HF's module does not
    (it runs aten._softmax in float32, aten.bmm in float32 ...)``). Empty when both run the same kinds of op in the
    same dtypes."""
    hf, fms = _kinds(hf_run), _kinds(fms_run)
    only_fms = [k for k in fms if k not in hf]
    only_hf = [k for k in hf if k not in fms]
    if not only_fms:
        return []
    theirs = ", ".join(f"aten.{op} in {dt}" for op, dt in only_hf[:4]) or "none of them"
    lines = []
    for op, dt in only_fms[:3]:
        same_op = [d for o, d in hf if o == op]
        if same_op:
            lines.append(f"FMS computes aten.{op} in {dt} where HF's module computes it in {', '.join(same_op)}")
        else:
            lines.append(f"FMS runs aten.{op} in {dt}, which HF's module does not (HF runs {theirs})")
    return lines


# -- one row -------------------------------------------------------------------------------------------------------------


def explain_row(layer: str, hf_module: Optional[nn.Module], fms_module: nn.Module, run=None,
                reduced: bool = False, hf_run=None, weights: Optional[list[str]] = None,
                extra_attributes: Optional[list[AttributeDiff]] = None) -> Explanation:
    """The explanation of one row: attribute differences between its HF and FMS modules; ``weights``, the lines of
    ``weight_diffs`` (the row's FMS tensors against what FMS's adapter makes of HF's); ``extra_attributes``, those of
    modules outside the row that it uses (``rotary_diffs``); the kernels or precisions
    the FMS module uses that HF's does not (``hf_run``: HF's module on its recorded call, ``run``: the FMS module
    replayed on it); and the FMS ops ranked by the error they introduce against float64. ``reduced``: the run is in
    bf16/fp16, where kernels and precision explain most divergences (in float32 the attributes lead)."""
    exp = Explanation(layer=layer)
    if hf_module is not None:
        exp.attributes = attribute_diffs(hf_module, fms_module)
    exp.attributes += list(extra_attributes or [])
    kernels: list = []
    if run is not None:
        try:
            ops = record(run)  # once: ranked by rounding, and compared with HF's kinds of op
            exp.ops = op_errors(ops)
            if hf_run is not None and reduced:  # in float32 a different kernel is a layout choice, not the cause
                kernels = kernel_differences(hf_run, ops)
        except (RuntimeError, TypeError, ValueError) as err:
            exp.note = f"op attribution failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    exp.kernels = kernels
    exp.weights = list(weights or [])
    parts = [d.line(layer) for d in exp.attributes[:3]] + exp.weights[:2] + kernels[:2]
    if not parts:
        parts.append("no attribute, weight or kernel differs between the HF and FMS modules")
    if exp.ops and (reduced or not (exp.attributes or exp.weights)):
        o = exp.ops[0]
        parts.append(f"aten.{o.op} ({o.dtype}, {o.shape}) introduces the most rounding of the module's ops: "
                     f"rel-L2 {o.rel_l2:.2e} against float64, {100 * o.share:.0f}% of the per-op total")
    exp.text = "; ".join(parts)
    return exp
