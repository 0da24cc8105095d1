"""Saved activations: every compared tensor of both sides, and the recorded calls of the replayed modules, on disk.

``parity diff --save-activations DIR`` keeps, for each compared row (filtered by ``--save-layers`` prefixes): HF's
output, FMS's output (as the FMS module returned it; the row's transform is applied again when rechecking), and the
tensors of the HF module's recorded call (what the FMS module was replayed on). They are written as one safetensors
file with a JSON index (``activations.json``: per tensor its row, side, call, shape and dtype; per row its transform
and the bound it was judged by), published in one rename (``parity._atomic.staged``). A cap (``--save-max-mib``)
bounds the folder: tensors past it are not kept, and the index and the CLI say which rows were cut.

``recheck_activations(DIR, overrides)`` recomputes every saved row from the tensors (the same ``compare_tensors``
the run used, so rel-L2, max abs and cosine come out exactly as the run measured them) and judges them against the
run's bounds with ``overrides`` applied: ``parity recheck DIR --max-rel-l2 1e-6``. No model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["INDEX", "TENSORS", "ActivationStore", "is_activation_folder", "recheck_activations"]

INDEX, TENSORS = "activations.json", "activations.safetensors"
SCHEMA = 1


class ActivationStore:
    """What a run keeps for ``--save-activations``: tensors by key, and the index.

    Args:
        layers: parity names or prefixes to keep (None: every row).
        max_bytes: the cap; a tensor that would pass it is not kept (``cut`` lists its row).
    """

    def __init__(self, layers: Optional[Sequence[str]] = None, max_bytes: int = 512 * 2**20):
        self.layers = list(layers) if layers else None
        self.max_bytes = int(max_bytes)
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: list[dict] = []
        self.rows: dict[str, dict] = {}
        self.bytes = 0
        self.cut: list[str] = []

    def wants(self, name: str) -> bool:
        return self.layers is None or any(name == n or name.startswith(n + ".") for n in self.layers)

    def add(self, name: str, side: str, call: int, tensor: torch.Tensor, arg: Optional[str] = None) -> None:
        """Keep ``tensor`` (a host copy) as ``side`` (``hf``, ``fms`` or ``call``) of call ``call`` of row ``name``."""
        if not self.wants(name) or not isinstance(tensor, torch.Tensor):
            return
        size = tensor.numel() * tensor.element_size()
        if self.bytes + size > self.max_bytes:
            if name not in self.cut:
                self.cut.append(name)
            return
        key = f"{side}/{name}/{call}" + (f"/{arg}" if arg else "")
        self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        self.bytes += size
        self.entries.append({"key": key, "layer": name, "side": side, "call": call, "arg": arg,
                             "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")})

    def add_row(self, name: str, transform: Optional[str], tolerance: dict) -> None:
        """The row's transform and the bound its propagated error was judged by."""
        if self.wants(name):
            self.rows[name] = {"transform": transform, "tolerance": tolerance}

    def save(self, folder: Union[str, Path], logits_scaling: float, command: Optional[str] = None) -> Path:
        """Write the folder (one rename publishes it; a failure leaves an earlier one as it was)."""
        from safetensors.torch import save_file

        from parity._atomic import staged

        doc = {"schema_version": SCHEMA, "logits_scaling": logits_scaling, "command": command,
               "max_bytes": self.max_bytes, "bytes": self.bytes, "cut": self.cut, "rows": self.rows,
               "tensors": self.entries}
        with staged(folder, (INDEX, TENSORS)) as stage:
            save_file(self.tensors, str(stage / TENSORS))
            (stage / INDEX).write_text(json.dumps(doc, indent=1) + "\n")
        return Path(folder)


def is_activation_folder(path: Union[str, Path]) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def recheck_activations(folder: Union[str, Path], overrides: Optional[dict] = None,
                        layers: Optional[Sequence[str]] = None) -> list:
    """Every saved row recomputed from its tensors: ``[(name, TensorDiff or None, note)]`` in saved order.

    Raises:
        ValueError: not an activations folder (the message names what is missing), or an unreadable file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from parity.compare import apply_transform, worst_diff
    from parity.metrics import Tolerance, compare_tensors

    folder = Path(folder)
    try:
        doc = json.loads((folder / INDEX).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise ValueError(f"{folder} is not a readable activations folder ({err}); write one with parity diff "
                         "--save-activations") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA:
        raise ValueError(f"{folder / INDEX} is not an activations index of schema {SCHEMA}")

    class _Config:  # what apply_transform reads
        class decoder:
            logits_scaling = doc.get("logits_scaling", 1.0)

    out = []
    for name, row in doc["rows"].items():
        if layers and not any(name == n or name.startswith(n + ".") for n in layers):
            continue
        tol = Tolerance(**{**row["tolerance"], **(overrides or {})})
        calls = sorted({e["call"] for e in doc["tensors"] if e["layer"] == name and e["side"] == "hf"})
        diffs, note = [], None
        for k in calls:
            ref, test = tensors.get(f"hf/{name}/{k}"), tensors.get(f"fms/{name}/{k}")
            if ref is None or test is None:
                note = "a side was not saved (cut by the size cap)"
                continue
            diffs.append(compare_tensors(apply_transform(row["transform"], test, _Config), ref, tol))
        if not diffs:
            note = "not saved (cut by the size cap)" if name in doc.get("cut", []) else "no tensors saved"
        out.append((name, worst_diff(diffs) if diffs else None, note))
    return out
