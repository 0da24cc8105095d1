"""Model-pair plugins: how the engine builds, feeds and runs one HF model and its FMS port.

A ``PairPlugin`` is the small interface the derived-map engine (``parity.engine``) needs from a model pair:

* ``build(dtype, seed, checkpoint, fused_weights)``: both models, the HF one from its transformers config class (a
  tiny config with seeded realistic weights, or a checkpoint folder), the FMS one through FMS's HF-config registry
  (``get_model("hf_pretrained")``'s conversion of the config) and FMS's ``hf`` adapter on transformers' checkpoint
  layout, the way ``get_model(..., source="hf")`` loads a folder. Every step is named: a failure is a
  ``BuildError`` naming the step (``HF model``, ``FMS config``, ``FMS model``, ``FMS adapter``, ``coverage``) and
  its first line;
* ``inputs(case, built, seed)``: the named input cases (``CASES``: one prompt, a left-padded batch with its mask, a
  prompt of one token, a prompt longer than the sliding window where the architecture has one);
* ``run_hf`` / ``run_fms``: one forward of each side on those inputs;
* hints for the derivation and the comparison: ``exclude`` (HF keys left out of the lineage), ``transforms`` (a
  named transform of an FMS row, e.g. ``logits_scaling``), ``notes``.

``ARCHITECTURES`` registers one plugin per FMS architecture with a transformers twin in the pinned stack; the tiny
configs are built from each HF config class (widths chosen so FMS's width rounding, ``multiple_of``, keeps HF's
widths).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from parity._shell import error_line

__all__ = ["ARCHITECTURES", "BuildError", "BuiltPair", "CASES", "PairPlugin", "TextInputs", "plugin"]

CASES = {
    "prompt": "one prompt of 12 tokens",
    "image_prompt": "an image (two tiles' size: anyres patches) between 3 and 5 text tokens (vision pairs)",
    "batch_left_padded": "a batch of two prompts (12 and 7 tokens), the short one left-padded (right-padded for an "
                         "encoder), with its attention mask",
    "length_1": "a prompt of one token",
    "beyond_window": "a prompt 5 tokens longer than the sliding window (architectures with one)",
}


class BuildError(RuntimeError):
    """A step of building or loading the pair failed; ``step`` names it, the message is one line."""

    def __init__(self, step: str, message: str):
        super().__init__(f"step {step!r} failed: {message}")
        self.step = step


@dataclass
class BuiltPair:
    """Both models of a plugin, in eval mode, with what the engine needs to know about them."""

    hf: nn.Module
    fms: nn.Module
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


@dataclass
class TextInputs:
    """Token inputs of one case: ``input_ids`` [B, T]; ``attention_mask`` [B, T] (1 = real token); ``position_ids``
    [B, T]; ``fms_kwargs``: the ``mask`` / ``position_ids`` FMS's ``pad_input_ids`` makes for the same batch;
    ``valid`` [B, T] bool: the positions whose activations are compared (padding is not)."""

    case: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    fms_kwargs: dict
    valid: torch.Tensor

    def describe(self) -> dict:
        return {"case": self.case, "description": CASES.get(self.case, ""),
                "input_ids": list(self.input_ids.shape), "tokens_per_item": self.valid.sum(1).tolist()}


@contextlib.contextmanager
def _quiet():
    """transformers' and FMS's info logging and prints (a load's unused-key notes are checked here instead)."""
    loggers = [logging.getLogger(n) for n in ("fms", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class PairPlugin:
    """One HF model class and its FMS port (see the module docstring). Subclass or instantiate with data.

    Attributes:
        name: the FMS architecture name the CLI takes (``--architecture``).
        hf_class: the transformers class (``GraniteForCausalLM``); model_type: its config's ``model_type``.
        tiny: keyword arguments of the HF config class for the ``tiny`` variant.
        fms_overrides: FMS config fields set on top of the registry's conversion (why, in ``notes``).
        causal: a causal LM (``parity generate`` applies; cases with left padding).
        exclude: HF state-dict key patterns left out of the derived lineage.
        transforms: row name -> named transform on the FMS tensor (``parity.engine.TRANSFORMS``).
        notes: facts the report states for every run of this pair.
        default_case: the case a run without ``--cases`` compares.
    """

    default_case = "prompt"

    def __init__(self, name: str, hf_class: str, model_type: str, tiny: Mapping[str, Any], *,
                 fms_overrides: Optional[Mapping[str, Any]] = None, causal: bool = True,
                 exclude: Sequence[str] = (), transforms: Optional[Mapping[str, str]] = None,
                 notes: Sequence[str] = (), variants: Optional[Mapping[str, Mapping[str, Any]]] = None):
        self.name = name
        self.hf_class = hf_class
        self.model_type = model_type
        self.tiny = dict(tiny)
        self.fms_overrides = dict(fms_overrides or {})
        self.causal = causal
        self.exclude = tuple(exclude)
        self.transforms = dict(transforms or {})
        self.notes = list(notes)
        self.variants = {"tiny": self.tiny, **dict(variants or {})}

    def __repr__(self) -> str:
        return f"PairPlugin({self.name!r}, {self.hf_class})"

    # -- building ---------------------------------------------------------------------------------------------------

    def hf_config(self, variant: str = "tiny", checkpoint: Union[None, str, Path] = None):
        """The transformers config: from ``checkpoint``'s config.json, or the named variant's keyword arguments."""
        import transformers

        if checkpoint is not None:
            try:
                cfg = transformers.AutoConfig.from_pretrained(str(checkpoint))
            except Exception as err:  # noqa: BLE001
                raise BuildError("HF config", f"{checkpoint}: {error_line(err)}") from None
            if not cfg.architectures or cfg.architectures[0] != self.hf_class:
                raise BuildError("HF config", f"{checkpoint}/config.json names {cfg.architectures}, not "
                                              f"{self.hf_class} (--architecture {self.name})")
            return cfg
        if variant not in self.variants:
            raise BuildError("HF config", f"unknown variant {variant!r} of {self.name}; known: "
                                          f"{', '.join(self.variants)}")
        try:
            cfg = transformers.AutoConfig.for_model(self.model_type, **self.variants[variant])
        except Exception as err:  # noqa: BLE001
            raise BuildError("HF config", error_line(err)) from None
        cfg.architectures = [self.hf_class]
        return cfg

    def build_hf(self, cfg, dtype: torch.dtype, seed: int, checkpoint=None) -> nn.Module:
        import transformers

        from fms_granite_speech.testing import realistic_init_

        try:
            cls = getattr(transformers, self.hf_class)
            with _quiet():
                if checkpoint is not None:
                    model = cls.from_pretrained(str(checkpoint), dtype=torch.float32, use_safetensors=True)
                else:
                    torch.manual_seed(seed)
                    model = cls(cfg)
                    realistic_init_(model, seed)
        except Exception as err:  # noqa: BLE001
            raise BuildError("HF model", error_line(err)) from None
        return model.to(dtype).eval()

    def fms_params(self, cfg, fused_weights: bool = True) -> tuple[str, str, dict]:
        from fms_granite_speech._fms_compat import hf_config_params

        try:
            params = hf_config_params(cfg)
        except Exception as err:  # noqa: BLE001
            raise BuildError("FMS config", f"FMS's HF-config registry on {self.hf_class}: {error_line(err)}") \
                from None
        arch, variant = params.pop("architecture"), params.pop("variant")
        params.update(self.fms_overrides)
        if not fused_weights:
            params["fused_weights"] = False
        return arch, variant, params

    @staticmethod
    def ignored_fields(arch: str, variant: str, params: Mapping[str, Any]) -> list[str]:
        """The keys of ``params`` that the FMS config of ``arch`` has no field for: ``get_model`` drops them
        silently, so a value the HF config sets there never reaches the FMS model (read from the variant's default
        model built on the meta device)."""
        import dataclasses

        from fms.models import get_model

        try:
            with _quiet():
                default = get_model(arch, variant, device_type="meta")
            fields = {f.name for f in dataclasses.fields(default.config)}
        except Exception:  # noqa: BLE001 - no default model to read the fields from: nothing to say
            return []
        return sorted(k for k in params if k not in fields and k not in ("fused_weights", "linear_config", "config"))

    def build_fms(self, arch: str, variant: str, params: dict, dtype: torch.dtype) -> nn.Module:
        from fms.models import get_model

        try:
            with _quiet():
                model = get_model(arch, variant, device_type="cpu", data_type=torch.float32, **params)
        except Exception as err:  # noqa: BLE001
            ignored = self.ignored_fields(arch, variant, params)
            hint = (f" (FMS's HF-config registry passed {', '.join(ignored)}, which FMS's {arch} config has no field "
                    f"for: the {variant} default stays)" if ignored else "")
            raise BuildError("FMS model", f"get_model({arch!r}, {variant!r}, ...): {error_line(err)}{hint}") \
                from None
        return model

    def load_fms(self, fms: nn.Module, hf: nn.Module, arch: str, dtype: torch.dtype, checkpoint=None) -> None:
        """FMS's loader on transformers' checkpoint layout of ``hf`` (what ``save_pretrained`` writes), or on the
        ``checkpoint`` folder itself read by FMS's own ``serialization.load_state_dict`` (safetensors, lazily), then
        a coverage check: every FMS parameter must be filled (FMS leaves unfilled ones as they were)."""
        from fms.utils import serialization

        with torch.no_grad():
            for p in fms.parameters():
                p.fill_(float("nan"))
        try:
            if checkpoint is not None:  # build() checked the folder holds safetensors only
                sd = serialization.load_state_dict(str(checkpoint), source="hf")
            else:
                sd = self.to_checkpoint(hf)({k: v.detach().clone() for k, v in hf.state_dict().items()})
        except Exception as err:  # noqa: BLE001
            step = "checkpoint read" if checkpoint is not None else "checkpoint layout"
            raise BuildError(step, error_line(err)) from None
        unused: list[str] = []

        class _Unused(logging.Handler):  # FMS logs the adapted keys it did not copy; a coverage failure names them
            def emit(self, record):
                text = record.getMessage()
                if "not copied into model" in text:
                    unused.append(text.split(":", 1)[-1].strip())

        handler = _Unused()
        logging.getLogger("fms").addHandler(handler)
        try:
            with _quiet():
                logging.getLogger("fms").setLevel(logging.WARNING)
                serialization.load_state_dict_into_model(fms, sd, arch, "hf")
        except Exception as err:  # noqa: BLE001
            raise BuildError("FMS adapter", f"FMS's {arch!r} 'hf' adapter on transformers' checkpoint: "
                                            f"{error_line(err)}") from None
        finally:
            logging.getLogger("fms").removeHandler(handler)
        post = getattr(fms, "post_init", None)
        if callable(post):
            post()
        missing = [n for n, p in fms.named_parameters() if p.is_floating_point() and bool(torch.isnan(p).any())]
        if missing:
            left = f"; adapted keys FMS did not copy: {unused[0][:200]}" if unused else ""
            raise BuildError("coverage", f"{len(missing)} FMS parameter(s) not filled by the checkpoint: "
                                         f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}{left}")
        fms.to(dtype).eval()

    def build(self, dtype: Union[str, torch.dtype] = torch.float32, seed: int = 0, variant: str = "tiny",
              checkpoint: Union[None, str, Path] = None, fused_weights: bool = True) -> BuiltPair:
        """Both models in ``dtype`` (the HF weights are made in float32, cast, then loaded into FMS from the cast
        copy, so both hold the same values).

        Raises:
            BuildError: naming the step that failed.
        """
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        cfg = self.hf_config(variant, checkpoint)
        if checkpoint is not None:  # safetensors only, checked before either side reads it: nothing is unpickled
            from fms_granite_speech.folder import check_safetensors_folder

            try:
                check_safetensors_folder(Path(checkpoint), for_glob=True)
            except (ValueError, FileNotFoundError) as err:
                raise BuildError("checkpoint read", error_line(err)) from None
        hf = self.build_hf(cfg, dtype, seed, checkpoint)
        arch, fvariant, params = self.fms_params(cfg, fused_weights)
        fms = self.build_fms(arch, fvariant, params, dtype)
        self.load_fms(fms, hf, arch, dtype, checkpoint)
        notes = list(self.notes)
        ignored = self.ignored_fields(arch, fvariant, params)
        if ignored:
            notes.append(f"FMS's HF-config registry passes {', '.join(ignored)}, which FMS's {arch} config has no "
                         f"field for: get_model drops {'it' if len(ignored) == 1 else 'them'} and keeps the "
                         f"{fvariant} default")
        prov = {"architecture": self.name, "hf_class": self.hf_class, "fms_architecture": arch,
                "variant": None if checkpoint else variant, "checkpoint": str(checkpoint) if checkpoint else None,
                "seed": seed, "dtype": str(dtype).replace("torch.", ""), "device": "cpu",
                "fused_weights": fused_weights}
        return BuiltPair(hf=hf, fms=fms, hf_config=cfg, architecture=arch, dtype=dtype, notes=notes,
                         provenance=prov)

    def to_checkpoint(self, hf: nn.Module) -> Callable[[dict], dict]:
        """Turns (part of) HF's runtime state dict into the checkpoint layout FMS's loader reads: transformers' own
        ``revert_weight_conversion`` (what ``save_pretrained`` writes)."""
        from transformers.core_model_loading import revert_weight_conversion

        return lambda sd: revert_weight_conversion(hf, sd)

    # -- inputs and runs --------------------------------------------------------------------------------------------

    def cases(self, cfg) -> list[str]:
        """The cases that apply to this architecture's config."""
        out = ["prompt", "batch_left_padded", "length_1"]
        if getattr(cfg, "sliding_window", None):
            out.append("beyond_window")
        return out

    def inputs(self, case: str, cfg, seed: int = 0) -> TextInputs:
        """The tokens of ``case`` (``CASES``), drawn with ``seed`` from the vocabulary.

        Raises:
            ValueError: an unknown case, or one that does not apply (``beyond_window`` without a sliding window).
        """
        from fms.utils.generation import pad_input_ids

        if case not in CASES:
            raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        vocab = int(cfg.vocab_size)
        gen = torch.Generator().manual_seed(seed + 7)
        if case == "beyond_window":
            window = getattr(cfg, "sliding_window", None)
            if not window:
                raise ValueError(f"case beyond_window needs a sliding window; {self.name} has none")
            lengths = [int(window) + 5]
        else:
            lengths = {"prompt": [12], "batch_left_padded": [12, 7], "length_1": [1]}[case]
        low = 3 if vocab > 8 else 0  # keep clear of the usual special ids
        seqs = [torch.randint(low, vocab, (n,), generator=gen) for n in lengths]
        side = "left" if self.causal else "right"  # an encoder's batch pads on the right, as its tokenizer does
        ids, kw = pad_input_ids(seqs, is_causal_mask=self.causal, padding_side=side,
                                pad_token_id=int(getattr(cfg, "pad_token_id", None) or 0))
        pads = [torch.zeros(ids.shape[1] - n, dtype=torch.bool) for n in lengths]
        real = [torch.ones(n, dtype=torch.bool) for n in lengths]
        valid = torch.stack([torch.cat([p, r] if side == "left" else [r, p]) for p, r in zip(pads, real)])
        pos = kw["position_ids"]
        if len(lengths) == 1:
            kw = {}  # FMS's own causal path, as generate runs an unpadded prompt
        return TextInputs(case=case, input_ids=ids, attention_mask=valid.long(), position_ids=pos,
                          fms_kwargs=kw, valid=valid)

    def run_hf(self, hf: nn.Module, x: TextInputs):
        kw = {"attention_mask": x.attention_mask}
        if self.causal:
            kw["position_ids"] = x.position_ids
            kw["use_cache"] = False
        return hf(input_ids=x.input_ids, **kw)

    def run_fms(self, fms: nn.Module, x: TextInputs):
        return fms(x.input_ids, **x.fms_kwargs)


def _lm(hidden=64, layers=3, heads=4, kv=2, inter=128, vocab=256, **extra) -> dict:
    extra = {"bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 128, **extra}
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, **extra)


ARCHITECTURES: dict[str, PairPlugin] = {}


def register(p: PairPlugin) -> PairPlugin:
    """Add ``p`` to ``ARCHITECTURES`` under its name."""
    ARCHITECTURES[p.name] = p
    return p


register(PairPlugin("granite", "GraniteForCausalLM", "granite",
                    _lm(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                        logits_scaling=8.0, rope_theta=10000.0)))
register(PairPlugin("llama", "LlamaForCausalLM", "llama", _lm()))
register(PairPlugin("gpt_bigcode", "GPTBigCodeForCausalLM", "gpt_bigcode",
                    dict(n_embd=64, n_layer=3, n_head=4, n_inner=256, vocab_size=256, n_positions=128,
                         multi_query=True, bos_token_id=1, eos_token_id=2)))


register(PairPlugin("mistral", "MistralForCausalLM", "mistral", _lm(inter=256, sliding_window=16),
                    notes=["tiny intermediate_size 256: FMS's mistral variant keeps multiple_of=256, which rounds a "
                           "smaller width away from HF's"]))
register(PairPlugin("qwen3", "Qwen3ForCausalLM", "qwen3",
                    _lm(inter=256, head_dim=16, rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"}),
                    notes=["tiny rope_theta 1e6: FMS's qwen3 param builder passes rope_base, a field FMS's Qwen3Config "
                           "does not have, so FMS keeps its default 1e6 whatever the checkpoint says"]))
register(PairPlugin("granite_moe_hybrid", "GraniteMoeHybridForCausalLM", "granitemoehybrid",
                    _lm(shared_intermediate_size=128, num_local_experts=0, layer_types=["full_attention"] * 3,
                        position_embedding_type="rope", embedding_multiplier=12.0, logits_scaling=8.0,
                        residual_multiplier=0.22, attention_multiplier=0.0625, pad_token_id=0),
                    fms_overrides={"pad_id": -1},
                    notes=["FMS's granite_moe_hybrid param builder does not pass pad_token_id: FMS keeps the 8b "
                           "variant's pad_id 100256, beyond a tiny vocabulary; the pair sets pad_id -1 (no padding "
                           "row). FMS's granite_moe_hybrid is Granite 4's dense attention model: no Mamba layers, no "
                           "experts (num_local_experts 0, every layer full_attention, RoPE)"]))
register(PairPlugin("roberta", "RobertaForMaskedLM", "roberta",
                    dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=130, pad_token_id=1), causal=False))
register(PairPlugin("mixtral", "MixtralForCausalLM", "mixtral", _lm(num_local_experts=4, num_experts_per_tok=2)))


register(PairPlugin("granite_swa", "GraniteSWAForCausalLM", "granite_swa",
                    _lm(sliding_window=8, layer_types=["full_attention", "sliding_attention", "full_attention"],
                        pad_token_id=0, embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                        attention_multiplier=0.0625, tie_word_embeddings=False)))
register(PairPlugin("bamba", "BambaForCausalLM", "bamba",
                    _lm(inter=256, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
                        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, pad_token_id=0),
                    fms_overrides={"attn_layer_indices": [1]},
                    notes=["FMS's bamba param builder does not pass attn_layer_indices (FMS keeps the 9.8b variant's "
                           "[9, 18, 27]); the pair sets it from the HF config"]))
register(PairPlugin("bert", "BertForMaskedLM", "bert",
                    dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=128, pad_token_id=0), causal=False))


register(PairPlugin("gpt_oss", "GptOssForCausalLM", "gpt_oss",
                    _lm(inter=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                        max_position_embeddings=4096),
                    notes=["FMS's gpt_oss fixes the expert width to the model width, the sliding window to 128 and "
                           "YaRN's original length to max_expected_seq_len: the tiny config keeps to those"]))
register(PairPlugin("mpnet", "MPNetForMaskedLM", "mpnet",
                    dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=130, pad_token_id=1), causal=False))


class LlavaNextPlugin(PairPlugin):
    """LlavaNextForConditionalGeneration (a SigLIP vision tower, a projector, a Granite decoder) against FMS's
    llava_next: pixels and an image-size list in, the image features merged at the image tokens; FMS's side runs
    ``prepare_inputs_for_generation`` (the merge) then the forward, as FMS's generate does on its first step."""

    # transformers 5.17's SiglipVisionModel saves its tensors as vision_tower.* where checkpoints written by
    # transformers 4.x (those on the hub) have vision_tower.vision_model.*, which is what FMS's adapter reads
    HUB_LAYOUT = ((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)

    def to_checkpoint(self, hf):
        import re

        from transformers.core_model_loading import revert_weight_conversion

        def convert(sd):
            out = {}
            for k, v in revert_weight_conversion(hf, sd).items():
                for pat, rep in self.HUB_LAYOUT:
                    k = re.sub(pat, rep, k)
                out[k] = v
            return out
        return convert

    def build_fms(self, arch, variant, params, dtype):
        from fms_granite_speech._fms_compat import model_instance

        try:
            with _quiet():
                return model_instance(arch, variant, params)
        except Exception as err:  # noqa: BLE001
            raise BuildError("FMS model", f"{arch} {variant}: {error_line(err)}") from None

    default_case = "image_prompt"

    def cases(self, cfg):
        return ["image_prompt", "prompt"]

    def inputs(self, case, cfg, seed=0):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if case not in ("image_prompt", "prompt"):
            raise ValueError(f"case {case!r} does not apply to {self.name} (its cases: image_prompt, prompt)")
        gen = torch.Generator().manual_seed(seed + 7)
        vc, itok = cfg.vision_config, cfg.image_token_index
        vocab = cfg.text_config.vocab_size

        def words(n):
            ids = torch.randint(3, vocab - 1, (1, n), generator=gen)
            return torch.where(ids == itok, ids - 1, ids)
        if case == "prompt":
            ids = words(12)
            extra = {}
        else:
            height, width = vc.image_size, 2 * vc.image_size
            sizes = torch.tensor([[height, width]])
            patches = image_size_to_num_patches((height, width), cfg.image_grid_pinpoints, vc.image_size)
            pixels = torch.randn(1, patches, vc.num_channels, vc.image_size, vc.image_size, generator=gen)
            n_img = self._image_tokens(cfg, height, width)
            ids = torch.cat([words(3), torch.full((1, n_img), itok), words(5)], dim=1)
            extra = {"pixel_values": pixels, "image_sizes": sizes}
        valid = torch.ones(ids.shape, dtype=torch.bool)
        x = TextInputs(case=case, input_ids=ids, attention_mask=valid.long(),
                       position_ids=torch.arange(ids.shape[1])[None], fms_kwargs={}, valid=valid)
        x.extra = extra  # type: ignore[attr-defined]
        return x

    @staticmethod
    def _image_tokens(cfg, height, width) -> int:
        """Image tokens transformers' LlavaNext gives an image of ``height`` x ``width``: the base tile's patches,
        then the unpadded anyres grid with one newline token per row."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        rows, cols = get_anyres_image_grid_shape((height, width), cfg.image_grid_pinpoints, vc.image_size)
        grid = torch.zeros(1, rows * side, cols * side)
        unpadded = unpad_image(grid, (height, width))
        base = side * side
        return base + unpadded.shape[1] * (unpadded.shape[2] + 1)

    def run_hf(self, hf, x):
        return hf(input_ids=x.input_ids, use_cache=False, **getattr(x, "extra", {}))

    def run_fms(self, fms, x):
        embeds, _ = fms.prepare_inputs_for_generation(0, x.input_ids, dict(getattr(x, "extra", {})))
        return fms(embeds)


register(LlavaNextPlugin(
    "llava_next", "LlavaNextForConditionalGeneration", "llava_next",
    dict(text_config=_lm(layers=2, model_type="granite", embedding_multiplier=12.0, logits_scaling=8.0,
                         residual_multiplier=0.22, attention_multiplier=0.0625, tie_word_embeddings=True),
         vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, image_size=24, patch_size=8),
         image_token_index=255, image_grid_pinpoints=[[24, 24], [24, 48], [48, 24], [48, 48]],
         vision_feature_layer=[-2, -1], vision_feature_select_strategy="full", projector_hidden_act="gelu",
         multimodal_projector_bias=True, tie_word_embeddings=True),
    transforms={"model": "logits_scaling", "language_model": "logits_scaling"},
    notes=["FMS's side is fed the hub checkpoint layout (vision_tower.vision_model.*): transformers 5.17 saves "
           "SiglipVisionModel without vision_model., which FMS 1.13.1's llava_next adapter does not read",
           "tiny vision tower of 3 x 3 patches: FMS's SDPA reads the k/v layout from key.shape[1] != kvheads "
           "(fms/modules/attention.py), so a sequence as long as the number of kv heads is mis-read"]))


class GraniteSpeechPlugin(PairPlugin):
    """The project's own pair, HF ``GraniteSpeechForConditionalGeneration`` against the FMS ``granite_speech``
    model, through the derived map: built by ``parity.pair.build_pair`` (the LoRA adapter attached on HF's side,
    merged on FMS's), both fed HF's pipeline output for the shipped clip (``parity diff`` without
    ``--architecture`` also compares the two pipelines). Hints: the LoRA tensors stay out of the lineage (FMS's
    adapter merges them arithmetically into q/v), the model outputs differ by ``logits_scaling``, and the
    project's adapter reads transformers' runtime names, so no checkpoint layout change."""

    default_case = "speech"

    def build(self, dtype=torch.float32, seed=0, variant="tiny", checkpoint=None, fused_weights=True):
        from parity.pair import build_pair

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        try:
            pair = build_pair(variant=None if checkpoint else variant, checkpoint=checkpoint, seed=seed, dtype=dtype,
                              fused_weights=fused_weights)
        except (ValueError, FileNotFoundError) as err:
            raise BuildError("pair", error_line(err)) from None
        prov = {"architecture": self.name, "hf_class": self.hf_class, "fms_architecture": "granite_speech",
                "variant": None if checkpoint else variant, "checkpoint": str(checkpoint) if checkpoint else None,
                "seed": seed, "dtype": dtype, "device": "cpu", "fused_weights": fused_weights}
        # the pipelines (build_inputs) read the pair's tokenizer and config, the same whatever the dtype or seed
        self._pair = pair
        return BuiltPair(hf=pair.hf, fms=pair.fms, hf_config=pair.hf.config, architecture="granite_speech",
                         dtype=getattr(torch, dtype), notes=list(self.notes), provenance=prov)

    def to_checkpoint(self, hf):
        return lambda sd: sd

    def cases(self, cfg):
        return ["speech"]

    def inputs(self, case, cfg, seed=0):
        if case != "speech":
            raise ValueError(f"case {case!r} does not apply to {self.name} (its case: speech; `parity diff` without "
                             "--architecture runs the Granite Speech cases)")
        if getattr(self, "_pair", None) is None:
            raise ValueError(f"{self.name}'s inputs come from a built pair's pipelines: build() it first")
        from parity.inputs import build_inputs

        x = build_inputs(self._pair, same_inputs=True)
        valid = torch.ones(x.input_ids.shape, dtype=torch.bool)
        out = TextInputs(case="speech", input_ids=x.input_ids, attention_mask=valid.long(),
                         position_ids=torch.arange(x.input_ids.shape[1])[None], fms_kwargs={}, valid=valid)
        out.extra = {"input_features": x.input_features, "input_features_mask": x.input_features_mask}
        return out

    def run_hf(self, hf, x):
        feats = x.extra["input_features"].to(next(hf.parameters()).dtype)
        return hf(input_ids=x.input_ids, input_features=feats, input_features_mask=x.extra["input_features_mask"],
                  use_cache=False)

    def run_fms(self, fms, x):
        feats = x.extra["input_features"].to(next(fms.parameters()).dtype)
        return fms(x.input_ids, input_features=feats, input_features_mask=x.extra["input_features_mask"])


register(GraniteSpeechPlugin(
    "granite_speech", "GraniteSpeechForConditionalGeneration", "granite_speech", {},
    exclude=(r"lora_",), transforms={"model": "logits_scaling"},
    notes=["both models are fed HF's pipeline output (the pipelines are compared by `parity diff` without "
           "--architecture)", "LoRA tensors are left out of the derived lineage: FMS's adapter merges them into q/v"]))


class GraniteSpeech5Plugin(PairPlugin):
    """``GraniteSpeech5ForCTC`` (granite-speech-5.0-470m-turboctc) against the project's FMS ``granite_speech5``:
    each side on its own pipeline (transformers' ``GraniteSpeech5FeatureExtractor``, the project's
    ``speech5.GraniteSpeech5FeatureExtractor``), compared as the first rows; the model output is the per-frame CTC
    logits."""

    default_case = "speech"
    CLIPS = {"speech": ("fox",), "speech_batch": ("fox", "ships")}

    def build(self, dtype=torch.float32, seed=0, variant="tiny", checkpoint=None, fused_weights=True):
        """As ``PairPlugin.build``; with random weights the CTC head's blank bias is then raised (on both sides alike)
        until the blank wins about half the frames of the shipped clip, as in a trained CTC model, so greedy
        decoding's blank and collapse rules are exercised (a random head almost never emits the blank)."""
        built = super().build(dtype, seed=seed, variant=variant, checkpoint=checkpoint, fused_weights=fused_weights)
        if checkpoint is None:
            self._blank_half(built)
        return built

    def _blank_half(self, built) -> None:
        blank = int(built.hf.config.pad_token_id or 0)
        x = self.inputs("speech", built.hf_config)
        with torch.no_grad():
            logits = self.run_hf(built.hf, x).logits[0].float()
            others = logits.clone()
            others[:, blank] = -float("inf")
            shift = float((others.max(-1).values - logits[:, blank]).median())
            for model, out in ((built.hf, built.hf.encoder.out), (built.fms, built.fms.encoder.out)):
                out.bias[blank] += shift
        built.notes.append(f"random weights: the CTC blank's bias raised by {shift:.3g} on both sides so the blank "
                           "wins about half the frames (greedy decoding's blank and collapse rules are exercised)")

    def cases(self, cfg):
        return list(self.CLIPS)

    def inputs(self, case, cfg, seed=0):
        import transformers

        from fms_granite_speech.features import load_wav, shipped_audio
        from fms_granite_speech.speech5 import GraniteSpeech5FeatureExtractor

        if case not in self.CLIPS:
            raise ValueError(f"case {case!r} does not apply to {self.name} (its cases: {', '.join(self.CLIPS)})")
        waves = [load_wav(shipped_audio(n))[0][0] for n in self.CLIPS[case]]
        with _quiet():
            hf_x = transformers.GraniteSpeech5FeatureExtractor(num_mel_bins=cfg.encoder_config.num_mel_bins)(
                [w.numpy() for w in waves], sampling_rate=16000, return_tensors="pt")
        fms_x = GraniteSpeech5FeatureExtractor(num_mel_bins=cfg.encoder_config.num_mel_bins)(waves)
        frames = self._frames(fms_x["attention_mask"].sum(1), cfg)
        out_t = self._frames(torch.tensor([fms_x["input_features"].shape[1]]), cfg)[0]
        valid = torch.arange(int(out_t))[None, :] < frames[:, None]
        x = TextInputs(case=case, input_ids=torch.zeros(valid.shape, dtype=torch.long), attention_mask=valid.long(),
                       position_ids=torch.zeros(valid.shape, dtype=torch.long), fms_kwargs={}, valid=valid)
        x.extra = {"hf": dict(hf_x), "fms": fms_x}
        x.pipelines = {"features.input_features": (hf_x["input_features"], fms_x["input_features"]),
                       "features.attention_mask": (hf_x["attention_mask"], fms_x["attention_mask"])}
        return x

    @staticmethod
    def _frames(frames, cfg):
        for _ in cfg.encoder_config.subsample_layers:
            frames = frames // 2
        return frames

    def run_hf(self, hf, x):
        e = x.extra["hf"]
        return hf(input_features=e["input_features"].to(next(hf.parameters()).dtype),
                  attention_mask=e["attention_mask"])

    def run_fms(self, fms, x):
        e = x.extra["fms"]
        return fms(e["input_features"].to(next(fms.parameters()).dtype), attention_mask=e["attention_mask"])


def _speech5(variant: str) -> dict:
    from fms_granite_speech.speech5 import VARIANTS

    c = VARIANTS[variant].to_hf().to_dict()
    return {k: v for k, v in c.items() if k in ("vocab_size", "pad_token_id", "tie_word_embeddings",
                                                "encoder_config")}


register(GraniteSpeech5Plugin("granite_speech5", "GraniteSpeech5ForCTC", "granite_speech5_ctc", _speech5("tiny"),
                              variants={"5.0-470m": _speech5("5.0-470m")},
                              notes=["each side on its own input pipeline: the features are the first rows"]))


def plugin(name: str) -> PairPlugin:
    """The registered plugin ``name``.

    Raises:
        ValueError: an unknown architecture (the message lists the registered ones and the closest name).
    """
    if name not in ARCHITECTURES:
        import difflib

        close = difflib.get_close_matches(name, list(ARCHITECTURES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}{hint} (registered: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]
