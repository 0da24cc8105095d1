"""The parity engine: both models on their own inputs, every mapped layer compared, the first divergence named.

``run_parity(pair, inputs, layers)`` (eager mode) works in phases, one model at a time (Polygraphy's runner ->
comparator split; ``parity.runner`` runs, ``parity.metrics`` judges, ``parity.result`` holds the result):

0. the input pipelines: HF's processor output against the project's (``features.*``, ``input_ids``), exact;
1. HF, run with ``Capture`` hooks on the HF module of every row: each row's output is kept (on the device, or the
   host when ``pair.memory == "sequential"``), and the full call of every row with a replay (``pathmap`` ``kind``);
2. in reduced precision with a float64 reference: HF run again in float64, one block at a time
   (``runner.float64_units``), for HF's own end-to-end drift from float64 at every row, and every recorded call
   replayed in float64, for the rounding error each HF module introduces on its own; then HF is freed when the pair
   is ``sequential``;
3. FMS, run on its own inputs with streaming hooks: as each FMS module returns, its tensor is compared with HF's
   (the PROPAGATED error, ``LayerResult.diff``); then every FMS module with a replay is run on HF's exact recorded
   call and compared with HF's output (the INTRODUCED error, ``LayerResult.introduced``).

Bounds: float32 / float64 rows get ``metrics.default_tolerance`` of the dtype; the input pipelines must match exactly.
In bf16 / fp16 each row's bound comes from the float64 reference (``metrics.rounding_tolerance``): the introduced error
within the row's ``factor`` of HF's own introduced rounding (plus a floor), the propagated error within
``pathmap.ROUNDING["propagated"]`` of HF's own drift; ``reference="flat"`` (or a compiled mode) uses the per-dtype
tolerance instead, and the result says which (``ParityResult.reference``). A row passes when both comparisons pass;
``first_divergent`` is the first row in execution order that does not. Every divergence is a verdict: different
shapes, a module that ran a different number of times, or the FMS model raising on its inputs fails the rows it
affects (exit 1), while inputs the HF reference itself cannot run are the caller's problem (``ValueError``).

Modes (``MODES``): ``eager`` as above; ``compiled``: each repeated block of both sides compiled once per kind and
reused for every block of that kind (regional compilation, ``pathmap.REGIONS``; the capture hooks are one object for
every block, so a deeper model compiles no more graphs), FMS vs HF per layer from stored captures; ``drift``: each side
compiled against itself eager (``hf_drift`` for HF, ``layers`` for FMS). Compiled modes compare propagated errors only
and raise instead of silently falling back to eager when dynamo's recompile limit is hit.

``recheck(result, tol)`` applies new tolerances to saved statistics without re-running either model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import inspect
import json
import math
import platform
import resource
import time
from typing import Callable, Optional, Sequence, Union

import torch

from parity._shell import first_line as _first_line
from parity._tree import map_tensors
from parity.capture import Capture
from parity.metrics import (DEFAULT_CHUNK_ELEMENTS, REDUCED_PRECISION, TensorDiff, Tolerance, compare_tensors,
                            default_tolerance, recheck_diff, rounding_tolerance)
from parity.pathmap import (EXCLUDED, FLOAT64_UNITS, INPUT, OUTPUT, PIPELINE, REGIONS, ROUNDING, SECTIONS, TRANSFORMS, LayerPair,
                            expand, resolve, section_of, template_of)
from parity.result import LayerResult, ParityResult
from parity.runner import REPLAYS, bind, float64, float64_units, iter_calls, replay_fms, replay_hf64, run_section

__all__ = ["COMPILE_BACKENDS", "COMPILE_SCOPES", "LayerResult", "MODES", "ParityResult", "REFERENCES", "SECTIONS", "apply_transform",
           "recheck", "requested_pairs", "run_parity", "run_section", "set_adapters", "versions", "worst_diff"]

MODES = ("eager", "compiled", "drift")
COMPILE_SCOPES = ("regional", "pieces", "whole")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
REFERENCES = ("auto", "float64", "flat")
_EXACT = Tolerance(atol=0.0, rtol=0.0, max_rel_l2=0.0, min_cosine=1.0)
Progress = Optional[Callable[[str], None]]


# -- small pieces -----------------------------------------------------------------------------------------------------


def versions() -> dict:
    """Versions of what the comparison depends on: python, torch, transformers, ibm-fms, peft."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "ibm-fms", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def requested_pairs(config, layers: Union[None, str, Sequence[str]]) -> list[LayerPair]:
    """The path-map pairs for ``layers`` (each name with its sub-modules; None: every layer), in execution order.

    Raises:
        pathmap.UnknownLayerError (ValueError): an unknown name; the message lists the closest valid names.
    """
    if layers is None:
        return expand(config)
    if isinstance(layers, str):
        layers = [layers]
    seen, out = set(), []
    for name in layers:
        for p in resolve(name, config):
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
    order = {p.name: k for k, p in enumerate(expand(config))}
    return sorted(out, key=lambda p: order[p.name])


def apply_transform(transform: Optional[str], tensor: torch.Tensor, config) -> torch.Tensor:
    """An FMS tensor put on HF's scale by the path-map transform named ``transform`` (None: unchanged).

    The one implementation of every ``pathmap.TRANSFORMS`` entry; the engine, ``parity.attribution`` and
    ``parity.generation`` all call it, so they cannot disagree. ``logits_scaling``: ``tensor`` [..., vocab] times
    ``config.decoder.logits_scaling`` (FMS Granite divides its logits by it, transformers 5.x does not), computed in
    float64 and rounded once back to ``tensor.dtype``: exact for a power-of-two scale (8, 16 in the released models),
    at most half an ULP otherwise. Same shape and dtype as ``tensor``.

    Raises:
        ValueError: a transform name ``pathmap.TRANSFORMS`` does not know.
    """
    if transform is None:
        return tensor
    if transform == "logits_scaling":
        return (tensor.to(torch.float64) * float(config.decoder.logits_scaling)).to(tensor.dtype)
    raise ValueError(f"unknown transform {transform!r} in the path map; known: {', '.join(TRANSFORMS)}")


