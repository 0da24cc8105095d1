"""The parity engine: run both models on the same inputs, compare every mapped layer, find the first divergence.

``run_parity(pair, inputs, layers, mode="eager")`` works in three steps (Polygraphy's runner -> comparator split):

1. run the HF reference with ``Capture`` hooks on the HF module of every pair it has to produce, keeping copies;
2. run the FMS model with streaming hooks: as each FMS module returns, its tensor is compared (``metrics.
   compare_tensors``) with the stored HF tensor of the same call and only the ``TensorDiff`` is kept;
3. order the diffs by the path map's execution order and name the first one that fails.

Modes (``MODES``; the result records ``mode`` and ``compile_backend``):

* ``eager``: HF eager vs FMS eager, FMS streamed as above.
* ``compiled``: both sides' section modules compiled with ``fms_granite_speech.compile.compile_modules`` (HF
  ``model.encoder`` / ``model.projector`` / ``model.language_model``, FMS ``encoder`` / ``projector`` / ``decoder``),
  FMS vs HF per layer. The hooks of a compiled section run inside its graph; a Python callback there would be traced
  into (or break) the graph, so both sides STORE clones of their captures and are compared after the runs.
* ``drift``: each side compiled vs itself eager, per layer: ``hf_drift`` (HF compiled vs HF eager) and the FMS drift
  (FMS compiled vs FMS eager, in ``layers``). Every side is stored and compared after its runs.

Compiled modes call ``torch._dynamo.reset()`` first (hooks of earlier runs would otherwise count towards dynamo's
recompile limit) and raise instead of silently falling back to eager when that limit is hit; the modules are
restored to eager afterwards. Storing every activation of both sides costs memory (tiny: a few MB).

Only the sections the requested layers need are run: an encoder layer runs only the two encoders (HF
``hf.model.encoder``), a projector layer runs encoder + projector, anything in the decoder runs the full models.
Every pair of every section that ran is compared, so the first divergent layer is found over everything that ran,
not only over the requested names.

The result, ``ParityResult``, is plain JSON-serialisable data and the single source of every report format;
``recheck(result, tol)`` applies new tolerances to saved statistics without re-running either model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from parity.capture import Capture, first_tensor
from parity.metrics import TensorDiff, Tolerance, compare_tensors
from parity.pathmap import EXCLUDED, INPUT, TRANSFORMS, LayerPair, expand, resolve

__all__ = ["COMPILE_BACKENDS", "LayerResult", "MODES", "ParityResult", "SECTIONS", "apply_transform", "recheck",
           "requested_pairs", "run_parity", "run_section", "set_adapters", "versions", "worst_diff"]

SECTIONS = ("encoder", "projector", "decoder")
MODES = ("eager", "compiled", "drift")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# the module compiled for each section, per side
_COMPILED_PIECES = {"hf": {"encoder": "model.encoder", "projector": "model.projector",
                           "decoder": "model.language_model"},
                    "fms": {"encoder": "encoder", "projector": "projector", "decoder": "decoder"}}
SCHEMA_VERSION = 1


@dataclass
class LayerResult:
    """The comparison of one ``LayerPair``.

    Attributes:
        pair: what was compared (names, module paths, tensor, transform).
        diff: the statistics, or None when no element-wise comparison was possible (see ``error``).
        error: why there is no diff (a module that never ran on one side, a different number of calls, a shape
            mismatch), None otherwise.
        calls: how many times the module ran per side (the diff shown is the worst call by rel-L2).
    """

    pair: LayerPair
    diff: Optional[TensorDiff] = None
    error: Optional[str] = None
    calls: int = 1

    @property
    def name(self) -> str:
        """The parity name of the layer."""
        return self.pair.name

    @property
    def passed(self) -> bool:
        """True when there is a diff, it passed, and nothing went wrong."""
        return self.error is None and self.diff is not None and self.diff.passed

    @property
    def reason(self) -> Optional[str]:
        """Why this layer fails (None when it passes)."""
        if self.error is not None:
            return self.error
        return None if self.diff is None or self.diff.passed else self.diff.reason

    def to_dict(self) -> dict:
        """JSON-safe dict (the pair, the diff's ``to_dict``, error, calls)."""
        return {"pair": self.pair.to_dict(), "diff": None if self.diff is None else self.diff.to_dict(),
                "error": self.error, "calls": self.calls}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerResult":
        """Inverse of ``to_dict`` (KeyError on a missing field)."""
        diff = data.get("diff")
        return cls(pair=LayerPair(**data["pair"]), diff=None if diff is None else TensorDiff.from_dict(diff),
                   error=data.get("error"), calls=int(data.get("calls", 1)))


@dataclass
class ParityResult:
    """Everything one parity run found, JSON-serialisable (``to_json`` / ``from_json``).

    Attributes:
        layers: one ``LayerResult`` per compared pair, in execution order (every pair of every section that ran).
        requested: names of the layers the caller asked about (each requested name and its sub-modules).
        first_divergent: name of the first layer in execution order, over everything that ran, that breaks
            tolerance; None when none does.
        sections: the model sections that were run (``encoder``, ``projector``, ``decoder``).
        tolerance: the ``Tolerance`` applied as a dict, or None for the per-dtype default of ``metrics``.
        provenance: where the two models came from (variant, checkpoint, seed, dtype, device, LoRA state).
        inputs: what was fed (audio sources, prompt, tensor shapes).
        config: the ``GraniteSpeechConfig`` as a dict.
        versions: torch / transformers / ibm-fms / python versions.
        notes: statements the report must show (transforms applied, e.g. the logits_scaling deviation).
        excluded: module pairs that cannot be compared element-wise, with the reason.
        elapsed_s: wall time of the run in seconds.
        mode: ``eager``, ``compiled`` or ``drift`` (see the module docstring). In ``drift`` mode ``layers`` holds the
            FMS drift (FMS compiled vs FMS eager) and ``hf_drift`` the HF drift, same pairs, same order.
        compile_backend: the ``torch.compile`` backend of the compiled modes, None in eager mode.
        hf_drift: HF compiled vs HF eager per layer (drift mode only, else empty).
        attribution: a ``parity.attribution.AttributionResult.to_dict()`` when attribution was run with it, else None.
    """

    layers: list[LayerResult]
    requested: list[str]
    first_divergent: Optional[str]
    sections: list[str]
    tolerance: Optional[dict]
    provenance: dict
    inputs: dict
    config: dict
    versions: dict
    notes: list[str] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    mode: str = "eager"
    compile_backend: Optional[str] = None
    hf_drift: list[LayerResult] = field(default_factory=list)
    attribution: Optional[dict] = None

    @property
    def passed(self) -> bool:
        """True when every requested layer passes (in drift mode: on both sides)."""
        wanted = set(self.requested)
        return (all(r.passed for r in self.requested_results())
                and all(r.passed for r in self.hf_drift if r.name in wanted))

    def requested_results(self) -> list[LayerResult]:
        """Results of the requested layers, in execution order."""
        wanted = set(self.requested)
        return [r for r in self.layers if r.name in wanted]

    def layer(self, name: str) -> LayerResult:
        """The result of one layer by parity name (KeyError listing what was compared if absent)."""
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"layer {name!r} was not compared in this run ({len(self.layers)} layers: "
                       f"{', '.join(r.name for r in self.layers[:8])}...)")

    def first_failure(self) -> Optional[LayerResult]:
        """The result of ``first_divergent`` (None when every layer that ran passes)."""
        return next((r for r in self.layers if not r.passed), None)

    def to_dict(self) -> dict:
        """JSON-safe dict with ``schema_version`` and the overall ``passed`` verdict added."""
        out = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [r.to_dict() for r in value] if f.name in ("layers", "hf_drift") else value
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ParityResult":
        """Inverse of ``to_dict``.

        Raises:
            ValueError: ``data`` is not a parity result of a known schema version.
        """
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or "layers" not in data:
            raise ValueError(f"not a parity result (schema_version {SCHEMA_VERSION} JSON from ParityResult.to_json)")
        kw = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        try:
            kw["layers"] = [LayerResult.from_dict(r) for r in data["layers"]]
            kw["hf_drift"] = [LayerResult.from_dict(r) for r in data.get("hf_drift") or []]
            return cls(**kw)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a parity result: a field is missing or malformed ({err})") from None

    def to_json(self, indent: Optional[int] = 2) -> str:
        """JSON text (strict: non-finite floats are stored as the strings "nan"/"inf")."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ParityResult":
        """Inverse of ``to_json``. Raises ValueError on text that is not a parity result."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not a parity result: invalid JSON ({err})") from err
        return cls.from_dict(data)


