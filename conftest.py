"""Repository-wide pytest configuration: the ``gpu`` marker skips cleanly on machines without CUDA."""

import os

import pytest
import torch


def pytest_configure(config):
    # Under pytest-xdist every worker would start one torch thread per core: on a 2-core machine that
    # oversubscribes the CPU and makes the many tiny matmuls of the tiny variant many times slower.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
