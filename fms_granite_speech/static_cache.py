"""Greedy decoding with a preallocated KV cache: a decode step of fixed shapes that compiles to one graph.

FMS's SDPA cache (``sdpa_causal``) grows every step with ``torch.cat``, so each decode step has new shapes and cannot be
captured as one static graph (compiled FMS decode on CPU was 3-7x slower than eager on ``tiny``). Here the cache is
allocated once for the whole generation, ``[B, kv_heads, S, head_dim]`` per layer with ``S`` = prompt + new tokens,
and an attention type registered with FMS (``fms.modules.attention.register_attention_op("static_cache", ...)``)
writes each step's keys and values at ``cache_position`` (``index_copy_``) and attends over all ``S`` slots with a mask
of the ones written so far (and not padding). Every decode step then has the same shapes: token ``[B, 1]``, positions
``[B, 1]``, ``cache_position`` ``[1]``, mask ``[B, 1, S]``; ``torch.compile`` captures it once (``mode="reduce-overhead"``
adds CUDA graphs on a GPU). The step never reads a value on the host: tokens go into a preallocated ``[B, N]`` tensor,
and end-of-sequence is checked every ``check_every`` steps, not every step.

The attention arithmetic is FMS's own SDPA op (``sdpa_causal``'s compute op, given a boolean mask), so the prefill and
each step compute what the eager path computes; greedy tokens are those of ``generation.transcribe_ids`` and of HF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from fms.modules.attention import get_attention_type, register_attention_op

__all__ = ["ATTN_NAME", "StaticCache", "StaticDecoder", "generate_static"]

ATTN_NAME = "static_cache"


def _store(keys, values, key_cache, value_cache, cache_position=None, **attn_kwargs):
    # keys / values: [B, L, kv_heads, head_dim] -> written at cache_position ([L]) of [B, kv_heads, S, head_dim]
    key_cache.index_copy_(2, cache_position, keys.transpose(1, 2))
    value_cache.index_copy_(2, cache_position, values.transpose(1, 2))
    return key_cache, value_cache, key_cache, value_cache


def _compute(query, key_cache, value_cache, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    # FMS's own SDPA compute op, over every slot of the cache, the mask hiding slots not written yet and padding
    return get_attention_type(attn_name="sdpa_causal")["compute_prefill"](
        query, key_cache, value_cache, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs)


register_attention_op(ATTN_NAME, _store, _compute)


@dataclass
class StaticCache:
    """The preallocated cache of one generation: per decoder layer ``(keys, values)`` ``[B, kv_heads, S, head_dim]``,
    and ``written`` ``[B, S]`` (bool): the slots holding a real token's keys (padding never counts)."""

    layers: list
    written: torch.Tensor

    @classmethod
    def allocate(cls, model, batch: int, slots: int) -> "StaticCache":
        """Zeros for ``model``'s decoder (``GraniteSpeech``), ``batch`` rows, ``slots`` positions."""
        d = model.config.decoder
        param = model.decoder.base_model.embedding.weight
        kv_heads = model.decoder.base_model.layers[0].attn.kvheads  # this rank's heads under tensor parallelism
        shape = (batch, kv_heads, slots, d.head_dim)
        layers = [(torch.zeros(shape, dtype=param.dtype, device=param.device),
                   torch.zeros(shape, dtype=param.dtype, device=param.device)) for _ in range(d.nlayers)]
        for k, v in layers:
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
        return cls(layers, torch.zeros(batch, slots, dtype=torch.bool, device=param.device))


