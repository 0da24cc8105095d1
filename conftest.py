"""Repository-wide pytest configuration: the ``gpu`` marker skips cleanly on machines without CUDA."""

import os

import pytest
import torch


def pytest_configure(config):
    # The CPU suite runs the tiny variant: its matmuls gain nothing from intra-op threads, and under
    # pytest-xdist every worker would start one thread per core, oversubscribing the 2-core machines
    # (measured: the first encoder call went from 0.04 s to 6.8 s under load). PARITY_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("PARITY_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
