"""Report folders that always hold one run's complete files, or the previous run's untouched.

A command writes every file of its run into a staging folder next to the report folder (same file system), and only
when all of them are written are they moved into place (``os.replace`` each, the command's stale files of an
earlier run removed). A run that fails before that point leaves the report folder byte-identical. Each command owns
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

__all__ = ["ReportFolderError", "check_writable", "staged"]


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
    """A staging folder for one run's files; on a clean exit they replace ``out_dir``'s, else nothing changes.

    Args:
        out_dir: the report folder (created if needed).
        owned: the file names this command writes; those of an earlier run that this run did not write are removed
            when the new files are published.

    Raises:
        ReportFolderError (a ValueError): the folder cannot be created or written.
    """
    out = check_writable(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent if out.parent else "."))
    except OSError as err:
        raise ReportFolderError(f"cannot write reports to {out}: {err.strerror or err}") from None
    try:
        yield stage
        written = {p.name for p in stage.iterdir()}
        for name in written:
            os.replace(stage / name, out / name)
        for name in set(owned) - written:
            (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
