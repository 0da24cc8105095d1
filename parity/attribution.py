"""Error attribution per layer: which layer *introduces* an error, as opposed to passing on one it was handed.

``run_parity`` measures the PROPAGATED error of a layer: both models run end to end, so the FMS output of
``encoder.blocks.9`` carries whatever blocks 0..8 got wrong. One bad block makes every block after it fail, and the
first failing layer is only the first place the drift crossed a tolerance, not necessarily its source.

``attribute(pair, inputs)`` also measures the INTRODUCED error of every whole-block layer: while the HF reference
runs, each HF block's exact inputs are taken in a forward pre-hook, the FMS block is called on them (in FMS's own
calling convention, see ``ADAPTERS``) and its output is compared with the HF block's output. A correct FMS block then
shows only its own rounding, however wrong its input was upstream; ``first_introducing_layer`` names the first block
whose own computation breaks the budget.

``noise_floor(pair, inputs)`` measures what HF itself loses to rounding in the pair's dtype: HF in float64 vs HF in
that dtype, per layer, so that a bf16 tolerance can be judged against the reference's own error.

Attributed layers (``attributable(config)``): ``encoder.input_linear``, ``encoder.blocks.{i}``, ``encoder.out``,
``encoder.out_mid``, ``projector.layers.{j}``, ``projector``, ``decoder.layers.{i}``, ``decoder.norm``, ``logits``.
Sub-modules (``ff1``, ``attn``...) are left to ``run_parity``: a block is the unit attribution answers for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from parity.capture import Capture, first_tensor
from parity.compare import SECTIONS, apply_transform, run_parity, run_section, set_adapters, worst_diff
from parity.metrics import TensorDiff, Tolerance, compare_tensors, default_tolerance
from parity.pathmap import LayerPair, expand

__all__ = [
    "ADAPTERS",
    "AttributionResult",
    "LayerAttribution",
    "attributable",
    "attribute",
    "kind_of",
    "noise_floor",
]

SCHEMA_VERSION = 1

# parity name pattern -> adapter kind
_KINDS: tuple[tuple[str, str], ...] = (
    (r"encoder\.input_linear", "module"),
    (r"encoder\.blocks\.\d+", "conformer_block"),
    (r"encoder\.out", "module"),
    (r"encoder\.out_mid", "module"),
    (r"projector\.layers\.\d+", "qformer_layer"),
    (r"projector", "projector"),
    (r"decoder\.layers\.\d+", "decoder_layer"),
    (r"decoder\.norm", "module"),
    (r"logits", "logits"),
)


def kind_of(name: str) -> Optional[str]:
    """The adapter kind for parity name ``name`` (a key of ``ADAPTERS``), None when the layer is not attributed."""
    return next((kind for pattern, kind in _KINDS if re.fullmatch(pattern, name)), None)


def attributable(config, sections: Sequence[str] = SECTIONS) -> list[LayerPair]:
    """The pairs of ``expand(config)`` whose introduced error is measured, in execution order, within ``sections``."""
    return [p for p in expand(config) if p.section in sections and kind_of(p.name) is not None]


# -- adapters: call the FMS module on the HF module's inputs -----------------------------------------------------------
#
# Each adapter has two halves: ``take(bound)`` picks (and clones) the HF inputs it needs from the HF module's bound
# call arguments (a dict name -> value, from inspect.signature(...).bind); ``call(fms_model, fms_module, taken)`` runs
# the FMS module on them the way its FMS parent calls it, returning the tensor to compare with the HF output.


def _x(bound: dict) -> torch.Tensor:
    """The HF module's first tensor argument (what ``Capture(inputs=True)`` records)."""
    x = next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)
    if x is None:
        raise TypeError("the HF module was called without a tensor argument")
    return x


def _take_x(bound: dict) -> dict:
    return {"x": _x(bound).detach().clone()}


def _take_qformer(bound: dict) -> dict:
    memory = bound.get("encoder_hidden_states")
    if not isinstance(memory, torch.Tensor):
        raise TypeError("the HF Q-Former layer was called without encoder_hidden_states")
    return {"x": _x(bound).detach().clone(), "memory": memory.detach().clone()}


def _call_module(fms: nn.Module, module: nn.Module, t: dict) -> torch.Tensor:
    # Linear layers and norms: one tensor in, one out (ConformerEncoder / GraniteHeadless call them so).
    return module(t["x"])


