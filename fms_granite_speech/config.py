"""Typed configuration of Granite Speech on FMS: encoder, projector and decoder, with named variants.

Three named variants:

* ``tiny``: the real depth (16 Conformer blocks, 2 Q-Former layers) with small widths, so every layer name of the
  real model exists and a CPU runs it in well under a second. Every dimension differs from every other one it
  meets (``num_heads * dim_head != hidden_dim``, ``output_dim`` odd, distinct projector and decoder widths), so a
  transposed or mis-split weight cannot pass a parity test by accident, and ``context_size`` (32 encoder frames,
  0.64 s) is shorter than any shipped clip, so blocked attention and its padding are always exercised.
* ``3.3-2b`` and ``3.3-8b``: the architecture of ``ibm-granite/granite-speech-3.3-{2b,8b}`` (the sizes of the
  ``config.json`` published with those checkpoints on the Hugging Face Hub; transformers' ``GraniteSpeechConfig``
  defaults are the encoder and projector of both).

A config converts to and from transformers' ``GraniteSpeechConfig`` (``to_hf`` / ``from_hf``); the decoder part is
FMS's own ``GraniteConfig`` so the decoder is ``fms.models.granite.Granite`` unchanged.

The configs follow FMS's ``ModelConfig`` contract (``save`` / ``load`` / ``as_dict`` / ``updated``): annotations are real
classes (no ``from __future__ import annotations``, whose string annotations FMS's loader cannot resolve), and a
nested config given as a dict (from JSON, ``as_dict()`` or ``updated(decoder={...})``) is turned back into its
dataclass, so every way of building a config runs the same validation.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from fms.models.granite import GraniteConfig
from fms.utils.config import ModelConfig


# transformers model types this port reads: Granite Speech 3.3 / 4.0 / 4.1 and Granite Speech Plus (4.1-2b-plus)
MODEL_TYPES = ("granite_speech", "granite_speech_plus")
# text_config.model_type values whose decoder is FMS's Granite (granitemoehybrid: its dense, all-attention form)
DECODER_TYPES = ("granite", "granitemoehybrid")


@dataclass
class EncoderConfig(ModelConfig):
    """Conformer CTC encoder. Widths in features; ``context_size`` in encoder frames (1 frame = 20 ms)."""

    input_dim: int = 160
    num_layers: int = 16
    hidden_dim: int = 1024
    feedforward_mult: int = 4
    num_heads: int = 8
    dim_head: int = 128
    output_dim: int = 256
    context_size: int = 200
    max_pos_emb: int = 512
    conv_kernel_size: int = 15
    conv_expansion_factor: int = 2
    layer_norm_eps: float = 1e-5
    # Granite Speech Plus (transformers' GraniteSpeechPlusEncoderConfig.cat_hidden_layers; granite-speech-4.1-2b-plus
    # uses [3]): the hidden states after these many blocks (0: after input_linear) are concatenated, in that order,
    # before the final output along the feature dimension, which the projector then reads.
    cat_hidden_layers: Optional[tuple] = None

    def __post_init__(self):
        if self.cat_hidden_layers is not None:
            layers = tuple(self.cat_hidden_layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"cat_hidden_layers={list(layers)} must hold block counts (integers)")
            bad = [i for i in layers if not 0 <= i < self.num_layers]
            if bad or len(set(layers)) != len(layers):
                raise ValueError(f"cat_hidden_layers={list(layers)}: each index must be distinct and in "
                                 f"[0, num_layers={self.num_layers}) (the hidden state after that many blocks)")
            self.cat_hidden_layers = layers or None
        if not 0 < self.context_size <= self.max_pos_emb:
            raise ValueError(
                f"context_size={self.context_size} must be in (0, max_pos_emb={self.max_pos_emb}]: the Shaw "
                "relative-position table has 2*max_pos_emb+1 rows and distances are clamped to +-context_size"
            )
        if self.num_layers < 2:
            raise ValueError(f"num_layers={self.num_layers}: the mid-layer CTC residual needs at least 2 blocks")

    @property
    def mid_layer(self) -> int:
        """0-based index of the block after which the CTC residual is added (HF: ``num_layers // 2`` 1-based)."""
        return self.num_layers // 2 - 1

    @property
    def output_width(self) -> int:
        """Features per frame the encoder returns: ``hidden_dim`` times (1 + the concatenated hidden states)."""
        return self.hidden_dim * (1 + len(self.cat_hidden_layers or ()))


@dataclass
class ProjectorConfig(ModelConfig):
    """Windowed Q-Former projector: ``window_size`` encoder frames become ``window_size // downsample_rate`` queries."""

    hidden_size: int = 1024
    num_layers: int = 2
    num_heads: int = 16
    intermediate_size: int = 4096
    encoder_hidden_size: int = 1024
    cross_attention_frequency: int = 1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    window_size: int = 15
    downsample_rate: int = 5

    def __post_init__(self):
        if self.window_size % self.downsample_rate:
            raise ValueError(
                f"window_size={self.window_size} must be a multiple of downsample_rate={self.downsample_rate}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"projector hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @property
    def num_queries(self) -> int:
        """Learnable queries per window (3 for the real model: 15 frames -> 3 tokens, 10 tokens per second)."""
        return self.window_size // self.downsample_rate


@dataclass
class LoRAConfig(ModelConfig):
    """The audio LoRA adapter of the decoder (peft's ``adapter_config.json``): scale is ``alpha / rank``."""

    rank: int = 64
    alpha: float = 32.0
    target_modules: tuple = ("q_proj", "v_proj")

    def __post_init__(self):
        if isinstance(self.target_modules, list):  # JSON has no tuples
            self.target_modules = tuple(self.target_modules)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; name the adapted projections, e.g. ('q_proj', 'v_proj')")

    @property
    def scaling(self) -> float:
        """The factor peft multiplies ``B @ A`` by: ``alpha / rank`` (0.5 for the released adapters: 32 / 64)."""
        return self.alpha / self.rank


@dataclass
class GraniteSpeechConfig(ModelConfig):
    """Whole model: encoder -> projector -> FMS Granite decoder, audio merged at ``audio_token_index`` positions.

    ``lora`` is None for a checkpoint without an adapter. ``decoder`` is an ``fms.models.granite.GraniteConfig``.
    ``fused_weights`` (as in FMS's ``LlavaNextConfig``): False builds the decoder with FMS's unfused q/k/v and
    gate/up weights (``get_model(..., fused_weights=False)``); the model sets ``decoder.fused_weights`` from it.

    Raises:
        ValueError: the projector's ``encoder_hidden_size`` is not the encoder width, or ``audio_token_index`` is
            outside the decoder vocabulary.
        TypeError: a sub-config that is neither its dataclass nor a dict of its fields.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: GraniteConfig = field(default_factory=GraniteConfig)
    lora: Optional[LoRAConfig] = field(default_factory=LoRAConfig)
    audio_token_index: int = 49159
    fused_weights: bool = True
    # the transformers model type of the decoder (text_config.model_type): "granite" (3.3), or "granitemoehybrid"
    # (Granite 4.0's class, e.g. granite-4.0-1b-base's config.json: GraniteMoeHybridForCausalLM with every layer
    # attention, no experts, RoPE) whose dense form is FMS's Granite; its MLP is stored as shared_mlp.input_linear
    # (gate and up stacked) and output_linear
    decoder_type: str = "granite"

    def __post_init__(self):
        for name, cls in (("encoder", EncoderConfig), ("projector", ProjectorConfig), ("decoder", GraniteConfig),
                          ("lora", LoRAConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
            elif not isinstance(value, cls) and not (name == "lora" and value is None):
                raise TypeError(f"GraniteSpeechConfig.{name} must be a {cls.__name__} or a dict of its fields, got "
                                f"{type(value).__name__}")
        if self.projector.encoder_hidden_size != self.encoder.output_width:
            cat = self.encoder.cat_hidden_layers
            raise ValueError(
                f"projector.encoder_hidden_size={self.projector.encoder_hidden_size} must equal the encoder's output "
                f"width {self.encoder.output_width} (hidden_dim={self.encoder.hidden_dim}"
                + (f" x {1 + len(cat)}: cat_hidden_layers={list(cat)}" if cat else "") + ")"
            )
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type={self.decoder_type!r}; this port reads {', '.join(DECODER_TYPES)} "
                             "decoders (FMS's Granite)")
        if not 0 <= self.audio_token_index < self.decoder.src_vocab_size:
            raise ValueError(
                f"audio_token_index={self.audio_token_index} is outside the decoder vocabulary "
                f"(src_vocab_size={self.decoder.src_vocab_size})"
            )

    # -- conversion to / from transformers -------------------------------------------------------------------------

    def hf_class(self):
        """The transformers model class of this config: ``GraniteSpeechPlusForConditionalGeneration`` when the encoder
        concatenates hidden states, else ``GraniteSpeechForConditionalGeneration``."""
        import transformers

        return (transformers.GraniteSpeechPlusForConditionalGeneration if self.encoder.cat_hidden_layers
                else transformers.GraniteSpeechForConditionalGeneration)

    def to_hf(self):
        """Return the equivalent ``transformers.GraniteSpeechConfig`` (eval-mode dropout values kept at HF defaults);
        a ``transformers.GraniteSpeechPlusConfig`` when the encoder concatenates hidden states
        (``encoder.cat_hidden_layers``)."""
        from transformers import GraniteSpeechConfig, GraniteSpeechPlusConfig

        e, p, d = self.encoder, self.projector, self.decoder
        HFConfig = GraniteSpeechPlusConfig if e.cat_hidden_layers else GraniteSpeechConfig
        ffn = _decoder_ffn_dim(d)
        text_config = dict(
            model_type="granite",
            vocab_size=d.src_vocab_size,
            hidden_size=d.emb_dim,
            intermediate_size=ffn,
            num_hidden_layers=d.nlayers,
            num_attention_heads=d.nheads,
            num_key_value_heads=d.kvheads or d.nheads,
            head_dim=d.head_dim,
            rms_norm_eps=d.norm_eps,
            hidden_act={"swish": "silu"}.get(d.activation_fn, d.activation_fn),
            max_position_embeddings=d.max_expected_seq_len,
            rope_parameters={"rope_type": "default", "rope_theta": float(d.rope_theta)},
            tie_word_embeddings=d.tie_heads,
            embedding_multiplier=d.embedding_multiplier,
            residual_multiplier=d.residual_multiplier,
            attention_multiplier=d.attention_multiplier,
            logits_scaling=d.logits_scaling,
            pad_token_id=d.pad_id if d.pad_id >= 0 else None,
        )
        if self.decoder_type == "granitemoehybrid":
            heads = 1
            while (2 * d.emb_dim) % (heads * 2) == 0 and heads < 8:  # mamba fields transformers validates, unused
                heads *= 2
            text_config.update(model_type="granitemoehybrid", shared_intermediate_size=ffn,
                               layer_types=["attention"] * d.nlayers, num_local_experts=0, num_experts_per_tok=0,
                               position_embedding_type="rope", mamba_n_heads=heads,
                               mamba_d_head=2 * d.emb_dim // heads)
            text_config.pop("head_dim")
        encoder_config = dict(
            input_dim=e.input_dim,
            num_layers=e.num_layers,
            hidden_dim=e.hidden_dim,
            feedforward_mult=e.feedforward_mult,
            num_heads=e.num_heads,
            dim_head=e.dim_head,
            output_dim=e.output_dim,
            context_size=e.context_size,
            max_pos_emb=e.max_pos_emb,
            conv_kernel_size=e.conv_kernel_size,
            conv_expansion_factor=e.conv_expansion_factor,
        )
        if e.cat_hidden_layers:
            encoder_config["cat_hidden_layers"] = list(e.cat_hidden_layers)
        projector_config = dict(
            model_type="blip_2_qformer",
            hidden_size=p.hidden_size,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            intermediate_size=p.intermediate_size,
            encoder_hidden_size=p.encoder_hidden_size,
            cross_attention_frequency=p.cross_attention_frequency,
            hidden_act=p.hidden_act,
            layer_norm_eps=p.layer_norm_eps,
        )
        return HFConfig(
            text_config=text_config,
            encoder_config=encoder_config,
            projector_config=projector_config,
            audio_token_index=self.audio_token_index,
            has_lora_adapter=self.lora is not None,
            window_size=p.window_size,
            downsample_rate=p.downsample_rate,
            tie_word_embeddings=d.tie_heads,
        )

    @classmethod
    def from_hf(cls, hf_config: Any, lora: Optional[LoRAConfig] = None) -> "GraniteSpeechConfig":
        """Build from a ``transformers.GraniteSpeechConfig`` (or its ``to_dict()``).

        ``lora`` comes from the checkpoint's ``adapter_config.json`` (see ``checkpoint.read_lora_config``); None means
        no adapter.

        Raises:
            ValueError: the config is not a Granite Speech config, or uses a feature this port does not implement
                (a non-"default" RoPE type, attention/MLP biases in the decoder, ``use_qformer_text_input``).
        """
        from transformers import GraniteSpeechConfig as HFConfig
        from transformers import GraniteSpeechPlusConfig

        if isinstance(hf_config, dict):
            cls_ = GraniteSpeechPlusConfig if hf_config.get("model_type") == "granite_speech_plus" else HFConfig
            hf_config = cls_(**{k: v for k, v in hf_config.items() if k != "model_type"})
        if getattr(hf_config, "model_type", None) not in MODEL_TYPES:
            raise ValueError(f"expected a {' or '.join(MODEL_TYPES)} config, got model_type={hf_config.model_type!r}")
        t, ec, pc = hf_config.text_config, hf_config.encoder_config, hf_config.projector_config
        text_type = getattr(t, "model_type", "granite")
        if text_type not in DECODER_TYPES:
            raise ValueError(f"text_config.model_type={text_type!r}: this port builds FMS's Granite decoder from "
                             f"{' or '.join(DECODER_TYPES)} text configs (FMS also has granite_moe_hybrid, whose "
                             "Mamba and expert layers this port does not run)")
        if text_type == "granitemoehybrid":
            kinds = sorted(set(getattr(t, "layer_types", None) or ["attention"]))
            if any(k not in ("attention", "full_attention") for k in kinds):
                raise ValueError(f"text_config.layer_types holds {kinds}: this port runs a granitemoehybrid decoder "
                                 "whose every layer is attention (Mamba layers are not ported)")
            if getattr(t, "num_local_experts", 0):
                raise ValueError(f"text_config.num_local_experts={t.num_local_experts}: expert layers are not ported "
                                 "(a dense granitemoehybrid decoder has 0)")
            if getattr(t, "position_embedding_type", "rope") != "rope":
                raise ValueError(f"text_config.position_embedding_type={t.position_embedding_type!r}: FMS's Granite "
                                 "applies RoPE; a decoder without positional embeddings (nope) is not ported")
        rope = dict(getattr(t, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"decoder RoPE type {rope.get('rope_type')!r} is not supported (only 'default')")
        if getattr(t, "attention_bias", False) or getattr(t, "mlp_bias", False):
            raise ValueError("decoder attention_bias / mlp_bias are not supported by this port")
        if getattr(pc, "use_qformer_text_input", False):
            raise ValueError("projector use_qformer_text_input=True is not supported by this port")
        act = str(getattr(t, "hidden_act", "silu"))
        if act not in _SAME_ACTIVATION:
            raise ValueError(f"decoder hidden_act {act!r} is not implemented by FMS Granite's gated MLP (it runs "
                             f"{', '.join(sorted(_SAME_ACTIVATION))}); this checkpoint cannot be ported as it is")
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        decoder = _granite_config(
            vocab=t.vocab_size,
            dim=t.hidden_size,
            layers=t.num_hidden_layers,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads or t.num_attention_heads,
            head_dim=head_dim,
            ffn=t.shared_intermediate_size if text_type == "granitemoehybrid" else t.intermediate_size,
            rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10_000.0))),
            max_seq_len=t.max_position_embeddings,
            norm_eps=t.rms_norm_eps,
            embedding_multiplier=t.embedding_multiplier,
            residual_multiplier=t.residual_multiplier,
            attention_multiplier=t.attention_multiplier,
            logits_scaling=t.logits_scaling,
            tie=bool(getattr(hf_config, "tie_word_embeddings", True) and getattr(t, "tie_word_embeddings", True)),
            pad_id=t.pad_token_id if t.pad_token_id is not None else -1,
            activation=_SAME_ACTIVATION[act],
        )
        return cls(
            encoder=EncoderConfig(
                input_dim=ec.input_dim,
                num_layers=ec.num_layers,
                hidden_dim=ec.hidden_dim,
                feedforward_mult=ec.feedforward_mult,
                num_heads=ec.num_heads,
                dim_head=ec.dim_head,
                output_dim=ec.output_dim,
                context_size=ec.context_size,
                max_pos_emb=ec.max_pos_emb,
                conv_kernel_size=ec.conv_kernel_size,
                conv_expansion_factor=ec.conv_expansion_factor,
                cat_hidden_layers=tuple(getattr(ec, "cat_hidden_layers", None) or ()) or None,
            ),
            projector=ProjectorConfig(
                hidden_size=pc.hidden_size,
                num_layers=pc.num_hidden_layers,
                num_heads=pc.num_attention_heads,
                intermediate_size=pc.intermediate_size,
                encoder_hidden_size=pc.encoder_hidden_size,
                cross_attention_frequency=pc.cross_attention_frequency,
                hidden_act=pc.hidden_act,
                layer_norm_eps=pc.layer_norm_eps,
                window_size=hf_config.window_size,
                downsample_rate=hf_config.downsample_rate,
            ),
            decoder=decoder,
            lora=lora if hf_config.has_lora_adapter else None,
            decoder_type=text_type,
            audio_token_index=hf_config.audio_token_index,
        )

    @classmethod
    def load(cls, json_file) -> "GraniteSpeechConfig":
        """A config saved by ``save`` (FMS's ``ModelConfig.load``), every value checked before the model sees it.

        FMS's loader takes a JSON file on trust (a misspelt key is dropped, ``"16"`` is kept as a string, a missing
        section becomes FMS's default 6.7 B-parameter decoder); this one refuses, in one line naming the file and the
        field: a file that is not JSON or not an object; a missing or non-object ``encoder`` / ``projector`` /
        ``decoder`` section (``lora`` may be null: no adapter); an unknown key (with the closest valid name); a value
        of the wrong type (integers must be JSON integers, not ``"16"``, ``44.0`` or ``true``; floats may be
        integers; booleans must be ``true`` / ``false``, not ``"false"``).

        Raises:
            FileNotFoundError: no such file. ValueError: everything above, and whatever the config's own checks
            refuse (``__post_init__``).
        """
        import json
        from pathlib import Path

        path = Path(json_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a valid JSON config ({err}); save it again with config.save") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "the config") -> "GraniteSpeechConfig":
        """``load``'s checks on a dict already parsed (``as_dict()`` output); see ``load``.

        Raises:
            ValueError: a missing or malformed section, an unknown key, a value of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a Granite Speech config is a JSON object, got a JSON "
                             f"{_JSON_TYPE.get(type(data).__name__, type(data).__name__)}")
        kwargs = _checked_fields(cls, data, source, "", skip=("encoder", "projector", "decoder", "lora"))
        for name, sub in (("encoder", EncoderConfig), ("projector", ProjectorConfig), ("decoder", GraniteConfig),
                          ("lora", LoRAConfig)):
            value = data.get(name, ...)
            if value is ... and name != "lora":
                raise ValueError(f"{source}: the {name!r} section is missing; a Granite Speech config needs encoder, "
                                 "projector and decoder (save it with config.save)")
            if value is None and name == "lora":
                kwargs["lora"] = None
            elif value is not ...:
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: {name!r} is a JSON {_JSON_TYPE.get(type(value).__name__)}, not an "
                                     "object of its fields")
                kwargs[name] = sub(**_checked_fields(sub, value, source, name + "."))
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from None

    def replace(self, **changes) -> "GraniteSpeechConfig":
        """A copy with top-level fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def updated(self, **kwargs) -> "GraniteSpeechConfig":
        """FMS's ``ModelConfig.updated`` (a deep copy with fields replaced; a dict updates a nested config's fields,
        ``lora={"alpha": 16.0}``), then the same validation as construction.

        Raises:
            TypeError: a field this config does not have (FMS only logs those; a typo here would be silent).
            ValueError: the result is not a valid config.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown Granite Speech config fields {unknown}; valid: {', '.join(sorted(names))}")
        if isinstance(kwargs.get("lora"), dict) and self.lora is None:
            kwargs = {**kwargs, "lora": LoRAConfig(**kwargs["lora"])}
        new = super().updated(**kwargs)
        for sub in (new.encoder, new.projector, new.lora):
            if sub is not None:
                sub.__post_init__()
        new.__post_init__()
        return new


