"""The HF <-> FMS module-path map of Granite Speech, as data.

Each row of ``PATH_MAP`` pairs one HF module with the FMS module that computes the same tensor; ``{}`` stands for a
layer index (Conformer block, Q-Former layer or decoder layer). ``expand(config)`` turns the rows into concrete
``LayerPair``s in execution order; ``resolve(name, config)`` finds the pairs for one user-facing name and its
sub-modules. ``EXCLUDED`` lists what cannot be compared element-wise and why; ``check_completeness`` proves every
parameter of the HF model is compared somewhere (directly or as part of a larger module) or knowingly excluded.

Row fields: parity name, HF module path, FMS module path, which tensor of the module is compared (``output``: the
module's output, first tensor of a tuple; ``input``: its first input, positional or keyword), an optional named
transform applied to the FMS tensor (``TRANSFORMS`` says what each does; the report states every one), and ``covers``:
the HF modules whose parameters this row vouches for in the completeness check (default: see ``coverage``).

An FMS path of ``""`` means the FMS model's own forward return value.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from torch import nn

from fms_granite_speech.config import GraniteSpeechConfig

__all__ = [
    "EXCLUDED",
    "Exclusion",
    "LayerPair",
    "PATH_MAP",
    "PathEntry",
    "TRANSFORMS",
    "UnknownLayerError",
    "check_completeness",
    "coverage",
    "expand",
    "layer_names",
    "resolve",
    "suggest",
    "uncovered_parameters",
]

OUTPUT = "output"
INPUT = "input"


@dataclass(frozen=True)
class PathEntry:
    """One row of the map; strings may hold ``{}`` for the layer index."""

    name: str
    hf: str
    fms: str
    tensor: str = OUTPUT
    transform: Optional[str] = None
    covers: tuple[str, ...] = ()


E = PathEntry
_QF = "model.projector.qformer.encoder.layer.{}"  # one Q-Former layer in HF
_LM = "model.language_model"                        # the HF decoder (GraniteModel)
_FD = "decoder.base_model"                          # the FMS decoder (GraniteHeadless)

# fmt: off
PATH_MAP: tuple[PathEntry, ...] = (
    # -- Conformer encoder -------------------------------------------------------------------------------------------
    E("encoder.input_linear",         "model.encoder.input_linear",       "encoder.input_linear"),
    E("encoder.blocks.{}.ff1",        "model.encoder.layers.{}.ff1",      "encoder.blocks.{}.ff1"),
    E("encoder.blocks.{}.attn",       "model.encoder.layers.{}.attn",     "encoder.blocks.{}.attn"),
    E("encoder.blocks.{}.conv",       "model.encoder.layers.{}.conv",     "encoder.blocks.{}.conv"),
    E("encoder.blocks.{}.ff2",        "model.encoder.layers.{}.ff2",      "encoder.blocks.{}.ff2"),
    E("encoder.blocks.{}.post_norm",  "model.encoder.layers.{}.post_norm", "encoder.blocks.{}.post_norm"),
    E("encoder.blocks.{}",            "model.encoder.layers.{}",          "encoder.blocks.{}"),
    # after block num_layers//2 - 1 only: the CTC logits, and the residual they feed back into the stream
    E("encoder.out",                  "model.encoder.out",                "encoder.out"),
    E("encoder.out_mid",              "model.encoder.out_mid",            "encoder.out_mid"),
    # -- windowed Q-Former projector ---------------------------------------------------------------------------------
    E("projector.layers.{}.self_attn",  _QF + ".attention",               "projector.layers.{}.self_attn"),
    # only in layers j with j % cross_attention_frequency == 0
    E("projector.layers.{}.cross_attn", _QF + ".crossattention",          "projector.layers.{}.cross_attn"),
    E("projector.layers.{}.mlp",        _QF + ".output_query",            "projector.layers.{}.mlp",
      covers=(_QF + ".intermediate_query", _QF + ".output_query")),
    E("projector.layers.{}",            _QF,                              "projector.layers.{}"),
    E("projector",                      "model.projector",                "projector",
      covers=("model.projector.query", "model.projector.qformer.layernorm", "model.projector.linear")),
    # -- decoder (FMS Granite) ---------------------------------------------------------------------------------------
    E("decoder.merged_embeddings",    _LM,                                _FD, tensor=INPUT,
      covers=(_LM + ".embed_tokens",)),
    E("decoder.layers.{}.attn_norm",  _LM + ".layers.{}.input_layernorm", _FD + ".layers.{}.ln"),
    E("decoder.layers.{}.attn",       _LM + ".layers.{}.self_attn",       _FD + ".layers.{}.attn"),
    E("decoder.layers.{}.mlp_norm",   _LM + ".layers.{}.post_attention_layernorm", _FD + ".layers.{}.ff_ln"),
    E("decoder.layers.{}.mlp",        _LM + ".layers.{}.mlp",             _FD + ".layers.{}.ff_sub_layer"),
    E("decoder.layers.{}",            _LM + ".layers.{}",                 _FD + ".layers.{}"),
    E("decoder.norm",                 _LM + ".norm",                      _FD + ".dec_norm"),
    E("logits",                       "lm_head",                          "", transform="logits_scaling"),
)
# fmt: on

TRANSFORMS: dict[str, str] = {
    "logits_scaling": (
        "FMS logits are multiplied by text_config.logits_scaling before comparing: FMS Granite divides logits by it, "
        "transformers 5.x GraniteSpeechForConditionalGeneration does not (known upstream deviation; greedy tokens "
        "are unaffected, logits and log-probs differ by that factor)"
    ),
}


@dataclass(frozen=True)
class Exclusion:
    """A module that exists on one side but cannot be compared element-wise; ``{}`` is the layer index."""

    name: str
    hf: str
    fms: str
    reason: str


_QKV = (
    "FMS fuses q/k/v into one projection (attn.in_proj.qkv_fused) and permutes the q/k rows of each head for its "
    "RoPE layout, so projection outputs differ element-wise by design; checked through decoder.layers.{}.attn"
)
_GATE_UP = (
    "FMS fuses gate_proj and up_proj into one projection (ff_sub_layer.wg1_fused), so neither output exists on its "
    "own; checked through decoder.layers.{}.mlp"
)
_FUSED_QKV = _FD + ".layers.{}.attn.in_proj.qkv_fused"
_FUSED_GATE_UP = _FD + ".layers.{}.ff_sub_layer.wg1_fused"
# fmt: off
EXCLUDED: tuple[Exclusion, ...] = (
    Exclusion("decoder.layers.{}.attn.q_proj",   _LM + ".layers.{}.self_attn.q_proj", _FUSED_QKV, _QKV),
    Exclusion("decoder.layers.{}.attn.k_proj",   _LM + ".layers.{}.self_attn.k_proj", _FUSED_QKV, _QKV),
    Exclusion("decoder.layers.{}.attn.v_proj",   _LM + ".layers.{}.self_attn.v_proj", _FUSED_QKV, _QKV),
    Exclusion("decoder.layers.{}.mlp.gate_proj", _LM + ".layers.{}.mlp.gate_proj",    _FUSED_GATE_UP, _GATE_UP),
    Exclusion("decoder.layers.{}.mlp.up_proj",   _LM + ".layers.{}.mlp.up_proj",      _FUSED_GATE_UP, _GATE_UP),
)
# fmt: on


# -- expansion --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPair:
    """One concrete comparison: ``hf`` module vs ``fms`` module, ``tensor`` of each, ``transform`` on the FMS side.

    ``section`` is ``"encoder"``, ``"projector"`` or ``"decoder"`` (what has to run to produce it).
    """

    name: str
    hf: str
    fms: str
    tensor: str = OUTPUT
    transform: Optional[str] = None
    section: str = "encoder"

    def to_dict(self) -> dict:
        """The pair as a plain JSON-safe dict (``name``, ``hf``, ``fms``, ``tensor``, ``transform``, ``section``)."""
        return asdict(self)


def _section(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"encoder": "encoder", "projector": "projector"}.get(head, "decoder")


def _concrete(entry: PathEntry, index: Optional[int] = None) -> LayerPair:
    fill = (lambda s: s) if index is None else (lambda s: s.replace("{}", str(index)))
    return LayerPair(
        name=fill(entry.name),
        hf=fill(entry.hf),
        fms=fill(entry.fms),
        tensor=entry.tensor,
        transform=entry.transform,
        section=_section(entry.name),
    )


def _rows(prefix: str) -> list[PathEntry]:
    """Rows whose parity name starts with ``prefix``, in table order."""
    return [e for e in PATH_MAP if e.name.startswith(prefix)]


def expand(config: GraniteSpeechConfig) -> list[LayerPair]:
    """Every comparable pair of a model with ``config``, in execution order.

    Order: input_linear; per Conformer block its ff1, attn, conv, ff2, post_norm, then the block (the CTC ``out`` and
    ``out_mid`` right after block ``mid_layer``); per Q-Former layer self_attn, cross_attn (layers with
    ``j % cross_attention_frequency == 0``), mlp, then the layer; the projector output; the merged decoder input
    embeddings; per decoder layer attn_norm, attn, mlp_norm, mlp, then the layer; the final norm; logits.
    """
    e, p, d = config.encoder, config.projector, config.decoder
    pairs = [_concrete(r) for r in _rows("encoder.input_linear")]
    block_rows = _rows("encoder.blocks.{}")
    for i in range(e.num_layers):
        pairs += [_concrete(r, i) for r in block_rows]
        if i == e.mid_layer:
            pairs += [_concrete(r) for r in _rows("encoder.out")]
    for j in range(p.num_layers):
        for r in _rows("projector.layers.{}"):
            if r.name.endswith(".cross_attn") and j % p.cross_attention_frequency:
                continue
            pairs.append(_concrete(r, j))
    pairs += [_concrete(r) for r in PATH_MAP if r.name == "projector"]
    pairs += [_concrete(r) for r in _rows("decoder.merged_embeddings")]
    for i in range(d.nlayers):
        pairs += [_concrete(r, i) for r in _rows("decoder.layers.{}")]
    pairs += [_concrete(r) for r in _rows("decoder.norm")]
    pairs += [_concrete(r) for r in _rows("logits")]
    return pairs


def layer_names(config: GraniteSpeechConfig) -> list[str]:
    """Every name ``resolve`` accepts: each pair's name and every dotted prefix of one (``encoder``, ``decoder``...)."""
    names: list[str] = []
    for pair in expand(config):
        parts = pair.name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix not in names:
                names.append(prefix)
    return names


