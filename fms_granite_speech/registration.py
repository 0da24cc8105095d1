"""Granite Speech in FMS's registries: named variants, the HF checkpoint adapter, ``get_model("hf_pretrained")``.

Importing this module (``import fms_granite_speech`` does) makes the model available the way every FMS model is:

* ``fms.models.get_model("granite_speech", variant, model_path=DIR, source="hf")`` for the variants of
  ``config.VARIANTS`` (``tiny``, ``3.3-2b``, ``3.3-8b``, ``tiny-4.0``, ``4.0-1b``, ``tiny-4.1``, ``4.1-2b``,
  ``tiny-plus``, ``4.1-2b-plus``); keyword arguments override config fields
  (``fused_weights=False``, ``decoder={"nlayers": 2}``), ``distributed_strategy="tp"`` shards the decoder;
* the ``"hf"`` adapter of ``granite_speech``: small pure functions over a (partial) state dict, registered with
  ``fms.utils.serialization.register_adapter_step``, as FMS applies them to the keys of one layer at a time;
* ``fms.models.get_model("hf_pretrained", model_path=DIR)`` for a transformers folder whose config names
  ``GraniteSpeechForConditionalGeneration`` (the architecture and the LoRA adapter are read from the folder).

FMS's ``get_model`` does not hand ``model_path`` to the factory and loads every ``*.safetensors`` of a folder, so
``get_model`` here (``fms_granite_speech.get_model``) checks the folder first (``folder.check_checkpoint_folder``:
safetensors only, one weight set, complete files) and then calls FMS's; ``get_model("hf_pretrained")`` gets the same
check from the param builder below, which FMS calls with the folder's config.
"""

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from fms import models
from fms.utils import serialization

from fms_granite_speech import _fms_compat
from fms_granite_speech._strict import template_regex
from fms_granite_speech.config import GraniteSpeechConfig, VARIANTS, get_config
from fms_granite_speech.conformer import hf_encoder_to_fms
from fms_granite_speech.folder import check_checkpoint_folder, read_json
from fms_granite_speech.lora import LORA_TARGETS, read_lora_config
from fms_granite_speech.model import GraniteSpeech
from fms_granite_speech.projector import hf_projector_to_fms

__all__ = ["ARCHITECTURE", "build_granite_speech_params", "expected_shapes", "get_model", "hf_decoder_key"]

ARCHITECTURE = "granite_speech"


# -- named variants -------------------------------------------------------------------------------------------------


def _factory_factory(variant: str) -> Callable[..., GraniteSpeech]:
    def factory(config: Optional[GraniteSpeechConfig] = None, vision_only: bool = False,
                model_path: Optional[str] = None, **kwargs) -> GraniteSpeech:
        """Build the ``variant`` model; ``config=`` replaces the whole config, other keywords go to ``GraniteSpeech``
        (config overrides, ``distributed_strategy``). ``vision_only`` and ``model_path`` are accepted because
        ``get_model`` always / for ``hf_pretrained`` passes them (the folder is checked by ``get_model`` here and by
        ``build_granite_speech_params``)."""
        if vision_only:
            raise ValueError("vision_only=True does not apply to Granite Speech")
        cfg = get_config(variant) if config is None else config
        if not isinstance(cfg, GraniteSpeechConfig):
            raise TypeError(f"config= must be a GraniteSpeechConfig, got {type(cfg).__name__}")
        return GraniteSpeech(cfg, **kwargs)

    factory.__name__ = f"granite_speech_{variant.replace('.', '_').replace('-', '_')}"
    return factory


for _variant in VARIANTS:
    models.register_model(ARCHITECTURE, _variant, _factory_factory(_variant))