def _call_conformer_block(fms: nn.Module, module: nn.Module, t: dict) -> torch.Tensor:
    # ConformerEncoder.forward: block(x, self.attention_dists) -- FMS's own relative-distance buffer
    return module(t["x"], fms.encoder.attention_dists)


def _call_qformer_layer(fms: nn.Module, module: nn.Module, t: dict) -> torch.Tensor:
    # QFormerProjector.forward: layer(x, memory), memory = the encoder frames cut into windows [B*nb, window, He],
    # the layout HF passes as encoder_hidden_states; queries [1 or B*nb, num_queries, H] as HF hands them on
    return module(t["x"], t["memory"].to(fms.projector.query.dtype))


def _call_projector(fms: nn.Module, module: nn.Module, t: dict) -> torch.Tensor:
    return module(t["x"])


def _call_decoder_layer(fms: nn.Module, module: nn.Module, t: dict) -> torch.Tensor:
    # GraniteHeadless.forward without a cache: layer(x=..., position_ids=None (0..L-1), past_key_value_state=None,
    # use_cache=False) and no attention kwargs (causal SDPA), as GraniteSpeech.forward runs it in run_parity
    return module(x=t["x"], position_ids=None, past_key_value_state=None, use_cache=False)


def _call_logits(fms: nn.Module, module: nn.Module, t: dict) -> torch.Tensor:
    # Granite.forward: head(dec_norm output) / logits_scaling; then the path map's "logits_scaling" transform, the
    # same function run_parity applies to the FMS logits
    preds = fms.decoder.head(t["x"]) / float(fms.config.decoder.logits_scaling)
    return apply_transform("logits_scaling", preds, fms.config)


@dataclass(frozen=True)
class _Adapter:
    take: Callable[[dict], dict]
    call: Callable[[nn.Module, nn.Module, dict], torch.Tensor]
    how: str


ADAPTERS: dict[str, _Adapter] = {
    "module": _Adapter(_take_x, _call_module, "fms(x), x = the HF module's input"),
    "conformer_block": _Adapter(_take_x, _call_conformer_block,
                                "fms_block(x, fms.encoder.attention_dists), x = the HF block's hidden_states"),
    "qformer_layer": _Adapter(_take_qformer, _call_qformer_layer,
                              "fms_layer(x, memory), x / memory = the HF layer's hidden_states / "
                              "encoder_hidden_states"),
    "projector": _Adapter(_take_x, _call_projector, "fms.projector(x), x = the HF encoder output"),
    "decoder_layer": _Adapter(_take_x, _call_decoder_layer,
                              "fms_layer(x=x, position_ids=None, past_key_value_state=None, use_cache=False), "
                              "x = the HF layer's hidden_states"),
    "logits": _Adapter(_take_x, _call_logits,
                       "fms.decoder.head(x) / logits_scaling, then the logits_scaling transform; x = lm_head's input"),
}


# -- result -----------------------------------------------------------------------------------------------------------


def _jf(x: Optional[float]) -> Any:
    """A float for strict JSON: nan/inf as strings."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _fj(x: Any) -> Optional[float]:
    return None if x is None else float(x)


_FLOATS = ("propagated_rel_l2", "introduced_rel_l2", "introduced_max_abs", "budget", "noise_floor_rel_l2")


@dataclass
class LayerAttribution:
    """Propagated vs introduced error of one whole-block layer.

    Attributes:
        name, hf, fms: parity name and the two module paths; ``kind``: the ``ADAPTERS`` entry used.
        propagated_rel_l2: rel-L2 of the FMS output vs HF's with both models run end to end (``run_parity``'s
            statistic, worst call); None when ``run_parity`` produced no diff for it.
        propagated_passed: ``run_parity``'s verdict on it.
        introduced_rel_l2, introduced_max_abs: the FMS module run on HF's exact inputs vs the HF output (worst call).
        introduced_passed: ``metrics.compare_tensors``' verdict on that comparison under the tolerance.
        budget: the rel-L2 bound applied (``Tolerance.max_rel_l2``); ``over_budget`` is True when the introduced
            comparison fails (rel-L2 above ``budget`` and not element-wise close, NaN, ...) or could not be made.
        noise_floor_rel_l2: HF in the pair's dtype vs HF in float64 at this layer (``noise_floor``); None if not run.
        reason: why the introduced comparison failed; error: why it could not be made.
        calls: how many times the HF module ran.
    """

    name: str
    hf: str
    fms: str
    kind: str
    propagated_rel_l2: Optional[float]
    propagated_passed: Optional[bool]
    introduced_rel_l2: Optional[float]
    introduced_max_abs: Optional[float]
    introduced_passed: bool
    budget: float
    over_budget: bool
    noise_floor_rel_l2: Optional[float] = None
    reason: Optional[str] = None
    error: Optional[str] = None
    calls: int = 1

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite floats as "nan"/"inf")."""
        out = dataclasses.asdict(self)
        for k in _FLOATS:
            out[k] = _jf(out[k])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LayerAttribution":
        """Inverse of ``to_dict``."""
        data = dict(data)
        for k in _FLOATS:
            data[k] = _fj(data.get(k))
        return cls(**data)


