"""Granite Speech 3.3 on the Foundation Model Stack: Conformer encoder -> Q-Former projector -> FMS Granite decoder.

Read top to bottom, as an FMS model file: the decoder LoRA (a literal table of where each adapter target lives in
FMS's fused weights) -> the full model -> named variants and ``register_model`` -> HF checkpoint adapter steps
registered with ``fms.utils.serialization`` -> the HF config registry entry used by ``get_model("hf_pretrained")``.

Shapes: B = batch, L = tokens, T = encoder frames (20 ms each), N = audio tokens per clip (10 per second of audio),
D = decoder width (``emb_dim``), V = vocabulary.

The forward pass follows transformers' ``GraniteSpeechForConditionalGeneration`` (v5.17): audio-token ids are
replaced by 0 and embedded, the audio embeddings are written at the ``<|audio|>`` positions of every batch item
(``masked_scatter`` order, keeping only the tokens ``input_features_mask`` marks real), and the decoder multiplies
all input embeddings (audio included) by ``embedding_multiplier`` once (FMS's ``GraniteHeadless`` does this for
passed-in embeddings too). One deliberate difference: FMS's Granite divides logits by ``logits_scaling``;
transformers 5.x ``GraniteSpeechForConditionalGeneration`` does not (../shared/REFERENCE.md section 1), so
``fms_logits * logits_scaling == hf_logits``.

LoRA: the audio adapter (peft, rank r, alpha, targets q_proj / v_proj in the real checkpoints) is loaded into
``lora.layers.{i}.{target}.A`` [r, in] / ``.B`` [out, r] and merged into the decoder's fused weights by
``post_init`` with scale ``alpha / r`` from the config. ``set_adapter(False)`` restores the saved base rows
bit-for-bit, ``set_adapter(True)`` re-merges from them; ``forward`` never toggles (HF semantics: HF's ``generate``
enables the adapter when audio is given and disables it for text-only prompts).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy, NotDistributed
from fms.models.granite import Granite
from fms.utils import serialization
from torch import nn

from fms_granite_speech._strict import template_regex
from fms_granite_speech.config import GraniteSpeechConfig, LoRAConfig, VARIANTS, get_config
from fms_granite_speech.conformer import FMS_OPTIONAL_KEYS, ConformerEncoder, hf_encoder_to_fms
from fms_granite_speech.projector import QFormerProjector, hf_projector_to_fms


__all__ = [
    "GraniteSpeech",
    "LORA_TARGETS",
    "build_granite_speech_params",
    "hf_decoder_key",
]

# -- decoder LoRA -------------------------------------------------------------------------------------------------


class LoRATarget(NamedTuple):
    """Where an HF LoRA target sits in FMS's Granite block.

    ``hf_site``: the HF module under ``layers.{i}``; ``fms_weight``: the FMS weight under ``base_model.layers.{i}``;
    ``part``: which block of rows of a fused weight (index into the fused split: q/k/v or gate/up), None for the
    whole weight; ``rope``: the rows are permuted by FMS's HF->FMS RoPE conversion, so LoRA B rows must be too.
    """

    hf_site: str
    fms_weight: str
    part: Optional[int]
    rope: bool


# fmt: off
LORA_TARGETS: dict[str, LoRATarget] = {
    "q_proj":    LoRATarget("self_attn.q_proj", "attn.in_proj.qkv_fused.weight", 0, True),
    "k_proj":    LoRATarget("self_attn.k_proj", "attn.in_proj.qkv_fused.weight", 1, True),
    "v_proj":    LoRATarget("self_attn.v_proj", "attn.in_proj.qkv_fused.weight", 2, False),
    "o_proj":    LoRATarget("self_attn.o_proj", "attn.dense.weight", None, False),
    "gate_proj": LoRATarget("mlp.gate_proj", "ff_sub_layer.wg1_fused.weight", 0, False),
    "up_proj":   LoRATarget("mlp.up_proj", "ff_sub_layer.wg1_fused.weight", 1, False),
    "down_proj": LoRATarget("mlp.down_proj", "ff_sub_layer.w2.weight", None, False),
}
# fmt: on


def _lora_shapes(config: GraniteSpeechConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of the HF linear a LoRA target adapts."""
    d = config.decoder
    q = d.nheads * d.head_dim
    kv = (d.kvheads or d.nheads) * d.head_dim
    ffn = _ffn_dim(config)
    return {
        "q_proj": (d.emb_dim, q),
        "k_proj": (d.emb_dim, kv),
        "v_proj": (d.emb_dim, kv),
        "o_proj": (q, d.emb_dim),
        "gate_proj": (d.emb_dim, ffn),
        "up_proj": (d.emb_dim, ffn),
        "down_proj": (ffn, d.emb_dim),
    }[target]