# -- running ----------------------------------------------------------------------------------------------------------


def versions() -> dict:
    """Versions of what the comparison depends on: python, torch, transformers, ibm-fms, peft."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "ibm-fms", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def requested_pairs(config, layers: Union[None, str, Sequence[str]]) -> list[LayerPair]:
    """The path-map pairs for ``layers`` (each name with its sub-modules; None: every layer), in execution order.

    Raises:
        pathmap.UnknownLayerError (ValueError): an unknown name; the message lists the closest valid names.
    """
    if layers is None:
        return expand(config)
    if isinstance(layers, str):
        layers = [layers]
    seen, out = set(), []
    for name in layers:
        for p in resolve(name, config):
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
    order = {p.name: k for k, p in enumerate(expand(config))}
    return sorted(out, key=lambda p: order[p.name])


def apply_transform(transform: Optional[str], tensor: torch.Tensor, config) -> torch.Tensor:
    """An FMS tensor put on HF's scale by the path-map transform named ``transform`` (None: unchanged).

    The one implementation of every ``pathmap.TRANSFORMS`` entry; ``run_parity``, ``parity.attribution`` and
    ``parity.generation`` all call it, so they cannot disagree. ``logits_scaling``: ``tensor`` [..., vocab] times
    ``config.decoder.logits_scaling`` (FMS Granite divides its logits by it, transformers 5.x does not), computed in
    float64 and rounded once back to ``tensor.dtype``: exact for a power-of-two scale (8, 16 in the released models),
    at most half an ULP otherwise. Same shape and dtype as ``tensor``.

    Raises:
        ValueError: a transform name ``pathmap.TRANSFORMS`` does not know.
    """
    if transform is None:
        return tensor
    if transform == "logits_scaling":
        return (tensor.to(torch.float64) * float(config.decoder.logits_scaling)).to(tensor.dtype)
    raise ValueError(f"unknown transform {transform!r} in the path map; known: {', '.join(TRANSFORMS)}")


def _apply_transform(pair: LayerPair, tensor: torch.Tensor, config) -> torch.Tensor:
    """``apply_transform`` of ``pair.transform``."""
    return apply_transform(pair.transform, tensor, config)


def _hf_adapters_enabled(hf) -> Optional[bool]:
    """Whether the HF model's peft adapters are on (None when it has none)."""
    if not getattr(hf, "_hf_peft_config_loaded", False):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in hf.modules() if isinstance(m, BaseTunerLayer)), None)
    return None if layer is None else not layer.disable_adapters