def worst_diff(diffs: list[TensorDiff]) -> TensorDiff:
    """The diff that judges a module called several times: the worst failing call, else the worst call overall.

    "Worst" is the largest ``rel_l2`` (NaN counts as infinite). ``diffs`` must not be empty.
    """
    pool = [d for d in diffs if not d.passed] or diffs
    return max(pool, key=lambda d: math.inf if math.isnan(d.rel_l2) else d.rel_l2)


def _hf_adapters_enabled(hf) -> Optional[bool]:
    if not getattr(hf, "_hf_peft_config_loaded", False):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in hf.modules() if isinstance(m, BaseTunerLayer)), None)
    return None if layer is None else not layer.disable_adapters


@contextlib.contextmanager
def _adapter(model, side: str, enabled: bool):
    """One side's LoRA adapter on (``enabled``) or off for the duration, restored afterwards; yields whether the side
    has an adapter."""
    if side == "hf":
        before = _hf_adapters_enabled(model)
        if before is not None and before != enabled:  # peft walks every module to toggle: only when it changes
            model.enable_adapters() if enabled else model.disable_adapters()
    else:
        before = bool(model.adapter_enabled) if getattr(model, "has_adapter", False) else None
        if before is not None:
            model.set_adapter(enabled)
    try:
        yield before is not None
    finally:
        if before is not None and before != enabled:
            if side == "hf":
                model.enable_adapters() if before else model.disable_adapters()
            else:
                model.set_adapter(before)


def _adapter_note(hf_has: Optional[bool], fms_has: Optional[bool], enabled: bool) -> Optional[str]:
    if hf_has is None and fms_has is None:
        return None
    state = "enabled" if enabled else "disabled"
    if not hf_has and not fms_has:
        return "no LoRA adapter on either side"
    if hf_has != fms_has:
        side = "FMS" if fms_has else "HF"
        return f"LoRA adapter only on the {side} side ({state}): the decoder is expected to diverge"
    why = "inputs carry audio" if enabled else "text-only inputs"
    return f"LoRA adapter {state} on both sides ({why}), as HF generate() would set it"


@contextlib.contextmanager
def set_adapters(pair, enabled: bool):
    """Both sides' LoRA adapters on (``enabled``) or off for the duration; yields a note describing the state.

    HF ``forward()`` never toggles peft adapters (only ``generate`` does), so the engine sets them explicitly: on for
    inputs with audio, off for text-only inputs, as ``generate`` would (FMS: ``GraniteSpeech.set_adapter``). Both
    models must be built. The previous states are restored afterwards.
    """
    with _adapter(pair.get("hf"), "hf", enabled) as hf_has, _adapter(pair.get("fms"), "fms", enabled) as fms_has:
        yield _adapter_note(hf_has, fms_has, enabled)


