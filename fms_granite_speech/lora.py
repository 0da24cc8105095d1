"""The decoder's audio LoRA adapter: where each peft target lives in FMS's Granite, and its exact merge.

Granite Speech ships a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``; rank 64, alpha 32,
targets ``q_proj`` / ``v_proj`` of every decoder layer in the released 3.3 models). transformers' ``generate``
enables it when audio is given and disables it for text-only prompts
(``GraniteSpeechForConditionalGeneration.generate`` in transformers 5.17). Here the adapter is kept as separate
``A`` [r, in] / ``B`` [out, r] matrices (``DecoderLoRA``) and merged into the decoder's weights,
``W = W_base + (alpha / r) * B @ A``, computed in float32 from a saved copy of ``W_base`` so that any on/off
sequence gives bit-identical weights for each state.

``LORA_TARGETS`` is the literal table of where a target sits in an FMS ``GraniteBlock``: its rows in the fused q|k|v
or gate|up weight (``fused_weights=True``, FMS's default), or its own weight after ``unfuse_weights`` /
``fused_weights=False``. ``lora_sites`` resolves the table against the modules a block actually holds, so the merge
follows the layout at hand: fused, unfused, or sharded by FMS tensor parallelism (a rank holds a contiguous block of
rows of column-parallel weights, or of columns of row-parallel ones, as ``fms.modules.tp.TPModule.sharded_copy``
cuts them; the adapter's B rows or A columns are cut the same way).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch import nn

from fms_granite_speech.config import GraniteSpeechConfig, LoRAConfig, _decoder_ffn_dim
from fms_granite_speech.folder import read_json

__all__ = [
    "ADAPTER_CONFIG",
    "DecoderLoRA",
    "LORA_TARGETS",
    "LoRAPair",
    "LoRASite",
    "LoRATarget",
    "check_lora_config",
    "lora_shapes",
    "lora_sites",
    "read_lora_config",
]

ADAPTER_CONFIG = "adapter_config.json"


class LoRATarget(NamedTuple):
    """Where an HF/peft LoRA target sits in FMS's ``GraniteBlock``.

    Attributes:
        hf_site: the HF module under ``layers.{i}`` (``self_attn.q_proj``).
        fused: the FMS linear holding it with fused weights (``attn.in_proj.qkv_fused``).
        part: which block of that fused linear's rows (q|k|v: 0, 1, 2; gate|up: 0, 1), None when not fused.
        unfused: the FMS linear holding it alone (after ``unfuse_weights`` or with ``fused_weights=False``).
        rope: the rows are permuted by FMS's HF->FMS RoPE conversion, so the adapter's B rows must be too.
        tp_dim: 0 for a column-parallel linear under FMS tensor parallelism (rows are sharded), 1 for a
            row-parallel one (columns are sharded).
    """

    hf_site: str
    fused: str
    part: Optional[int]
    unfused: str
    rope: bool
    tp_dim: int


# fmt: off
LORA_TARGETS: dict[str, LoRATarget] = {
    "q_proj":    LoRATarget("self_attn.q_proj", "attn.in_proj.qkv_fused",  0,    "attn.in_proj.query", True,  0),
    "k_proj":    LoRATarget("self_attn.k_proj", "attn.in_proj.qkv_fused",  1,    "attn.in_proj.key",   True,  0),
    "v_proj":    LoRATarget("self_attn.v_proj", "attn.in_proj.qkv_fused",  2,    "attn.in_proj.value", False, 0),
    "o_proj":    LoRATarget("self_attn.o_proj", "attn.dense",              None, "attn.dense",         False, 1),
    "gate_proj": LoRATarget("mlp.gate_proj",    "ff_sub_layer.wg1_fused",  0,    "ff_sub_layer.wg",    False, 0),
    "up_proj":   LoRATarget("mlp.up_proj",      "ff_sub_layer.wg1_fused",  1,    "ff_sub_layer.w1",    False, 0),
    "down_proj": LoRATarget("mlp.down_proj",    "ff_sub_layer.w2",         None, "ff_sub_layer.w2",    False, 1),
}
# fmt: on


def lora_shapes(config: GraniteSpeechConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of the HF linear a LoRA target adapts, for the whole (unsharded) model."""
    d = config.decoder
    q = d.nheads * d.head_dim
    kv = (d.kvheads or d.nheads) * d.head_dim
    ffn = _decoder_ffn_dim(d)
    return {
        "q_proj": (d.emb_dim, q),
        "k_proj": (d.emb_dim, kv),
        "v_proj": (d.emb_dim, kv),
        "o_proj": (q, d.emb_dim),
        "gate_proj": (d.emb_dim, ffn),
        "up_proj": (d.emb_dim, ffn),
        "down_proj": (ffn, d.emb_dim),
    }[target]