class StaticDecoder:
    """One greedy decode step of fixed shapes over a ``StaticCache`` (compiled when asked).

    ``step(tokens [B, 1], positions [B, 1], slot [1])`` writes the tokens' keys and values at ``slot``, marks the slot
    written, and returns the next tokens ``[B]`` (argmax of FMS's logits) and the logits ``[B, V]``.

    Args:
        model: ``GraniteSpeech`` (eval mode).
        cache: the ``StaticCache``.
        compile: compile the step with ``torch.compile(fullgraph=True)``; ``mode`` / ``backend`` as for it
            (``"reduce-overhead"`` on CUDA captures a CUDA graph).
    """

    def __init__(self, model, cache: StaticCache, compile: bool = False, mode: Optional[str] = None,
                 backend: str = "inductor"):
        self.model, self.cache = model, cache
        fn = self._step
        self.step = torch.compile(fn, fullgraph=True, mode=mode, backend=backend) if compile else fn

    def _step(self, tokens, positions, slot):
        cache = self.cache
        cache.written.index_fill_(1, slot, True)
        mask = cache.written[:, None, :]  # [B, 1, S]: attend to every written slot, this one included
        logits, _ = self.model(tokens, position_ids=positions, past_key_value_states=cache.layers, use_cache=True,
                               attn_name=ATTN_NAME, mask=mask, cache_position=slot, last_n_tokens=1)
        logits = logits[:, -1]
        return logits.argmax(dim=-1), logits


