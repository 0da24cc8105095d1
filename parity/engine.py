"""Layer-by-layer parity of any plugin pair through its derived map (``parity diff --architecture NAME``).

For a ``parity.models.PairPlugin``: build both models, derive the module map from FMS's adapter
(``parity.derive``), run each side once with a hook on every mapped module (its output, and the input of every
container pair: a block, an attention, an MLP, the model), run HF once more in float64 on the same weights (exact
copies of them), and compare row by row:

* the FMS tensor is aligned to HF's: the derived gather / concatenation of output channels, a named transform, size-1
  dimensions, positions that are padding left out (``TextInputs.valid``);
* the bound is float64-referenced: in float32 the per-dtype tolerance (``metrics.default_tolerance``) widened to
  ``ROUNDING["propagated"]`` times HF's own drift from float64 at that row when larger; in bfloat16 / float16
  ``metrics.rounding_tolerance`` of HF's own drift (the same rule as the Granite Speech engine's propagated bound);
* the first failing row in HF's execution order is where the error starts; it gets an explanation: a pure scale
  (least-squares fit), or an input that differs while every earlier row agrees (the computation between two modules,
  in the parent's forward).

The result is a ``ParityResult`` (the schema every report, ``recheck`` and ``check`` reads).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from parity._json import json_safe
from parity._shell import error_line
from parity.capture import first_tensor
from parity.derive import CONCAT, GATHER, SAME, DerivedMap, DerivedPair, derive, probe_outputs
from parity.metrics import Tolerance, compare_tensors, default_tolerance, rounding_tolerance
from parity.pathmap import ROUNDING, LayerPair
from parity.result import LayerResult, ParityResult

__all__ = ["TRANSFORMS", "derived_map", "run_architecture"]

TRANSFORMS = {
    "logits_scaling": "FMS logits multiplied by text_config.logits_scaling (transformers 5.x's Granite Speech does not "
                      "divide by it; FMS Granite does)",
}


def _apply_transform(name: Optional[str], t: torch.Tensor, cfg) -> torch.Tensor:
    if name is None:
        return t
    if name == "logits_scaling":
        text = getattr(cfg, "text_config", cfg)
        return t * float(getattr(text, "logits_scaling", 1.0))
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")


class _Recorder:
    """Forward (pre-)hooks storing the first output (and for ``inputs`` paths the first input) tensor of each call,
    with the order events happened in."""

    def __init__(self, model: nn.Module, outputs: Sequence[str], inputs: Sequence[str] = ()):
        self.model = model
        self.outs: dict[str, list[torch.Tensor]] = {p: [] for p in outputs}
        self.ins: dict[str, list[torch.Tensor]] = {p: [] for p in inputs}
        self.order: dict[tuple[str, str], int] = {}
        self._handles: list = []

    def _note(self, key):
        self.order.setdefault(key, len(self.order))

    def __enter__(self):
        mods = dict(self.model.named_modules(remove_duplicate=False))
        for path in self.outs:
            def post(_m, _a, out, path=path):
                t = first_tensor(out)
                if t is not None:
                    self.outs[path].append(t.detach().clone())
                    self._note((path, "output"))
            self._handles.append(mods[path].register_forward_hook(post))
        for path in self.ins:
            def pre(_m, args, kwargs, path=path):
                t = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
                if t is not None and t.is_floating_point():
                    self.ins[path].append(t.detach().clone())
                    self._note((path, "input"))
            self._handles.append(mods[path].register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _to64(value: Any) -> Any:
    from parity._tree import map_tensors

    return map_tensors(lambda t: t.to(torch.float64) if t.is_floating_point() else t, value)


@dataclass
class _Row:
    name: str
    pair: DerivedPair
    tensor: str  # "output" | "input"


def _rows(dmap: DerivedMap, hf: nn.Module) -> list[_Row]:
    rows = []
    for p in dmap.pairs:
        rows.append(_Row(p.name, p, "output"))
        if (p.relation == SAME or p.elementwise) and p.fms:
            rows.append(_Row(f"{p.name}.input", p, "input"))
    return rows


def _align(h: torch.Tensor, f: torch.Tensor, valid: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` shaped like ``h`` (size-1 dimensions, one unique dimension order), then both restricted to the valid
    positions when their first two dimensions are [B, T]. Raises ValueError when the shapes cannot be matched."""
    if h.shape != f.shape:
        if h.numel() == f.numel() and h.squeeze().shape == f.squeeze().shape:
            f = f.reshape(h.shape)
        else:
            import itertools

            perms = [p for p in itertools.permutations(range(f.dim())) if tuple(f.shape[i] for i in p) == h.shape] \
                if f.dim() == h.dim() and f.dim() <= 4 else []
            if len(perms) != 1:
                raise ValueError(f"HF's tensor is {list(h.shape)}, FMS's {list(f.shape)}")
            f = f.permute(perms[0])
    if valid is not None and h.dim() >= 2 and tuple(h.shape[:2]) == tuple(valid.shape) and not bool(valid.all()):
        h, f = h[valid], f[valid]
    return h, f


