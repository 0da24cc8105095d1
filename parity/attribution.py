"""Error attribution per layer: which layer *introduces* an error, as opposed to passing on one it was handed.

A layer's PROPAGATED error (``LayerResult.diff``) is measured with both models run end to end, so the FMS output of
``encoder.blocks.9`` carries whatever blocks 0..8 got wrong: one bad block makes every block after it fail, and the
first failing layer is only the first place the drift crossed a bound. Its INTRODUCED error
(``LayerResult.introduced``) is measured by running the FMS module on the HF module's exact recorded inputs (in FMS's
own calling convention, ``parity.runner.REPLAYS``) and comparing with the HF module's output: a correct FMS module then
shows only its own rounding, however wrong its input was upstream. ``parity.compare.run_parity`` measures both for
every row of the path map with a replay (``kind``), so every verdict can say where an error starts.

This module is the per-layer view of that: ``attribute(pair, inputs)`` runs the engine and returns an
``AttributionResult`` (propagated vs introduced per row, the first introducing layer); ``noise_floor(pair, inputs)``
measures what HF itself loses to rounding in the pair's dtype against a float64 run of the same weights (HF end to
end, per row), the scale a tolerance for that dtype is judged against.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from parity._json import JsonResult, from_json_float, json_float
from parity.capture import Capture
from parity.metrics import Tolerance, compare_tensors, default_tolerance
from parity.pathmap import FLOAT64_UNITS, OUTPUT, SECTIONS, LayerPair, expand
from parity.runner import REPLAYS, float64_units, run_section

__all__ = ["ADAPTERS", "AttributionResult", "LayerAttribution", "attributable", "attribute", "kind_of",
           "noise_floor"]

SCHEMA_VERSION = 2
ADAPTERS = REPLAYS  # per replay kind: how the FMS module is called on HF's inputs (the names of version 1)


def kind_of(name: str, config=None) -> Optional[str]:
    """The replay kind of parity name ``name`` (a key of ``REPLAYS``), None when the row has no replay."""
    from fms_granite_speech.config import get_config

    pairs = {p.name: p for p in expand(config or get_config("tiny"))}
    p = pairs.get(name)
    return None if p is None else p.kind


def attributable(config, sections: Sequence[str] = SECTIONS) -> list[LayerPair]:
    """The pairs of ``expand(config)`` whose introduced error is measured, in execution order, within ``sections``."""
    return [p for p in expand(config) if p.section in sections and p.kind is not None]


_FLOATS = ("propagated_rel_l2", "introduced_rel_l2", "introduced_max_abs", "budget", "noise_floor_rel_l2")


@dataclass
class LayerAttribution:
    """Propagated vs introduced error of one row.

    Attributes:
        name, hf, fms: parity name and the two module paths; ``kind``: the replay used.
        propagated_rel_l2 / propagated_passed: the end-to-end comparison (``LayerResult.diff``), None if none.
        introduced_rel_l2, introduced_max_abs: the FMS module run on HF's exact inputs vs the HF output (worst call).
        introduced_passed: the introduced comparison's verdict under its bound.
        budget: that bound (``Tolerance.max_rel_l2``); ``over_budget``: the introduced comparison failed or could not
            be made.
        noise_floor_rel_l2: HF in the pair's dtype vs HF in float64 at this row (end to end), None if not measured.
        reason: why the introduced comparison failed; error: why it could not be made. calls: HF calls.
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
            out[k] = json_float(out[k])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LayerAttribution":
        """Inverse of ``to_dict``."""
        data = dict(data)
        for k in _FLOATS:
            data[k] = from_json_float(data.get(k))
        return cls(**data)


@dataclass
class AttributionResult(JsonResult):
    """Per-row propagated and introduced errors of one pair on one input, JSON-serialisable.

    Attributes:
        layers: one ``LayerAttribution`` per row with a replay, in execution order.
        first_introducing_layer: first row whose introduced error is over its bound (None: none is).
        first_divergent: the engine's first failing row over every compared row.
        sections, tolerance (the float32 / flat bound as a dict, None when per-row), dtype, noise_floor (whether
        ``noise_floor_rel_l2`` was measured), provenance, inputs, notes (how each kind of module was called),
        elapsed_s.
    """

    WHAT = "an attribution result"

    layers: list[LayerAttribution]
    first_introducing_layer: Optional[str]
    first_divergent: Optional[str]
    sections: list[str]
    tolerance: Optional[dict]
    dtype: str
    noise_floor: bool = False
    provenance: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def layer(self, name: str) -> LayerAttribution:
        """The entry of one row (KeyError naming the attributed rows if absent)."""
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
        if not isinstance(data, dict) or data.get("schema_version") not in (1, SCHEMA_VERSION) or "layers" not in data:
            raise ValueError(f"not an attribution result (schema_version {SCHEMA_VERSION} JSON from "
                             "AttributionResult.to_json)")
        kw = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        try:
            kw["layers"] = [LayerAttribution.from_dict(r) for r in data["layers"]]
            return cls(**kw)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not an attribution result: a field is missing or malformed ({err})") from None

