"""Bad input never gives a traceback or a silent answer, through every interface that reaches it: ``parity``,
``granite-speech`` and the Python API. Each class of bad input gets one clear line naming the file or argument and the
fix, exit 2 (exit 1 where it is a verdict); a failed run leaves an earlier report byte-identical; and the commands
answer at once (no torch import for ``--help``, ``parity map`` or a usage error).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from fms.models import get_model as fms_get_model

import fms_granite_speech as fgs
from fms_granite_speech.config import get_config
from fms_granite_speech.features import GraniteSpeechFeatureExtractor, load_wav, shipped_audio
from fms_granite_speech.testing import build_hf_model, write_hf_checkpoint
from fms_granite_speech.tokenizer_utils import build_test_tokenizer
from granite_speech_cli import main as speech_main
from parity.cli import main as parity_main

ROOT = Path(__file__).resolve().parent.parent


def _one_error(err: str) -> str:
    """The single error line of stderr (progress lines aside); fails on a traceback or on several errors."""
    errors = [line for line in err.strip().splitlines() if ": error: " in line or ": failed: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A good tiny checkpoint folder with its tokenizer: copies of it are broken one way each."""
    config = get_config("tiny")
    out = write_hf_checkpoint(build_hf_model(config, seed=2), tmp_path_factory.mktemp("good"))
    build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index).save_pretrained(out)
    return out


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _loaders(path: Path):
    """Every loader of the project, each as a callable that loads ``path``."""
    return {
        "load_checkpoint": lambda: fgs.load_checkpoint(path),
        "fms_granite_speech.get_model": lambda: fgs.get_model("tiny", model_path=path),
        "get_model(hf_pretrained)": lambda: fms_get_model("hf_pretrained", model_path=str(path)),
    }


def _through_every_interface(path: Path, expect: str, capsys) -> None:
    for name, load in _loaders(path).items():
        with pytest.raises(ValueError, match=expect):
            load()
    clip = str(shipped_audio("fox"))
    assert speech_main(["transcribe", clip, "--checkpoint", str(path), "--no-progress"]) == 2
    assert expect_in(_one_error(capsys.readouterr().err), expect)
    assert parity_main(["diff", "--layer", "encoder.blocks.0", "--checkpoint", str(path), "--quiet"]) == 2
    assert expect_in(_one_error(capsys.readouterr().err), expect)


def expect_in(line: str, pattern: str) -> bool:
    import re

    return re.search(pattern, line) is not None


