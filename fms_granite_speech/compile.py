"""torch.compile for Granite Speech: the whole forward as one graph, or the encoder, projector and decoder apart.

``compile_model(model, whole=True)`` compiles the model's whole forward (audio encoder, projector, the audio merge and
the decoder) with ``fullgraph=True``: one graph, no break. The merge uses static shapes
(``GraniteSpeech.merge_audio_embeddings``), and the input checks that need host values (``GraniteSpeech.check_inputs``:
id range, ``<|audio|>`` count against the mask) run eagerly before the compiled call, never inside it; a plain
``torch.compile(model, fullgraph=True, dynamic=True)`` compiles the same graph and skips those checks while tracing.
``compile_model(model)`` (the default, ``whole=False``) replaces ``forward`` of ``model.encoder``, ``model.projector``
and ``model.decoder`` (FMS) with a compiled one instead, keeping every module object and path (``encoder.blocks.8``
stays reachable, so parity hooks and state dicts see the same names). ``compile_modules`` does the same for any
modules, e.g. the HF reference's ``model.encoder`` / ``model.projector`` / ``model.language_model``.

Dynamic time: before each call the time axis (dim 1) of every tensor argument with at least two dimensions is
marked dynamic (``torch._dynamo.maybe_mark_dynamic``): encoder features [B, T, 160], projector frames [B, T, H],
decoder embeddings [B, L, D]; for the whole forward token ids [B, L], features [B, T, 160] and mask [B, N]. A clip of a new length then reuses the graph compiled for the first one instead of
recompiling. Documented exceptions: lengths of 1 (dynamo specialises sizes 0 and 1) compile their own graph, and
dynamo guards the batch stride (``stride(0) == T * 160``), so a slice of a longer tensor (``feats[:, :150]``, whose
stride is that of the long tensor) recompiles once; features fresh from the extractor do not.

Hooks: forward hooks on submodules of a compiled piece run inside the compiled code (dynamo inlines
``nn.Module.__call__`` and traces the hook). Dynamo's default (``skip_nnmodule_hook_guards=True``) does not guard on
hook dictionaries, so a hook added after the first call would silently never run and a removed one would keep
running; every compiled call here runs with ``skip_nnmodule_hook_guards=False``, so adding or removing hooks
recompiles (one extra graph per hooked state) instead of reusing a stale graph.

``explain_graph_breaks(model, inputs)`` runs ``torch._dynamo.explain`` on the whole forward and on each piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["CompiledForward", "GraphReport", "PIECES", "WHOLE", "compile_model", "compile_modules",
           "explain_graph_breaks", "is_compiled", "uncompile"]

PIECES = ("encoder", "projector", "decoder")
WHOLE = "forward"  # the name reports give the whole-model forward
BACKENDS = ("inductor", "aot_eager", "eager")


def _mark_time_dynamic(value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] >= 2:
        torch._dynamo.maybe_mark_dynamic(value, 1)


class CompiledForward:
    """Callable that replaces a module's ``forward``: marks dim 1 dynamic, then runs the compiled original.

    Attributes:
        original: the module's eager ``forward`` (bound method), restored by ``uncompile``.
        compiled: ``torch.compile(original, ...)``.
        dynamic_time: whether dim 1 of tensor arguments is marked dynamic before each call.
    """

    def __init__(self, original: Callable, compiled: Callable, dynamic_time: bool,
                 check: Optional[Callable] = None):
        self.original = original
        self.compiled = compiled
        self.dynamic_time = dynamic_time
        self.check = check

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced by an outer torch.compile (e.g. the static-cache step): inline
            return self.original(*args, **kwargs)
        if self.check is not None:
            self.check(*args, **kwargs)
        if self.dynamic_time:
            for v in (*args, *kwargs.values()):
                _mark_time_dynamic(v)
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self.compiled(*args, **kwargs)


def is_compiled(module: nn.Module) -> bool:
    """True when ``module.forward`` was replaced by ``compile_modules`` / ``compile_model``."""
    return isinstance(module.__dict__.get("forward"), CompiledForward)


def _check_backend(backend: str, mode: Optional[str]) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    if mode is not None and backend != "inductor":
        raise ValueError(f"mode={mode!r} only applies to backend='inductor' (got backend={backend!r}); drop mode")


def compile_modules(modules: Iterable[nn.Module], *, dynamic_audio: bool = True, mode: Optional[str] = None,
                    backend: str = "inductor", fullgraph: bool = False) -> list[nn.Module]:
    """Compile the ``forward`` of each module in place (see the module docstring); returns the modules.

    Compilation is lazy (on the first call). A module already compiled is left as is.

    Args:
        modules: ``nn.Module`` objects (their submodules are compiled as part of them, not separately).
        dynamic_audio: mark dim 1 (time / tokens) of tensor arguments dynamic before each call.
        mode: ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``...), inductor only.
        backend: ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"`` (the last two: tracing without codegen).
        fullgraph: ``torch.compile``'s ``fullgraph`` (a graph break raises instead of splitting the graph).

    Raises:
        TypeError: an element is not an ``nn.Module``.
        ValueError: an unknown backend, or ``mode`` with a backend other than inductor.
    """
    _check_backend(backend, mode)
    modules = list(modules)
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"compile_modules needs nn.Module objects, got {type(m).__name__}")
    for m in modules:
        if is_compiled(m):
            continue
        original = m.forward
        compiled = torch.compile(original, backend=backend, mode=mode, dynamic=None, fullgraph=fullgraph)
        m.forward = CompiledForward(original, compiled, dynamic_audio)
    return modules


def uncompile(modules: Iterable[nn.Module]) -> None:
    """Restore the eager ``forward`` of modules compiled by ``compile_modules`` (others are left alone)."""
    for m in modules:
        if is_compiled(m):
            del m.forward


def compile_model(model: nn.Module, *, whole: bool = False, dynamic_audio: bool = True, mode: Optional[str] = None,
                  backend: str = "inductor") -> nn.Module:
    """Compile an FMS ``GraniteSpeech`` in place, whole or by pieces; returns ``model``.

    Args:
        model: ``fms_granite_speech.model.GraniteSpeech`` (anything with ``encoder``, ``projector``, ``decoder``).
        whole: compile the whole forward as one graph (``fullgraph=True``), with ``model.check_inputs`` run eagerly
            before each call; False compiles the encoder, projector and decoder forwards apart.
        dynamic_audio: mark the time axis dynamic (features [B, T, 160], frames [B, T, H], embeddings [B, L, D];
            for the whole forward ids [B, L] and the mask [B, N] too), so clips of new lengths reuse the first graph
            (lengths of 1 excepted).
        mode / backend: as for ``compile_modules``.

    Raises:
        TypeError: ``model`` lacks one of the three pieces.
        ValueError: see ``compile_modules``.
    """
    missing = [p for p in PIECES if not isinstance(getattr(model, p, None), nn.Module)]
    if missing:
        raise TypeError(f"compile_model needs a GraniteSpeech model with {', '.join(PIECES)} submodules; "
                        f"{type(model).__name__} has no {', '.join(missing)}")
    if not whole:
        compile_modules([getattr(model, p) for p in PIECES], dynamic_audio=dynamic_audio, mode=mode, backend=backend)
        return model
    _check_backend(backend, mode)
    if is_compiled(model):
        return model
    check = getattr(model, "check_inputs", None)

    def check_call(x, input_features=None, input_features_mask=None, position_ids=None, past_key_value_states=None,
                   *args, **kwargs):
        if check is not None and isinstance(x, torch.Tensor) and not x.is_floating_point():
            check(x, input_features, input_features_mask, past_key_value_states, position_ids)

    original = model.forward
    compiled = torch.compile(original, backend=backend, mode=mode, dynamic=None, fullgraph=True)
    model.forward = CompiledForward(original, compiled, dynamic_audio, check=check_call)
    return model


# -- graph breaks -----------------------------------------------------------------------------------------------------


@dataclass
class GraphReport:
    """``torch._dynamo.explain`` of one piece.

    Attributes:
        piece: ``forward`` (the whole model), ``encoder``, ``projector`` or ``decoder``.
        graph_count: graphs dynamo produced (1 with no break).
        graph_break_count: number of graph breaks.
        reasons: one line per break: the reason and the user frame where it happened.
        op_count: operators captured over all graphs.
    """

    piece: str
    graph_count: int
    graph_break_count: int
    op_count: int
    reasons: list[str] = field(default_factory=list)

    def row(self) -> list:
        """``[piece, graphs, breaks, ops, reasons]`` for a table."""
        return [self.piece, self.graph_count, self.graph_break_count, self.op_count,
                "; ".join(self.reasons) or "-"]


def _reason(br) -> str:
    frame = ""
    stack = getattr(br, "user_stack", None) or []
    if stack:
        last = stack[-1]
        frame = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
    return f"{str(br.reason).splitlines()[0]}{frame}"


def _eager_forward(module: nn.Module) -> Callable:
    fwd = module.__dict__.get("forward")
    return fwd.original if isinstance(fwd, CompiledForward) else module.forward


def explain_graph_breaks(model: nn.Module, inputs) -> list[GraphReport]:
    """Graph count, break count and break reasons of the whole forward and of the encoder, projector and decoder
    forwards, each explained on its own with ``torch._dynamo.explain`` (on the eager forwards; a compiled model is
    explained too).

    Args:
        model: an FMS ``GraniteSpeech``.
        inputs: anything with ``input_ids`` [B, L] int64, ``input_features`` [B, T, 160] float and
            ``input_features_mask`` [B, N] bool (a ``parity.pair.ParityInputs``).

    Returns:
        ``[forward, encoder, projector, decoder]`` reports. The whole forward is explained on ``inputs`` (ids,
        features, mask); the decoder on the merged embeddings of ``inputs`` (``embed_inputs``, eager), the way
        ``forward`` calls it (no KV cache).

    Raises:
        TypeError: ``inputs`` has no ``input_features`` (the pieces need audio) or ``model`` lacks a piece.
    """
    feats = getattr(inputs, "input_features", None)
    if not isinstance(feats, torch.Tensor):
        raise TypeError("explain_graph_breaks needs inputs with audio: input_features [B, T, 160] (build_inputs)")
    missing = [p for p in PIECES if not isinstance(getattr(model, p, None), nn.Module)]
    if missing:
        raise TypeError(f"explain_graph_breaks needs a GraniteSpeech model; {type(model).__name__} has no "
                        f"{', '.join(missing)}")
    reports = []
    with torch.no_grad():
        feats = feats.to(model.encoder.input_linear.weight.dtype)
        enc = model.encoder(feats)
        embeds = model.embed_inputs(inputs.input_ids, feats, inputs.input_features_mask)
        whole = (inputs.input_ids, feats, inputs.input_features_mask)
        for piece, args in (("forward", whole), ("encoder", (feats,)), ("projector", (enc,)), ("decoder", (embeds,))):
            torch._dynamo.reset()
            module = model if piece == WHOLE else getattr(model, piece)
            out = torch._dynamo.explain(_eager_forward(module))(*args)
            reports.append(GraphReport(piece, out.graph_count, out.graph_break_count, out.op_count,
                                       [_reason(b) for b in out.break_reasons]))
        torch._dynamo.reset()
    return reports
