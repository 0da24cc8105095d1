"""Windowed Q-Former projector: encoder frames -> audio tokens in the decoder's embedding space.

The math is that of ``GraniteSpeechEncoderProjector`` and the ``Blip2QFormerModel`` it wraps (transformers 5.17,
``models/granite_speech/modeling_granite_speech.py`` and ``models/blip_2/modeling_blip_2.py``), as it runs there:
query embeddings only, no text input, ``encoder_attention_mask=None``:

1. right-pad the encoder output [B, T, He] with zeros to ``nb = ceil(T / window_size)`` windows and view it as
   [B * nb, window_size, He]: window ``i`` of item ``b`` holds frames ``i*window_size ... (i+1)*window_size - 1``;
2. LayerNorm the learnable queries [1, num_queries, H] (``num_queries = window_size // downsample_rate``);
3. per Q-Former layer (post-LayerNorm, BERT style): self-attention over the queries; when
   ``j % cross_attention_frequency == 0`` cross-attention from the queries to the frames of each window; an MLP.
   Every window is cross-attended in full with NO mask, so the zero frames padding the last window are attended
   too (parity means matching that);
4. ``linear`` of the result viewed as [B, nb * num_queries, H] -> [B, nb * num_queries, out_dim].

Until the first cross-attention the queries are the same for every window, so that part runs once at batch 1 and
broadcasts, as in HF. Dropout is omitted (eval-mode parity only). Weight conversion from the HF layout is at the
bottom of this file: ``HF_PROJECTOR_KEY_MAP``, ``hf_projector_to_fms``, ``load_hf_projector``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from fms.modules.attention import MultiHeadAttention
from fms.modules.feedforward import FeedForwardBlock
from fms.utils.activation import str_to_activation
from torch import nn

from fms_granite_speech._strict import state_dict_problems, template_regex
from fms_granite_speech.config import ProjectorConfig

__all__ = [
    "HF_PROJECTOR_KEY_MAP",
    "QFormerCrossAttention",
    "QFormerLayer",
    "QFormerMLP",
    "QFormerProjector",
    "QFormerSelfAttention",
    "hf_projector_to_fms",
    "load_hf_projector",
    "split_windows",
]


def split_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut [B, T, He] encoder frames into [B * nb, window_size, He] windows, ``nb = ceil(T / window_size)``.

    The last window is right-padded with zero frames. Windows are consecutive and item-major: row ``b * nb + i``
    holds frames ``i*window_size ... (i+1)*window_size - 1`` of item ``b`` (HF ``GraniteSpeechEncoderProjector``).
    """
    b, t, he = x.shape
    nb = (t + window_size - 1) // window_size
    x = F.pad(x, (0, 0, 0, nb * window_size - t))
    return x.reshape(b * nb, window_size, he)


class QFormerSelfAttention(nn.Module):
    """Bidirectional self-attention over the queries, then ``ln(x + attn(x))`` (HF ``Blip2QFormerAttention``).

    ``attn`` is FMS's ``MultiHeadAttention`` (separate q/k/v and ``dense`` with biases, softmax scale
    ``head_dim ** -0.5``). Input and output [N, num_queries, H], N = 1 before the first cross-attention.
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_heads
        self.attn = MultiHeadAttention(
            config.hidden_size,
            head_dim,
            head_dim,
            config.num_heads,
            config.num_heads,
            p_dropout=0.0,
            use_bias=True,
            fused=False,
        )
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.attn(x, attn_name="sdpa_bidirectional"))


class QFormerCrossAttention(nn.Module):
    """Queries attend to the frames of their window (no mask), then ``ln(x + dense(attn))``.

    HF ``Blip2QFormerAttention(is_cross_attention=True)``: q from the queries (H -> H), k and v from the encoder
    frames (He -> H), all with biases; softmax scale ``head_dim ** -0.5``.

    Args (forward):
        x: queries [1 or N, num_queries, H]; a batch of 1 is broadcast to every window.
        memory: windows of encoder frames [N, window_size, He].

    Returns:
        [N, num_queries, H].
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.nheads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        n, w, _ = memory.shape
        lq = x.shape[1]
        q = self.query(x).view(x.shape[0], lq, self.nheads, self.head_dim).transpose(1, 2)
        k = self.key(memory).view(n, w, self.nheads, self.head_dim).transpose(1, 2)
        v = self.value(memory).view(n, w, self.nheads, self.head_dim).transpose(1, 2)
        # q keeps batch 1 before the first cross-attention and SDPA broadcasts it over the N windows, as HF's call
        # (transformers' sdpa_attention_forward, scale = head_dim**-0.5): an expanded q selects another SDPA kernel,
        # which rounds differently (measured: rel-L2 2.2e-3 in bf16 on this layer, 1.4e-7 in float32)
        attn = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # [N, heads, num_queries, head_dim]
        attn = attn.transpose(1, 2).reshape(n, lq, self.nheads * self.head_dim)
        return self.ln(x + self.dense(attn))


