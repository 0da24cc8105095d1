"""Forward-hook capture of submodule activations, the "runner" half of the parity engine.

``Capture`` is model-agnostic: it takes a module and dotted submodule paths (``model.get_submodule`` names) and
records what those submodules produce during a forward pass, either storing copies or handing each activation to
a callback as it appears (so a full-size model can be compared without holding every activation in memory), and
optionally every call's full arguments (so another model's module can be run on exactly those inputs).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from parity._tree import map_tensors

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


_RECORDS = "_parity_records"  # the attribute each hooked module keeps its records in, one entry per Capture


def _detached_copy(value: Any) -> Any:
    """``value`` with every tensor (in nested tuples / lists / dicts too) detached and cloned."""
    return map_tensors(lambda t: t.detach().clone(), value)


class _Hook:
    """The ONE hook object a Capture registers on every module it hooks (as forward hook or forward pre-hook).

    Records go into a list kept on the hooked module itself (``module._parity_records[key]``), so the hook is the same
    callable for every block of a kind. Under ``torch.compile`` of one block reused for every block of its kind
    (regional compilation) dynamo guards on hooks by identity: identical hooks let one compiled graph serve all the
    blocks, where distinct closures would compile one graph per block. Streaming callbacks (``on_output`` /
    ``on_input``) are Python calls and belong to eager runs.
    """

    def __init__(self, capture: "Capture", what: str):
        self.capture = capture
        self.what = what  # "out", "in" or "args"

    def __call__(self, module, args, third):
        cap = self.capture
        rec = module.__dict__[_RECORDS][cap.key]
        if self.what == "args":
            rec["args"].append((_detached_copy(tuple(args)), _detached_copy(dict(third))))
            return None
        if self.what == "out":
            tensor = first_tensor(third)
            if tensor is None:
                raise TypeError(f"Capture: module {rec['path']!r} ({type(module).__name__}) returned "
                                f"{type(third).__name__} holding no tensor; capture a submodule that returns one")
            callback = cap.on_output
        else:
            tensor = _first_input(args, third)
            if tensor is None:
                raise TypeError(f"Capture: module {rec['path']!r} ({type(module).__name__}) was called with no "
                                "tensor argument; capture its inputs elsewhere or pass inputs=False")
            callback = cap.on_input
        tensor = tensor.detach()
        if cap.store:
            rec[self.what].append(tensor.clone())
        if not torch.compiler.is_compiling():
            path = rec["path"]
            if self.what == "out":
                cap.order.append((path, cap.calls[path]))
                cap.calls[path] += 1
            if callback is not None:
                callback(path, tensor)
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
            since the model may edit it in place afterwards. Eager runs only: under ``torch.compile`` store instead.
        inputs: also record each module's first input tensor: the first positional argument that is a tensor,
            else the first keyword argument that is one. It is taken in a forward PRE-hook, before the module
            runs, so a module that edits its input in place does not change what is recorded.
        on_input: like ``on_output``, for inputs; requires ``inputs=True``.
        call_args: also record every call's full arguments, ``(args, kwargs)`` with each tensor detached and cloned,
            taken in a pre-hook (``call_args[path]``): what ``parity.attribution`` needs to run the other model's
            module on exactly these inputs.

    Recorded data (reset on each ``__enter__``, complete after ``__exit__``):
        outputs: ``dict[path, list[Tensor]]``, one entry per call of that module, in call order. A module run
            several times in one forward (shared weights, a loop, or several forwards inside the ``with``) gets
            several entries. Stored tensors are ``detach().clone()`` copies, so later in-place edits by the model
            (e.g. a residual added into a block's output) do not change them.
        inputs: the same layout for inputs (empty unless ``inputs=True``); call_args: the same for full arguments.
        calls: ``dict[path, int]``, number of calls seen (calls inside compiled code are counted from ``outputs``).
        order: ``list[(path, call_index)]`` in the order outputs were produced (eager calls only).

    Hooks are registered on ``__enter__`` and removed on ``__exit__``, also when the block raises. Every module gets
    the same hook object (see ``_Hook``), so hooked blocks of one kind share one compiled graph.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``paths`` is a bare string or holds a non-string, or
            ``on_input`` is given without ``inputs=True``; at forward time, a hooked module returned no tensor.
        ValueError: ``paths`` is empty or has duplicates; ``store=False`` with nothing else to record.
        UnknownModulePathError: a path names no submodule; the message lists the closest existing names.
        RuntimeError: entering a capture that is already active (nested ``with`` on the same object).
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *, store: bool = True,
                 on_output: Optional[Callback] = None, inputs: bool = False,
                 on_input: Optional[Callback] = None, call_args: bool = False):
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
        if not store and on_output is None and on_input is None and not call_args:
            raise ValueError("store=False without on_output/on_input would record nothing: pass a callback "
                             "or keep store=True")
        self.model = model
        self.paths = paths
        self.store = store
        self.on_output = on_output
        self.capture_inputs = inputs
        self.on_input = on_input
        self.capture_call_args = call_args
        self.key = f"capture-{id(self)}"
        index = dict(model.named_modules(remove_duplicate=False)) if len(paths) > 8 else {}  # one walk, not one each
        self.modules = {p: index[p] if p in index else self._resolve(model, p) for p in paths}
        self._handles: list = []
        self._hooks = {what: _Hook(self, what) for what in ("out", "in", "args")}
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
        self.call_args: dict[str, list[tuple[tuple, dict]]] = {p: [] for p in self.paths}
        self.calls: dict[str, int] = {p: 0 for p in self.paths}
        self.order: list[tuple[str, int]] = []

    def remove(self) -> None:
        """Remove every hook this capture registered and collect its records (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        for path, module in self.modules.items():
            records = module.__dict__.get(_RECORDS)
            rec = None if records is None else records.pop(self.key, None)
            if rec is None:
                continue
            if not records:
                del module.__dict__[_RECORDS]
            self.outputs[path], self.inputs[path], self.call_args[path] = rec["out"], rec["in"], rec["args"]
            if self.store:  # calls inside compiled code are not seen by the eager counter
                self.calls[path] = max(self.calls[path], len(rec["out"]))

    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("this Capture is already active; exit it before entering again")
        self._reset()
        try:
            for path, module in self.modules.items():
                module.__dict__.setdefault(_RECORDS, {})[self.key] = {"path": path, "out": [], "in": [], "args": []}
                if self.capture_call_args:
                    self._handles.append(module.register_forward_pre_hook(self._hooks["args"], with_kwargs=True))
                if self.capture_inputs:
                    self._handles.append(module.register_forward_pre_hook(self._hooks["in"], with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._hooks["out"]))
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
