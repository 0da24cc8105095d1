"""parity.metrics: statistics against values derived independently (numpy float64, torch.nextafter, torch.finfo,
numpy bit views) and the pass/fail rule on hand-built cases."""

import json

import numpy as np
import pytest
import torch
from torch.testing._comparison import default_tolerances as torch_default_tolerances

from parity.metrics import TensorDiff, Tolerance, compare_tensors, default_tolerance

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- tolerances

@pytest.mark.parametrize("dtype", FLOATS)
def test_default_tolerance_atol_rtol_are_torch_testing_defaults(dtype):
    rtol, atol = torch_default_tolerances(dtype)
    tol = default_tolerance(dtype)
    assert (tol.rtol, tol.atol) == (rtol, atol)
    # min_cosine is implied by the rel-L2 bound: sqrt(1 - r^2) >= 1 - r.
    assert tol.min_cosine == 1.0 - tol.max_rel_l2


@pytest.mark.parametrize("dtype, eps_multiple", [(torch.bfloat16, 2.0), (torch.float16, 2.0)])
def test_low_precision_rel_l2_is_about_two_eps(dtype, eps_multiple):
    ratio = default_tolerance(dtype).max_rel_l2 / torch.finfo(dtype).eps
    assert ratio == pytest.approx(eps_multiple, rel=0.03)


def test_default_tolerance_ordering_and_values():
    r = {d: default_tolerance(d).max_rel_l2 for d in FLOATS}
    assert r[torch.float64] < r[torch.float32] < r[torch.float16] < r[torch.bfloat16]
    assert r[torch.float32] == 1e-5
    assert default_tolerance(torch.int64) == Tolerance(0.0, 0.0, 0.0, 1.0)


def test_default_tolerance_rejects_unsupported():
    with pytest.raises(TypeError, match="float8"):
        default_tolerance(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="torch.dtype"):
        default_tolerance("float32")


def test_tolerance_validates():
    with pytest.raises(ValueError, match="atol"):
        Tolerance(atol=-1.0, rtol=0.0, max_rel_l2=0.0, min_cosine=1.0)
    with pytest.raises(ValueError, match="min_cosine"):
        Tolerance(atol=0.0, rtol=0.0, max_rel_l2=0.0, min_cosine=1.5)


# ---------------------------------------------------------------- ULP

@pytest.mark.parametrize("dtype", FLOATS)
def test_nextafter_is_exactly_one_ulp(dtype):
    x = _rand((5, 7), dtype)
    up = torch.nextafter(x, torch.full_like(x, float("inf")))
    down = torch.nextafter(x, torch.full_like(x, float("-inf")))
    assert compare_tensors(up, x).max_ulp == 1
    assert compare_tensors(down, x).max_ulp == 1
    two = torch.nextafter(up, torch.full_like(x, float("inf")))
    assert compare_tensors(two, x).max_ulp == 2


@pytest.mark.parametrize("dtype", FLOATS)
def test_ulp_across_zero(dtype):
    pz, nz = torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype)
    assert torch.signbit(nz).item() and not torch.signbit(pz).item()
    assert compare_tensors(nz, pz).max_ulp == 0
    # Smallest subnormal = smallest_normal * eps for IEEE-style formats.
    fi = torch.finfo(dtype)
    tiny = torch.tensor([fi.smallest_normal * fi.eps], dtype=torch.float64).to(dtype)
    assert tiny.item() > 0 and torch.nextafter(torch.zeros_like(tiny), tiny).item() == tiny.item()
    assert compare_tensors(-tiny, tiny).max_ulp == 2
    assert compare_tensors(tiny, nz).max_ulp == 1


def test_ulp_minus_one_vs_one_float32_from_numpy_bits():
    # Positive floats up to 1.0 are the bit patterns 1 .. bits(1.0), so -1 -> +1 spans 2 * bits(1.0).
    one_bits = int(np.array(1.0, dtype=np.float32).view(np.int32))
    d = compare_tensors(torch.tensor([-1.0]), torch.tensor([1.0]))
    assert d.max_ulp == 2 * one_bits