def _peak_memory(device: torch.device) -> dict:
    out = {"host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        out["cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _config_dict(config) -> dict:
    """The config as JSON-safe data (anything json cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# -- which rows run, and their bounds ---------------------------------------------------------------------------------


def _rows(config, requested: list[LayerPair], inputs) -> tuple[list[LayerPair], list[str]]:
    """Every row of every section the request needs (in execution order) and those sections."""
    upto = max((p.section for p in requested), key=SECTIONS.index)
    if not inputs.has_audio:
        audio_rows = sorted({p.name for p in requested if p.section in ("encoder", "projector")
                             or p.name.startswith("features.")})
        if audio_rows:
            raise ValueError(f"layers {audio_rows[:3]} need audio but the inputs are text-only; build inputs with "
                             "audio")
        sections = ["features", "decoder"] if upto == "decoder" else ["features"]
    else:
        sections = list(SECTIONS[: SECTIONS.index(upto) + 1])
    run = [p for p in expand(config) if p.section in sections]
    if inputs.fms is None:  # the same tensors go to both models: the pipelines are not compared
        run = [p for p in run if p.tensor != PIPELINE]
    elif not inputs.has_audio:
        run = [p for p in run if not p.name.startswith("features.")]
    return run, [s for s in sections if any(p.section == s for p in run)] or sections


@dataclasses.dataclass
class _Bounds:
    """The tolerances of one run: given by the caller, per dtype, or from the float64 reference."""

    dtype: torch.dtype
    tol: Optional[Tolerance]
    hf_propagated: Optional[dict] = None  # name -> HF's rel-L2 against float64, end to end
    hf_introduced: Optional[dict] = None  # name -> HF's rel-L2 against float64, the module alone

    def propagated(self, p: LayerPair) -> Tolerance:
        if p.tensor == PIPELINE:
            return _EXACT
        if self.tol is not None:
            return self.tol
        if self.hf_propagated is not None and p.name in self.hf_propagated:
            return rounding_tolerance(self.hf_propagated[p.name], ROUNDING["propagated"], self.dtype)
        return default_tolerance(self.dtype)

    def introduced(self, p: LayerPair) -> Tolerance:
        if self.tol is not None:
            return self.tol
        if self.hf_introduced is not None and p.name in self.hf_introduced:
            return rounding_tolerance(self.hf_introduced[p.name], p.factor, self.dtype)
        return default_tolerance(self.dtype)


# -- the pipelines ------------------------------------------------------------------------------------------------------


def _pipeline_tensor(inputs, name: str) -> Optional[torch.Tensor]:
    if name == "input_ids":
        return inputs.input_ids
    field = name.split(".", 1)[1]
    if field == "audio_token_counts":
        return None if inputs.audio_token_counts is None else torch.tensor(inputs.audio_token_counts)
    return getattr(inputs, field)


def _pipelines(run: list[LayerPair], inputs) -> list[LayerResult]:
    out = []
    for p in run:
        if p.tensor != PIPELINE:
            continue
        ref, test = _pipeline_tensor(inputs, p.name), _pipeline_tensor(inputs.fms, p.name)
        try:
            out.append(LayerResult(pair=p, diff=compare_tensors(test.cpu(), ref.cpu(), _EXACT)))
        except (ValueError, TypeError) as err:
            out.append(LayerResult(pair=p, error=f"the pipelines disagree: {err}"))
    return out


# -- eager mode ---------------------------------------------------------------------------------------------------------


def _capture(model, pairs: list[LayerPair], side: str, callback=None, call_args: Sequence[LayerPair] = ()
             ) -> list[Capture]:
    """Captures for ``pairs`` on one side: outputs, first inputs (``tensor == "input"`` rows) and full calls.

    Without ``callback`` the tensors are stored (the reference side); with it they are streamed to
    ``callback(path, tensor)`` and nothing is kept (the side under test).
    """
    path = (lambda p: p.hf) if side == "hf" else (lambda p: p.fms)
    outs = [path(p) for p in pairs if p.tensor == OUTPUT]
    ins = [path(p) for p in pairs if p.tensor == INPUT]
    store = callback is None
    caps = []
    if outs:
        caps.append(Capture(model, outs, store=store, on_output=callback))
    if ins:
        caps.append(Capture(model, ins, store=store, inputs=True, on_input=callback))
    if call_args:
        caps.append(Capture(model, [path(p) for p in call_args], store=False, call_args=True))
    return caps


def _collect(caps: list[Capture], pairs: list[LayerPair], side: str, what: str, host: bool = False) -> dict:
    by_path = {(p.hf if side == "hf" else p.fms): p.name for p in pairs}
    out: dict = {}
    for cap in caps:
        if what == "args" and cap.capture_call_args:
            source = cap.call_args
        elif what == "tensors" and not cap.capture_call_args:
            source = cap.inputs if cap.capture_inputs else cap.outputs
        else:
            continue
        for path, values in source.items():
            if host:
                values = [_to_host(v) for v in values]
            out[by_path[path]] = values
    return out


def _to_host(value):
    return map_tensors(lambda t: t.cpu(), value)


def _to_device(value, device):
    return map_tensors(lambda t: t.to(device), value)


def _rel_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    """``||test - ref|| / ||ref||`` in float64, as ``compare_tensors`` computes it (its chunked, non-finite-aware
    path for large or non-finite tensors; two norms otherwise, without the statistics a bound does not use)."""
    if ref.numel() > DEFAULT_CHUNK_ELEMENTS or test.shape != ref.shape:
        return compare_tensors(test, ref, _EXACT).rel_l2
    t, r = test.detach().to(torch.float64), ref.detach().to(torch.float64)
    num, den = float(torch.linalg.vector_norm(t - r)), float(torch.linalg.vector_norm(r))
    if not (math.isfinite(num) and math.isfinite(den)):
        return compare_tensors(test, ref, _EXACT).rel_l2
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


class _ModelRaised(Exception):
    """The model under test raised while running its inputs (a verdict, not a usage error)."""


@dataclasses.dataclass
class _Reference:
    """What phase 1 keeps of the HF run: each row's outputs, the replayed rows' calls bound by parameter name (so the
    FMS replays need nothing of HF once it is freed), and the context the replays read (inputs, HF's projector
    output)."""

    tensors: dict
    calls: dict
    context: dict
    hf_has: Optional[bool] = None


def _eager(pair, inputs, run: list[LayerPair], upto: str, tol: Optional[Tolerance], use64: bool,
           progress: Progress, explain: Sequence[str] = (), activations=None, phases: Optional[dict] = None
           ) -> tuple[list[LayerResult], _Bounds, list[str]]:
    """Eager mode in its phases: the pipelines, the reference (HF, stored), HF's float64 bounds, HF freed when one
    model at a time, the model under test streamed against the reference, its modules replayed on HF's calls, and
    the rows assembled."""
    model_rows = [p for p in run if p.tensor != PIPELINE]
    replayed = [p for p in model_rows if p.kind is not None]
    bounds = _Bounds(dtype=pair.dtype, tol=tol)
    clock = _PhaseClock(phases)
    pipelines = {r.name: r for r in _pipelines(run, inputs)}
    clock("pipelines")
    if not model_rows:
        return [pipelines[p.name] for p in run], bounds, []
    decoder = upto == "decoder"
    ref = _run_reference(pair, inputs, run, model_rows, replayed, upto, decoder, bounds, use64, progress, clock)
    if activations is not None:
        _keep_reference(activations, ref, model_rows, bounds)
    if pair.memory == "sequential":
        _say(progress, "freeing HF (one model at a time)")
        # every local that reaches the HF model goes, or release() frees nothing: the captures hold their model,
        # the float64 replay context holds it by name
        pair.release("hf")
    _say(progress, "building FMS" if pair.fms is None else "running FMS")
    fms = pair.get("fms")
    with torch.no_grad(), (_adapter(fms, "fms", inputs.has_audio) if decoder else contextlib.nullcontext(None)) \
            as fms_has:
        clock("building the model under test")
        streamed = _stream_under_test(fms, inputs, model_rows, ref, bounds, upto, pair.dtype, pair.config,
                                      activations)
        clock("model under test")
        _say(progress, "replaying FMS modules on HF's inputs")
        introduced, intro_errors = _replay_under_test(fms, replayed, ref, bounds, pair.device, pair.config)
        clock("replay")
        rows, raised = _assemble(run, model_rows, pipelines, ref, streamed, introduced, intro_errors, bounds)
        clock("assemble")
        with (_adapter(pair.hf, "hf", inputs.has_audio) if decoder and pair.hf is not None
              else contextlib.nullcontext(None)):  # HF's module as it ran: its LoRA adapter in the run's state
            _explain(pair, fms, rows, ref, explain, progress)
        clock("explain")
    notes = []
    note = _adapter_note(ref.hf_has if decoder else None, fms_has if decoder else None, inputs.has_audio)
    if note:
        notes.append(note)
    if raised is not None:
        notes.append(f"the FMS model raised on its inputs: {raised}")
    return rows, bounds, notes


def _explain(pair, fms, rows: list[LayerResult], ref: "_Reference", explain: Sequence[str], progress) -> None:
    """Phase 6: ``parity.explain.explain_row`` for the first model row that fails and every row named in
    ``explain`` (exact names, or a prefix: ``encoder.blocks.3`` explains that block and its sub-rows), stored on the
    rows (``LayerResult.explanation``). One model at a time (HF freed), attributes are compared on a meta-device
    build of the checkpoint folder's HF class and weights read from the folder; ops always."""
    # the row that introduces the first error (its own computation fails on HF's exact input), else the first that
    # fails at all: a row that only inherits an error has nothing of its own to explain
    failing = [r for r in rows if not r.passed and r.pair.tensor != PIPELINE]
    first = next((r for r in failing if r.introduces), failing[0] if failing else None)
    wanted = [r for r in rows if r.pair.tensor != PIPELINE and (r is first or any(
        r.name == n or r.name.startswith(n + ".") for n in explain))]
    if wanted:
        _say(progress, f"explaining {', '.join(r.name for r in wanted[:3])}{' ...' if len(wanted) > 3 else ''}")
    reference = _attribute_reference(pair)
    for r in wanted:
        exp = _explain_one(pair, fms, r.pair, ref, reference)
        r.explanation = exp.to_dict()


def _attribute_reference(pair):
    """The HF model whose modules' configuration the explanations compare: the model itself, or, one model at a time
    (HF freed), a meta-device build of the checkpoint folder's class (``explain.meta_reference``: no weights); None
    when neither is at hand. Returns ``(model, from_folder)``."""
    from parity.explain import meta_reference

    if pair.hf is not None:
        return pair.hf, False
    folder = pair.weights_folder()
    if folder is None or pair.distributed is not None:
        return None, False
    try:
        return meta_reference(folder), True
    except Exception:  # noqa: BLE001 - a folder transformers cannot build on meta: ops and weights still explain
        return None, False


def _explain_one(pair, fms, p: LayerPair, ref: "_Reference", reference):
    """``explain_row`` for one row: its HF module (or its meta-device build, one model at a time), the FMS module,
    both replays, the weights against FMS's adapter, and the decoder's RoPE and muP scalars outside every row."""
    from fms_granite_speech.registration import ARCHITECTURE
    from parity.explain import config_diffs, covering_module, explain_row, rotary_diffs, weight_diffs
    from parity.metrics import REDUCED_PRECISION
    from parity.pathmap import covers_of

    hf_model, from_folder = reference
    hf_module = None if pair.hf is None else pair.hf.get_submodule(p.hf)  # the real one: the replay needs values
    fms_module = fms.get_submodule(p.fms)
    calls = ref.calls.get(p.name) or []
    run = hf_run = None
    if p.kind is not None and calls:
        def replay(call=calls[0]):
            return replay_fms(REPLAYS[p.kind], fms, fms_module, _to_device(call, pair.device), ref.context)

        def hf_replay(call=calls[0]):
            bound = inspect.BoundArguments(inspect.signature(hf_module.forward), _to_device(call, pair.device))
            return hf_module(*bound.args, **bound.kwargs)

        run, hf_run = replay, (hf_replay if hf_module is not None else None)
    # the attributes of every HF module the row covers (the Q-Former feed-forward: intermediate_query too)
    covers = covers_of(p.name)
    hf_modules = None
    if hf_model is not None:
        hf_modules = covering_module(hf_model, [p.hf, *covers]) if covers else hf_model.get_submodule(p.hf)
    weights, weights_note = None, None
    folder = pair.weights_folder() if pair.hf is None else None
    if (pair.hf is not None or folder is not None) and pair.distributed is None and p.hf:
        try:  # the row's FMS tensors against what FMS's own adapter makes of HF's tensors under the row (read
            # from the checkpoint folder when HF was freed)
            weights = weight_diffs(pair.hf, fms, [p.hf, *covers], p.fms, ARCHITECTURE, folder=folder,
                                   skeleton=hf_model if from_folder else None)
        except Exception as err:  # noqa: BLE001 - FMS's loader on a partial state dict: a note, not a crash
            weights_note = f"weights not compared: {_first_line(err)}"
    extra = []
    if hf_model is not None and p.kind in ("decoder_attn", "decoder_layer"):
        # the rotary embedding the decoder's attention uses lives outside the row, once per model
        hf_rot, fms_rot = _ROTARY
        hf_obj, fms_obj = _attribute_path(hf_model, hf_rot), _attribute_path(fms, fms_rot)
        if hf_obj is not None and fms_obj is not None:
            extra = rotary_diffs(hf_obj, fms_obj, hf_rot, fms_rot)
    if hf_model is not None and p.section == "decoder":
        # Granite's muP scalars live in the decoders' configs, outside every row's modules
        decoder = getattr(fms, "decoder", None)
        configs = {path: cfg for path, cfg in (("decoder.config", getattr(decoder, "config", None)),
                                               ("decoder.base_model.config",
                                                getattr(getattr(decoder, "base_model", None), "config", None)))
                   if cfg is not None}
        text_config = getattr(hf_model.config, "text_config", None)
        if text_config is not None:
            extra += config_diffs(text_config, "text_config", configs, _MUP_SCALARS)
    exp = explain_row(p.name, hf_modules, fms_module, run, reduced=pair.dtype in REDUCED_PRECISION, hf_run=hf_run,
                      weights=weights, extra_attributes=extra)
    notes = [weights_note] if weights_note else []
    if pair.hf is None and from_folder:
        notes.append("HF was freed (one model at a time): attributes compared on a meta-device build of the "
                     "checkpoint's config" + ("" if weights is None else ", weights read from the checkpoint folder"))
    elif pair.hf is None:
        notes.append("attributes not compared: HF was freed (one model at a time); --memory together compares them")
    if notes and not exp.note:
        exp.note = "; ".join(notes)
    return exp


_ROTARY = ("model.language_model.rotary_emb", "decoder.base_model.rot_emb")  # HF's and FMS's decoder RoPE
_MUP_SCALARS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def _attribute_path(model, path: str):
    """``model.a.b.c`` for ``path`` "a.b.c", or None (FMS's ``RotaryEmbedding`` is a plain object, not a module)."""
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class _PhaseClock:
    """``clock(name)`` adds the seconds since the last call to ``phases[name]`` (the run's cost by phase)."""

    def __init__(self, phases: Optional[dict]):
        self.phases = phases if phases is not None else {}
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.last, 4)
        self.last = now


