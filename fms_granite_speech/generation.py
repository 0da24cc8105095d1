"""Speech-to-text generation with the KV cache: ``fms.utils.generation.generate`` driven for Granite Speech.

``transcribe_ids`` is the token-level entry point (ids in, ids out), ``transcribe`` the user-level one (audio in,
text out). What they add to FMS's generic ``generate``:

* **One way to generate.** FMS's ``generate`` with the model's own hook,
  ``prepare_model_inputs_hook=model.prepare_inputs_for_generation``, and the audio in ``extra_kwargs``: the hook lets
  the prefill step encode and merge the audio of every batch item and drops it afterwards (later steps feed one
  token against the KV cache, so the encoder runs once), and sets the LoRA adapter as HF's
  ``GraniteSpeechForConditionalGeneration.generate`` (transformers 5.17) does: on when ``input_features`` is given,
  off otherwise. The caller's previous adapter state is restored afterwards.
* **Padded batches.** Rows are re-packed left-aligned with ``fms.utils.generation.pad_input_ids``, which gives the
  FMS mask (pad keys hidden from real queries, causal) and position ids (0 for pads, 0.. for real tokens, what HF
  derives from ``attention_mask`` as ``cumsum - 1``); ``generate`` extends both one step at a time.
* **EOS.** A row that has produced ``eos_token_id`` is finished: every later token of it is ``pad_token_id`` (HF's
  rule) and generation stops once every row has finished. FMS 1.13.1's own EOS test cannot be used for batches: it
  ORs a [B] flag with a [B, 1] comparison, broadcasting to [B, B], so for B > 1 it stops as soon as exactly one row
  has ended (and never when two end together). EOS is therefore tracked here, in ``post_iteration_hook``, which
  also ends the loop.

Logits: the FMS model divides logits by ``logits_scaling`` (as Granite 4.x-era HF did); transformers 5.x's Granite
Speech does not. Greedy tokens are unaffected; with sampling, ``temperature`` here applies to FMS's (scaled) logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from fms.utils.generation import generate, pad_input_ids

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_SYSTEM_PROMPT",
    "StepCallback",
    "build_prompt",
    "transcribe",
    "transcribe_ids",
]

# The prompt of the Granite Speech 3.3 model cards (ibm-granite/granite-speech-3.3-2b / -8b).
DEFAULT_SYSTEM_PROMPT = (
    "Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
    "You are Granite, developed by IBM. You are a helpful AI assistant"
)
DEFAULT_INSTRUCTION = "can you transcribe the speech into a written format?"

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(step, logits, tokens)``: step 0-based; logits [B, V] the row scores the tokens were chosen from (FMS
scale, i.e. divided by ``logits_scaling``; also divided by ``temperature`` and top-k filtered when sampling); tokens
int64 [B] the tokens appended at this step (``pad_token_id`` for rows already finished)."""


