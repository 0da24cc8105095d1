"""The HF <-> FMS module-path map of Granite Speech, as data.

Each row of ``PATH_MAP`` pairs one HF module with the FMS module that computes the same tensor; ``{}`` stands for a
layer index (Conformer block, Q-Former layer or decoder layer). ``expand(config)`` turns the rows into concrete
``LayerPair``s in execution order; ``resolve(name, config)`` finds the pairs for one user-facing name and its
sub-modules. ``EXCLUDED`` lists what cannot be compared element-wise and why; ``check_completeness`` proves every
parameter of the HF model is compared somewhere (directly or as part of a larger module) or knowingly excluded.

Row fields: parity name, HF module path, FMS module path, which tensor of the module is compared (``output``: the
module's output, first tensor of a tuple; ``input``: its first input, positional or keyword; ``pipeline``: a tensor
of the input pipelines, HF's processor against the project's), an optional named transform applied to the FMS tensor
(``TRANSFORMS`` says what each does; the report states every one), ``covers`` (the HF modules whose parameters this
row vouches for in the completeness check; default: see ``coverage``), ``kind`` (how ``parity.attribution`` runs the
FMS module on the HF module's exact inputs to measure the error the row *introduces*; None for rows without one) and
``factor`` (in reduced precision, the row's bound on that introduced error as a multiple of the rounding error HF's
own module introduces against a float64 run; see ``ROUNDING``).

An FMS path of ``""`` means the FMS model's own forward return value. The ``features`` section (the first rows)
compares the two input pipelines: HF's ``GraniteSpeechProcessor`` / ``GraniteSpeechFeatureExtractor`` against the
project's ``fms_granite_speech.processor`` / ``features``.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Union

if TYPE_CHECKING:  # this module imports neither torch nor the model: `parity map` answers at once
    from torch import nn

    from fms_granite_speech.config import GraniteSpeechConfig

__all__ = [
    "DERIVED_OVERRIDES",
    "EXCLUDED",
    "Exclusion",
    "LayerCounts",
    "VARIANT_LAYERS",
    "counts_of_checkpoint",
    "LayerPair",
    "PATH_MAP",
    "PathEntry",
    "DEPTH_ROWS",
    "FLOAT64_UNITS",
    "template_of",
    "REGIONS",
    "ROUNDING",
    "SECTIONS",
    "SECTION_MODULES",
    "TRANSFORMS",
    "UnknownLayerError",
    "check_completeness",
    "coverage",
    "expand",
    "layer_names",
    "resolve",
    "section_of",
    "suggest",
    "uncovered_parameters",
]

OUTPUT = "output"
INPUT = "input"
PIPELINE = "pipeline"

# The sections of the model in execution order; a layer needs every section up to its own to run.
SECTIONS = ("features", "encoder", "projector", "decoder")
# The module that runs each model section on each side (what the engine calls, and compiles in compiled modes).
SECTION_MODULES: dict[str, dict[str, str]] = {
    "hf": {"encoder": "model.encoder", "projector": "model.projector", "decoder": "model.language_model"},
    "fms": {"encoder": "encoder", "projector": "projector", "decoder": "decoder"},
}
# The repeated blocks of each side, compiled once per kind in compiled modes (regional compilation).
REGIONS: dict[str, tuple[str, ...]] = {
    "hf": ("model.encoder.layers.{}", "model.projector.qformer.encoder.layer.{}", "model.language_model.layers.{}"),
    "fms": ("encoder.blocks.{}", "projector.layers.{}", "decoder.base_model.layers.{}"),
}
# The rows a depth plot draws: the model's trunk (each block, not its sub-modules).
DEPTH_ROWS: tuple[str, ...] = ("encoder.input_linear", "encoder.blocks.{}", "projector.layers.{}", "projector",
                               "decoder.merged_embeddings", "decoder.layers.{}", "decoder.norm", "logits")
# The units a float64 run of HF converts one at a time: the encoder and decoder blocks, and the projector whole (its
# Q-Former casts the learnable queries to its LayerNorm's dtype before calling it, so its parts cannot go one by one).
FLOAT64_UNITS: tuple[str, ...] = ("model.encoder.layers.{}", "model.projector", "model.language_model.layers.{}")

# Reduced-precision (bf16/fp16) bounds: a row's introduced error may be ``factor`` times the rounding error HF's own
# module introduces against float64 on the same input, plus ``floor``; its propagated error ``propagated`` times
# HF's own end-to-end drift from float64 at that row, plus ``floor``. Measured on the unmodified tree (tiny and
# 3.3-2b widths with a 2-layer decoder, bf16, CPU): see ``ROUNDING_MEASURED``.
ROUNDING = {
    "same_kernels": 0.25,   # the FMS module runs HF's kernels in HF's order: bit-identical in bf16 as measured
    "fms_attention": 3.5,   # FMS's own MultiHeadAttention (its RoPE and score layout differ from HF's)
    "fms_block": 1.5,       # an FMS GraniteBlock around that attention
    "propagated": 3.0,
}
ROUNDING_MEASURED = (
    "bf16, CPU, 2026-12-01; introduced FMS-vs-HF rel-L2 over HF's own introduced rounding, worst over the named "
    "cases: tiny (15 cases): encoder rows <= 0.043 (0 but the conv and the block), Q-Former, projector, merge, "
    "decoder norms and MLPs 0, decoder attention 2.14, decoder layers 0.82; 3.3-2b widths with a 2-layer decoder "
    "(2 cases): encoder blocks 0.135, conv 0.072, decoder attention 1.88, decoder layers 0.23. Propagated FMS-vs-HF "
    "over HF's own drift: <= 1.60 (tiny), <= 1.17 (2b widths). Worst observed/bound with these factors: 0.60 (tiny), "
    "0.52 (2b widths); the fused-SDPA bug in encoder.blocks.0.attn scores 2.3"
)


@dataclass(frozen=True)
class _Counts:
    num_layers: int = 0
    cross_attention_frequency: int = 1
    nlayers: int = 0

    @property
    def mid_layer(self) -> int:
        return self.num_layers // 2 - 1


class LayerCounts:
    """The layer counts the map expands with, shaped like a ``GraniteSpeechConfig`` (``.encoder.num_layers``,
    ``.encoder.mid_layer``, ``.projector.num_layers``, ``.projector.cross_attention_frequency``,
    ``.decoder.nlayers``): what ``expand`` and ``resolve`` need, without the model's config (which imports torch)."""

    def __init__(self, encoder_layers: int, projector_layers: int, cross_attention_frequency: int,
                 decoder_layers: int, decoder_type: str = "granite"):
        self.encoder = _Counts(num_layers=encoder_layers)
        self.projector = _Counts(num_layers=projector_layers, cross_attention_frequency=cross_attention_frequency)
        self.decoder = _Counts(nlayers=decoder_layers)
        self.decoder_type = decoder_type  # text_config.model_type: a granitemoehybrid decoder names its MLP shared_mlp

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerCounts) and vars(self) == vars(other)

    @classmethod
    def of(cls, config) -> "LayerCounts":
        """The counts of a ``GraniteSpeechConfig`` (or of anything shaped like one)."""
        return cls(config.encoder.num_layers, config.projector.num_layers,
                   config.projector.cross_attention_frequency, config.decoder.nlayers,
                   getattr(config, "decoder_type", "granite"))