class QFormerMLP(nn.Module):
    """``ln(x + w2(act(w1(x))))`` (HF ``intermediate_query`` + ``output_query``); [N, Lq, H] -> [N, Lq, H].

    ``ff_sub_layer`` is FMS's ``FeedForwardBlock`` (H -> intermediate_size -> H, biases, activation from
    ``config.hidden_act``).
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        try:
            act = str_to_activation(config.hidden_act)
        except ValueError as err:
            raise ValueError(f"projector hidden_act={config.hidden_act!r} is not supported: {err}") from None
        # FeedForwardBlock sizes its hidden layer as int(grow * hidden); the +0.5 makes float rounding land exactly
        # on intermediate_size (72/40*40 can come out as 71.999...).
        self.ff_sub_layer = FeedForwardBlock(
            config.hidden_size,
            hidden_grow_factor=(config.intermediate_size + 0.5) / config.hidden_size,
            activation_fn=act,
            p_dropout=0.0,
            use_bias=True,
        )
        if self.ff_sub_layer.hidden_dim != config.intermediate_size:  # FMS sizes the layer from a float factor
            raise ValueError(
                f"FMS FeedForwardBlock built {self.ff_sub_layer.hidden_dim} hidden units for projector "
                f"intermediate_size={config.intermediate_size}"
            )
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.ff_sub_layer(x))


class QFormerLayer(nn.Module):
    """One Q-Former layer: ``self_attn``, then ``cross_attn`` (only when ``index % cross_attention_frequency == 0``,
    otherwise the attribute is None), then ``mlp`` (HF ``Blip2QFormerLayer`` on query tokens).

    Args (forward):
        x: queries [1 or N, num_queries, H].
        memory: windows [N, window_size, He].

    Returns:
        [N, num_queries, H] after a cross-attention, else the batch of ``x``.
    """

    def __init__(self, config: ProjectorConfig, index: int):
        super().__init__()
        self.self_attn = QFormerSelfAttention(config)
        self.cross_attn: Optional[QFormerCrossAttention] = (
            QFormerCrossAttention(config) if index % config.cross_attention_frequency == 0 else None
        )
        self.mlp = QFormerMLP(config)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, memory)
        return self.mlp(x)


class QFormerProjector(nn.Module):
    """Windowed Q-Former projector (HF ``GraniteSpeechEncoderProjector``); see the module docstring for the math.

    Args:
        config: the projector's ``ProjectorConfig``.
        out_dim: width of the output tokens (the decoder's embedding width ``emb_dim``).

    Forward:
        encoder_hidden: [B, T, encoder_hidden_size] encoder output, T >= 1 frames (20 ms each).
        Returns [B, ceil(T / window_size) * num_queries, out_dim] audio-token embeddings (one token per
        ``downsample_rate`` frames, rounded up to whole windows).

    Raises:
        TypeError: ``config`` is not a ``ProjectorConfig``.
        ValueError: bad ``out_dim``/config values at construction; at forward, ``encoder_hidden`` that is not a
            3-D floating tensor with ``encoder_hidden_size`` features and at least one frame.
    """

    def __init__(self, config: ProjectorConfig, out_dim: int):
        super().__init__()
        if not isinstance(config, ProjectorConfig):
            raise TypeError(
                f"config must be a ProjectorConfig, got {type(config).__name__} (pass GraniteSpeechConfig.projector)"
            )
        if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim < 1:
            raise ValueError(f"out_dim={out_dim!r} must be a positive int (the decoder's emb_dim)")
        if config.num_layers < 1 or config.cross_attention_frequency < 1:
            raise ValueError(
                f"projector num_layers={config.num_layers} and cross_attention_frequency="
                f"{config.cross_attention_frequency} must both be >= 1"
            )
        self.config = config
        self.out_dim = out_dim
        self.query = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(config, j) for j in range(config.num_layers))
        self.linear = nn.Linear(config.hidden_size, out_dim)

    def reset_parameters(self) -> None:
        """HF-like initialisation: queries ~ N(0, 1), Linear weights ~ N(0, 0.02^2), biases 0, LayerNorms (1, 0)."""
        with torch.no_grad():
            self.query.normal_(0.0, 1.0)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()

    def num_tokens(self, num_frames: int) -> int:
        """Audio tokens produced for ``num_frames`` encoder frames: ``ceil(frames / window_size) * num_queries``."""
        w = self.config.window_size
        return (num_frames + w - 1) // w * self.config.num_queries

    def forward(self, encoder_hidden: torch.Tensor) -> torch.Tensor:
        if not isinstance(encoder_hidden, torch.Tensor) or not encoder_hidden.is_floating_point():
            raise ValueError(
                f"encoder_hidden must be a floating-point torch.Tensor [B, T, {self.config.encoder_hidden_size}], "
                f"got {type(encoder_hidden).__name__}"
                + (f" of dtype {encoder_hidden.dtype}" if isinstance(encoder_hidden, torch.Tensor) else "")
            )
        if encoder_hidden.dim() != 3 or encoder_hidden.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(
                f"encoder_hidden must be [B, T, encoder_hidden_size={self.config.encoder_hidden_size}], got "
                f"{list(encoder_hidden.shape)}; pass the encoder's last hidden state (batch first)"
            )
        b, t, _ = encoder_hidden.shape
        if t == 0 or b == 0:
            raise ValueError(f"encoder_hidden {list(encoder_hidden.shape)} is empty: need B >= 1 and T >= 1 frames")
        # HF keeps the Q-Former in the dtype of its own weights and casts the frames to it.
        memory = split_windows(encoder_hidden.to(self.query.dtype), self.config.window_size)
        x = self.norm(self.query)
        for layer in self.layers:
            x = layer(x, memory)
        x = x.reshape(b, -1, self.config.hidden_size)  # [B, nb * num_queries, H], windows in time order
        return self.linear(x)


# -- HF -> FMS weights ----------------------------------------------------------------------------------------------
#
# Keys relative to the projector (HF ``model.projector.`` at runtime, ``projector.`` in checkpoints on disk); ``{}``
# is the Q-Former layer number. Every tensor is copied unchanged: both sides store Linear weights as [out, in], and
# q/k/v stay separate (FMS MultiHeadAttention with fused=False), so no transform is needed.

_L = "qformer.encoder.layer.{}."

HF_PROJECTOR_KEY_MAP: dict[str, str] = {
    "query": "query",
    "qformer.layernorm.weight": "norm.weight",
    "qformer.layernorm.bias": "norm.bias",
    # self-attention
    _L + "attention.attention.query.weight": "layers.{}.self_attn.attn.in_proj.query.weight",
    _L + "attention.attention.query.bias": "layers.{}.self_attn.attn.in_proj.query.bias",
    _L + "attention.attention.key.weight": "layers.{}.self_attn.attn.in_proj.key.weight",
    _L + "attention.attention.key.bias": "layers.{}.self_attn.attn.in_proj.key.bias",
    _L + "attention.attention.value.weight": "layers.{}.self_attn.attn.in_proj.value.weight",
    _L + "attention.attention.value.bias": "layers.{}.self_attn.attn.in_proj.value.bias",
    _L + "attention.output.dense.weight": "layers.{}.self_attn.attn.dense.weight",
    _L + "attention.output.dense.bias": "layers.{}.self_attn.attn.dense.bias",
    _L + "attention.output.LayerNorm.weight": "layers.{}.self_attn.ln.weight",
    _L + "attention.output.LayerNorm.bias": "layers.{}.self_attn.ln.bias",
    # cross-attention (layers with j % cross_attention_frequency == 0)
    _L + "crossattention.attention.query.weight": "layers.{}.cross_attn.query.weight",
    _L + "crossattention.attention.query.bias": "layers.{}.cross_attn.query.bias",
    _L + "crossattention.attention.key.weight": "layers.{}.cross_attn.key.weight",
    _L + "crossattention.attention.key.bias": "layers.{}.cross_attn.key.bias",
    _L + "crossattention.attention.value.weight": "layers.{}.cross_attn.value.weight",
    _L + "crossattention.attention.value.bias": "layers.{}.cross_attn.value.bias",
    _L + "crossattention.output.dense.weight": "layers.{}.cross_attn.dense.weight",
    _L + "crossattention.output.dense.bias": "layers.{}.cross_attn.dense.bias",
    _L + "crossattention.output.LayerNorm.weight": "layers.{}.cross_attn.ln.weight",
    _L + "crossattention.output.LayerNorm.bias": "layers.{}.cross_attn.ln.bias",
    # MLP on the query tokens
    _L + "intermediate_query.dense.weight": "layers.{}.mlp.ff_sub_layer.w1.weight",
    _L + "intermediate_query.dense.bias": "layers.{}.mlp.ff_sub_layer.w1.bias",
    _L + "output_query.dense.weight": "layers.{}.mlp.ff_sub_layer.w2.weight",
    _L + "output_query.dense.bias": "layers.{}.mlp.ff_sub_layer.w2.bias",
    _L + "output_query.LayerNorm.weight": "layers.{}.mlp.ln.weight",
    _L + "output_query.LayerNorm.bias": "layers.{}.mlp.ln.bias",
    # output projection to the decoder width
    "linear.weight": "linear.weight",
    "linear.bias": "linear.bias",
}


_HF_TO_FMS = [(template_regex(hf), fms) for hf, fms in HF_PROJECTOR_KEY_MAP.items()]
_FMS_TO_HF = [(template_regex(fms), hf) for hf, fms in HF_PROJECTOR_KEY_MAP.items()]


def _translate(key: str, table: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(*m.groups())
    return None


def _dotted(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def hf_projector_to_fms(sd: Mapping[str, Any], hf_prefix: str = "", fms_prefix: str = "") -> dict[str, Any]:
    """Rename HF projector keys to this module's names (``HF_PROJECTOR_KEY_MAP``); tensors are passed through.

    Works on any subset of a state dict (one layer's keys, a whole checkpoint): a key is renamed when it is
    ``hf_prefix`` + a key of the map, and becomes ``fms_prefix`` + the mapped key; every other key is returned as
    is. Prefixes get a trailing dot if they lack one (``"model.projector"`` == ``"model.projector."``).

    Raises:
        ValueError: two input keys would end up under the same output key.
    """
    hf_prefix, fms_prefix = _dotted(hf_prefix), _dotted(fms_prefix)
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in sd.items():
        new = None
        if key.startswith(hf_prefix):
            rel = _translate(key[len(hf_prefix) :], _HF_TO_FMS)
            new = None if rel is None else fms_prefix + rel
        new = key if new is None else new
        if new in out:
            raise ValueError(f"state dict keys {source[new]!r} and {key!r} both map to {new!r}; pass only one")
        out[new] = value
        source[new] = key
    return out


def load_hf_projector(
    hf_projector_or_state_dict: nn.Module | Mapping[str, torch.Tensor], config: ProjectorConfig, out_dim: int
) -> QFormerProjector:
    """A ``QFormerProjector`` holding copies of the HF projector's weights (dtype and device kept), in eval mode.

    Args:
        hf_projector_or_state_dict: an HF ``GraniteSpeechEncoderProjector`` or its state dict, keys relative to
            the projector (``qformer.encoder.layer.0...``; strip ``model.projector.`` first, or use
            ``hf_projector_to_fms`` with ``hf_prefix``).
        config: the projector's ``ProjectorConfig``.
        out_dim: the decoder's embedding width (``linear`` output features).

    Raises:
        TypeError: the first argument is neither an ``nn.Module`` nor a mapping.
        ValueError: the weights do not match exactly; the message lists every missing key, unexpected key and
            wrong shape by name (FMS name and HF name), so a config or ``out_dim`` mismatch is easy to spot.
    """
    if isinstance(hf_projector_or_state_dict, nn.Module):
        sd = hf_projector_or_state_dict.state_dict()
    elif isinstance(hf_projector_or_state_dict, Mapping):
        sd = dict(hf_projector_or_state_dict)
    else:
        raise TypeError(
            "load_hf_projector needs an HF GraniteSpeechEncoderProjector or its state dict, got "
            f"{type(hf_projector_or_state_dict).__name__}"
        )
    converted = hf_projector_to_fms(sd)
    with torch.device("meta"):
        model = QFormerProjector(config, out_dim)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def named(fms_key: str) -> str:
        hf_key = _translate(fms_key, _FMS_TO_HF)
        return fms_key if hf_key is None or hf_key == fms_key else f"{fms_key} (HF {hf_key})"

    problems = state_dict_problems(expected, converted, describe_missing=named, describe_unexpected=named)
    if problems:
        raise ValueError(
            f"HF projector weights do not fit QFormerProjector(config, out_dim={out_dim}) "
            "(check that config and out_dim match the checkpoint):\n  " + "\n  ".join(problems)
        )
    model.load_state_dict({k: converted[k].detach().clone() for k in expected}, strict=True, assign=True)
    return model.eval()