def _run_reference(pair, inputs, run, model_rows, replayed, upto, decoder, bounds, use64, progress,
                   clock=None) -> _Reference:
    """Phase 1 (and 2): HF with storing captures on every row and its replayed rows' calls recorded; in reduced
    precision, HF's own rounding against float64 (end to end, one block at a time, and each module alone on its
    recorded call) sets ``bounds``."""
    dtype = pair.dtype
    host = pair.memory == "sequential"
    hf_in = inputs.side("hf")
    context = {"inputs": hf_in}
    _say(progress, "running HF")
    hf = pair.get("hf")
    with torch.no_grad(), (_adapter(hf, "hf", inputs.has_audio) if decoder else contextlib.nullcontext(None)) \
            as hf_has:
        caps = _capture(hf, model_rows, "hf", call_args=replayed)
        try:
            with _entered(caps):
                run_section("hf", hf, hf_in, upto, dtype)
        except (ValueError, RuntimeError, IndexError, TypeError) as err:
            raise ValueError(f"the HF reference cannot run these inputs: {_first_line(err)}") from None
        reference = _collect(caps, model_rows, "hf", "tensors", host)
        calls = _collect(caps, model_rows, "hf", "args", host)
        del caps
        if "projector" in reference:
            context["audio"] = reference["projector"][0]
        if clock is not None:
            clock("reference")
        if use64:
            _float64_bounds(pair, hf, hf_in, run, model_rows, replayed, upto, reference, calls, context, bounds,
                            progress)
            if clock is not None:
                clock("float64 bounds")
        rows, modules = {p.name: p for p in run}, dict(hf.named_modules(remove_duplicate=False))
        bound_calls = {name: [bind(modules[rows[name].hf], a, k) for a, k in values]
                       for name, values in calls.items()}
    return _Reference(tensors=reference, calls=bound_calls, context=context, hf_has=hf_has)


