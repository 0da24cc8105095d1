"""The project's own input checks answer before transformers' processor is reached, through every interface.

A regression suite for one class of bad input (clips too short to extract, a placeholder count that does not match
the clips): ``parity.inputs.build_inputs`` once called transformers' ``GraniteSpeechProcessor`` first, which answered
with ``RuntimeError: cannot reshape ...``, ``StopIteration`` or ``ArrayRef: invalid slice``. Each case must give the
project's one-line message through the Python API, ``parity diff`` and ``parity generate`` (exit 2).
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from parity.cli import main
from parity.inputs import build_inputs

CLIPS = {  # samples -> the words the project's message carries
    0: "empty",
    1: "too short",
    160: "too short",
}
PROMPTS = {
    "USER: <|audio|> <|audio|> what is said? ASSISTANT:": "2 <|audio|> placeholder",
    "USER: what is said? ASSISTANT:": "no <|audio|> placeholder",
}


def _wav(tmp_path, samples: int):
    path = tmp_path / f"clip_{samples}.wav"
    rng = np.random.default_rng(samples)
    sf.write(path, (0.1 * rng.standard_normal(samples)).astype(np.float32), 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize("same_inputs", [False, True])
@pytest.mark.parametrize("samples", list(CLIPS))
def test_short_clips_get_the_projects_message_from_the_python_api(pair, samples, same_inputs):
    wave = 0.1 * torch.randn(samples)
    with pytest.raises(ValueError, match=CLIPS[samples]):
        build_inputs(pair, audio=[wave], same_inputs=same_inputs)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_placeholder_mismatches_get_the_projects_message_from_the_python_api(pair, prompt):
    with pytest.raises(ValueError, match=PROMPTS[prompt]):
        build_inputs(pair, prompt=prompt)


@pytest.mark.parametrize("command", [["diff", "--layer", "encoder.blocks.0"], ["generate", "--max-new-tokens", "2"]])
@pytest.mark.parametrize("samples", list(CLIPS))
def test_short_clips_are_one_line_through_the_cli(tmp_path, capsys, command, samples):
    argv = command + ["--audio", str(_wav(tmp_path, samples)), "--quiet"]
    if command[0] == "diff":
        argv += ["--report-dir", str(tmp_path / "report")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CLIPS[samples] in err[0], err


@pytest.mark.parametrize("command", [["diff", "--layer", "encoder.blocks.0"], ["generate", "--max-new-tokens", "2"]])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_placeholder_mismatches_are_one_line_through_the_cli(tmp_path, capsys, command, prompt):
    argv = command + ["--prompt", prompt, "--quiet"]
    if command[0] == "diff":
        argv += ["--report-dir", str(tmp_path / "report")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and PROMPTS[prompt] in err[0], err
