"""Standalone repro folders: written for an encoder block, a projector layer and a decoder layer, they reproduce a
planted divergence in a fresh process (exit 1) without the checkpoint, the whole model or the parity engine, and pass
(exit 0) when written from the unmodified tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from parity.cli import main
from parity.inputs import build_inputs
from parity.pair import build_pair
from parity.repro import write_repro


def _bn_stats(m):  # a conversion slip in one encoder block's BatchNorm statistics
    m.encoder.blocks[3].conv.batch_norm.running_var.mul_(2.0)


def _key_rows(m):  # two rows of one Q-Former cross-attention key projection swapped
    w = m.projector.layers[0].cross_attn.key.weight
    w[[0, 1]] = w[[1, 0]].clone()


def _q_rows(m):  # two q rows of one decoder layer's fused projection swapped (a RoPE permutation slip)
    w = m.decoder.base_model.layers[1].attn.in_proj.qkv_fused.weight
    w[[0, 1]] = w[[1, 0]].clone()


def _run(folder):
    """The repro in a fresh process, outside the repository (nothing of parity on its path)."""
    code = "import runpy, sys; sys.modules['parity'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, str(folder / "repro.py")], capture_output=True, text=True,
                          cwd=str(folder.parent), timeout=120)


@pytest.mark.slow  # six fresh processes that import torch and transformers: about 30 s on 2 cores
@pytest.mark.parametrize("layer, plant", [("encoder.blocks.3", _bn_stats), ("projector.layers.0", _key_rows),
                                          ("decoder.layers.1", _q_rows)])
def test_a_repro_reproduces_the_divergence_and_passes_when_honest(tmp_path, layer, plant):
    pair = build_pair("tiny")
    inputs = build_inputs(pair, same_inputs=True)
    honest = _run(write_repro(pair, inputs, layer, tmp_path / "honest"))
    assert honest.returncode == 0 and "within the bound" in honest.stdout, honest.stdout + honest.stderr
    with torch.no_grad():
        plant(pair.fms)
    planted = _run(write_repro(pair, inputs, layer, tmp_path / "planted"))
    assert planted.returncode == 1 and "DIVERGES" in planted.stdout, planted.stdout + planted.stderr
    manifest = json.loads((tmp_path / "planted" / "manifest.json").read_text())
    assert manifest["layer"] == layer and manifest["hf_call"]


def test_parity_diff_writes_the_repro_of_the_first_divergent_layer(tmp_path, capsys, monkeypatch):
    import fms_granite_speech.testing as testing

    real = testing.fms_from_hf

    def planted(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            _q_rows(model)
        return model

    monkeypatch.setattr(testing, "fms_from_hf", planted)
    repro = tmp_path / "repro"
    assert main(["diff", "--repro", str(repro), "--report-dir", str(tmp_path / "r"), "--quiet"]) == 1
    assert f"repro of decoder.layers.1.attn: {repro}" in capsys.readouterr().out
    assert _run(repro).returncode == 1