def _float64_bounds(pair, hf, hf_in, run, model_rows, replayed, upto, reference, calls, context, bounds,
                    progress) -> None:
    """Phase 2: HF's own drift from a float64 run at every row (``bounds.hf_propagated``) and the rounding each
    replayed HF module introduces alone on its recorded call (``bounds.hf_introduced``)."""
    _say(progress, "running HF in float64 (one block at a time)")
    bounds.hf_propagated, bounds.hf_introduced = {}, {}
    seen: dict[str, int] = {}
    by_hf = {p.hf: p.name for p in model_rows}

    def on64(path, t64):
        name = by_hf[path]
        k = seen.get(name, 0)
        seen[name] = k + 1
        refs = reference.get(name, [])
        if k < len(refs):
            rel = _rel_l2(refs[k].to(t64.device), t64)
            bounds.hf_propagated[name] = max(bounds.hf_propagated.get(name, 0.0), rel)

    with float64_units(hf, FLOAT64_UNITS), _entered(_capture(hf, model_rows, "hf", callback=on64)):
        run_section("hf", hf, hf_in, upto, torch.float64, compose=True)
    ctx64 = dict(context, hf=hf)
    if "audio" in ctx64:
        ctx64["audio"] = ctx64["audio"].to(pair.device)
    rows = {p.name: p for p in run}
    # the replays grouped by the repeated block (a FLOAT64_UNITS region) holding their module: each block is
    # converted to float64 once for all the replays inside it (the block and its sub-modules), not once per replay;
    # still one block at a time (the peak stays one block in float64)
    grouped: dict[Optional[str], list] = {}
    for item in iter_calls(calls, [p.name for p in replayed]):
        parts = rows[item[0]].hf.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        block = next((q for q in prefixes if template_of(q) in FLOAT64_UNITS), None)
        grouped.setdefault(block, []).append(item)
    for block, items in grouped.items():
        with float64(hf.get_submodule(block)) if block is not None else contextlib.nullcontext():
            for name, k, args, kwargs in items:
                p = rows[name]
                out64 = replay_hf64(REPLAYS[p.kind], hf.get_submodule(p.hf), _to_device(args, pair.device),
                                    _to_device(kwargs, pair.device), ctx64)
                rel = _rel_l2(reference[name][k].to(out64.device), out64)
                bounds.hf_introduced[name] = max(bounds.hf_introduced.get(name, 0.0), rel)


@dataclasses.dataclass
class _Streamed:
    """Phase 3's findings: per row the propagated diffs, shape errors, how many times FMS produced it, and what the
    FMS model raised (None when it ran through)."""

    diffs: dict
    errors: dict
    calls: dict
    raised: Optional[str] = None


def _keep_reference(store, ref: "_Reference", model_rows, bounds) -> None:
    """``--save-activations``: HF's tensors, the replayed rows' recorded calls, each row's transform and bound."""
    for p in model_rows:
        store.add_row(p.name, p.transform, bounds.propagated(p).to_dict())
        for k, t in enumerate(ref.tensors.get(p.name, [])):
            store.add(p.name, "hf", k, t)
        for k, bound in enumerate(ref.calls.get(p.name, [])):
            for arg, value in bound.items():
                store.add(p.name, "call", k, value, arg)


def _stream_under_test(fms, inputs, model_rows, ref: _Reference, bounds, upto, dtype, config,
                       activations=None) -> _Streamed:
    """Phase 3: the FMS model on its own inputs, each row compared with HF's stored tensor as the FMS module returns
    it (the PROPAGATED error); nothing of FMS's is kept."""
    by_fms = {p.fms: p for p in model_rows}
    out = _Streamed(diffs={p.name: [] for p in model_rows}, errors={}, calls={p.name: 0 for p in model_rows})

    def on_tensor(path: str, tensor: torch.Tensor) -> None:
        p = by_fms[path]
        k = out.calls[p.name]
        out.calls[p.name] += 1
        if activations is not None:
            activations.add(p.name, "fms", k, tensor)
        refs = ref.tensors.get(p.name, [])
        if k >= len(refs) or p.name in out.errors:
            return
        test = apply_transform(p.transform, tensor, config)
        try:
            out.diffs[p.name].append(compare_tensors(test, refs[k].to(test.device), bounds.propagated(p)))
        except (ValueError, TypeError) as err:
            out.errors[p.name] = f"FMS and HF outputs differ in shape: {_first_line(err)}"

    try:
        with _entered(_capture(fms, model_rows, "fms", callback=on_tensor)):
            _run_model("fms", fms, inputs.side("fms"), upto, dtype)
    except _ModelRaised as err:
        out.raised = str(err)
    return out


