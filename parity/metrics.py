"""Per-tensor error statistics and dtype-aware tolerances: the comparator at the bottom of the parity engine.

``compare_tensors(test, ref)`` reduces one pair of activations (``test`` from the FMS model, ``ref`` from the HF
reference) to a :class:`TensorDiff`: a handful of numbers, a pass/fail verdict and the reason for it. A
``TensorDiff`` is plain data (``to_dict`` / ``from_dict``), so a report can be regenerated from saved results
without re-running either model.

Everything is model-agnostic: the functions see two tensors of the same shape and nothing else.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch

from parity._json import from_json_float, json_float

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "REDUCED_PRECISION", "ROUNDING_FLOOR", "TensorDiff", "Tolerance",
           "compare_tensors", "default_tolerance", "recheck_diff", "rounding_tolerance"]

# Elements per chunk of the streaming reduction: 4 Mi elements -> 32 MiB per float64 temporary.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Signed integer type of the same width, used to read a float's bit pattern.
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Tolerance:
    """Pass/fail bounds for one tensor comparison (see :func:`compare_tensors` for the rule that uses them).

    Attributes:
        atol: absolute bound of the elementwise test ``|test - ref| <= atol + rtol * |ref|``.
        rtol: relative bound of that elementwise test (relative to the reference element).
        max_rel_l2: bound on ``||test - ref||_2 / ||ref||_2`` over the whole tensor.
        min_cosine: lower bound on the cosine similarity of the flattened tensors, checked together with
            ``max_rel_l2``. ``rel_l2 <= r`` already implies ``cosine >= sqrt(1 - r**2) >= 1 - r``, so the
            defaults (``1 - max_rel_l2``) never fail on cosine alone; it only binds in a custom tolerance.

    Raises:
        ValueError: a bound is negative or not finite, or ``min_cosine`` is outside [-1, 1].
    """

    atol: float
    rtol: float
    max_rel_l2: float
    min_cosine: float

    def __post_init__(self):
        for name in ("atol", "rtol", "max_rel_l2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Tolerance.{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.min_cosine, (int, float)) or not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"Tolerance.min_cosine must be a number in [-1, 1], got {self.min_cosine!r}")

    def to_dict(self) -> dict[str, float]:
        """The four bounds as a JSON-safe dict."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tolerance":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: float(data[k]) for k in ("atol", "rtol", "max_rel_l2", "min_cosine")})


def _tol(atol: float, rtol: float, max_rel_l2: float) -> Tolerance:
    return Tolerance(atol=atol, rtol=rtol, max_rel_l2=max_rel_l2, min_cosine=1.0 - max_rel_l2)


# atol / rtol: torch.testing.assert_close's documented per-dtype defaults (torch 2.11:
# float16 rtol 1e-3 atol 1e-5; bfloat16 rtol 1.6e-2 atol 1e-5; float32 rtol 1.3e-6 atol 1e-5;
# float64 rtol 1e-7 atol 1e-7). max_rel_l2: see default_tolerance.
_DEFAULT_TOLERANCES = {
    torch.float64: _tol(atol=1e-7, rtol=1e-7, max_rel_l2=1e-12),
    torch.float32: _tol(atol=1e-5, rtol=1.3e-6, max_rel_l2=1e-5),
    torch.float16: _tol(atol=1e-5, rtol=1e-3, max_rel_l2=2e-3),
    torch.bfloat16: _tol(atol=1e-5, rtol=1.6e-2, max_rel_l2=1.6e-2),
}
_EXACT = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=0.0, min_cosine=1.0)


