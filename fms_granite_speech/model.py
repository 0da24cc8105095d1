"""Granite Speech 3.3 on the Foundation Model Stack: Conformer encoder -> Q-Former projector -> FMS Granite decoder.

This file is the model only, read top to bottom: the module ``GraniteSpeech`` (composition, the audio merge, the
forward pass, the hook FMS's ``generate`` calls) and its LoRA switch. Named variants, ``register_model`` and the HF
checkpoint adapter steps live in ``fms_granite_speech.registration``; the LoRA table and merge in
``fms_granite_speech.lora``.

Shapes: B = batch, L = tokens, T = encoder frames (20 ms each), N = audio tokens per clip (10 per second of audio),
D = decoder width (``emb_dim``), V = vocabulary.

The forward pass follows transformers' ``GraniteSpeechForConditionalGeneration`` (``models/granite_speech/
modeling_granite_speech.py``, v5.17): audio-token ids are replaced by 0 and embedded, the audio embeddings are
written at the ``<|audio|>`` positions of every batch item (``masked_scatter`` order, keeping only the tokens
``input_features_mask`` marks real), and the decoder multiplies all input embeddings (audio included) by
``embedding_multiplier`` once (FMS's ``GraniteHeadless`` does this for passed-in embeddings too). One deliberate
difference: FMS's Granite divides logits by ``logits_scaling``; transformers 5.x ``GraniteSpeechForConditionalGeneration``
does not (it returns ``lm_head`` output as is), so ``fms_logits * logits_scaling == hf_logits``.
"""

from typing import Any, MutableMapping, Optional

import torch
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy, NotDistributed, TensorParallelStrategy
from fms.models.granite import Granite
from torch import nn

from fms_granite_speech.config import GraniteSpeechConfig, get_config
from fms_granite_speech.conformer import ConformerEncoder
from fms_granite_speech.lora import DecoderLoRA, LoRASite, check_lora_config, lora_sites
from fms_granite_speech.projector import QFormerProjector

__all__ = ["GraniteSpeech"]