def _lora_rows(config: GraniteSpeechConfig, target: str) -> slice:
    """Rows of the FMS weight a target adapts: its block of the fused q|k|v or gate|up weight, else all rows."""
    spec = LORA_TARGETS[target]
    _, out_features = _lora_shapes(config, target)
    if spec.part is None:
        return slice(0, out_features)
    if spec.fms_weight.startswith("attn."):
        _, q = _lora_shapes(config, "q_proj")
        _, kv = _lora_shapes(config, "k_proj")
        splits = [q, kv, kv]
    else:
        splits = [out_features, out_features]
    start = sum(splits[: spec.part])
    return slice(start, start + splits[spec.part])


def _ffn_dim(config: GraniteSpeechConfig) -> int:
    from fms_granite_speech.config import _decoder_ffn_dim

    return _decoder_ffn_dim(config.decoder)


class LoRAPair(nn.Module):
    """One LoRA adapter: ``delta_W = scale * B @ A`` with A [r, in] and B [out, r] (peft's lora_A / lora_B).

    B's rows are in FMS order (for q/k: after FMS's RoPE row permutation). ``base`` (non-persistent buffer, set by
    ``GraniteSpeech.post_init``) holds the un-merged rows of the decoder weight this pair adapts.
    """

    def __init__(self, rank: int, in_features: int, out_features: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.register_buffer("base", None, persistent=False)

    def reset_parameters(self):
        """peft's default init: A Kaiming-uniform, B zero (an untrained adapter changes nothing)."""
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        nn.init.zeros_(self.B)


class DecoderLoRA(nn.Module):
    """LoRA pairs for every decoder layer and target: ``layers.{i}.{target}`` (target names as in HF/peft)."""

    def __init__(self, config: GraniteSpeechConfig):
        super().__init__()
        lora = config.lora
        self.layers = nn.ModuleList()
        for _ in range(config.decoder.nlayers):
            layer = nn.Module()
            for target in lora.target_modules:
                in_f, out_f = _lora_shapes(config, target)
                layer.add_module(target, LoRAPair(lora.rank, in_f, out_f))
            self.layers.append(layer)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, LoRAPair):
                m.reset_parameters()


# -- the model ------------------------------------------------------------------------------------------------------


