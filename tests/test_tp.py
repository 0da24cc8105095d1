"""FMS tensor parallelism: the decoder sharded over 2 processes (torchrun, gloo, CPU) against the single-process HF
reference, layer by layer, and greedy tokens (tests/distributed/tp_worker.py is one rank)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed") / "tp_worker.py"


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "rank0.json"
    with socket.socket() as s:  # a free port for the rendezvous (torchrun's port 0 is not a free-port request)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), str(WORKER), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_decoder_is_sharded_by_fms(tp):
    assert tp["world_size"] == 2
    assert tp["attn_type"] == "TPMultiHeadAttention" and tp["mlp_type"] == "TPGatedLinearUnit"
    assert tp["local_qkv_rows"] * 2 == tp["full_qkv_rows"]  # each rank holds half the heads


def test_every_layer_of_the_sharded_model_matches_single_process_hf(tp):
    result = tp["result"]
    assert result["provenance"]["distributed"] == {"strategy": "tp", "world_size": 2}
    names = [r["pair"]["name"] for r in result["layers"]]
    assert "decoder.layers.3" in names and names[-1] == "logits"
    bad = [(r["pair"]["name"], r["error"], r["introduced_error"]) for r in result["layers"]
           if r["error"] or r["introduced_error"] or not r["diff"]["passed"]
           or (r["introduced"] is not None and not r["introduced"]["passed"])]
    assert bad == [] and result["passed"] and result["first_divergent"] is None
    rows = {r["pair"]["name"]: r for r in result["layers"]}
    for name in ("decoder.layers.0", "decoder.layers.3", "logits"):  # block outputs and logits, float32 bounds
        assert rows[name]["diff"]["rel_l2"] < 1e-5, name


def test_greedy_tokens_are_identical(tp):
    assert tp["fms_tokens"] == tp["hf_tokens"]
    assert len(set(tp["hf_tokens"][0])) >= 8  # a continuation that varies


def test_parity_diff_under_torchrun_prints_one_report(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), "-m", "parity.cli", "diff", "--distributed", "tp", "--layer", "decoder.layers.1",
                          "--report-dir", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("requested layers: 5/5 pass") == 1  # rank 0 alone reports
    report = json.loads((tmp_path / "parity-report.json").read_text())
    assert report["provenance"]["distributed"]["world_size"] == 2 and report["passed"]


def test_distributed_without_torchrun_is_a_usage_error(capsys):
    from parity.cli import main

    assert main(["diff", "--distributed", "tp"]) == 2
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.slow  # two torchrun launches: about 40 s on 2 cores (the slower tier)
@pytest.mark.parametrize("variant", ["tiny-4.0", "tiny-plus"])
def test_family_members_shard_under_torchrun(variant, tmp_path):
    """The 4.x members' decoders shard as 3.3's: granite-4.0-1b-speech's read from a granitemoehybrid text config
    (its shared_mlp split by the adapter before FMS shards it), and Granite Speech Plus (the concatenated encoder
    state replicated on every rank); every decoder row of the sharded FMS model against single-process HF."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), "-m", "parity.cli", "diff", "--distributed", "tp", "--variant", variant,
                          "--report-dir", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "parity-report.json").read_text())
    assert report["provenance"]["distributed"] == {"strategy": "tp", "world_size": 2} and report["passed"]
    names = [r["pair"]["name"] for r in report["layers"]]
    assert "decoder.layers.3.mlp" in names and "encoder" in names and names[-1] == "logits"