def _replay_under_test(fms, replayed, ref: _Reference, bounds, device, config) -> tuple[dict, dict]:
    """Phase 4: every replayed FMS module run on HF's exact recorded call, compared with HF's output (the INTRODUCED
    error). Returns ``(diffs per row, error per row)``."""
    introduced: dict[str, list[TensorDiff]] = {p.name: [] for p in replayed}
    errors: dict[str, str] = {}
    modules = dict(fms.named_modules(remove_duplicate=False))
    for p in replayed:
        for k, bound in enumerate(ref.calls.get(p.name, [])):
            try:
                module = modules[p.fms] if p.fms in modules else fms.get_submodule(p.fms)
                out = replay_fms(REPLAYS[p.kind], fms, module, _to_device(bound, device),
                                 ref.context)
                out = apply_transform(p.transform, out, config)
                introduced[p.name].append(compare_tensors(out, ref.tensors[p.name][k].to(out.device),
                                                          bounds.introduced(p)))
            except (ValueError, TypeError, RuntimeError, IndexError) as err:
                errors[p.name] = f"FMS {p.fms or '<model>'} on HF's inputs: {_first_line(err)}"
                break
    return introduced, errors


def _assemble(run, model_rows, pipelines, ref: _Reference, streamed: _Streamed, introduced, intro_errors,
              bounds) -> tuple[list[LayerResult], Optional[str]]:
    """Phase 5: one ``LayerResult`` per row in execution order (its worst call, call-count and shape verdicts, HF's
    rounding beside it); returns the rows and what the FMS model raised, if it did."""
    results = dict(pipelines)
    n_ref = {name: len(v) for name, v in ref.tensors.items()}
    raised = streamed.raised
    for p in model_rows:
        ref_n, test_n = n_ref.get(p.name, 0), streamed.calls.get(p.name, 0)
        error = streamed.errors.get(p.name)
        if error is None and ref_n != test_n:
            if raised is not None and test_n < ref_n:
                error = f"not produced by FMS: {raised}"
            else:
                error = (f"module ran {ref_n} time(s) in HF ({p.hf}) but {test_n} time(s) in FMS "
                         f"({p.fms or '<model>'})")
        diff = worst_diff(streamed.diffs[p.name]) if streamed.diffs.get(p.name) else None
        if error is None and diff is None:
            error = "no tensor was produced on either side"
        intro = worst_diff(introduced[p.name]) if p.kind is not None and introduced.get(p.name) else None
        rounding = None
        if bounds.hf_introduced is not None and p.kind is not None:
            rounding = {"introduced": bounds.hf_introduced.get(p.name),
                        "propagated": (bounds.hf_propagated or {}).get(p.name)}
        elif bounds.hf_propagated is not None:
            rounding = {"introduced": None, "propagated": bounds.hf_propagated.get(p.name)}
        results[p.name] = LayerResult(pair=p, diff=diff, error=error, calls=max(ref_n, test_n), introduced=intro,
                                      introduced_error=intro_errors.get(p.name) if p.kind is not None else None,
                                      hf_rounding=rounding)
    return [results[p.name] for p in run], raised


def _run_model(side: str, model, inputs, upto: str, dtype: torch.dtype) -> None:
    """``run_section`` of the model under test: an exception from inside the model is a verdict (``_ModelRaised``)."""
    try:
        run_section(side, model, inputs, upto, dtype)
    except (ValueError, RuntimeError, IndexError, TypeError, KeyError) as err:
        raise _ModelRaised(f"{type(err).__name__}: {_first_line(err)}") from err



def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


@contextlib.contextmanager
def _entered(managers):
    """Every context manager of ``managers`` (the captures) entered in order, exited in reverse (``ExitStack``)."""
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


# -- compiled modes -------------------------------------------------------------------------------------------------------


def _regions(model, side: str, sections: Sequence[str]) -> list:
    """The repeated blocks of ``side`` in ``sections`` (``pathmap.REGIONS``), as modules."""
    out = []
    for template, section in zip(REGIONS[side], ("encoder", "projector", "decoder")):
        if section not in sections:
            continue
        container, _, _ = template.partition(".{}")
        out += list(model.get_submodule(container))
    return out


@contextlib.contextmanager
def _compiled(model, side: str, sections: Sequence[str], backend: str):
    """Each repeated block of one side compiled (one graph per kind of block, reused across blocks), eager again
    afterwards. Blocks the caller had compiled already are left as they are. Static shapes (no time axis marked
    dynamic): one run compiles each kind at one length, and inductor's static-shape kernels build in about 60% of
    the time of dynamic ones (tiny, whole model, cold cache, 2 cores: 79 s against 115-128 s per run)."""
    from fms_granite_speech.compile import compile_modules, is_compiled, uncompile

    mine = [m for m in _regions(model, side, sections) if not is_compiled(m)]
    compile_modules(mine, backend=backend, dynamic_audio=False)
    try:
        yield
    finally:
        uncompile(mine)


@contextlib.contextmanager
def _compiled_as_shipped(model, backend: str, whole: bool):
    """The FMS model exactly as ``compile_model(model, whole=whole)`` returns it, eager again afterwards: ``whole``,
    one fullgraph graph of the whole forward (its static-shape merge and eager input checks included); else the
    encoder, projector and decoder forwards compiled apart (``compile_model``'s default). Forward hooks on sub-modules
    are traced into the graphs (``compile.CompiledForward`` runs them with hook guards on), so the captures read the
    compiled graphs' own intermediate values."""
    from fms_granite_speech.compile import PIECES, compile_model, is_compiled, uncompile

    targets = [model] if whole else [getattr(model, p) for p in PIECES]
    mine = [m for m in targets if not is_compiled(m)]
    compile_model(model, whole=whole, backend=backend)
    try:
        yield
    finally:
        uncompile(mine)


def _stored_run(model, side: str, run: list[LayerPair], inputs, upto: str, dtype: torch.dtype) -> dict:
    """Run one side with storing captures on every row; the clones keyed by parity name."""
    caps = _capture(model, run, side)
    with _entered(caps):
        run_section(side, model, inputs, upto, dtype)
    return _collect(caps, run, side, "tensors")