def get_model(variant: Optional[str] = None, model_path: Union[None, str, Path] = None, **kwargs) -> GraniteSpeech:
    """``fms.models.get_model`` for Granite Speech, with the checkpoint folder checked before FMS globs it.

    Args:
        variant: a named variant of ``config.VARIANTS`` (``tiny``, ``3.3-2b``, ``4.0-1b``, ...), or None to take the architecture from
            ``model_path``'s config.json (FMS's ``hf_pretrained``).
        model_path: an HF checkpoint folder (config.json, safetensors, optional peft adapter), or None for random
            weights (``reset_parameters``).
        **kwargs: passed to FMS's ``get_model`` (``device_type``, ``data_type``, ``distributed_strategy``, config
            overrides such as ``fused_weights=False``).

    Raises:
        ValueError: neither a variant nor a folder, or a folder FMS would load wrongly (see
            ``folder.check_checkpoint_folder``; the message names the file and the fix).
        FileNotFoundError: no such folder.
    """
    if model_path is not None:
        check_checkpoint_folder(model_path)
    if _wants_tp(kwargs.get("distributed_strategy")):
        if variant is None and model_path is not None:  # the folder's text_config (checked readable above)
            text = read_json(Path(model_path) / "config.json").get("text_config") or {}
            heads = int(text.get("num_attention_heads", 0))
            check_tensor_parallel(heads, int(text.get("num_key_value_heads") or heads))
        else:
            decoder = get_config(variant or "tiny").decoder
            check_tensor_parallel(decoder.nheads, decoder.kvheads)
    if variant is None:
        if model_path is None:
            raise ValueError("give a variant (tiny, 3.3-2b, 3.3-8b) or model_path=DIR of a Granite Speech checkpoint")
        return models.get_model("hf_pretrained", model_path=str(model_path), **kwargs)
    source = "hf" if model_path is not None else None
    return models.get_model(ARCHITECTURE, variant, model_path=None if model_path is None else str(model_path),
                            source=source, **kwargs)


def _wants_tp(strategy: Any) -> bool:
    from fms.distributed.strategy import TensorParallelStrategy

    return strategy == "tp" or isinstance(strategy, TensorParallelStrategy)


def check_tensor_parallel(nheads: int, kvheads: int) -> int:
    """The world size FMS tensor parallelism will shard the decoder over, checked before FMS builds anything.

    Raises:
        ValueError: no initialised process group (not run under torchrun, or ``init_process_group`` not called), or
            a world size that does not divide the decoder's query heads and key/value heads (FMS would assert on
            every rank); the message names the fix.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed_strategy='tp' needs a process group: run under torchrun --nproc-per-node N and "
                         "call torch.distributed.init_process_group() first (or drop distributed_strategy)")
    world = dist.get_world_size()
    if nheads % world or (kvheads and (kvheads % world and world % kvheads)):
        raise ValueError(f"tensor parallelism over {world} ranks cannot split the decoder's {nheads} query heads and "
                         f"{kvheads} key/value heads; use a --nproc-per-node that divides {nheads}"
                         + (f" and {kvheads}" if kvheads else ""))
    return world


# -- HF -> FMS checkpoint adapter -----------------------------------------------------------------------------------
#
# Small pure functions over a (partial) state dict, as FMS's loader applies them to the keys of one layer at a time
# (everything up to the first number of a key). They accept every layout a Granite Speech checkpoint comes in:
#   on disk (transformers 4.x):  encoder.*  projector.*  language_model.model.*        language_model.lm_head.*
#   on disk (transformers 5.17): encoder.*  projector.*  language_model.model.model.*  language_model.lm_head.*
#   runtime (state_dict()):      model.encoder.*  model.projector.*  model.language_model.*  lm_head.*
#   peft adapter file:           base_model.model.<runtime or 4.x name>.lora_{A,B}[.default].weight
# The decoder goes through FMS granite's own registered "hf" adapter (names, RoPE row permutation, qkv / gate-up
# fusion as model_config.fused_weights asks); LoRA B rows of q/k go through granite's registered RoPE step, so they
# line up with the permuted base rows.

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
_FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def hf_decoder_key(key: str) -> Optional[str]:
    """An HF decoder key in GraniteForCausalLM naming (``model.layers.0...``, ``lm_head.weight``), else None."""
    for hf_prefix, prefix in _DECODER_PREFIXES:
        if key.startswith(hf_prefix):
            return prefix + key[len(hf_prefix):]
    return None


def _model_config(model_config: Any) -> GraniteSpeechConfig:
    if not isinstance(model_config, GraniteSpeechConfig):
        raise ValueError(
            "the granite_speech HF adapter needs model_config=GraniteSpeechConfig (FMS passes the model's config); "
            f"got {type(model_config).__name__}"
        )
    return model_config


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
            rope = rope or _fms_compat.registered_step("granite", "hf_to_fms_rope")
            proj = "query" if target == "q_proj" else "key"
            name = f"base_model.layers.{layer}.attn.in_proj.{proj}.weight"
            value = rope({name: value}, model_config=cfg.decoder)[name]
        new = f"lora.layers.{layer}.{target}.{ab}"
        _merge_into(out, {new: value}, {new: key})
    return out


def hf_decoder_shapes(d) -> dict[str, tuple[int, ...]]:
    """The shapes the HF decoder tensors (GraniteForCausalLM names, ``{}`` a layer index) must have for FMS decoder
    config ``d``: what ``config.json``'s ``text_config`` says, so a tensor of another size is named in HF's terms."""
    from fms_granite_speech.config import _decoder_ffn_dim

    dim, q, kv, ffn = d.emb_dim, d.nheads * d.head_dim, (d.kvheads or d.nheads) * d.head_dim, _decoder_ffn_dim(d)
    return {"model.embed_tokens.weight": (d.src_vocab_size, dim), "lm_head.weight": (d.src_vocab_size, dim),
            "model.norm.weight": (dim,),
            "model.layers.{}.self_attn.q_proj.weight": (q, dim), "model.layers.{}.self_attn.k_proj.weight": (kv, dim),
            "model.layers.{}.self_attn.v_proj.weight": (kv, dim), "model.layers.{}.self_attn.o_proj.weight": (dim, q),
            "model.layers.{}.mlp.gate_proj.weight": (ffn, dim), "model.layers.{}.mlp.up_proj.weight": (ffn, dim),
            "model.layers.{}.mlp.down_proj.weight": (dim, ffn), "model.layers.{}.input_layernorm.weight": (dim,),
            "model.layers.{}.post_attention_layernorm.weight": (dim,)}


def _drop_misshapen(decoder: dict, sources: Mapping[str, str], d, problems: Optional[list]) -> None:
    """Tensors of ``decoder`` (GraniteForCausalLM names) whose shape is not ``hf_decoder_shapes``': one message each
    naming the checkpoint's key and both shapes (raised, or appended to ``problems`` with the tensor and its fusion
    partners dropped, so FMS's fusion never meets them)."""
    shapes = [(template_regex(t), shape) for t, shape in hf_decoder_shapes(d).items()]
    bad = []
    for rel, value in decoder.items():
        want = next((shape for pattern, shape in shapes if pattern.match(rel)), None)
        if want is not None and tuple(value.shape) != want:
            bad.append((rel, f"tensor {sources[rel]!r} has shape {list(value.shape)}, config.json's text_config "
                             f"expects {list(want)}"))
    if bad and problems is None:
        raise ValueError("checkpoint does not fit the Granite Speech config: " + "; ".join(m for _, m in bad))
    for rel, message in bad:
        problems.append((sources[rel], message))
        m = re.match(r"^(model\.layers\.\d+\.)((?:self_attn|mlp)\.\w+)\.weight$", rel)
        group = next((g for g in _FUSED_GROUPS if m and m.group(2) in g), (rel,) if not m else (m.group(2),))
        for site in group:
            decoder.pop(f"{m.group(1)}{site}.weight" if m else site, None)


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