def _set_hf_adapters(hf, enabled: bool) -> None:
    hf.enable_adapters() if enabled else hf.disable_adapters()


@contextlib.contextmanager
def set_adapters(pair, enabled: bool):
    """Both sides' LoRA adapters on (``enabled``) or off for the duration; yields a note describing the state.

    HF ``forward()`` never toggles peft adapters (only ``generate`` does), so the engine sets them explicitly: on for
    inputs with audio, off for text-only inputs, as ``generate`` would (FMS: ``GraniteSpeech.set_adapter``). The
    previous states are restored afterwards.
    """
    hf, fms = pair.hf, pair.fms
    hf_before = _hf_adapters_enabled(hf)
    fms_before = bool(fms.adapter_enabled) if getattr(fms, "has_adapter", False) else None
    if hf_before is not None:
        _set_hf_adapters(hf, enabled)
    if fms_before is not None:
        fms.set_adapter(enabled)
    state = "enabled" if enabled else "disabled"
    if hf_before is None and fms_before is None:
        note = "no LoRA adapter on either side"
    elif (hf_before is None) != (fms_before is None):
        side = "FMS" if hf_before is None else "HF"
        note = f"LoRA adapter only on the {side} side ({state}): the decoder is expected to diverge"
    else:
        why = "inputs carry audio" if enabled else "text-only inputs"
        note = f"LoRA adapter {state} on both sides ({why}), as HF generate() would set it"
    try:
        yield note
    finally:
        if hf_before is not None:
            _set_hf_adapters(hf, hf_before)
        if fms_before is not None:
            fms.set_adapter(fms_before)


