"""Ctrl-C and SIGTERM during ``parity diff``: one line, exit 130 / 143, earlier reports byte-identical, no temporary
file left (the staging folder of the report, the temporary weights of ``--memory sequential``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier") / "report"
    env = dict(os.environ, PARITY_TEST_THREADS="1")
    subprocess.run([sys.executable, "-m", "parity.cli", "diff", "--layer", "encoder.blocks.0", "--report-dir", str(out),
                    "--quiet", "--threads", "1"], check=True, env=env, capture_output=True)
    return out


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("after_s", [1.5, 4.0])
def test_an_interrupted_diff_leaves_everything_as_it_was(earlier_report, tmp_path, sig, code, word, after_s):
    before = _snapshot(earlier_report)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", "diff", "--memory", "sequential", "--report-dir",
                             str(earlier_report), "--json", str(earlier_report / "result.json"), "--quiet",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    time.sleep(after_s)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail(f"the run finished before the signal at {after_s} s; interrupt it earlier")
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "unchanged" in lines[0], lines
    assert _snapshot(earlier_report) == before  # the earlier report is byte-identical, no --json file appeared
    assert list(tmp.iterdir()) == []  # no temporary weights, no staging folder
    leftovers = [p.name for p in earlier_report.parent.iterdir() if p.name != earlier_report.name]
    assert leftovers == []


def test_an_interrupt_a_library_rewraps_is_still_an_interrupt(capsys):
    """transformers' lazy imports turn a Ctrl-C during an import into ModuleNotFoundError("Could not import module
    ..."): the interrupt in the exception's chain decides, not the wrapper's type."""
    from parity._shell import Terminated, interruptible

    def rewrapped(cause):
        def command():
            try:
                raise cause
            except BaseException as err:
                raise ModuleNotFoundError("Could not import module 'PreTrainedModel'") from err
        return command

    assert interruptible("parity diff", rewrapped(KeyboardInterrupt())) == 130
    assert interruptible("parity diff", rewrapped(Terminated())) == 143
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["parity diff: interrupted", "parity diff: terminated"]
    with pytest.raises(ModuleNotFoundError):  # a real import failure is not an interrupt
        interruptible("parity diff", rewrapped(ImportError("no such module")))


def test_an_interrupt_a_finalizer_swallows_still_stops_the_command_before_it_publishes(tmp_path, capsys):
    """Python delivers a signal's exception wherever the main thread is; inside a ``__del__`` it is printed as
    "Exception ignored" and lost, and the command would run on and replace the report. The received signal is kept:
    the report is not published, the exit status is still 130, and stderr holds the one line (a SIGINT 4 s into a
    sequential diff landed in a ``Group.__del__`` in CI and printed a traceback above it)."""
    import gc

    from parity._atomic import staged
    from parity._shell import interruptible

    out = tmp_path / "report"
    out.mkdir()
    (out / "parity-report.md").write_text("earlier\n")

    class InterruptedWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside __del__
            sum(range(10))

    def command():
        InterruptedWhileCollected()
        gc.collect()
        with staged(out, ["parity-report.md"]) as stage:
            (stage / "parity-report.md").write_text("new\n")
        return 0

    assert interruptible("parity diff", command) == 130
    assert (out / "parity-report.md").read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left
    # one line: no "Exception ignored in: ..." traceback from the __del__ above it (the record already holds it)
    assert capsys.readouterr().err.strip().splitlines() == ["parity diff: interrupted"]


def test_one_model_at_a_time_removes_its_temporary_weights_when_the_command_ends(tmp_path, monkeypatch):
    import tempfile

    from parity.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["diff", "--memory", "sequential", "--layer", "decoder.layers.1", "--report-dir",
                 str(tmp_path / "r"), "--quiet", "--threads", "1"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("parity-weights-")]


def test_an_error_after_a_received_signal_is_the_interrupt(capsys):
    """An import that a Ctrl-C cut short fails later as "Could not import module ..." from a RecursionError, with the
    KeyboardInterrupt nowhere in its chain: after a received signal, the command's error is the interrupt's."""
    from parity._shell import interruptible

    def command():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10))
        except KeyboardInterrupt:
            pass  # lost inside a library
        raise ModuleNotFoundError("Could not import module 'PreTrainedModel'") from RecursionError("depth")

    assert interruptible("parity diff", command) == 130
    assert capsys.readouterr().err.strip() == "parity diff: interrupted"
    with pytest.raises(ModuleNotFoundError):  # the record does not outlive the command it answered
        interruptible("parity diff", lambda: (_ for _ in ()).throw(ModuleNotFoundError("no such module")))


@pytest.mark.parametrize("status", [0, 1, 130, 143])
def test_the_console_entry_point_exits_with_the_commands_status(status):
    run = subprocess.run([sys.executable, "-c", f"from parity._shell import exit_with; print('x'); "
                          f"exit_with(lambda: {status})"], capture_output=True, text=True, timeout=60)
    assert run.returncode == status and run.stdout == "x\n"  # output flushed before an immediate exit


def test_an_interrupt_inside_a_finalizer_prints_one_line_and_no_traceback():
    """In a fresh interpreter (pytest replaces ``sys.unraisablehook`` in-process): Python reports an exception it
    cannot propagate from a ``__del__`` as "Exception ignored in: ..." with a traceback; a Ctrl-C landing there (a
    SIGINT 4 s into a sequential diff hit a ``Group.__del__`` in CI) must still answer with the one line."""
    code = "\n".join([
        "import os, signal, sys",
        "from parity._shell import interruptible",
        "class Collected:",
        "    def __del__(self):",
        "        os.kill(os.getpid(), signal.SIGINT)",
        "        sum(range(10))",
        "def command():",
        "    Collected()",
        "    return 0",
        "sys.exit(interruptible('parity diff', command))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["parity diff: interrupted"], proc.stderr