class GraniteSpeech(nn.Module):
    """Granite Speech: ``encoder`` (Conformer) -> ``projector`` (Q-Former) -> ``decoder`` (FMS ``Granite``).

    Submodules: ``encoder`` (``ConformerEncoder``), ``projector`` (``QFormerProjector`` with ``out_dim = emb_dim``),
    ``decoder`` (``fms.models.granite.Granite``, unchanged: ``decoder.base_model.embedding / .layers.{i} /
    .dec_norm``, ``decoder.head``) and, when ``config.lora`` is set, ``lora`` (``lora.layers.{i}.{target}.A/.B``).

    Build on the meta device and fill from a checkpoint with ``fms.models.get_model("granite_speech", variant,
    model_path=DIR, source="hf")`` or ``fms_granite_speech.checkpoint.load_checkpoint(DIR)``; both call
    ``post_init``, which checks that every tensor was loaded and merges the LoRA adapter.

    Args:
        config: the whole model's ``GraniteSpeechConfig``.
        distributed_strategy: only FMS's ``NoOpStrategy`` (tensor parallel is not implemented here).

    Raises:
        TypeError: ``config`` is not a ``GraniteSpeechConfig``.
        ValueError: a LoRA target this port cannot merge, LoRA with ``decoder.fused_weights=False``, or a
            distributed strategy other than no-op.
    """

    def __init__(
        self,
        config: Optional[GraniteSpeechConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
    ):
        super().__init__()
        config = get_config("3.3-2b") if config is None else config
        if not isinstance(config, GraniteSpeechConfig):
            raise TypeError(f"GraniteSpeech needs a GraniteSpeechConfig, got {type(config).__name__}")
        if not isinstance(distributed_strategy, NotDistributed):
            raise ValueError(
                "GraniteSpeech supports only the no-op distributed strategy (tensor/model parallel are not "
                "implemented); call get_model without distributed_strategy"
            )
        if config.lora is not None:
            _check_lora_config(config)
        self.config = config
        self.encoder = ConformerEncoder(config.encoder)
        self.projector = QFormerProjector(config.projector, config.decoder.emb_dim)
        self.decoder = Granite(config.decoder)
        if config.decoder.tie_heads:
            # FMS ties in post_init (after loading); tying here too makes parameter counts right on the meta device.
            self.decoder.head.weight = self.decoder.base_model.embedding.weight
        if config.lora is not None:
            self.lora = DecoderLoRA(config)
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
        self._materialize_optional_buffers()
        self._check_coverage()
        if self.config.lora is not None:
            for pair, weight, rows in self._lora_sites():
                pair.base = weight.detach()[rows].clone()
            self._adapter_enabled = False
            self.set_adapter(True)
        self.eval()

    def _materialize_optional_buffers(self):
        """BatchNorm's ``num_batches_tracked`` is optional in checkpoints (eval never reads it): 0 when absent."""
        patterns = [template_regex("encoder." + t) for t in FMS_OPTIONAL_KEYS]
        device = self.decoder.base_model.embedding.weight.device
        for name, buf in list(self.named_buffers()):
            if buf.is_meta and any(p.match(name) for p in patterns):
                module_name, _, attr = name.rpartition(".")
                setattr(self.get_submodule(module_name), attr, torch.zeros((), dtype=buf.dtype, device=device))

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

    def set_adapter(self, enabled: bool) -> None:
        """Merge (``True``) or remove (``False``) the LoRA adapter in the decoder weights, exactly.

        Disabling copies back the base rows saved by ``post_init``; enabling writes
        ``base + (alpha / r) * B @ A`` computed in float32 from those same rows (then cast to the weight dtype), so
        any on/off sequence gives bit-identical weights for each state. ``forward`` never calls this; HF's
        ``generate`` enables the adapter when audio is given and disables it for text-only prompts.

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
            for pair, weight, rows in self._lora_sites():
                if enabled:
                    delta = pair.B.to(torch.float32) @ pair.A.to(torch.float32)
                    weight[rows] = (pair.base.to(torch.float32) + scale * delta).to(weight.dtype)
                else:
                    weight[rows] = pair.base
        self._adapter_enabled = enabled

    def _lora_keys(self):
        """Yield ``(state-dict key of the adapted weight, LoRAPair, row slice)`` for every adapted site."""
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
        for pair, weight, rows in self._lora_sites():
            yield names[id(weight)], pair, rows

    def _lora_sites(self):
        """Yield ``(LoRAPair, decoder weight Parameter, row slice)`` for every adapted layer and target."""
        for i, block in enumerate(self.decoder.base_model.layers):
            for target in self.config.lora.target_modules:
                spec = LORA_TARGETS[target]
                module_path, _, attr = spec.fms_weight.rpartition(".")
                owner = block.get_submodule(module_path)
                weight = getattr(owner, attr)
                yield getattr(self.lora.layers[i], target), weight, _lora_rows(self.config, target)

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

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decoder input embeddings [B, L, D] with audio merged (not yet multiplied by ``embedding_multiplier``).

        Audio-token ids are replaced by 0 before the embedding lookup (as HF does). With ``input_features``, the
        audio embeddings of all clips (``get_audio_embeddings``), keeping only the positions ``input_features_mask``
        marks real, are written in order at the ``<|audio|>`` positions of all batch items (HF's ``masked_scatter``
        semantics: row-major order over [B, L], so a prompt may hold several clips and batch sizes of ids and
        features may differ).

        Args:
            input_ids: int64 [B, L] token ids.
            input_features: float [B_audio, T, 160] or None (text only, or a later decode step).
            input_features_mask: bool [B_audio, N] (True = real audio token) or None (all N tokens of every clip).

        Raises:
            TypeError: ids not an integer tensor (bool included), or a non-bool mask.
            ValueError: bad shapes, ids outside the vocabulary (checked for prompts, L > 1), or the number of ``<|audio|>`` tokens differs from the number of audio
                embeddings (both counts in the message).
        """
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.is_floating_point()
            or input_ids.is_complex()
            or input_ids.dtype == torch.bool
        ):
            raise TypeError(
                "input_ids must be an integer torch.Tensor [B, L] of token ids, got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape [B, L], got {tuple(input_ids.shape)}; add a batch dimension with "
                "unsqueeze(0)"
            )
        if input_ids.shape[1] > 1 and not torch.compiler.is_compiling():
            # prompts only: a decode step (L = 1) stays free of this host sync
            lo, hi, vocab = int(input_ids.min()), int(input_ids.max()), self.config.decoder.src_vocab_size
            if lo < 0 or hi >= vocab:
                raise ValueError(
                    f"input_ids hold ids in [{lo}, {hi}] but the decoder vocabulary is [0, {vocab - 1}]; the "
                    "tokenizer does not belong to this checkpoint"
                )
        is_audio = input_ids == self.config.audio_token_index
        embeds = self.decoder.base_model.embedding(input_ids.masked_fill(is_audio, 0))
        if input_features is None:
            if input_features_mask is not None:
                raise ValueError("input_features_mask was given without input_features")
            return embeds
        audio = self.get_audio_embeddings(input_features)
        if input_features_mask is not None:
            if not isinstance(input_features_mask, torch.Tensor) or input_features_mask.dtype != torch.bool:
                raise TypeError(
                    "input_features_mask must be a bool tensor [B_audio, N] (True = real audio token), got "
                    f"{getattr(input_features_mask, 'dtype', type(input_features_mask).__name__)}"
                )
            if tuple(input_features_mask.shape) != tuple(audio.shape[:2]):
                raise ValueError(
                    f"input_features_mask has shape {tuple(input_features_mask.shape)} but the audio gives "
                    f"{tuple(audio.shape[:2])} (clips, tokens per clip); pass the mask from the same feature "
                    "extraction call as input_features"
                )
            audio = audio[input_features_mask.to(audio.device)]
        else:
            audio = audio.reshape(-1, audio.shape[-1])
        num_tokens = int(is_audio.sum())
        if num_tokens != audio.shape[0]:
            raise ValueError(
                f"the prompt has {num_tokens} <|audio|> tokens (id {self.config.audio_token_index}) but the audio "
                f"gives {audio.shape[0]} audio embeddings; expand each <|audio|> to its clip's token count with the "
                "processor, and pass input_features only on the first step of generation"
            )
        audio = audio.to(device=embeds.device, dtype=embeds.dtype)
        return embeds.masked_scatter(is_audio.unsqueeze(-1), audio)

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        past_key_value_states: Optional[list] = None,
        use_cache: bool = False,
        position_ids: Optional[torch.Tensor] = None,
        last_n_tokens: int = 0,
        **attn_kwargs,
    ):
        """Logits for ``input_ids`` with audio merged at the ``<|audio|>`` positions.

        The contract of ``fms.utils.generation.generate``: pass ``input_features`` on the first (prefill) step
        only; later steps pass the new ids and the cache.

        Args:
            input_ids: int64 [B, L].
            input_features / input_features_mask: see ``embed_inputs``.
            past_key_value_states, use_cache, position_ids, last_n_tokens, attn_kwargs: passed to FMS ``Granite``.

        Returns:
            logits [B, L, V] (or [B, last_n_tokens, V]) divided by ``logits_scaling`` (FMS Granite's convention;
            transformers 5.x does not divide), or ``(logits, cache)`` with ``use_cache=True``.

        Raises:
            ValueError / TypeError: see ``embed_inputs``.
        """
        embeds = self.embed_inputs(input_ids, input_features, input_features_mask)
        return self.decoder(
            embeds,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            use_cache=use_cache,
            last_n_tokens=last_n_tokens,
            **attn_kwargs,
        )