_SHARED_MLP = re.compile(r"^(model\.layers\.\d+\.)shared_mlp\.(input_linear|output_linear)\.weight$")


def _granite_mlp_names(decoder: dict, sources: dict) -> None:
    """A granitemoehybrid decoder's MLP in GraniteForCausalLM names, in place: ``shared_mlp.input_linear`` holds the
    gate rows then the up rows (transformers' ``GraniteMoeHybridMLP`` chunks its output in two and activates the
    first), ``shared_mlp.output_linear`` is ``down_proj``."""
    for key in [k for k in decoder if _SHARED_MLP.match(k)]:
        layer, which = _SHARED_MLP.match(key).groups()
        value, source = decoder.pop(key), sources.pop(key)
        if which == "output_linear":
            decoder[layer + "mlp.down_proj.weight"], sources[layer + "mlp.down_proj.weight"] = value, source
            continue
        if value.shape[0] % 2:
            raise ValueError(f"{source} has {value.shape[0]} rows: gate and up rows stacked must be an even count")
        half = value.shape[0] // 2
        for name, rows in (("gate_proj", value[:half]), ("up_proj", value[half:])):
            decoder[f"{layer}mlp.{name}.weight"], sources[f"{layer}mlp.{name}.weight"] = rows, source


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
        _granite_mlp_names(decoder, sources)
        d = _model_config(model_config).decoder
        _drop_misshapen(decoder, sources, d, kwargs.get("problems"))
    if decoder:
        if d.head_dim != d.emb_dim // d.nheads:
            raise ValueError(
                f"FMS granite's HF RoPE permutation assumes head_dim == emb_dim // nheads; got head_dim={d.head_dim}, "
                f"emb_dim={d.emb_dim}, nheads={d.nheads}"
            )
        _check_fusion_groups(decoder)
        adapted = _fms_compat.adapter("granite", "hf")(decoder, model_config=d)
        _merge_into(out, {"decoder." + k: v for k, v in adapted.items()}, {})
    return out


