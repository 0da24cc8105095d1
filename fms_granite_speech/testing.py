"""Seeded random-weight reference models with realistic parameter statistics.

No weights can be downloaded here, so tests, the parity CLI's default run and the benchmarks build the HF reference
from a config and give it weights whose statistics resemble a trained model's. HF's own init leaves LayerNorm
weights at 1, every bias and the BatchNorm running statistics at their trivial values, and peft leaves LoRA B at
zero: a port that dropped a bias, a running mean or the adapter would still match such a model. Here every one of
them is non-trivial, so each is actually tested.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fms_granite_speech.config import GraniteSpeechConfig, LoRAConfig


def realistic_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter and BatchNorm buffer of ``model`` in place, deterministically from ``seed``.

    Rules (by module type, in ``named_modules`` order, drawn from one CPU ``torch.Generator``):

    * Linear / Conv weights ~ N(0, 1/fan_in) (activations keep unit scale through deep stacks); biases ~ N(0, 0.05^2).
    * LayerNorm, RMSNorm, BatchNorm scales ~ 1 + N(0, 0.1^2); shifts ~ N(0, 0.05^2).
    * BatchNorm running_mean ~ N(0, 0.1^2), running_var ~ U(0.5, 2.0).
    * Embedding tables ~ N(0, 0.02^2); the Shaw relative-position table (``rel_pos_emb``) ~ N(0, 0.5^2).
    * Any other parameter (e.g. the projector's learnable ``query``) ~ N(0, 1).
    * peft LoRA A ~ N(0, 1/fan_in) and LoRA B ~ N(0, 0.05^2) (non-zero, so an adapter that is dropped shows).

    Tied parameters are initialised once. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()

    def fill(t: torch.Tensor, fn) -> None:
        if id(t) in seen or t is None:
            return
        seen.add(id(t))
        with torch.no_grad():
            t.copy_(fn(t.shape).to(t.dtype))

    def normal(std: float, mean: float = 0.0):
        return lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean

    def uniform(lo: float, hi: float):
        return lambda shape: torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    for name, module in model.named_modules():
        direct = dict(module.named_parameters(recurse=False))
        kind = type(module).__name__
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            w = module.weight
            fan_in = w.shape[1] * (w.shape[2] if w.dim() == 3 else 1)
            std = 0.05 if name.endswith("lora_B.default") or ".lora_B." in name + "." else fan_in**-0.5
            fill(w, normal(std))
            if module.bias is not None:
                fill(module.bias, normal(0.05))
        elif isinstance(module, nn.BatchNorm1d):
            fill(module.weight, normal(0.1, 1.0))
            fill(module.bias, normal(0.05))
            fill(module.running_mean, normal(0.1))
            fill(module.running_var, uniform(0.5, 2.0))
        elif isinstance(module, nn.LayerNorm) or "RMSNorm" in kind or "LayerNorm" in kind:
            if "weight" in direct:
                fill(direct["weight"], normal(0.1, 1.0))
            if "bias" in direct:
                fill(direct["bias"], normal(0.05))
        elif isinstance(module, nn.Embedding):
            fill(module.weight, normal(0.5 if name.endswith("rel_pos_emb") else 0.02))
        for pname, p in direct.items():
            fill(p, normal(1.0))
    return model


def build_hf_model(
    config: GraniteSpeechConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    lora: bool = True,
):
    """The HF reference ``GraniteSpeechForConditionalGeneration`` for ``config``, realistic random weights, eval mode.

    With ``lora=True`` and ``config.lora`` set, a non-zero LoRA adapter is attached through transformers' peft
    integration (``add_adapter``), exactly as ``from_pretrained`` of a real checkpoint folder attaches it, so HF's
    ``generate`` toggles it (on with audio, off for text-only) the way it does for the real model.

    The model is built directly in ``dtype`` (torch's default dtype set for the construction, as ``from_pretrained``
    with ``dtype=`` does: HF's float32 buffers such as the rotary ``inv_freq`` stay float32), never as a float32 copy
    first, so a 3.3-2b in bf16 needs bf16 memory only; the random values are drawn one tensor at a time.
    """
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = config.hf_class()(config.to_hf())
        if lora and config.lora is not None:
            add_lora_adapter(model, config.lora)
    finally:
        torch.set_default_dtype(previous)
    realistic_init_(model, seed)
    return model.to(device=device).eval()



def fms_from_hf(hf_model: nn.Module, config: GraniteSpeechConfig, *, tp_rank: Optional[int] = None) -> nn.Module:
    """The FMS ``GraniteSpeech`` for ``config`` holding ``hf_model``'s weights, eval mode, on their device.

    Built on the meta device, as FMS's ``get_model`` builds, so every tensor must come from the HF state dict; that
    goes through FMS's ``load_state_dict_into_model`` with the registered ``granite_speech`` / ``hf`` adapter (the code
    path of every checkpoint load), then ``post_init`` (ties, LoRA merge), which refuses a tensor no key filled.

    Args:
        tp_rank: this process's rank under FMS tensor parallelism (the decoder sharded with
            ``TensorParallelStrategy``, FMS's loader cutting this rank's shard); None: one process, whole model.
    """
    from fms.utils.serialization import load_state_dict_into_model

    from fms_granite_speech.model import GraniteSpeech

    if tp_rank is None:
        strategy, load_kwargs = {}, {}
    else:
        from fms.distributed.strategy import TensorParallelStrategy

        strategy, load_kwargs = {"distributed_strategy": TensorParallelStrategy()}, {"distributed_strategy": "tp",
                                                                                     "rank": tp_rank}
    with torch.device("meta"):
        fms = GraniteSpeech(config, **strategy)
    load_state_dict_into_model(fms, dict(hf_model.state_dict()), "granite_speech", "hf", **load_kwargs)
    fms.post_init()
    return fms.eval()


def add_lora_adapter(model: nn.Module, lora: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Attach a peft LoRA adapter (rank, alpha, targets from ``lora``) to the decoder of an HF Granite Speech model.

    Targets are matched on the language model only (the Q-Former's projections are named query/key/value, not
    q_proj/v_proj, so the regex below is exact rather than relying on that).
    """
    from peft import LoraConfig

    targets = "|".join(lora.target_modules)
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=rf".*language_model\.layers\.\d+\.self_attn\.({targets})",
        lora_dropout=0.0,
        bias="none",
    )
    model.add_adapter(peft_config, adapter_name=adapter_name)
    return model