def _check_lora_config(config: GraniteSpeechConfig) -> None:
    lora = config.lora
    if not isinstance(lora, LoRAConfig):
        raise TypeError(f"config.lora must be a LoRAConfig or None, got {type(lora).__name__}")
    unknown = [t for t in lora.target_modules if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(
            f"LoRA targets {unknown} cannot be merged by this port; supported decoder targets: "
            f"{', '.join(LORA_TARGETS)}"
        )
    if lora.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {lora.rank}")
    if not config.decoder.fused_weights:
        raise ValueError("the LoRA merge needs decoder.fused_weights=True (FMS's fused qkv / gate-up weights)")


# -- named variants and registration --------------------------------------------------------------------------------

_architecture_name = "granite_speech"
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(GraniteSpeechConfig))


def _apply_overrides(config: GraniteSpeechConfig, overrides: Mapping[str, Any]) -> GraniteSpeechConfig:
    """``config`` with top-level fields replaced; a dict for a sub-config updates its fields (FMS ``updated``)."""
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown Granite Speech config overrides {unknown}; valid: {', '.join(_CONFIG_FIELDS)}, or config="
        )
    changes = {}
    for key, value in overrides.items():
        current = getattr(config, key)
        if key == "lora" and isinstance(value, dict):
            base = dataclasses.asdict(current) if current is not None else {}
            value = LoRAConfig(**{**base, **value})
        elif isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = current.updated(**value)
        changes[key] = value
    return dataclasses.replace(config, **changes)  # re-runs the config's validation