class UnknownLayerError(ValueError):
    """A layer name that the path map does not know; ``suggestions`` holds the closest valid names."""

    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = ", ".join(suggestions) if suggestions else "run `parity map` to list every layer"
        super().__init__(f"unknown layer {name!r}; closest valid names: {hint}")


def resolve(name: str, config: GraniteSpeechConfig) -> list[LayerPair]:
    """The pairs for ``name`` and all of its sub-modules, in execution order.

    ``name`` is a parity name (``encoder.blocks.8``, ``projector.layers.1.cross_attn``, ``logits``) or a dotted
    prefix of one (``encoder``, ``decoder.layers``). ``resolve("encoder.blocks.8")`` gives the block's ff1, attn,
    conv, ff2, post_norm and the block itself. ``resolve("decoder")`` gives the whole decoder section: the merged
    embeddings, every layer, the final norm and ``logits`` (the LM head runs in the decoder section although its
    parity name has no ``decoder.`` prefix).

    Raises:
        UnknownLayerError (a ValueError): no such name; the message and ``.suggestions`` give the closest valid
            names (``difflib``).
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownLayerError(str(name), [])
    name = name.strip()
    pairs = [p for p in expand(config) if p.name == name or p.name.startswith(name + ".")
             or (name == "decoder" and p.section == "decoder")]
    if not pairs:
        raise UnknownLayerError(name, suggest(name, config))
    return pairs


def suggest(name: str, config: GraniteSpeechConfig, n: int = 5) -> list[str]:
    """The ``n`` valid layer names closest to ``name`` (``difflib.get_close_matches``, cutoff 0.5).

    When nothing is that close, the top-level names (``encoder``, ``projector``, ``decoder``, ``logits``) are given.
    """
    names = layer_names(config)
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return close or [x for x in names if "." not in x]


# -- completeness -----------------------------------------------------------------------------------------------------


def _covered(param: str, prefixes: Iterable[str]) -> bool:
    """``param`` (a full parameter name) is one of ``prefixes`` or lies under one of them."""
    return any(param == p or param.startswith(p + ".") for p in prefixes)


def _fill(template: str, name: str, config: GraniteSpeechConfig) -> list[str]:
    """``template`` for every layer index of the row called ``name`` (the template itself if it has no ``{}``)."""
    if "{}" not in template:
        return [template]
    counts = {"encoder": config.encoder.num_layers, "projector": config.projector.num_layers,
              "decoder": config.decoder.nlayers}
    return [template.replace("{}", str(i)) for i in range(counts[_section(name)])]


def coverage(config: GraniteSpeechConfig) -> dict[str, list[str]]:
    """For each row (by template name): the concrete HF module paths whose parameters it vouches for.

    A row with explicit ``covers`` vouches for those. Otherwise it vouches for its own HF module, unless another
    row's HF module lies inside it: such a container row (a whole Conformer block, Q-Former or decoder layer) is
    checked too, but its parameters must each be claimed by a more specific row, so that dropping e.g. the ``conv``
    row shows up as uncovered parameters rather than hiding behind the block.
    """
    own = {e.name: _fill(e.hf, e.name, config) for e in PATH_MAP}
    every = [p for paths in own.values() for p in paths]
    out = {}
    for e in PATH_MAP:
        if e.covers:
            out[e.name] = [p for t in e.covers for p in _fill(t, e.name, config)]
        else:
            out[e.name] = [p for p in own[e.name] if not any(o.startswith(p + ".") for o in every)]
    return out


def uncovered_parameters(hf_model: nn.Module, config: GraniteSpeechConfig) -> list[str]:
    """Names of parameters and persistent buffers of ``hf_model`` no map row or exclusion accounts for (sorted).

    A parameter is accounted for when it lies under a path a row vouches for (``coverage``) or under the HF module
    of an exclusion. peft LoRA parameters sit under ``self_attn`` and are checked by ``decoder.layers.{}.attn``.
    BatchNorm's ``num_batches_tracked`` (a training-only counter) and non-persistent buffers are not counted.
    """
    prefixes = [p for paths in coverage(config).values() for p in paths]
    prefixes += [p for e in EXCLUDED for p in _fill(e.hf, e.name, config)]
    names = [n for n, _ in hf_model.named_parameters()]
    non_persistent = {
        f"{mod_name}.{b}" if mod_name else b
        for mod_name, mod in hf_model.named_modules()
        for b in getattr(mod, "_non_persistent_buffers_set", ())
    }
    names += [n for n, _ in hf_model.named_buffers()
              if n not in non_persistent and not n.endswith("num_batches_tracked")]
    return sorted(n for n in names if not _covered(n, prefixes))


def check_completeness(hf_model: nn.Module, config: GraniteSpeechConfig, fms_model: Optional[nn.Module] = None) -> None:
    """Raise unless the map accounts for every HF parameter and (given ``fms_model``) names only real FMS modules.

    Raises:
        ValueError: lists the uncovered HF parameters, HF module paths of expanded rows missing from ``hf_model``,
            and FMS paths missing from ``fms_model``.
    """
    problems = []
    uncovered = uncovered_parameters(hf_model, config)
    if uncovered:
        problems.append(f"HF parameters no row covers: {', '.join(uncovered)}")
    hf_modules = dict(hf_model.named_modules())
    missing_hf = [p.hf for p in expand(config) if p.hf not in hf_modules]
    if missing_hf:
        problems.append(f"HF modules named by the map but absent from the model: {', '.join(missing_hf)}")
    if fms_model is not None:
        fms_modules = dict(fms_model.named_modules())
        missing = [p.fms for p in expand(config) if p.fms not in fms_modules]
        if missing:
            problems.append(f"FMS modules named by the map but absent from the model: {', '.join(missing)}")
    if problems:
        raise ValueError("parity path map is incomplete: " + "; ".join(problems))