class GraniteSpeech(nn.Module):
    """Granite Speech: ``encoder`` (Conformer) -> ``projector`` (Q-Former) -> ``decoder`` (FMS ``Granite``).

    Submodules: ``encoder`` (``ConformerEncoder``), ``projector`` (``QFormerProjector`` with ``out_dim = emb_dim``),
    ``decoder`` (``fms.models.granite.Granite``, unchanged: ``decoder.base_model.embedding / .layers.{i} /
    .dec_norm``, ``decoder.head``) and, when ``config.lora`` is set, ``lora`` (``lora.layers.{i}.{target}.A/.B``).

    Build on the meta device and fill from a checkpoint with ``fms.models.get_model("granite_speech", variant,
    model_path=DIR, source="hf")``, ``fms_granite_speech.get_model`` (the same, refusing folders FMS would load
    wrongly) or ``fms_granite_speech.checkpoint.load_checkpoint(DIR)``; all call ``post_init``, which checks that
    every tensor was loaded and merges the LoRA adapter.

    Args:
        config: the whole model's ``GraniteSpeechConfig`` (default: the 3.3-2b architecture). Never modified: the
            model keeps ``config.updated(**kwargs)``, a copy.
        distributed_strategy: FMS's ``NoOpStrategy``, or a ``TensorParallelStrategy`` (the decoder is sharded by
            FMS's own Granite; encoder and projector are replicated on every rank).
        **kwargs: config fields to override (FMS convention: ``GraniteSpeech(config, fused_weights=False)``; a dict
            updates a nested config, ``decoder={"nlayers": 2}``).

    Raises:
        TypeError: ``config`` is not a ``GraniteSpeechConfig``, or an unknown config field in ``kwargs``.
        ValueError: a LoRA target this port cannot merge, or a distributed strategy other than no-op / tensor
            parallel.
    """

    def __init__(
        self,
        config: Optional[GraniteSpeechConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        config = get_config("3.3-2b") if config is None else config
        if not isinstance(config, GraniteSpeechConfig):
            raise TypeError(f"GraniteSpeech needs a GraniteSpeechConfig, got {type(config).__name__}")
        if not isinstance(distributed_strategy, (NotDistributed, TensorParallelStrategy)):
            raise ValueError(
                f"GraniteSpeech supports FMS's no-op and tensor-parallel strategies, not "
                f"{type(distributed_strategy).__name__}; use get_model(..., distributed_strategy='tp') or none"
            )
        self.config = config.updated(**kwargs)  # always a copy: the caller's config is never shared or changed
        if not self.config.fused_weights:
            self.config.decoder.fused_weights = False
        check_lora_config(self.config)
        self.distributed_strategy = distributed_strategy
        self.encoder = ConformerEncoder(self.config.encoder)
        self.projector = QFormerProjector(self.config.projector, self.config.decoder.emb_dim)
        self.decoder = Granite(self.config.decoder, distributed_strategy)
        if self.config.decoder.tie_heads:
            # FMS ties in post_init (after loading); tying here too makes parameter counts right on the meta device.
            self.decoder.head.weight = self.decoder.base_model.embedding.weight
        if self.config.lora is not None:
            self.lora = DecoderLoRA(self.config)
            # A state dict always holds the UN-merged decoder weights next to lora.*: what a checkpoint holds, so a
            # save/load round trip followed by post_init merges exactly once.
            self.register_state_dict_post_hook(_state_dict_with_base_rows)
            self.register_load_state_dict_post_hook(_forget_merge_after_load)
        self._adapter_enabled: Optional[bool] = None  # None until post_init has merged the adapter

    @classmethod
    def from_config(cls, config: GraniteSpeechConfig) -> "GraniteSpeech":
        return cls(config)

    def get_config(self) -> GraniteSpeechConfig:
        return self.config

    def reset_parameters(self):
        """Random weights for every part (FMS's ``get_model`` calls this when no checkpoint is given)."""
        self.encoder.reset_parameters()
        self.projector.reset_parameters()
        self.decoder.reset_parameters()
        if self.config.lora is not None:
            self.lora.reset_parameters()
        self._adapter_enabled = None

    # -- after loading ---------------------------------------------------------------------------------------------

    def post_init(self):
        """Finish a model filled from a checkpoint: rebuild buffers, tie, check coverage, merge LoRA, ``eval()``.

        Runs ``encoder.post_init()`` (attention distance table) and ``decoder.post_init()`` (head tying, RoPE
        tables), then checks that no parameter or persistent buffer is still on the meta device (FMS's loader would
        otherwise leave ``empty_like`` garbage silently), then snapshots the base rows of every LoRA-adapted weight
        and merges the adapter (enabled, as HF after ``from_pretrained``). Sets eval mode: the Conformer's
        BatchNorm must use its running statistics. Calling it again is safe (the base rows are restored first).
        A model entirely on the meta device (``get_model(..., device_type="meta")``) is left as is.

        The snapshot costs one extra copy of every adapted row: for the released q/v adapter, 0.39 GiB (2b) and
        1.56 GiB (8b) in bf16. ``state_dict()`` returns the base rows (un-merged), and ``load_state_dict`` forgets
        the merge, so ``load_state_dict(sd); post_init()`` merges the adapter exactly once.

        Raises:
            ValueError: tensors that no checkpoint key filled; the message lists them.
        """
        if self._adapter_enabled is not None:
            self.set_adapter(False)  # re-snapshot from the true base rows, never from merged ones
        self.encoder.post_init()
        self.decoder.post_init()
        if all(p.is_meta for p in self.parameters()):
            return  # built on the meta device on purpose (shapes only): nothing was loaded, nothing to check
        self._check_coverage()
        if self.config.lora is not None:
            for site in self.lora_sites():
                site.pair.base = site.weight.detach()[site.rows].clone()
            self._adapter_enabled = False
            self.set_adapter(True)
        self.eval()

    def _check_coverage(self):
        missing = [n for n, p in self.named_parameters(remove_duplicate=False) if p.is_meta]
        for module_name, module in self.named_modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_meta:
                    kind = "" if name not in module._non_persistent_buffers_set else " (non-persistent buffer)"
                    missing.append(f"{module_name}.{name}{kind}")
        if not missing:
            return
        shown = ", ".join(missing[:40]) + (f", ... and {len(missing) - 40} more" if len(missing) > 40 else "")
        hint = ""
        if any(m.startswith("lora.") for m in missing):
            hint = (
                " The LoRA adapter was not loaded: the checkpoint folder has no adapter_model.safetensors (peft "
                "format); build the model with lora=None to run without it."
            )
        raise ValueError(
            f"{len(missing)} model tensors were not filled by the checkpoint (still on the meta device; FMS would "
            f"leave them uninitialised): {shown}.{hint}"
        )

    # -- LoRA ----------------------------------------------------------------------------------------------------

    @property
    def has_adapter(self) -> bool:
        """True when the model carries a LoRA adapter (``config.lora`` set)."""
        return self.config.lora is not None

    @property
    def adapter_enabled(self) -> bool:
        """True when the LoRA adapter is merged into the decoder weights (False without an adapter)."""
        return bool(self._adapter_enabled)

    def lora_sites(self) -> list[LoRASite]:
        """Every LoRA-adapted decoder weight as the decoder holds it now (fused, unfused or sharded); see
        ``fms_granite_speech.lora.lora_sites``. Empty without an adapter."""
        if self.config.lora is None:
            return []
        return list(lora_sites(self.config, self.decoder.base_model.layers, self.lora))

    def set_adapter(self, enabled: bool) -> None:
        """Merge (``True``) or remove (``False``) the LoRA adapter in the decoder weights, exactly.

        Disabling copies back the base rows saved by ``post_init``; enabling writes
        ``base + (alpha / r) * B @ A`` computed in float32 from those same rows (then cast to the weight dtype), so
        any on/off sequence gives bit-identical weights for each state. Works on fused and unfused decoder weights
        (``fused_weights=False``, or after ``fms.utils.fusion.apply_unfuse_weights``) and on a tensor-parallel
        shard. ``forward`` never calls this; HF's ``generate`` (and ``prepare_inputs_for_generation`` here) enables
        the adapter when audio is given and disables it for text-only prompts.

        Raises:
            ValueError: ``enabled=True`` on a model without an adapter, or before ``post_init``.
            TypeError: ``enabled`` is not a bool.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"set_adapter(enabled) takes a bool, got {type(enabled).__name__}")
        if self.config.lora is None:
            if enabled:
                raise ValueError("this model has no LoRA adapter (config.lora is None); nothing to enable")
            return
        if self._adapter_enabled is None:
            raise ValueError("set_adapter needs the base weights saved by post_init(); call model.post_init() first")
        if enabled == self._adapter_enabled:
            return
        scale = self.config.lora.scaling
        with torch.no_grad():
            for site in self.lora_sites():
                base = site.pair.base
                if enabled:
                    site.weight[site.rows] = (base.to(torch.float32) + site.delta(scale)).to(site.weight.dtype)
                else:
                    site.weight[site.rows] = base
        self._adapter_enabled = enabled

    # -- audio ---------------------------------------------------------------------------------------------------

    def get_audio_embeddings(self, input_features: torch.Tensor) -> torch.Tensor:
        """Audio-token embeddings: encoder then projector.

        Args:
            input_features: float [B, T, 160] stacked log-mel frames (T encoder frames of 20 ms), e.g. from the
                feature extractor; cast to the encoder's dtype.

        Returns:
            [B, N, D] with ``N = ceil(T / window_size) * window_size // downsample_rate`` (before the decoder's
            ``embedding_multiplier``).

        Raises:
            TypeError / ValueError: from the encoder when ``input_features`` is not a float [B, T, 160] tensor.
        """
        if isinstance(input_features, torch.Tensor) and input_features.is_floating_point():
            input_features = input_features.to(self.encoder.input_linear.weight.dtype)
        return self.projector(self.encoder(input_features))

    def merge_audio_embeddings(
        self,
        input_ids: torch.Tensor,
        text_embeds: torch.Tensor,
        audio_embeds: torch.Tensor,
        input_features_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Write the real audio embeddings, in order, at the ``<|audio|>`` positions of every batch item.

        HF's ``masked_scatter(is_audio, audio[input_features_mask])``, computed with static shapes (a cumulative
        count and a gather instead of boolean indexing), so it compiles into one graph whatever the clip lengths:
        the k-th ``<|audio|>`` position in row-major [B, L] order takes the k-th token the mask marks real, in
        row-major [B_audio, N] order. The counts must agree: checked here on the real tensors in eager mode, and by
        ``check_inputs`` before any compiled code (a compiled graph trusts them).

        Raises:
            ValueError: (eager) a mask whose shape is not the audio's [B_audio, N], or a number of ``<|audio|>``
                positions that differs from the number of real audio tokens.

        Args:
            input_ids: int64 [B, L]; text_embeds: [B, L, D] (audio positions' values are replaced).
            audio_embeds: [B_audio, N, D] from ``get_audio_embeddings``.
            input_features_mask: bool [B_audio, N] (True = real token), or None (all N tokens of every clip).

        Returns:
            [B, L, D] in ``text_embeds``' dtype.
        """
        b, length, dim = text_embeds.shape
        if not torch.compiler.is_compiling():
            if self.__dict__.get("_merge_checked", False) and input_features_mask is not None:
                # from forward / embed_inputs / the generators, check_inputs has counted the <|audio|> positions
                # against the mask once; what it cannot know is the projector's actual output: its shape (metadata,
                # no host sync) against the mask's
                _check_merge_shapes(audio_embeds, input_features_mask)
            else:
                _check_merge(input_ids == self.config.audio_token_index, audio_embeds, input_features_mask)
        is_audio = (input_ids == self.config.audio_token_index).reshape(-1)  # [B*L]
        audio = audio_embeds.reshape(-1, audio_embeds.shape[-1]).to(device=text_embeds.device, dtype=text_embeds.dtype)
        count = audio.shape[0]
        if input_features_mask is None:
            source = torch.arange(count, device=audio.device)
        else:
            real = input_features_mask.reshape(-1).to(audio.device)
            rank = real.long().cumsum(0) - 1  # rank of each real token among the real ones
            slot = torch.where(real, rank, torch.full_like(rank, count))  # padded tokens go to a spare slot
            source = torch.zeros(count + 1, dtype=torch.long, device=audio.device).scatter(
                0, slot, torch.arange(count, device=audio.device))
        position_rank = (is_audio.long().cumsum(0) - 1).clamp(0, count)
        picked = audio[source[position_rank].clamp(max=count - 1)]  # [B*L, D]
        merged = torch.where(is_audio[:, None], picked, text_embeds.reshape(-1, dim))
        return merged.reshape(b, length, dim)

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        past_key_value_states: Optional[list] = None,
        position_ids: Optional[torch.Tensor] = None,
        static_cache: bool = False,
    ) -> None:
        """Everything about the inputs that needs host values (run eagerly, never inside a compiled graph).

        ``forward`` calls it unless dynamo is tracing; ``fms_granite_speech.compile.compile_model(model,
        whole=True)`` calls it before the compiled forward. Checks: ids are an integer [B, L] tensor inside the
        vocabulary (prompts only: a decode step stays free of host syncs), the mask is bool and the shape the audio
        gives, the ``<|audio|>`` count equals the number of real audio tokens, and the sequence fits the decoder's
        ``max_expected_seq_len`` positions. With ``static_cache`` (a preallocated cache written at a
        ``cache_position``, ``static_cache.generate_static``) the cache's size is its slot count, not the tokens
        held, so the position check is left to that generator, which checks its whole generation up front.

        Raises:
            TypeError: ids not an integer tensor (bool included), features not floating, a non-bool mask.
            ValueError: bad shapes, ids outside the vocabulary, an ``<|audio|>`` count that differs from the
                number of audio embeddings (both counts in the message), audio tokens without features, or a
                sequence longer than the decoder's positions.
        """
        if (not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex()
                or input_ids.dtype == torch.bool):
            raise TypeError("input_ids must be an integer torch.Tensor [B, L] of token ids, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must have shape [B, L] with B, L >= 1, got {tuple(input_ids.shape)}; add a "
                             "batch dimension with unsqueeze(0)")
        d = self.config.decoder
        past = 0
        if past_key_value_states and not static_cache:
            first = past_key_value_states[0]
            if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
                past = int(first[0].shape[2])
        last = past + input_ids.shape[1]  # position ids never exceed it (padded rows count from 0): no host sync
        if last > d.max_expected_seq_len and not static_cache:
            raise ValueError(f"the sequence reaches position {last} ({input_ids.shape[1]} tokens after {past} cached)"
                             f" but the decoder has {d.max_expected_seq_len} positions (max_expected_seq_len); "
                             "shorten the prompt, the audio or max_new_tokens")
        if input_ids.shape[1] > 1:  # prompts only: a decode step (L = 1) stays free of this host sync
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= d.src_vocab_size:
                raise ValueError(f"input_ids hold ids in [{lo}, {hi}] but the decoder vocabulary is "
                                 f"[0, {d.src_vocab_size - 1}]; the tokenizer does not belong to this checkpoint")
        audio_id = self.config.audio_token_index
        if input_features is None:
            if input_features_mask is not None:
                raise ValueError("input_features_mask was given without input_features; pass both or neither")
            if past == 0 and input_ids.shape[1] > 1 and bool((input_ids == audio_id).any()):
                raise ValueError(f"input_ids hold {int((input_ids == audio_id).sum())} <|audio|> tokens (id "
                                 f"{audio_id}) but no input_features were given; pass the clips' features, or drop "
                                 "<|audio|> for a text-only prompt")
            return
        if not isinstance(input_features, torch.Tensor) or not input_features.is_floating_point():
            raise TypeError("input_features must be a floating tensor [B_audio, T, 160] (from the feature "
                            f"extractor), got {getattr(input_features, 'dtype', type(input_features).__name__)}")
        if input_features.dim() != 3 or 0 in input_features.shape:
            raise ValueError(f"input_features must be [B_audio, T >= 1, {self.config.encoder.input_dim}], got "
                             f"{tuple(input_features.shape)}")
        tokens = self.projector.num_tokens(input_features.shape[1])
        if input_features_mask is not None:
            if not isinstance(input_features_mask, torch.Tensor) or input_features_mask.dtype != torch.bool:
                raise TypeError("input_features_mask must be a bool tensor [B_audio, N] (True = real audio token), "
                                f"got {getattr(input_features_mask, 'dtype', type(input_features_mask).__name__)}")
            if tuple(input_features_mask.shape) != (input_features.shape[0], tokens):
                raise ValueError(f"input_features_mask has shape {tuple(input_features_mask.shape)} but the audio "
                                 f"gives {(input_features.shape[0], tokens)} (clips, tokens per clip); pass the mask "
                                 "from the same feature extraction call as input_features")
            real = int(input_features_mask.sum())
        else:
            real = input_features.shape[0] * tokens
        n = int((input_ids == audio_id).sum())
        if n == 0 and real and past == 0:  # a prompt without <|audio|> (a later step with features: see below)
            raise ValueError(f"the prompt has 0 <|audio|> tokens (id {audio_id}) but the audio gives {real} audio "
                             "embeddings: input_features were given but input_ids hold no audio token; put <|audio|> "
                             "in the prompt and expand it with GraniteSpeechProcessor")
        if n != real:
            raise ValueError(f"the prompt has {n} <|audio|> tokens (id {audio_id}) but the audio gives {real} audio "
                             "embeddings; expand each <|audio|> to its clip's token count with the processor, and "
                             "use prepare_model_inputs_hook=model.prepare_inputs_for_generation with FMS generate")

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decoder input embeddings [B, L, D] with audio merged (not yet multiplied by ``embedding_multiplier``).

        Audio-token ids are replaced by 0 before the embedding lookup (as HF does); with ``input_features`` the
        audio embeddings (``get_audio_embeddings``) are merged by ``merge_audio_embeddings``. A prompt may hold
        several clips, and batch sizes of ids and features may differ (HF's ``masked_scatter`` semantics).

        Args:
            input_ids: int64 [B, L] token ids.
            input_features: float [B_audio, T, 160] or None (text only, or a later decode step).
            input_features_mask: bool [B_audio, N] (True = real audio token) or None (all N tokens of every clip).

        Raises:
            TypeError / ValueError: see ``check_inputs`` (run here unless dynamo is tracing).
        """
        if not torch.compiler.is_compiling():
            self.check_inputs(input_ids, input_features, input_features_mask)
        return self._embed(input_ids, input_features, input_features_mask)

    def _embed(self, input_ids, input_features, input_features_mask) -> torch.Tensor:
        """``embed_inputs`` without its check: for inputs ``check_inputs`` has passed (or compiled code)."""
        is_audio = input_ids == self.config.audio_token_index
        embeds = self.decoder.base_model.embedding(input_ids.masked_fill(is_audio, 0))
        if input_features is None:
            return embeds
        audio = self.get_audio_embeddings(input_features)
        if torch.compiler.is_compiling():
            return self.merge_audio_embeddings(input_ids, embeds, audio, input_features_mask)
        self.__dict__["_merge_checked"] = True  # plain attribute (no nn.Module bookkeeping), eager only
        try:
            return self.merge_audio_embeddings(input_ids, embeds, audio, input_features_mask)
        finally:
            self.__dict__["_merge_checked"] = False

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids_or_embeds: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_value_states: Optional[list] = None,
        use_cache: bool = False,
        last_n_tokens: int = 0,
        **attn_kwargs,
    ):
        """Logits for the prompt, with audio merged at its ``<|audio|>`` positions.

        Args:
            input_ids_or_embeds: int64 [B, L] token ids, or float [B, L, D] input embeddings already merged (e.g.
                from ``embed_inputs``; not yet multiplied by ``embedding_multiplier``, which the decoder applies).
            input_features / input_features_mask: see ``embed_inputs`` (ids only). With FMS's ``generate``, pass
                them in ``extra_kwargs`` together with ``prepare_model_inputs_hook=model.prepare_inputs_for_generation``,
                which hands them to the prefill step only.
            position_ids, past_key_value_states, use_cache, last_n_tokens, attn_kwargs: passed to FMS ``Granite``
                (``attn_kwargs`` e.g. ``mask``, ``attn_name``, ``attn_algorithm``).

        Returns:
            logits [B, L, V] (or [B, last_n_tokens, V]) divided by ``logits_scaling`` (FMS Granite's convention;
            transformers 5.x does not divide), or ``(logits, cache)`` with ``use_cache=True``.

        Raises:
            ValueError / TypeError: see ``check_inputs``; embeddings given together with ``input_features``.
        """
        x = input_ids_or_embeds
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if input_features is not None:
                raise ValueError("input_features were given with input embeddings; the audio must be merged once: "
                                 "pass token ids with the features, or embeddings from embed_inputs alone")
            embeds = x
        else:
            if not torch.compiler.is_compiling():
                self.check_inputs(x, input_features, input_features_mask, past_key_value_states, position_ids,
                                  static_cache=attn_kwargs.get("cache_position") is not None)
            embeds = self._embed(x, input_features, input_features_mask)
        return self.decoder(
            embeds,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            use_cache=use_cache,
            last_n_tokens=last_n_tokens,
            **attn_kwargs,
        )

    # -- FMS generate --------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self, iteration: int, input_ids: torch.Tensor, kwargs: MutableMapping[str, Any]
    ) -> tuple[torch.Tensor, MutableMapping[str, Any]]:
        """The ``prepare_model_inputs_hook`` of ``fms.utils.generation.generate`` for audio prompts.

        ``generate(model, ids, prepare_model_inputs_hook=model.prepare_inputs_for_generation, use_cache=True,
        extra_kwargs={"input_features": f, "input_features_mask": m, ...})``: on the first step (the prefill) the
        audio of every batch item is encoded and merged by ``forward``, and the LoRA adapter is set as HF's
        ``generate`` sets it: on when ``input_features`` are given, off for a text-only prompt. Once the KV cache
        holds the prompt, later steps feed only the new token, so ``input_features`` / ``input_features_mask`` are
        dropped from the kwargs: the encoder runs once per ``generate``. Without a cache (``use_cache=False``) every
        step re-runs the whole sequence, audio included. As in HF, the adapter state is left as set; callers that
        need the previous state back (``generation.transcribe_ids``) restore it.

        Returns:
            ``(input_ids, kwargs)`` for the step's forward.
        """
        if iteration == 0 and self.has_adapter and self._adapter_enabled is not None:
            self.set_adapter(kwargs.get("input_features") is not None)
        if iteration > 0 and kwargs.get("use_cache"):
            kwargs.pop("input_features", None)
            kwargs.pop("input_features_mask", None)
        return input_ids, kwargs


def _check_merge_shapes(audio: torch.Tensor, mask: torch.Tensor) -> None:
    """The audio embeddings the projector produced against the mask's [clips, tokens] (shapes only)."""
    if tuple(mask.shape) != tuple(audio.shape[:2]):
        raise ValueError(f"input_features_mask has shape {tuple(mask.shape)} but the audio embeddings are "
                         f"{tuple(audio.shape[:2])} (clips, tokens per clip); the mask must come from the same feature "
                         "extraction call as the features")


def _check_merge(is_audio: torch.Tensor, audio: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """The merge's own check on the tensors it is given, for a direct call (host values: eager only)."""
    if mask is not None:
        _check_merge_shapes(audio, mask)
    real = int(mask.sum()) if mask is not None else audio.shape[0] * audio.shape[1]
    n = int(is_audio.sum())
    if n != real:
        raise ValueError(f"the prompt has {n} <|audio|> tokens but the audio gives {real} audio embeddings; expand "
                         "each <|audio|> to its clip's token count with the processor")


def _state_dict_with_base_rows(model: GraniteSpeech, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: while the adapter is merged, report the saved base rows, not the merged ones."""
    if not model._adapter_enabled:
        return
    patched: dict[str, torch.Tensor] = {}
    for site in model.lora_sites():
        key = f"{prefix}decoder.base_model.layers.{site.layer}.{site.name}"
        if key not in patched:
            patched[key] = state_dict[key].clone()
        patched[key][site.rows] = site.pair.base.to(patched[key].dtype)
    state_dict.update(patched)


def _forget_merge_after_load(model: GraniteSpeech, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the loaded weights are un-merged base weights; the old snapshot is stale."""
    model._adapter_enabled = None

