"""The two models under comparison, holding the same weights, built together or one at a time.

``build_pair()`` describes the HF reference (``transformers.GraniteSpeechForConditionalGeneration``) and the FMS model
(``fms_granite_speech.model.GraniteSpeech``) with one set of weights:

* default (no checkpoint): the HF model with seeded, realistic random weights (``testing.build_hf_model``, a
  non-zero LoRA adapter included), converted into the FMS model by the adapter registered with FMS: the real loading
  code (``fms.utils.serialization.load_state_dict_into_model(..., "granite_speech", "hf")`` from HF's state dict when
  both models are held together, ``checkpoint.load_checkpoint`` of the HF folder ``save_pretrained`` wrote when they
  are built one at a time);
* ``checkpoint=DIR``: HF loads the folder with ``from_pretrained`` (and its peft adapter when the folder has one),
  FMS with ``fms_granite_speech.checkpoint.load_checkpoint(DIR)``; the folder is checked first
  (``folder.check_checkpoint_folder``: safetensors only, one weight set), so neither side reads a pickle or a stale
  shard.

Both are built in the dtype asked (never a float32 copy first), in ``eval()``, on the same device.

Memory (``memory=``): ``"together"`` builds both models at once; ``"sequential"`` builds one at a time (``get`` /
``release``): the engine runs HF, keeps what the comparison needs, frees HF, then builds FMS, so a run needs one
model's memory; ``"auto"`` (the CLI's default) picks ``sequential`` when two weight sets would take more than a
third of the memory available (``/proc/meminfo`` MemAvailable, or the free CUDA memory).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from fms_granite_speech.config import GraniteSpeechConfig, get_config
from parity.inputs import DEFAULT_PROMPT, ParityInputs, build_inputs

__all__ = ["DEFAULT_PROMPT", "DTYPES", "MEMORY_MODES", "ModelPair", "ParityInputs", "available_memory", "build_inputs",
           "build_pair", "parse_dtype", "weight_bytes"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
MEMORY_MODES = ("auto", "together", "sequential")


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` or a name (``"float32"``, ``"bf16"``...) -> a floating ``torch.dtype``.

    Raises:
        ValueError: an unknown name or a non-floating dtype (the message lists the accepted names).
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _parse_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"bad device {device!r}: {err}; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported by the parity engine; use 'cpu' or 'cuda'")
    return dev


def weight_bytes(config: GraniteSpeechConfig, dtype: torch.dtype) -> int:
    """Bytes of one model's weights in ``dtype`` (FMS model built on the meta device; tied weights counted once)."""
    from fms_granite_speech.model import GraniteSpeech

    with torch.device("meta"):
        model = GraniteSpeech(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes available for new tensors on ``device`` (CPU: MemAvailable of /proc/meminfo; CUDA: free memory), or
    None when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class ModelPair:
    """The HF reference and the FMS model, same weights, same dtype and device, both in eval mode.

    ``hf`` / ``fms`` hold the built models (None while not built: ``get(side)`` builds, ``release(side)`` frees);
    in ``sequential`` memory mode the engine never holds both at once.

    Attributes:
        hf: ``GraniteSpeechForConditionalGeneration`` (with a peft LoRA adapter when the config has one), or None.
        fms: ``fms_granite_speech.model.GraniteSpeech``, or None.
        config: the ``GraniteSpeechConfig`` both are built for.
        dtype, device: of both models.
        variant: the named variant (None for a checkpoint), checkpoint: the folder (None for random weights).
        seed: the weight seed of a random-weight pair (None for a checkpoint).
        tokenizer: the tokenizer the inputs are built with (the checkpoint's, else ``build_test_tokenizer``).
        memory: ``"together"`` or ``"sequential"``.
        distributed: ``"tp"``: the FMS model is sharded by FMS tensor parallelism over the process group (each rank
            holds the whole HF reference, single-process); None: one process.
        fused_weights: the FMS decoder's layout: True (FMS's default) fuses q/k/v and gate/up; False builds it as
            ``get_model(..., fused_weights=False)`` does (separate q/k/v and gate/up, the LoRA adapter merged there).
    """

    hf: Optional[nn.Module]
    fms: Optional[nn.Module]
    config: GraniteSpeechConfig
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    variant: Optional[str] = None
    checkpoint: Optional[str] = None
    seed: Optional[int] = None
    tokenizer: Any = None
    memory: str = "together"
    distributed: Optional[str] = None
    fused_weights: bool = True
    _folder: Any = field(default=None, repr=False)  # a temporary HF folder of random weights (sequential mode)
    _extractors: Any = field(default=None, repr=False)  # each side's feature extractor (parity.inputs)

    def provenance(self) -> dict:
        """JSON-safe description of where the weights came from and how both models run."""
        return {
            "variant": self.variant,
            "checkpoint": self.checkpoint,
            "weights": "checkpoint" if self.checkpoint else f"seeded random (testing.build_hf_model, seed {self.seed})",
            "conversion": "fms_granite_speech.checkpoint.load_checkpoint"
            if self.checkpoint or self.memory == "sequential"
            else 'fms load_state_dict_into_model(..., "granite_speech", "hf")',
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "memory": self.memory,
            "fms_weights": "fused" if self.fused_weights else "unfused (fused_weights=False)",
            "distributed": None if self.distributed is None else {"strategy": self.distributed,
                                                                   "world_size": _world_size()},
            "lora": None if self.config.lora is None else {
                "rank": self.config.lora.rank, "alpha": self.config.lora.alpha,
                "targets": list(self.config.lora.target_modules)},
        }

    def get_tokenizer(self):
        """The tokenizer for this pair (built on first use)."""
        if self.tokenizer is None:
            from fms_granite_speech.tokenizer_utils import build_test_tokenizer

            self.tokenizer = build_test_tokenizer(self.config.decoder.src_vocab_size, self.config.audio_token_index)
        return self.tokenizer

    # -- building one side ---------------------------------------------------------------------------------------

    def get(self, side: str) -> nn.Module:
        """The model of ``side`` (``"hf"`` or ``"fms"``), built when not held."""
        if side == "hf":
            if self.hf is None:
                self.hf = self._build_hf()
            return self.hf
        if self.fms is None:
            self.fms = self._build_fms()
        return self.fms

    def close(self) -> None:
        """Remove the temporary weights folder of one model at a time now (whole: a signal waits until it is gone);
        otherwise it goes when the pair is collected or the process exits. The pair cannot build FMS from it again."""
        if self._folder is not None:
            from parity._shell import signals_deferred

            with signals_deferred():
                self._folder.cleanup()
            self._folder = None

    def release(self, side: str) -> None:
        """Free the model of ``side`` (it is built again by ``get``)."""
        if side == "hf":
            self.hf = None
        else:
            self.fms = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _return_freed_heap()

    def _build_hf(self) -> nn.Module:
        if self.checkpoint is not None:
            return _hf_from_checkpoint(Path(self.checkpoint), self.dtype, self.device)
        from transformers.utils import logging as hf_logging

        from fms_granite_speech.testing import build_hf_model, write_hf_checkpoint

        hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break the one-line stderr contract
        hf = build_hf_model(self.config, seed=self.seed, dtype=self.dtype, device=self.device)
        if self.memory == "sequential" and self._folder is None:
            from parity._shell import block_signals, restore_signals

            # FMS is built after HF is freed: from the HF folder save_pretrained writes, through the real loader;
            # a signal waits until the folder is owned by the handler below (no window leaves it behind)
            held = block_signals()
            try:
                self._folder = tempfile.TemporaryDirectory(prefix="parity-weights-")
            except BaseException:
                restore_signals(held)
                raise
            # 1 GB shards: safetensors' save_file builds each shard as bytes in memory before writing it, so one
            # 50 GB-default shard would double the model's memory for the length of the save
            try:
                restore_signals(held)
                write_hf_checkpoint(hf, self._folder.name, max_shard_size="1GB")
            except BaseException as err:  # a full disk, an interrupt: no gigabytes of weights left in TMPDIR
                self.close()
                if isinstance(err, OSError):
                    raise ValueError(f"cannot write the temporary weights of --memory sequential to "
                                     f"{tempfile.gettempdir()}: {err.strerror or err}; free space there or set "
                                     "TMPDIR to a larger disk") from None
                raise
        return hf

    def weights_folder(self) -> Optional[str]:
        """The HF checkpoint folder the models were built from: the user's ``checkpoint``, else the temporary folder
        of random weights written for one model at a time; None when the weights exist only in memory."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        return None if self._folder is None else self._folder.name

    def _build_fms(self) -> nn.Module:
        from fms_granite_speech.checkpoint import load_checkpoint

        if self.distributed != "tp":
            folder = self.weights_folder() if self.checkpoint is not None or self.hf is None else None
            if folder is not None:
                return load_checkpoint(folder, dtype=self.dtype, device=self.device,
                                       fused_weights=self.fused_weights).eval()
        from fms_granite_speech.testing import fms_from_hf

        # tensor parallelism: each rank converts HF's whole state dict and FMS's loader cuts its shard
        # (load_state_dict_into_model(..., distributed_strategy="tp", rank=rank))
        rank = None
        if self.distributed == "tp":
            import torch.distributed as dist

            rank = dist.get_rank()
        config = self.config if self.fused_weights else self.config.replace(fused_weights=False)
        return fms_from_hf(self.get("hf"), config, tp_rank=rank).to(device=self.device)


def _return_freed_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim(0)``; nothing elsewhere). Weight tensors below
    glibc's mmap threshold live on the heap, and a freed model's pages otherwise stay in the process: one model at a
    time would then peak at two models' resident memory."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_pair(
    variant: str = "tiny",
    checkpoint: Union[None, str, Path] = None,
    seed: int = 0,
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Union[str, torch.device] = "cpu",
    memory: str = "together",
    config: Optional[GraniteSpeechConfig] = None,
    distributed: Optional[str] = None,
    fused_weights: bool = True,
) -> ModelPair:
    """The HF reference and the FMS model with the same weights.

    Args:
        variant: named config (``tiny``, ``3.3-2b``, ``3.3-8b``) for random weights; ignored with ``checkpoint``.
        checkpoint: an HF-format Granite Speech folder (``config.json`` + safetensors, optional peft adapter).
        seed: weight seed for random weights.
        dtype: both models' dtype (built directly in it; both sides hold the same values).
        device: ``cpu`` or ``cuda``.
        memory: ``together`` (both models built now), ``sequential`` (built one at a time by the engine) or
            ``auto`` (sequential when two weight sets would take more than a third of the memory available).
        config: random weights for this config instead of the variant's (``variant`` names it in reports).
        distributed: ``"tp"`` shards the FMS model with FMS tensor parallelism over the default process group (started
            here from torchrun's environment when not yet: gloo on CPU, NCCL on CUDA); HF stays whole on every rank.
        fused_weights: False builds the FMS decoder unfused, as ``get_model(..., fused_weights=False)`` does (the
            path ``parity diff --unfused`` compares).

    Raises:
        ValueError: unknown variant, dtype or memory mode, CUDA requested without CUDA, a folder that is not an HF
            Granite Speech checkpoint (the message names the file and the fix).
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    dtype = parse_dtype(dtype)
    dev = _parse_device(device)
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}; use one of {', '.join(MEMORY_MODES)}")
    if not isinstance(fused_weights, bool):
        raise TypeError(f"fused_weights must be True or False, got {fused_weights!r}")
    if distributed not in (None, "tp"):
        raise ValueError(f"distributed={distributed!r}; use 'tp' (FMS tensor parallelism) or None")
    if distributed == "tp":
        dev = _init_distributed(dev)
        memory = "together"  # each rank holds HF whole and its FMS shard
    tokenizer = None
    if checkpoint is not None:
        from fms_granite_speech.checkpoint import read_config
        from fms_granite_speech.folder import check_checkpoint_folder
        from fms_granite_speech.lora import read_lora_config

        from fms_granite_speech.checkpoint import check_checkpoint

        path = check_checkpoint_folder(checkpoint)
        config = read_config(path, None, read_lora_config(path))
        # the folder against its config, from the safetensors headers, before either side is built: a wrong shape
        # is named by the project's strict loader, not by transformers' ignore_mismatched_sizes table
        check_checkpoint(path, fused_weights=fused_weights)
        tokenizer = _tokenizer(path)
        variant, seed = None, None
    else:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        named = get_config(variant)
        config = named if config is None else config
    if distributed == "tp":
        from fms_granite_speech.registration import check_tensor_parallel

        check_tensor_parallel(config.decoder.nheads, config.decoder.kvheads)
    if memory == "auto":
        need = 2 * weight_bytes(config, dtype)
        free = available_memory(dev)
        # together only with room to spare: the float64 reference, the stored captures, the activations, other
        # test workers and the rest of the machine need the other two thirds (3.3-2b bf16, 12.1 GB of weights for
        # two, on a 24 GB machine: together peaked at 13.8 GiB and took 8:09, about 200 s of it converting HF's
        # state dict in memory; one at a time peaked at 7.8 GiB and builds FMS from the saved folder in 32 s)
        memory = "sequential" if free is not None and need > free / 3 else "together"
    if memory == "sequential" and checkpoint is None:  # the HF weights go through a temporary folder: room for them?
        need = weight_bytes(config, dtype)
        room = shutil.disk_usage(tempfile.gettempdir()).free
        if room < 1.1 * need:
            raise ValueError(f"--memory sequential writes the HF weights ({need / 2**30:.2f} GiB) to "
                             f"{tempfile.gettempdir()}, which has {room / 2**30:.2f} GiB free; set TMPDIR to a disk "
                             "with room, or use --memory together")
    pair = ModelPair(hf=None, fms=None, config=config, dtype=dtype, device=dev, variant=variant,
                     checkpoint=None if checkpoint is None else str(checkpoint), seed=seed, tokenizer=tokenizer,
                     memory=memory, distributed=distributed, fused_weights=fused_weights)
    if memory == "together":
        pair.get("hf")
        pair.get("fms")
    return pair


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _init_distributed(device: torch.device) -> torch.device:
    """The default process group (started from torchrun's environment if needed) and this rank's device.

    Raises:
        ValueError: not started by torchrun (no ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment).
    """
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"distributed='tp' needs a process group: run under torchrun --nproc-per-node N "
                             f"(missing {', '.join(missing)} in the environment)")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
    return device


def _tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load the tokenizer of {path}: {str(err).splitlines()[0]}") from None


def _hf_from_checkpoint(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging

    from fms_granite_speech.folder import read_config_json, read_json

    hf_logging.disable_progress_bar()  # from_pretrained's per-file bars would bury the parity output
    try:
        # transformers' own config class built from the config.json the folder checks read (one read of the file),
        # as from_pretrained builds it
        raw = read_config_json(path)
        config = transformers.AutoConfig.for_model(**raw)
        hf_class = getattr(transformers, config.architectures[0])
        hf = hf_class.from_pretrained(str(path), config=config, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError) as err:
        raise ValueError(f"transformers cannot load {path}: {str(err).splitlines()[0]}") from None
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not getattr(hf, "_hf_peft_config_loaded", False):
        from peft import PeftConfig

        # peft's config object from the adapter_config.json read_lora_config read; the weights from the folder
        hf.load_adapter(str(path), peft_config=PeftConfig.from_peft_type(**read_json(adapter)))
    return hf.to(device=device).eval()