@dataclass
class AttributionResult:
    """Per-layer propagated and introduced errors of one pair on one input, JSON-serialisable.

    Attributes:
        layers: one ``LayerAttribution`` per attributed layer, in execution order.
        first_introducing_layer: first layer whose introduced error is over its budget (None: none is).
        first_divergent: ``run_parity``'s first failing layer over every compared pair (sub-modules included).
        sections: the model sections that ran; tolerance: the ``Tolerance`` applied, as a dict.
        dtype: the pair's dtype; noise_floor: whether ``noise_floor_rel_l2`` was measured.
        provenance, inputs: as in ``ParityResult``; notes: how each kind of FMS module was called, adapter state.
        elapsed_s: wall time in seconds.
    """

    layers: list[LayerAttribution]
    first_introducing_layer: Optional[str]
    first_divergent: Optional[str]
    sections: list[str]
    tolerance: dict
    dtype: str
    noise_floor: bool = False
    provenance: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def layer(self, name: str) -> LayerAttribution:
        """The entry of one layer (KeyError naming the attributed layers if absent)."""
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"layer {name!r} is not attributed in this result; attributed: "
                       f"{', '.join(r.name for r in self.layers[:8])}...")

    def to_dict(self) -> dict:
        """JSON-safe dict with ``schema_version``."""
        out = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [r.to_dict() for r in value] if f.name == "layers" else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "AttributionResult":
        """Inverse of ``to_dict``. Raises ValueError on data that is not an attribution result."""
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or "layers" not in data:
            raise ValueError(f"not an attribution result (schema_version {SCHEMA_VERSION} JSON from "
                             "AttributionResult.to_json)")
        kw = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        try:
            kw["layers"] = [LayerAttribution.from_dict(r) for r in data["layers"]]
            return cls(**kw)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not an attribution result: a field is missing or malformed ({err})") from None

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Strict JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "AttributionResult":
        """Inverse of ``to_json`` (ValueError on invalid text)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"not an attribution result: invalid JSON ({err})") from err


# -- running ----------------------------------------------------------------------------------------------------------


def _check_args(pair, inputs, tol) -> None:
    for attr in ("hf", "fms", "config", "dtype"):
        if not hasattr(pair, attr):
            raise TypeError(f"pair must be a parity.pair.ModelPair (from build_pair), got {type(pair).__name__} "
                            f"without .{attr}")
    for attr in ("input_ids", "input_features", "input_features_mask", "describe"):
        if not hasattr(inputs, attr):
            raise TypeError(f"inputs must be a parity.pair.ParityInputs (from build_inputs), got "
                            f"{type(inputs).__name__} without .{attr}")
    if tol is not None and not isinstance(tol, Tolerance):
        raise TypeError(f"tol must be a parity.metrics.Tolerance or None, got {type(tol).__name__}")


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name (positional ones named by ``module.forward``'s signature)."""
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):  # an unusual signature: positional ones by index
        return {**{f"arg{k}": a for k, a in enumerate(args)}, **kwargs}


def _adapter_context(pair, upto: str, has_audio: bool):
    """The LoRA state ``run_parity`` uses: adapters set explicitly only when the decoder runs."""
    return set_adapters(pair, enabled=has_audio) if upto == "decoder" else contextlib.nullcontext(None)


