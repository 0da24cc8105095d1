"""The Conformer CTC speech encoder of Granite Speech, written for the Foundation Model Stack.

Read top to bottom: feed-forward module -> blocked Shaw relative-position attention -> convolution module ->
Conformer block -> encoder -> HF->FMS weight conversion (a literal key map plus small named transforms).

The math follows transformers' ``GraniteSpeechCTCEncoder`` (``transformers.models.granite_speech``, v5.17), itself
adapted from lucidrains/conformer. Shapes use B = batch, T = encoder frames (1 frame = 20 ms, two 10 ms mel frames
stacked), H = ``hidden_dim``, h = ``num_heads``, d = ``dim_head``, C = ``context_size``.

Parity holds in ``eval()`` only: dropout is omitted (HF's rate is 0.1 in training) and BatchNorm uses its running
statistics. Like HF, the encoder takes no padding mask: padded frames of a batch flow through convolution and
attention, so a padded item's output differs from the same item run alone, exactly as in HF.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from fms.modules.feedforward import FeedForwardBlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fms_granite_speech._strict import state_dict_problems, template_regex
from fms_granite_speech.config import EncoderConfig

__all__ = [
    "BlockedRelPosAttention",
    "ConformerBlock",
    "ConformerConvModule",
    "ConformerEncoder",
    "ConformerFeedForward",
    "BatchNorm1d",
    "HF_ENCODER_DROPPED",
    "HF_ENCODER_KEY_MAP",
    "HF_ENCODER_TRANSFORMS",
    "hf_encoder_to_fms",
    "load_hf_encoder",
    "relative_distances",
]


def _layer_norm(config: EncoderConfig) -> nn.LayerNorm:
    """The Conformer's LayerNorm (weight and bias, eps ``layer_norm_eps``).

    ``torch.nn.LayerNorm`` rather than ``fms.modules.layernorm.LayerNormParameterized(use_mean=True,
    elementwise_shift=True)``. Both compute the same formula and both pass the float32 bar (whole tiny encoder vs
    HF, T=77: rel-L2 4.6e-7 with the FMS module, 4.2e-7 with nn.LayerNorm), but in bf16 the FMS module centres and
    squares in bf16 while nn.LayerNorm (like HF, which uses it) accumulates in float32: against HF run in bf16 the
    whole encoder drifts 1.7e-2 with the FMS module and 3.0e-3 with nn.LayerNorm (measured on CPU, tiny config).
    """
    return nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)


def relative_distances(context_size: int, max_pos_emb: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Row indices into the Shaw table for every (query, key) pair of one block: int64 [C, C].

    ``dists[i, j] = clamp(i - j, -C, C) + max_pos_emb`` (HF ``GraniteSpeechCTCEncoder.__init__``); the clamp is a
    no-op inside one block (|i - j| < C) and is kept for fidelity to the reference.
    """
    pos = torch.arange(context_size, device=device)
    return (pos[:, None] - pos[None, :]).clamp(-context_size, context_size) + max_pos_emb


