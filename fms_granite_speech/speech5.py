"""Granite Speech 5.0 (granite-speech-5.0-470m-turboctc) on FMS: an encoder-only CTC model, its own FMS
architecture ``granite_speech5``.

The computation follows transformers 5.17's ``GraniteSpeech5ForCTC`` (``models/granite_speech5/
modeling_granite_speech5.py``) and its feature extractor (``feature_extraction_granite_speech5.py``):

* features: 80-bin log-mels (torchaudio ``MelSpectrogram``, n_fft 512, window 400, hop 160), floored 8 (log10 units)
  below the utterance's maximum, ``/4 + 1``, with their deltas (``torchaudio.functional.compute_deltas``, window 3),
  two frames stacked: [B, T, 320] at 50 frames/s before subsampling;
* ``input_linear`` (320 -> H), then ``num_layers`` Conformer blocks in the Macaron order
  ``x += 0.5 ff1(LN x); x += attn(LN x); x += conv(LN x); x += 0.5 ff2(LN x); x = LN x``;
  blocks in ``subsample_layers`` (default 0 and 1) halve time: their depthwise convolution has stride 2 and the
  residual around it is the mean of each pair of frames (a trailing odd frame dropped);
* attention: block-wise over ``context_size`` frames (time right-padded with zeros, padded keys masked), Shaw's
  relative positions as an additive bias ``(q . rel_pos_emb[clamp(i - j)]) * d**-0.5``, softmax scale ``d**-0.5``;
* after block ``num_layers // 2 - 1`` (0-based) the self-conditioned CTC residual ``x += out_mid(softmax(out(x)))``;
* the CTC head ``ctc_head`` (tied to ``out``: weight and bias) gives per-frame logits; greedy CTC decoding takes the
  argmax per frame, collapses repeats and drops the blank (``blank_id``, transformers' ``pad_token_id`` 0).

A padding mask (``attention_mask`` [B, T], 1 = real frame) zeroes padded frames after ``input_linear``, masks padded
keys and the convolution's input, and is halved (``frame pairs both real``) after each subsampling block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from fms import models
from fms.utils import serialization
from fms.utils.config import ModelConfig
from torch import nn
from torch.nn import functional as F

from fms_granite_speech.conformer import BatchNorm1d

__all__ = ["ARCHITECTURE", "GraniteSpeech5", "GraniteSpeech5Config", "GraniteSpeech5FeatureExtractor", "VARIANTS",
           "ctc_collapse", "ctc_greedy", "output_lengths"]

ARCHITECTURE = "granite_speech5"


@dataclass
class GraniteSpeech5Config(ModelConfig):
    """The encoder-only CTC model. Widths in features; ``context_size`` in frames at the rate of the block's input.

    Raises:
        ValueError: ``context_size`` outside (0, ``max_pos_emb``], ``num_kv_heads`` other than ``num_heads`` (see
            below), a subsampling index outside the blocks, fewer than 2 blocks.
    """

    vocab_size: int = 16384
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 16
    num_heads: int = 8
    # transformers 5.17 builds k/v with num_attention_heads rows and repeats them num_heads // num_kv_heads times,
    # so only num_kv_heads == num_heads runs there; kept as a field so a folder's config.json that says otherwise is
    # refused with its reason
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    num_mel_bins: int = 80
    hidden_act: str = "silu"
    max_pos_emb: int = 512
    context_size: int = 128
    conv_kernel_size: int = 7
    conv_expansion_factor: int = 2
    subsample_layers: tuple = (0, 1)
    feedforward_bias: bool = True  # transformers' attention_bias, which it applies to the feed-forward Linears
    layer_norm_eps: float = 1e-5
    blank_id: int = 0
    tie_ctc_head: bool = True

    def __post_init__(self):
        self.subsample_layers = tuple(self.subsample_layers)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} != num_heads={self.num_heads}: transformers 5.17's "
                             "GraniteSpeech5EncoderAttention builds key/value with num_attention_heads rows and "
                             "cannot run it either")
        if not 0 < self.context_size <= self.max_pos_emb:
            raise ValueError(f"context_size={self.context_size} must be in (0, max_pos_emb={self.max_pos_emb}]")
        if self.num_layers < 2:
            raise ValueError(f"num_layers={self.num_layers}: the mid-layer CTC residual needs at least 2 blocks")
        bad = [i for i in self.subsample_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"subsample_layers {list(self.subsample_layers)}: {bad} are not blocks "
                             f"(0..{self.num_layers - 1})")
        if not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(f"blank_id={self.blank_id} is outside the vocabulary (vocab_size={self.vocab_size})")

    @property
    def mid_layer(self) -> int:
        """0-based block after which the CTC residual is added (transformers: ``layer_idx + 1 == num_layers // 2``)."""
        return self.num_layers // 2 - 1

    def to_hf(self):
        """The equivalent ``transformers.GraniteSpeech5CTCConfig``."""
        from transformers import GraniteSpeech5CTCConfig

        return GraniteSpeech5CTCConfig(
            vocab_size=self.vocab_size, pad_token_id=self.blank_id, tie_word_embeddings=self.tie_ctc_head,
            encoder_config=dict(
                vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, num_mel_bins=self.num_mel_bins,
                hidden_act=self.hidden_act, max_position_embeddings=self.max_pos_emb,
                context_size=self.context_size, conv_kernel_size=self.conv_kernel_size,
                conv_expansion_factor=self.conv_expansion_factor, subsample_layers=list(self.subsample_layers),
                attention_bias=self.feedforward_bias),
        )

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GraniteSpeech5Config":
        """From a ``transformers.GraniteSpeech5CTCConfig`` (or its dict).

        Raises:
            ValueError: not a ``granite_speech5_ctc`` config, or a field this port refuses (see the class).
        """
        from transformers import GraniteSpeech5CTCConfig

        if isinstance(hf_config, Mapping):
            hf_config = GraniteSpeech5CTCConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
        if getattr(hf_config, "model_type", None) != "granite_speech5_ctc":
            raise ValueError(f"expected a granite_speech5_ctc config, got model_type={hf_config.model_type!r}")
        e = hf_config.encoder_config
        if e.vocab_size != hf_config.vocab_size:
            raise ValueError(f"encoder vocab_size {e.vocab_size} != CTC vocab_size {hf_config.vocab_size}")
        return cls(vocab_size=hf_config.vocab_size, hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
                   num_layers=e.num_hidden_layers, num_heads=e.num_attention_heads,
                   num_kv_heads=e.num_key_value_heads, head_dim=e.head_dim, num_mel_bins=e.num_mel_bins,
                   hidden_act=e.hidden_act, max_pos_emb=e.max_position_embeddings, context_size=e.context_size,
                   conv_kernel_size=e.conv_kernel_size, conv_expansion_factor=e.conv_expansion_factor,
                   subsample_layers=tuple(e.subsample_layers), feedforward_bias=bool(e.attention_bias),
                   blank_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
                   tie_ctc_head=bool(getattr(hf_config, "tie_word_embeddings", True)))


# granite-speech-5.0-470m-turboctc: transformers' GraniteSpeech5EncoderConfig / GraniteSpeech5CTCConfig defaults are
# documented as that checkpoint's (auto_docstring(checkpoint="ibm-granite/granite-speech-5.0-470m-turboctc")):
# 16 blocks of 1024, 8 heads, feed-forward 4096, 80 mel bins, context 128, kernel 7, subsampling blocks 0 and 1,
# vocab 16384, the CTC head tied to ``out``.
_470M = GraniteSpeech5Config()
# tiny: the real depth and subsampling, small widths; a context of 16 frames so a few seconds span several blocks
_TINY = GraniteSpeech5Config(vocab_size=61, hidden_size=48, intermediate_size=96, num_heads=3, head_dim=16,
                             max_pos_emb=20, context_size=16)
VARIANTS: dict[str, GraniteSpeech5Config] = {"tiny": _TINY, "5.0-470m": _470M}


def output_lengths(frames: torch.Tensor, config: GraniteSpeech5Config) -> torch.Tensor:
    """Encoder frames after subsampling: ``frames // 2`` per subsampling block (int tensor, any shape)."""
    for _ in config.subsample_layers:
        frames = frames // 2
    return frames


def _halve_mask(mask: torch.Tensor) -> torch.Tensor:
    half = mask.shape[1] // 2
    return mask[:, : 2 * half].reshape(mask.shape[0], half, 2).all(dim=2)


class _FeedForward(nn.Module):
    def __init__(self, c: GraniteSpeech5Config):
        super().__init__()
        self.w1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.feedforward_bias)
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.feedforward_bias)
        from transformers.activations import ACT2FN

        self.act = ACT2FN[c.hidden_act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


class _BlockAttention(nn.Module):
    """Shaw relative-position self-attention within blocks of ``context_size`` frames."""

    def __init__(self, c: GraniteSpeech5Config):
        super().__init__()
        self.c = c
        inner = c.num_heads * c.head_dim
        self.query = nn.Linear(c.hidden_size, inner, bias=False)
        self.key = nn.Linear(c.hidden_size, inner, bias=False)
        self.value = nn.Linear(c.hidden_size, inner, bias=False)
        self.dense = nn.Linear(inner, c.hidden_size, bias=True)
        self.rel_pos_emb = nn.Embedding(2 * c.max_pos_emb + 1, c.head_dim)
        self.scale = c.head_dim ** -0.5

    def forward(self, x: torch.Tensor, dists: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        ctx, h, d = self.c.context_size, self.c.num_heads, self.c.head_dim
        pad = -t % ctx
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            if mask is None:
                mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
            mask = F.pad(mask, (0, pad), value=False)
        n = x.shape[1] // ctx

        def heads(y):
            return y.reshape(b * n, ctx, h, d).transpose(1, 2)  # [B*n, H, C, D]

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        rel = self.rel_pos_emb(dists) * self.scale  # [C, C, D]
        bias = torch.einsum("bhid,ijd->bhij", q, rel)
        if mask is not None:
            keys = mask.reshape(b * n, ctx)
            bias = bias.masked_fill(~keys[:, None, None, :], torch.finfo(bias.dtype).min)
        scores = (q @ k.transpose(-1, -2)) * self.scale + bias
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, n * ctx, h * d)
        return self.dense(out[:, :t])


class _Convolution(nn.Module):
    def __init__(self, c: GraniteSpeech5Config, stride: int):
        super().__init__()
        inner = c.hidden_size * c.conv_expansion_factor
        self.up = nn.Linear(c.hidden_size, 2 * inner)
        self.depthwise = nn.Conv1d(inner, inner, c.conv_kernel_size, stride=stride,
                                   padding=(c.conv_kernel_size - 1) // 2, groups=inner, bias=False)
        self.batch_norm = BatchNorm1d(inner)  # the 3.3 port's: running statistics, no int64 step counter
        self.down = nn.Linear(inner, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = F.glu(self.up(x), dim=-1)
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = F.silu(self.batch_norm(self.depthwise(x.transpose(1, 2))))
        return self.down(x.transpose(1, 2))


class _Block(nn.Module):
    def __init__(self, c: GraniteSpeech5Config, subsample: bool):
        super().__init__()
        self.subsample = subsample
        ln = lambda: nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # noqa: E731
        self.ff1_norm, self.attn_norm, self.conv_norm, self.ff2_norm, self.post_norm = ln(), ln(), ln(), ln(), ln()
        self.ff1, self.ff2 = _FeedForward(c), _FeedForward(c)
        self.attn = _BlockAttention(c)
        self.conv = _Convolution(c, stride=2 if subsample else 1)

    def forward(self, x, dists, mask):
        x = x + 0.5 * self.ff1(self.ff1_norm(x))
        x = x + self.attn(self.attn_norm(x), dists, mask)
        conv = self.conv(self.conv_norm(x), mask)
        if self.subsample:
            pooled = x.unfold(1, 2, 2).mean(-1)  # frame pairs averaged, a trailing odd frame dropped
            x = pooled + conv[:, : pooled.shape[1]]
        else:
            x = x + conv
        x = x + 0.5 * self.ff2(self.ff2_norm(x))
        return self.post_norm(x)


class _Encoder(nn.Module):
    def __init__(self, c: GraniteSpeech5Config):
        super().__init__()
        self.c = c
        self.input_linear = nn.Linear(4 * c.num_mel_bins, c.hidden_size)
        self.blocks = nn.ModuleList([_Block(c, i in c.subsample_layers) for i in range(c.num_layers)])
        self.out = nn.Linear(c.hidden_size, c.vocab_size)
        self.out_mid = nn.Linear(c.vocab_size, c.hidden_size)
        self.register_buffer("attention_dists", self.distances(), persistent=False)

    def distances(self, device=None) -> torch.Tensor:
        """[C, C] int64 rows of the relative-position table: ``clamp(i - j, -C, C) + max_pos_emb``. Not in
        checkpoints (transformers keeps it non-persistent too): a model built on the meta device recomputes it in
        ``post_init``."""
        c = self.c
        idx = torch.arange(c.context_size, device=device)
        return (idx[:, None] - idx[None, :]).clamp(-c.context_size, c.context_size) + c.max_pos_emb

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None):
        x = self.input_linear(features)
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        for i, block in enumerate(self.blocks):
            x = block(x, self.attention_dists, mask)
            if block.subsample and mask is not None:
                mask = _halve_mask(mask)
            if i == self.c.mid_layer:
                x = x + self.out_mid(self.out(x).softmax(dim=-1))
        return x, mask


class GraniteSpeech5(nn.Module):
    """The FMS model: ``forward(input_features, attention_mask=None)`` -> per-frame CTC logits [B, T', vocab] with
    ``T' = output_lengths(T)`` (``T`` stacked feature frames of 20 ms; ``T'`` of 80 ms with two subsampling blocks).

    Built like every FMS model: ``GraniteSpeech5(config=None, **kwargs)``, kwargs merged into a copy of the config,
    ``get_config()``, ``reset_parameters()``, ``post_init()`` (ties ``ctc_head`` to ``encoder.out``).

    Raises (forward):
        ValueError: features that are not [B, T > 0, 4 * num_mel_bins], or a mask of another [B, T].
    """

    def __init__(self, config: Optional[GraniteSpeech5Config] = None, distributed_strategy=None, **kwargs):
        super().__init__()
        config = config if config is not None else GraniteSpeech5Config()
        self.config = config.updated(**kwargs) if kwargs else GraniteSpeech5Config(**config.as_dict())
        self.encoder = _Encoder(self.config)
        self.ctc_head = nn.Linear(self.config.hidden_size, self.config.vocab_size)
        self._tie_ctc_head()

    def _tie_ctc_head(self) -> None:
        if self.config.tie_ctc_head:
            self.ctc_head.weight, self.ctc_head.bias = self.encoder.out.weight, self.encoder.out.bias

    @classmethod
    def from_config(cls, config: GraniteSpeech5Config) -> "GraniteSpeech5":
        return cls(config)

    def get_config(self) -> GraniteSpeech5Config:
        return self.config

    def reset_parameters(self) -> None:
        """Seeded-random-friendly init: Linear / Embedding ~ N(0, 0.02), norms 1 / 0, BatchNorm stats 0 / 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.encoder.attention_dists = self.encoder.distances(device=self.encoder.attention_dists.device)

    def post_init(self) -> None:
        """Recompute the relative-position distances (a non-persistent buffer: after a meta-device build it holds
        whatever memory ``to_empty`` gave it) and tie the CTC head to ``encoder.out`` (weight and bias), as
        transformers' ``_tied_weights_keys`` does."""
        self.encoder.attention_dists = self.encoder.distances(device=self.encoder.input_linear.weight.device)
        self._tie_ctc_head()

    def forward(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **attn_kwargs) -> torch.Tensor:
        """``attn_kwargs`` (FMS's attention options, e.g. ``attn_algorithm`` from its test suites) are accepted as by
        every FMS model and unused: the block attention computes its scores explicitly (a relative-position bias
        and a key mask), as transformers' eager path does."""
        c = self.config
        if (not isinstance(input_features, torch.Tensor) or input_features.dim() != 3
                or input_features.shape[-1] != 4 * c.num_mel_bins or input_features.shape[1] == 0):
            got = list(input_features.shape) if isinstance(input_features, torch.Tensor) else type(input_features)
            raise ValueError(f"input_features must be [B, T>0, {4 * c.num_mel_bins}] (stacked log-mels and deltas, "
                             f"from GraniteSpeech5FeatureExtractor), got {got}")
        need = 2 ** len(c.subsample_layers)
        if input_features.shape[1] < need:
            raise ValueError(f"input_features has {input_features.shape[1]} frame(s): the {len(c.subsample_layers)} "
                             f"subsampling blocks halve time each and need at least {need} frames "
                             f"({need * 20} ms of audio); transformers' model fails on it too")
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_features.shape[:2]):
                raise ValueError(f"attention_mask must be [B, T] = {list(input_features.shape[:2])}, got "
                                 f"{list(attention_mask.shape)}")
            mask = attention_mask.bool()
        hidden, _ = self.encoder(input_features.to(self.encoder.input_linear.weight.dtype), mask)
        return self.ctc_head(hidden)


def ctc_greedy(logits: torch.Tensor, blank_id: int, lengths: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Greedy CTC decoding: the argmax per frame, repeats collapsed, blanks dropped.

    Args:
        logits: [B, T', vocab]; lengths: real frames per item (int [B]), default all.

    Returns:
        one token-id list per item.
    """
    rows = logits.argmax(dim=-1).tolist()
    return [ctc_collapse(row if lengths is None else row[: int(lengths[i])], blank_id) for i, row in enumerate(rows)]


def ctc_collapse(frames: list[int], blank_id: int) -> list[int]:
    """One clip's per-frame token ids -> its CTC token sequence: repeats collapsed, then blanks dropped (a blank
    between two equal tokens keeps both)."""
    ids, prev = [], None
    for tok in frames:
        if tok != prev and tok != blank_id:
            ids.append(tok)
        prev = tok
    return ids


class GraniteSpeech5FeatureExtractor:
    """The project's Granite Speech 5.0 input pipeline (transformers' ``GraniteSpeech5FeatureExtractor``, computed
    the same way): waveforms (16 kHz, float) -> ``input_features`` [B, T, 4 * num_mel_bins] and ``attention_mask``
    [B, T] (1 = a frame of real audio: ``ceil((samples // 160) / 2)`` frames per clip).

    Raises:
        ValueError: an empty or non-1-D clip, or a sampling rate other than 16000.
    """

    def __init__(self, num_mel_bins: int = 80, sampling_rate: int = 16000, n_fft: int = 512, win_length: int = 400,
                 hop_length: int = 160, delta_win_length: int = 3, logmel_floor_db: float = 8.0):
        import torchaudio

        self.num_mel_bins, self.sampling_rate, self.hop_length = num_mel_bins, sampling_rate, hop_length
        self.delta_win_length, self.logmel_floor_db = delta_win_length, logmel_floor_db
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sampling_rate, n_fft=n_fft, win_length=win_length,
                                                        hop_length=hop_length, n_mels=num_mel_bins)

    def __call__(self, waves, sampling_rate: int = 16000) -> dict:
        import torchaudio

        if sampling_rate != self.sampling_rate:
            raise ValueError(f"audio at {sampling_rate} Hz; the extractor takes {self.sampling_rate} Hz (resample it)")
        clips = [torch.as_tensor(w, dtype=torch.float32) for w in (waves if isinstance(waves, (list, tuple))
                                                                   else [waves])]
        for i, w in enumerate(clips):
            if w.dim() != 1 or w.numel() == 0:
                raise ValueError(f"clip {i} must be a non-empty 1-D waveform, got shape {list(w.shape)}")
        shortest = self.mel.n_fft // 2 + 1
        if max(w.numel() for w in clips) < shortest:
            raise ValueError(f"the longest clip has {max(w.numel() for w in clips)} samples; the mel spectrogram's "
                             f"reflect padding needs at least {shortest} ({shortest / self.sampling_rate * 1000:.0f} "
                             "ms at 16 kHz; transformers' extractor fails on it too)")
        lengths = [w.numel() for w in clips]
        audio = torch.zeros(len(clips), max(lengths))
        for i, w in enumerate(clips):
            audio[i, : w.numel()] = w
        mel_frames = audio.shape[1] // self.hop_length
        frames = 2 * math.ceil(mel_frames / 2)
        needed = (frames - 1) * self.hop_length + 1
        if audio.shape[1] < needed:
            audio = F.pad(audio, (0, needed - audio.shape[1]))
        with torch.no_grad():
            logmel = self.mel(audio)[..., :frames].clamp_min(1e-10).log10()
            top = logmel.amax(dim=(-2, -1), keepdim=True)
            logmel = torch.maximum(logmel, top - self.logmel_floor_db) / 4 + 1
            deltas = torchaudio.functional.compute_deltas(logmel, win_length=self.delta_win_length)
            feats = torch.cat((logmel, deltas), dim=-2).transpose(-1, -2)
            feats = feats.reshape(len(clips), -1, 2 * feats.shape[-1])
        enc = torch.tensor([-(-(n // self.hop_length) // 2) for n in lengths])
        mask = (torch.arange(feats.shape[1])[None, :] < enc[:, None]).long()
        return {"input_features": feats, "attention_mask": mask}


# -- FMS registration: the model, its variants, the HF checkpoint adapter, the HF-config registry -----------------

def _factory(variant: str):
    def make(config: Optional[GraniteSpeech5Config] = None, **kwargs) -> GraniteSpeech5:
        return GraniteSpeech5(config if config is not None else GraniteSpeech5Config(**VARIANTS[variant].as_dict()),
                              **kwargs)
    return make


for _name in VARIANTS:
    models.register_model(ARCHITECTURE, _name, _factory(_name))

# transformers' names -> this model's (a checkpoint's keys: encoder.layers.{i}...., ctc_head tied to encoder.out)
_RENAMES = (
    (r"^encoder\.layers\.(\d+)\.", r"encoder.blocks.\1."),
    (r"\.feed_forward([12])\.linear1\.", r".ff\1.w1."),
    (r"\.feed_forward([12])\.linear2\.", r".ff\1.w2."),
    (r"\.norm_feed_forward([12])\.", r".ff\1_norm."),
    (r"\.norm_self_att\.", ".attn_norm."),
    (r"\.norm_conv\.", ".conv_norm."),
    (r"\.norm_out\.", ".post_norm."),
    (r"\.self_attn\.q_proj\.", ".attn.query."),
    (r"\.self_attn\.k_proj\.", ".attn.key."),
    (r"\.self_attn\.v_proj\.", ".attn.value."),
    (r"\.self_attn\.o_proj\.", ".attn.dense."),
    (r"\.self_attn\.rel_pos_emb\.", ".attn.rel_pos_emb."),
    (r"\.conv\.pointwise_lin1\.", ".conv.up."),
    (r"\.conv\.depthwise_conv\.", ".conv.depthwise."),
    (r"\.conv\.norm\.", ".conv.batch_norm."),
    (r"\.conv\.pointwise_lin2\.", ".conv.down."),
)


def _hf_to_fms_names(input_sd: Mapping[str, Any], **kwargs) -> dict[str, Any]:
    """transformers' names -> this model's; BatchNorm's ``num_batches_tracked`` step counters (training-only, int64)
    are dropped, as the model keeps none."""
    import re

    out = {}
    for key, value in input_sd.items():
        if key.endswith(".num_batches_tracked"):
            continue
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


serialization.register_adapter_step(ARCHITECTURE, "hf_to_fms_names", _hf_to_fms_names)
serialization.register_adapter(ARCHITECTURE, "hf", ["hf_to_fms_names"])


def build_granite_speech5_params(hf_config) -> dict:
    """FMS param builder for ``get_model("hf_pretrained", model_path=DIR)`` on a ``GraniteSpeech5ForCTC`` folder."""
    return {"config": GraniteSpeech5Config.from_hf(hf_config)}


def _register_hf_config() -> None:
    from fms_granite_speech import _fms_compat

    _fms_compat.register_hf_config("GraniteSpeech5ForCTC", ARCHITECTURE, build_granite_speech5_params)


_register_hf_config()


def get_model(variant: Optional[str] = None, model_path: Union[None, str] = None, **kwargs) -> GraniteSpeech5:
    """``fms.models.get_model("granite_speech5", variant, model_path, source="hf")`` with the folder checked first
    (safetensors only)."""
    from fms.models import get_model as fms_get_model

    if model_path is not None:
        from pathlib import Path

        from fms_granite_speech.folder import check_safetensors_folder

        check_safetensors_folder(Path(model_path), for_glob=True)
        return fms_get_model("hf_pretrained", model_path=str(model_path), **kwargs)
    return fms_get_model(ARCHITECTURE, variant or "tiny", **kwargs)
