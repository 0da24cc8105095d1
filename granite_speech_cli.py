"""``granite-speech``: transcribe audio files with Granite Speech on FMS (the command's shell).

    granite-speech transcribe CLIP [MORE ...] --checkpoint DIR [--max-new-tokens N] [--dtype D] [--device D]
    granite-speech transcribe CLIP --variant tiny [--seed N]        (random weights: a smoke test, text meaningless)
    granite-speech transcribe CLIP --variant 5.0-tiny | --checkpoint CTC_DIR   (Granite Speech 5.0: greedy CTC)

This module parses and checks the command line without importing torch (``granite-speech --help`` and usage errors
answer at once: importing ``fms_granite_speech`` registers the model with FMS, which imports torch and FMS, several
seconds); the work is ``fms_granite_speech.cli.run_transcribe``. It lives outside the package for that reason.

Audio: WAV, FLAC or OGG files, any sample rate (resampled to 16 kHz unless ``--no-resample``), mono or multi-channel
(averaged to mono unless ``--no-downmix``). Prints one line per file: the text alone for one file, ``PATH: text`` for
several; a file that cannot be transcribed is named on stderr with the reason, the others are still transcribed.
Exit codes: 0 every file transcribed, 1 a file failed or the run failed (e.g. out of memory), 2 a usage error (a
missing file, a bad option, a folder that is not a checkpoint); errors are one line each, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from parity._shell import OneLineParser, exit_with, interruptible

__all__ = ["main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("tiny", "3.3-2b", "3.3-8b", "tiny-4.0", "4.0-1b", "tiny-4.1", "4.1-2b", "tiny-plus", "4.1-2b-plus")  # fms_granite_speech.config.VARIANTS (tests/test_cli_errors.py checks)
CTC_VARIANTS = ("5.0-tiny", "5.0-470m")  # Granite Speech 5.0 (CTC): fms_granite_speech.cli.CTC_VARIANTS


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="granite-speech", description="IBM Granite Speech 3.3 on FMS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{transcribe}")
    p = sub.add_parser("transcribe", help="transcribe audio files (one line of text per file)",
                       description="Transcribe audio files. Accepted: WAV / FLAC / OGG, any sample rate (resampled "
                                   "to 16 kHz unless --no-resample), mono or multi-channel (averaged to mono unless "
                                   "--no-downmix). Each file is reported on its own: a bad file is named on stderr "
                                   "and the others are still transcribed (exit 1 if any failed).")
    p.add_argument("audio", nargs="+", metavar="CLIP", help="audio file(s): WAV / FLAC / OGG, any sample rate")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="DIR", help="HF Granite Speech checkpoint folder with its tokenizer")
    weights.add_argument("--variant", choices=VARIANTS + CTC_VARIANTS,
                         help="named config with seeded RANDOM weights (e.g. tiny): a smoke test only")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --variant (default 0)")
    p.add_argument("--prompt", default=None, help="instruction for the model (default: transcribe the speech)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens per clip (default 200)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per forward pass (default 1)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--resample", action=argparse.BooleanOptionalAction, default=True,
                   help="resample audio at another rate to 16 kHz (default: yes; --no-resample refuses such files)")
    p.add_argument("--downmix", action=argparse.BooleanOptionalAction, default=True,
                   help="average multi-channel audio to mono (default: yes; --no-downmix refuses such files)")
    p.add_argument("--special-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="show special tokens in the text (default: only with random weights)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="what it is doing on stderr, with a token bar on a terminal (default); --no-progress: quiet")
    return parser


def _check(args) -> None:
    problems = [f"audio file not found: {clip}" for clip in args.audio if not Path(clip).exists()]
    # a path that exists but cannot be transcribed (a folder, an undecodable file) is that file's error
    # (fms_granite_speech.cli): the other files are still transcribed, as --help promises
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint is None and args.variant is None:
        problems.append("give --checkpoint DIR (a Granite Speech folder), or --variant tiny for random weights")
    if args.checkpoint is not None:
        folder = Path(args.checkpoint).expanduser()
        if not folder.is_dir():
            problems.append(f"checkpoint folder not found: {args.checkpoint}" if not folder.exists()
                            else f"--checkpoint {args.checkpoint} is a file, not a checkpoint folder")
        elif not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            problems.append(f"{args.checkpoint} has no tokenizer (tokenizer.json / tokenizer_config.json); copy the "
                            "checkpoint's tokenizer files into the folder")
    device = args.device.split(":")[0]
    if device not in ("cpu", "cuda"):
        problems.append(f"--device {args.device} is not supported; use cpu, cuda or cuda:N")
    if problems:
        raise _UsageError("; ".join(problems))


class _UsageError(Exception):
    """What the user asked for cannot be done: one line on stderr, exit code 2."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its message (or --help)
        return int(exc.code or 0)
    try:
        _check(args)
        from fms_granite_speech.cli import UsageError, run_transcribe

        try:
            return interruptible(f"granite-speech {args.command}", lambda: run_transcribe(args))
        except UsageError as err:
            raise _UsageError(str(err)) from None
    except _UsageError as err:
        print(f"granite-speech {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:  # torch failures (out of memory, device errors): still one line
        text = str(err).strip()
        print(f"granite-speech {args.command}: failed: {text.splitlines()[0] if text else type(err).__name__}",
              file=sys.stderr)
        return EXIT_FAIL


def run() -> None:
    """The ``granite-speech`` console command: ``main()``'s status as the process's (``parity._shell.exit_with``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