def default_tolerance(dtype: torch.dtype) -> Tolerance:
    """Default :class:`Tolerance` for tensors of ``dtype``.

    ``atol`` and ``rtol`` are ``torch.testing.assert_close``'s documented defaults for that dtype. ``max_rel_l2``
    is chosen from the dtype's machine epsilon ``eps = torch.finfo(dtype).eps``:

    * bfloat16 (eps 2**-7 = 7.8e-3): 1.6e-2, about 2 eps. Rounding each side's stored output to the dtype
      (relative error <= eps/2 per element, independent on the two sides) alone gives a rel-L2 of roughly
      0.4 eps; 2 eps leaves about 5x room for a different accumulation order inside the op, while a real bug
      (wrong scale, mask, or weight layout) gives rel-L2 of order 1e-1 or more.
    * float16 (eps 2**-10 = 9.8e-4): 2e-3, about 2 eps, same reasoning.
    * float32 (eps 2**-23 = 1.2e-7): 1e-5, about 84 eps. Storage rounding is negligible here; what differs
      between two correct implementations is summation order in reductions of length K, whose relative error
      grows like sqrt(K) * eps, about 64-128 eps for the hidden sizes of this model (K = 4096 .. 16384).
    * float64: 1e-12. Far below any float32 effect, so a float64 run isolates algorithmic differences, with room
      for error amplification through deep stacks (norms, softmax).

    ``min_cosine`` is ``1 - max_rel_l2`` (implied by the rel-L2 bound; see :class:`Tolerance`).
    Integer and bool dtypes get an exact tolerance (all bounds 0, ``min_cosine`` 1).

    Raises:
        TypeError: ``dtype`` is not a ``torch.dtype``, or is a floating/complex dtype other than
            float16, bfloat16, float32, float64.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"default_tolerance expects a torch.dtype, got {type(dtype).__name__}")
    if dtype in _DEFAULT_TOLERANCES:
        return _DEFAULT_TOLERANCES[dtype]
    if dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"no default tolerance for {dtype}: supported floating dtypes are "
                        f"{', '.join(str(d) for d in _FLOAT_DTYPES)}; cast the tensors or pass a Tolerance")
    return _EXACT


def _looser(a: Tolerance, b: Tolerance) -> Tolerance:
    return Tolerance(atol=max(a.atol, b.atol), rtol=max(a.rtol, b.rtol),
                     max_rel_l2=max(a.max_rel_l2, b.max_rel_l2), min_cosine=min(a.min_cosine, b.min_cosine))


# Reduced precision: a layer's bound comes from the rounding error HF's own layer makes against float64 (see
# rounding_tolerance); the floor keeps that bound above zero where HF's layer is exact (copies, gathers).
REDUCED_PRECISION = (torch.bfloat16, torch.float16)
ROUNDING_FLOOR = {torch.bfloat16: 2e-4, torch.float16: 2.5e-5}  # rel-L2; 1/20 of the unit roundoff 2**-8, 2**-11


def rounding_tolerance(hf_rounding: float, factor: float, dtype: torch.dtype) -> Tolerance:
    """The bound of one layer in reduced precision, from what HF's own layer loses to rounding.

    ``max_rel_l2 = factor * hf_rounding + ROUNDING_FLOOR[dtype]`` where ``hf_rounding`` is the rel-L2 of HF's layer
    in ``dtype`` against the same layer in float64 on the same input (or, for an end-to-end comparison, HF's own
    drift from its float64 run). The element-wise branch is off (``atol = rtol = 0``: only an exact match passes
    it), because ``torch.testing``'s bf16 ``rtol`` of 1.6e-2 would pass a kernel change far larger than a layer's
    rounding. ``factor`` is per path-map row (``pathmap.ROUNDING``, with the figures it was calibrated on).

    Raises:
        ValueError: ``dtype`` is not bfloat16 / float16, or ``hf_rounding`` / ``factor`` is negative or not finite.
    """
    if dtype not in ROUNDING_FLOOR:
        raise ValueError(f"rounding_tolerance applies to {', '.join(map(str, REDUCED_PRECISION))}, not {dtype}")
    for name, value in (("hf_rounding", hf_rounding), ("factor", factor)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    bound = factor * hf_rounding + ROUNDING_FLOOR[dtype]
    return Tolerance(atol=0.0, rtol=0.0, max_rel_l2=bound, min_cosine=max(-1.0, 1.0 - bound))


@dataclass
class TensorDiff:
    """Statistics of one comparison ``test`` (FMS) vs ``ref`` (HF reference); produced by :func:`compare_tensors`.

    Statistics cover the element pairs where both sides are finite (other pairs are counted in the
    ``*_nan`` / ``*_inf`` fields). All floats are computed in float64.

    Attributes:
        shape: common shape of the two tensors.
        dtype: reference dtype (``str(torch.dtype)``); ``test_dtype`` is the test tensor's.
        max_abs, mean_abs: max and mean of ``|test - ref|``.
        rel_l2: ``||test - ref||_2 / ||ref||_2``; 0 when both norms are 0, inf when only ``ref``'s is 0.
        cosine: cosine similarity of the flattened tensors; 1 when both are all-zero, 0 when exactly one is.
        max_ulp: largest distance in units in the last place, counted in the reference dtype: the number of
            steps between adjacent representable values of that dtype separating the two elements (so x vs
            nextafter(x) is 1, -0.0 vs +0.0 is 0). For integer dtypes it is ``|test - ref|``. Saturates at
            2**63 - 1 (only reachable by float64 values of opposite sign and huge magnitude).
        worst_index: index (tuple, one entry per dim) of the element with the largest ``|test - ref|``;
            None when no finite pair exists.
        worst_test, worst_ref: the two values at ``worst_index``.
        n_mismatched: number of elements violating ``|test - ref| <= atol + rtol * |ref|`` (the tolerance's bounds).
        mismatched: number of elements ``torch.testing.assert_close`` would report as mismatched with its default
            ``atol`` / ``rtol`` for the reference dtype (what the report shows as "mismatched elements").
        numel: number of elements.
        test_nan, test_inf, ref_nan, ref_inf: non-finite element counts on each side.
        passed: verdict of the rule in :func:`compare_tensors`.
        criterion: which criterion passed (``"allclose"``, ``"rel_l2"``), None when failed.
        reason: why it failed (names every failed criterion with its numbers), None when passed.
        tolerance: the :class:`Tolerance` applied.
        notes: remarks on how the comparison was made (dtype or device differences).
    """

    shape: tuple[int, ...]
    dtype: str
    test_dtype: str
    numel: int
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    max_ulp: int
    worst_index: Optional[tuple[int, ...]]
    worst_test: Optional[float]
    worst_ref: Optional[float]
    n_mismatched: int
    mismatched: int
    test_nan: int
    test_inf: int
    ref_nan: int
    ref_inf: int
    passed: bool
    criterion: Optional[str]
    reason: Optional[str]
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    @property
    def nonfinite(self) -> int:
        """Total number of NaN/inf elements on both sides."""
        return self.test_nan + self.test_inf + self.ref_nan + self.ref_inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``json.dumps(d, allow_nan=False)`` works): non-finite floats become the strings
        ``"nan"``, ``"inf"``, ``"-inf"``; tuples become lists; the tolerance a nested dict."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "tolerance":
                value = value.to_dict()
            elif isinstance(value, float):
                value = json_float(value)
            elif isinstance(value, (tuple, list)):
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorDiff":
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError: a field is missing from ``data``.
        """
        kw = dict(data)
        kw.setdefault("mismatched", kw.get("n_mismatched", 0))
        kw["shape"] = tuple(kw["shape"])
        kw["worst_index"] = None if kw["worst_index"] is None else tuple(kw["worst_index"])
        for name in ("max_abs", "mean_abs", "rel_l2", "cosine", "worst_test", "worst_ref"):
            kw[name] = from_json_float(kw[name])
        kw["tolerance"] = Tolerance.from_dict(kw["tolerance"])
        kw["notes"] = list(kw.get("notes", []))
        return cls(**kw)


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map each element to an int64 key, monotone in its value, that steps by 1 between adjacent representable
    values of ``x.dtype``. Floats are sign-magnitude in memory: a non-negative bit pattern (read as a signed
    integer) is already ordered; a negative one is mapped to minus its magnitude bits, so -0.0 and +0.0 share
    key 0. Integer dtypes are their own keys."""
    if x.dtype in _BITS_VIEW:
        bits = x.view(_BITS_VIEW[x.dtype]).to(torch.int64)
        nbits = torch.iinfo(_BITS_VIEW[x.dtype]).bits
        magnitude = bits & ((1 << (nbits - 1)) - 1)
        return torch.where(bits < 0, -magnitude, bits)
    return x.to(torch.int64)


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise ``|key(a) - key(b)|`` in int64, saturating at 2**63 - 1 instead of wrapping."""
    if a.dtype in _BITS_VIEW and torch.iinfo(_BITS_VIEW[a.dtype]).bits <= 32:
        # keys of 32 bits or fewer: |ka - kb| (= |ka| + |kb| across zero) fits an int64; both keyed in one pass
        ka, kb = _ordered_bits(torch.stack((a, b)))
        return (ka - kb).abs_()
    ka, kb = _ordered_bits(a), _ordered_bits(b)
    same_sign = (ka >= 0) == (kb >= 0)
    # Same sign: the difference cannot overflow. Opposite signs: distance = |ka| + |kb|, which can (float64).
    abs_a, abs_b = ka.abs(), kb.abs()
    overflow = abs_a > (_INT64_MAX - abs_b)
    cross = torch.where(overflow, torch.full_like(abs_a, _INT64_MAX), abs_a + abs_b)
    return torch.where(same_sign, (ka - kb).abs(), cross)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, rem = divmod(flat, size)
        index.append(rem)
    return tuple(reversed(index))


def _check_inputs(test: Any, ref: Any) -> None:
    for name, t in (("test", test), ("ref", ref)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"compare_tensors: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_complex:
            raise TypeError(f"compare_tensors: {name} is complex ({t.dtype}); compare real and imaginary parts "
                            "separately (torch.view_as_real)")
        if t.dtype.is_floating_point and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"compare_tensors: {name} has dtype {t.dtype}; supported floating dtypes are "
                            f"{', '.join(str(d) for d in _FLOAT_DTYPES)}; cast it first")
    if test.shape != ref.shape:
        raise ValueError(f"compare_tensors: shape mismatch, test (FMS) has shape {tuple(test.shape)} but ref (HF) "
                         f"has shape {tuple(ref.shape)}; reshape/transpose one side to the other's layout first")


def compare_tensors(test: torch.Tensor, ref: torch.Tensor, tol: Optional[Tolerance] = None, *,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> TensorDiff:
    """Compare ``test`` (FMS side) with ``ref`` (HF reference side) element by element.

    Args:
        test: tensor of any shape; same shape as ``ref``. Floating (float16, bfloat16, float32, float64),
            integer or bool.
        ref: the reference tensor; its dtype is the one ULP distances are counted in.
        tol: bounds to apply; default ``default_tolerance`` of the looser of the two dtypes (as
            ``torch.testing.assert_close`` does for mixed dtypes).
        chunk_elements: elements processed per step of the streaming reduction (memory knob).

    Pass/fail rule (``TensorDiff.passed``):

    1. Any NaN in either tensor fails. An inf fails unless the other tensor holds the same inf (same sign) at
       the same position, as in ``torch.allclose``; matched infs are left out of the statistics.
    2. Otherwise the comparison passes if EITHER every finite pair satisfies
       ``|test - ref| <= atol + rtol * |ref|`` (``torch.allclose`` with ``ref`` as the second argument;
       ``criterion == "allclose"``) OR ``rel_l2 <= max_rel_l2`` and ``cosine >= min_cosine``
       (``criterion == "rel_l2"``). The second branch lets a large activation with one near-zero element that
       misses the elementwise bound pass when its overall error is at rounding level; the first lets a
       tensor whose entries are all near zero (where rel-L2 is meaningless) pass on the absolute bound.

    Statistics are accumulated in float64 on the tensors' device, ``chunk_elements`` at a time, so at most a
    few chunk-sized float64 temporaries exist at once, whatever the tensor size (a non-contiguous input is
    first flattened with one copy in its own dtype). If the devices differ, each chunk of ``test`` is moved to
    ``ref``'s device. If the dtypes differ, ULPs are counted after casting ``test`` to ``ref``'s dtype (noted
    in ``notes``); the other statistics use both tensors' exact values. Norms of float64 values beyond about
    1e154 overflow to inf.

    Returns:
        TensorDiff.

    Raises:
        TypeError: a non-tensor, complex, or unsupported floating dtype (e.g. float8) input.
        ValueError: the shapes differ (the message names both), or ``chunk_elements < 1``.
    """
    if not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    _check_inputs(test, ref)
    tol = _tolerance_for(tol, test, ref)
    return _compare_chunked(test, ref, tol, chunk_elements)


def _tolerance_for(tol: Optional[Tolerance], test: torch.Tensor, ref: torch.Tensor) -> Tolerance:
    if tol is None:
        return _dtype_bound(test.dtype, ref.dtype)
    if not isinstance(tol, Tolerance):
        raise TypeError(f"tol must be a parity.metrics.Tolerance or None, got {type(tol).__name__}")
    return tol


def _notes(test: torch.Tensor, ref: torch.Tensor) -> list[str]:
    notes = []
    if test.dtype != ref.dtype:
        notes.append(f"dtype mismatch: test is {test.dtype}, ref is {ref.dtype}; ULP distance counted after "
                     f"casting test to {ref.dtype}, other statistics on exact values")
    if test.device != ref.device:
        notes.append(f"device mismatch: test on {test.device}, ref on {ref.device}; compared on {ref.device}")
    return notes


def _close_bound(test: torch.Tensor, ref: torch.Tensor) -> Tolerance:
    """The bound ``TensorDiff.mismatched`` counts against: the dtypes' own default tolerance."""
    return _dtype_bound(test.dtype, ref.dtype) if ref.dtype.is_floating_point else _EXACT


@functools.lru_cache(maxsize=None)
def _dtype_bound(test_dtype: torch.dtype, ref_dtype: torch.dtype) -> Tolerance:
    """The looser of two dtypes' default tolerances (one Tolerance per pair of dtypes)."""
    return _looser(default_tolerance(ref_dtype), default_tolerance(test_dtype))


@dataclass
class _Sums:
    """One pair's reductions before the verdict (``_finish``)."""

    n_finite: int = 0
    sum_abs: float = 0.0
    sum_d2: float = 0.0
    sum_t2: float = 0.0
    sum_r2: float = 0.0
    sum_tr: float = 0.0
    n_mismatched: int = 0
    mismatched: int = 0
    max_abs: float = -1.0
    worst_flat: Optional[int] = None
    max_ulp: int = 0
    test_nan: int = 0
    test_inf: int = 0
    ref_nan: int = 0
    ref_inf: int = 0
    inf_mismatch: int = 0


def _compare_chunked(test: torch.Tensor, ref: torch.Tensor, tol: Tolerance, chunk_elements: int) -> TensorDiff:
    """One pair, ``chunk_elements`` at a time (any size and dtype; NaN and inf accounted for)."""
    numel = ref.numel()
    device = ref.device
    flat_t, flat_r = test.detach().reshape(-1), ref.detach().reshape(-1)
    acc = _Sums()
    close = _close_bound(test, ref)
    same_bounds = tol.atol == close.atol and tol.rtol == close.rtol
    on_cpu = device.type == "cpu"
    for start in range(0, numel, chunk_elements):
        t = flat_t[start:start + chunk_elements]
        if t.device != device:
            t = t.to(device)
        r = flat_r[start:start + chunk_elements]
        if on_cpu and _NUMPY_ON_CPU and _chunk_on_cpu(t, r, tol, close, same_bounds, start, acc):
            continue
        t64, r64 = t.to(torch.float64), r.to(torch.float64)
        diff = (t64 - r64).abs_()
        chunk_abs = float(diff.sum())
        # a NaN or inf on either side makes the sum of |t - r| non-finite (so does a float64 overflow, which the
        # exact accounting below then handles): the common all-finite chunk costs no extra check
        all_finite = math.isfinite(chunk_abs)
        if not all_finite:  # NaN / inf accounting, and the statistics over the finite pairs only
            finite = torch.isfinite(t64) & torch.isfinite(r64)
            t_nan, r_nan = torch.isnan(t64), torch.isnan(r64)
            t_inf, r_inf = torch.isinf(t64), torch.isinf(r64)
            acc.test_nan += int(t_nan.sum())
            acc.ref_nan += int(r_nan.sum())
            acc.test_inf += int(t_inf.sum())
            acc.ref_inf += int(r_inf.sum())
            # An inf is acceptable only against the identical inf; count the others.
            acc.inf_mismatch += int(((t_inf | r_inf) & ~(t_nan | r_nan) & (t64 != r64)).sum())
            t64, r64, diff = t64[finite], r64[finite], diff[finite]
            t, r = t[finite], r[finite]
            chunk_abs = float(diff.sum())
        acc.n_finite += t64.numel()
        if t64.numel() == 0:
            continue
        acc.sum_abs += chunk_abs
        acc.sum_d2 += float(torch.dot(diff, diff))
        acc.sum_t2 += float(torch.dot(t64, t64))
        acc.sum_r2 += float(torch.dot(r64, r64))
        acc.sum_tr += float(torch.dot(t64, r64))
        bound = r64.abs()  # a new tensor (r64 may be the caller's float64 ref): |r|, then the bound in place
        if same_bounds:
            n_chunk = int(torch.count_nonzero(diff > bound.mul_(tol.rtol).add_(tol.atol)))
            acc.n_mismatched += n_chunk
            acc.mismatched += n_chunk
        else:
            close_bound = bound.mul(close.rtol).add_(close.atol)
            acc.n_mismatched += int(torch.count_nonzero(diff > bound.mul_(tol.rtol).add_(tol.atol)))
            acc.mismatched += int(torch.count_nonzero(diff > close_bound))
            del close_bound
        chunk_max, chunk_arg = diff.max(dim=0)
        chunk_max = float(chunk_max)
        if chunk_max > acc.max_abs:
            acc.max_abs = chunk_max
            local = int(chunk_arg)
            if all_finite:
                acc.worst_flat = start + local
            else:
                acc.worst_flat = start + int(torch.nonzero(finite).reshape(-1)[local])
        del diff, t64, r64, bound
        if chunk_max > 0:  # equal values (+0.0 and -0.0 included) are 0 ULPs apart
            t_u = t.to(r.dtype) if t.dtype != r.dtype else t
            acc.max_ulp = max(acc.max_ulp, int(_ulp_distance(t_u, r).max()))
    worst = None
    if acc.worst_flat is not None:
        worst = (float(flat_t[acc.worst_flat].to(torch.float64)), float(flat_r[acc.worst_flat].to(torch.float64)))
    return _finish(test, ref, tol, acc, worst)


# CPU chunks are reduced with NumPy over the tensors' memory: the same float64 arithmetic in about a third of the
# time of the same dozen torch ops on the small tensors of a parity run (each torch op pays a dispatch). Tests turn
# it off to hold the torch path, which CUDA tensors and non-finite chunks take, to the same statistics.
_NUMPY_ON_CPU = True
_NUMPY_INT = {torch.int16: np.int16, torch.int32: np.int32}


def _float64_on_cpu(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as a float64 NumPy array (a copy; NumPy has no bfloat16, so torch converts that)."""
    if x.dtype == torch.bfloat16:
        return x.to(torch.float64).numpy()
    return x.numpy().astype(np.float64)


def _max_ulp_on_cpu(a: torch.Tensor, b: torch.Tensor) -> int:
    """``_ulp_distance(a, b).max()`` of two CPU float tensors of one dtype of at most 32 bits, in NumPy: keys in
    the bits' own width (a negative pattern ``p`` maps to ``MIN - p``, so -0.0 and +0.0 share key 0), their
    difference in float64 (exact: it is below 2**33)."""
    view = _BITS_VIEW[a.dtype]
    lowest = np.array(torch.iinfo(view).min, dtype=_NUMPY_INT[view])
    keys = []
    for x in (a, b):
        bits = x.view(view).numpy() if x.dtype == torch.bfloat16 else x.numpy().view(_NUMPY_INT[view])
        keys.append(np.where(bits < 0, lowest - bits, bits))
    return int(np.abs(keys[0].astype(np.float64) - keys[1]).max())


@np.errstate(all="ignore")  # inf - inf, overflowing squares: accounted for as the torch path does, silently
def _chunk_on_cpu(t: torch.Tensor, r: torch.Tensor, tol: Tolerance, close: Tolerance, same_bounds: bool,
                  start: int, acc: _Sums) -> bool:
    """One all-finite CPU chunk's reductions added to ``acc`` (NumPy); False, with ``acc`` untouched, when the chunk
    holds a NaN or inf (the torch path then does the exact non-finite accounting)."""
    t64, r64 = _float64_on_cpu(t), _float64_on_cpu(r)
    diff = np.abs(t64 - r64)
    chunk_abs = float(diff.sum())
    if not math.isfinite(chunk_abs):
        return False
    acc.n_finite += diff.size
    acc.sum_abs += chunk_abs
    # products then sums, not np.dot: NumPy's BLAS would start its own spinning threads beside torch's
    acc.sum_d2 += float(np.square(diff).sum())
    acc.sum_t2 += float(np.square(t64).sum())
    acc.sum_r2 += float(np.square(r64).sum())
    acc.sum_tr += float((t64 * r64).sum())
    r_abs = np.abs(r64)
    n_chunk = int(np.count_nonzero(diff > r_abs * tol.rtol + tol.atol))
    acc.n_mismatched += n_chunk
    acc.mismatched += n_chunk if same_bounds else int(np.count_nonzero(diff > r_abs * close.rtol + close.atol))
    local = int(diff.argmax())
    chunk_max = float(diff[local])
    if chunk_max > acc.max_abs:
        acc.max_abs = chunk_max
        acc.worst_flat = start + local
    if chunk_max > 0:  # equal values (+0.0 and -0.0 included) are 0 ULPs apart
        t_u = t.to(r.dtype) if t.dtype != r.dtype else t
        if r.dtype in _BITS_VIEW and r.dtype != torch.float64:
            acc.max_ulp = max(acc.max_ulp, _max_ulp_on_cpu(t_u, r))
        else:  # 64-bit keys and integer dtypes: the torch path's distance
            acc.max_ulp = max(acc.max_ulp, int(_ulp_distance(t_u, r).max()))
    return True


def _finish(test: torch.Tensor, ref: torch.Tensor, tol: Tolerance, acc: _Sums,
            worst: Optional[tuple[float, float]]) -> TensorDiff:
    """The statistics and the verdict of one pair from its reductions."""
    shape = tuple(ref.shape)
    if acc.n_finite == 0:
        max_abs = mean_abs = 0.0
    else:
        max_abs, mean_abs = acc.max_abs, acc.sum_abs / acc.n_finite
    if acc.sum_r2 > 0:
        rel_l2 = math.sqrt(acc.sum_d2) / math.sqrt(acc.sum_r2)
    else:
        rel_l2 = 0.0 if acc.sum_d2 == 0 else math.inf
    if acc.sum_t2 == 0 and acc.sum_r2 == 0:
        cosine = 1.0
    elif acc.sum_t2 == 0 or acc.sum_r2 == 0:
        cosine = 0.0
    else:
        cosine = max(-1.0, min(1.0, acc.sum_tr / math.sqrt(acc.sum_t2 * acc.sum_r2)))
    worst_index = worst_test = worst_ref = None
    if acc.worst_flat is not None and worst is not None:
        worst_index = _unravel(acc.worst_flat, shape)
        worst_test, worst_ref = worst
    failures = []
    if acc.test_nan or acc.ref_nan:
        failures.append(f"NaN present (test {acc.test_nan}, ref {acc.ref_nan})")
    if acc.inf_mismatch:
        failures.append(f"{acc.inf_mismatch} inf element(s) not matched by the same inf on the other side")
    passed, criterion, reason = _verdict(failures, acc.n_mismatched == 0, rel_l2, cosine, tol,
                                         f"{acc.n_mismatched}/{acc.n_finite} elements exceed", max_abs, worst_index)
    return TensorDiff(
        shape=shape, dtype=str(ref.dtype), test_dtype=str(test.dtype), numel=ref.numel(),
        max_abs=float(max_abs), mean_abs=float(mean_abs), rel_l2=float(rel_l2), cosine=float(cosine),
        max_ulp=int(acc.max_ulp), worst_index=worst_index, worst_test=worst_test, worst_ref=worst_ref,
        n_mismatched=acc.n_mismatched, mismatched=acc.mismatched, test_nan=acc.test_nan, test_inf=acc.test_inf,
        ref_nan=acc.ref_nan, ref_inf=acc.ref_inf, passed=passed, criterion=criterion, reason=reason, tolerance=tol,
        notes=_notes(test, ref),
    )


def _verdict(failures: list[str], allclose: Optional[bool], rel_l2: float, cosine: float, tol: Tolerance,
             count: str, max_abs: float, worst_index) -> tuple[bool, Optional[str], Optional[str]]:
    """THE pass/fail rule (``compare_tensors`` and ``recheck_diff`` both use it): ``(passed, criterion, reason)``.

    ``failures`` are the non-finite problems already found (they fail whatever the bounds). Otherwise the element-wise
    test passes (``allclose``; None: undecidable from saved statistics) or the rel-L2 / cosine test does.
    """
    failures = list(failures)
    if not failures:
        if allclose:
            return True, "allclose", None
        if rel_l2 <= tol.max_rel_l2 and cosine >= tol.min_cosine:
            return True, "rel_l2", None
        if allclose is None:
            failures.append(f"undetermined: the element-wise bound atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| cannot "
                            "be decided from saved statistics; re-run the comparison")
        else:
            failures.append(f"{count} atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| (max_abs {max_abs:.3g} at "
                            f"{worst_index})")
        if rel_l2 > tol.max_rel_l2:
            failures.append(f"rel_l2 {rel_l2:.3g} > max_rel_l2 {tol.max_rel_l2:.3g}")
        if cosine < tol.min_cosine:
            failures.append(f"cosine {cosine:.9g} < min_cosine {tol.min_cosine:.9g}")
    return False, None, "; ".join(failures)


def recheck_diff(d: TensorDiff, tol: Tolerance) -> TensorDiff:
    """``d`` judged against ``tol`` from its saved statistics, by the rule of ``compare_tensors`` (``_verdict``).

    The rel-L2 / cosine branch is re-evaluated exactly. The element-wise branch
    (``|test - ref| <= atol + rtol * |ref|`` everywhere) is decided from the statistics when they settle it: same
    atol/rtol as saved (the saved mismatch count holds), ``max_abs <= atol`` (every element passes), a looser bound
    than saved with no saved mismatch, a tighter one with saved mismatches, or the worst element itself violating
    the new bound. Otherwise it cannot be decided without the tensors: the layer fails with a reason starting
    ``undetermined`` (re-run to decide), never passed on a guess.

    Raises:
        TypeError: ``tol`` is not a ``Tolerance``.
    """
    if not isinstance(tol, Tolerance):
        raise TypeError(f"recheck needs a parity.metrics.Tolerance, got {type(tol).__name__}")
    old = d.tolerance
    failures = []
    if d.test_nan or d.ref_nan:
        failures.append(f"NaN present (test {d.test_nan}, ref {d.ref_nan})")
    if (d.test_inf or d.ref_inf) and d.reason and "inf element" in d.reason:
        failures.append(next(s for s in d.reason.split("; ") if "inf element" in s))
    if d.max_abs <= tol.atol:
        allclose: Optional[bool] = True
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
    passed, criterion, reason = _verdict(failures, allclose, d.rel_l2, d.cosine, tol, "elements exceed", d.max_abs,
                                         d.worst_index)
    notes = list(d.notes)
    if (tol.atol, tol.rtol) != (old.atol, old.rtol):
        notes.append(f"rechecked; n_mismatched was counted at atol {old.atol:g}, rtol {old.rtol:g}")
    return replace(d, passed=passed, criterion=criterion, reason=reason, tolerance=tol, notes=notes)