def test_ulp_float64_extremes_saturate():
    big = torch.finfo(torch.float64).max
    d = compare_tensors(torch.tensor([-big], dtype=torch.float64), torch.tensor([big], dtype=torch.float64))
    assert d.max_ulp == 2**63 - 1
    # Same sign, far apart: exact, no overflow: bits(max) - bits(smallest subnormal).
    bits = lambda v: int(np.array(v, dtype=np.float64).view(np.int64))
    tiny = 5e-324
    d = compare_tensors(torch.tensor([tiny], dtype=torch.float64), torch.tensor([big], dtype=torch.float64))
    assert d.max_ulp == bits(big) - bits(tiny)


def test_integer_ulp_is_absolute_difference():
    a = torch.tensor([[1, 5], [7, -3]])
    b = torch.tensor([[1, 2], [7, 4]])
    d = compare_tensors(a, b)
    assert d.max_ulp == 7 and d.max_abs == 7.0 and not d.passed
    assert compare_tensors(b.clone(), b).passed


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("dtype", FLOATS)
def test_identical_tensors(dtype):
    x = _rand((3, 4, 5), dtype)
    d = compare_tensors(x.clone(), x)
    assert (d.max_abs, d.mean_abs, d.rel_l2, d.max_ulp, d.n_mismatched) == (0.0, 0.0, 0.0, 0, 0)
    assert d.cosine == 1.0
    assert d.passed and d.criterion == "allclose" and d.reason is None
    assert d.shape == (3, 4, 5) and d.dtype == str(dtype) and d.numel == 60


def test_known_perturbation_matches_numpy():
    ref = _rand((4, 6), torch.float32, seed=1)
    noise = 1e-3 * _rand((4, 6), torch.float32, seed=2)
    test = ref + noise
    a, b = test.numpy().astype(np.float64), ref.numpy().astype(np.float64)
    diff = np.abs(a - b)
    d = compare_tensors(test, ref)
    assert d.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12)
    assert d.cosine == pytest.approx(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-12)
    assert d.max_abs == diff.max()
    assert d.mean_abs == pytest.approx(diff.mean(), rel=1e-12)
    idx = np.unravel_index(np.argmax(diff), diff.shape)
    assert d.worst_index == tuple(int(i) for i in idx)
    assert (d.worst_test, d.worst_ref) == (a[idx], b[idx])
    assert d.n_mismatched == int((diff > 1e-5 + 1.3e-6 * np.abs(b)).sum())
    # rel-L2 ~ 1e-3 against a float32 bound of 1e-5: fails on both criteria.
    assert not d.passed and "rel_l2" in d.reason and "atol" in d.reason


def test_chunked_equals_unchunked():
    ref = _rand((5, 13), torch.float32, seed=3)
    test = ref + 1e-4 * _rand((5, 13), torch.float32, seed=4)
    whole = compare_tensors(test, ref)
    chunked = compare_tensors(test, ref, chunk_elements=7)
    assert (chunked.max_abs, chunked.worst_index, chunked.max_ulp, chunked.n_mismatched) == \
        (whole.max_abs, whole.worst_index, whole.max_ulp, whole.n_mismatched)
    assert chunked.rel_l2 == pytest.approx(whole.rel_l2, rel=1e-12)
    assert chunked.cosine == pytest.approx(whole.cosine, rel=1e-12)


def test_non_contiguous_and_scalar_and_empty():
    ref = _rand((6, 4), torch.float32)
    d = compare_tensors(ref.t() * 2, ref.t())
    assert d.shape == (4, 6) and d.rel_l2 == pytest.approx(1.0, rel=1e-12)
    s = compare_tensors(torch.tensor(2.0), torch.tensor(1.0))
    assert s.worst_index == () and s.max_abs == 1.0
    e = compare_tensors(torch.empty(0, 3), torch.empty(0, 3))
    assert e.passed and e.numel == 0 and e.worst_index is None


# ---------------------------------------------------------------- pass/fail rule

