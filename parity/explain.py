"""Why a layer diverges: the configuration attribute that differs, or the aten op that introduces the error.

``run_parity`` names the first layer that *introduces* an error; this module says why, in two ways a porter can act
on (``explain_row``):

1. **Attributes.** Sub-modules of the HF and FMS row are paired by their weights (the same values, after the
   checkpoint adapter: a tensor equal element for element, reshaped or not, pairs the modules that hold it); every
   pair is compared on its configuration: the plain attributes both carry (``eps`` and its aliases
   ``variance_epsilon``, ``epsilon``; ``padding``, ``stride``, ``dilation``, ``groups``, ``momentum``, ``affine``,
   ``track_running_stats``...), whether a bias is present, and the activation's class. Attributes of the wrappers
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

__all__ = ["AttributeDiff", "Explanation", "OpError", "attribute_diffs", "explain_row", "kernel_differences",
           "op_errors", "record"]

# attribute names that mean the same thing on either side -> one name
ALIASES = {"variance_epsilon": "eps", "epsilon": "eps", "layer_norm_eps": "eps", "norm_eps": "eps",
           "scaling": "scale", "scale_factor": "scale"}
_SIMPLE = (bool, int, float, str)
_IGNORED = {"training", "inplace", "dump_patches", "call_super_init"}


@dataclass
class AttributeDiff:
    """One configuration attribute that differs between paired modules (paths relative to the row's modules)."""

    attribute: str
    hf_value: Any
    fms_value: Any
    hf_path: str
    fms_path: str

    def line(self, row: str) -> str:
        """``ROW.PATH: ATTRIBUTE HF_VALUE on HF (HF_PATH), FMS_VALUE on FMS (FMS_PATH)``."""
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

    def to_dict(self) -> dict:
        from parity._json import json_safe

        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        return cls(layer=data["layer"], attributes=[AttributeDiff(**a) for a in data.get("attributes", [])],
                   ops=[OpError(**{**o, "rel_l2": float(o["rel_l2"]), "share": float(o["share"])})
                        for o in data.get("ops", [])], kernels=list(data.get("kernels", [])),
                   text=data.get("text", ""), note=data.get("note"))


# -- attributes -------------------------------------------------------------------------------------------------------


def _config(module: nn.Module) -> dict:
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _IGNORED:
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
            out[ALIASES.get(key, key)] = value
    if "bias" in module._parameters:
        out["bias present"] = module._parameters["bias"] is not None
    return out


def _is_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


def _direct_weight(module: nn.Module) -> Optional[torch.Tensor]:
    w = module._parameters.get("weight")
    return None if w is None else w.detach()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and a.numel() > 1 and torch.equal(a.reshape(-1), b.reshape(-1).to(a.dtype))


def _pairs_by_weight(hf: nn.Module, fms: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    candidates = [(p, m, _direct_weight(m)) for p, m in fms.named_modules() if _direct_weight(m) is not None]
    used, out = set(), []
    for path, module in hf.named_modules():
        w = _direct_weight(module)
        if w is None:
            continue
        for fpath, fmodule, fw in candidates:
            if fpath not in used and _same_values(w, fw):
                used.add(fpath)
                out.append((path, module, fpath, fmodule))
                break
    return out


def attribute_diffs(hf: nn.Module, fms: nn.Module) -> list[AttributeDiff]:
    """Configuration differences between the HF and FMS modules of one row (see the module docstring), in HF's
    module order; empty when every paired module is configured alike."""
    diffs: list[AttributeDiff] = []
    for hpath, hmod, fpath, fmod in _pairs_by_weight(hf, fms):
        a, b = _config(hmod), _config(fmod)
        if type(hmod) is type(fmod) or isinstance(fmod, type(hmod)) or isinstance(hmod, type(fmod)):
            for key in sorted(set(a) & set(b)):
                if a[key] != b[key] and not _close(a[key], b[key]):
                    diffs.append(AttributeDiff(key, a[key], b[key], hpath, fpath))
        elif "bias present" in a and "bias present" in b and a["bias present"] != b["bias present"]:
            diffs.append(AttributeDiff("bias present", a["bias present"], b["bias present"], hpath, fpath))
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
    for key in sorted(set(hw) & set(fw)):
        hvals, fvals = {repr(v) for _, v in hw[key]}, {repr(v) for _, v in fw[key]}
        if len(hvals) == 1 and len(fvals) == 1:  # one value per side (repeated, e.g. by a config, is one value)
            (hpath, hv), (fpath, fv) = hw[key][0], fw[key][0]
            if hv != fv and not _close(hv, fv) and (hpath, fpath, key) not in seen:
                diffs.append(AttributeDiff(key, hv, fv, hpath, fpath))
    # activations: the same position among the activation modules of each side, different classes
    acts = [(p, type(m).__name__) for p, m in hf.named_modules() if _is_activation(m)]
    facts = [(p, type(m).__name__) for p, m in fms.named_modules() if _is_activation(m)]
    if len(acts) == len(facts):
        for (hp, hc), (fp, fc) in zip(acts, facts):
            if _canonical_act(hc) != _canonical_act(fc):
                diffs.append(AttributeDiff("activation", hc, fc, hp, fp))
    return diffs


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.modules.activation") or type(module).__name__.endswith(
        ("Activation", "GELUActivation", "SiLUActivation"))


def _canonical_act(name: str) -> str:
    name = name.lower().replace("activation", "")
    return {"swish": "silu"}.get(name, name)


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
                reduced: bool = False, hf_run=None) -> Explanation:
    """The explanation of one row: attribute differences between its HF and FMS modules; the kernels or precisions
    the FMS module uses that HF's does not (``hf_run``: HF's module on its recorded call, ``run``: the FMS module
    replayed on it); and the FMS ops ranked by the error they introduce against float64. ``reduced``: the run is in
    bf16/fp16, where kernels and precision explain most divergences (in float32 the attributes lead)."""
    exp = Explanation(layer=layer)
    if hf_module is not None:
        exp.attributes = attribute_diffs(hf_module, fms_module)
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
    parts = [d.line(layer) for d in exp.attributes[:3]] + kernels[:2]
    if not parts:
        parts.append("no attribute or kernel differs between the HF and FMS modules")
    if exp.ops and (reduced or not exp.attributes):
        o = exp.ops[0]
        parts.append(f"aten.{o.op} ({o.dtype}, {o.shape}) introduces the most rounding of the module's ops: "
                     f"rel-L2 {o.rel_l2:.2e} against float64, {100 * o.share:.0f}% of the per-op total")
    exp.text = "; ".join(parts)
    return exp