def check_lora_config(config: GraniteSpeechConfig) -> None:
    """Refuse a LoRA config this port cannot merge.

    Raises:
        TypeError: ``config.lora`` is neither a ``LoRAConfig`` nor None.
        ValueError: a target that is not one of ``LORA_TARGETS`` (the message lists them).
    """
    lora = config.lora
    if lora is None:
        return
    if not isinstance(lora, LoRAConfig):
        raise TypeError(f"config.lora must be a LoRAConfig or None, got {type(lora).__name__}")
    unknown = [t for t in lora.target_modules if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(
            f"LoRA targets {unknown} cannot be merged by this port; supported decoder targets: "
            f"{', '.join(LORA_TARGETS)}"
        )


class LoRAPair(nn.Module):
    """One LoRA adapter: ``delta_W = scale * B @ A`` with A [r, in] and B [out, r] (peft's lora_A / lora_B).

    B's rows are in FMS order (for q/k: after FMS's RoPE row permutation). ``base`` (non-persistent buffer, set when
    the adapter is first merged) holds the un-merged rows of the decoder weight this pair adapts.
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
                in_f, out_f = lora_shapes(config, target)
                layer.add_module(target, LoRAPair(lora.rank, in_f, out_f))
            self.layers.append(layer)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, LoRAPair):
                m.reset_parameters()


@dataclass(frozen=True)
class LoRASite:
    """One adapted weight of one decoder layer, as the block at hand holds it.

    Attributes:
        layer, target: decoder layer index and target name (a ``LORA_TARGETS`` key).
        pair: the adapter matrices; weight: the decoder ``nn.Parameter`` the delta is added to.
        rows: the rows of ``weight`` the target owns (its block of a fused weight, else all rows).
        b_rows: the rows of ``pair.B`` that ``rows`` hold (all of them unless tensor parallelism shards the rows).
        a_cols: the columns of ``pair.A`` that ``weight`` holds (all of them unless a row-parallel weight is sharded).
        name: ``weight``'s parameter path under the decoder block (``attn.in_proj.qkv_fused.weight``).
    """

    layer: int
    target: str
    pair: LoRAPair
    weight: nn.Parameter
    rows: slice
    b_rows: slice
    a_cols: slice
    name: str

    def delta(self, scale: float) -> torch.Tensor:
        """``scale * B @ A`` for this site's rows and columns, float32 [len(rows), weight columns]."""
        b = self.pair.B[self.b_rows].to(torch.float32)
        a = self.pair.A[:, self.a_cols].to(torch.float32)
        return scale * (b @ a)


def _tp(owner: nn.Module) -> tuple[int, int]:
    """(rank, world size) of an FMS tensor-parallel module, (0, 1) for a plain one."""
    from fms.modules.tp import TPModule

    if isinstance(owner, TPModule):
        return owner.rank, owner.world_size
    return 0, 1


def _shard(full: int, local: int, rank: int, world: int, max_partition: int) -> slice:
    """The slice of a dimension of size ``full`` a rank holds when it holds ``local`` of it.

    ``TPModule.sharded_copy`` cuts a dimension into ``max(world, max_partition)`` equal blocks; with more ranks than
    blocks (grouped-query kv heads, ``max_partition`` < world), consecutive ranks share a block.
    """
    if local == full:
        return slice(0, full)
    index = rank // max(1, world // max_partition)
    return slice(index * local, (index + 1) * local)


def lora_sites(config: GraniteSpeechConfig, layers: nn.ModuleList, lora: "DecoderLoRA") -> Iterator[LoRASite]:
    """Every adapted weight of every decoder layer, resolved against the modules each block holds now.

    Args:
        config: the model config (targets, head counts, widths).
        layers: ``decoder.base_model.layers`` (FMS ``GraniteBlock``s, fused, unfused or tensor-parallel).
        lora: the model's ``DecoderLoRA``.

    Raises:
        ValueError: a block holds neither the fused nor the unfused linear of a target (a layout this port does not
            know); the message names both paths.
    """
    d = config.decoder
    kv_heads = d.kvheads or d.nheads
    for i, block in enumerate(layers):
        for target in config.lora.target_modules:
            spec = LORA_TARGETS[target]
            pair = getattr(lora.layers[i], target)
            in_f, out_f = lora_shapes(config, target)
            owner = block.get_submodule(spec.fused.split(".")[0])  # attn / ff_sub_layer: the TP unit
            rank, world = _tp(owner)
            heads = {"q_proj": d.nheads, "k_proj": kv_heads, "v_proj": kv_heads}.get(target, world)
            try:
                linear, path = block.get_submodule(spec.fused), spec.fused
                fused = spec.part is not None
            except AttributeError:
                try:
                    linear, path = block.get_submodule(spec.unfused), spec.unfused
                except AttributeError:
                    raise ValueError(f"decoder layer {i} has neither {spec.fused} nor {spec.unfused}: a layout the "
                                     f"LoRA merge does not know (target {target})") from None
                fused = False
            weight = linear.weight
            if spec.tp_dim == 0:  # column-parallel: this rank's rows of the target
                if fused:
                    splits = (list(owner.in_proj.splits) if spec.fused.startswith("attn.")
                              else [owner.hidden_dim, owner.hidden_dim])
                    start = sum(splits[: spec.part])
                    local = splits[spec.part]
                else:
                    start, local = 0, weight.shape[0]
                rows = slice(start, start + local)
                b_rows = _shard(out_f, local, rank, world, heads)
                a_cols = slice(0, in_f)
            else:  # row-parallel: all rows, this rank's columns
                rows = slice(0, weight.shape[0])
                b_rows = slice(0, out_f)
                a_cols = _shard(in_f, weight.shape[1], rank, world, world)
            yield LoRASite(i, target, pair, weight, rows, b_rows, a_cols, f"{path}.weight")


# -- adapter_config.json (peft) ---------------------------------------------------------------------------------------

# peft options that change what the adapter computes; this port merges plain LoRA (scale alpha / r) only.
_UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": "DoRA",
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r))",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "a subset of layers",
    "layer_replication": "layer replication",
    "modules_to_save": "fully trained extra modules",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "LoRA biases",
    "target_parameters": "parameter targets",
    "trainable_token_indices": "trainable tokens",
    "exclude_modules": "excluded modules",
    "use_qalora": "QA-LoRA",
}