def test_rel_l2_branch_rescues_one_near_zero_element():
    # 1000 elements of size ~1 plus one exact zero in ref that test misses by 1e-4 (> atol 1e-5):
    # allclose fails, rel-L2 = 1e-4 / ||ref|| is far below 1e-5.
    ref = torch.ones(1001, dtype=torch.float32)
    ref[500] = 0.0
    test = ref.clone()
    test[500] = 1e-4
    d = compare_tensors(test, ref)
    expected = float(np.float32(1e-4)) / np.sqrt(1000.0)
    assert d.rel_l2 == pytest.approx(expected, rel=1e-12)
    assert d.n_mismatched == 1 and d.worst_index == (500,)
    assert d.passed and d.criterion == "rel_l2"


def test_allclose_branch_rescues_near_zero_tensor():
    # Entries ~1e-7 with opposite signs: rel-L2 = 2, cosine = -1, but |diff| <= atol 1e-5.
    ref = torch.full((8,), 1e-7)
    d = compare_tensors(-ref, ref)
    assert d.rel_l2 == pytest.approx(2.0) and d.cosine == pytest.approx(-1.0)
    assert d.passed and d.criterion == "allclose"


def test_min_cosine_binds_in_custom_tolerance():
    ref = torch.tensor([1.0, 0.0])
    test = torch.tensor([1.0, 0.5])           # rel_l2 0.5, cosine 1/sqrt(1.25)
    tol = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=1.0, min_cosine=0.95)
    d = compare_tensors(test, ref, tol)
    assert d.cosine == pytest.approx(1 / np.sqrt(1.25), rel=1e-12)
    assert not d.passed and "cosine" in d.reason and "rel_l2 " not in d.reason
    assert compare_tensors(test, ref, Tolerance(0.0, 0.0, 1.0, 0.85)).passed


@pytest.mark.parametrize("where", ["test", "ref", "both"])
def test_nan_fails(where):
    ref = torch.ones(4)
    test = ref.clone()
    if where in ("test", "both"):
        test[2] = float("nan")
    if where in ("ref", "both"):
        ref = ref.clone()
        ref[2] = float("nan")
    d = compare_tensors(test, ref)
    assert not d.passed and "NaN" in d.reason
    assert d.test_nan == (where != "ref") and d.ref_nan == (where != "test")
    # Statistics cover the finite pairs only: they stay finite and are exact there.
    assert d.max_abs == 0.0 and d.rel_l2 == 0.0


def test_inf_rule():
    ref = torch.tensor([float("-inf"), 1.0, 2.0])
    assert compare_tensors(ref.clone(), ref).passed
    d = compare_tensors(torch.tensor([float("inf"), 1.0, 2.0]), ref)
    assert not d.passed and "inf" in d.reason and d.test_inf == 1 and d.ref_inf == 1
    d = compare_tensors(torch.tensor([5.0, 1.0, 2.0]), ref)
    assert not d.passed and d.test_inf == 0


def test_zero_reference():
    z = torch.zeros(3)
    d = compare_tensors(torch.tensor([0.0, 1.0, 0.0]), z)
    assert d.rel_l2 == float("inf") and d.cosine == 0.0 and not d.passed
    assert compare_tensors(z.clone(), z).cosine == 1.0


# ---------------------------------------------------------------- errors, dtypes, serialisation

def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        compare_tensors(torch.zeros(2, 3), torch.zeros(3, 2))


def test_bad_inputs():
    with pytest.raises(TypeError, match="test must be a torch.Tensor"):
        compare_tensors(np.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="complex"):
        compare_tensors(torch.zeros(3, dtype=torch.complex64), torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="Tolerance"):
        compare_tensors(torch.zeros(3), torch.zeros(3), tol=1e-3)
    with pytest.raises(ValueError, match="chunk_elements"):
        compare_tensors(torch.zeros(3), torch.zeros(3), chunk_elements=0)