def run_section(model_kind: str, model, inputs, upto: str, dtype: torch.dtype) -> None:
    """Run one model up to the end of section ``upto`` (outputs are taken by the hooks, not returned)."""
    feats = inputs.input_features
    if feats is not None and upto != "decoder":
        feats = feats.to(dtype)  # the full models cast features themselves; called section by section they do not
    if model_kind == "hf":
        if upto == "encoder":
            model.model.encoder(feats)
        elif upto == "projector":
            model.model.projector(model.model.encoder(feats).last_hidden_state)
        else:
            model(input_ids=inputs.input_ids, input_features=feats, input_features_mask=inputs.input_features_mask)
        return
    if upto == "encoder":
        model.encoder(feats)
    elif upto == "projector":
        model.projector(_first(model.encoder(feats)))
    else:
        model(inputs.input_ids, input_features=feats, input_features_mask=inputs.input_features_mask)


def _first(value: Any) -> torch.Tensor:
    t = first_tensor(value)
    if t is None:
        raise TypeError(f"expected a tensor output, got {type(value).__name__}")
    return t


def _capture(model, pairs: list[LayerPair], side: str, callback=None) -> list[Capture]:
    """Captures for ``pairs`` on one side: outputs in one, first inputs (``inputs=True``) in another.

    Without ``callback`` the tensors are stored (the reference side); with it they are streamed to
    ``callback(path, tensor)`` and nothing is kept (the side under test).
    """
    path = (lambda p: p.hf) if side == "hf" else (lambda p: p.fms)
    outs = [path(p) for p in pairs if p.tensor != INPUT]
    ins = [path(p) for p in pairs if p.tensor == INPUT]
    store = callback is None
    caps = []
    if outs:
        caps.append(Capture(model, outs, store=store, on_output=callback))
    if ins:
        caps.append(Capture(model, ins, store=store, inputs=True, on_input=callback))
    return caps


def worst_diff(diffs: list[TensorDiff]) -> TensorDiff:
    """The diff that judges a module called several times: the worst failing call, else the worst call overall.

    "Worst" is the largest ``rel_l2`` (NaN counts as infinite). ``diffs`` must not be empty.
    """
    pool = [d for d in diffs if not d.passed] or diffs
    return max(pool, key=lambda d: math.inf if math.isnan(d.rel_l2) else d.rel_l2)


def _check_mode(mode: str, compile_backend: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a parity mode; use one of {', '.join(MODES)}")
    if compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile_backend={compile_backend!r} is not supported; use one of "
                         f"{', '.join(COMPILE_BACKENDS)}")


@contextlib.contextmanager
def _compiled(model, side: str, sections: Sequence[str], backend: str):
    """The section modules of one side compiled (``compile_modules``) for the duration, eager again afterwards.

    Modules the caller had compiled already are left compiled (and are not restored to eager).
    """
    from fms_granite_speech.compile import compile_modules, is_compiled, uncompile

    modules = [model.get_submodule(_COMPILED_PIECES[side][s]) for s in sections]
    mine = [m for m in modules if not is_compiled(m)]
    compile_modules(mine, backend=backend)
    try:
        yield
    finally:
        uncompile(mine)


def _stored_run(model, side: str, run: list[LayerPair], inputs, upto: str, dtype: torch.dtype
                ) -> dict[str, list[torch.Tensor]]:
    """Run one side with storing captures on every pair of ``run``; the clones keyed by parity name."""
    caps = _capture(model, run, side)
    with _entered(caps):
        run_section(side, model, inputs, upto, dtype)
    by_path = {(p.hf if side == "hf" else p.fms): p.name for p in run}
    out: dict[str, list[torch.Tensor]] = {}
    for cap in caps:
        for path, tensors in (cap.inputs if cap.capture_inputs else cap.outputs).items():
            out[by_path[path]] = tensors
    return out


def _judge(run: list[LayerPair], diffs: dict, errors: dict, n_ref: dict, n_test: dict, labels: tuple[str, str]
           ) -> list[LayerResult]:
    """One ``LayerResult`` per pair: the worst diff of its calls, or why there is none.

    ``labels`` names the reference and tested runs in call-count mismatch messages (e.g. ``("HF", "FMS")``).
    """
    results = []
    for p in run:
        ref, test = n_ref.get(p.name, 0), n_test.get(p.name, 0)
        error = errors.get(p.name)
        if error is None and ref != test:
            error = (f"module ran {ref} time(s) in {labels[0]} ({p.hf}) but {test} time(s) in {labels[1]} "
                     f"({p.fms or '<model>'})")
        diff = worst_diff(diffs[p.name]) if diffs.get(p.name) else None
        if error is None and diff is None:
            error = "no tensor was produced on either side"
        results.append(LayerResult(pair=p, diff=diff, error=error, calls=max(ref, test)))
    return results