def _introduced(pair, inputs, pairs: list[LayerPair], upto: str, tol: Tolerance):
    """Run HF up to ``upto``; at each attributed HF module run its FMS twin on the same inputs and compare.

    Returns ``({name: [TensorDiff per call]}, {name: error}, {name: HF calls}, adapter note)``. Nothing is kept but
    the statistics: each block's inputs live only until that block returns.
    """
    by_hf = {p.hf: p for p in pairs}
    pending: dict[str, list[Optional[dict]]] = {p.name: [] for p in pairs}
    diffs: dict[str, list[TensorDiff]] = {p.name: [] for p in pairs}
    errors: dict[str, str] = {}
    calls: dict[str, int] = {p.name: 0 for p in pairs}
    handles = []

    def pre_hook(path):
        p = by_hf[path]
        adapter = ADAPTERS[kind_of(p.name)]

        def hook(module, args, kwargs):
            try:
                pending[p.name].append(adapter.take(_bind(module, args, kwargs)))
            except TypeError as err:
                errors.setdefault(p.name, f"HF inputs of {p.hf}: {err}")
                pending[p.name].append(None)
        return hook

    def post_hook(path):
        p = by_hf[path]
        adapter = ADAPTERS[kind_of(p.name)]
        fms_module = pair.fms.get_submodule(p.fms)

        def hook(module, args, output):
            calls[p.name] += 1
            taken = pending[p.name].pop()
            ref = first_tensor(output)
            if taken is None or p.name in errors:
                return
            if ref is None:
                errors[p.name] = f"HF module {p.hf} returned no tensor"
                return
            try:
                test = adapter.call(pair.fms, fms_module, taken)
                diffs[p.name].append(compare_tensors(first_tensor(test), ref.detach(), tol))
            except (RuntimeError, ValueError, TypeError) as err:
                errors[p.name] = f"FMS {p.fms or '<model>'} on HF inputs: {str(err).splitlines()[0]}"
        return hook

    with _adapter_context(pair, upto, inputs.input_features is not None) as note, torch.no_grad():
        try:
            for p in pairs:
                module = pair.hf.get_submodule(p.hf)
                handles.append(module.register_forward_pre_hook(pre_hook(p.hf), with_kwargs=True))
                handles.append(module.register_forward_hook(post_hook(p.hf)))
            run_section("hf", pair.hf, inputs, upto, pair.dtype)
        finally:
            for h in handles:
                h.remove()
    return diffs, errors, calls, note


def attribute(pair, inputs, tol: Optional[Tolerance] = None, layers: Union[None, str, Sequence[str]] = None,
              with_noise_floor: bool = False) -> AttributionResult:
    """Propagated and introduced error of every whole-block layer of ``pair`` on ``inputs``.

    Args:
        pair: a ``parity.pair.ModelPair``.
        inputs: a ``parity.pair.ParityInputs`` (``input_ids`` [B, L], ``input_features`` [B, T, 160] or None).
        tol: bounds for both comparisons; None uses ``metrics.default_tolerance(pair.dtype)``. The budget of a layer
            is ``tol.max_rel_l2``; a layer is over budget when ``compare_tensors`` fails its introduced error.
        layers: as ``run_parity``'s ``layers`` (decides which sections run); None runs the whole model.
        with_noise_floor: also run ``noise_floor`` (a float64 copy of the HF model: 2x the float32 weights' memory,
            4x bf16's) and fill ``noise_floor_rel_l2``.

    Returns:
        ``AttributionResult``; ``first_introducing_layer`` is the first layer in execution order over budget.

    Raises:
        TypeError: ``pair``/``inputs``/``tol`` of the wrong type.
        ValueError: as ``run_parity`` (unknown layer names, audio layers with text-only inputs).
    """
    start = time.perf_counter()
    _check_args(pair, inputs, tol)
    tol = default_tolerance(pair.dtype) if tol is None else tol
    propagated = run_parity(pair, inputs, layers, tol)
    sections = list(propagated.sections)
    pairs = attributable(pair.config, sections)
    upto = sections[-1]
    diffs, errors, calls, adapter_note = _introduced(pair, inputs, pairs, upto, tol)
    floor = noise_floor(pair, inputs, layers) if with_noise_floor else {}

    by_name = {r.name: r for r in propagated.layers}
    out = []
    for p in pairs:
        prop = by_name.get(p.name)
        prop_diff = None if prop is None else prop.diff
        error = errors.get(p.name)
        if error is None and not diffs[p.name]:
            error = f"HF module {p.hf} never ran"
        intro = worst_diff(diffs[p.name]) if diffs[p.name] and error is None else None
        passed = intro is not None and intro.passed
        out.append(LayerAttribution(
            name=p.name, hf=p.hf, fms=p.fms, kind=kind_of(p.name),
            propagated_rel_l2=None if prop_diff is None else prop_diff.rel_l2,
            propagated_passed=None if prop is None else prop.passed,
            introduced_rel_l2=None if intro is None else intro.rel_l2,
            introduced_max_abs=None if intro is None else intro.max_abs,
            introduced_passed=passed, budget=float(tol.max_rel_l2), over_budget=not passed,
            noise_floor_rel_l2=floor.get(p.name),
            reason=None if intro is None or intro.passed else intro.reason,
            error=error, calls=calls[p.name],
        ))
    notes = [f"{kind}: {ADAPTERS[kind].how}" for kind in dict.fromkeys(r.kind for r in out)]
    if adapter_note is not None:
        notes.append(adapter_note)
    return AttributionResult(
        layers=out,
        first_introducing_layer=next((r.name for r in out if r.over_budget), None),
        first_divergent=propagated.first_divergent,
        sections=sections,
        tolerance=tol.to_dict(),
        dtype=str(pair.dtype).removeprefix("torch."),
        noise_floor=with_noise_floor,
        provenance=propagated.provenance,
        inputs=propagated.inputs,
        notes=notes,
        elapsed_s=round(time.perf_counter() - start, 3),
    )


