"""``granite-speech``: transcribe WAV files with Granite Speech on FMS.

    granite-speech transcribe CLIP.wav [MORE.wav ...] --checkpoint DIR [--max-new-tokens N] [--dtype D] [--device D]
    granite-speech transcribe CLIP.wav --variant tiny [--seed N]        (random weights: a smoke test, text meaningless)

Prints one line per clip: the text alone for one clip, ``PATH: text`` for several. A checkpoint folder is an HF
Granite Speech folder (config.json, safetensors, optional peft adapter) with its tokenizer files; nothing is ever
downloaded. Exit codes: 0 done, 1 the run failed (e.g. out of memory), 2 a usage error (missing file, bad option,
a folder that is not a checkpoint); errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _UsageError(Exception):
    """What the user asked for cannot be done: one line on stderr, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-speech", description="IBM Granite Speech 3.3 on FMS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{transcribe}")
    p = sub.add_parser("transcribe", help="transcribe audio files (one line of text per clip)")
    p.add_argument("audio", nargs="+", metavar="CLIP", help="audio file(s): WAV / FLAC / OGG, any sample rate")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="DIR", help="HF Granite Speech checkpoint folder with its tokenizer")
    weights.add_argument("--variant", help="named config with seeded RANDOM weights (e.g. tiny): a smoke test only")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --variant (default 0)")
    p.add_argument("--prompt", default=None, help="instruction for the model (default: transcribe the speech)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens per clip (default 200)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per forward pass (default 1)")
    p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES), help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--special-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="show special tokens in the text (default: only with random weights)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="token progress bar on stderr (default: when stderr is a terminal)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its message (or --help)
        return int(exc.code or 0)
    try:
        return _transcribe(args)
    except _UsageError as err:
        print(f"granite-speech {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:  # torch failures (out of memory, device errors): still one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"granite-speech {args.command}: failed: {first}", file=sys.stderr)
        return EXIT_FAIL


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise _UsageError(f"bad --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"--device {name} requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise _UsageError(f"--device {name} is not supported; use cpu or cuda")
    return device


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_checkpoint(folder: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) from a checkpoint folder; the tokenizer with transformers' AutoTokenizer, local files only."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise _UsageError(f"checkpoint folder not found: {folder}")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise _UsageError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json); copy the "
                          "checkpoint's tokenizer files into the folder")
    from transformers import AutoTokenizer

    from fms_granite_speech.checkpoint import load_checkpoint

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise _UsageError(f"cannot load the tokenizer of {folder}: {_one_line(err)}") from None
    try:
        model = load_checkpoint(path, dtype=dtype, device=device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _UsageError(f"cannot load checkpoint {folder}: {_one_line(err)}") from None
    return model, tokenizer


def _random_model(variant: str, seed: int, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) with seeded realistic random weights, converted from the HF reference by the FMS adapter."""
    from fms.utils.serialization import load_state_dict_into_model

    from fms_granite_speech.config import get_config
    from fms_granite_speech.model import GraniteSpeech
    from fms_granite_speech.testing import build_hf_model
    from fms_granite_speech.tokenizer_utils import build_test_tokenizer

    try:
        config = get_config(variant)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    hf = build_hf_model(config, seed=seed)
    model = GraniteSpeech(config)
    load_state_dict_into_model(model, dict(hf.state_dict()), "granite_speech", "hf")
    model.post_init()
    del hf
    tokenizer = build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _transcribe(args) -> int:
    for clip in args.audio:
        if not Path(clip).is_file():
            raise _UsageError(f"audio file not found: {clip}")
    if args.max_new_tokens < 1:
        raise _UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise _UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint is None and args.variant is None:
        raise _UsageError("give --checkpoint DIR (a Granite Speech folder), or --variant tiny for random weights")
    dtype, device = _DTYPES[args.dtype], _device(args.device)

    from fms_granite_speech.generation import transcribe
    from fms_granite_speech.processor import GraniteSpeechProcessor

    if args.checkpoint is not None:
        model, tokenizer = _load_checkpoint(args.checkpoint, dtype, device)
    else:
        model, tokenizer = _random_model(args.variant, args.seed, dtype, device)
        print(f"# random weights (variant {args.variant}, seed {args.seed}): the text below is meaningless "
              "(special tokens shown)")
    try:
        processor = GraniteSpeechProcessor(tokenizer)
    except (TypeError, ValueError) as err:
        raise _UsageError(f"unusable tokenizer: {_one_line(err)}") from None
    if processor.audio_token_id != model.config.audio_token_index:
        raise _UsageError(f"the tokenizer maps {processor.audio_token} to id {processor.audio_token_id} but the model "
                          f"expects audio_token_index={model.config.audio_token_index}; use the checkpoint's tokenizer")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        texts = transcribe(model, processor, list(args.audio), prompt=args.prompt,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress,
                           skip_special_tokens=not (args.checkpoint is None if args.special_tokens is None
                                                    else args.special_tokens))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _UsageError(_one_line(err)) from None
    for clip, text in zip(args.audio, texts):
        print(text if len(args.audio) == 1 else f"{clip}: {text}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