def _compare_stored(run: list[LayerPair], reference: dict, tested: dict, tol: Optional[Tolerance], config,
                    transform: bool, labels: tuple[str, str]) -> list[LayerResult]:
    """Compare two stored runs call by call (``transform``: apply each pair's FMS-side transform to ``tested``)."""
    diffs: dict[str, list[TensorDiff]] = {p.name: [] for p in run}
    errors: dict[str, str] = {}
    for p in run:
        for ref, test in zip(reference.get(p.name, []), tested.get(p.name, [])):
            if transform:
                test = _apply_transform(p, test, config)
            try:
                diffs[p.name].append(compare_tensors(test, ref, tol))
            except (ValueError, TypeError) as err:
                errors[p.name] = str(err)
                break
    n_ref = {k: len(v) for k, v in reference.items()}
    n_test = {k: len(v) for k, v in tested.items()}
    return _judge(run, diffs, errors, n_ref, n_test, labels)


def run_parity(pair, inputs, layers: Union[None, str, Sequence[str]] = None,
               tol: Optional[Tolerance] = None, mode: str = "eager",
               compile_backend: str = "inductor") -> ParityResult:
    """Compare ``pair.fms`` with ``pair.hf`` layer by layer on ``inputs``.

    Args:
        pair: a ``parity.pair.ModelPair`` (both models, same weights, same dtype and device, eval mode).
        inputs: a ``parity.pair.ParityInputs`` (``input_ids`` [B, L] int64, ``input_features`` [B, T, 160],
            ``input_features_mask`` [B, N] bool; features None for text-only inputs).
        layers: parity names to report on (each with its sub-modules); None means every layer of the model.
        tol: the bounds to apply to every layer; None uses ``metrics.default_tolerance`` of the dtypes compared.
        mode: ``eager`` (HF eager vs FMS eager), ``compiled`` (both compiled, FMS vs HF) or ``drift`` (each side
            compiled vs itself eager); see the module docstring.
        compile_backend: ``torch.compile`` backend of the compiled modes: ``inductor`` (default; on a 2-core CPU
            its C++ codegen takes minutes for the encoder, see ``parity diff --help``), ``aot_eager`` or ``eager``
            (tracing only, seconds). Ignored in eager mode.

    Returns:
        ``ParityResult`` over every pair of every section that ran, in execution order.

    Raises:
        pathmap.UnknownLayerError (ValueError): an unknown layer name (message lists the closest valid names).
        ValueError: an encoder/projector layer was requested but ``inputs`` has no audio; an unknown ``mode`` or
            ``compile_backend``.
        TypeError: ``tol`` is not a ``Tolerance``, or ``inputs`` is not a ``ParityInputs``.
    """
    start = time.perf_counter()
    _check_mode(mode, compile_backend)
    if tol is not None and not isinstance(tol, Tolerance):
        raise TypeError(f"tol must be a parity.metrics.Tolerance or None, got {type(tol).__name__}")
    for attr in ("input_ids", "input_features", "input_features_mask", "describe"):
        if not hasattr(inputs, attr):
            raise TypeError(f"inputs must be a parity.pair.ParityInputs (from build_inputs), got "
                            f"{type(inputs).__name__} without .{attr}")
    config = pair.config
    requested = requested_pairs(config, layers)
    has_audio = inputs.input_features is not None
    upto = max((p.section for p in requested), key=SECTIONS.index)
    if not has_audio and any(p.section != "decoder" for p in requested):
        names = sorted({p.name for p in requested if p.section != "decoder"})[:3]
        raise ValueError(f"layers {names} need audio but the inputs are text-only; build inputs with audio")
    sections = list(SECTIONS[: SECTIONS.index(upto) + 1]) if has_audio else ["decoder"]
    run = [p for p in expand(config) if p.section in sections]

    hf_drift: list[LayerResult] = []
    graphs = None
    adapters = set_adapters(pair, enabled=has_audio) if upto == "decoder" else contextlib.nullcontext(None)
    with adapters as adapter_note, torch.no_grad():
        if mode == "eager":
            results = _eager_parity(pair, inputs, run, upto, tol)
        else:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            before = counters["stats"]["unique_graphs"]

            def compiled_run(side: str, model) -> dict:
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
                        _compiled(model, side, sections, compile_backend):
                    return _stored_run(model, side, run, inputs, upto, pair.dtype)

            if mode == "compiled":
                hf_c = compiled_run("hf", pair.hf)
                fms_c = compiled_run("fms", pair.fms)
                results = _compare_stored(run, hf_c, fms_c, tol, config, True, ("HF compiled", "FMS compiled"))
                del hf_c, fms_c
            else:
                hf_e = _stored_run(pair.hf, "hf", run, inputs, upto, pair.dtype)
                hf_c = compiled_run("hf", pair.hf)
                hf_drift = _compare_stored(run, hf_e, hf_c, tol, config, False, ("HF eager", "HF compiled"))
                del hf_e, hf_c
                fms_e = _stored_run(pair.fms, "fms", run, inputs, upto, pair.dtype)
                fms_c = compiled_run("fms", pair.fms)
                results = _compare_stored(run, fms_e, fms_c, tol, config, False, ("FMS eager", "FMS compiled"))
                del fms_e, fms_c
            graphs = counters["stats"]["unique_graphs"] - before
    notes = [] if adapter_note is None else [adapter_note]
    if mode != "eager":
        what = {"compiled": "FMS compiled vs HF compiled",
                "drift": "each side compiled vs itself eager (hf_drift: HF; layers: FMS)"}[mode]
        notes.append(f"mode {mode}: {what}; sections {', '.join(sections)} compiled with backend "
                     f"{compile_backend!r} ({graphs} graph(s) compiled); captures stored and compared after the runs")

    first = next((r.name for r in results if not r.passed), None)
    for p in run:
        if p.transform is not None and mode != "drift":
            notes.append(f"{p.name}: {TRANSFORMS[p.transform]}")
    return ParityResult(
        layers=results,
        requested=[p.name for p in requested],
        first_divergent=first,
        sections=sections,
        tolerance=None if tol is None else tol.to_dict(),
        provenance=pair.provenance(),
        inputs=inputs.describe(),
        config=_config_dict(config),
        versions=versions(),
        notes=notes,
        excluded=[{"name": e.name, "hf": e.hf, "fms": e.fms, "reason": e.reason} for e in EXCLUDED
                  if _section(e.name) in sections],
        elapsed_s=round(time.perf_counter() - start, 3),
        mode=mode,
        compile_backend=None if mode == "eager" else compile_backend,
        hf_drift=hf_drift,
    )