_EXPECTED_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def expected_shapes(config: GraniteSpeechConfig) -> dict[str, tuple[int, ...]]:
    """FMS state-dict keys a checkpoint must / may fill and their shapes, for the whole (unsharded) model built on
    the meta device once per config (cached)."""
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


def _fms_decoder_layout(input_sd: Mapping[str, Any], model_config=None, **kwargs) -> Mapping[str, Any]:
    """FMS-format checkpoints (``source="fms"``, FMS's default for ``get_model(..., model_path=FILE)``): the decoder's
    q/k/v and gate/up tensors in the layout the model is built with, whichever the file holds.

    A fused model (``fused_weights=True``) takes unfused tensors through FMS granite's own ``weight_fusion`` step; an
    unfused one (``fused_weights=False``) gets ``attn.in_proj.qkv_fused`` split into ``query`` / ``key`` / ``value``
    (rows ``nheads * head_dim``, ``kvheads * head_dim``, ``kvheads * head_dim``) and ``ff_sub_layer.wg1_fused`` into
    ``wg`` / ``w1`` (its two halves, gate first), as ``fms.utils.fusion`` orders them. Every other tensor passes.
    """
    cfg = _model_config(model_config)
    if cfg.fused_weights:  # the decoder's keys only: the Q-Former's own modules have their own q/k/v and wg names
        decoder = {k: v for k, v in input_sd.items() if k.startswith("decoder.")}
        fuse = _fms_compat.registered_step("granite", "weight_fusion")
        return {**{k: v for k, v in input_sd.items() if k not in decoder}, **fuse(decoder, model_config=cfg.decoder)}
    d = cfg.decoder
    q_rows, kv_rows = d.nheads * d.head_dim, (d.kvheads or d.nheads) * d.head_dim
    out: dict[str, Any] = {}
    for key, value in input_sd.items():
        qkv = _QKV_FUSED.fullmatch(key)
        glu = _GLU_FUSED.fullmatch(key)
        if qkv:
            for name, part in zip(("query", "key", "value"), value.split([q_rows, kv_rows, kv_rows], dim=0)):
                out[f"{qkv[1]}.{name}.{qkv[2]}"] = part
        elif glu:
            for name, part in zip(("wg", "w1"), value.chunk(2, dim=0)):
                out[f"{glu[1]}.{name}.{glu[2]}"] = part
        else:
            out[key] = value
    return out


_QKV_FUSED = re.compile(r"(decoder\.base_model\.layers\.\d+\.attn\.in_proj)\.qkv_fused\.(weight|bias)")
_GLU_FUSED = re.compile(r"(decoder\.base_model\.layers\.\d+\.ff_sub_layer)\.wg1_fused\.(weight|bias)")

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
    serialization.register_adapter_step(ARCHITECTURE, _name, _step)
serialization.register_adapter(ARCHITECTURE, "hf", [name for name, _ in _HF_STEPS])
serialization.register_adapter_step(ARCHITECTURE, "fms_decoder_layout", _fms_decoder_layout)
serialization.register_adapter(ARCHITECTURE, "fms", ["fms_decoder_layout", "check_against_model"])


# -- HF config registry (get_model("hf_pretrained", model_path=DIR)) ------------------------------------------------


def build_granite_speech_params(hf_config) -> dict:
    """FMS param builder: a transformers ``GraniteSpeechConfig`` (+ the folder's adapter_config.json) -> kwargs.

    FMS calls it inside ``get_model("hf_pretrained", model_path=DIR)``; ``hf_config`` remembers its folder as
    ``name_or_path``, which is checked here (``folder.check_checkpoint_folder``) before FMS globs it. The LoRA rank /
    alpha / targets come from ``adapter_config.json``. Returns ``{"config": ...}`` for the ``granite_speech``
    factory.

    Raises:
        ValueError: the folder is refused, or config.json declares ``has_lora_adapter`` but the folder has no
            adapter (``checkpoint.load_checkpoint(DIR, adapter=False)`` loads the base model).
    """
    folder = Path(str(getattr(hf_config, "name_or_path", "") or ""))
    lora = None
    if folder.is_dir():
        check_checkpoint_folder(folder)
        lora = read_lora_config(folder)
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


_fms_compat.register_hf_config("GraniteSpeechForConditionalGeneration", ARCHITECTURE, build_granite_speech_params)
# Granite Speech Plus (granite-speech-4.1-2b-plus) folders name GraniteSpeechPlusForConditionalGeneration: the same FMS
# model, its encoder concatenating the hidden states config.json lists (encoder_config.cat_hidden_layers)
_fms_compat.register_hf_config("GraniteSpeechPlusForConditionalGeneration", ARCHITECTURE, build_granite_speech_params)