def generate_static(model, input_ids: torch.Tensor, input_features: Optional[torch.Tensor] = None,
                    input_features_mask: Optional[torch.Tensor] = None, *, attention_mask: Optional[torch.Tensor] = None,
                    max_new_tokens: int = 32, eos_token_id: Optional[int] = None, pad_token_id: int = 0,
                    compile: bool = False, mode: Optional[str] = None, backend: str = "inductor",
                    check_every: int = 8, decoder: Optional[StaticDecoder] = None,
                    step_callback: Optional[Callable] = None,
                    forced_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy generation with a preallocated KV cache; what ``generation.transcribe_ids`` returns, faster per step.

    The prompt (audio merged, LoRA adapter on for audio and off for text-only, as HF's ``generate``) is prefilled into
    the cache in one eager forward; every further token is one call of a ``StaticDecoder`` step. Rows that produced
    ``eos_token_id`` are padded with ``pad_token_id`` afterwards; the loop ends once every row has ended, checked every
    ``check_every`` steps (the step itself never syncs with the host).

    Args:
        model: ``GraniteSpeech`` (eval mode).
        input_ids: int64 [B, L], each ``<|audio|>`` expanded; attention_mask [B, L] for padded rows (left or right).
        input_features / input_features_mask: the audio, as for ``GraniteSpeech.forward`` (None: text only).
        max_new_tokens: tokens to append (>= 1). eos_token_id: stop id or None. pad_token_id: the padding id.
        compile / mode / backend: compile the decode step (see ``StaticDecoder``).
        check_every: steps between end-of-sequence checks (>= 1).
        decoder: a ``StaticDecoder`` to reuse (its cache must have B rows and at least L' + max_new_tokens - 1 slots),
            e.g. a compiled one across calls; None builds one.
        step_callback: ``callback(step, logits [B, V], tokens [B])`` after each step, as for ``transcribe_ids``
            (reading them on the host syncs: for progress and diagnostics).
        forced_tokens: int64 [B, N] teacher forcing, for parity diagnostics (as in ``transcribe_ids``): step i appends
            ``forced_tokens[:, i]`` instead of the model's choice, for N steps; the callback still sees the model's
            logits, so every step's logits are those of exactly the prefix given.

    Returns:
        int64 [B, L' + n]: the prompt re-packed left-aligned (L' its longest real row) and the ``n`` new tokens.

    Raises:
        TypeError / ValueError: bad prompt or features, as for ``generation.transcribe_ids`` (the same checks run
            first); a generation past the decoder's ``max_expected_seq_len`` positions (L' + max_new_tokens - 1 of
            them: checked before any forward); a ``decoder`` whose cache does not fit this batch.
    """
    from fms_granite_speech.generation import _check_int, _check_prompt, _left_pack

    max_new_tokens, input_features, input_features_mask, device = _check_prompt(
        model, input_ids, input_features, input_features_mask, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    check_every = _check_int("check_every", check_every, 1)
    if forced_tokens is not None:
        if (not isinstance(forced_tokens, torch.Tensor) or forced_tokens.dim() != 2
                or forced_tokens.shape[0] != input_ids.shape[0] or forced_tokens.shape[1] == 0):
            raise ValueError(f"forced_tokens must be [B={input_ids.shape[0]}, N>=1], got "
                             f"{tuple(getattr(forced_tokens, 'shape', ()))}")
        forced_tokens = forced_tokens.to(device=device, dtype=torch.long)
        max_new_tokens = forced_tokens.shape[1]
    ids, padding = _left_pack(input_ids.to(device), attention_mask, pad_token_id)
    batch, length = ids.shape
    # the last new token is returned, never fed back: the prompt and n new tokens occupy L + n - 1 positions
    slots = length + max_new_tokens - 1
    limit = model.config.decoder.max_expected_seq_len
    if slots > limit:
        raise ValueError(f"the prompt ({length} tokens) and max_new_tokens ({max_new_tokens}) reach position {slots} "
                         f"but the decoder has {limit} positions (max_expected_seq_len); shorten the prompt, the "
                         f"audio or max_new_tokens (at most {limit - length + 1} new tokens after this prompt)")
    if decoder is None:
        decoder = StaticDecoder(model, StaticCache.allocate(model, batch, slots), compile=compile, mode=mode,
                                backend=backend)
    cache = decoder.cache
    if cache.written.shape[0] != batch or cache.written.shape[1] < slots:
        raise ValueError(f"the decoder's cache holds {tuple(cache.written.shape)} (rows, slots); this generation "
                         f"needs ({batch}, >= {slots}): build a StaticDecoder for it, or pass decoder=None")
    keep = padding["mask"] == 0  # FMS's prompt mask [B, L, L]: causal, real tokens among themselves, padding alike
    previous = model.adapter_enabled if model.has_adapter else None
    with torch.no_grad():
        if model.has_adapter:
            model.set_adapter(input_features is not None)  # as HF's generate: on with audio, off for text only
        try:
            cache.written.zero_()
            cache.written[:, :length] = keep[:, -1]  # the last position is real in every (left-packed) row
            # [B, L, S]: FMS's own prompt mask over the first L slots, nothing after them
            mask = torch.zeros(batch, length, cache.written.shape[1], dtype=torch.bool, device=device)
            mask[:, :, :length] = keep
            # the prompt passed check_inputs (_check_prompt): the prefill runs on its embeddings, unchecked
            embeds = model._embed(ids, input_features, input_features_mask)
            logits, _ = model(embeds, position_ids=padding["position_ids"], past_key_value_states=cache.layers,
                              use_cache=True, attn_name=ATTN_NAME, mask=mask,
                              cache_position=torch.arange(length, device=device), last_n_tokens=1)
            logits = logits[:, -1]
            tokens = logits.argmax(dim=-1)
            out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            # [B, 1], advanced in place; a fresh tensor, so its strides (guarded by dynamo) never depend on L
            positions = torch.empty(batch, 1, dtype=torch.long, device=device).copy_(padding["position_ids"][:, -1:])
            slot = torch.tensor([length - 1], device=device)  # [1], advanced in place: no host copy per step
            produced = 0
            for step in range(max_new_tokens):
                if forced_tokens is not None:
                    tokens = forced_tokens[:, step]
                tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
                out[:, step] = tokens
                produced = step + 1
                if eos_token_id is not None:
                    finished |= tokens == eos_token_id
                if step_callback is not None:
                    step_callback(step, logits, tokens)
                if step + 1 == max_new_tokens:
                    break
                if eos_token_id is not None and (step + 1) % check_every == 0 and bool(finished.all()):
                    break
                positions += 1
                slot += 1
                tokens, logits = decoder.step(tokens[:, None], positions, slot)
        finally:
            if previous is not None:
                model.set_adapter(previous)
    new = out[:, :produced]
    if eos_token_id is not None:  # trailing steps after every row ended (checked every check_every steps)
        done = (new == eos_token_id).cumsum(dim=1) > 0
        ended = done.all(dim=0)
        if bool(ended.any()):
            new = new[:, : int(ended.nonzero()[0]) + 1]
    return torch.cat([ids, new], dim=1).to(input_ids.device)