def _eager_parity(pair, inputs, run: list[LayerPair], upto: str, tol: Optional[Tolerance]) -> list[LayerResult]:
    """Eager mode: HF stored, FMS streamed (each FMS output compared as it appears, only statistics kept)."""
    config = pair.config
    by_hf = {p.hf: p for p in run}
    by_fms = {p.fms: p for p in run}
    diffs: dict[str, list[TensorDiff]] = {p.name: [] for p in run}
    errors: dict[str, str] = {}
    fms_calls: dict[str, int] = {p.name: 0 for p in run}
    reference: dict[str, list[torch.Tensor]] = {}

    def on_tensor(path: str, tensor: torch.Tensor) -> None:
        p = by_fms[path]
        k = fms_calls[p.name]
        fms_calls[p.name] += 1
        refs = reference.get(p.name, [])
        if k >= len(refs) or p.name in errors:
            return
        test = _apply_transform(p, tensor, config)
        try:
            diffs[p.name].append(compare_tensors(test, refs[k], tol))
        except (ValueError, TypeError) as err:
            errors[p.name] = str(err)

    # 1. the reference, stored
    hf_caps = _capture(pair.hf, run, "hf")
    with _entered(hf_caps):
        run_section("hf", pair.hf, inputs, upto, pair.dtype)
    for cap in hf_caps:
        store = cap.inputs if cap.capture_inputs else cap.outputs
        for path, tensors in store.items():
            reference[by_hf[path].name] = tensors
    # 2. FMS, each output compared as it appears, nothing kept but the statistics
    with _entered(_capture(pair.fms, run, "fms", callback=on_tensor)):
        run_section("fms", pair.fms, inputs, upto, pair.dtype)
    n_ref = {k: len(v) for k, v in reference.items()}
    del reference
    return _judge(run, diffs, errors, n_ref, fms_calls, ("HF", "FMS"))


def _section(name: str) -> str:
    head = name.split(".", 1)[0]
    return head if head in SECTIONS else "decoder"