def lora_weights_are_nontrivial(model: nn.Module) -> bool:
    """True when every LoRA B matrix of ``model`` has a non-zero entry (guards tests against peft's zero init)."""
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    return bool(bs) and all(bool(b.abs().sum() > 0) for b in bs)


def random_input_ids(
    config: GraniteSpeechConfig, num_audio_tokens: list[int], text_len: int = 7, seed: int = 0
) -> torch.Tensor:
    """Token ids [B, L]: ``text_len`` random text tokens around each item's run of ``<|audio|>`` tokens.

    Items whose audio run is shorter are left-padded with ``pad_id`` so every row has the same length (FMS and HF
    both see the same ids; padding semantics are the caller's business). Text ids avoid the audio token.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = config.decoder.src_vocab_size
    rows = []
    for n in num_audio_tokens:
        text = torch.randint(1, vocab, (text_len,), generator=gen)
        text[text == config.audio_token_index] = 1
        split = text_len // 2
        audio = torch.full((n,), config.audio_token_index)
        rows.append(torch.cat([text[:split], audio, text[split:]]))
    width = max(len(r) for r in rows)
    pad = max(config.decoder.pad_id, 0)
    return torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])


def audio_seconds_to_samples(seconds: float, sample_rate: int = 16000) -> int:
    """Whole samples in ``seconds`` of audio (rounded down)."""
    return int(math.floor(seconds * sample_rate))


__all__ = [
    "add_lora_adapter",
    "audio_seconds_to_samples",
    "build_hf_model",
    "lora_weights_are_nontrivial",
    "random_input_ids",
    "realistic_init_",
]


def write_hf_checkpoint(hf_model: nn.Module, directory, *, max_shard_size=None):
    """Write an HF Granite Speech model as a transformers checkpoint folder; returns the folder as a ``Path``.

    The base model is saved with ``save_pretrained`` from an adapter-free copy (same config, the base weights with
    peft's ``.base_layer`` wrapping undone): ``save_pretrained`` on a model with a peft adapter attached writes
    peft-wrapped base names (``q_proj.base_layer.weight``) that transformers then fails to reload. The adapter, when
    ``hf_model`` has one, is written in peft format as transformers' adapter path of ``save_pretrained`` writes it:
    ``adapter_config.json`` (``base_model_name_or_path`` = this folder, as ``GraniteSpeechForConditionalGeneration
    .save_pretrained`` sets it) and ``adapter_model.safetensors`` with keys ``base_model.model.<name>``.
    ``GraniteSpeechForConditionalGeneration.from_pretrained(folder)`` then rebuilds the same model, adapter included.

    Args:
        hf_model: a ``GraniteSpeechForConditionalGeneration`` (e.g. from ``build_hf_model``), left unchanged.
        directory: the folder to write (created if needed).
        max_shard_size: passed to ``save_pretrained`` (e.g. ``"200KB"``) to write several shards and an index.
    """
    import copy
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    has_adapter = bool(getattr(hf_model, "_hf_peft_config_loaded", False))
    base_sd = {k.replace(".base_layer.", "."): v for k, v in hf_model.state_dict().items() if ".lora_" not in k}
    with torch.device("meta"):
        base = type(hf_model)(copy.deepcopy(hf_model.config))
    base.load_state_dict(base_sd, strict=True, assign=True)
    base.tie_weights()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    base.save_pretrained(directory, **kwargs)
    if has_adapter:
        name = hf_model.active_adapters()[0]
        peft_config = copy.deepcopy(hf_model.peft_config[name])
        peft_config.base_model_name_or_path = str(directory)
        peft_config.save_pretrained(directory)
        adapter_sd = hf_model.get_adapter_state_dict(name)
        tensors = {f"base_model.model.{k}": v.detach().contiguous() for k, v in adapter_sd.items()}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