def noise_floor(pair, inputs, layers: Union[None, str, Sequence[str]] = None) -> dict[str, float]:
    """Per attributed layer, rel-L2 of HF run in ``pair.dtype`` against HF run in float64 (same weights).

    The float64 model is a copy of ``pair.hf`` cast up, so its weights are the pair's (already rounded to
    ``pair.dtype``): the number is what the reference loses to rounding its activations in ``pair.dtype``, the
    scale a tolerance for that dtype should be judged against. Features are cast to float64 for the float64 run.
    Memory: a float64 copy of the HF model. For a float64 pair every value is 0.

    Args:
        pair, inputs, layers: as ``attribute``.

    Returns:
        ``{parity name: rel_l2}`` for the attributed layers of the sections that run (worst call).

    Raises:
        TypeError / ValueError: as ``attribute``.
    """
    _check_args(pair, inputs, None)
    has_audio = inputs.input_features is not None
    if layers is None:
        upto = "decoder"
    else:
        from parity.compare import requested_pairs

        upto = max((p.section for p in requested_pairs(pair.config, layers)), key=SECTIONS.index)
    if not has_audio:
        if upto != "decoder":
            raise ValueError("the requested layers need audio but the inputs are text-only; build inputs with audio")
        sections = ["decoder"]
    else:
        sections = list(SECTIONS[: SECTIONS.index(upto) + 1])
    pairs = attributable(pair.config, sections)
    paths = [p.hf for p in pairs]
    name = {p.hf: p.name for p in pairs}
    worst: dict[str, float] = {}
    inputs64 = inputs if not has_audio else dataclasses.replace(
        inputs, input_features=inputs.input_features.to(torch.float64))

    with _adapter_context(pair, upto, has_audio), torch.no_grad():
        low = Capture(pair.hf, paths)
        with low:
            run_section("hf", pair.hf, inputs, upto, pair.dtype)
        hf64 = copy.deepcopy(pair.hf).to(torch.float64)
        seen: dict[str, int] = {}

        def on_output(path: str, t64: torch.Tensor) -> None:
            k = seen.get(path, 0)
            seen[path] = k + 1
            if k < len(low.outputs[path]):
                d = compare_tensors(low.outputs[path][k], t64, default_tolerance(pair.dtype))
                worst[name[path]] = max(worst.get(name[path], 0.0), d.rel_l2)

        try:
            with Capture(hf64, paths, store=False, on_output=on_output):
                run_section("hf", hf64, inputs64, upto, torch.float64)
        finally:
            del hf64
    return worst
