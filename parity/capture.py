"""Forward-hook capture of submodule activations, the "runner" half of the parity engine.

``Capture`` is model-agnostic: it takes a module and dotted submodule paths (``model.get_submodule`` names) and
records what those submodules produce during a forward pass, either storing copies or handing each activation to
a callback as it appears (so a full-size model can be compared without holding every activation in memory).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["Capture", "UnknownModulePathError", "first_tensor"]

Callback = Callable[[str, torch.Tensor], None]


class UnknownModulePathError(KeyError, ValueError):
    """A requested module path does not exist in the model. Both a ``KeyError`` (a failed name lookup) and a
    ``ValueError`` (bad argument); the message lists the closest valid module names."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and escaped newlines included
        return str(self.args[0]) if self.args else ""


def first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The tensor a capture records for a module's output (or input) ``value``.

    * a ``torch.Tensor``: itself;
    * a tuple or list: its first element that is a tensor (e.g. ``(hidden, cache)`` -> ``hidden``; an FMS
      attention returning ``(out, None)`` -> ``out``);
    * a ``Mapping``, which includes transformers' ``ModelOutput``: its first value that is a tensor, in key order
      (for ``ModelOutput`` the first field that is set, usually ``last_hidden_state`` or ``logits``).

    Only the top level is searched. Returns None when there is no tensor.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        return None
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    return None


def _first_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    for item in args:
        if isinstance(item, torch.Tensor):
            return item
    for item in kwargs.values():
        if isinstance(item, torch.Tensor):
            return item
    return None


class Capture:
    """Context manager that records the outputs (and optionally inputs) of chosen submodules during forwards.

    Example::

        with Capture(model, ["encoder.layers.0", "projector"]) as cap:
            model(x)
        cap.outputs["encoder.layers.0"][0]   # [B, T, H] tensor, as produced by that block's first call

    Args:
        model: the ``nn.Module`` to hook.
        paths: dotted submodule names as accepted by ``model.get_submodule`` (``""`` is the model itself).
        store: keep a copy of every captured tensor in ``outputs`` / ``inputs``. With ``store=False`` nothing
            is kept and only the callbacks see the tensors.
        on_output: ``on_output(path, tensor)``, called right after the module at ``path`` returns, with the
            detached output tensor (see :func:`first_tensor` for which tensor of a tuple/ModelOutput). It is NOT a
            copy: the caller may read it during the call (e.g. compute statistics) but must clone it to keep it,
            since the model may edit it in place afterwards.
        inputs: also record each module's first input tensor: the first positional argument that is a tensor,
            else the first keyword argument that is one. It is taken in a forward PRE-hook, before the module
            runs, so a module that edits its input in place does not change what is recorded. Used to feed a
            module the other model's input ("introduced error" analysis).
        on_input: like ``on_output``, for inputs; requires ``inputs=True``.

    Recorded data (reset on each ``__enter__``):
        outputs: ``dict[path, list[Tensor]]``, one entry per call of that module, in call order. A module run
            several times in one forward (shared weights, a loop, or several forwards inside the ``with``) gets
            several entries. Stored tensors are ``detach().clone()`` copies, so later in-place edits by the model
            (e.g. a residual added into a block's output) do not change them.
        inputs: same layout for inputs (empty unless ``inputs=True``).
        calls: ``dict[path, int]``, number of calls seen, also counted when ``store=False``.
        order: ``list[(path, call_index)]`` in the order outputs were produced.

    Hooks are registered on ``__enter__`` and removed on ``__exit__``, also when the block raises.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``paths`` is a bare string or holds a non-string, or
            ``on_input`` is given without ``inputs=True``; at forward time, a hooked module returned no tensor.
        ValueError: ``paths`` is empty or has duplicates; ``store=False`` with no callback (nothing would be
            recorded).
        UnknownModulePathError: a path names no submodule; the message lists the closest existing names.
        RuntimeError: entering a capture that is already active (nested ``with`` on the same object).
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *, store: bool = True,
                 on_output: Optional[Callback] = None, inputs: bool = False,
                 on_input: Optional[Callback] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Capture expects an nn.Module, got {type(model).__name__}")
        if isinstance(paths, str):
            raise TypeError(f"paths must be a list of module names, got the single string {paths!r}; "
                            f"write [{paths!r}]")
        paths = list(paths)
        if not paths:
            raise ValueError("paths is empty: name at least one submodule to capture")
        for p in paths:
            if not isinstance(p, str):
                raise TypeError(f"every path must be a str, got {type(p).__name__} ({p!r})")
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        if dupes:
            raise ValueError(f"duplicate paths {dupes}: list each module once")
        if on_input is not None and not inputs:
            raise TypeError("on_input given but inputs=False: pass inputs=True to capture inputs")
        if not store and on_output is None and on_input is None:
            raise ValueError("store=False without on_output/on_input would record nothing: pass a callback "
                             "or keep store=True")
        self.model = model
        self.paths = paths
        self.store = store
        self.on_output = on_output
        self.capture_inputs = inputs
        self.on_input = on_input
        self.modules = {p: self._resolve(model, p) for p in paths}
        self._handles: list = []
        self._reset()

    @staticmethod
    def _resolve(model: nn.Module, path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            pass
        names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
        hint = f"closest valid names: {', '.join(close)}" if close else \
            f"no close match; the model has {len(names)} submodules (see model.named_modules())"
        raise UnknownModulePathError(f"no submodule {path!r} in {type(model).__name__}; {hint}")

    def _reset(self) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {p: [] for p in self.paths}
        self.inputs: dict[str, list[torch.Tensor]] = {p: [] for p in self.paths}
        self.calls: dict[str, int] = {p: 0 for p in self.paths}
        self.order: list[tuple[str, int]] = []

    def _output_hook(self, path: str):
        def hook(module, args, output):
            tensor = first_tensor(output)
            if tensor is None:
                raise TypeError(f"Capture: module {path!r} ({type(module).__name__}) returned "
                                f"{type(output).__name__} holding no tensor; capture a submodule that returns one")
            tensor = tensor.detach()
            self.order.append((path, self.calls[path]))
            self.calls[path] += 1
            if self.store:
                self.outputs[path].append(tensor.clone())
            if self.on_output is not None:
                self.on_output(path, tensor)
        return hook

    def _input_hook(self, path: str):
        def hook(module, args, kwargs):
            tensor = _first_input(args, kwargs)
            if tensor is None:
                raise TypeError(f"Capture: module {path!r} ({type(module).__name__}) was called with no tensor "
                                "argument; capture its inputs elsewhere or pass inputs=False")
            tensor = tensor.detach()
            if self.store:
                self.inputs[path].append(tensor.clone())
            if self.on_input is not None:
                self.on_input(path, tensor)
        return hook

    def remove(self) -> None:
        """Remove every hook this capture registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("this Capture is already active; exit it before entering again")
        self._reset()
        try:
            for path, module in self.modules.items():
                if self.capture_inputs:
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(path), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._output_hook(path)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def single(self, path: str) -> torch.Tensor:
        """The stored output of ``path`` when that module ran exactly once.

        Raises:
            KeyError: ``path`` was not captured.
            ValueError: the module ran zero or several times (use ``outputs[path]``), or ``store=False``.
        """
        if path not in self.outputs:
            raise KeyError(f"{path!r} was not among the captured paths {self.paths}")
        if not self.store:
            raise ValueError("nothing is stored with store=False")
        n = len(self.outputs[path])
        if n != 1:
            raise ValueError(f"module {path!r} ran {n} times; index outputs[{path!r}][i] to pick a call")
        return self.outputs[path][0]
