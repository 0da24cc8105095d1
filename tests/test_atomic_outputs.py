"""Nothing half-written: a full disk under the report, the ``--json`` file or the temporary weights of
``--memory sequential`` leaves every earlier output byte-identical and no temporary file; two writers on one report
folder leave one run's complete files, never a mix; the baseline's destination is checked before the suite runs."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from parity.cli import main


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def earlier(tmp_path):
    out, js = tmp_path / "report", tmp_path / "result.json"
    assert main(["diff", "--layer", "encoder.input_linear", "--report-dir", str(out), "--json", str(js),
                 "--quiet"]) == 0
    return out, js


def _no_leftovers(tmp_path: Path):
    left = [p.name for p in tmp_path.rglob(".*")]
    assert left == [], left


def test_a_full_disk_while_the_report_is_written(earlier, tmp_path, monkeypatch, capsys):
    out, js = earlier
    before, before_json = _snapshot(out), js.read_bytes()
    capsys.readouterr()
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if ".staging-" in str(self.parent):
            _full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert main(["diff", "--layer", "encoder.blocks.0", "--report-dir", str(out), "--json", str(js), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left" in err[0], err
    assert _snapshot(out) == before and js.read_bytes() == before_json
    _no_leftovers(tmp_path)


def test_a_full_disk_while_the_json_is_written(earlier, tmp_path, monkeypatch, capsys):
    out, js = earlier
    before, before_json = _snapshot(out), js.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr("parity._atomic.os.fsync", _full)
    assert main(["diff", "--layer", "encoder.blocks.0", "--report-dir", str(out), "--json", str(js), "--quiet"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert _snapshot(out) == before and js.read_bytes() == before_json  # never truncated, the report not replaced
    _no_leftovers(tmp_path)
    assert main(["generate", "--max-new-tokens", "2", "--json", str(js), "--quiet"]) == 2  # generate's --json too
    assert js.read_bytes() == before_json
    _no_leftovers(tmp_path)


def test_a_full_disk_under_the_temporary_weights(earlier, tmp_path, monkeypatch, capsys):
    out, js = earlier
    before = _snapshot(out)
    weights = tmp_path / "tmpdir"
    weights.mkdir()
    monkeypatch.setenv("TMPDIR", str(weights))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr("safetensors.torch.save_file", _full)
    capsys.readouterr()
    assert main(["diff", "--memory", "sequential", "--report-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temporary weights" in err[0] and "TMPDIR" in err[0], err
    assert list(weights.iterdir()) == [] and _snapshot(out) == before


def test_too_little_temporary_space_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert main(["diff", "--memory", "sequential", "--report-dir", str(tmp_path / "r"), "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert "--memory sequential writes the HF weights" in line and "1000" not in line and "GiB free" in line


def test_an_unwritable_baseline_path_is_refused_before_the_suite(tmp_path, capsys):
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    assert main(["check", "--update-baseline", "--thresholds", str(not_a_folder / "t.json"), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2  # at once: no suite ran (that takes a minute)
    line = capsys.readouterr().err.strip()
    assert "cannot write the baseline" in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_two_writers_on_one_report_folder_leave_one_runs_files(tmp_path):
    out = tmp_path / "shared"
    runs = [subprocess.Popen([sys.executable, "-m", "parity.cli", "diff", "--layer", layer, "--report-dir", str(out),
                              "--quiet", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for layer in ("encoder.blocks.0", "decoder.layers.0")]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    report = json.loads((out / "parity-report.json").read_text())
    md = (out / "parity-report.md").read_text()
    assert report["command"] in md  # the Markdown and the JSON come from the same run
    other = "decoder.layers.0" if "encoder.blocks.0" in report["command"] else "encoder.blocks.0"
    assert other not in report["command"]
    assert sorted(p.name for p in out.iterdir()) == ["parity-report.json", "parity-report.md", "parity-report.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no staging or previous folder left