# The named variants' layer counts (tests/test_pathmap.py checks them against fms_granite_speech.config.VARIANTS),
# so the CLI can print the map and refuse an unknown layer name before importing torch.
VARIANT_LAYERS: dict[str, LayerCounts] = {
    "tiny": LayerCounts(16, 2, 1, 4),
    "3.3-2b": LayerCounts(16, 2, 1, 40),
    "3.3-8b": LayerCounts(16, 2, 1, 40),
    "tiny-4.0": LayerCounts(16, 2, 1, 4, "granitemoehybrid"),
    "4.0-1b": LayerCounts(16, 2, 1, 40),
    "tiny-4.1": LayerCounts(16, 2, 1, 4),
    "4.1-2b": LayerCounts(16, 2, 1, 40),
    "tiny-plus": LayerCounts(16, 2, 1, 4),
    "4.1-2b-plus": LayerCounts(16, 2, 1, 40),
}


def counts_of_checkpoint(folder: Union[str, Path]) -> LayerCounts:
    """The layer counts of an HF Granite Speech folder's config.json (transformers' field names).

    Raises:
        ValueError: no config.json, not JSON, not a ``granite_speech`` config, or without ``text_config``'s layer
            count (the message names the file); the full checks come from the loaders.
    """
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ValueError(f"{folder} has no config.json: not an HF checkpoint folder (give the folder save_pretrained "
                         "wrote, or a downloaded ibm-granite/granite-speech-3.3-* snapshot)")
    try:
        from fms_granite_speech.folder import read_json  # torch-free: the CLI's map stays light

        raw = read_json(file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is not readable JSON ({err}); restore the checkpoint's config.json") from None
    if not isinstance(raw, dict) or raw.get("model_type") not in ("granite_speech", "granite_speech_plus"):
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{file}: model_type={got!r}, expected 'granite_speech'")
    try:
        enc, proj, text = raw.get("encoder_config") or {}, raw.get("projector_config") or {}, raw["text_config"]
        return LayerCounts(int(enc.get("num_layers", 16)), int(proj.get("num_hidden_layers", 2)),
                           int(proj.get("cross_attention_frequency", 1)), int(text["num_hidden_layers"]),
                           str(text.get("model_type") or "granite"))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{file} has no text_config.num_hidden_layers: not a complete Granite Speech config") \
            from None


@dataclass(frozen=True)
class PathEntry:
    """One row of the map; strings may hold ``{}`` for the layer index."""

    name: str
    hf: str
    fms: str
    tensor: str = OUTPUT
    transform: Optional[str] = None
    covers: tuple[str, ...] = ()
    kind: Optional[str] = "module"
    factor: float = ROUNDING["same_kernels"]


E = PathEntry
_QF = "model.projector.qformer.encoder.layer.{}"  # one Q-Former layer in HF
_LM = "model.language_model"                        # the HF decoder (GraniteModel)
_FD = "decoder.base_model"                          # the FMS decoder (GraniteHeadless)
_PROC = "processor"                                 # the input pipelines (no module)

# fmt: off
PATH_MAP: tuple[PathEntry, ...] = (
    # -- the input pipelines: HF's processor and feature extractor against the project's ---------------------------
    E("features.input_features",      _PROC, _PROC, tensor=PIPELINE, kind=None),
    E("features.input_features_mask", _PROC, _PROC, tensor=PIPELINE, kind=None),
    E("features.audio_token_counts",  _PROC, _PROC, tensor=PIPELINE, kind=None),
    E("input_ids",                    _PROC, _PROC, tensor=PIPELINE, kind=None),
    # -- Conformer encoder -------------------------------------------------------------------------------------------
    E("encoder.input_linear",         "model.encoder.input_linear",       "encoder.input_linear"),
    E("encoder.blocks.{}.ff1",        "model.encoder.layers.{}.ff1",      "encoder.blocks.{}.ff1"),
    E("encoder.blocks.{}.attn",       "model.encoder.layers.{}.attn",     "encoder.blocks.{}.attn",
      kind="conformer_attn"),
    E("encoder.blocks.{}.conv",       "model.encoder.layers.{}.conv",     "encoder.blocks.{}.conv"),
    E("encoder.blocks.{}.ff2",        "model.encoder.layers.{}.ff2",      "encoder.blocks.{}.ff2"),
    E("encoder.blocks.{}.post_norm",  "model.encoder.layers.{}.post_norm", "encoder.blocks.{}.post_norm"),
    E("encoder.blocks.{}",            "model.encoder.layers.{}",          "encoder.blocks.{}", kind="conformer_block"),
    # after block num_layers//2 - 1 only: the CTC logits, and the residual they feed back into the stream
    E("encoder.out",                  "model.encoder.out",                "encoder.out"),
    E("encoder.out_mid",              "model.encoder.out_mid",            "encoder.out_mid"),
    # the encoder's output: the last block's, or (Granite Speech Plus) the exported hidden states concatenated with it
    E("encoder",                      "model.encoder",                    "encoder", kind=None),
    # -- windowed Q-Former projector ---------------------------------------------------------------------------------
    E("projector.layers.{}.self_attn",  _QF + ".attention",               "projector.layers.{}.self_attn"),
    # only in layers j with j % cross_attention_frequency == 0
    E("projector.layers.{}.cross_attn", _QF + ".crossattention",          "projector.layers.{}.cross_attn",
      kind="qformer_cross"),
    E("projector.layers.{}.mlp",        _QF + ".output_query",            "projector.layers.{}.mlp",
      covers=(_QF + ".intermediate_query", _QF + ".output_query"), kind="qformer_mlp"),
    E("projector.layers.{}",            _QF,                              "projector.layers.{}", kind="qformer_layer"),
    E("projector",                      "model.projector",                "projector",
      covers=("model.projector.query", "model.projector.qformer.layernorm", "model.projector.linear")),
    # -- decoder (FMS Granite) ---------------------------------------------------------------------------------------
    E("decoder.merged_embeddings",    _LM,                                _FD, tensor=INPUT,
      covers=(_LM + ".embed_tokens",), kind="merge"),
    E("decoder.layers.{}.attn_norm",  _LM + ".layers.{}.input_layernorm", _FD + ".layers.{}.ln"),
    E("decoder.layers.{}.attn",       _LM + ".layers.{}.self_attn",       _FD + ".layers.{}.attn",
      kind="decoder_attn", factor=ROUNDING["fms_attention"]),
    E("decoder.layers.{}.mlp_norm",   _LM + ".layers.{}.post_attention_layernorm", _FD + ".layers.{}.ff_ln"),
    E("decoder.layers.{}.mlp",        _LM + ".layers.{}.mlp",             _FD + ".layers.{}.ff_sub_layer"),
    E("decoder.layers.{}",            _LM + ".layers.{}",                 _FD + ".layers.{}",
      kind="decoder_layer", factor=ROUNDING["fms_block"]),
    E("decoder.norm",                 _LM + ".norm",                      _FD + ".dec_norm"),
    E("logits",                       "lm_head",                          "", transform="logits_scaling",
      kind="logits"),
)
# fmt: on

TRANSFORMS: dict[str, str] = {
    "logits_scaling": (
        "FMS logits are multiplied by text_config.logits_scaling before comparing: FMS Granite divides logits by it, "
        "transformers 5.x GraniteSpeechForConditionalGeneration does not (known upstream deviation; greedy tokens "
        "are unaffected, logits and log-probs differ by that factor)"
    ),
}


# The rows of PATH_MAP that the map derived from FMS's own adapter (parity.derive, with the hint that LoRA tensors stay
# out of the lineage) does not give as written, and why. Every other module row of PATH_MAP is a derived row:
# tests/test_derive.py holds the two equal except these.
DERIVED_OVERRIDES: dict[str, str] = {
    "features.{}": "a tensor of the input pipelines (HF's processor against the project's), not a module",
    "input_ids": "a tensor of the input pipelines, not a module",
    "projector.layers.{}.mlp": "HF splits the Q-Former feed-forward over intermediate_query and output_query, FMS "
                               "holds it in one module: the derived map pairs the finer parts, the hand row compares "
                               "output_query with FMS's whole mlp",
    "logits": "HF's lm_head against the FMS model's own output: they differ by the pure scale logits_scaling (the "
              "transform): the derived map pairs lm_head with decoder.head and the two models' outputs",
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

    ``section`` is one of ``SECTIONS`` (what has to run to produce it); ``kind`` and ``factor`` as in ``PathEntry``.
    """

    name: str
    hf: str
    fms: str
    tensor: str = OUTPUT
    transform: Optional[str] = None
    section: str = "encoder"
    kind: Optional[str] = None
    factor: float = ROUNDING["same_kernels"]

    def to_dict(self) -> dict:
        """The pair as a plain JSON-safe dict (its fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPair":
        """Inverse of ``to_dict`` (fields a saved result of an older version lacks take their defaults)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def template_of(name: str) -> str:
    """The path-map row a concrete parity name belongs to: layer indices replaced by ``{}``
    (``encoder.blocks.7.attn`` -> ``encoder.blocks.{}.attn``)."""
    import re

    return re.sub(r"\.\d+(?=\.|$)", ".{}", name)


def covers_of(name: str) -> tuple[str, ...]:
    """The HF module paths the concrete row ``name`` vouches for by its map entry's ``covers`` (its layer index
    filled in), e.g. ``projector.layers.0.mlp`` -> the Q-Former's ``intermediate_query`` and ``output_query``; ()
    for a row without ``covers`` or a name outside this map."""
    import re

    template = template_of(name)
    entry = next((e for e in PATH_MAP if e.name == template), None)
    if entry is None or not entry.covers:
        return ()
    index = re.search(r"\.(\d+)(?=\.|$)", name)
    return tuple(c.replace("{}", index.group(1)) if index else c for c in entry.covers)


def section_of(name: str) -> str:
    """The section (one of ``SECTIONS``) a parity layer name belongs to; ``logits`` is in the decoder."""
    head = name.split(".", 1)[0]
    if head in ("features", "input_ids"):
        return "features"
    return {"encoder": "encoder", "projector": "projector"}.get(head, "decoder")


_section = section_of


def _concrete(entry: PathEntry, index: Optional[int] = None) -> LayerPair:
    fill = (lambda s: s) if index is None else (lambda s: s.replace("{}", str(index)))
    return LayerPair(
        name=fill(entry.name),
        hf=fill(entry.hf),
        fms=fill(entry.fms),
        tensor=entry.tensor,
        transform=entry.transform,
        section=_section(entry.name),
        kind=entry.kind,
        factor=entry.factor,
    )


def _rows(prefix: str) -> list[PathEntry]:
    """Rows whose parity name starts with ``prefix``, in table order."""
    return [e for e in PATH_MAP if e.name.startswith(prefix)]


def expand(config: GraniteSpeechConfig) -> list[LayerPair]:
    """Every comparable pair of a model with ``config``, in execution order.

    Order: the input pipelines (features, mask, token counts, input_ids); input_linear; per Conformer block its ff1,
    attn, conv, ff2, post_norm, then the block (the CTC ``out`` and ``out_mid`` right after block ``mid_layer``); the
    encoder's output (with Granite Speech Plus's concatenated hidden states); per
    Q-Former layer self_attn, cross_attn (layers with ``j % cross_attention_frequency == 0``), mlp, then the layer;
    the projector output; the merged decoder input embeddings; per decoder layer attn_norm, attn, mlp_norm, mlp, then
    the layer; the final norm; logits.
    """
    e, p, d = config.encoder, config.projector, config.decoder
    pairs = [_concrete(r) for r in PATH_MAP if r.tensor == PIPELINE]
    pairs += [_concrete(r) for r in _rows("encoder.input_linear")]
    block_rows = _rows("encoder.blocks.{}")
    for i in range(e.num_layers):
        pairs += [_concrete(r, i) for r in block_rows]
        if i == e.mid_layer:
            pairs += [_concrete(r) for r in _rows("encoder.out")]
    pairs += [_concrete(r) for r in PATH_MAP if r.name == "encoder"]
    for j in range(p.num_layers):
        for r in _rows("projector.layers.{}"):
            if r.name.endswith(".cross_attn") and j % p.cross_attention_frequency:
                continue
            pairs.append(_concrete(r, j))
    pairs += [_concrete(r) for r in PATH_MAP if r.name == "projector"]
    pairs += [_concrete(r) for r in _rows("decoder.merged_embeddings")]
    hybrid = getattr(config, "decoder_type", "granite") == "granitemoehybrid"
    for i in range(d.nlayers):
        for r in _rows("decoder.layers.{}"):
            pair = _concrete(r, i)
            if hybrid and pair.hf.endswith(".mlp"):  # a granitemoehybrid decoder names its MLP shared_mlp
                pair = replace(pair, hf=pair.hf[: -len("mlp")] + "shared_mlp")
            pairs.append(pair)
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
    """A layer name that the path map does not know; ``suggestions`` holds the closest valid names and ``valid_range``
    the range of layer indices when the name has an index out of range (``encoder.blocks.99``)."""

    def __init__(self, name: str, suggestions: list[str], valid_range: Optional[str] = None):
        self.name = name
        self.suggestions = suggestions
        self.valid_range = valid_range
        hint = ", ".join(suggestions) if suggestions else "run `parity map` to list every layer"
        where = f"{valid_range}; " if valid_range else ""
        super().__init__(f"unknown layer {name!r}; {where}closest valid names: {hint}")


_STACKS = (("encoder.blocks", "encoder", "blocks"), ("projector.layers", "projector", "layers"),
           ("decoder.layers", "decoder", "layers"))


def _index_range(name: str, config: GraniteSpeechConfig) -> Optional[str]:
    """``"encoder.blocks has 16 blocks: 0..15"`` when ``name`` indexes a stack of layers out of its range."""
    counts = {"encoder": config.encoder.num_layers, "projector": config.projector.num_layers,
              "decoder": config.decoder.nlayers}
    for prefix, section, noun in _STACKS:
        rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        index = rest.split(".", 1)[0] if rest else ""
        if index.isdigit() and int(index) >= counts[section]:
            n = counts[section]
            return f"{prefix} has {n} {noun}: {prefix}.0 .. {prefix}.{n - 1}"
    return None


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
        raise UnknownLayerError(name, suggest(name, config), _index_range(name, config))
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
              "decoder": config.decoder.nlayers, "features": 1}
    return [template.replace("{}", str(i)) for i in range(counts[_section(name)])]


def coverage(config: GraniteSpeechConfig) -> dict[str, list[str]]:
    """For each row (by template name): the concrete HF module paths whose parameters it vouches for.

    A row with explicit ``covers`` vouches for those. Otherwise it vouches for its own HF module, unless another
    row's HF module lies inside it: such a container row (a whole Conformer block, Q-Former or decoder layer) is
    checked too, but its parameters must each be claimed by a more specific row, so that dropping e.g. the ``conv``
    row shows up as uncovered parameters rather than hiding behind the block.
    """
    own = {e.name: _fill(e.hf, e.name, config) for e in PATH_MAP if e.tensor != PIPELINE}
    every = [p for paths in own.values() for p in paths]
    out = {}
    for e in PATH_MAP:
        if e.tensor == PIPELINE:
            continue
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
    missing_hf = [p.hf for p in expand(config) if p.tensor != PIPELINE and p.hf not in hf_modules]
    if missing_hf:
        problems.append(f"HF modules named by the map but absent from the model: {', '.join(missing_hf)}")
    if fms_model is not None:
        fms_modules = dict(fms_model.named_modules())
        missing = [p.fms for p in expand(config) if p.tensor != PIPELINE and p.fms not in fms_modules]
        if missing:
            problems.append(f"FMS modules named by the map but absent from the model: {', '.join(missing)}")
    if problems:
        raise ValueError("parity path map is incomplete: " + "; ".join(problems))