@contextlib.contextmanager
def _entered(managers: Iterable):
    """Every context manager of ``managers`` (the captures) entered in order, exited in reverse (``ExitStack``)."""
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def _config_dict(config) -> dict:
    """The config as JSON-safe data (anything json cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# -- re-checking saved results ------------------------------------------------------------------------------------


def _recheck_diff(d: TensorDiff, tol: Tolerance) -> TensorDiff:
    """``d`` judged against ``tol`` from its saved statistics (the rule of ``metrics.compare_tensors``).

    The rel-L2 / cosine branch is re-evaluated exactly. The element-wise branch
    (``|test - ref| <= atol + rtol * |ref|`` everywhere) is decided from the statistics when they settle it: same
    atol/rtol as saved (the saved mismatch count holds), ``max_abs <= atol`` (every element passes), a looser bound
    than saved with no saved mismatch, a tighter one with saved mismatches, or the worst element itself violating
    the new bound. Otherwise it cannot be decided without the tensors: the layer is marked failed with a reason
    starting ``undetermined`` (re-run to decide), never passed on a guess.
    """
    old = d.tolerance
    failures = []
    if d.test_nan or d.ref_nan:
        failures.append(f"NaN present (test {d.test_nan}, ref {d.ref_nan})")
    if (d.test_inf or d.ref_inf) and d.reason and "inf element" in d.reason:
        failures.append(next(s for s in d.reason.split("; ") if "inf element" in s))
    if d.max_abs <= tol.atol:
        allclose = True
    elif tol.atol == old.atol and tol.rtol == old.rtol:
        allclose = d.n_mismatched == 0
    elif d.worst_ref is not None and d.max_abs > tol.atol + tol.rtol * abs(d.worst_ref):
        allclose = False
    elif d.n_mismatched == 0 and tol.atol >= old.atol and tol.rtol >= old.rtol:
        allclose = True
    elif d.n_mismatched > 0 and tol.atol <= old.atol and tol.rtol <= old.rtol:
        allclose = False
    else:
        allclose = None
    l2_ok = d.rel_l2 <= tol.max_rel_l2 and d.cosine >= tol.min_cosine
    criterion = None
    if not failures:
        if allclose:
            criterion = "allclose"
        elif l2_ok:
            criterion = "rel_l2"
        else:
            if allclose is None:
                failures.append(f"undetermined: the element-wise bound atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| "
                                "cannot be decided from saved statistics; re-run the comparison")
            else:
                failures.append(f"elements exceed atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| "
                                f"(max_abs {d.max_abs:.3g} at {d.worst_index})")
            if d.rel_l2 > tol.max_rel_l2:
                failures.append(f"rel_l2 {d.rel_l2:.3g} > max_rel_l2 {tol.max_rel_l2:g}")
            if d.cosine < tol.min_cosine:
                failures.append(f"cosine {d.cosine:.9g} < min_cosine {tol.min_cosine:.9g}")
    notes = list(d.notes)
    if (tol.atol, tol.rtol) != (old.atol, old.rtol):
        notes.append(f"rechecked; n_mismatched was counted at atol {old.atol:g}, rtol {old.rtol:g}")
    passed = not failures
    return dataclasses.replace(d, passed=passed, criterion=criterion if passed else None,
                               reason=None if passed else "; ".join(failures), tolerance=tol, notes=notes)


def recheck(result: ParityResult, tol: Tolerance) -> ParityResult:
    """``result`` judged against new tolerances without re-running either model.

    Returns a new ``ParityResult`` (the input is not modified) with every diff (``hf_drift`` too) re-judged (see ``_recheck_diff`` for
    what saved statistics can and cannot decide), ``first_divergent`` recomputed and ``tolerance`` replaced.
    Layers that had no diff (an error) stay failed.

    Raises:
        TypeError: ``tol`` is not a ``metrics.Tolerance``.
    """
    if not isinstance(tol, Tolerance):
        raise TypeError(f"recheck needs a parity.metrics.Tolerance, got {type(tol).__name__}")
    def again(rows: list[LayerResult]) -> list[LayerResult]:
        return [dataclasses.replace(r, diff=None if r.diff is None else _recheck_diff(r.diff, tol)) for r in rows]

    layers = again(result.layers)
    first = next((r.name for r in layers if not r.passed), None)
    notes = list(result.notes) + [f"rechecked against {tol.to_dict()} without re-running the models"]
    return dataclasses.replace(result, layers=layers, hf_drift=again(result.hf_drift), first_divergent=first,
                               tolerance=tol.to_dict(), notes=notes)