class ConformerFeedForward(nn.Module):
    """Macaron half-step feed-forward branch: LayerNorm -> Linear(H, mult*H) -> SiLU -> Linear(mult*H, H).

    Returns the branch output [B, T, H] *before* the 0.5 scale, which the block applies (as HF's ``ff1``/``ff2``).
    The MLP is FMS's own ``FeedForwardBlock`` (``w1``, ``w2``).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.ln = _layer_norm(config)
        self.mlp = FeedForwardBlock(
            config.hidden_dim,
            hidden_grow_factor=config.feedforward_mult,
            activation_fn=nn.SiLU(),
            p_dropout=0.0,
            use_bias=True,
        )

    def reset_parameters(self):
        self.ln.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln(x))


class BlockedRelPosAttention(nn.Module):
    """Self-attention inside fixed blocks of C frames with Shaw relative-position biases.

    Steps (HF ``GraniteSpeechConformerAttention``): LayerNorm; right-pad T with zeros to ``nb * C`` frames,
    ``nb = ceil(T / C)``; project q, k, v (no bias); attention runs independently in each block (never across);
    the additive bias is ``einsum(q, rel_pos_emb[dists]) * d**-0.5`` (Shaw et al. 2018, arXiv 1803.02155, with
    the table looked up by clamped distance); in the last block, rows and columns of padded frames get
    ``-finfo(dtype).max``; softmax attention with scale ``d**-0.5``; drop the padded frames; output projection.

    ``math_sdpa=True`` (default) forces PyTorch's MATH SDPA backend, as HF does. That matters for numerics, not
    just speed: with bf16/fp16 inputs MATH upcasts q, k, v and the bias and computes the softmax in float32, while
    the fused backends accumulate differently (vLLM PR #55303 measured the drift when it swapped the backend).
    Set it False to let PyTorch pick a fused kernel and accept that drift.

    Shapes: ``x`` [B, T, H], ``attention_dists`` int64 [C, C] -> [B, T, H]. The block count derives from the static
    shape only and nothing branches on tensor values, so the module compiles with ``torch.compile``.
    """

    def __init__(self, config: EncoderConfig, math_sdpa: bool = True):
        super().__init__()
        inner = config.num_heads * config.dim_head
        self.num_heads = config.num_heads
        self.dim_head = config.dim_head
        self.context_size = config.context_size
        self.scale = config.dim_head**-0.5
        self.math_sdpa = math_sdpa
        self.ln = _layer_norm(config)
        self.query = nn.Linear(config.hidden_dim, inner, bias=False)
        self.key = nn.Linear(config.hidden_dim, inner, bias=False)
        self.value = nn.Linear(config.hidden_dim, inner, bias=False)
        self.dense = nn.Linear(inner, config.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * config.max_pos_emb + 1, config.dim_head)

    def reset_parameters(self):
        self.ln.reset_parameters()
        for linear in (self.query, self.key, self.value, self.dense):
            linear.reset_parameters()
        self.rel_pos_emb.reset_parameters()

    def _heads(self, t: torch.Tensor, num_blocks: int) -> torch.Tensor:
        # [B, nb*C, h*d] -> [B*nb, h, C, d]; block b of item i lands at row i*nb + b
        return t.reshape(-1, num_blocks, self.context_size, self.num_heads, self.dim_head).flatten(0, 1).transpose(1, 2)

    def forward(self, x: torch.Tensor, attention_dists: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape
        c = self.context_size
        num_blocks = -(-frames // c)
        padded = num_blocks * c
        x = F.pad(self.ln(x), (0, 0, 0, padded - frames))

        q = self._heads(self.query(x), num_blocks)
        k = self._heads(self.key(x), num_blocks)
        v = self._heads(self.value(x), num_blocks)

        rel = self.rel_pos_emb(attention_dists)  # [C, C, d]
        bias = torch.einsum("b h c d, c r d -> b h c r", q, rel) * self.scale  # [B*nb, h, C, C]

        # Key/query frames past T exist only in the last block; mask every (row, col) pair touching one.
        valid = (torch.arange(padded, device=x.device) < frames).view(num_blocks, 1, c)
        invalid = ~(valid.transpose(1, 2) & valid)  # [nb, C, C]
        bias = bias.unflatten(0, (batch, num_blocks))
        bias = bias.masked_fill(invalid[None, :, None], -torch.finfo(bias.dtype).max).flatten(0, 1)

        if self.math_sdpa:
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, padded, -1)[:, :frames]
        return self.dense(out)


class BatchNorm1d(nn.BatchNorm1d):
    """torch's ``BatchNorm1d`` (fixed momentum 0.1, running statistics) without the int64 step counter.

    ``num_batches_tracked`` only counts training steps (torch reads it for ``momentum=None``, which this module never
    uses; eval never reads it), and as an int64 buffer it made the model's state dict two dtypes, against FMS's
    ``get_model(..., data_type=...)`` convention (ibm-fms ``tests/models/test_getmodel_datatype.py``: every tensor of
    the state dict in one dtype). It is not kept: state dicts carry ``weight``, ``bias``, ``running_mean``,
    ``running_var``; a ``num_batches_tracked`` in a loaded state dict (HF's checkpoints hold one) is accepted and
    dropped.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_batches_tracked = None

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        # nn.Module's own loader: _NormBase's would add the counter back for state dicts without version metadata
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class ConformerConvModule(nn.Module):
    """Convolution branch: LayerNorm -> pointwise up (H -> 2cH) -> GLU -> depthwise conv (k taps) -> BatchNorm ->
    SiLU -> pointwise down (cH -> H), with c = ``conv_expansion_factor``.

    The pointwise convolutions of HF (``Conv1d``, kernel 1) are ``nn.Linear`` here, applied channels-last, so only
    the depthwise convolution and BatchNorm see the [B, cH, T] layout. The depthwise input is zero-padded by
    ``(k//2, k//2 - (k+1)%2)`` frames (HF ``GraniteSpeechConformerDepthWiseConv1d``): same length out, causal-side
    one shorter for even k. BatchNorm uses running statistics in ``eval()``.

    Numerics: float32 matches HF to ~2e-7 per branch. In bf16 on CPU, ``nn.Linear`` rounds a few elements of the up
    projection differently from HF's kernel-1 ``Conv1d`` (rel-L2 ~5e-5 per branch); through 16 blocks that is the
    whole 3e-3 bf16 gap between this encoder and HF's (HF's own bf16-vs-float32 gap is 1.6e-2).

    Shapes: [B, T, H] -> [B, T, H].
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        inner = config.hidden_dim * config.conv_expansion_factor
        k = config.conv_kernel_size
        self.padding = (k // 2, k // 2 - (k + 1) % 2)
        self.ln = _layer_norm(config)
        self.up_proj = nn.Linear(config.hidden_dim, 2 * inner)
        self.depthwise = nn.Conv1d(inner, inner, k, groups=inner, bias=False)
        self.batch_norm = BatchNorm1d(inner)
        self.down_proj = nn.Linear(inner, config.hidden_dim)

    def reset_parameters(self):
        self.ln.reset_parameters()
        for m in (self.up_proj, self.depthwise, self.batch_norm, self.down_proj):
            m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.up_proj(self.ln(x)), dim=-1)  # [B, T, cH]
        x = self.depthwise(F.pad(x.transpose(1, 2), self.padding))
        # contiguous(): on CPU a bf16 matmul over the transposed view rounds differently from HF's kernel-1 Conv1d
        # (rel-L2 2.7e-3 on one block's conv output, measured); from the copied layout it is bit-identical.
        x = F.silu(self.batch_norm(x)).transpose(1, 2).contiguous()
        return self.down_proj(x)


class ConformerBlock(nn.Module):
    """One Conformer block (Gulati et al. 2020, arXiv 2005.08100; HF ``GraniteSpeechConformerBlock``).

    ``x += 0.5*ff1(x); x += attn(x); x += conv(x); x += 0.5*ff2(x); return post_norm(x)``, all out of place.
    Shapes: ``x`` [B, T, H], ``attention_dists`` int64 [C, C] -> [B, T, H].
    """

    def __init__(self, config: EncoderConfig, math_sdpa: bool = True):
        super().__init__()
        self.ff1 = ConformerFeedForward(config)
        self.attn = BlockedRelPosAttention(config, math_sdpa=math_sdpa)
        self.conv = ConformerConvModule(config)
        self.ff2 = ConformerFeedForward(config)
        self.post_norm = _layer_norm(config)

    def reset_parameters(self):
        for m in (self.ff1, self.attn, self.conv, self.ff2, self.post_norm):
            m.reset_parameters()

    def forward(self, x: torch.Tensor, attention_dists: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, attention_dists)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


class ConformerEncoder(nn.Module):
    """Granite Speech's Conformer CTC encoder: stacked mel features -> per-frame hidden states.

    ``input_linear`` (160 -> H), ``config.num_layers`` ``ConformerBlock``s, and after block ``config.mid_layer``
    (0-based; 7 of 16) the self-conditioned CTC residual ``x = x + out_mid(softmax(out(x)))`` -- ``out`` is the CTC
    head (H -> ``output_dim``), ``out_mid`` feeds its posteriors back (``output_dim`` -> H). HF adds it in place on
    the block's output; here it is out of place, so a hook on ``blocks.{mid_layer}`` sees the pre-residual output.
    The encoder output is the last block's output (``out`` is not applied at the end).

    ``attention_dists`` is a non-persistent int64 buffer [C, C] (not in checkpoints): built in ``__init__`` and
    rebuilt by ``post_init()``, which FMS's ``get_model`` calls after filling a meta-device model from a checkpoint.

    Args:
        config: the encoder's ``EncoderConfig``.
        math_sdpa: force the MATH SDPA backend in every attention, as HF does (see ``BlockedRelPosAttention``).
    """

    def __init__(self, config: EncoderConfig, math_sdpa: bool = True):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"ConformerEncoder needs an EncoderConfig, got {type(config).__name__}")
        self.config = config
        self.input_linear = nn.Linear(config.input_dim, config.hidden_dim)
        self.blocks = nn.ModuleList([ConformerBlock(config, math_sdpa) for _ in range(config.num_layers)])
        self.out = nn.Linear(config.hidden_dim, config.output_dim)
        self.out_mid = nn.Linear(config.output_dim, config.hidden_dim)
        self.register_buffer(
            "attention_dists", relative_distances(config.context_size, config.max_pos_emb), persistent=False
        )

    def reset_parameters(self):
        """Fresh random weights (PyTorch's default inits; FMS's for the feed-forward MLPs) and BatchNorm stats."""
        for m in (self.input_linear, self.out, self.out_mid, *self.blocks):
            m.reset_parameters()

    def post_init(self):
        """Rebuild ``attention_dists`` on the device of the parameters (after meta-device construction + loading).

        Uses the first parameter not on the meta device (meta only if every parameter still is).
        """
        devices = [p.device for p in self.parameters()]
        device = next((d for d in devices if d.type != "meta"), devices[0])
        self.attention_dists = relative_distances(self.config.context_size, self.config.max_pos_emb, device)

    def forward(
        self, input_features: torch.Tensor, return_ctc_logits: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Encode stacked log-mel features.

        Args:
            input_features: float [B, T, input_dim] (T encoder frames of 20 ms; from the feature extractor).
            return_ctc_logits: also return the CTC logits computed after block ``mid_layer``.

        Returns:
            hidden states [B, T, output_width] (``hidden_dim``, or ``hidden_dim * (1 + len(cat_hidden_layers))``
            for Granite Speech Plus: the exported hidden states first, in order, then the final one), or
            ``(hidden, ctc_logits)`` with ``ctc_logits`` [B, T, output_dim] (pre-softmax) when ``return_ctc_logits``.

        Raises:
            ValueError: ``input_features`` is not 3-D, has no frames, or its last dimension is not ``input_dim``.
            TypeError: ``input_features`` is not a floating-point tensor.
        """
        self._check_input(input_features)
        x = self.input_linear(input_features)
        cat = self.config.cat_hidden_layers or ()
        exported = [x] if 0 in cat else []
        ctc_logits = None
        for i, block in enumerate(self.blocks):
            x = block(x, self.attention_dists)
            if i == self.config.mid_layer:
                ctc_logits = self.out(x)
                x = x + self.out_mid(ctc_logits.softmax(dim=-1))
            # transformers exports the hidden state after i + 1 blocks before adding the CTC residual, but adds it
            # in place, so the exported tensor after block mid_layer holds the residual too: exported after it here
            if i + 1 in cat:
                exported.append(x)
        if exported:
            x = torch.cat([*exported, x], dim=-1)
        return (x, ctc_logits) if return_ctc_logits else x

    def _check_input(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(
                f"input_features must be a floating-point tensor [B, T, {self.config.input_dim}], got "
                f"{getattr(features, 'dtype', type(features).__name__)}"
            )
        if features.dim() != 3 or features.shape[-1] != self.config.input_dim or features.shape[1] == 0:
            raise ValueError(
                f"input_features must have shape [B, T>0, {self.config.input_dim}] (stacked mel frames, e.g. from "
                f"GraniteSpeechFeatureExtractor), got {tuple(features.shape)}; add a batch dimension with "
                "unsqueeze(0) for a single clip"
            )


# -- HF -> FMS weight conversion ---------------------------------------------------------------------------------------
#
# Keys are relative to the encoder (HF: ``model.encoder.`` at runtime, ``encoder.`` in checkpoints). ``{}`` is the
# block index. A tuple target means the HF tensor is split into several FMS tensors by its named transform.

# fmt: off
HF_ENCODER_KEY_MAP: dict[str, Union[str, tuple[str, ...]]] = {
    "input_linear.weight":                        "input_linear.weight",
    "input_linear.bias":                          "input_linear.bias",
    "layers.{}.ff1.pre_norm.weight":              "blocks.{}.ff1.ln.weight",
    "layers.{}.ff1.pre_norm.bias":                "blocks.{}.ff1.ln.bias",
    "layers.{}.ff1.up_proj.weight":               "blocks.{}.ff1.mlp.w1.weight",
    "layers.{}.ff1.up_proj.bias":                 "blocks.{}.ff1.mlp.w1.bias",
    "layers.{}.ff1.down_proj.weight":             "blocks.{}.ff1.mlp.w2.weight",
    "layers.{}.ff1.down_proj.bias":               "blocks.{}.ff1.mlp.w2.bias",
    "layers.{}.attn.pre_norm.weight":             "blocks.{}.attn.ln.weight",
    "layers.{}.attn.pre_norm.bias":               "blocks.{}.attn.ln.bias",
    "layers.{}.attn.to_q.weight":                 "blocks.{}.attn.query.weight",
    "layers.{}.attn.to_kv.weight":                ("blocks.{}.attn.key.weight", "blocks.{}.attn.value.weight"),
    "layers.{}.attn.to_out.weight":               "blocks.{}.attn.dense.weight",
    "layers.{}.attn.to_out.bias":                 "blocks.{}.attn.dense.bias",
    "layers.{}.attn.rel_pos_emb.weight":          "blocks.{}.attn.rel_pos_emb.weight",
    "layers.{}.conv.norm.weight":                 "blocks.{}.conv.ln.weight",
    "layers.{}.conv.norm.bias":                   "blocks.{}.conv.ln.bias",
    "layers.{}.conv.up_conv.weight":              "blocks.{}.conv.up_proj.weight",
    "layers.{}.conv.up_conv.bias":                "blocks.{}.conv.up_proj.bias",
    "layers.{}.conv.depth_conv.conv.weight":      "blocks.{}.conv.depthwise.weight",
    "layers.{}.conv.batch_norm.weight":           "blocks.{}.conv.batch_norm.weight",
    "layers.{}.conv.batch_norm.bias":             "blocks.{}.conv.batch_norm.bias",
    "layers.{}.conv.batch_norm.running_mean":     "blocks.{}.conv.batch_norm.running_mean",
    "layers.{}.conv.batch_norm.running_var":      "blocks.{}.conv.batch_norm.running_var",
    "layers.{}.conv.down_conv.weight":            "blocks.{}.conv.down_proj.weight",
    "layers.{}.conv.down_conv.bias":              "blocks.{}.conv.down_proj.bias",
    "layers.{}.ff2.pre_norm.weight":              "blocks.{}.ff2.ln.weight",
    "layers.{}.ff2.pre_norm.bias":                "blocks.{}.ff2.ln.bias",
    "layers.{}.ff2.up_proj.weight":               "blocks.{}.ff2.mlp.w1.weight",
    "layers.{}.ff2.up_proj.bias":                 "blocks.{}.ff2.mlp.w1.bias",
    "layers.{}.ff2.down_proj.weight":             "blocks.{}.ff2.mlp.w2.weight",
    "layers.{}.ff2.down_proj.bias":               "blocks.{}.ff2.mlp.w2.bias",
    "layers.{}.post_norm.weight":                 "blocks.{}.post_norm.weight",
    "layers.{}.post_norm.bias":                   "blocks.{}.post_norm.bias",
    "out.weight":                                 "out.weight",
    "out.bias":                                   "out.bias",
    "out_mid.weight":                             "out_mid.weight",
    "out_mid.bias":                               "out_mid.bias",
}
# fmt: on

# HF keys that are recognised and deliberately dropped ({} a block index): the distance table is a non-persistent
# buffer that HF never saves (it is listed in case a caller passes ``named_buffers()``), FMS rebuilds it in
# ``post_init``; BatchNorm's training step counter is not kept by this port (``BatchNorm1d``).
HF_ENCODER_DROPPED: tuple[str, ...] = ("attention_dists", "layers.{}.conv.batch_norm.num_batches_tracked")


def _split_kv(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``to_kv`` [2*h*d, H] -> (key [h*d, H], value [h*d, H]): HF chunks its output into k then v."""
    k, v = t.chunk(2, dim=0)
    return k, v


def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """A kernel-1 ``Conv1d`` weight [out, in, 1] -> the equal ``nn.Linear`` weight [out, in]."""
    return t.squeeze(-1)


HF_ENCODER_TRANSFORMS: dict[str, Callable] = {
    "layers.{}.attn.to_kv.weight": _split_kv,
    "layers.{}.conv.up_conv.weight": _conv1x1_to_linear,
    "layers.{}.conv.down_conv.weight": _conv1x1_to_linear,
}


_HF_PATTERNS = [(template_regex(t), t) for t in HF_ENCODER_KEY_MAP]
_DROPPED = [template_regex(t) for t in HF_ENCODER_DROPPED]


_FMS_PATTERNS = [
    (template_regex(fms), hf)
    for hf, target in HF_ENCODER_KEY_MAP.items()
    for fms in (target if isinstance(target, tuple) else (target,))
]


def _hf_name_of(fms_key: str) -> str:
    """The HF key (relative to the encoder) an FMS key is converted from, for error messages."""
    for pattern, hf in _FMS_PATTERNS:
        m = pattern.match(fms_key)
        if m:
            return hf.format(*m.groups())
    return "?"


def _origin(fms_key: str) -> str:
    hf = _hf_name_of(fms_key)
    return "not an HF encoder key" if hf == "?" else f"from HF {hf}"


def _match_template(key: str) -> Optional[tuple[str, tuple[str, ...]]]:
    for pattern, template in _HF_PATTERNS:
        m = pattern.match(key)
        if m:
            return template, m.groups()
    return None


def hf_encoder_to_fms(
    sd: Mapping[str, torch.Tensor], hf_prefix: str = "", fms_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Rename (and where needed reshape/split) HF Conformer encoder tensors to this module's names.

    Works on any subset of the keys, e.g. one block's keys at a time as FMS's adapter steps receive them.
    Keys not starting with ``hf_prefix`` pass through untouched. Keys under ``hf_prefix`` that the map does not know
    also pass through (unrenamed, without the prefix swap) so a strict loader reports them as unexpected;
    ``HF_ENCODER_DROPPED`` keys are dropped. Tensors are returned as given or as views (no copies).

    Args:
        sd: state dict (str -> Tensor), e.g. ``hf_model.model.encoder.state_dict()`` or a checkpoint's tensors.
        hf_prefix: prefix of encoder keys in ``sd`` (``"encoder."`` in checkpoints, ``"model.encoder."`` at runtime).
        fms_prefix: prefix given to converted keys (e.g. ``"encoder."`` inside the whole FMS model).

    Returns:
        a new dict.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if not key.startswith(hf_prefix):
            out[key] = tensor
            continue
        rel = key[len(hf_prefix) :]
        if any(p.fullmatch(rel) for p in _DROPPED):
            continue
        found = _match_template(rel)
        if found is None:
            out[key] = tensor
            continue
        template, groups = found
        target = HF_ENCODER_KEY_MAP[template]
        value = HF_ENCODER_TRANSFORMS.get(template, lambda t: t)(tensor)
        targets = target if isinstance(target, tuple) else (target,)
        values = value if isinstance(value, tuple) else (value,)
        for t, v in zip(targets, values, strict=True):
            out[fms_prefix + t.format(*groups)] = v
    return out


def load_hf_encoder(
    hf_encoder_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], config: EncoderConfig
) -> ConformerEncoder:
    """Build a ``ConformerEncoder`` for ``config`` holding the weights of an HF ``GraniteSpeechCTCEncoder``.

    The encoder is built on the meta device and takes the converted tensors (copied, so nothing is shared with the
    source) with their device and dtype; ``post_init`` then builds ``attention_dists`` there. Returned in
    ``eval()`` mode. BatchNorm's ``num_batches_tracked`` is dropped (``HF_ENCODER_DROPPED``), present or not.

    Args:
        hf_encoder_or_state_dict: the HF encoder module (``hf_model.model.encoder``) or its state dict with keys
            relative to the encoder (``input_linear.weight``, ``layers.0.attn.to_q.weight``, ...).
        config: the encoder config the weights were made for.

    Raises:
        TypeError: the first argument is neither an ``nn.Module`` nor a mapping of tensors.
        ValueError: keys are missing or unexpected, or shapes differ; the message names every offending key (with
            expected and got shapes).
    """
    if isinstance(hf_encoder_or_state_dict, nn.Module):
        sd = hf_encoder_or_state_dict.state_dict()
    elif isinstance(hf_encoder_or_state_dict, Mapping):
        sd = dict(hf_encoder_or_state_dict)
    else:
        raise TypeError(
            "load_hf_encoder needs the HF encoder module or its state dict (str -> Tensor), got "
            f"{type(hf_encoder_or_state_dict).__name__}"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict values must be tensors; not tensors: {', '.join(map(str, bad))}")

    converted = hf_encoder_to_fms(sd)
    with torch.device("meta"):
        model = ConformerEncoder(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = state_dict_problems(
        expected,
        converted,
        describe_missing=lambda k: f"{k} (from HF {_hf_name_of(k)})",
        describe_unexpected=lambda k: f"{k} ({_origin(k)})",
    )
    if problems:
        raise ValueError(
            "cannot load the HF Conformer encoder weights (check that the config matches the checkpoint and that the "
            "state dict is the encoder's, keys relative to the encoder):\n  " + "\n  ".join(problems)
        )

    full = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in converted.items()}
    model.load_state_dict(full, strict=True, assign=True)
    model.post_init()
    return model.eval()
