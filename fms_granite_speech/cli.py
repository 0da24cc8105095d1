"""The work of ``granite-speech transcribe``: load the model, check each file, transcribe the good ones.

The command line itself (parser, checks that need no torch, exit codes) is ``granite_speech_cli`` at the top of the
repository, so that ``granite-speech --help`` answers without importing torch; ``main`` here is the same function.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from granite_speech_cli import EXIT_FAIL, EXIT_OK, main

__all__ = ["UsageError", "main", "run_transcribe"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """What the user asked for cannot be done (a bad checkpoint, an unusable tokenizer): exit code 2."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"bad --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available here; use --device cpu")
    return device


def _load_checkpoint(folder: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) from a checkpoint folder; the tokenizer with transformers' AutoTokenizer, local files only."""
    from transformers import AutoTokenizer

    from fms_granite_speech.checkpoint import load_checkpoint

    path = Path(folder).expanduser()
    try:
        model = load_checkpoint(path, dtype=dtype, device=device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"cannot load checkpoint {folder}: {_one_line(err)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot load the tokenizer of {folder}: {_one_line(err)}") from None
    return model, tokenizer


def _random_model(variant: str, seed: int, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) with seeded realistic random weights, converted from the HF reference by the FMS adapter."""
    from fms.utils.serialization import load_state_dict_into_model

    from fms_granite_speech.config import get_config
    from fms_granite_speech.model import GraniteSpeech
    from fms_granite_speech.testing import build_hf_model
    from fms_granite_speech.tokenizer_utils import build_test_tokenizer

    config = get_config(variant)
    hf = build_hf_model(config, seed=seed, dtype=dtype)
    with torch.device("meta"):
        model = GraniteSpeech(config)
    load_state_dict_into_model(model, dict(hf.state_dict()), "granite_speech", "hf")
    model.post_init()
    del hf
    tokenizer = build_test_tokenizer(config.decoder.src_vocab_size, config.audio_token_index)
    return model.to(device=device).eval(), tokenizer


def _check_file(extractor, path: str) -> Optional[str]:
    """Why ``path`` cannot be transcribed (read, decoded and checked as the feature extractor would), or None."""
    from pathlib import Path

    if not Path(path).exists():
        return f"audio file not found: {path}"
    if not Path(path).is_file():
        return f"{path} is a folder, not an audio file"
    try:
        extractor([path])
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        message = _one_line(err)
        return message if path in message else f"{path}: {message}"
    return None


def run_transcribe(args) -> int:
    """``granite-speech transcribe`` after its command line was checked (see ``granite_speech_cli``).

    Returns the exit code: 0 when every file was transcribed, 1 when a file failed (named on stderr with its reason;
    the others are printed). Raises ``UsageError`` for a checkpoint or tokenizer that cannot be used.
    """
    from fms_granite_speech.features import GraniteSpeechFeatureExtractor
    from fms_granite_speech.generation import transcribe
    from fms_granite_speech.processor import GraniteSpeechProcessor

    dtype, device = _DTYPES[args.dtype], _device(args.device)
    bar = sys.stderr.isatty() if args.progress is None else args.progress  # the token bar: a terminal, or asked

    def say(message: str) -> None:  # what it is doing, on stderr, unless --no-progress
        if args.progress is not False:
            print(f"granite-speech transcribe: {message}", file=sys.stderr, flush=True)

    say("loading the model")
    if args.checkpoint is not None:
        model, tokenizer = _load_checkpoint(args.checkpoint, dtype, device)
    else:
        model, tokenizer = _random_model(args.variant, args.seed, dtype, device)
        print(f"# random weights (variant {args.variant}, seed {args.seed}): the text below is meaningless "
              "(special tokens shown)")
    extractor = GraniteSpeechFeatureExtractor(resample=args.resample, downmix=args.downmix)
    try:
        processor = GraniteSpeechProcessor(tokenizer, feature_extractor=extractor)
    except (TypeError, ValueError) as err:
        raise UsageError(f"unusable tokenizer: {_one_line(err)}") from None
    if processor.audio_token_id != model.config.audio_token_index:
        raise UsageError(f"the tokenizer maps {processor.audio_token} to id {processor.audio_token_id} but the model "
                         f"expects audio_token_index={model.config.audio_token_index}; use the checkpoint's tokenizer")

    say(f"checking {len(args.audio)} file(s)")
    problems = {clip: _check_file(extractor, clip) for clip in args.audio}
    good = [clip for clip in args.audio if problems[clip] is None]
    texts: dict[str, str] = {}
    if good:
        say(f"transcribing {len(good)} file(s)")
        special = args.checkpoint is None if args.special_tokens is None else args.special_tokens
        try:
            outputs = transcribe(model, processor, good, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, progress=bar, skip_special_tokens=not special)
        except (ValueError, TypeError) as err:  # the prompt or settings (the files were checked one by one above)
            raise UsageError(_one_line(err)) from None
        texts = dict(zip(good, outputs))
    for clip in args.audio:
        if clip in texts:
            print(texts[clip] if len(args.audio) == 1 else f"{clip}: {texts[clip]}", flush=True)
        else:
            print(f"granite-speech transcribe: error: {problems[clip]}", file=sys.stderr, flush=True)
    return EXIT_OK if len(good) == len(args.audio) else EXIT_FAIL