def _compare_stored(run: list[LayerPair], reference: dict, tested: dict, bounds: _Bounds, config,
                    transform: bool, labels: tuple[str, str]) -> list[LayerResult]:
    """Compare two stored runs call by call (``transform``: apply each pair's FMS-side transform to ``tested``)."""
    results = []
    for p in run:
        refs, tests = reference.get(p.name, []), tested.get(p.name, [])
        diffs, error = [], None
        for ref, test in zip(refs, tests):
            test = apply_transform(p.transform, test, config) if transform else test
            try:
                diffs.append(compare_tensors(test, ref, bounds.propagated(p)))
            except (ValueError, TypeError) as err:
                error = f"{labels[1]} and {labels[0]} outputs differ in shape: {_first_line(err)}"
                break
        if error is None and len(refs) != len(tests):
            error = f"module ran {len(refs)} time(s) in {labels[0]} but {len(tests)} time(s) in {labels[1]}"
        diff = worst_diff(diffs) if diffs else None
        if error is None and diff is None:
            error = "no tensor was produced on either side"
        results.append(LayerResult(pair=p, diff=diff, error=error, calls=max(len(refs), len(tests))))
    return results


def _compiled_modes(pair, inputs, run, sections, upto, mode, backend, bounds, progress, scope="regional"):
    from torch._dynamo.utils import counters

    model_rows = [p for p in run if p.tensor != PIPELINE]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]

    def compiled_run(side: str) -> dict:
        model = pair.get(side)
        shipped = scope != "regional" and side == "fms"
        whole = shipped and scope == "whole"
        _say(progress, f"compiling and running {side.upper()} ({scope if shipped else 'regional'}, {backend})")
        region = _compiled_as_shipped(model, backend, whole) if shipped else _compiled(model, side, sections,
                                                                                      backend)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), region:
            # the whole graph is the whole forward: it runs to the logits whatever the rows asked
            return _stored_run(model, side, model_rows, inputs.side(side), "decoder" if whole else upto, pair.dtype)

    def eager_run(side: str) -> dict:
        _say(progress, f"running {side.upper()} eager")
        return _stored_run(pair.get(side), side, model_rows, inputs.side(side), upto, pair.dtype)

    hf_drift: list[LayerResult] = []
    with set_adapters(pair, inputs.has_audio) if upto == "decoder" else contextlib.nullcontext(None) as note, \
            torch.no_grad():
        if mode == "compiled":
            hf_c, fms_c = compiled_run("hf"), compiled_run("fms")
            results = _compare_stored(model_rows, hf_c, fms_c, bounds, pair.config, True,
                                      ("HF compiled", "FMS compiled"))
        else:
            hf_drift = _compare_stored(model_rows, eager_run("hf"), compiled_run("hf"), bounds, pair.config, False,
                                       ("HF eager", "HF compiled"))
            results = _compare_stored(model_rows, eager_run("fms"), compiled_run("fms"), bounds, pair.config, False,
                                      ("FMS eager", "FMS compiled"))
    graphs = counters["stats"]["unique_graphs"] - before
    what = {"compiled": "FMS compiled vs HF compiled",
            "drift": "each side compiled vs itself eager (hf_drift: HF; layers: FMS)"}[mode]
    blocks = ', '.join(s for s in sections if s != 'features')
    if scope != "regional":
        seen = [p.name for p in model_rows if any(r.diff is not None and r.name == p.name for r in results)]
        unseen = [p.name for p in model_rows if p.name not in seen]
        form = ("compile_model(model, whole=True) returns it (the whole forward as one fullgraph graph"
                if scope == "whole" else "compile_model(model) returns it (encoder, projector and decoder compiled "
                                         "apart")
        notes = [f"mode {mode}, compile {scope}: {what}; the FMS model as {form}, backend {backend!r})"
                 + (", HF's repeated blocks compiled once per kind" if mode == "compiled" else "")
                 + f": {graphs} graph(s); every row is read inside the FMS graphs by forward hooks traced into them: "
                 f"{len(seen)} of {len(model_rows)} rows seen"
                 + (f" (not seen: {', '.join(unseen[:5])}{' ...' if len(unseen) > 5 else ''})" if unseen else "")
                 + "; propagated errors only"]
    else:
        notes = [f"mode {mode}: {what}; every repeated block of {blocks} compiled once per kind (regional "
                 f"compilation) with backend {backend!r}: {graphs} graph(s); captures stored and compared after the "
                 "runs; propagated errors only"]
    if note:
        notes.append(note)
    pipelines = _pipelines(run, inputs) if mode == "compiled" else []  # drift: each side against itself
    return pipelines + results, hf_drift, notes


# -- the engine -----------------------------------------------------------------------------------------------------------


