"""The result schema of a parity run: ``LayerResult`` per compared row, ``ParityResult`` per run.

Plain data, JSON-serialisable (strict JSON: non-finite floats as strings, ``parity._json``), the single source every
report format (terminal, Markdown, PNG, recheck, check) is made from. Schema version 2 adds to version 1 the
introduced error of each row, HF's own rounding against float64 (reduced precision), the reference used for the
bounds, the run's peak memory and the command that reproduces it; version-1 files still load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from parity._json import JsonResult
from parity.metrics import TensorDiff
from parity.pathmap import LayerPair

__all__ = ["LayerResult", "ParityResult", "SCHEMA_VERSION", "not_a_result"]

SCHEMA_VERSION = 2
_READABLE = (1, 2)


def not_a_result(why: str) -> ValueError:
    """The one error every loader raises for a file that is not a parity result: ``not a parity result (why)``."""
    return ValueError(f"not a parity result ({why}); give a parity-report.json written by `parity diff`")


def _ratio(diff: Optional[TensorDiff]) -> Optional[float]:
    if diff is None:
        return None
    bound = diff.tolerance.max_rel_l2
    if diff.passed and diff.criterion == "allclose":
        return 0.0 if bound == 0 else min(diff.rel_l2 / bound, 1.0) if math.isfinite(diff.rel_l2) else 1.0
    if bound == 0:
        return 0.0 if diff.rel_l2 == 0 else math.inf
    return diff.rel_l2 / bound if not math.isnan(diff.rel_l2) else math.inf


@dataclass
class LayerResult:
    """The comparison of one ``LayerPair``.

    Attributes:
        pair: what was compared (names, module paths, tensor, transform, replay kind, rounding factor).
        diff: the PROPAGATED comparison: FMS's output with both models run end to end (worst call by rel-L2), or
            None when none was possible (see ``error``).
        error: why there is no propagated diff (a module that never ran on one side, a different number of calls,
            different shapes, the FMS model raising), None otherwise.
        calls: how many times the module ran (the most of either side).
        introduced: the INTRODUCED comparison: the FMS module run on the HF module's exact recorded inputs against the
            HF module's output (worst call), None for rows without a replay (the input pipelines) or in compiled modes.
        introduced_error: why the introduced comparison could not be made, None otherwise.
        hf_rounding: in reduced precision with a float64 reference, HF's own rel-L2 against float64 at this row:
            ``{"introduced": HF's module alone on the same input, "propagated": HF end to end}``; else None.
    """

    pair: LayerPair
    diff: Optional[TensorDiff] = None
    error: Optional[str] = None
    calls: int = 1
    introduced: Optional[TensorDiff] = None
    introduced_error: Optional[str] = None
    hf_rounding: Optional[dict] = None
    explanation: Optional[dict] = None

    @property
    def name(self) -> str:
        """The parity name of the layer."""
        return self.pair.name

    @property
    def propagated_passed(self) -> bool:
        return self.error is None and self.diff is not None and self.diff.passed

    @property
    def introduced_passed(self) -> bool:
        return self.introduced_error is None and (self.introduced is None or self.introduced.passed)

    @property
    def passed(self) -> bool:
        """True when the propagated comparison passed, and the introduced one (when made) too."""
        return self.propagated_passed and self.introduced_passed

    @property
    def reason(self) -> Optional[str]:
        """Why this layer fails, naming which comparison (None when it passes)."""
        if self.error is not None:
            return self.error
        parts = []
        if self.diff is not None and not self.diff.passed:
            parts.append(f"propagated: {self.diff.reason}")
        if self.introduced_error is not None:
            parts.append(f"introduced: {self.introduced_error}")
        elif self.introduced is not None and not self.introduced.passed:
            parts.append(f"introduced (FMS module on HF's exact input): {self.introduced.reason}")
        return "; ".join(parts) or None

    @property
    def introduces(self) -> bool:
        """True when the error starts here: the introduced comparison fails (the layer's own computation)."""
        return not self.introduced_passed

    @property
    def ratio(self) -> Optional[float]:
        """observed / bound, the larger of the propagated and introduced comparisons (inf: a non-zero error against
        an exact bound, or an error; None when nothing was compared)."""
        if self.error is not None or self.introduced_error is not None:
            return math.inf
        ratios = [r for r in (_ratio(self.diff), _ratio(self.introduced)) if r is not None]
        return max(ratios) if ratios else None

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return {"pair": self.pair.to_dict(), "diff": None if self.diff is None else self.diff.to_dict(),
                "error": self.error, "calls": self.calls,
                "introduced": None if self.introduced is None else self.introduced.to_dict(),
                "introduced_error": self.introduced_error, "hf_rounding": self.hf_rounding,
                "explanation": self.explanation}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerResult":
        """Inverse of ``to_dict``.

        Raises:
            ValueError: ``not a parity result`` naming the missing or malformed field.
        """
        if not isinstance(data, dict) or not isinstance(data.get("pair"), dict) or "name" not in data["pair"]:
            raise not_a_result("a layer entry has no 'pair' with a 'name'")
        if "diff" not in data:
            raise not_a_result(f"layer {data['pair']['name']!r} has no 'diff' field")
        try:
            diff, intro = data["diff"], data.get("introduced")
            return cls(pair=LayerPair.from_dict(data["pair"]),
                       diff=None if diff is None else TensorDiff.from_dict(diff),
                       error=data.get("error"), calls=int(data.get("calls", 1)),
                       introduced=None if intro is None else TensorDiff.from_dict(intro),
                       introduced_error=data.get("introduced_error"), hf_rounding=data.get("hf_rounding"),
                       explanation=data.get("explanation"))
        except (KeyError, TypeError, ValueError) as err:
            raise not_a_result(f"layer {data['pair']['name']!r} is malformed: {err}") from None


@dataclass
class ParityResult(JsonResult):
    """Everything one parity run found, JSON-serialisable (``to_json`` / ``from_json``).

    Attributes:
        layers: one ``LayerResult`` per compared pair, in execution order (every pair of every section that ran).
        requested: names of the layers the caller asked about (each requested name and its sub-modules).
        first_divergent: the first layer in execution order, over everything that ran, that fails (its introduced
            error, or its propagated error); None when none does.
        sections: the sections that ran (``features``, ``encoder``, ``projector``, ``decoder``).
        tolerance: the ``Tolerance`` applied to every layer as a dict, or None for the engine's bounds (per dtype in
            float32; from the float64 reference in reduced precision, see ``reference``).
        provenance: where the two models came from (variant, checkpoint, seed, dtype, device, LoRA state).
        inputs: what was fed (case, audio sources, lengths, prompt, tensor shapes, pipelines).
        config: the ``GraniteSpeechConfig`` as a dict. versions: torch / transformers / ibm-fms / python versions.
        notes: statements the report must show (transforms applied, adapter state, how bounds were set).
        excluded: module pairs that cannot be compared element-wise, with the reason.
        elapsed_s: wall time of the whole run in seconds (models built, both runs, replays).
        mode: ``eager``, ``compiled`` or ``drift``. In ``drift`` mode ``layers`` holds the FMS drift (FMS compiled vs
            FMS eager) and ``hf_drift`` the HF drift, same pairs, same order.
        compile_backend: the ``torch.compile`` backend of the compiled modes, None in eager mode.
        compile_scope: compiled modes: ``"regional"`` (each repeated block compiled once per kind) or ``"whole"`` (the
            FMS model as ``compile_model(model, whole=True)`` returns it); None in eager mode.
        hf_drift: HF compiled vs HF eager per layer (drift mode only, else empty).
        attribution: kept for version-1 files (``--attribute`` results); None otherwise.
        reference: how reduced-precision bounds were set: ``"float64"`` (HF's own rounding against a float64 run of
            the same weights and inputs), ``"flat"`` (the per-dtype tolerance), or None in float32/float64.
        memory: ``"together"`` (both models held at once) or ``"sequential"`` (one model at a time).
        peak_memory: the run's peak memory: ``{"host_rss_gib": ..., "cuda_gib": ...}`` (process peak RSS; CUDA
            ``max_memory_allocated`` since the run started).
        command: the ``parity diff`` command line that repeats this run.
        phase_s: eager mode: seconds per phase of the run (pipelines, reference, float64 bounds, building the model
            under test, model under test, replay, assemble, explain).
    """

    @classmethod
    def _not_json(cls, err: Exception) -> ValueError:
        return not_a_result(f"invalid JSON: {err}")

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
    compile_scope: Optional[str] = None
    hf_drift: list[LayerResult] = field(default_factory=list)
    attribution: Optional[dict] = None
    reference: Optional[str] = None
    memory: Optional[str] = None
    peak_memory: dict = field(default_factory=dict)
    command: Optional[str] = None
    phase_s: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every requested layer passes (in drift mode: on both sides)."""
        wanted = set(self.requested)
        return (bool(self.requested_results()) and all(r.passed for r in self.requested_results())
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
            ValueError: ``not a parity result (...)`` naming what is wrong: not a dict, an unknown schema version,
                ``layers`` missing or not a list, a layer without ``diff``, a malformed field.
        """
        if not isinstance(data, dict):
            raise not_a_result(f"a JSON {type(data).__name__}, not an object")
        if data.get("schema_version") not in _READABLE:
            raise not_a_result(f"schema_version {data.get('schema_version')!r}; this parity reads "
                               f"{', '.join(map(str, _READABLE))}")
        if not isinstance(data.get("layers"), list):
            raise not_a_result(f"'layers' is {type(data.get('layers')).__name__}, not a list")
        missing = [k for k in ("requested", "first_divergent", "sections", "provenance", "inputs") if k not in data]
        if missing:
            raise not_a_result(f"fields {missing} are missing")
        for name in ("provenance", "inputs", "config", "versions", "peak_memory"):
            if name in data and data[name] is not None and not isinstance(data[name], dict):
                raise not_a_result(f"'{name}' is a JSON {type(data[name]).__name__}, not an object")
        for name in ("requested", "sections", "notes", "excluded"):
            if name in data and not isinstance(data[name], list):
                raise not_a_result(f"'{name}' is a JSON {type(data[name]).__name__}, not a list")
        kw = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        kw["layers"] = [LayerResult.from_dict(r) for r in data["layers"]]
        kw["hf_drift"] = [LayerResult.from_dict(r) for r in data.get("hf_drift") or []]
        for name, default in (("tolerance", None), ("config", {}), ("versions", {})):
            kw.setdefault(name, default)
        try:
            return cls(**kw)
        except TypeError as err:
            raise not_a_result(f"a field is malformed ({err})") from None
