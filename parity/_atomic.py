"""Report folders that always hold one run's complete files, or the previous run's untouched.

A command writes every file of its run into a staging folder next to the report folder (same file system), and only
when all of them are written does the staging folder become the report folder, in one rename (``staged``). A run
that fails before that point leaves the report folder byte-identical. Single files (``--json PATH``, the thresholds)
are written to a temporary name and renamed over the old one (``write_atomic``). Each command owns
its file names (``parity diff``: ``parity-report.*``; ``parity check``: the suite, the verdict and ``junit.xml``), so
two commands can share one folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Union

from parity._shell import block_signals, raise_if_interrupted, restore_signals, signals_deferred

__all__ = ["ReportFolderError", "check_writable", "stage_file", "staged", "write_atomic"]


class ReportFolderError(ValueError):
    """The report folder cannot be used (a file in its place, no permission); the message names it and the fix."""


def check_writable(out_dir: Union[str, Path]) -> Path:
    """``out_dir`` as a ``Path`` if it is, or can become, a writable folder (checked before any work is done).

    Raises:
        ReportFolderError (a ValueError): ``out_dir`` or one of its parents is a file, or it cannot be created or
            written (the OS reason is given).
    """
    out = Path(out_dir)
    for part in [out, *out.parents]:
        if part.exists() and not part.is_dir():
            raise ReportFolderError(f"cannot write reports to {out}: {part} is a file, not a folder; give another "
                                    "folder")
        if part.exists():
            break
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReportFolderError(f"cannot write reports to {out}: {existing} is not writable; give another folder")
    return out


@contextlib.contextmanager
def staged(out_dir: Union[str, Path], owned: Iterable[str]) -> Iterator[Path]:
    """A staging folder for one run's files; on a clean exit it becomes ``out_dir`` in one rename, else nothing changes.

    Publishing: every entry of the current ``out_dir`` that this run neither wrote nor owns (another command's files,
    anything a user keeps there) is hard-linked into the staging folder (a sub-folder is moved), then the current
    folder is renamed aside, the staging folder renamed to ``out_dir``, and the old one removed. A reader, or a second
    writer, therefore sees one run's files or the other's, never a mix; files this command owns but did not write
    this run are not carried over (a stale plot of an earlier run does not sit beside new results). A run that fails
    or is interrupted before publishing leaves ``out_dir`` byte-identical and removes its staging folder.

    Args:
        out_dir: the report folder (created if needed).
        owned: the file names this command writes.

    Raises:
        ReportFolderError (a ValueError): the folder cannot be created or written.
    """
    out = check_writable(out_dir)
    parent = out.parent if str(out.parent) else Path(".")
    held = block_signals()  # a signal waits until the staging folder is under the finally below
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=parent))
    except OSError as err:
        restore_signals(held)
        raise ReportFolderError(f"cannot write reports to {out}: {err.strerror or err}") from None
    try:
        restore_signals(held)
        yield stage
        raise_if_interrupted()  # an interrupt swallowed by an __del__ still leaves the earlier report as it was
        _publish(stage, out, set(owned))
    finally:
        with signals_deferred():  # removed whole: a signal waits until rmtree is done
            shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: Path, owned: set) -> None:
    for _ in range(5):  # another writer may publish between our two renames: carry its folder's extras, try again
        moved = []
        if out.is_dir():
            written = {p.name for p in stage.iterdir()}
            for entry in out.iterdir():
                if entry.name in written or entry.name in owned:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    os.rename(entry, stage / entry.name)
                    moved.append(entry.name)
                else:
                    os.link(entry, stage / entry.name, follow_symlinks=False)
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=stage.parent))
            os.rmdir(aside)
            try:
                os.rename(out, aside)
            except FileNotFoundError:  # the other writer renamed it first
                aside = None
        else:
            aside = None
        try:
            os.rename(stage, out)
        except OSError:  # a folder appeared at `out` meanwhile: put things back and go round again
            if aside is not None and not out.exists():
                os.rename(aside, out)
            for name in moved:
                if out.is_dir() and not (out / name).exists():
                    os.rename(stage / name, out / name)
            continue
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return
    raise ReportFolderError(f"cannot publish the report to {out}: other runs keep replacing it; run one at a time")


def stage_file(path: Union[str, Path], text: str) -> Path:
    """``text`` written (and flushed to disk) to a temporary file beside ``path``; ``os.replace`` it over ``path`` to
    publish, or unlink it to abandon. A full disk raises here, before anything that exists is touched.

    Raises:
        OSError: the folder cannot be written, or the disk is full (no temporary file is left).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder renamed over it: a full disk or an
    interrupt leaves the earlier file whole (never truncated) and no temporary file behind.

    Raises:
        OSError: the folder cannot be written, the disk is full (the earlier file is untouched).
    """
    tmp = stage_file(path, text)
    try:
        raise_if_interrupted()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)
