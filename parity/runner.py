"""Running one side of a parity pair: sections of a model, captures, float64 views, and module replays.

The runner half of the engine (Polygraphy's split): nothing here decides pass or fail. ``parity.compare`` drives it.

* ``run_section(side, model, inputs, upto, dtype)`` runs a model up to the end of a section, the way its own forward
  runs it; what the hooks capture is the product. ``compose=True`` (HF only) runs HF's sub-modules in the order of
  ``GraniteSpeechForConditionalGeneration.forward`` instead of calling that forward, for a float64 run of a model
  whose parameters are still in the low-precision dtype (HF's forward casts the features to ``self.dtype``).
* ``float64(module)`` gives a module float64 parameters for the duration and restores them bit for bit;
  ``float64_units(model, units)`` does it unit by unit as a forward runs (pre/post hooks), so a float64 run needs the
  memory of one block in float64, not of a float64 copy of the model (3.3-2b: 24 GB).
* ``REPLAYS``: per path-map ``kind``, how the FMS module is run on the HF module's recorded call (``fms``) and how
  HF's own module is run again in float64 on that call (``hf64``): the error a layer *introduces*.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from parity._tree import map_tensors
from parity.capture import first_tensor
from parity.pathmap import SECTION_MODULES, template_of

__all__ = ["REPLAYS", "Replay", "bind", "float64", "float64_units", "iter_calls", "replay_fms", "replay_hf64",
           "run_section", "to_float64", "units"]


# -- running a section ------------------------------------------------------------------------------------------------


def _first(value: Any) -> torch.Tensor:
    t = first_tensor(value)
    if t is None:
        raise TypeError(f"expected a tensor output, got {type(value).__name__}")
    return t


def run_section(side: str, model: nn.Module, inputs, upto: str, dtype: torch.dtype, *, compose: bool = False) -> None:
    """Run ``model`` (HF when ``side == "hf"``, else FMS) on ``inputs`` up to the end of section ``upto``.

    Features are cast to ``dtype`` for the encoder; the decoder section runs the whole model forward (HF:
    ``input_ids``, ``input_features``, ``input_features_mask``; FMS the same), or with ``compose`` HF's modules in
    the order its forward runs them: encoder, projector, ``get_merged_audio_embeddings`` (or ``embed_tokens`` of the
    ids with ``<|audio|>`` set to 0), ``language_model(inputs_embeds=...)``, ``lm_head``.
    """
    feats = inputs.input_features
    if feats is not None:
        feats = feats.to(dtype)
    if upto == "features":
        return
    # the module of each section on this side (pathmap.SECTION_MODULES), called as the model's forward calls it
    part = {name: model.get_submodule(path) for name, path in SECTION_MODULES[side].items()}
    if upto in ("encoder", "projector"):
        hidden = part["encoder"](feats)
        if upto == "projector":
            part["projector"](_first(hidden))
        return
    if side == "hf" and compose:
        ids = inputs.input_ids
        if feats is not None:
            audio = part["projector"](_first(part["encoder"](feats)))
            embeds = model.model.get_merged_audio_embeddings(ids, audio, inputs.input_features_mask)
        else:
            audio_id = model.config.audio_token_id
            embeds = part["decoder"].embed_tokens(torch.where(ids == audio_id, 0, ids)).to(dtype)
        model.lm_head(part["decoder"](inputs_embeds=embeds, use_cache=False).last_hidden_state)
    elif side == "hf":
        # no cache: a DynamicCache's per-layer state would be guarded by dynamo in compiled modes (one recompile per
        # decoder layer), and a parity forward never reads it
        model(input_ids=inputs.input_ids, input_features=feats, input_features_mask=inputs.input_features_mask,
              use_cache=False)
    else:
        model(inputs.input_ids, input_features=feats, input_features_mask=inputs.input_features_mask)


# -- float64 views ----------------------------------------------------------------------------------------------------


def to_float64(value: Any) -> Any:
    """Every floating tensor in ``value`` (nested tuples, lists, dicts) as float64; everything else unchanged."""
    return map_tensors(lambda t: t.to(torch.float64) if t.is_floating_point() else t, value)


def _tensors(module: nn.Module, recurse: bool) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    mods = module.modules() if recurse else [module]
    for m in mods:
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.is_floating_point():
                yield m, name, t


@contextlib.contextmanager
def float64(module: nn.Module, recurse: bool = True):
    """``module``'s floating parameters and buffers (its own only with ``recurse=False``) as float64 for the
    duration, then back to their dtypes: bit for bit, since every bf16/fp16/fp32 value is exact in float64. Tensors
    shared with other modules (a tied head) are converted once and restored once."""
    saved: dict[int, torch.dtype] = {}
    with torch.no_grad():
        for m, name, t in _tensors(module, recurse):
            if id(t) not in saved and t.dtype != torch.float64:
                saved[id(t)] = t.dtype
                t.data = t.data.to(torch.float64)
    try:
        yield module
    finally:
        with torch.no_grad():
            for m, name, t in _tensors(module, recurse):
                if id(t) in saved:
                    t.data = t.data.to(saved.pop(id(t)))


def units(model: nn.Module, regions: Sequence[str]) -> list[tuple[nn.Module, bool]]:
    """The units a streaming float64 run converts one at a time: each repeated block (``regions``, ``{}`` templates,
    whole) and every other module holding parameters or floating buffers of its own (those alone).

    Returns ``(module, recurse)`` pairs.
    """
    blocks = set(regions)
    out, inside = [], []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if template_of(name) in blocks:
            out.append((module, True))
            inside.append(name)
        elif any(True for _ in _tensors(module, recurse=False)):
            out.append((module, False))
    return out


@contextlib.contextmanager
def float64_units(model: nn.Module, regions: Sequence[str]):
    """While active, every unit of ``model`` (see ``units``) runs in float64: a forward pre-hook converts it, a
    forward hook converts it back. Peak extra memory: one unit in float64."""
    stacks: dict[int, Any] = {}

    def enter(recurse):
        def hook(module, args):
            ctx = float64(module, recurse=recurse)
            ctx.__enter__()
            stacks.setdefault(id(module), []).append(ctx)
        return hook

    def leave(module, args, output):
        stacks[id(module)].pop().__exit__(None, None, None)

    handles = []
    try:
        for module, recurse in units(model, regions):
            handles.append(module.register_forward_pre_hook(enter(recurse)))
            handles.append(module.register_forward_hook(leave))
        yield model
    finally:
        for h in handles:
            h.remove()
        for contexts in stacks.values():  # a forward that raised: restore what is still converted
            while contexts:
                contexts.pop().__exit__(None, None, None)


# -- replays: a module run on another model's recorded call ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forward_signature(forward) -> inspect.Signature:
    """The signature of a module class's ``forward`` function without ``self`` (one per class, not per call)."""
    return inspect.Signature(list(inspect.signature(forward).parameters.values())[1:])