# transformers' ACT2FN names whose function FMS's ``str_to_activation`` computes the same way -> FMS's name
_SAME_ACTIVATION = {"silu": "swish", "swish": "swish", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_pytorch_tanh",
                    "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "mish": "mish"}
_JSON_TYPE = {"NoneType": "null", "list": "array", "dict": "object", "str": "string", "bool": "boolean",
              "int": "integer", "float": "number"}


def _checked_fields(cls, data: dict, source: str, prefix: str, skip: tuple = ()) -> dict:
    """``data``'s fields for dataclass ``cls``, each checked against its annotation (see ``GraniteSpeechConfig.load``).

    Raises:
        ValueError: an unknown key (with the closest valid name) or a value of the wrong type, naming ``source`` and
            the field.
    """
    import difflib
    import json
    import typing

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(names)}"
            raise ValueError(f"{source}: unknown config key {prefix + key!r}{hint}")
        want = hints.get(key)
        if typing.get_origin(want) is typing.Union:  # Optional[X]
            args = [a for a in typing.get_args(want) if a is not type(None)]
            if value is None:
                out[key] = None
                continue
            want = args[0] if len(args) == 1 else None
        ok = (want is None or want is typing.Any
              or (want is bool and isinstance(value, bool))
              or (want is int and isinstance(value, int) and not isinstance(value, bool))
              or (want is float and isinstance(value, (int, float)) and not isinstance(value, bool))
              or (want is str and isinstance(value, str))
              or (want in (tuple, list) and isinstance(value, (list, tuple)))
              or (want is dict and isinstance(value, dict))
              or (want not in (bool, int, float, str, tuple, list, dict)))
        if not ok:
            raise ValueError(f"{source}: {prefix + key} is {json.dumps(value)} (a JSON "
                             f"{_JSON_TYPE.get(type(value).__name__, type(value).__name__)}); it must be "
                             f"{'a JSON integer' if want is int else 'true or false' if want is bool else want.__name__}")
        out[key] = float(value) if want is float else value
    return out


