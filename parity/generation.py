"""Generation parity: greedy tokens and per-step logits of the FMS model against HF ``generate``.

``compare_generation(hf_model, fms_model, inputs)`` runs

1. HF ``GraniteSpeechForConditionalGeneration.generate`` (greedy, ``output_logits=True``): the reference tokens and
   the reference logits of every step;
2. FMS generation (``fms_granite_speech.generation.transcribe_ids``, KV cache) left free: the tokens FMS produces;
3. FMS generation teacher-forced on HF's tokens: FMS's logits at every step for exactly the prefix HF saw, so every
   step's logits are comparable even after the tokens diverge (up to the first divergence, free and forced FMS runs
   are the same computation).

It reports the first step where the tokens differ (per row and overall), both sides' top-5 log-probs there with the
margin between their top-1 and top-2 (a flip with a margin inside the logits' numerical error is a near-tie; a flip
with logits that fail the dtype's tolerance is a real difference), and the per-step logits error.

Scales, stated in every result (``notes``): FMS divides logits by ``logits_scaling``, transformers 5.x Granite Speech
does not (``GraniteSpeechForConditionalGeneration.forward`` in transformers 5.17 returns ``lm_head``'s output as is).
Logits errors are measured on HF's scale (FMS logits multiplied by
``logits_scaling``); log-probs and margins are those of the model's own next-token distribution,
``log_softmax(hf_logits / logits_scaling)`` and ``log_softmax(fms_logits)``, i.e. the distribution the released
model was trained with (and FMS samples from).

A token comparison proves something only when the continuation varies: a random-weight model with a tied LM head
repeats one token (the current token's embedding dominates the last hidden state, and a tied head scores that same
token highest), so ``check_generation`` (what ``parity generate`` runs) unties the head of random weights, uses the
seed ``GENERATE_SEED`` by default, and requires ``required_distinct(max_new_tokens)`` distinct tokens in every row of
HF's continuation; fewer fails the check as inconclusive, saying so.

The result is plain data (``to_dict`` / ``from_dict`` / JSON) and ``format_table`` renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from tabulate import tabulate

from parity._json import JsonResult, json_safe
from parity.compare import _first_line, apply_transform
from parity.metrics import Tolerance, compare_tensors, default_tolerance

__all__ = [
    "DEFAULT_TEXT_PROMPT",
    "ENGINES",
    "GENERATE_SEED",
    "MIN_DISTINCT",
    "Divergence",
    "GenerationParity",
    "StepError",
    "check_generation",
    "compare_generation",
    "format_table",
    "required_distinct",
]

ENGINES = ("generate", "static", "static-compiled")
# the default weight seed of the generation check (``parity generate``): on ``tiny`` with the default prompt its
# greedy continuation has 8 distinct tokens in its first 8 (seed 0's repeats one token for 20 steps), so the default
# check is conclusive at any --max-new-tokens; the CLI keeps its own copy (it parses without importing torch)
GENERATE_SEED = 1
MIN_DISTINCT = 8  # the most distinct tokens a row of the reference continuation is asked for (see required_distinct)


def required_distinct(max_new_tokens: int) -> int:
    """Distinct tokens each row of HF's continuation needs for a conclusive check of ``max_new_tokens`` steps: one
    more than a third of the steps (a continuation that repeats one token proves nothing about the context; one that
    cycles through a few shows the tokens follow it), at most ``MIN_DISTINCT``: 1 step needs 1, 3 steps 2, 8 steps 3,
    16 steps 6, 21 steps and more 8."""
    return min(MIN_DISTINCT, 1 + max_new_tokens // 3)

DEFAULT_TEXT_PROMPT = (
    "<|start_of_role|>user<|end_of_role|>please write a sentence about the sea.<|end_of_text|>\n"
    "<|start_of_role|>assistant<|end_of_role|>"
)


@dataclass
class StepError:
    """Logits error of one generation step over the whole batch: FMS (x ``logits_scaling``) vs HF, both [B, V].

    Attributes:
        step: 0-based index of the generated token.
        rel_l2: ``||fms - hf||_2 / ||hf||_2``; max_abs: ``max |fms - hf|`` (HF's logit units).
        passed: ``parity.metrics.compare_tensors`` verdict with the result's tolerance.
    """

    step: int
    rel_l2: float
    max_abs: float
    passed: bool


@dataclass
class Divergence:
    """The first step where FMS's greedy token differs from HF's, for one row.

    Attributes:
        row, step: batch row and 0-based generated-token index.
        hf_token, fms_token: the tokens chosen there (None where that side had already stopped).
        hf_top, fms_top: ``[[token, log_prob], ...]`` top-5 of each side's next-token distribution at that step
            (log-probs of ``softmax(logits / logits_scaling)``, see the module docstring), best first.
        hf_margin, fms_margin: top-1 minus top-2 log-prob of each side (= the logit margin on FMS's scale).
        kind: ``"near-tie"`` when the step's logits pass the tolerance (the flip is within numerical error) or
            ``"logits-mismatch"`` when they do not (a real difference in what the models compute).
    """

    row: int
    step: int
    hf_token: Optional[int]
    fms_token: Optional[int]
    hf_top: list
    fms_top: list
    hf_margin: float
    fms_margin: float
    kind: str


@dataclass
class GenerationParity(JsonResult):
    """Everything ``compare_generation`` found; plain data, JSON-serialisable (``to_json`` / ``from_json``, from
    ``parity._json.JsonResult``).

    Attributes:
        batch_size, prompt_length (tokens per row as given), max_new_tokens.
        adapter: ``"on"`` (audio given: HF's generate enables the LoRA adapter, so does FMS) or ``"off"`` (text-only).
        dtype: the models' dtype; logits_scaling: FMS's divisor (HF's logits = FMS's x this).
        hf_tokens, fms_tokens: generated tokens per row (after the prompt; pad after a row's EOS).
        row_first_divergence: per row, the first step whose tokens differ, or None.
        divergence: details of the earliest divergence (lowest step, then lowest row), or None.
        steps: per-step logits error, one per HF step (FMS teacher-forced on HF's tokens).
        tolerance: the bounds each step's logits were judged with (``Tolerance.to_dict``).
        eos_token_id, pad_token_id: as used on both sides.
        notes: how the comparison was made (scales, inferred masks).
        required_distinct: distinct tokens each row of HF's continuation needs for a conclusive check (None: none).
        engine: the FMS generator compared (``ENGINES``): ``generate`` (FMS ``generate`` with its KV cache,
            ``generation.transcribe_ids``), ``static`` (``static_cache.generate_static``, eager) or
            ``static-compiled`` (the same with its decode step compiled).
        fms_error: the FMS side raised on inputs HF generated from (a divergence, never the user's mistake): the
            error's first line; None when it ran.
        first_divergent_layer: where a layer-by-layer ``run_parity`` of the prompt's forward first diverges, when the
            generation check failed on the FMS model (``check_generation`` runs it); None when not run or none.
    """

    WHAT = "a generation result"

    batch_size: int
    prompt_length: int
    max_new_tokens: int
    adapter: str
    dtype: str
    logits_scaling: float
    hf_tokens: list
    fms_tokens: list
    row_first_divergence: list
    divergence: Optional[Divergence]
    steps: list
    tolerance: dict
    eos_token_id: Optional[int] = None
    pad_token_id: int = 0
    notes: list = field(default_factory=list)
    required_distinct: Optional[int] = None
    engine: str = "generate"
    fms_error: Optional[str] = None
    first_divergent_layer: Optional[str] = None

    @property
    def distinct_tokens(self) -> list:
        """Distinct tokens of each row of HF's continuation."""
        return [len(set(row)) for row in self.hf_tokens]

    @property
    def varied(self) -> bool:
        """Every row of HF's continuation has ``required_distinct`` distinct tokens (True when not required)."""
        return self.required_distinct is None or min(self.distinct_tokens, default=0) >= self.required_distinct

    @property
    def tokens_identical(self) -> bool:
        """True when both sides generated exactly the same tokens (same length too)."""
        return self.divergence is None and self.fms_error is None

    @property
    def logits_passed(self) -> bool:
        """True when every step's logits pass the tolerance."""
        return all(s.passed for s in self.steps)

    @property
    def first_failing_step(self) -> Optional[int]:
        """First step whose logits fail the tolerance, or None."""
        return next((s.step for s in self.steps if not s.passed), None)

    @property
    def passed(self) -> bool:
        """Tokens identical, every step's logits within tolerance, and a continuation that varies (when required)."""
        return self.tokens_identical and self.logits_passed and self.varied

    @property
    def verdict(self) -> str:
        """One line: identical, near-tie flip, or a real divergence, with the step."""
        d = self.divergence
        where = "" if self.first_divergent_layer is None else (
            f"; the prompt's forward first diverges at layer {self.first_divergent_layer} (parity diff)")
        if self.fms_error is not None:
            return f"FMS ({self.engine}) failed on inputs HF generated from: {self.fms_error}{where}"
        if not self.varied:
            return (f"inconclusive: HF's continuation has only {min(self.distinct_tokens)} distinct token(s) in a row "
                    f"of {len(self.hf_tokens[0])}; a check needs {self.required_distinct}: give another --seed or "
                    "--prompt")
        if d is None:
            if self.logits_passed:
                steps = len(self.hf_tokens[0]) if self.hf_tokens else 0
                return f"tokens identical over {steps} steps, logits within tolerance"
            return f"tokens identical, but logits exceed the tolerance from step {self.first_failing_step}{where}"
        at = f"row {d.row}, step {d.step}: HF {d.hf_token} vs FMS {d.fms_token}"
        if d.kind == "near-tie":
            return (f"near-tie flip at {at} (HF margin {d.hf_margin:.3g}, FMS margin {d.fms_margin:.3g} log-prob;"
                    " logits within tolerance)")
        return (f"divergence at {at}; logits exceed the tolerance (first failing step {self.first_failing_step})"
                f"{where}")

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite floats as strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["divergence"] = None if self.divergence is None else dict(vars(self.divergence))
        out["steps"] = [dict(vars(s)) for s in self.steps]
        out["verdict"] = self.verdict
        out["passed"] = self.passed
        out["distinct_tokens"] = self.distinct_tokens
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationParity":
        """Inverse of ``to_dict`` (derived fields ``verdict`` / ``passed`` are recomputed)."""
        kw = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        kw["steps"] = [StepError(**{**s, "rel_l2": float(s["rel_l2"]), "max_abs": float(s["max_abs"])})
                       for s in data["steps"]]
        d = data.get("divergence")
        kw["divergence"] = None if d is None else Divergence(
            **{**d, "hf_margin": float(d["hf_margin"]), "fms_margin": float(d["fms_margin"])})
        return cls(**kw)


# -- the comparison --------------------------------------------------------------------------------------------------


def _get(inputs: Any, name: str) -> Any:
    if isinstance(inputs, Mapping):
        return inputs.get(name)
    return getattr(inputs, name, None)


def _top(logprobs: torch.Tensor, k: int) -> tuple[list, float]:
    values, tokens = torch.topk(logprobs.double(), min(k, logprobs.numel()))
    margin = float(values[0] - values[1]) if values.numel() > 1 else float("inf")
    return [[int(t), float(v)] for t, v in zip(tokens, values)], margin


def _first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_generation(
    hf_model: torch.nn.Module,
    fms_model: torch.nn.Module,
    inputs: Any,
    max_new_tokens: int = 32,
    *,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    tolerance: Optional[Tolerance] = None,
    top: int = 5,
    engine: str = "generate",
    compile_backend: str = "inductor",
) -> GenerationParity:
    """Greedy generation on both models from the same inputs; see the module docstring for what is measured.

    Args:
        hf_model: transformers ``GraniteSpeechForConditionalGeneration`` (eval; its peft adapter, if any, is toggled
            by its own ``generate``: on with audio, off without).
        fms_model: ``fms_granite_speech.model.GraniteSpeech`` with the same weights, same dtype and device.
        inputs: a mapping or an object (e.g. ``parity.pair.ParityInputs``) with ``input_ids`` int64 [B, L] and
            optionally ``attention_mask`` [B, L], ``input_features`` [B_audio, T, 160], ``input_features_mask``
            bool [B_audio, N]. Without ``attention_mask``, it is inferred as HF's ``generate`` infers it
            (``input_ids != pad_token_id`` when the pad id occurs, else all ones) and the same mask is given to
            both sides.
        max_new_tokens: tokens to generate (>= 1).
        eos_token_id: stop id for both sides, or None (the default) to generate all ``max_new_tokens`` (HF's model
            generation config is overridden, so its own EOS does not apply).
        pad_token_id: pad / post-EOS filler id; default the FMS decoder's ``pad_id`` (0 when unset).
        tolerance: per-step logits bound; default ``default_tolerance`` of the models' dtype.
        top: how many top log-probs to report at the divergence.
        engine: the FMS generator (``ENGINES``): ``generate`` (FMS ``generate``, ``generation.transcribe_ids``),
            ``static`` (``static_cache.generate_static``) or ``static-compiled`` (its decode step compiled with
            ``compile_backend``; one ``StaticDecoder``, compiled once, serves the free and the teacher-forced run).

    Returns:
        GenerationParity. When the FMS side raises on inputs HF generated from, the result carries ``fms_error``
        (a failed verdict, not an exception).

    Raises:
        ValueError: missing ``input_ids``, ``max_new_tokens < 1``, an unknown ``engine``, or inputs HF's ``generate``
            rejects (message passed on).
    """
    input_ids = _get(inputs, "input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("inputs need input_ids, an int64 tensor [B, L]")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; use one of {', '.join(ENGINES)}")
    features = _get(inputs, "input_features")
    features_mask = _get(inputs, "input_features_mask")
    attention_mask = _get(inputs, "attention_mask")
    config = fms_model.config
    scaling = float(config.decoder.logits_scaling)
    if pad_token_id is None:
        pad_token_id = config.decoder.pad_id if config.decoder.pad_id >= 0 else 0
    notes = [
        f"logits error on HF's scale: FMS logits x logits_scaling ({scaling:g}); transformers 5.x Granite Speech "
        "does not divide by logits_scaling, FMS (and transformers 4.x) does",
        "log-probs and margins: log_softmax(logits / logits_scaling) on both sides (the model's own distribution)",
        "per-step logits: FMS teacher-forced on HF's tokens, so every step compares the same prefix",
    ]
    if attention_mask is None:
        if bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
            notes.append(f"attention_mask inferred from pad id {pad_token_id} (as HF generate does)")
        else:
            attention_mask = torch.ones_like(input_ids)
    device = next(fms_model.parameters()).device
    dtype = next(fms_model.parameters()).dtype
    tol = tolerance if tolerance is not None else default_tolerance(dtype)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    hf_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if features is not None:
        hf_kwargs.update(input_features=features.to(device=device, dtype=dtype),
                         input_features_mask=None if features_mask is None else features_mask.to(device))
    with torch.no_grad():
        try:
            hf_out = hf_model.generate(**hf_kwargs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, output_logits=True,
                                       return_dict_in_generate=True)
        except (ValueError, RuntimeError, IndexError, TypeError) as err:
            raise ValueError(f"the HF reference cannot generate from these inputs: {_first_line(err)}") from None
    prompt_len = input_ids.shape[1]
    hf_new = hf_out.sequences[:, prompt_len:]
    hf_logits = [lg.float() for lg in hf_out.logits]
    if engine != "generate":
        notes.append({"static": "FMS side: static_cache.generate_static (preallocated KV cache, eager decode step)",
                      "static-compiled": "FMS side: static_cache.generate_static with its decode step compiled "
                                         f"(torch.compile fullgraph, backend {compile_backend!r})"}[engine])

    run = _fms_generator(engine, fms_model, input_ids, features, features_mask, attention_mask, max_new_tokens,
                         pad_token_id, compile_backend)
    forced_logits: list[torch.Tensor] = []
    fms_error = None
    try:
        fms_out = run(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        run(forced_tokens=hf_new, step_callback=lambda step, logits, tokens: forced_logits.append(
            apply_transform("logits_scaling", logits, config).float()))
    except (ValueError, RuntimeError, IndexError, TypeError) as err:
        # HF generated from these inputs: an FMS failure on them is a divergence between the sides (a verdict)
        fms_error = f"{type(err).__name__}: {_first_line(err)}"
        fms_out = input_ids[:, :0]
        forced_logits = []
    fms_new = fms_out[:, _packed_len(attention_mask):] if fms_error is None else fms_out

    steps = []
    for s, (f, h) in enumerate(zip(forced_logits, hf_logits)):
        d = compare_tensors(f, h.to(f.device), tol)
        steps.append(StepError(step=s, rel_l2=float(d.rel_l2), max_abs=float(d.max_abs), passed=bool(d.passed)))

    hf_rows, fms_rows = hf_new.tolist(), fms_new.tolist()
    row_first = [_first_difference(h, f) for h, f in zip(hf_rows, fms_rows)]
    divergence = None
    candidates = [] if fms_error is not None else [(s, r) for r, s in enumerate(row_first) if s is not None]
    if candidates:
        step, row = min(candidates)
        hf_tok = hf_rows[row][step] if step < len(hf_rows[row]) else None
        fms_tok = fms_rows[row][step] if step < len(fms_rows[row]) else None
        hf_top = fms_top = []
        hf_margin = fms_margin = float("nan")
        logits_ok = step < len(steps) and steps[step].passed
        if step < len(hf_logits) and step < len(forced_logits):
            hf_top, hf_margin = _top(torch.log_softmax(hf_logits[step][row].double() / scaling, -1), top)
            fms_top, fms_margin = _top(torch.log_softmax(forced_logits[step][row].double() / scaling, -1), top)
        divergence = Divergence(row=row, step=step, hf_token=hf_tok, fms_token=fms_tok, hf_top=hf_top,
                                fms_top=fms_top, hf_margin=hf_margin, fms_margin=fms_margin,
                                kind="near-tie" if logits_ok else "logits-mismatch")
    return GenerationParity(
        batch_size=input_ids.shape[0], prompt_length=prompt_len, max_new_tokens=max_new_tokens,
        adapter="on" if features is not None else "off", dtype=str(dtype).removeprefix("torch."),
        logits_scaling=scaling, hf_tokens=hf_rows, fms_tokens=fms_rows, row_first_divergence=row_first,
        divergence=divergence, steps=steps, tolerance=tol.to_dict(), eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, notes=notes, engine=engine, fms_error=fms_error,
    )


def _fms_generator(engine: str, model, input_ids, features, features_mask, attention_mask, max_new_tokens: int,
                   pad_token_id: int, backend: str):
    """``run(**kwargs) -> int64 [B, L' + n]``: the FMS generator of ``engine`` on these inputs (kwargs: the
    generator's ``max_new_tokens``, ``eos_token_id``, ``forced_tokens``, ``step_callback``)."""
    args = (model, input_ids, features, features_mask)
    common = dict(attention_mask=attention_mask, pad_token_id=pad_token_id)
    if engine == "generate":
        from fms_granite_speech.generation import transcribe_ids

        return lambda **kw: transcribe_ids(*args, **common, **kw)
    from fms_granite_speech.static_cache import StaticCache, StaticDecoder, generate_static

    decoder = None
    if engine == "static-compiled":  # one compiled step for both runs: the cache fits the longer (free) one
        slots = _packed_len(attention_mask) + max_new_tokens - 1
        decoder = StaticDecoder(model, StaticCache.allocate(model, input_ids.shape[0], slots), compile=True,
                                backend=backend)
    return lambda **kw: generate_static(*args, **common, decoder=decoder, **kw)


def _packed_len(attention_mask: torch.Tensor) -> int:
    """Prompt length after ``transcribe_ids`` re-packs the rows left-aligned: the longest real row."""
    return int((attention_mask != 0).sum(dim=1).max())


# -- rendering -------------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "-" if x is None else (str(x) if isinstance(x, str) or not math.isfinite(x) else f"{x:.3e}")


def format_table(result: GenerationParity, tokenizer: Any = None, tablefmt: str = "simple") -> str:
    """The result as text: a verdict line, a per-step table, the top-k at the first divergence, the notes.

    Args:
        result: from ``compare_generation`` (or ``GenerationParity.from_json``).
        tokenizer: optional; shows each token's text next to its id.
        tablefmt: a ``tabulate`` format.
    """
    def tok(t: Optional[int]) -> str:
        if t is None:
            return "-"
        if tokenizer is None:
            return str(t)
        return f"{t} {tokenizer.convert_ids_to_tokens(int(t))!r}"

    lines = [f"generation parity: batch {result.batch_size}, prompt {result.prompt_length} tokens, "
             f"{result.max_new_tokens} new tokens max, adapter {result.adapter}, {result.dtype}",
             f"verdict: {result.verdict}", ""]
    rows = []
    for s in result.steps:
        hf = [r[s.step] if s.step < len(r) else None for r in result.hf_tokens]
        fm = [r[s.step] if s.step < len(r) else None for r in result.fms_tokens]
        mark = "" if hf == fm else "<- differ"
        rows.append([s.step, " ".join(tok(t) for t in hf), " ".join(tok(t) for t in fm), _fmt(s.rel_l2),
                     _fmt(s.max_abs), "ok" if s.passed else "FAIL", mark])
    lines.append(tabulate(rows, headers=("step", "HF tokens", "FMS tokens", "logits rel-L2", "max abs", "tol", ""),
                          tablefmt=tablefmt, disable_numparse=True))
    d = result.divergence
    if d is not None:
        lines += ["", f"first divergence: row {d.row}, step {d.step} ({d.kind}); top-{len(d.hf_top)} log-probs:"]
        top_rows = []
        for i in range(max(len(d.hf_top), len(d.fms_top))):
            h = d.hf_top[i] if i < len(d.hf_top) else [None, None]
            f = d.fms_top[i] if i < len(d.fms_top) else [None, None]
            top_rows.append([i + 1, tok(h[0]), _fmt(h[1]), tok(f[0]), _fmt(f[1])])
        lines.append(tabulate(top_rows, headers=("rank", "HF token", "HF log-prob", "FMS token", "FMS log-prob"),
                              tablefmt=tablefmt, disable_numparse=True))
        lines.append(f"margin top-1 - top-2: HF {_fmt(d.hf_margin)}, FMS {_fmt(d.fms_margin)} (log-prob)")
    lines.append("")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


# -- the check --------------------------------------------------------------------------------------------------------


def check_generation(variant: str = "tiny", checkpoint=None, seed: int = GENERATE_SEED, dtype: str = "float32",
                     device: str = "cpu", audio=None, text_only: bool = False, prompt: Optional[str] = None,
                     max_new_tokens: int = 32, eos_token_id: Optional[int] = None, tied_head: bool = False,
                     engine: str = "generate", compile_backend: str = "inductor", fused_weights: bool = True,
                     progress=None):
    """The generation check ``parity generate`` runs: build the pair, the inputs, and ``compare_generation``.

    Random weights get an untied LM head unless ``tied_head`` (see the module docstring), and the result requires
    ``required_distinct(max_new_tokens)`` distinct tokens per row of HF's continuation
    (``GenerationParity.required_distinct``); a checkpoint's continuation is not required to vary (its distinct counts are still reported). ``engine`` picks
    the FMS generator (``compare_generation``), ``fused_weights=False`` the unfused FMS decoder layout. When the check
    fails on the FMS model (it raised, or a step's logits exceed the tolerance), the prompt's forward is compared
    layer by layer (``compare.run_parity``) and the result names the first divergent layer; a decode-path bug leaves
    that forward clean, and the failing step is the place.

    Returns:
        ``(GenerationParity, tokenizer, description of the inputs)``.

    Raises:
        ValueError / FileNotFoundError: bad weights, audio or prompt (one line, naming the problem).
    """
    from fms_granite_speech.config import get_config
    from parity.inputs import build_inputs
    from parity.pair import build_pair

    if progress:
        progress("building the models")
    config = None
    untie = False
    if checkpoint is None and not tied_head:
        config = get_config(variant)
        untie = config.decoder.tie_heads
        config = config.replace(decoder=config.decoder.updated(tie_heads=False))
    pair = build_pair(variant=variant, checkpoint=checkpoint, seed=seed, dtype=dtype, device=device, memory="together",
                      config=config, fused_weights=fused_weights)
    inputs = build_inputs(pair, audio=audio, prompt=prompt, text_only=text_only, same_inputs=True)
    source = "text-only" if text_only else "audio " + ", ".join(inputs.audio)
    if engine != "generate":
        source += f", FMS {engine}"
    if not fused_weights:
        source += ", FMS unfused"
    if progress:
        progress("generating on both sides")
    result = compare_generation(pair.hf, pair.fms, {"input_ids": inputs.input_ids,
                                                    "attention_mask": inputs.attention_mask,
                                                    "input_features": inputs.input_features,
                                                    "input_features_mask": inputs.input_features_mask},
                                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, engine=engine,
                                compile_backend=compile_backend)
    if result.fms_error is not None or not result.logits_passed:
        if progress:
            progress("locating: the prompt's forward layer by layer")
        from parity.compare import run_parity

        located = run_parity(pair, inputs, layers=None if inputs.has_audio else ["input_ids", "decoder"])
        result.first_divergent_layer = located.first_divergent
        result.notes.append("the prompt's forward compared layer by layer (parity diff --same-inputs): "
                            + (f"first divergent layer {located.first_divergent}" if located.first_divergent else
                               "every layer passes, so the divergence is in the decode path (KV cache, masks, "
                               "positions), first at the failing step"))
    if checkpoint is None:
        result.required_distinct = required_distinct(max_new_tokens)
    if untie:
        result.notes.append("random weights with an untied LM head (a tied head on random weights repeats one "
                            "token); --tied-head keeps the variant's")
    return result, pair.get_tokenizer(), source