def run_parity(pair, inputs, layers: Union[None, str, Sequence[str]] = None, tol: Optional[Tolerance] = None,
               mode: str = "eager", compile_backend: str = "inductor", *, reference: str = "auto",
               compile_scope: str = "regional", explain: Union[None, str, Sequence[str]] = None,
               activations=None, progress: Progress = None) -> ParityResult:
    """Compare ``pair``'s FMS model with its HF reference layer by layer on ``inputs``.

    Args:
        pair: a ``parity.pair.ModelPair`` (same weights, same dtype and device; built together, or one at a time
            when ``pair.memory == "sequential"``).
        inputs: a ``parity.inputs.ParityInputs`` (``input_ids`` [B, L] int64, ``input_features`` [B, T, 160],
            ``input_features_mask`` [B, N] bool; features None for text-only inputs; ``fms`` the FMS pipeline's own).
        layers: parity names to report on (each with its sub-modules); None means every layer of the model.
        tol: one tolerance for every layer; None: the engine's bounds (module docstring).
        mode: ``eager``, ``compiled`` or ``drift`` (module docstring).
        compile_backend: ``torch.compile`` backend of the compiled modes: ``inductor`` (default), ``aot_eager`` or
            ``eager`` (tracing only). Ignored in eager mode.
        compile_scope: compiled modes only: ``regional`` (each repeated block compiled once per kind, both sides),
            ``pieces`` (the FMS model as ``compile_model(model)`` returns it: encoder, projector and decoder compiled
            apart) or ``whole`` (as ``compile_model(model, whole=True)`` returns it: the shipped whole-forward graph
            with its static-shape audio merge); HF is compiled regionally in ``compiled`` mode.
        activations: eager mode: a ``parity.activations.ActivationStore`` that keeps every compared tensor of both
            sides and the replayed rows' recorded calls (``--save-activations``; the caller saves it).
        explain: eager mode: parity names (or prefixes) to explain (``parity.explain``: the attribute that differs,
            the op that introduces the error); the first divergent model row is always explained.
        reference: reduced precision only: ``auto`` / ``float64`` (bounds from HF's own rounding against a float64
            run, computed one block at a time) or ``flat`` (the per-dtype tolerance).
        progress: ``progress(message)`` is called as each phase starts (the CLI prints them to stderr).

    Returns:
        ``ParityResult`` over every pair of every section that ran, in execution order.

    Raises:
        pathmap.UnknownLayerError (ValueError): an unknown layer name (message lists the closest valid names).
        ValueError: encoder/projector layers requested with text-only inputs; an unknown ``mode``,
            ``compile_backend`` or ``reference``; inputs the HF reference itself cannot run.
        TypeError: ``tol`` is not a ``Tolerance``, or ``inputs`` is not a ``ParityInputs``.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a parity mode; use one of {', '.join(MODES)}")
    if compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile_backend={compile_backend!r} is not supported; use one of "
                         f"{', '.join(COMPILE_BACKENDS)}")
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}; use one of {', '.join(REFERENCES)}")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope={compile_scope!r}; use one of {', '.join(COMPILE_SCOPES)}")
    if activations is not None and mode != "eager":
        raise ValueError("saving activations needs mode='eager' (compiled modes compare stored captures only)")
    if compile_scope != "regional" and mode == "eager":
        raise ValueError(f"compile_scope={compile_scope!r} compiles the FMS model: use it with mode='compiled' or "
                         "'drift'")
    if tol is not None and not isinstance(tol, Tolerance):
        raise TypeError(f"tol must be a parity.metrics.Tolerance or None, got {type(tol).__name__}")
    for attr in ("input_ids", "input_features", "input_features_mask", "describe", "side"):
        if not hasattr(inputs, attr):
            raise TypeError(f"inputs must be a parity.inputs.ParityInputs (from build_inputs), got "
                            f"{type(inputs).__name__} without .{attr}")
    if pair.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pair.device)
    config = pair.config
    inputs = inputs.to(pair.device)
    requested = requested_pairs(config, layers)
    run, sections = _rows(config, requested, inputs)
    upto = max((p.section for p in run), key=SECTIONS.index) if run else "features"
    reduced = pair.dtype in REDUCED_PRECISION
    use64 = reduced and mode == "eager" and reference != "flat" and tol is None
    hf_drift: list[LayerResult] = []
    phases: dict = {}
    if mode == "eager":
        results, bounds, notes = _eager(pair, inputs, run, upto, tol, use64, progress,
                                        [explain] if isinstance(explain, str) else list(explain or ()), activations,
                                        phases)
    else:
        bounds = _Bounds(dtype=pair.dtype, tol=tol)
        results, hf_drift, notes = _compiled_modes(pair, inputs, run, sections, upto, mode, compile_backend,
                                                   bounds, progress, compile_scope)
    if reduced and tol is None:
        if use64:
            notes.append("reduced precision: each layer's bound comes from HF's own rounding against a float64 run of "
                         "the same weights and inputs (introduced: the row's factor x HF's module alone; propagated: "
                         f"{ROUNDING['propagated']:g} x HF's end-to-end drift; plus a floor; parity.pathmap.ROUNDING)")
        else:
            notes.append(f"reduced precision: flat per-dtype bound ({default_tolerance(pair.dtype).max_rel_l2:g} "
                         "rel-L2; no float64 reference in this run)")
    if inputs.fms is None:
        notes.append("same inputs: both models were fed HF's processor output; the pipelines were not compared")
    for p in run:
        if p.transform is not None and mode != "drift":
            notes.append(f"{p.name}: {TRANSFORMS[p.transform]}")
    first = next((r.name for r in results if not r.passed), None)
    ran = {r.name for r in results}
    if mode == "drift":
        sections = [s for s in sections if s != "features"]
    return ParityResult(
        layers=results,
        requested=[p.name for p in requested if p.name in ran],
        first_divergent=first,
        sections=sections,
        tolerance=None if tol is None else tol.to_dict(),
        provenance=pair.provenance(),
        inputs=inputs.describe(),
        config=_config_dict(config),
        versions=versions(),
        notes=notes,
        excluded=[{"name": e.name, "hf": e.hf, "fms": e.fms, "reason": e.reason} for e in EXCLUDED
                  if section_of(e.name) in sections],
        elapsed_s=round(time.perf_counter() - start, 3),
        mode=mode,
        compile_backend=None if mode == "eager" else compile_backend,
        compile_scope=None if mode == "eager" else compile_scope,
        hf_drift=hf_drift,
        reference=None if not reduced or tol is not None else ("float64" if use64 else "flat"),
        memory=pair.memory,
        peak_memory=_peak_memory(pair.device),
        phase_s=phases,
    )


# -- re-checking saved results ------------------------------------------------------------------------------------


def recheck(result: ParityResult, tol: Tolerance) -> ParityResult:
    """``result`` judged against new tolerances without re-running either model.

    Returns a new ``ParityResult`` (the input is not modified) with every diff (propagated and introduced, ``hf_drift``
    too) re-judged by ``metrics.recheck_diff`` (the rule of ``compare_tensors``; what saved statistics can and cannot
    decide is documented there), ``first_divergent`` recomputed and ``tolerance`` replaced. Layers that had no diff
    (an error) stay failed.

    Raises:
        TypeError: ``tol`` is not a ``metrics.Tolerance``.
        ValueError: a requested layer has no statistics to re-judge (it failed without a comparison).
    """
    if not isinstance(tol, Tolerance):
        raise TypeError(f"recheck needs a parity.metrics.Tolerance, got {type(tol).__name__}")

    def again(rows: list[LayerResult]) -> list[LayerResult]:
        return [dataclasses.replace(r, diff=None if r.diff is None else recheck_diff(r.diff, tol),
                                    introduced=None if r.introduced is None else recheck_diff(r.introduced, tol))
                for r in rows]

    layers = again(result.layers)
    first = next((r.name for r in layers if not r.passed), None)
    notes = list(result.notes) + [f"rechecked against {tol.to_dict()} without re-running the models"]
    return dataclasses.replace(result, layers=layers, hf_drift=again(result.hf_drift), first_divergent=first,
                               tolerance=tol.to_dict(), notes=notes)
