"""Repository-wide pytest configuration.

* One torch thread per test process (see ``pytest_configure``).
* The ``gpu`` marker: without CUDA, gpu tests are skipped in an ordinary run (``pytest -n auto``), but a run that
  selects them explicitly (``pytest -m gpu parity/``, the pre-merge GPU gate) exits non-zero with one line instead of
  going green on skips. ``--allow-no-gpu`` turns that back into skips for local use.
* ``--gpu-suite-device cpu --gpu-suite-variants tiny``: the gpu suite's code run on a CPU machine (everything but the
  CUDA calls), as CI runs it on every change, so the suite cannot rot unseen between GPU sessions.
* ``--capture_expectation``: the option FMS's model test suites (``fms.testing._internal.model_test_suite``) read to
  rewrite their committed expectation files, as in ibm-fms's own ``tests/conftest.py``.
"""

import os

import pytest

_NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"


def pytest_addoption(parser):
    parser.addoption("--capture_expectation", action="store_true", default=False,
                     help="rewrite the expectation files of FMS's model test suites (tests/resources/expectations)")
    parser.addoption("--allow-no-gpu", action="store_true", default=False,
                     help="with -m gpu on a machine without CUDA, skip the gpu tests instead of failing the run")
    parser.addoption("--gpu-suite-device", default="cuda", metavar="DEVICE",
                     help="where the gpu suite runs (default cuda); cpu runs every line of it but the CUDA calls, "
                          "on a CPU machine (CI does, with --gpu-suite-variants tiny)")
    parser.addoption("--gpu-suite-variants", default="3.3-2b,3.3-8b", metavar="NAMES",
                     help="comma-separated variants the gpu suite runs (default 3.3-2b,3.3-8b)")


def _selects_gpu(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects a test marked only ``gpu`` (``-m gpu`` yes, ``-m "not gpu"`` no)."""
    if not markexpr or "gpu" not in markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == "gpu"))
    except Exception:  # noqa: BLE001 -- pytest's own -m parsing reports a malformed expression
        return False


def pytest_configure(config):
    # The CPU suite runs the tiny variant: its matmuls gain nothing from intra-op threads, and under
    # pytest-xdist every worker would start one thread per core, oversubscribing the 2-core machines
    # (measured: the first encoder call went from 0.04 s to 6.8 s under load). PARITY_TEST_THREADS overrides.
    import torch

    torch.set_num_threads(int(os.environ.get("PARITY_TEST_THREADS", "1")))
    on_cuda = config.getoption("gpu_suite_device").startswith("cuda")
    if (_selects_gpu(config.getoption("markexpr", "")) and not config.getoption("allow_no_gpu") and on_cuda
            and not hasattr(config, "workerinput") and not torch.cuda.is_available()):
        pytest.exit(f"-m {config.getoption('markexpr')!r} selects the gpu suite, which {_NO_GPU}; run it on a CUDA "
                    "machine (or pass --allow-no-gpu to skip it here)", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_generate_tests(metafunc):
    if "capture_expectation" in metafunc.fixturenames:
        metafunc.parametrize("capture_expectation", [metafunc.config.getoption("capture_expectation")])


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() or not config.getoption("gpu_suite_device").startswith("cuda"):
        return
    skip_gpu = pytest.mark.skip(reason=_NO_GPU)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
