"""What both command lines (``parity``, ``granite-speech``) share, with the standard library only (they answer
``--help`` and usage errors without importing torch): a one-line argparse, and interrupts as one line.

* ``OneLineParser``: argparse whose usage errors are one line (``PROG: error: MESSAGE; see PROG --help``), exit 2.
* ``interruptible(prog)``: run a command with SIGTERM raised as ``Terminated`` (so every ``finally`` runs: staging
  folders and temporary weight folders are removed, reports already published stay as they were) and Ctrl-C /
  SIGTERM answered with one line on stderr and exit status 130 (SIGINT) or 143 (SIGTERM), the shell's convention
  (128 + the signal number), instead of a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "OneLineParser", "Terminated", "error_line", "first_line",
           "interruptible",
           "block_signals", "exit_with", "raise_if_interrupted", "restore_signals", "signals_deferred"]

EXIT_INTERRUPTED = 128 + signal.SIGINT   # 130
EXIT_TERMINATED = 128 + signal.SIGTERM   # 143


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a one-line usage error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_line(err: BaseException) -> str:
    """``Type: first line`` of an exception (at most 400 characters) for a one-line verdict; for one without a message
    (a bare ``assert``), the file, line and source line where it was raised instead."""
    lines = str(err).strip().splitlines()
    if lines:
        return f"{type(err).__name__}: {lines[0][:400]}"
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return type(err).__name__
    last = frames[-1]
    where = "/".join(Path(last.filename).parts[-3:])
    return f"{type(err).__name__} at {where}:{last.lineno}: {(last.line or '').strip()[:300]}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``PROG: error: MESSAGE; see PROG --help``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class Terminated(BaseException):
    """SIGTERM, raised where the process was, so cleanup runs as for Ctrl-C (a ``BaseException``: no ``except
    Exception`` of the engine swallows it)."""


# The signals received while ``interruptible`` runs a command. Python delivers a signal's exception wherever the main
# thread is, a garbage collector's ``__del__`` included, where it is printed as "Exception ignored" and lost: the
# record keeps it, so the command still stops before it publishes (``raise_if_interrupted``) and exits 130 / 143.
_RECEIVED: list[int] = []


def _interrupt(signum: int) -> BaseException:
    """The exception a signal stands for: ``Terminated`` for SIGTERM, ``KeyboardInterrupt`` for SIGINT."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _raise_interrupt(signum, frame):
    _RECEIVED.append(signum)
    raise _interrupt(signum)


def raise_if_interrupted() -> None:
    """Raise the interrupt a signal already delivered (even one an ``__del__`` swallowed): called before anything
    is published, so an interrupted command never replaces an earlier report."""
    if _RECEIVED:
        raise _interrupt(_RECEIVED[-1])


def block_signals():
    """Hold SIGINT and SIGTERM back (a signal received meanwhile is delivered by ``restore_signals``); returns what
    ``restore_signals`` takes. A no-op off the main thread or without ``pthread_sigmask``."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def restore_signals(previous) -> None:
    """Undo ``block_signals``: a signal held back is delivered here."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the duration (a folder removed whole); one received meanwhile is delivered
    when the block ends."""
    previous = block_signals()
    try:
        yield
    finally:
        restore_signals(previous)


def _quiet_interrupts(previous):
    """A ``sys.unraisablehook`` that drops the interrupts this module raises where Python cannot propagate them (a
    ``__del__``, a weakref callback: "Exception ignored in ..." and a traceback on stderr, under the command's one
    line): ``_RECEIVED`` already holds them. Anything else goes to the ``previous`` hook."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)) and _RECEIVED:
            return
        previous(unraisable)
    return hook


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread only
        yield
        return
    _RECEIVED.clear()
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_interrupts(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interruptible(prog: str, command: Callable[[], int], unchanged: str = "") -> int:
    """``command()``'s exit status, or one line and 130 / 143 when it is interrupted (Ctrl-C) or terminated.

    Args:
        prog: the program and sub-command (``parity diff``), the start of the line.
        command: runs the command; returns its exit status.
        unchanged: what the line promises was left as it was (``"; the earlier report is unchanged"``).
    """
    try:
        with _sigterm_raises():
            status = command()
            raise_if_interrupted()  # a signal an __del__ swallowed: still an interrupt
            return status
    except BaseException as err:  # noqa: BLE001 -- anything else is re-raised unchanged
        cause = _interrupt_in(err)
        if cause is None and _RECEIVED:
            # an error after a received signal is its doing: an import the interrupt cut short fails later with
            # "Could not import module ..." from a RecursionError, with the KeyboardInterrupt nowhere in its chain
            cause = _interrupt(_RECEIVED[-1])
        if cause is None:
            raise
        if isinstance(cause, Terminated):
            print(f"{prog}: terminated{unchanged}", file=sys.stderr)
            return EXIT_TERMINATED
        print(f"{prog}: interrupted{unchanged}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _RECEIVED.clear()  # answered here: nothing later re-raises it


def exit_with(main: Callable[[], int]) -> None:
    """The console entry point around ``main``: exit with its status. After an interrupt (130 / 143) the process ends
    at once (``os._exit``, output flushed first): its command has already removed its temporary files and left the
    earlier reports as they were, and a normal interpreter exit can turn the answered Ctrl-C into death by SIGINT
    (CPython marks a KeyboardInterrupt raised inside C-level ``PyRun_String`` code, as torch's import runs, as
    unhandled even when Python code caught it: exit status -2 instead of 130)."""
    import os

    status = main()
    if status in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    sys.exit(status)


def _interrupt_in(err: BaseException):
    """The ``KeyboardInterrupt`` / ``Terminated`` that ``err`` is, or that caused it: a library that catches the
    interrupt and raises its own error from it (transformers' lazy imports turn one into "Could not import module
    ...") is still an interrupt. None when there is none in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (KeyboardInterrupt, Terminated)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
