"""A checkpoint folder whose tensors do not fit its config is described by the project's strict loader, in one
line naming the tensor and both shapes, through every interface: ``parity diff --checkpoint`` (checked from the
safetensors headers before either side is built), ``granite-speech transcribe --checkpoint``, ``load_checkpoint``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fms_granite_speech.checkpoint import check_checkpoint, load_checkpoint
from fms_granite_speech.cli import main as speech_main
from fms_granite_speech.config import get_config
from fms_granite_speech.features import shipped_audio
from fms_granite_speech.testing import build_hf_model, write_hf_checkpoint
from fms_granite_speech.tokenizer_utils import build_test_tokenizer
from parity.cli import main as parity_main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    config = get_config("tiny")
    folder = write_hf_checkpoint(build_hf_model(config, seed=3), tmp_path_factory.mktemp("good") / "ckpt")
    build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index).save_pretrained(folder)
    return folder


def _wrong_shape(folder):
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith("layers.1.self_attn.k_proj.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 4, sd[key].shape[1])
    save_file(sd, str(path))
    return "k_proj"


def _adapter_rank(folder):
    path = folder / "adapter_config.json"
    doc = json.loads(path.read_text())
    doc["r"] = doc["r"] * 2
    path.write_text(json.dumps(doc))
    return "lora"


def _config_width(folder):
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    doc["text_config"]["intermediate_size"] += 8
    path.write_text(json.dumps(doc))
    return "mlp"


@pytest.fixture(params=[_wrong_shape, _adapter_rank, _config_width], ids=["wrong_shape", "adapter_rank",
                                                                             "config_width"])
def broken(request, good, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    return folder, request.param(folder)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_python_api_names_the_tensor_from_the_headers_alone(broken):
    folder, words = broken
    with pytest.raises(ValueError, match="does not fit the model") as err:
        check_checkpoint(folder)
    assert words in str(err.value) and ("shape" in str(err.value) or "expects" in str(err.value))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(folder)


def test_parity_diff_refuses_it_before_building_either_side(broken, tmp_path, capsys):
    folder, words = broken
    assert parity_main(["diff", "--checkpoint", str(folder), "--report-dir", str(tmp_path / "r"), "--quiet"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "does not fit the model" in line and words in line and "ignore_mismatched_sizes" not in line


def test_transcribe_refuses_it_naming_the_tensor(broken, capsys):
    folder, words = broken
    assert speech_main(["transcribe", str(shipped_audio("fox")), "--checkpoint", str(folder), "--no-progress",
                        "--max-new-tokens", "2"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "does not fit the model" in line and words in line, line


def test_the_good_folder_passes_the_header_check(good):
    assert check_checkpoint(good) is None