# -- broken files ---------------------------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_named(folder, tmp_path, capsys):
    broken = _copy(folder, tmp_path, "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _through_every_interface(broken, r"model\.safetensors is truncated", capsys)


def test_a_garbage_safetensors_header_is_named(folder, tmp_path, capsys):
    broken = _copy(folder, tmp_path, "garbage")
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (broken / "model.safetensors").write_bytes(bytes(data))
    _through_every_interface(broken, r"model\.safetensors has a damaged safetensors header", capsys)


def test_a_folder_with_only_a_pickle_is_refused_before_any_load(folder, tmp_path, capsys):
    pickled = _copy(folder, tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_config.json").unlink()
    _through_every_interface(pickled, r"only pickled weights \(pytorch_model\.bin\).*never loaded", capsys)


def test_a_folder_with_two_weight_sets_is_refused_everywhere(folder, tmp_path, capsys):
    mixed = _copy(folder, tmp_path, "mixed")
    sharded = tmp_path / "sharded"
    write_hf_checkpoint(build_hf_model(get_config("tiny"), seed=9), sharded, max_shard_size="100KB")
    for f in sharded.glob("model*.safetensors*"):
        shutil.copy(f, mixed / f.name)  # an index with its shards beside the single model.safetensors
    _through_every_interface(mixed, r"two weight sets", capsys)


# -- prompts, reports, thresholds, folders -------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_decoder_positions(capsys):
    long = "please " * 1100  # tiny's decoder has 1024 positions
    clip = str(shipped_audio("fox"))
    assert speech_main(["transcribe", clip, "--variant", "tiny", "--prompt", long, "--no-progress"]) == 2
    assert "1024 positions" in _one_error(capsys.readouterr().err)
    assert parity_main(["diff", "--prompt", "<|audio|> " + long, "--quiet"]) == 2
    assert "1024 positions" in _one_error(capsys.readouterr().err)
    model = fgs.GraniteSpeech(get_config("tiny"))
    with pytest.raises(ValueError, match="1024 positions"):
        model(torch.ones(1, 1100, dtype=torch.long))


def test_report_folder_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv in (["check", "--out", str(blocker / "out")], ["diff", "--report-dir", str(blocker / "out")],
                 ["report", str(tmp_path / "none.json"), "--out", str(blocker)]):
        assert parity_main(argv) == 2
        line = _one_error(capsys.readouterr().err)
        assert "a-file" in line, line


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    assert parity_main(["diff", "--layer", "encoder.blocks.1", "--report-dir", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("damage", ["layers_null", "layer_without_diff", "not_json", "a_list"])
def test_a_report_json_that_is_not_a_parity_result(saved, tmp_path, capsys, damage):
    doc = json.loads((saved / "parity-report.json").read_text())
    bad = tmp_path / "bad.json"
    if damage == "layers_null":
        doc["layers"] = None
        bad.write_text(json.dumps(doc))
    elif damage == "layer_without_diff":
        del doc["layers"][3]["diff"]
        bad.write_text(json.dumps(doc))
    elif damage == "not_json":
        bad.write_text("{not json")
    else:
        bad.write_text("[1, 2]")
    for argv in (["recheck", str(bad), "--report-dir", str(tmp_path / "r")], ["report", str(bad)]):
        assert parity_main(argv) == 2
        assert "not a parity result" in _one_error(capsys.readouterr().err)


def test_recheck_of_a_layer_without_statistics(saved, tmp_path, capsys):
    doc = json.loads((saved / "parity-report.json").read_text())
    row = next(r for r in doc["layers"] if r["pair"]["name"] == "encoder.blocks.1.conv")
    row["diff"], row["error"] = None, "module ran 1 time(s) in HF but 0 time(s) in FMS"
    bad = tmp_path / "bare.json"
    bad.write_text(json.dumps(doc))
    assert parity_main(["recheck", str(bad), "--layer", "encoder.blocks.1.conv"]) == 2
    assert "no statistics to re-judge" in _one_error(capsys.readouterr().err)
    # without --layer it is said too, and the layer stays failed
    assert parity_main(["recheck", str(bad), "--report-dir", str(tmp_path / "re")]) == 1
    assert "not re-judged (no statistics, still failed): encoder.blocks.1.conv" in capsys.readouterr().out


@pytest.mark.parametrize("value", ['"1e-5"', "null", "-1", "true", '{"x": 1}'])
def test_thresholds_of_the_wrong_type_are_refused_before_the_suite_runs(tmp_path, capsys, monkeypatch, value):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    doc = json.loads((ROOT / "parity" / "thresholds.json").read_text())
    doc["groups"]["tiny/float32"]["logits"]["bound"] = json.loads(value)
    bad = tmp_path / "thresholds.json"
    bad.write_text(json.dumps(doc))
    assert parity_main(["check", "--thresholds", str(bad), "--out", str(tmp_path / "o")]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "groups['tiny/float32']['logits'].bound" in line and "finite number" in line
    assert calls == []  # nothing was run


# -- audio arrays and files -------------------------------------------------------------------------------------------


def test_stereo_array_in_soundfile_layout_and_int16_scale_floats():
    wave = load_wav(shipped_audio("fox"))[0][0].numpy()
    stereo = np.stack([wave, wave], axis=1)  # soundfile's [samples, channels]
    with pytest.raises(ValueError, match=r"\[samples, channels\] layout.*downmix=True"):
        GraniteSpeechFeatureExtractor()(stereo)
    mixed = GraniteSpeechFeatureExtractor(downmix=True)(stereo)
    assert mixed.input_features.shape[0] == 1
    assert torch.equal(mixed.input_features, GraniteSpeechFeatureExtractor()(wave).input_features)
    with pytest.raises(ValueError, match="peaks at .* divide by 32768"):
        GraniteSpeechFeatureExtractor()(wave * 32767)


def _write(path: Path, rate: int, channels: int = 1) -> Path:
    import torchaudio

    wave = load_wav(shipped_audio("fox"))[0]
    if rate != 16000:
        wave = torchaudio.functional.resample(wave, 16000, rate)
    data = wave.repeat(channels, 1).T.numpy()
    soundfile.write(str(path), data, rate, subtype="PCM_16")
    return path


def test_transcribe_reports_each_file_and_accepts_what_help_promises(tmp_path, capsys):
    good = [str(_write(tmp_path / "8k.wav", 8000)), str(_write(tmp_path / "44k.wav", 44100)),
            str(_write(tmp_path / "stereo.wav", 16000, channels=2)), str(shipped_audio("fox"))]
    silence = tmp_path / "empty.wav"
    soundfile.write(str(silence), np.zeros((0, 1), dtype="float32"), 16000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    argv = ["transcribe", *good[:2], str(garbage), *good[2:], str(silence), "--variant", "tiny",
            "--max-new-tokens", "3", "--no-progress"]
    assert speech_main(argv) == 1  # two files failed
    captured = capsys.readouterr()
    printed = [line for line in captured.out.splitlines() if not line.startswith("#")]
    assert [line.split(":")[0] for line in printed] == good  # every good file transcribed, in order
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 2 and str(garbage) in errors[0] and str(silence) in errors[1]
    assert "Traceback" not in captured.err
    # what --help promises is kept: other rates are resampled, stereo is averaged; --no-resample refuses, by name
    assert speech_main(["transcribe", good[0], "--variant", "tiny", "--no-resample", "--no-progress"]) == 1
    line = _one_error(capsys.readouterr().err)
    assert good[0] in line and "8000 Hz" in line and "resample" in line


def test_several_bad_arguments_are_reported_together(capsys):
    assert parity_main(["diff", "--layer", "encoder.blocks.99", "--audio", "/no/such.wav", "--threads", "0"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "encoder.blocks.0 .. encoder.blocks.15" in line and "/no/such.wav" in line and "--threads" in line
    assert speech_main(["transcribe", "/no/a.wav", "/no/b.wav", "--max-new-tokens", "0"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "/no/a.wav" in line and "/no/b.wav" in line and "--max-new-tokens" in line and "--checkpoint" in line


# -- reports are written atomically --------------------------------------------------------------------------------------


def test_a_failed_report_write_leaves_the_previous_report_byte_identical(saved, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    shutil.copytree(saved, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import parity.report

    def broken_plot(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parity.report, "plot_depth", broken_plot)
    assert parity_main(["diff", "--layer", "encoder.blocks.2", "--report-dir", str(out), "--quiet"]) == 2
    assert "No space left on device" in _one_error(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert parity_main(["report", str(out / "parity-report.json")]) == 2
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- start-up ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["parity", "--help"], ["parity", "map"], ["granite-speech", "--help"],
                                  ["parity", "diff", "--layer", "encoder.blocks.99"],
                                  ["granite-speech", "transcribe", "/no/such.wav"]])
def test_help_map_and_usage_errors_import_no_torch(argv):
    module = {"parity": "parity.cli", "granite-speech": "granite_speech_cli"}[argv[0]]
    code = (f"import sys, io, contextlib; from {module} import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    rc = main({argv[1:]!r})\n"
            "print(rc, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    rc, imported = run.stdout.split()
    assert imported == "False", (argv, run.stderr)
    assert rc == ("0" if argv[-1] in ("--help", "map") else "2")


def test_the_shell_knows_every_variant():
    from fms_granite_speech.config import VARIANTS
    from granite_speech_cli import VARIANTS as NAMES

    assert set(NAMES) == set(VARIANTS)


@pytest.mark.parametrize("argv, named", [
    (["parity", "diff", "--bogus"], "--bogus"),
    (["parity", "diff", "--dtype", "float8"], "float8"),
    (["parity"], "required"),
    (["granite-speech", "transcribe", "CLIP", "--variant", "huge"], "huge"),
    (["granite-speech", "transcribe", "CLIP", "--max-new-tokens", "ten"], "ten"),
])
def test_argparse_errors_are_one_line_naming_the_option(argv, named, capsys):
    from granite_speech_cli import main as speech_main

    main = {"parity": parity_main, "granite-speech": speech_main}[argv[0]]
    assert main(argv[1:]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], captured.err
    assert captured.out == ""
    assert named in lines[0], lines[0]


@pytest.mark.parametrize("field, value", [("provenance", "variant tiny"), ("inputs", [1, 2]), ("requested", "x")])
def test_a_report_with_a_malformed_field_is_one_line_for_report_and_recheck(tmp_path, capsys, field, value):
    assert parity_main(["diff", "--layer", "encoder.input_linear", "--report-dir", str(tmp_path / "r"), "--quiet"]) == 0
    capsys.readouterr()
    path = tmp_path / "r" / "parity-report.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    for argv in (["report", str(path), "--out", str(tmp_path / "out")], ["recheck", str(path)]):
        assert parity_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"'{field}' is a JSON" in err[0] and "not a parity result" in err[0], err


def test_a_folder_among_the_clips_is_that_files_error_and_the_others_are_transcribed(tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    clip = str(shipped_audio("fox"))
    assert speech_main(["transcribe", clip, str(folder), clip, "--variant", "tiny", "--max-new-tokens", "3",
                        "--no-progress"]) == 1
    captured = capsys.readouterr()
    printed = [line for line in captured.out.splitlines() if not line.startswith("#")]
    assert [line.split(":")[0] for line in printed] == [clip, clip]
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(folder) in errors[0] and "is a folder, not an audio file" in errors[0]


def test_a_truncated_wav_is_refused_through_every_interface(tmp_path, capsys):
    from fms_granite_speech.features import load_wav

    whole = tmp_path / "whole.wav"
    soundfile.write(str(whole), (0.1 * np.random.default_rng(0).standard_normal(16000)).astype("float32"), 16000,
                    subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:16000])
    assert load_wav(whole)[0].shape == (1, 16000)
    with pytest.raises(ValueError, match="is truncated: its WAV header declares 32000 bytes"):
        load_wav(cut)
    assert parity_main(["diff", "--layer", "encoder.blocks.0", "--audio", str(cut), "--report-dir",
                        str(tmp_path / "r"), "--quiet"]) == 2
    assert "is truncated" in _one_error(capsys.readouterr().err)
    assert speech_main(["transcribe", str(cut), "--variant", "tiny", "--no-progress", "--max-new-tokens", "2"]) == 1
    assert "is truncated" in capsys.readouterr().err