def test_dtype_mismatch_counts_ulp_in_ref_dtype():
    ref = _rand((16,), torch.bfloat16)
    # A float32 offset of a quarter bf16 spacing rounds back to ref on the cast: 0 ULP in bf16, yet nonzero abs.
    spacing = (torch.nextafter(ref, torch.full_like(ref, float("inf"))).float() - ref.float()).abs()
    test = ref.float() + spacing / 4
    d = compare_tensors(test, ref)
    assert d.max_ulp == 0 and d.max_abs > 0
    assert d.dtype == "torch.bfloat16" and d.test_dtype == "torch.float32"
    assert any("dtype mismatch" in n and "bfloat16" in n for n in d.notes)
    assert d.tolerance == default_tolerance(torch.bfloat16)   # looser of the two
    assert d.passed


def test_to_dict_is_json_safe_and_round_trips():
    ref = torch.zeros(3)
    test = torch.tensor([float("nan"), 1.0, 0.0])
    d = compare_tensors(test, ref)
    text = json.dumps(d.to_dict(), allow_nan=False)
    back = TensorDiff.from_dict(json.loads(text))
    assert back.rel_l2 == float("inf") and back.shape == (3,) and back.worst_index == (1,)
    assert back.tolerance == d.tolerance and back.reason == d.reason and back.passed is False
    assert back.to_dict() == d.to_dict()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    ref = _rand((64, 33), torch.bfloat16)
    test = (ref.float() * 1.01).to(torch.bfloat16)
    cpu = compare_tensors(test, ref)
    gpu = compare_tensors(test.cuda(), ref.cuda(), chunk_elements=100)
    assert (gpu.max_abs, gpu.worst_index, gpu.max_ulp, gpu.n_mismatched) == \
        (cpu.max_abs, cpu.worst_index, cpu.max_ulp, cpu.n_mismatched)
    assert gpu.rel_l2 == pytest.approx(cpu.rel_l2, rel=1e-12)


@pytest.mark.parametrize("dtype", FLOATS)
def test_inputs_are_left_untouched(dtype):
    """The statistics work in place on their own temporaries only: a float64 input (whose float64 view is the
    caller's tensor) comes back bit for bit, with NaN and inf accounting taken too."""
    test, ref = _rand((6, 5), dtype), _rand((6, 5), dtype)
    ref[0, 0] = float("inf")
    test[1, 1] = float("nan")
    before = (test.clone(), ref.clone())
    for tol in (None, Tolerance(atol=1e-3, rtol=1e-3, max_rel_l2=1e-3, min_cosine=0.9)):
        compare_tensors(test, ref, tol)
        compare_tensors(test.nan_to_num(), ref.nan_to_num(), tol)
    torch.testing.assert_close(test, before[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ref, before[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOATS)
def test_numpy_and_torch_reductions_agree(dtype, monkeypatch):
    """CPU chunks are reduced with NumPy, CUDA and non-finite ones with torch: the same statistics either way
    (sums to float64 rounding, counts, worst element and ULPs exactly), chunked or not, at a bound that differs from
    the dtype's own (both mismatch counts taken)."""
    import parity.metrics as metrics

    test, ref = _rand((7, 300), dtype), _rand((7, 300), dtype, seed=1)
    near = (ref.to(torch.float64) + 1e-3 * test.to(torch.float64)).to(dtype)
    bound = Tolerance(atol=1e-3, rtol=1e-2, max_rel_l2=0.1, min_cosine=0.9)
    for a, b in ((test, ref), (near, ref), (near.float(), ref)):
        for chunk in (1 << 22, 257):
            fast = compare_tensors(a, b, bound, chunk_elements=chunk)
            monkeypatch.setattr(metrics, "_NUMPY_ON_CPU", False)
            slow = compare_tensors(a, b, bound, chunk_elements=chunk)
            monkeypatch.setattr(metrics, "_NUMPY_ON_CPU", True)
            for name in ("n_mismatched", "mismatched", "max_ulp", "worst_index", "worst_test", "worst_ref", "max_abs",
                         "passed", "numel"):
                assert getattr(fast, name) == getattr(slow, name), name
            for name in ("mean_abs", "rel_l2", "cosine"):
                assert getattr(fast, name) == pytest.approx(getattr(slow, name), rel=1e-12, abs=1e-300), name
