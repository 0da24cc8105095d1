"""The HF <-> FMS module map of any model pair, derived from FMS's own checkpoint adapter.

FMS already knows which HF tensor becomes which FMS tensor: the ``hf`` adapter it registers per architecture
(``fms.utils.serialization.register_adapter``) renames, fuses (q/k/v -> ``qkv_fused``, gate/up -> ``wg1_fused``),
permutes (RoPE rows) and slices the checkpoint's tensors. ``derive`` runs that adapter on a *tagged* state dict, every
element of every HF tensor replaced by a distinct integer (float64 holds integers exactly up to 2**53), and reads back
where each value landed. That lineage gives, for every FMS tensor, its HF sources and, row by row, which HF row it is;
from it:

1. modules are paired when the HF tensors under them are the same set (the layers, attention, MLP, norms, the model);
   several modules with one set (a wrapper and its content, a tied head and its embedding) are told apart by class,
   then by the output of one probe forward (number of tensors, last dimension), then by nesting;
2. an HF Linear whose rows went into a fused FMS Linear (q_proj -> ``qkv_fused``) or whose rows FMS permuted (RoPE,
   ``fused_weights=False``) is paired with an output-channel *gather* of the FMS output; one whose rows went into
   several FMS Linears (a fused ``to_kv`` split into key and value) with a *concatenation* of their outputs first;
3. parameter-free modules (activations) are paired by class under the nearest paired ancestors;
4. everything else is listed as unpaired, with the reason (its tensors straddle modules of the other side, a
   dropout, a module FMS computes inline, a pair whose outputs differ in kind).

The tagging streams group by group, exactly as FMS's loader hands the adapter one layer's keys at a time
(``serialization._find_key_neighbors``), so a full-size model derives in the memory of its largest group in float64
and both models may live on the ``meta`` device. Results are cached on disk by (architecture, adapter, both configs,
hints): ``PARITY_CACHE_DIR`` or ``~/.cache/parity/derived``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from parity._shell import error_line

__all__ = ["DeriveError", "DerivedMap", "DerivedPair", "Unpaired", "cache_dir", "derive", "probe_outputs"]

SAME = "same"              # equal sets of HF tensors: the outputs are compared as they are
GATHER = "gather"          # HF output channels = FMS output[..., index]
CONCAT = "concat"          # HF output channels = cat(FMS parts' outputs, -1)[..., index]
STRUCTURAL = "structural"  # parameter-free, paired by class under paired ancestors

# parameter-free modules that compute nothing to compare in eval mode
_SKIP_FREE = (nn.Dropout, nn.Identity)


class DeriveError(RuntimeError):
    """The map cannot be derived: FMS's adapter rejects transformers' checkpoint, or a model cannot be read. The
    message is one line naming the failing step."""


@dataclass(frozen=True)
class DerivedPair:
    """One derived row: HF module ``hf`` computes what the FMS module(s) compute, after ``index``.

    Attributes:
        name: the row's name: the FMS module path, with ``[hf_leaf]`` appended for a gather or concatenation.
        hf: HF module path (``get_submodule`` name; ``""`` is the model).
        fms: FMS module path; for a concatenation, the first part.
        relation: ``same``, ``gather``, ``concat`` or ``structural`` (see the module docstring).
        parts: FMS module paths whose outputs are concatenated along the last dimension (``(fms,)`` unless concat).
        index: the FMS output channels (of the concatenation) that are HF's output channels 0..n-1, in order; None
            for all of them in their own order.
        sources: how many HF tensors lie under the pair (0 for structural pairs).
    """

    name: str
    hf: str
    fms: str
    relation: str = SAME
    parts: tuple[str, ...] = ()
    index: Optional[tuple[int, ...]] = None
    sources: int = 0
    elementwise: bool = False  # the gather applies to the module's input too (a norm over permuted channels)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["parts"] = list(self.parts)
        out["index"] = None if self.index is None else list(self.index)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DerivedPair":
        data = dict(data)
        data["parts"] = tuple(data.get("parts") or ())
        data["index"] = None if data.get("index") is None else tuple(data["index"])
        return cls(**data)


@dataclass(frozen=True)
class Unpaired:
    """A module of one ``side`` (``hf`` or ``fms``) that no row compares, and why."""

    side: str
    path: str
    reason: str


@dataclass
class DerivedMap:
    """The derived map of one pair.

    Attributes:
        architecture: the FMS architecture whose adapter was run.
        pairs: the rows, in the HF model's module order (a probe forward's call order when there was one).
        unpaired: modules no row compares, with the reason.
        tensors: FMS tensor name -> how it was made: ``identity``, ``reshape``, ``permute``, ``fused``, ``slice``
            (with the HF sources), ``alias of NAME`` (tied in FMS), or ``not filled by the adapter``.
        seconds: wall time of the derivation (0 when read from the cache); cached: it came from the cache.
        hf_tensors: HF tensors tagged (tied ones once). peak_group_mib: float64 MiB of the largest tagged group.
        unused: keys the adapter produced that name no FMS tensor (a checkpoint FMS would load only in part).
    """

    architecture: str
    pairs: list[DerivedPair]
    unpaired: list[Unpaired]
    tensors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    hf_tensors: int = 0
    peak_group_mib: float = 0.0
    unused: list[str] = field(default_factory=list)

    def pair(self, name: str) -> DerivedPair:
        """The row named ``name`` (KeyError naming the closest rows when absent)."""
        for p in self.pairs:
            if p.name == name:
                return p
        import difflib

        close = difflib.get_close_matches(name, [p.name for p in self.pairs], n=3)
        raise KeyError(f"no derived row {name!r}; closest: {', '.join(close) or 'none'}")

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "pairs": [p.to_dict() for p in self.pairs],
                "unpaired": [dataclasses.asdict(u) for u in self.unpaired], "tensors": self.tensors,
                "hf_tensors": self.hf_tensors, "peak_group_mib": self.peak_group_mib, "seconds": self.seconds,
                "unused": self.unused}

    @classmethod
    def from_dict(cls, data: dict) -> "DerivedMap":
        return cls(architecture=data["architecture"], pairs=[DerivedPair.from_dict(p) for p in data["pairs"]],
                   unpaired=[Unpaired(**u) for u in data["unpaired"]], tensors=dict(data.get("tensors") or {}),
                   seconds=float(data.get("seconds", 0.0)), hf_tensors=int(data.get("hf_tensors", 0)),
                   peak_group_mib=float(data.get("peak_group_mib", 0.0)), unused=list(data.get("unused") or []))


# -- lineage ----------------------------------------------------------------------------------------------------------


@dataclass
class _Lineage:
    """Where one FMS tensor came from: its source storages and, per row (dim 0), the source storage and row."""

    sources: frozenset
    relation: str
    untracked: int
    row_sid: Optional[torch.Tensor] = None   # [R] source storage of each row (-1: mixed or untracked)
    row_q: Optional[torch.Tensor] = None     # [R] source row index
    row_ok: Optional[torch.Tensor] = None    # [R] the row is one whole source row, columns in order


class _Tags:
    """Distinct float64 tags for every HF storage: storage ``s`` holds ``start[s] + 1 + arange(numel)``."""

    def __init__(self, storages: list[tuple[str, torch.Size]]):
        self.names = [n for n, _ in storages]
        self.shapes = [tuple(s) for _, s in storages]
        numels = [int(torch.Size(s).numel()) for s in self.shapes]
        starts, total = [], 0
        for n in numels:
            starts.append(total)
            total += n
        if total >= 2 ** 53:
            raise DeriveError(f"{total} HF elements: more than float64 tags can tell apart (2**53)")
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.numels = torch.tensor(numels, dtype=torch.int64)
        # elements per source row (dim 0) of each storage: what a whole-row FMS row must hold
        rows = torch.tensor([s[0] if s else 1 for s in self.shapes], dtype=torch.int64)
        self.row_size = (self.numels // rows.clamp(min=1)).clamp(min=1)
        self.total = total

    def tag(self, sid: int) -> torch.Tensor:
        start = int(self.starts[sid])
        return torch.arange(start + 1, start + 1 + int(self.numels[sid]), dtype=torch.float64).reshape(self.shapes[sid])

    def _locate(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tag values ``v``: (valid, storage id or -1, element index in that storage)."""
        valid = (v >= 1) & (v <= self.total) & (v == torch.round(v))
        g = (v.clamp(min=1, max=max(self.total, 1)) - 1).to(torch.int64)
        sid = torch.searchsorted(self.starts, g, right=True) - 1
        elem = g - self.starts[sid]
        return valid, torch.where(valid, sid, torch.full_like(sid, -1)), elem

    def decode(self, tensor: torch.Tensor, chunk: int = 1 << 22) -> _Lineage:
        """The lineage of one adapted tensor, row by row (dim 0): each row's first tag names its source storage and
        row; the row is that whole source row when its tags run on by one to the row's end. Only rows that are not
        are decoded element by element, ``chunk`` elements at a time, so a full-size embedding decodes in the memory
        of a few chunks."""
        if not tensor.is_floating_point() or tensor.dtype != torch.float64 or tensor.numel() == 0:
            # an integer buffer, or a tensor the adapter cast: it carries no tags
            return _Lineage(frozenset(), "untracked", tensor.numel())
        rows = tensor.shape[0] if tensor.dim() >= 1 else 1
        v = tensor.detach().reshape(rows, -1)
        per = v.shape[1]
        valid, sid, elem = self._locate(v[:, 0])
        ok = valid & (v[:, -1] - v[:, 0] == per - 1)
        step = max(1, chunk // max(per, 1))
        if per > 1:
            for r in range(0, rows, step):
                part = v[r:r + step]
                ok[r:r + step] &= ((part[:, 1:] - part[:, :-1]) == 1).all(1)
        numel_s = self.numels[sid.clamp(min=0)]
        src_row = self.row_size[sid.clamp(min=0)]
        ok &= (src_row == per) & (elem % src_row == 0) & (elem + per <= numel_s)
        sources = set(int(x) for x in torch.unique(sid[ok]).tolist())
        untracked = 0
        bad = torch.nonzero(~ok).flatten()
        for r0 in range(0, bad.numel(), step):
            idx = bad[r0:r0 + step]
            vb, sb, _ = self._locate(v[idx].reshape(-1))
            untracked += int((~vb).sum())
            sources.update(int(x) for x in torch.unique(sb[vb]).tolist())
        q = elem // src_row
        lin = _Lineage(frozenset(sources), "", untracked, row_sid=torch.where(ok, sid, torch.full_like(sid, -1)),
                       row_q=q, row_ok=ok)
        lin.relation = self._relation(tensor, lin, per)
        if tensor.dim() == 0:
            lin.row_sid = lin.row_q = lin.row_ok = None
        return lin

    def _relation(self, tensor, lin: _Lineage, per: int) -> str:
        if lin.untracked == tensor.numel():
            return "untracked"
        if len(lin.sources) > 1:
            return "fused"
        if not lin.sources:
            return "untracked"
        (s,) = tuple(lin.sources)
        if lin.untracked:
            return "partly untracked"
        if tensor.numel() < int(self.numels[s]):
            return "slice"
        if not bool(lin.row_ok.all()):
            return "permute"
        if torch.equal(lin.row_q, torch.arange(lin.row_q.numel())):
            return "identity" if tuple(tensor.shape) == self.shapes[s] else "reshape"
        return "permute"


# -- the two models' tensors ------------------------------------------------------------------------------------------


def _hf_storages(hf: nn.Module, exclude: Sequence[str]) -> tuple[list[tuple[str, Any]], dict[str, Optional[int]]]:
    """The HF state dict's tensors: one storage per tensor object (tied keys share one), and each key's storage id
    (None: not tagged: an integer buffer or an excluded key)."""
    patterns = [re.compile(p) for p in exclude]
    storages: list[tuple[str, Any]] = []
    by_obj: dict[int, int] = {}
    key_sid: dict[str, Optional[int]] = {}
    for key, t in hf.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or any(p.search(key) for p in patterns):
            key_sid[key] = None
            continue
        if id(t) not in by_obj:
            by_obj[id(t)] = len(storages)
            storages.append((key, t.shape))
        key_sid[key] = by_obj[id(t)]
    return storages, key_sid


def _groups(keys: Iterable[str]) -> list[list[str]]:
    """The keys in FMS loader groups: everything up to the first layer number together, the rest together."""
    from fms_granite_speech._fms_compat import key_neighbors

    remaining = list(keys)
    left = set(remaining)
    out = []
    for key in remaining:
        if key not in left:
            continue
        left.discard(key)
        group = [key] + [k for k in key_neighbors(key, left)]
        left.difference_update(group)
        out.append(group)
    return out


def _lineage(hf: nn.Module, architecture: str, source: str, adapter_kwargs: Mapping[str, Any],
             to_checkpoint: Optional[Callable[[dict], dict]], exclude: Sequence[str]):
    from fms_granite_speech._fms_compat import adapter as fms_adapter

    storages, key_sid = _hf_storages(hf, exclude)
    tags = _Tags(storages)
    adapter = fms_adapter(architecture, source)
    hf_sd = hf.state_dict(keep_vars=True)
    lineage: dict[str, _Lineage] = {}
    peak = 0
    for group in _groups(key_sid):
        tagged: dict[str, torch.Tensor] = {}
        made: dict[int, torch.Tensor] = {}  # tied keys in one group share one tagged tensor, as they share storage
        for key in group:
            sid = key_sid[key]
            t = hf_sd[key]
            if sid is None:
                tagged[key] = torch.zeros(t.shape, dtype=t.dtype)
            else:
                if sid not in made:
                    made[sid] = tags.tag(sid)
                tagged[key] = made[sid]
        peak = max(peak, sum(t.numel() * t.element_size() for t in {id(v): v for v in tagged.values()}.values()))
        try:
            disk = to_checkpoint(tagged) if to_checkpoint is not None else tagged
        except Exception as err:  # noqa: BLE001 - transformers' reverse conversion, any failure is a verdict
            raise DeriveError(f"step 'checkpoint layout' (transformers' revert_weight_conversion) failed on "
                              f"{group[0]}: {error_line(err)}") from None
        for part in _groups(disk):
            try:
                adapted = adapter({k: disk[k] for k in part}, **adapter_kwargs)
            except Exception as err:  # noqa: BLE001
                raise DeriveError(f"step 'FMS {architecture!r} {source!r} adapter' rejects transformers' checkpoint "
                                  f"keys {part[0]}...: {error_line(err)}") from None
            for k, t in adapted.items():
                lineage[k] = tags.decode(t)
        del tagged, disk, made
    return tags, key_sid, lineage, peak


# -- module sets and pairing ------------------------------------------------------------------------------------------


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")[:-1]
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _module_sets(key_sources: Mapping[str, frozenset]) -> dict[str, frozenset]:
    acc: dict[str, set] = defaultdict(set)
    for key, srcs in key_sources.items():
        for p in _prefixes(key):
            acc[p].update(srcs)
    return {k: frozenset(v) for k, v in acc.items()}


_KINDS = (nn.Embedding, nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.ModuleList, nn.ModuleDict)


def _kind(module: nn.Module) -> str:
    for cls in _KINDS:
        if isinstance(module, cls):
            return cls.__name__
    name = type(module).__name__.lower()
    return "norm" if "norm" in name else type(module).__name__


def probe_outputs(model: nn.Module, run: Callable[[nn.Module], Any]) -> dict[str, tuple[int, int, int]]:
    """One forward of ``model`` (``run(model)``) with a hook on every module: ``path -> (call order, number of
    tensors in the output, last dimension of its first tensor)`` for each module that ran."""
    from parity.capture import first_tensor

    seen: dict[str, tuple[int, int, int]] = {}
    handles = []

    def hook_for(path):
        def hook(_mod, _args, out):
            if path in seen:
                return
            items = out if isinstance(out, (tuple, list)) else (
                list(out.values()) if isinstance(out, Mapping) else [out])
            n = sum(isinstance(i, torch.Tensor) for i in items)
            t = first_tensor(out)
            seen[path] = (len(seen), n, int(t.shape[-1]) if t is not None and t.dim() else 0)
        return hook

    for path, mod in model.named_modules():
        handles.append(mod.register_forward_hook(hook_for(path)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return seen


def _chain(paths: Sequence[str]) -> bool:
    """The paths (sorted outermost first) each contain the next: one module wrapped by the others."""
    return all(a == "" or b.startswith(a + ".") for a, b in zip(paths, paths[1:]))


def _resolve_group(hs: list[str], fs: list[str], hf_mods, fms_mods, probe) -> tuple[list[tuple[str, str]], list]:
    """Pair the HF modules ``hs`` and FMS modules ``fs`` that hold one set of HF tensors."""
    hp, fp = (probe or {}).get("hf"), (probe or {}).get("fms")
    ran = lambda side, p: (hp if side == "hf" else fp) is None or p in (hp if side == "hf" else fp)  # noqa: E731
    hs = [h for h in hs if not isinstance(hf_mods[h], (nn.ModuleList, nn.ModuleDict)) and ran("hf", h)]
    fs = [f for f in fs if not isinstance(fms_mods[f], (nn.ModuleList, nn.ModuleDict)) and ran("fms", f)]
    pairs, dropped = [], []
    depth = lambda p: 0 if p == "" else p.count(".") + 1  # noqa: E731
    hs.sort(key=depth)
    fs.sort(key=depth)
    # 1. the same kind of module (an Embedding with an Embedding, a Linear head with a Linear head)
    for h in list(hs):
        k = _kind(hf_mods[h])
        if k in ("Linear", "Embedding", "Conv1d", "LayerNorm", "BatchNorm1d"):
            match = [f for f in fs if _kind(fms_mods[f]) == k]
            if len(match) >= 1 and len([x for x in hs if _kind(hf_mods[x]) == k]) == len(match):
                f = match[[_kind(hf_mods[x]) for x in hs if _kind(hf_mods[x]) == k].index(k)]
                pairs.append((h, f))
                hs.remove(h)
                fs.remove(f)
    # 2. with a probe: the same number of output tensors and the same last dimension, outermost first
    if hp is not None and fp is not None:
        for h in list(hs):
            sig = hp[h][1:]
            match = [f for f in fs if fp[f][1:] == sig]
            if match:
                pairs.append((h, match[0]))
                hs.remove(h)
                fs.remove(match[0])
    # 3. by nesting, where each side's remaining modules wrap one another (siblings holding one set are a split or a
    #    tie: an output-channel concatenation pairs a split, see _gather)
    if _chain(hs) and _chain(fs):
        for h, f in zip(list(hs), list(fs)):
            pairs.append((h, f))
            hs.remove(h)
            fs.remove(f)
    for h in hs:
        dropped.append(("hf", h))
    for f in fs:
        dropped.append(("fms", f))
    return pairs, dropped


def _cache_key(parts: Sequence[Any]) -> str:
    blob = json.dumps([str(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cache_dir() -> Path:
    """Where derived maps are cached: ``$PARITY_CACHE_DIR`` or ``~/.cache/parity/derived``."""
    return Path(os.environ.get("PARITY_CACHE_DIR") or Path.home() / ".cache" / "parity" / "derived")


def _config_repr(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    for attr in ("to_json_string", "as_dict", "to_dict"):
        fn = getattr(cfg, attr, None)
        if fn is not None:
            try:
                return str(fn())
            except Exception:  # noqa: BLE001
                continue
    return repr(cfg)


def derive(hf: nn.Module, fms: nn.Module, architecture: str, *, source: str = "hf",
           adapter_kwargs: Optional[Mapping[str, Any]] = None,
           to_checkpoint: Optional[Callable[[dict], dict]] = "transformers",  # type: ignore[assignment]
           exclude: Sequence[str] = (), probe: Optional[Mapping[str, Mapping]] = None,
           cache: bool = True) -> DerivedMap:
    """Derive the module map of ``hf`` (a transformers model) and ``fms`` (the FMS model of ``architecture``).

    Args:
        hf, fms: the two models, with real or ``meta`` tensors (only names, shapes and tying are read).
        architecture: the FMS architecture whose ``source`` adapter turns HF checkpoints into FMS state dicts.
        adapter_kwargs: passed to the adapter as FMS's loader passes them (default ``model_config=fms.config``).
        to_checkpoint: turns a partial HF *runtime* state dict into the checkpoint layout the adapter reads;
            ``"transformers"`` (default) is transformers' own ``revert_weight_conversion`` (what ``save_pretrained``
            writes), None for no change.
        exclude: regular expressions of HF state-dict keys to leave out of the lineage (fed to the adapter as zeros),
            e.g. LoRA tensors that an adapter merges arithmetically into the base weight.
        probe: ``{"hf": probe_outputs(hf, ...), "fms": probe_outputs(fms, ...)}``: call order and output kind of
            each module, which orders the rows, tells wrappers apart and refuses pairs whose outputs differ in kind.
        cache: read and write the on-disk cache (``cache_dir()``).

    Returns:
        DerivedMap.

    Raises:
        DeriveError: the adapter (or transformers' reverse conversion) fails on the tagged checkpoint; the message
            names the step and its first line.
    """
    if to_checkpoint == "transformers":
        to_checkpoint = _transformers_layout(hf)
    kwargs = dict(adapter_kwargs) if adapter_kwargs is not None else (
        {"model_config": fms.config} if hasattr(fms, "config") else {})
    from fms_granite_speech._fms_compat import FMS_VERSION, adapter as fms_adapter

    adapter = fms_adapter(architecture, source)
    key = _cache_key([architecture, source, FMS_VERSION, getattr(adapter, "__qualname__", repr(adapter)),
                      type(hf).__name__, _config_repr(hf), type(fms).__name__, _config_repr(fms),
                      list(exclude), sorted(hf.state_dict(keep_vars=True)), sorted(fms.state_dict(keep_vars=True)),
                      {side: sorted((k, tuple(v)) for k, v in (probe or {}).get(side, {}).items())
                       for side in ("hf", "fms")}, _VERSION, _source_digest()])
    path = cache_dir() / f"{architecture}-{key}.json"
    if cache and path.is_file():
        try:
            out = DerivedMap.from_dict(json.loads(path.read_text()))
            out.cached = True
            return out
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is derived again and rewritten
    start = time.perf_counter()
    out = _derive(hf, fms, architecture, source, kwargs, to_checkpoint, exclude, probe)
    out.seconds = time.perf_counter() - start
    if cache:
        try:
            from parity._atomic import write_atomic

            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(out.to_dict()))
        except (OSError, ValueError):
            pass  # a read-only home: derive again next time
    return out


_VERSION = 3  # bump when the derivation changes what it returns (invalidates the cache)


def _source_digest() -> str:
    """This module's own source, hashed into the cache key: an edited derivation never reads an older one's map."""
    try:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unknown"


def _transformers_layout(hf: nn.Module) -> Optional[Callable[[dict], dict]]:
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    if not isinstance(hf, PreTrainedModel):
        return None
    return lambda sd: revert_weight_conversion(hf, sd)


def _derive(hf, fms, architecture, source, adapter_kwargs, to_checkpoint, exclude, probe) -> DerivedMap:
    tags, key_sid, lineage, peak = _lineage(hf, architecture, source, adapter_kwargs, to_checkpoint, exclude)
    hf_mods = dict(hf.named_modules(remove_duplicate=False))
    fms_mods = dict(fms.named_modules(remove_duplicate=False))
    hf_sd = hf.state_dict(keep_vars=True)
    fms_sd = fms.state_dict(keep_vars=True)

    # every FMS tensor's lineage: from the adapter, or (tied in FMS) from the tensor it aliases
    tensors: dict[str, str] = {}
    by_obj: dict[int, str] = {}
    fms_lin: dict[str, _Lineage] = {}
    for k, t in fms_sd.items():
        if k in lineage:
            fms_lin[k] = lineage[k]
            by_obj.setdefault(id(t), k)
    for k, t in fms_sd.items():
        if k in fms_lin:
            lin = fms_lin[k]
            names = sorted(tags.names[s] for s in lin.sources)
            tensors[k] = f"{lin.relation} <- {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}" \
                if names else lin.relation
        elif id(t) in by_obj:
            fms_lin[k] = fms_lin[by_obj[id(t)]]
            tensors[k] = f"alias of {by_obj[id(t)]}"
        else:
            tensors[k] = "not filled by the adapter"

    hf_sets = _module_sets({k: frozenset([s]) for k, s in key_sid.items() if s is not None})
    fms_sets = _module_sets({k: lin.sources for k, lin in fms_lin.items()})
    for p in hf_mods:
        hf_sets.setdefault(p, frozenset())
    for p in fms_mods:
        fms_sets.setdefault(p, frozenset())

    by_set_h: dict[frozenset, list[str]] = defaultdict(list)
    by_set_f: dict[frozenset, list[str]] = defaultdict(list)
    for p, s in hf_sets.items():
        if s:
            by_set_h[s].append(p)
    for p, s in fms_sets.items():
        if s:
            by_set_f[s].append(p)

    pairs: list[DerivedPair] = []
    unpaired: list[Unpaired] = []
    paired_h: dict[str, str] = {}
    paired_f: set[str] = set()
    for s, hs in by_set_h.items():
        fs = by_set_f.get(s)
        if not fs:
            continue
        got, dropped = _resolve_group(list(hs), list(fs), hf_mods, fms_mods, probe)
        for h, f in got:
            pairs.append(DerivedPair(name=f or "model", hf=h, fms=f, relation=SAME, parts=(f,), sources=len(s)))
            paired_h[h] = f
            paired_f.add(f)
        for side, p in dropped:
            mates = [h if side == "hf" else f for h, f in got]
            if mates:
                reason = (f"holds the same HF tensors as {', '.join(repr(m or '<model>') for m in mates)} on this side, "
                          "which is paired; nothing is left to pair it with on the other side (a wrapper with code "
                          "of its own, or a container)")
            else:
                reason = (f"{len(hs)} HF and {len(fs)} FMS modules hold exactly these tensors and cannot be told "
                          "apart (siblings, not wrappers)")
            unpaired.append(Unpaired(side, p, reason))

    # output-channel gathers: an HF module whose weight rows went into FMS Linear rows (fused, split or permuted)
    row_home: dict[int, list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for k, lin in fms_lin.items():
        if lin.row_sid is None or not k.endswith(".weight"):
            continue
        mod = fms_mods.get(k.rsplit(".", 1)[0])
        if not isinstance(mod, nn.Linear) and len(lin.row_sid.shape) != 1 or fms_sd[k].dim() not in (1, 2):
            continue
        if not isinstance(mod, nn.Linear) and fms_sd[k].dim() != 1:
            continue
        for s in lin.sources:
            sel = lin.row_sid == s
            row_home[s].append((k.rsplit(".", 1)[0], torch.nonzero(sel).flatten(), lin.row_q[sel], lin.row_ok[sel],
                                int(lin.row_sid.numel())))
    new_pairs = []
    for i, p in enumerate(pairs):
        if p.relation != SAME or f"{p.hf}.weight" not in key_sid or list(hf_mods[p.hf].children()):
            continue
        linear = isinstance(hf_mods[p.hf], nn.Linear) and isinstance(fms_mods[p.fms], nn.Linear)
        if not linear and hf_sd[f"{p.hf}.weight"].dim() != 1:
            continue
        g = _gather(p.hf, key_sid, row_home, tags)
        if g is not None and g[1] is not None and g[0] == [p.fms]:
            # one FMS module holding HF's channels in another order (RoPE rows, fused_weights=False)
            pairs[i] = dataclasses.replace(p, relation=GATHER, index=g[1], elementwise=not linear,
                                           name=f"{p.fms}[{p.hf.rsplit('.', 1)[-1]}]")
    for p_h, mod in hf_mods.items():
        if p_h in paired_h or not isinstance(mod, nn.Linear) or not hf_sets.get(p_h):
            continue
        # the outermost HF module holding exactly this Linear's tensors (a peft wrapper around it)
        outer = p_h
        while True:
            parent = outer.rsplit(".", 1)[0] if "." in outer else ""
            if outer == "" or parent in paired_h or hf_sets.get(parent) != hf_sets[p_h]:
                break
            outer = parent
        if outer in paired_h:
            continue
        g = _gather(p_h, key_sid, row_home, tags)
        if g is None:
            continue
        parts, index = g
        leaf = outer.rsplit(".", 1)[-1]
        rel = CONCAT if len(parts) > 1 else GATHER
        name = f"{'+'.join(parts)}[{leaf}]" if len(parts) > 1 else f"{parts[0]}[{leaf}]"
        new_pairs.append(DerivedPair(name=name, hf=outer, fms=parts[0], relation=rel, parts=tuple(parts),
                                     index=index, sources=len(hf_sets[p_h])))
        paired_h[outer] = parts[0]
        for inner in [h for h in hf_mods if h.startswith(outer + ".") and hf_sets.get(h) == hf_sets[p_h]]:
            paired_h.setdefault(inner, parts[0])  # a peft base_layer: compared through its wrapper
    pairs.extend(new_pairs)

    # parameter-free modules, by class under the nearest paired ancestors
    def nearest(path: str, paired) -> Optional[str]:
        while path != "":
            path = path.rsplit(".", 1)[0] if "." in path else ""
            if path in paired:
                return path
        return None

    free_f: dict[str, list[str]] = defaultdict(list)
    for f, mod in fms_mods.items():
        if not fms_sets[f] and not isinstance(mod, _SKIP_FREE) and not list(mod.children()):
            anc = nearest(f, paired_f)
            if anc is not None:
                free_f[anc].append(f)
    direct = {p.hf: p.fms for p in pairs if p.relation == SAME}
    excluded_mods = {p for k, sid in key_sid.items() if sid is None and hf_sd[k].is_floating_point()
                     for p in _prefixes(k)[1:]}
    for h, mod in hf_mods.items():
        if hf_sets[h] or list(mod.children()) or isinstance(mod, (nn.ModuleDict, nn.ParameterDict, nn.ModuleList)):
            continue
        if h in excluded_mods:
            unpaired.append(Unpaired("hf", h, f"its tensors are left out of the derivation by the pair's hint "
                                              f"(exclude={list(exclude)}); the module wrapping them is compared"))
            continue
        if isinstance(mod, _SKIP_FREE):
            unpaired.append(Unpaired("hf", h, f"{type(mod).__name__}: no computation in eval mode"))
            continue
        anc = nearest(h, direct)
        cands = [f for f in free_f.get(direct.get(anc, "\0"), []) if type(fms_mods[f]) is type(mod)]
        if anc is not None and cands:
            f = cands[0]
            free_f[direct[anc]].remove(f)
            pairs.append(DerivedPair(name=f, hf=h, fms=f, relation=STRUCTURAL, parts=(f,)))
        else:
            where = f"in {direct[anc]!r}" if anc is not None else "inline"
            unpaired.append(Unpaired("hf", h, f"{type(mod).__name__} without parameters: FMS computes it {where}, "
                                              "not as a module of this class"))

    # what holds HF tensors and has no pair: name the FMS modules its tensors went to
    owner_of: dict[int, set] = defaultdict(set)
    for k, lin in fms_lin.items():
        for s in lin.sources:
            owner_of[s].add(k.rsplit(".", 1)[0] if "." in k else "")
    covered = set(paired_h)
    listed = {(u.side, u.path) for u in unpaired}
    for h, s in hf_sets.items():
        if not s or h in covered or ("hf", h) in listed or isinstance(hf_mods.get(h), (nn.ModuleList, nn.ModuleDict)):
            continue
        homes = sorted({o for sid in s for o in owner_of.get(sid, ())})
        if not homes:
            reason = "its tensors reach no FMS tensor through the adapter (dropped or not read)"
        else:
            reason = (f"its {len(s)} tensor(s) straddle FMS modules ({', '.join(homes[:4])}"
                      f"{' ...' if len(homes) > 4 else ''}): no FMS module holds exactly them")
        unpaired.append(Unpaired("hf", h, reason))
    listed = {(u.side, u.path) for u in unpaired}
    for f, s in fms_sets.items():
        if s and f not in paired_f and ("fms", f) not in listed and not isinstance(fms_mods.get(f), (nn.ModuleList, nn.ModuleDict)) \
                and not any(f in p.parts for p in pairs):
            unpaired.append(Unpaired("fms", f, "holds tensors from several HF modules, and no HF module holds "
                                               "exactly them"))

    # outputs that differ in kind (number of tensors) cannot be compared: refuse, with the reason
    if probe:
        hp, fp = probe.get("hf") or {}, probe.get("fms") or {}
        kept = []
        for p in pairs:
            if p.relation == SAME and p.hf in hp and p.fms in fp and hp[p.hf][1] != fp[p.fms][1]:
                unpaired.append(Unpaired("hf", p.hf, f"same tensors as FMS {p.fms!r}, but its output holds "
                                                     f"{hp[p.hf][1]} tensor(s) and FMS's {fp[p.fms][1]}: they "
                                                     "compute different things"))
                continue
            kept.append(p)
        pairs = kept
        order = {h: v[0] for h, v in hp.items()}
        pairs.sort(key=lambda p: order.get(p.hf, 1 << 30))
    else:
        order = {p: i for i, p in enumerate(hf_mods)}
        pairs.sort(key=lambda p: order.get(p.hf, 1 << 30))
    in_rows_f = {part for p in pairs for part in p.parts}
    in_rows_h = {p.hf for p in pairs} | set(paired_h)
    unpaired = [u for u in unpaired if (u.path not in in_rows_f if u.side == "fms" else u.path not in in_rows_h)]
    unpaired.sort(key=lambda u: (u.side, u.path))
    return DerivedMap(architecture=architecture, pairs=pairs, unpaired=unpaired, tensors=tensors,
                      hf_tensors=len(tags.names), peak_group_mib=peak / 2 ** 20,
                      unused=sorted(k for k in lineage if k not in fms_sd))


def _gather(path: str, key_sid, row_home, tags) -> Optional[tuple[list[str], Optional[tuple[int, ...]]]]:
    """For HF Linear ``path``: the FMS Linear(s) holding its weight rows and the output-channel index, or None when
    its rows are not all whole rows of FMS Linears. The index is None when it is the identity of one whole module."""
    sid = key_sid.get(f"{path}.weight")
    if sid is None or sid not in row_home:
        return None
    homes = row_home[sid]
    rows_h = tags.shapes[sid][0]
    if not all(bool(ok.all()) for _, _, _, ok, _ in homes):
        return None
    index = torch.full((rows_h,), -1, dtype=torch.int64)
    parts: list[str] = []
    offset = 0
    for mod, rows, qs, _, width in sorted(homes, key=lambda h: int(h[2].min())):
        if mod in parts:
            return None
        parts.append(mod)
        index[qs] = rows + offset
        offset += width
    if bool((index < 0).any()) or len(set(index.tolist())) != rows_h:
        return None
    if len(parts) == 1 and torch.equal(index, torch.arange(rows_h)) and offset == rows_h:
        return parts, None
    return parts, tuple(index.tolist())