def _factory_factory(variant: str) -> Callable[..., GraniteSpeech]:
    def factory(
        config: Optional[GraniteSpeechConfig] = None,
        vision_only: bool = False,
        model_path: Optional[str] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **overrides,
    ) -> GraniteSpeech:
        """Build the ``variant`` model; ``config=`` replaces the whole config, keyword overrides replace fields.

        ``vision_only`` and ``model_path`` are accepted because ``get_model`` always / sometimes passes them.
        """
        if vision_only:
            raise ValueError("vision_only=True does not apply to Granite Speech")
        _check_get_model_folder()
        cfg = get_config(variant) if config is None else config
        if not isinstance(cfg, GraniteSpeechConfig):
            raise TypeError(f"config= must be a GraniteSpeechConfig, got {type(cfg).__name__}")
        if overrides:
            cfg = _apply_overrides(cfg, overrides)
        return GraniteSpeech(cfg, distributed_strategy)

    factory.__name__ = f"granite_speech_{variant.replace('.', '_').replace('-', '_')}"
    return factory


def _state_dict_with_base_rows(model: "GraniteSpeech", state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: while the adapter is merged, report the saved base rows, not the merged ones."""
    if not model._adapter_enabled:
        return
    patched: dict[str, torch.Tensor] = {}
    for name, pair, rows in model._lora_keys():
        key = prefix + name
        if key not in patched:
            patched[key] = state_dict[key].clone()
        patched[key][rows] = pair.base.to(patched[key].dtype)
    state_dict.update(patched)


def _forget_merge_after_load(model: "GraniteSpeech", incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the loaded weights are un-merged base weights; the old snapshot is stale."""
    model._adapter_enabled = None


def _check_get_model_folder() -> None:
    """Refuse a folder that FMS's ``*.safetensors`` glob would load wrongly (mixed shard sets).

    ``get_model`` cannot be told which files to open and does not hand ``model_path`` to the factory, so the path is
    read from the calling ``get_model`` frame (the factory runs inside it, after the path is resolved and before any
    weight is read). Without such a frame (the factory called directly) there is nothing to check.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not models.get_model.__code__:
        frame = frame.f_back
    if frame is None:
        return
    model_path = frame.f_locals.get("model_path")
    del frame
    if model_path is None or "*" in str(model_path) or not Path(str(model_path)).expanduser().is_dir():
        return
    from fms_granite_speech.checkpoint import check_safetensors_folder

    check_safetensors_folder(Path(str(model_path)).expanduser(), for_glob=True)


for _variant in VARIANTS:
    models.register_model(_architecture_name, _variant, _factory_factory(_variant))


# -- HF -> FMS checkpoint adapter -----------------------------------------------------------------------------------
#
# Small pure functions over a (partial) state dict, as FMS's loader applies them to the keys of one layer at a time
# (everything up to the first number of a key, see fms.utils.serialization._find_key_neighbors). They accept every
# layout a Granite Speech checkpoint comes in:
#   on disk (transformers 4.x):  encoder.*  projector.*  language_model.model.*        language_model.lm_head.*
#   on disk (transformers 5.17): encoder.*  projector.*  language_model.model.model.*  language_model.lm_head.*
#   runtime (state_dict()):      model.encoder.*  model.projector.*  model.language_model.*  lm_head.*
#   peft adapter file:           base_model.model.<runtime or 4.x name>.lora_{A,B}[.default].weight
# The decoder goes through FMS granite's own registered "hf" adapter (names, RoPE row permutation, qkv / gate-up
# fusion); LoRA B rows of q/k go through granite's registered RoPE step, so they line up with the fused rows.

# fmt: off
_DECODER_PREFIXES: tuple[tuple[str, str], ...] = (   # (HF prefix, GraniteForCausalLM prefix), first match wins
    ("language_model.model.model.", "model."),       # transformers 5.17 save_pretrained
    ("language_model.model.",       "model."),       # transformers 4.x checkpoints (the released models)
    ("language_model.lm_head.",     "lm_head."),
    ("model.language_model.",       "model."),       # runtime state_dict() / peft adapter keys (5.x)
    ("lm_head.",                    "lm_head."),
)
# fmt: on
_ENCODER_PREFIXES = ("model.encoder.", "encoder.")
_PROJECTOR_PREFIXES = ("model.projector.", "projector.")
_LORA_KEY = re.compile(r"^model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight$")
_LORA_BY_SITE = {spec.hf_site: target for target, spec in LORA_TARGETS.items()}


def hf_decoder_key(key: str) -> Optional[str]:
    """An HF decoder key in GraniteForCausalLM naming (``model.layers.0...``, ``lm_head.weight``), else None."""
    for hf_prefix, prefix in _DECODER_PREFIXES:
        if key.startswith(hf_prefix):
            return prefix + key[len(hf_prefix) :]
    return None


def _model_config(model_config: Any) -> GraniteSpeechConfig:
    if not isinstance(model_config, GraniteSpeechConfig):
        raise ValueError(
            "the granite_speech HF adapter needs model_config=GraniteSpeechConfig (FMS passes the model's config); "
            f"got {type(model_config).__name__}"
        )
    return model_config


def _granite_step(name: str) -> Callable:
    """A step FMS's granite model registered with ``serialization.register_adapter_step``."""
    steps = vars(serialization)["__adapter_steps"].get("granite", {})
    if name not in steps:
        raise RuntimeError(f"FMS granite adapter step {name!r} is not registered (ibm-fms version mismatch?)")
    return steps[name]


def _merge_into(out: dict, new: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    for key, value in new.items():
        if key in out:
            raise ValueError(
                f"checkpoint keys {sources.get(key, key)!r} and another key both map to {key!r}: the folder mixes two "
                "layouts of the same tensor; keep one"
            )
        out[key] = value


def _hf_peft_unwrap(input_sd: Mapping[str, Any], **kwargs) -> dict[str, Any]:
    """peft names -> plain HF names: drop ``base_model.model.``, ``.base_layer``, the ``default`` adapter name."""
    out: dict[str, Any] = {}
    for key, value in input_sd.items():
        new = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        new = re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", new)
        _merge_into(out, {new: value}, {new: key})
    return out


def _split_by_prefix(input_sd: Mapping[str, Any], prefixes: tuple[str, ...]):
    """Partition keys by the first matching prefix: ({prefix: {key: value}}, {unmatched key: value})."""
    groups: dict[str, dict[str, Any]] = {p: {} for p in prefixes}
    rest: dict[str, Any] = {}
    for key, value in input_sd.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        (groups[prefix] if prefix is not None else rest)[key] = value
    return groups, rest


def _hf_encoder_to_fms(input_sd: Mapping[str, Any], **kwargs) -> dict[str, Any]:
    """HF encoder keys (both layouts) -> ``encoder.*`` through ``conformer.hf_encoder_to_fms``."""
    groups, out = _split_by_prefix(input_sd, _ENCODER_PREFIXES)
    for prefix, part in groups.items():
        if part:
            _merge_into(out, hf_encoder_to_fms(part, hf_prefix=prefix, fms_prefix="encoder."), {})
    return out


def _hf_projector_to_fms(input_sd: Mapping[str, Any], **kwargs) -> dict[str, Any]:
    """HF projector keys (both layouts) -> ``projector.*`` through ``projector.hf_projector_to_fms``."""
    groups, out = _split_by_prefix(input_sd, _PROJECTOR_PREFIXES)
    for prefix, part in groups.items():
        if part:
            _merge_into(out, hf_projector_to_fms(part, hf_prefix=prefix, fms_prefix="projector."), {})
    return out


def _hf_lora_to_fms(input_sd: Mapping[str, Any], model_config=None, **kwargs) -> dict[str, Any]:
    """peft LoRA keys -> ``lora.layers.{i}.{target}.A/.B``; B rows of q/k get FMS's RoPE row permutation."""
    out: dict[str, Any] = {}
    rope = None
    for key, value in input_sd.items():
        rel = hf_decoder_key(key)
        m = _LORA_KEY.match(rel) if rel is not None else None
        target = _LORA_BY_SITE.get(m.group(2)) if m else None
        if target is None:
            _merge_into(out, {key: value}, {})
            continue
        layer, ab = m.group(1), m.group(3)
        if ab == "B" and LORA_TARGETS[target].rope:
            cfg = _model_config(model_config)
            rope = rope or _granite_step("hf_to_fms_rope")
            proj = "query" if target == "q_proj" else "key"
            name = f"base_model.layers.{layer}.attn.in_proj.{proj}.weight"
            value = rope({name: value}, model_config=cfg.decoder)[name]
        new = f"lora.layers.{layer}.{target}.{ab}"
        _merge_into(out, {new: value}, {new: key})
    return out


def _hf_decoder_to_fms(input_sd: Mapping[str, Any], model_config=None, **kwargs) -> dict[str, Any]:
    """HF decoder keys (any layout) -> ``decoder.*`` through FMS granite's registered "hf" adapter.

    With tied embeddings (``decoder.tie_heads``) an ``lm_head`` tensor is dropped: the head is the embedding, as in
    HF, which ties ``lm_head`` to ``embed_tokens`` and ignores a stored copy.
    """
    decoder: dict[str, Any] = {}
    sources: dict[str, str] = {}
    out: dict[str, Any] = {}
    for key, value in input_sd.items():
        rel = hf_decoder_key(key)
        if rel is None:
            _merge_into(out, {key: value}, {})
            continue
        cfg = _model_config(model_config)
        if rel.startswith("lm_head.") and cfg.decoder.tie_heads:
            continue
        if rel in decoder:
            raise ValueError(
                f"checkpoint keys {sources[rel]!r} and {key!r} are the same decoder tensor in two layouts; keep one"
            )
        decoder[rel], sources[rel] = value, key
    if decoder:
        cfg = _model_config(model_config)
        d = cfg.decoder
        if d.head_dim != d.emb_dim // d.nheads:
            raise ValueError(
                f"FMS granite's HF RoPE permutation assumes head_dim == emb_dim // nheads; got head_dim={d.head_dim}, "
                f"emb_dim={d.emb_dim}, nheads={d.nheads}"
            )
        _check_fusion_groups(decoder)
        adapted = serialization._get_adapter("granite", "hf")(decoder, model_config=d)
        _merge_into(out, {"decoder." + k: v for k, v in adapted.items()}, {})
    return out


_FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _check_fusion_groups(decoder_sd: Mapping[str, Any]) -> None:
    """FMS fuses q|k|v and gate|up of a layer; a member missing from the checkpoint is named here, not a KeyError."""
    for key in decoder_sd:
        m = re.match(r"^(model\.layers\.\d+\.)((?:self_attn|mlp)\.\w+)\.(weight|bias)$", key)
        group = next((g for g in _FUSED_GROUPS if m and m.group(2) in g), None)
        if group is None:
            continue
        names = [f"{m.group(1)}{site}.{m.group(3)}" for site in group]
        absent = [n for n in names if n not in decoder_sd]
        if absent:
            raise ValueError(
                f"missing decoder tensor(s) {absent} (GraniteForCausalLM names): FMS fuses "
                f"{' + '.join(group)} of a layer and needs all of them"
            )


_EXPECTED_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def expected_shapes(config: GraniteSpeechConfig) -> dict[str, tuple[int, ...]]:
    """FMS state-dict keys a checkpoint must / may fill and their shapes (model built once on meta, cached)."""
    key = repr(config)
    if key not in _EXPECTED_SHAPES:
        with torch.device("meta"):
            model = GraniteSpeech(config)
        _EXPECTED_SHAPES[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _EXPECTED_SHAPES[key]


def _check_against_model(
    input_sd: Mapping[str, Any], model_config=None, problems: Optional[list] = None, **kwargs
) -> Mapping[str, Any]:
    """Last step: every adapted key must be a model tensor of the right shape.

    Raises ValueError naming the key (unknown key, or expected vs got shape), unless ``problems`` (a list, passed
    by ``checkpoint.load_checkpoint``) is given: then ``(key, message)`` pairs are appended and the bad keys
    dropped, so one error can list every problem of a checkpoint.
    """
    cfg = _model_config(model_config)
    shapes = expected_shapes(cfg)
    found = []
    good: dict[str, Any] = {}
    for key, value in input_sd.items():
        if key not in shapes:
            hint = " (the checkpoint has a LoRA adapter but config.lora is None)" if key.startswith("lora.") else ""
            found.append((key, f"unexpected tensor {key!r}{hint}"))
        elif tuple(value.shape) != shapes[key]:
            found.append((key, f"tensor {key!r} has shape {list(value.shape)}, the model expects {list(shapes[key])}"))
        else:
            good[key] = value
    if found and problems is None:
        raise ValueError("checkpoint does not fit the Granite Speech config: " + "; ".join(m for _, m in found))
    if problems is not None:
        problems.extend(found)
    return good


# fmt: off
_HF_STEPS = [
    ("hf_peft_unwrap",       _hf_peft_unwrap),
    ("hf_encoder_to_fms",    _hf_encoder_to_fms),
    ("hf_projector_to_fms",  _hf_projector_to_fms),
    ("hf_lora_to_fms",       _hf_lora_to_fms),
    ("hf_decoder_to_fms",    _hf_decoder_to_fms),
    ("check_against_model",  _check_against_model),
]
# fmt: on
for _name, _step in _HF_STEPS:
    serialization.register_adapter_step(_architecture_name, _name, _step)
serialization.register_adapter(_architecture_name, "hf", [name for name, _ in _HF_STEPS])


# -- HF config registry (get_model("hf_pretrained", model_path=DIR)) ------------------------------------------------


def build_granite_speech_params(hf_config) -> dict:
    """FMS param builder: a transformers ``GraniteSpeechConfig`` (+ the folder's adapter_config.json) -> kwargs.

    The LoRA rank / alpha / targets come from ``adapter_config.json`` next to config.json (``hf_config`` remembers
    its folder as ``name_or_path``). Returns ``{"config": ...}`` for the ``granite_speech`` factory.

    Raises:
        ValueError: config.json declares ``has_lora_adapter`` but the folder has no adapter (the same refusal as
            ``checkpoint.load_checkpoint``, which can load the base model with ``adapter=False``).
    """
    from fms_granite_speech.checkpoint import check_safetensors_folder, read_lora_config

    folder = Path(str(getattr(hf_config, "name_or_path", "") or ""))
    lora = read_lora_config(folder) if folder.is_dir() else None
    if folder.is_dir():
        check_safetensors_folder(folder, for_glob=True)
    if lora is None and getattr(hf_config, "has_lora_adapter", False):
        raise ValueError(
            f"{folder}/config.json declares has_lora_adapter=true but the folder has no adapter_config.json; "
            "load the base model without the audio LoRA with "
            "fms_granite_speech.checkpoint.load_checkpoint(DIR, adapter=False)"
        )
    config = GraniteSpeechConfig.from_hf(hf_config, lora=lora)
    if lora is not None and config.lora is None:
        config = config.replace(lora=lora)  # HF loads an adapter folder even when has_lora_adapter is false
    return {"config": config}


def _register_hf_config() -> None:
    from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY

    _FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info(
        "GraniteSpeechForConditionalGeneration", _architecture_name, build_granite_speech_params
    )


_register_hf_config()