def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A recorded call's arguments by parameter name (positional ones named by ``module.forward``'s signature)."""
    try:
        forward = getattr(module.forward, "__func__", None)
        signature = inspect.signature(module.forward) if forward is None else _forward_signature(forward)
        return dict(signature.bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):  # an unusual signature: positional ones by index
        return {**{f"arg{k}": a for k, a in enumerate(args)}, **kwargs}


def _x(bound: dict) -> torch.Tensor:
    """The first tensor argument of a call (what ``Capture(inputs=True)`` records)."""
    x = next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)
    if x is None:
        raise TypeError("the HF module was called without a tensor argument")
    return x


def _named(bound: dict, name: str) -> torch.Tensor:
    value = bound.get(name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the HF module was called without {name}")
    return value


@dataclass(frozen=True)
class Replay:
    """How to run one kind of row again on the HF module's recorded call.

    ``fms(fms_model, fms_module, bound, context)`` runs the FMS module the way its FMS parent calls it and returns the
    tensor to compare with the HF module's output; ``hf64(hf_module, args64, kwargs64, context64)`` runs HF's module in
    float64 (``None``: call it with the recorded arguments). ``context`` holds what a replay needs beyond the call
    (the inputs and, for the merge, HF's projector output); ``how`` is the sentence the report states.
    """

    fms: Callable[..., torch.Tensor]
    how: str
    hf64: Optional[Callable[..., torch.Tensor]] = None


def _fms_module(fms, module, bound, context):
    # Linear layers, norms, MLPs, the Q-Former self-attention and the projector: one tensor in, one out
    return module(_x(bound))


def _fms_conformer(fms, module, bound, context):
    # ConformerEncoder.forward: block(x, self.attention_dists), FMS's own relative-distance table
    return module(_x(bound), fms.encoder.attention_dists)


def _fms_qformer_cross(fms, module, bound, context):
    # QFormerLayer: cross_attn(x, memory), memory = the encoder frames cut into windows [B*nb, window, He]
    return module(_x(bound), _named(bound, "encoder_hidden_states").to(fms.projector.query.dtype))


def _fms_qformer_mlp(fms, module, bound, context):
    # HF's output_query(intermediate, input_tensor) is our mlp(input_tensor): the MLP's input is the attention output
    return module(_named(bound, "input_tensor"))


def _fms_qformer_layer(fms, module, bound, context):
    # QFormerProjector.forward: layer(x, memory); queries [1 or B*nb, num_queries, H] as HF hands them on
    return module(_x(bound), _named(bound, "encoder_hidden_states").to(fms.projector.query.dtype))


def _fms_merge(fms, module, bound, context):
    # GraniteSpeech.embed_inputs with HF's projector output as the audio: FMS's embedding lookup and its merge
    inputs = context["inputs"]
    ids = inputs.input_ids
    is_audio = ids == fms.config.audio_token_index
    embeds = fms.decoder.base_model.embedding(ids.masked_fill(is_audio, 0))
    audio = context.get("audio")
    if audio is None:
        return embeds
    return fms.merge_audio_embeddings(ids, embeds, audio, inputs.input_features_mask)


def _hf64_merge(hf_module, args, kwargs, context):
    # HF's own merge in float64: GraniteSpeechModel.get_merged_audio_embeddings, or the text embeddings alone
    inputs, hf = context["inputs"], context["hf"]
    ids = inputs.input_ids
    with float64(hf.model.language_model.embed_tokens):
        audio = context.get("audio")
        if audio is None:
            return hf.model.language_model.embed_tokens(torch.where(ids == hf.config.audio_token_id, 0, ids))
        return hf.model.get_merged_audio_embeddings(ids, audio.to(torch.float64), inputs.input_features_mask)


def _fms_decoder_attn(fms, module, bound, context):
    # GraniteBlock: attn(q=x) with no cache and no mask: causal SDPA over positions 0..L-1, as GraniteSpeech.forward
    # runs it without padding (the parity run feeds HF no attention_mask either)
    return _first(module(_x(bound)))


def _fms_decoder_layer(fms, module, bound, context):
    # GraniteHeadless.forward without a cache: layer(x=..., position_ids=None (0..L-1), past_key_value_state=None,
    # use_cache=False), causal SDPA
    return module(x=_x(bound), position_ids=None, past_key_value_state=None, use_cache=False)


def _fms_logits(fms, module, bound, context):
    # Granite.forward: head(dec_norm output) / logits_scaling; the path map's logits_scaling transform follows
    return fms.decoder.head(_x(bound)) / float(fms.config.decoder.logits_scaling)


REPLAYS: dict[str, Replay] = {
    "module": Replay(_fms_module, "fms_module(x), x = the HF module's input"),
    "conformer_attn": Replay(_fms_conformer, "fms_attn(x, fms.encoder.attention_dists), x = the HF module's input"),
    "conformer_block": Replay(_fms_conformer, "fms_block(x, fms.encoder.attention_dists), x = the HF block's input"),
    "qformer_cross": Replay(_fms_qformer_cross, "fms_cross_attn(x, memory), x / memory = the HF module's "
                                                "hidden_states / encoder_hidden_states"),
    "qformer_mlp": Replay(_fms_qformer_mlp, "fms_mlp(x), x = the input_tensor (attention output) of HF's output_query"),
    "qformer_layer": Replay(_fms_qformer_layer, "fms_layer(x, memory), x / memory = the HF layer's hidden_states / "
                                                "encoder_hidden_states"),
    "merge": Replay(_fms_merge, "fms embedding + merge_audio_embeddings(ids, HF's projector output, mask)",
                    hf64=_hf64_merge),
    "decoder_attn": Replay(_fms_decoder_attn, "fms_attn(x) (causal, positions 0..L-1), x = the HF module's input"),
    "decoder_layer": Replay(_fms_decoder_layer, "fms_layer(x=x, position_ids=None, past_key_value_state=None, "
                                                "use_cache=False), x = the HF layer's input"),
    "logits": Replay(_fms_logits, "fms.decoder.head(x) / logits_scaling, then the logits_scaling transform; x = "
                                  "lm_head's input"),
}


def replay_hf64(replay: Replay, hf_module: nn.Module, args: tuple, kwargs: dict, context: dict) -> torch.Tensor:
    """HF's module run again in float64 on a recorded call (the call's floating tensors cast to float64)."""
    args64, kwargs64 = to_float64(args), to_float64(kwargs)
    if replay.hf64 is not None:
        return _first(replay.hf64(hf_module, args64, kwargs64, context))
    with float64(hf_module):
        return _first(hf_module(*args64, **kwargs64))


def replay_fms(replay: Replay, fms: nn.Module, fms_module: nn.Module, bound: dict, context: dict) -> torch.Tensor:
    """The FMS module run on HF's recorded call, given as its arguments by name (``bind``)."""
    return _first(replay.fms(fms, fms_module, bound, context))


def iter_calls(records: dict, names: Iterable[str]) -> Iterator[tuple[str, int, tuple, dict]]:
    """``(name, call index, args, kwargs)`` for every recorded call of ``names``."""
    for name in names:
        for k, (args, kwargs) in enumerate(records.get(name, [])):
            yield name, k, args, kwargs