def from_result(result, noise: Optional[dict] = None) -> AttributionResult:
    """The attribution view of a ``ParityResult`` (``noise``: a ``noise_floor`` dict to add)."""
    rows = []
    for r in result.layers:
        if r.pair.kind is None:
            continue
        intro = r.introduced
        rounding = (r.hf_rounding or {}).get("propagated")
        rows.append(LayerAttribution(
            name=r.name, hf=r.pair.hf, fms=r.pair.fms, kind=r.pair.kind,
            propagated_rel_l2=None if r.diff is None else r.diff.rel_l2,
            propagated_passed=r.propagated_passed,
            introduced_rel_l2=None if intro is None else intro.rel_l2,
            introduced_max_abs=None if intro is None else intro.max_abs,
            introduced_passed=r.introduced_passed and intro is not None,
            budget=float("nan") if intro is None else intro.tolerance.max_rel_l2,
            over_budget=not (r.introduced_passed and intro is not None),
            noise_floor_rel_l2=(noise or {}).get(r.name, rounding),
            reason=None if intro is None or intro.passed else intro.reason,
            error=r.introduced_error or (None if intro is not None else "the HF module never ran"),
            calls=r.calls,
        ))
    kinds = dict.fromkeys(r.kind for r in rows)
    return AttributionResult(
        layers=rows,
        first_introducing_layer=next((r.name for r in rows if r.over_budget), None),
        first_divergent=result.first_divergent,
        sections=list(result.sections),
        tolerance=result.tolerance if result.tolerance is not None else _uniform(rows),
        dtype=str(result.provenance.get("dtype")),
        noise_floor=noise is not None or any(r.noise_floor_rel_l2 is not None for r in rows),
        provenance=result.provenance,
        inputs=result.inputs,
        notes=[f"{kind}: {REPLAYS[kind].how}" for kind in kinds],
        elapsed_s=result.elapsed_s,
    )


def _uniform(rows: list[LayerAttribution]) -> Optional[dict]:
    """The budget as a tolerance dict when every row had the same one (float32's per-dtype bound), else None."""
    budgets = {r.budget for r in rows}
    return {"max_rel_l2": budgets.pop()} if len(budgets) == 1 else None


def attribute(pair, inputs, tol: Optional[Tolerance] = None, layers: Union[None, str, Sequence[str]] = None,
              with_noise_floor: bool = False) -> AttributionResult:
    """Propagated and introduced error of every row with a replay, for ``pair`` on ``inputs``.

    Args:
        pair: a ``parity.pair.ModelPair``; inputs: a ``parity.inputs.ParityInputs``.
        tol: bounds for both comparisons; None: the engine's (see ``parity.compare``).
        layers: as ``run_parity``'s ``layers`` (decides which sections run); None runs the whole model.
        with_noise_floor: also run ``noise_floor`` (HF in float64, one block at a time) and fill
            ``noise_floor_rel_l2``.

    Raises:
        TypeError / ValueError: as ``run_parity``.
    """
    from parity.compare import run_parity

    start = time.perf_counter()
    result = run_parity(pair, inputs, layers, tol)
    noise = noise_floor(pair, inputs, layers) if with_noise_floor else None
    out = from_result(result, noise)
    out.elapsed_s = round(time.perf_counter() - start, 3)
    return out


def noise_floor(pair, inputs, layers: Union[None, str, Sequence[str]] = None) -> dict[str, float]:
    """Per row with a replay, rel-L2 of HF run in ``pair.dtype`` against HF run in float64 (same weights, end to end).

    The float64 run converts HF one block at a time (``runner.float64_units``), so it needs one block's float64 memory,
    and runs HF's modules in the order of its forward (``run_section(..., compose=True)``). For a float64 pair every
    value is 0.

    Returns:
        ``{parity name: rel_l2}`` for the rows with a replay of the sections that run (worst call).
    """
    from parity.compare import _rows, requested_pairs, set_adapters

    inputs = inputs.to(pair.device)
    run, sections = _rows(pair.config, requested_pairs(pair.config, layers), inputs)
    upto = max((p.section for p in run), key=SECTIONS.index)
    pairs = [p for p in run if p.kind is not None and p.tensor == OUTPUT]
    paths = [p.hf for p in pairs]
    name = {p.hf: p.name for p in pairs}
    worst: dict[str, float] = {}
    hf = pair.get("hf")
    adapters = set_adapters(pair, inputs.has_audio) if upto == "decoder" else _null()
    with adapters, torch.no_grad():
        low = Capture(hf, paths)
        with low:
            run_section("hf", hf, inputs, upto, pair.dtype)
        seen: dict[str, int] = {}

        def on_output(path: str, t64: torch.Tensor) -> None:
            k = seen.get(path, 0)
            seen[path] = k + 1
            if k < len(low.outputs[path]):
                d = compare_tensors(low.outputs[path][k], t64, default_tolerance(pair.dtype))
                worst[name[path]] = max(worst.get(name[path], 0.0), d.rel_l2)

        with float64_units(hf, FLOAT64_UNITS), Capture(hf, paths, store=False, on_output=on_output):
            run_section("hf", hf, inputs, upto, torch.float64, compose=True)
    return worst


def _null():
    import contextlib

    return contextlib.nullcontext(None)
