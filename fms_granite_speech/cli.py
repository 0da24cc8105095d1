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


# granite-speech transcribe --variant names of Granite Speech 5.0 (fms_granite_speech.speech5.VARIANTS)
CTC_VARIANTS = {"5.0-tiny": "tiny", "5.0-470m": "5.0-470m"}


def _is_ctc_folder(folder: str) -> bool:
    import json
    from pathlib import Path

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "granite_speech5_ctc"
    except (OSError, ValueError, AttributeError):
        return False  # the Granite Speech loader says what is wrong with the folder


def _ctc_model(args, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer or None) of Granite Speech 5.0: a folder (its tokenizer when it ships one), or seeded random
    weights converted from transformers' model by the FMS adapter (no tokenizer: token ids are printed)."""
    from fms_granite_speech import speech5

    if args.checkpoint is not None:
        try:
            model = speech5.get_model(model_path=args.checkpoint)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise UsageError(f"cannot load {args.checkpoint}: {_one_line(err)}") from None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(args.checkpoint), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise UsageError(f"cannot load the tokenizer of {args.checkpoint}: {_one_line(err)}") from None
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    import transformers
    from fms.utils.serialization import load_state_dict_into_model

    from fms_granite_speech.testing import realistic_init_

    config = speech5.VARIANTS[CTC_VARIANTS[args.variant]]
    torch.manual_seed(args.seed)
    hf = realistic_init_(transformers.GraniteSpeech5ForCTC(config.to_hf()), args.seed).eval()
    with torch.device("meta"):
        model = speech5.GraniteSpeech5(config)
    model.to_empty(device="cpu")
    load_state_dict_into_model(model, dict(hf.state_dict()), speech5.ARCHITECTURE, "hf")
    model.post_init()
    return model.to(device=device, dtype=dtype).eval(), None


def _run_ctc(args, dtype: torch.dtype, device: torch.device, say) -> int:
    """Granite Speech 5.0: each file read and checked as for the other models (resampling and down-mixing as asked),
    its 80-bin features, the CTC logits, greedy CTC decoding (``speech5.ctc_greedy``), the tokenizer's text."""
    from fms_granite_speech import speech5
    from fms_granite_speech.features import GraniteSpeechFeatureExtractor

    say("loading the model")
    model, tokenizer = _ctc_model(args, dtype, device)
    if tokenizer is None:
        print(f"# random weights (variant {args.variant}, seed {args.seed}): CTC token ids, no tokenizer")
    reader = GraniteSpeechFeatureExtractor(resample=args.resample, downmix=args.downmix)
    extractor = speech5.GraniteSpeech5FeatureExtractor(num_mel_bins=model.config.num_mel_bins)
    failed = 0
    for clip in args.audio:
        try:
            problem = _check_file(reader, clip)
            if problem is not None:
                raise ValueError(problem)
            ((wave, rate, name),) = reader._split(clip, None)
            feats = extractor([reader._mono(wave, rate, name)])
            with torch.no_grad():
                logits = model(feats["input_features"].to(device=device, dtype=dtype),
                               attention_mask=feats["attention_mask"].to(device))
            lengths = speech5.output_lengths(feats["attention_mask"].sum(1), model.config)
            (ids,) = speech5.ctc_greedy(logits, model.config.blank_id, lengths)
            text = tokenizer.decode(ids) if tokenizer is not None else " ".join(f"<{i}>" for i in ids)
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
            failed += 1
            message = _one_line(err)
            print(f"granite-speech transcribe: error: {message if clip in message else f'{clip}: {message}'}",
                  file=sys.stderr, flush=True)
            continue
        print(text if len(args.audio) == 1 else f"{clip}: {text}", flush=True)
    return EXIT_FAIL if failed else EXIT_OK


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

    if args.variant in CTC_VARIANTS or (args.checkpoint is not None and _is_ctc_folder(args.checkpoint)):
        return _run_ctc(args, dtype, device, say)
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