def _fms_tensor(rec: _Recorder, pair: DerivedPair, call: int) -> torch.Tensor:
    if pair.relation in (GATHER, CONCAT):
        parts = [rec.outs[p][call] for p in pair.parts]
        t = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if pair.index is not None:
            t = t[..., torch.tensor(pair.index, dtype=torch.long, device=t.device)]
        return t
    return rec.outs[pair.fms][call]


def _distinct(calls: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the calls whose tensor differs from every earlier call's (identical repeats left out)."""
    kept: list[int] = []
    for i, t in enumerate(calls):
        if not any(calls[j].shape == t.shape and torch.equal(calls[j], t) for j in kept):
            kept.append(i)
    return kept


def _fms_input(rec: _Recorder, pair: DerivedPair, call: int) -> torch.Tensor:
    t = rec.ins[pair.fms][call]
    if pair.elementwise and pair.index is not None:
        t = t[..., torch.tensor(pair.index, dtype=torch.long, device=t.device)]
    return t


def _tolerance(dtype: torch.dtype, drift: float) -> Tolerance:
    if not math.isfinite(drift):  # HF's float64 run is not finite here: no rounding reference, the flat bound
        return default_tolerance(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return rounding_tolerance(drift, ROUNDING["propagated"], dtype)
    base = default_tolerance(dtype)
    bound = ROUNDING["propagated"] * drift
    if bound <= base.max_rel_l2:
        return base
    return Tolerance(atol=base.atol, rtol=base.rtol, max_rel_l2=bound, min_cosine=max(-1.0, 1.0 - bound))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """rel-L2 of ``a`` against ``b`` over every element, in float64. Unlike ``compare._rel_l2`` (which leaves
    non-finite pairs out) a NaN or inf anywhere makes it non-finite: that is how a float64 reference that is not
    finite (fully masked padding rows) is noticed and replaced by the per-dtype bound."""
    a64, b64 = a.double(), b.double()
    den = float(b64.norm())
    num = float((a64 - b64).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _parent(fms_path: str, pairs: Sequence[DerivedPair]) -> str:
    """The nearest FMS ancestor of ``fms_path`` that a row compares (``""``: the model)."""
    compared = {p.fms for p in pairs if p.relation == SAME}
    path = fms_path
    while path:
        path = path.rsplit(".", 1)[0] if "." in path else ""
        if path in compared:
            return path
    return ""


def _explain(row: _Row, h: torch.Tensor, f: torch.Tensor, tol: Tolerance, earlier_pass: bool,
             pairs: Sequence[DerivedPair] = ()) -> dict:
    """Why the first failing row fails: a pure scale, or (for an input row) the computation before the module."""
    out: dict = {}
    h64, f64 = h.double().flatten(), f.double().flatten()
    hh = float(h64 @ h64)
    if hh > 0 and torch.isfinite(f64).all():
        c = float(f64 @ h64) / hh
        resid = _rel(f64, c * h64)
        if resid <= max(tol.max_rel_l2, 1e-6) and abs(c - 1) > tol.max_rel_l2:
            out["scale"] = c
            out["text"] = (f"FMS = {c:.6g} x HF at {row.name}: a pure scale (residual {resid:.2g} after the fit); "
                              "look for a multiplier (embedding, residual, logits, attention scale) applied on one "
                              "side only")
    if row.tensor == "input" and earlier_pass:
        parent = _parent(row.pair.fms, pairs)
        out["introduced_in"] = parent
        out.setdefault("text", f"the input of {row.pair.fms} differs while every earlier row agrees: introduced in "
                               f"{parent or 'the model'}'s own forward, by the code that runs between its sub-modules "
                               f"before {row.pair.fms} (for an attention: RoPE, the scores, the mask, the softmax; for "
                               "a model: an embedding or residual multiplier)")
    else:
        out["introduced_in"] = row.pair.fms
    if "text" not in out:
        if row.pair.relation in (GATHER, CONCAT):
            out["text"] = (f"the output channels of FMS {'+'.join(row.pair.parts)} that carry HF "
                              f"{row.pair.hf!r} differ: the fused/permuted weight rows or their order")
        else:
            out["text"] = (f"FMS {row.pair.fms or 'model'!r} computes something else than HF {row.pair.hf or 'model'!r} "
                              "on inputs that agree: the error starts inside this module")
    return out


def derived_map(built, plugin, inputs, cache: bool = True) -> DerivedMap:
    """The derived map of a built pair, with a probe forward of each side on ``inputs``."""
    probe = {"hf": probe_outputs(built.hf, lambda m: plugin.run_hf(m, inputs)),
             "fms": probe_outputs(built.fms, lambda m: plugin.run_fms(m, inputs))}
    return derive(built.hf, built.fms, built.architecture, exclude=plugin.exclude, probe=probe, cache=cache,
                  to_checkpoint=plugin.to_checkpoint(built.hf))


def run_architecture(plugin, *, dtype: str = "float32", case: Optional[str] = None, seed: int = 0, variant: str = "tiny",
                     checkpoint=None, layers: Optional[Sequence[str]] = None, fused_weights: bool = True,
                     built=None, progress=None, command: Optional[str] = None, inputs=None) -> ParityResult:
    """Compare the plugin's pair row by row on the named ``case``.

    Args:
        plugin: a ``parity.models.PairPlugin``; built: an already built pair (``plugin.build(...)``) to reuse.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (both sides); the bounds come from a float64 run of HF.
        case: one of ``parity.models.CASES`` that applies to the architecture (default: the plugin's
            ``default_case``).
        layers: row names (or prefixes) the verdict is about; default every row.
        inputs: a ``parity.models.TextInputs`` to run instead of a named case (``parity generate`` feeds HF's
            generated sequence).

    Returns:
        ParityResult (``first_divergent``: the first failing row in HF's execution order).

    Raises:
        parity.models.BuildError: a step of building the pair failed (the CLI turns it into a FAIL verdict).
        parity.derive.DeriveError: FMS's adapter rejects the tagged checkpoint.
        ValueError: an unknown case or layer name.
    """
    from parity.compare import versions

    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    if built is None:
        say(f"building {plugin.name} ({plugin.hf_class} and FMS {plugin.name}, {dtype})")
        built = plugin.build(dtype, seed=seed, variant=variant, checkpoint=checkpoint, fused_weights=fused_weights)
    cfg = built.hf_config
    if inputs is None:
        inputs = plugin.inputs(case or plugin.default_case, cfg, seed)
    say("deriving the module map from FMS's adapter")
    dmap = derived_map(built, plugin, inputs)
    rows = _rows(dmap, built.hf)
    hf_outs = sorted({r.pair.hf for r in rows if r.tensor == "output"})
    hf_ins = sorted({r.pair.hf for r in rows if r.tensor == "input"})
    fms_outs = sorted({p for r in rows if r.tensor == "output" for p in (r.pair.parts or (r.pair.fms,))})
    fms_ins = sorted({r.pair.fms for r in rows if r.tensor == "input"})

    say("running HF")
    with torch.no_grad(), _Recorder(built.hf, hf_outs, hf_ins) as rh:
        plugin.run_hf(built.hf, inputs)
    say("running HF in float64 (the bounds' reference)")
    from parity.runner import float64

    with torch.no_grad(), float64(built.hf), _Recorder(built.hf, hf_outs, hf_ins) as r64:
        plugin.run_hf(built.hf, inputs)
    say("running FMS")
    fms_error = None
    with torch.no_grad(), _Recorder(built.fms, fms_outs, fms_ins) as rf:
        try:
            plugin.run_fms(built.fms, inputs)
        except Exception as err:  # noqa: BLE001 - the FMS model raising is a verdict on the rows it did not reach
            fms_error = f"the FMS model raised {error_line(err)}"

    torch_dtype = built.dtype
    results: list[tuple[int, LayerResult]] = []
    flat: list[str] = []  # rows where HF's float64 run is not finite: the per-dtype bound instead
    for row in rows:
        side_h = rh.ins if row.tensor == "input" else rh.outs
        key = row.pair.hf
        order = rh.order.get((key, row.tensor), 1 << 30)
        pair = LayerPair(name=row.name, hf=row.pair.hf, fms="+".join(row.pair.parts) if row.pair.relation == CONCAT
                         else row.pair.fms, tensor=row.tensor, transform=plugin.transforms.get(row.name),
                         section="model", kind=None, factor=ROUNDING["propagated"])
        res = LayerResult(pair=pair)
        hs = side_h.get(key, [])
        try:
            fs_n = len(rf.ins.get(row.pair.fms, [])) if row.tensor == "input" else min(
                len(rf.outs.get(p, [])) for p in (row.pair.parts or (row.pair.fms,)))
        except ValueError:
            fs_n = 0
        if not hs:
            continue  # the module did not run on this input (HF side): nothing to compare
        res.calls = max(len(hs), fs_n)
        keep = list(range(len(hs)))
        if fs_n != len(hs):
            # a side that runs a module again on the same input (transformers' Granite Speech embeds the prompt twice)
            # computes nothing new: identical repeats are left out before the calls are matched
            keep = _distinct(hs)
            fms_keep = _distinct([rf.ins[row.pair.fms][c] if row.tensor == "input" else _fms_tensor(rf, row.pair, c)
                                  for c in range(fs_n)]) if fs_n else []
            if len(keep) == len(fms_keep):
                hs_calls = list(zip(keep, fms_keep))
            else:
                hs_calls = None
        else:
            hs_calls = [(c, c) for c in range(len(hs))]
        if hs_calls is None:
            res.error = (fms_error if fms_error and fs_n < len(hs) else
                         f"HF ran this module {len(hs)} time(s), FMS {fs_n} time(s)")
            results.append((order, res))
            continue
        diffs, drifts = [], []
        try:
            for call, fcall in hs_calls:
                h = hs[call]
                f = _fms_input(rf, row.pair, fcall) if row.tensor == "input" else _fms_tensor(rf, row.pair, fcall)
                f = _apply_transform(pair.transform, f, cfg)
                h64 = (r64.ins if row.tensor == "input" else r64.outs)[key][call]
                h, f = _align(h, f, inputs.valid)
                h64, _ = _align(h64, h64, inputs.valid)
                drift = _rel(h, h64)
                drifts.append(drift)
                diffs.append(compare_tensors(f, h, _tolerance(torch_dtype, drift)))
        except ValueError as err:
            res.error = f"cannot align the tensors: {err}"
            results.append((order, res))
            continue
        worst = max(range(len(diffs)), key=lambda i: (not diffs[i].passed, diffs[i].rel_l2))
        res.diff = diffs[worst]
        if all(math.isfinite(d) for d in drifts):
            res.hf_rounding = {"propagated": drifts[worst]}
        else:
            flat.append(row.name)
        results.append((order, res))
    results.sort(key=lambda x: x[0])
    layer_results = [r for _, r in results]
    # the input pipelines (a plugin whose sides each run their own: HF's processor against the project's) come first
    piped = []
    for name, (h, f) in (getattr(inputs, "pipelines", None) or {}).items():
        res = LayerResult(pair=LayerPair(name=name, hf="processor", fms="processor", tensor="pipeline",
                                         section="model", kind=None))
        if tuple(h.shape) != tuple(f.shape):
            res.error = f"HF's pipeline gives {list(h.shape)}, the project's {list(f.shape)}"
        else:
            res.diff = compare_tensors(f, h, default_tolerance(h.dtype) if h.is_floating_point() else None)
        piped.append(res)
    layer_results = piped + layer_results

    first = next((r for r in layer_results if not r.passed), None)
    if first is not None:
        row = next(r for r in rows if r.name == first.name)
        earlier_pass = all(r.passed for r in layer_results[: layer_results.index(first)])
        if first.diff is not None:
            call = 0
            h = (rh.ins if row.tensor == "input" else rh.outs)[row.pair.hf][call]
            f = _fms_input(rf, row.pair, call) if row.tensor == "input" else _fms_tensor(rf, row.pair, call)
            try:
                h, f = _align(h, _apply_transform(first.pair.transform, f, cfg), inputs.valid)
                first.explanation = _explain(row, h, f, first.diff.tolerance, earlier_pass, dmap.pairs)
            except ValueError:
                pass
        elif first.error:
            first.explanation = {"text": first.error}

    names = [r.name for r in layer_results]
    if layers:
        requested = []
        for want in layers:
            got = [n for n in names if n == want or n.startswith(want + ".") or n.startswith(want + "[")
                   or n.startswith(want + "+")]
            if not got:
                import difflib

                close = difflib.get_close_matches(want, names, n=3)
                raise ValueError(f"no row {want!r} in the derived map of {plugin.name}; closest: "
                                 f"{', '.join(close) or 'none'} (`parity map --architecture {plugin.name}` lists them)")
            requested.extend(g for g in got if g not in requested)
    else:
        requested = names
    notes = list(built.notes)
    notes.append(f"map derived from FMS's {built.architecture!r} 'hf' adapter: {len(dmap.pairs)} pairs, "
                 f"{len(dmap.unpaired)} modules unpaired ({'cached' if dmap.cached else f'{dmap.seconds:.2f} s'})")
    for name, t in plugin.transforms.items():
        notes.append(f"transform {t} on {name}: {TRANSFORMS.get(t, t)}")
    notes.append("bounds from a float64 run of HF on the same weights: FMS vs HF rel-L2 <= "
                 f"{ROUNDING['propagated']} x HF's own drift from float64 "
                 + ("+ the rounding floor" if torch_dtype in (torch.bfloat16, torch.float16)
                    else f"(at least the {torch_dtype} tolerance)"))
    if flat:
        notes.append(f"HF's float64 run is not finite at {len(flat)} row(s) from {flat[0]} on (transformers' float64 "
                     "masks of fully masked padding rows): those rows use the per-dtype tolerance")
    if fms_error:
        notes.append(fms_error)
    return ParityResult(
        layers=layer_results, requested=requested, first_divergent=first.name if first else None,
        sections=["model"], tolerance=None, provenance=built.provenance, inputs=inputs.describe(),
        config=json_safe(cfg.to_dict()) if hasattr(cfg, "to_dict") else {}, versions=versions(), notes=notes,
        excluded=[{"name": u.path or "<model>", "side": u.side, "hf": u.path if u.side == "hf" else "-",
                   "fms": u.path if u.side == "fms" else "-", "reason": u.reason} for u in dmap.unpaired],
        elapsed_s=time.perf_counter() - start, mode="eager",
        reference="float64" if torch_dtype in (torch.bfloat16, torch.float16) else None, memory="together",
        command=command)