class _AllRowsFinished(Exception):
    """Raised inside ``post_iteration_hook`` to leave FMS's generation loop once every row has ended."""


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("the model has no parameters; give a GraniteSpeech model")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _left_pack(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows of ``input_ids`` [B, L] without their padding, re-padded on the left with FMS's ``pad_input_ids``.

    Returns ``(ids [B, L'], {"mask": float [B, L', L'] (0 keep / -inf hide), "position_ids": int64 [B, L']})`` with
    L' the longest real row. Accepts left or right padding (any contiguous run of real tokens per row).
    """
    if attention_mask is None:
        rows = list(input_ids)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)};"
                " give the attention_mask the processor returned with these ids"
            )
        real = attention_mask.to(input_ids.device) != 0
        lengths = real.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError(f"attention_mask rows {(lengths == 0).nonzero().flatten().tolist()} have no real token")
        # One contiguous run of real tokens per row: exactly one start (a real token after padding or at 0).
        starts = real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(dim=1)
        if bool((starts != 1).any()):
            bad = (starts != 1).nonzero().flatten().tolist()
            raise ValueError(
                f"attention_mask rows {bad} have padding in the middle; only left or right padding is supported"
            )
        rows = [ids[keep] for ids, keep in zip(input_ids, real)]
    return pad_input_ids(rows, pad_token_id=pad_token_id, padding_side="left")


def _check_prompt(model: torch.nn.Module, input_ids: Any, input_features: Any, input_features_mask: Any, *,
                  max_new_tokens: Any, eos_token_id: Any, pad_token_id: Any):
    """The checks every generator runs before touching the model: its own arguments here, the prompt's tensors by
    ``model.check_inputs`` (the one input check the forward, the merge and the generators share; the generators then
    run the prefill on embeddings, so nothing is checked twice).

    Returns ``(max_new_tokens, input_features, input_features_mask, device)``, the features cast to the model's dtype
    and device, the mask to bool. Raises ``TypeError`` / ``ValueError`` as documented in ``transcribe_ids``.
    """
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    if eos_token_id is not None:
        _check_int("eos_token_id", eos_token_id, 0)
    _check_int("pad_token_id", pad_token_id, 0)
    device, dtype = _model_device_dtype(model)
    if isinstance(input_features, torch.Tensor) and input_features.dtype.is_floating_point:
        input_features = input_features.to(device=device, dtype=dtype)
        if isinstance(input_features_mask, torch.Tensor):
            input_features_mask = input_features_mask.to(device=device, dtype=torch.bool)
    if not callable(getattr(model, "check_inputs", None)):
        raise TypeError(f"{type(model).__name__} has no check_inputs(input_ids, input_features, input_features_mask); "
                        "give a GraniteSpeech model")
    model.check_inputs(input_ids, input_features, input_features_mask)
    return max_new_tokens, input_features, input_features_mask, device


def transcribe_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    input_features: Optional[torch.Tensor] = None,
    input_features_mask: Optional[torch.Tensor] = None,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
    step_callback: Optional[StepCallback] = None,
    forced_tokens: Optional[torch.Tensor] = None,
) -> torch.LongTensor:
    """Generate up to ``max_new_tokens`` tokens per row with FMS's ``generate`` and the KV cache.

    Args:
        model: ``fms_granite_speech.model.GraniteSpeech`` (eval mode), or any module with its forward contract
            ``forward(input_ids, input_features=None, input_features_mask=None, past_key_value_states=None,
            use_cache=False, position_ids=None, last_n_tokens=0, **attn_kwargs)`` returning
            ``(logits [B, L, V], cache)`` with ``use_cache``, and ``has_adapter`` / ``adapter_enabled`` /
            ``set_adapter(bool)`` for its LoRA adapter.
        input_ids: int64 [B, L] prompt tokens, each clip's ``<|audio|>`` run already expanded (the processor does
            this); padded rows need ``attention_mask``.
        input_features: float [B_audio, T, 160] log-mel pairs (T encoder frames of 20 ms), or None for text-only.
            Cast to the model's dtype and device. Encoded once, on the prefill step.
        input_features_mask: bool [B_audio, N] real audio tokens per clip (N the longest clip's token count), or None
            when every clip fills all N.
        attention_mask: [B, L] 1 for real tokens, 0 for padding (left or right); None means no padding.
        max_new_tokens: most tokens to append per row (>= 1).
        do_sample: multinomial sampling instead of greedy argmax.
        temperature: sampling temperature (> 0), applied to FMS's logits (already divided by ``logits_scaling``).
        top_k: sample among the k most likely tokens only (None: all).
        seed: seeds a private copy of torch's RNG for sampling, so a seeded call is reproducible and the global
            RNG state is left as it was.
        eos_token_id: end-of-sequence id, or None to always generate ``max_new_tokens``.
        pad_token_id: id used to left-pad the prompt and to fill rows after their EOS.
        step_callback: called after every step as ``callback(step, logits [B, V], tokens [B])`` (see
            ``StepCallback``); for progress bars and diagnostics.
        forced_tokens: int64 [B, N] teacher forcing, for parity diagnostics: step i appends ``forced_tokens[:, i]``
            instead of the model's choice (the callback still sees the model's logits), for N steps.

    Returns:
        int64 [B, L' + n]: the prompt rows left-aligned (re-padded with ``pad_token_id`` on the left, L' the
        longest real row; equal to ``input_ids`` when it was left-padded or unpadded) followed by the ``n`` generated
        tokens, ``n <= max_new_tokens`` (fewer when every row ended with EOS). On ``input_ids``'s device.

    Raises:
        TypeError: ``input_ids`` is not an integer tensor, features are not a floating tensor.
        ValueError: bad shapes, ``input_features_mask`` without ``input_features``, a features batch or mask that does
            not match the number of ``<|audio|>`` tokens, audio tokens without features, bad sampling settings, or
            padding in the middle of a row.
    """
    # -- validation --------------------------------------------------------------------------------------------------
    if do_sample:
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if top_k is not None:
            _check_int("top_k", top_k, 1)
    if seed is not None:
        _check_int("seed", seed, 0)
    max_new_tokens, input_features, input_features_mask, device = _check_prompt(
        model, input_ids, input_features, input_features_mask, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if forced_tokens is not None:
        if forced_tokens.dim() != 2 or forced_tokens.shape[0] != input_ids.shape[0] or forced_tokens.shape[1] == 0:
            raise ValueError(f"forced_tokens must be [B={input_ids.shape[0]}, N>=1], got {tuple(forced_tokens.shape)}")
        forced_tokens = forced_tokens.to(device=device, dtype=torch.long)
        max_new_tokens = forced_tokens.shape[1]

    out_device = input_ids.device
    ids, padding = _left_pack(input_ids.to(device), attention_mask, pad_token_id)
    batch, prompt_len = ids.shape

    hook = getattr(model, "prepare_inputs_for_generation", None)
    if not callable(hook):
        raise TypeError(f"{type(model).__name__} has no prepare_inputs_for_generation(iteration, input_ids, kwargs); "
                        "give a GraniteSpeech model")

    def prepare(iteration: int, step_ids: torch.Tensor, kwargs: dict):
        step_ids, kwargs = hook(iteration, step_ids, kwargs)
        if iteration == 0:  # the prompt passed check_inputs above: the prefill runs on its embeddings, unchecked
            step_ids = model._embed(step_ids, kwargs.pop("input_features", None),
                                    kwargs.pop("input_features_mask", None))
        return step_ids, kwargs

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    produced: list[torch.Tensor] = []

    def after_step(position: int, logits: torch.Tensor, next_val: torch.Tensor, kwargs: dict):
        step = position - prompt_len
        tokens = next_val[:, 0] if forced_tokens is None else forced_tokens[:, step]
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        if eos_token_id is not None:
            finished.logical_or_(tokens == eos_token_id)
        produced.append(tokens)
        if step_callback is not None:
            step_callback(step, logits, tokens)
        if eos_token_id is not None and bool(finished.all()):
            raise _AllRowsFinished
        return tokens[:, None], kwargs

    # -- run ---------------------------------------------------------------------------------------------------------
    # the model's own hook merges the audio on the prefill step and sets the adapter as HF's generate does (on with
    # audio, off for text-only); the caller's adapter state is restored afterwards
    toggle = bool(getattr(model, "has_adapter", False)) and callable(getattr(model, "set_adapter", None))
    previous = bool(model.adapter_enabled) if toggle else None
    audio = {} if input_features is None else {"input_features": input_features,
                                                "input_features_mask": input_features_mask}
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None)
    with rng, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            generate(
                model,
                ids,
                max_seq_len=prompt_len + max_new_tokens,
                max_new_tokens=max_new_tokens,
                temperature=float(temperature),
                top_k=top_k if do_sample else None,
                do_sample=do_sample,
                use_cache=True,
                eos_token_id=None,  # see the module docstring: EOS is handled in after_step
                prepare_model_inputs_hook=prepare,
                post_iteration_hook=after_step,
                # prefill: the head runs on the last position only; the audio is dropped by the hook after step 0
                extra_kwargs={**padding, **audio, "last_n_tokens": 1},
            )
        except _AllRowsFinished:
            pass
        finally:
            if toggle:
                model.set_adapter(previous)
    return torch.cat([ids, torch.stack(produced, dim=1)], dim=1).to(out_device)


# -- text level -----------------------------------------------------------------------------------------------------


def build_prompt(tokenizer: Any, instruction: str = DEFAULT_INSTRUCTION, audio_token: str = "<|audio|>",
                 system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> str:
    """The Granite chat prompt for one clip: ``instruction`` as the user turn (``audio_token`` put in front of it when
    it has none), then the assistant's turn opened.

    Uses the tokenizer's ``chat_template`` when it has one (with ``system_prompt`` as the system turn, as the model
    cards do); otherwise Granite's layout written out:
    ``<|start_of_role|>user<|end_of_role|>{instruction}<|end_of_text|>\\n<|start_of_role|>assistant<|end_of_role|>``.

    Raises:
        ValueError: ``instruction`` holds more than one ``audio_token`` (one clip per prompt).
    """
    if not isinstance(instruction, str):
        raise TypeError(f"prompt must be a str, got {type(instruction).__name__}")
    count = instruction.count(audio_token)
    if count > 1:
        raise ValueError(f"the prompt holds {count} {audio_token}; transcribe() uses one clip per prompt")
    if count == 0:
        instruction = audio_token + instruction
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": instruction}]
        if system_prompt:
            chat.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return (f"<|start_of_role|>user<|end_of_role|>{instruction}<|end_of_text|>\n"
            "<|start_of_role|>assistant<|end_of_role|>")


AudioClip = Union[str, Path, torch.Tensor, np.ndarray]


def transcribe(
    model: torch.nn.Module,
    processor: Any,
    audio: Union[AudioClip, Sequence[AudioClip]],
    prompt: Optional[str] = None,
    *,
    max_new_tokens: int = 200,
    batch_size: int = 1,
    sampling_rate: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    eos_token_id: Union[int, None, str] = "tokenizer",
    skip_special_tokens: bool = True,
    progress: bool = False,
) -> list[str]:
    """Transcribe (or answer ``prompt`` about) each clip; returns one string per clip, in order.

    Args:
        model: ``GraniteSpeech`` in eval mode.
        processor: ``GraniteSpeechProcessor`` (tokenizer + feature extractor).
        audio: one clip or a list: WAV paths or float waveforms [samples] (tensors or numpy arrays; 16 kHz unless
            ``sampling_rate``).
        prompt: the user instruction (default ``DEFAULT_INSTRUCTION``), wrapped by ``build_prompt``; ``<|audio|>`` is
            put in front when it has none.
        max_new_tokens: most tokens per clip.
        batch_size: clips per forward. Shorter clips of a batch are zero-padded and the encoder attends the padding
            (as HF's does), so a clip's text can depend on its batch-mates; 1 (the default) avoids that.
        do_sample, temperature, top_k, seed: see ``transcribe_ids``.
        eos_token_id: ``"tokenizer"`` (the tokenizer's ``eos_token_id``), an id, or None (never stop early).
        skip_special_tokens: drop special tokens from the text (False shows them, e.g. to see what a random-weight
            model produced).
        progress: show a ``tqdm`` bar on stderr, counting generated tokens across all batches.

    Returns:
        list of str: each clip's generated text up to (not including) EOS, stripped.

    Raises:
        ValueError / TypeError / FileNotFoundError: from the processor for bad audio or prompt, or bad settings.
    """
    single = isinstance(audio, (str, Path)) or (
        isinstance(audio, (torch.Tensor, np.ndarray)) and audio.ndim == 1
    )
    clips = [audio] if single else list(audio)
    if not clips:
        raise ValueError("no audio given; pass a WAV path, a waveform tensor, or a list of them")
    batch_size = _check_int("batch_size", batch_size, 1)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    tokenizer = processor.tokenizer
    if eos_token_id == "tokenizer":
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    elif eos_token_id is not None and not isinstance(eos_token_id, int):
        raise ValueError(f"eos_token_id must be an int, None or 'tokenizer', got {eos_token_id!r}")
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    text = build_prompt(tokenizer, DEFAULT_INSTRUCTION if prompt is None else prompt, processor.audio_token)
    device, _ = _model_device_dtype(model)

    chunks = [clips[i:i + batch_size] for i in range(0, len(clips), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * max_new_tokens, unit="tok", desc=f"transcribing {len(clips)} clip(s)")
    results: list[str] = []
    old_side = getattr(tokenizer, "padding_side", None)
    try:
        if old_side is not None:
            tokenizer.padding_side = "left"
        for chunk in chunks:
            inputs = processor([text] * len(chunk), audio=chunk, sampling_rate=sampling_rate)
            callback = (lambda step, logits, tokens: bar.update(1)) if bar is not None else None
            out = transcribe_ids(
                model, inputs["input_ids"].to(device), inputs["input_features"], inputs["input_features_mask"],
                attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature, top_k=top_k, seed=seed, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, step_callback=callback,
            )
            # transcribe_ids re-packs the prompt to its longest real row (the tokenizer may pad wider, e.g. with
            # pad_to_multiple_of), so the generated tokens start there, not at the processor's width
            prompt_width = int(inputs["attention_mask"].sum(-1).max())
            if bar is not None:
                bar.update(max_new_tokens - (out.shape[1] - prompt_width))
            new = out[:, prompt_width:].tolist()
            for row in new:
                if eos_token_id is not None and eos_token_id in row:
                    row = row[: row.index(eos_token_id)]
                results.append(tokenizer.decode(row, skip_special_tokens=skip_special_tokens).strip())
    finally:
        if old_side is not None:
            tokenizer.padding_side = old_side
        if bar is not None:
            bar.close()
    return results