def read_lora_config(path: Union[str, Path]) -> Optional[LoRAConfig]:
    """The LoRA adapter described by a folder's ``adapter_config.json`` (peft format), or None without one.

    ``target_modules`` may be a list of module names (peft matches a name or a dotted suffix, e.g. the released
    ``["q_proj", "v_proj"]``) or a regular expression over full module names (as ``add_adapter`` with a regex
    writes it); both are resolved to the decoder projections they select.

    Args:
        path: the checkpoint folder, or the ``adapter_config.json`` file itself.

    Returns:
        ``LoRAConfig(rank=r, alpha=lora_alpha, target_modules=(...))`` in ``LORA_TARGETS`` order, or None.

    Raises:
        ValueError: unreadable JSON, not a LoRA adapter, an option this port cannot merge (DoRA, rsLoRA, rank
            patterns, ...), or a target that is not one of the decoder projections (q/k/v/o_proj, gate/up/down_proj).
    """
    path = Path(path)
    file = path / ADAPTER_CONFIG if path.is_dir() else path
    if not file.is_file():
        return None
    try:
        cfg = read_json(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); restore the adapter's adapter_config.json") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} holds a JSON {type(cfg).__name__}, not peft's adapter config object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{file}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    for option, what in _UNSUPPORTED_PEFT_OPTIONS.items():
        if cfg.get(option):
            raise ValueError(f"{file}: {option}={cfg[option]!r} ({what}) is not supported by this port's LoRA merge")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float)) \
            or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{file}: needs an integer r >= 1 and a positive numeric lora_alpha, got r={rank!r}, "
                         f"lora_alpha={alpha!r}")

    # Full module names a decoder projection has in HF Granite Speech (5.x runtime and 4.x layouts).
    def names(target: str) -> list[str]:
        site = LORA_TARGETS[target].hf_site
        return [f"model.language_model.layers.0.{site}", f"language_model.model.layers.0.{site}"]

    spec = cfg.get("target_modules")
    if isinstance(spec, str):
        try:
            targets = [t for t in LORA_TARGETS if any(re.fullmatch(spec, n) for n in names(t))]
        except re.error as err:
            raise ValueError(f"{file}: target_modules {spec!r} is not a valid regular expression ({err})") from None
        if not targets:
            raise ValueError(
                f"{file}: target_modules regex {spec!r} selects none of the decoder projections this port can "
                f"merge ({', '.join(LORA_TARGETS)})"
            )
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(e, str) for e in spec):
        targets = []
        for entry in spec:
            hits = [t for t in LORA_TARGETS if any(n == entry or n.endswith("." + entry) for n in names(t))]
            if not hits:
                raise ValueError(
                    f"{file}: LoRA target {entry!r} is not a decoder projection this port can merge; supported: "
                    f"{', '.join(LORA_TARGETS)}"
                )
            targets += hits
        targets = [t for t in LORA_TARGETS if t in targets]
    else:
        raise ValueError(f"{file}: target_modules must be a non-empty list of names or a regex string, got {spec!r}")
    return LoRAConfig(rank=rank, alpha=float(alpha), target_modules=tuple(targets))
