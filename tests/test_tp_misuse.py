"""Tensor-parallel misuse answers in one line before FMS builds anything (FMS itself asserts, on every rank)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import fms_granite_speech
from fms_granite_speech.registration import check_tensor_parallel
from parity.cli import main


def test_get_model_tp_outside_a_process_group_names_the_fix():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="needs a process group: run under torchrun"):
        fms_granite_speech.get_model("tiny", distributed_strategy="tp")


def test_a_world_size_that_does_not_divide_the_heads_is_refused(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    with pytest.raises(ValueError, match="over 3 ranks cannot split the decoder's 4 query heads"):
        check_tensor_parallel(4, 2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert check_tensor_parallel(4, 2) == 2
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    assert check_tensor_parallel(4, 2) == 4  # FMS replicates key/value heads over a world larger than kvheads


def test_tp_with_one_model_at_a_time_is_refused_not_silently_ignored(monkeypatch, capsys):
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(var, value)
    assert main(["diff", "--distributed", "tp", "--memory", "sequential"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --memory sequential" in err[0], err


def test_only_rank_0_prints_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["diff", "--distributed", "tp", "--memory", "sequential"]) == 2
    assert capsys.readouterr().err == ""