def _decoder_ffn_dim(d: GraniteConfig) -> int:
    """FMS's GatedLinearUnit width: ``int(hidden_grow_factor * emb_dim)`` rounded up to ``multiple_of``."""
    hidden = int(d.hidden_grow_factor * d.emb_dim)
    if d.multiple_of:
        hidden = d.multiple_of * ((hidden + d.multiple_of - 1) // d.multiple_of)
    return hidden


def _granite_config(
    *,
    vocab: int,
    dim: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ffn: int,
    rope_theta: float,
    max_seq_len: int,
    norm_eps: float,
    embedding_multiplier: float,
    residual_multiplier: float,
    attention_multiplier: float,
    logits_scaling: float,
    tie: bool,
    pad_id: int = -1,
    activation: str = "swish",
) -> GraniteConfig:
    """An FMS ``GraniteConfig`` whose MLP width is exactly ``ffn``.

    FMS derives the width as ``int(hidden_grow_factor * emb_dim)`` rounded up to ``multiple_of``; float rounding can
    land one below ``ffn`` (e.g. 136/56*56 = 135.99..), so ``multiple_of`` is chosen as a divisor of ``ffn`` that
    makes the round-up land exactly on it. FMS tensor parallelism sizes each rank's MLP the same way from
    ``hidden_grow_factor / world_size``, so ``multiple_of`` also divides ``ffn / tp`` for the largest ``tp`` of 8, 4, 2
    it can (3.3-2b: 256, up to 8 ranks; 3.3-8b: 64, up to 8; tiny: 2, up to 4).
    """
    multiple_of = next((m for tp in (8, 4, 2) for m in (256, 64, 16, 8, 4, 2) if ffn % (m * tp) == 0), 1)
    cfg = GraniteConfig(
        src_vocab_size=vocab,
        emb_dim=dim,
        norm_eps=norm_eps,
        nheads=heads,
        kvheads=kv_heads,
        head_dim=head_dim,
        nlayers=layers,
        pad_id=pad_id,
        hidden_grow_factor=ffn / dim,
        multiple_of=multiple_of,
        max_expected_seq_len=max_seq_len,
        rope_theta=rope_theta,
        p_dropout=0.0,
        tie_heads=tie,
        embedding_multiplier=embedding_multiplier,
        residual_multiplier=residual_multiplier,
        attention_multiplier=attention_multiplier,
        logits_scaling=logits_scaling,
        activation_fn=activation,
    )
    if _decoder_ffn_dim(cfg) != ffn:
        raise ValueError(f"cannot express decoder intermediate_size={ffn} as an FMS GraniteConfig")
    return cfg


# -- named variants -------------------------------------------------------------------------------------------------

_TINY = GraniteSpeechConfig(
    encoder=EncoderConfig(
        input_dim=160,
        num_layers=16,
        hidden_dim=44,
        feedforward_mult=4,
        num_heads=3,
        dim_head=20,
        output_dim=29,
        context_size=32,
        max_pos_emb=40,
        conv_kernel_size=15,
        conv_expansion_factor=2,
    ),
    projector=ProjectorConfig(
        hidden_size=40,
        num_layers=2,
        num_heads=4,
        intermediate_size=72,
        encoder_hidden_size=44,
        cross_attention_frequency=1,
        window_size=15,
        downsample_rate=5,
    ),
    decoder=_granite_config(
        vocab=211,
        dim=56,
        layers=4,
        heads=4,
        kv_heads=2,
        head_dim=14,
        ffn=136,
        rope_theta=10_000.0,
        max_seq_len=1024,
        norm_eps=1e-5,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.07,
        logits_scaling=8.0,
        tie=True,
        pad_id=0,
    ),
    lora=LoRAConfig(rank=4, alpha=6.0),
    audio_token_index=210,
)

_SPEECH_ENCODER = EncoderConfig()  # the real encoder: 16 x 1024, 8 heads x 128, context 200, CTC 256
_SPEECH_PROJECTOR = ProjectorConfig()

# The 3.3 decoders share everything but their widths, attention scale and logits scale.
_3_3_DECODER = dict(
    vocab=49160,
    layers=40,
    heads=32,
    kv_heads=8,
    rope_theta=10_000_000.0,
    max_seq_len=131072,
    norm_eps=1e-5,
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    tie=True,
    pad_id=0,
)

_2B = GraniteSpeechConfig(
    encoder=_SPEECH_ENCODER,
    projector=_SPEECH_PROJECTOR,
    decoder=_granite_config(
        **_3_3_DECODER, dim=2048, head_dim=64, ffn=8192, attention_multiplier=0.015625, logits_scaling=8.0
    ),
    lora=LoRAConfig(rank=64, alpha=32.0),
    audio_token_index=49159,
)

_8B = _2B.replace(
    decoder=_granite_config(
        **_3_3_DECODER, dim=4096, head_dim=128, ffn=12800, attention_multiplier=0.0078125, logits_scaling=16.0
    )
)

# granite-4.0-1b-speech, granite-speech-4.1-2b and granite-speech-4.1-2b-plus share one structure (CrispStrobe/CrispASR,
# TODO.md item 54: all three run a "Granite-1B AR" decoder; its models/convert-granite-speech-to-gguf.py reads a
# 4.0-1b-speech folder): the 3.3 encoder (16 blocks of 1024, 8 heads x 128) whose CTC head has 348 outputs for the
# multilingual character set (CrispASR HISTORY.md, "CTC dim 348"), the 3.3 projector (2 Q-Former layers, window 15,
# downsample 5, 3 queries), no modality LoRA adapter (the converter: "4.0-1b does not"), and the decoder of
# granite-4.0-1b(-base): 40 layers of 2048, 16 heads / 4 key-value heads of 128, MLP 4096, RoPE theta 1e7, 128k
# positions, muP multipliers embedding 12, attention 1/128, residual 0.22, logits 8, tied head, pad 100256 (the
# base model's config.json), and one added audio token: vocab 100353 (the converter's embed_tokens shape) with
# audio_token_index 100352. The speech folders' weight names are GraniteForCausalLM's (mlp.gate_proj/up_proj/
# down_proj in the converter), so these variants read text_config as "granite"; a folder whose text_config names
# granitemoehybrid (granite-4.0-1b-base's own class) is read as well (tiny-4.0 covers that path). A real folder's
# config.json decides every width: these variants are for random-weight runs at the released sizes.
_4_0_ENCODER = dataclasses.replace(_SPEECH_ENCODER, output_dim=348)
_GRANITE_4_0_1B_DECODER = _granite_config(
    vocab=100353,
    dim=2048,
    layers=40,
    heads=16,
    kv_heads=4,
    head_dim=128,
    ffn=4096,
    rope_theta=10_000_000.0,
    max_seq_len=131072,
    norm_eps=1e-5,
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.0078125,
    logits_scaling=8.0,
    tie=True,
    pad_id=100256,
)
_4_0_1B = GraniteSpeechConfig(encoder=_4_0_ENCODER, projector=_SPEECH_PROJECTOR, decoder=_GRANITE_4_0_1B_DECODER,
                              lora=None, audio_token_index=100352)
# granite-speech-4.1-2b: the same structure (the "2b" counts the encoder and projector with the 1B decoder).
_4_1_2B = _4_0_1B

# Granite Speech Plus (granite-speech-4.1-2b-plus; transformers' GraniteSpeechPlusForConditionalGeneration): the
# encoder's hidden state after block 3 is concatenated with its final output (cat_hidden_layers [3], the released
# model per its model card and transformers' GraniteSpeechPlusConfig docs), so the projector's Q-Former
# cross-attention reads 2 x 1024 = 2048 features; everything else is 4.1-2b's.
_PLUS_ENCODER = dict(cat_hidden_layers=(3,))
_TINY_PLUS = _TINY.replace(encoder=dataclasses.replace(_TINY.encoder, **_PLUS_ENCODER),
                           projector=dataclasses.replace(_TINY.projector, encoder_hidden_size=2 * 44))
_4_1_2B_PLUS = _4_1_2B.replace(encoder=dataclasses.replace(_4_1_2B.encoder, **_PLUS_ENCODER),
                               projector=dataclasses.replace(_4_1_2B.projector, encoder_hidden_size=2 * 1024))

# The tiny members: tiny's widths at the real depth. tiny-4.1 has 4.1's structure (no LoRA adapter, a granite
# text_config); tiny-4.0 reads its decoder from a granitemoehybrid text_config, granite-4.0-1b-base's config.json
# class (every layer attention, no experts, RoPE: the dense form FMS's Granite runs; llama.cpp's converter likewise
# folds it into GraniteModel, ggml-org/llama.cpp PR 22101), so both text_config readings a 4.x folder may carry are
# exercised.
_TINY_4_1 = _TINY.replace(lora=None)
_TINY_4_0 = _TINY.replace(lora=None, decoder_type="granitemoehybrid")

VARIANTS: dict[str, GraniteSpeechConfig] = {
    "tiny": _TINY, "3.3-2b": _2B, "3.3-8b": _8B,
    "tiny-4.0": _TINY_4_0, "4.0-1b": _4_0_1B,
    "tiny-4.1": _TINY_4_1, "4.1-2b": _4_1_2B,
    "tiny-plus": _TINY_PLUS, "4.1-2b-plus": _4_1_2B_PLUS,
}


def get_config(variant: str) -> GraniteSpeechConfig:
    """A fresh copy of a named variant's config.

    Raises:
        ValueError: unknown variant (the message lists the known ones).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Granite Speech variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    return copy.deepcopy(VARIANTS[variant])
