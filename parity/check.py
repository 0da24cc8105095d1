"""``parity check``: the pre-merge gate -- the CPU parity suite judged against committed per-layer-group bounds.

Pieces (each a library function; the CLI and the pytest suite are thin over them):

* ``parity.inputs.CASES`` / ``run_cases``: the fixed, named cases (window and attention-context edges, an odd mel
  count, mixed batches with the short clip first and last, text-only), run with ``compare.run_parity`` on every call;
  ``parity/tests`` runs the same cases, in float32 and (two of them) in bfloat16, plus a derandomized fuzz.
* ``thresholds.json`` (committed next to this file): for each variant and dtype, per layer group (a path-map row,
  ``encoder.blocks.{}.attn``...) the largest rel-L2 observed on the honest model and the bound derived from it:
  ``bound = min(max(observed * margin, floor_fraction * dtype_max), dtype_max)`` where ``dtype_max`` is
  ``metrics.default_tolerance(dtype).max_rel_l2``: a stated margin over what was measured, never looser than the
  dtype tolerance. ``make_baseline`` writes it from fresh results (``parity check --update-baseline``).
* ``evaluate(results, thresholds)``: every layer of every result against its group's bound (and the engine's own
  verdict); returns a ``CheckOutcome`` naming each case's first divergent layer.
* ``run_check``: runs ``pytest parity/tests -n auto`` (JUnit XML + the plugin's merged suite report), then
  ``evaluate``s the merged results and writes ``parity-check.md``/``.json``. Exit status 0 only when nothing regressed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from parity.inputs import CASES, case_inputs, case_names

__all__ = [
    "CASES",
    "PATHS",
    "CheckOutcome",
    "Regression",
    "THRESHOLDS_PATH",
    "case_inputs",
    "evaluate",
    "layer_group",
    "load_suite",
    "load_thresholds",
    "make_baseline",
    "run_cases",
    "run_check",
    "run_path",
    "shipped_path",
    "ShippedPath",
    "write_check_report",
]

THRESHOLDS_PATH = Path(__file__).with_name("thresholds.json")
THRESHOLDS_SCHEMA = 1
DEFAULT_MARGIN = 10.0
DEFAULT_FLOOR_FRACTION = 0.1
CHECK_JSON, CHECK_MD = "parity-check.json", "parity-check.md"
SUITE_JSON = "parity-suite.json"


# -- the suite's cases ----------------------------------------------------------------------------------------------


def run_cases(pair, names: Optional[Sequence[str]] = None, progress=None) -> dict:
    """``{case: ParityResult}`` of the whole model (features to logits; the decoder alone for the text-only case) for
    each named case of ``parity.inputs.CASES`` (default: all of them, in that order).

    Raises:
        ValueError: an unknown case name (the message lists ``CASES``).
    """
    from parity.compare import run_parity

    out = {}
    for name in case_names(names):
        if progress is not None:
            progress(f"case {name}")
        inputs = case_inputs(pair, name)
        out[name] = run_parity(pair, inputs, layers=None if inputs.has_audio else ["input_ids", "decoder"])
    return out


# -- the shipped execution paths --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShippedPath:
    """One execution path the project ships, the parity command that compares it, and what ``parity check`` runs.

    Attributes:
        name: the path (``unfused``, ``compiled-whole``, ``static-compiled``...).
        what: what a user runs to take this path.
        command: the parity command that compares it with HF.
        cases: named cases (``parity.inputs.CASES``) the check runs a ``diff`` path on; empty for generation paths.
        build: ``build_pair`` keyword arguments (diff paths) / run: ``run_parity`` keyword arguments (diff paths) or
            ``check_generation`` keyword arguments (generation paths).
        generation: True for a generation path (``check_generation``), False for a ``run_parity`` path.
    """

    name: str
    what: str
    command: str
    cases: tuple = ()
    build: tuple = ()
    run: tuple = ()
    generation: bool = False


# Compiled paths use the eager backend in the gate: the compiled-only code (the static-shape merge, the static decode
# step, the hooks traced into the graphs) is what dynamo traces, whatever the backend; measured on 2 cores, a
# whole-forward path case takes 27 s with it, 40 s with aot_eager, and inductor's code generation more again.
PATHS: tuple[ShippedPath, ...] = (
    ShippedPath("eager", "GraniteSpeech as get_model returns it (fused weights)", "parity diff --cases all",
                cases=tuple(CASES)),
    ShippedPath("unfused", "get_model(..., fused_weights=False)", "parity diff --unfused",
                cases=("speech_b1", "batch_short_first"), build=(("fused_weights", False),)),
    ShippedPath("compiled-pieces", "compile_model(model)", "parity diff --mode compiled --compile pieces",
                cases=("batch_short_first",),
                run=(("mode", "compiled"), ("compile_scope", "pieces"), ("compile_backend", "eager"))),
    ShippedPath("compiled-whole", "compile_model(model, whole=True)", "parity diff --mode compiled --compile whole",
                cases=("batch_short_first",),
                run=(("mode", "compiled"), ("compile_scope", "whole"), ("compile_backend", "eager"))),
    ShippedPath("generate", "FMS generate (generation.transcribe_ids, granite-speech transcribe)",
                "parity generate", generation=True),
    ShippedPath("generate-batch", "FMS generate on a padded batch of two clips",
                "parity generate --audio A --audio B", generation=True, run=(("audio", "batch"),)),
    ShippedPath("generate-unfused", "FMS generate on get_model(..., fused_weights=False)",
                "parity generate --unfused", generation=True, run=(("fused_weights", False),)),
    ShippedPath("static", "static_cache.generate_static (eager step)", "parity generate --static",
                generation=True, run=(("engine", "static"),)),
    ShippedPath("static-text", "generate_static on a text-only prompt", "parity generate --static --text-only",
                generation=True, run=(("engine", "static"), ("text_only", True))),
    ShippedPath("static-compiled", "generate_static(compile=True)", "parity generate --static --compile",
                generation=True, run=(("engine", "static-compiled"), ("compile_backend", "eager"))),
    ShippedPath("tp", "get_model(..., distributed_strategy='tp') under torchrun",
                "torchrun --nproc-per-node 2 -m parity.cli diff --distributed tp"),
)


def shipped_path(name: str) -> ShippedPath:
    """The ``PATHS`` entry called ``name``.

    Raises:
        ValueError: an unknown name (the message lists them).
    """
    for p in PATHS:
        if p.name == name:
            return p
    raise ValueError(f"unknown path {name!r}; known: {', '.join(p.name for p in PATHS)}")


def run_path(name: str, pair=None, max_new_tokens: int = 12) -> dict:
    """``{case: result}`` of the shipped path ``name`` (``PATHS``), as ``parity check`` runs it.

    Diff paths: ``run_parity`` of the whole model on each of the path's cases (``ParityResult``s), on ``pair`` or a
    ``tiny`` pair built with the path's ``build`` arguments. Generation paths: one ``check_generation`` on ``tiny``
    (``{name: GenerationParity}``; a padded batch of two shipped clips for ``generate-batch``). The ``tp`` path runs
    under torchrun (``tests/test_tp.py``), not here.

    Raises:
        ValueError: an unknown path, or ``tp``.
    """
    from parity.compare import run_parity
    from parity.pair import build_pair

    path = shipped_path(name)
    if path.name == "tp":
        raise ValueError("the tp path needs a process group: run it under torchrun (tests/test_tp.py)")
    if path.generation:
        from fms_granite_speech.features import shipped_audio
        from parity.generation import check_generation

        kwargs = dict(path.run)
        if kwargs.pop("audio", None) == "batch":
            kwargs["audio"] = [str(shipped_audio("transcribe")), str(shipped_audio("fox"))]  # a padded batch
        result, _, _ = check_generation(max_new_tokens=max_new_tokens, **kwargs)
        return {path.name: result}
    pair = pair if pair is not None else build_pair("tiny", seed=0, **dict(path.build))
    out = {}
    for case in path.cases:
        inputs = case_inputs(pair, case)
        out[case] = run_parity(pair, inputs, layers=None if inputs.has_audio else ["input_ids", "decoder"],
                               **dict(path.run))
    return out


# -- thresholds -----------------------------------------------------------------------------------------------------


def layer_group(name: str) -> str:
    """The path-map row a parity layer name belongs to (``pathmap.template_of``): layer indices replaced by ``{}``.

    ``encoder.blocks.7.attn`` -> ``encoder.blocks.{}.attn``; ``logits`` -> ``logits``.
    """
    from parity.pathmap import template_of

    return template_of(name)


def _dtype_max(dtype: str) -> float:
    from parity.metrics import default_tolerance
    from parity.pair import parse_dtype

    return default_tolerance(parse_dtype(dtype)).max_rel_l2


def _key(result) -> tuple[str, str]:
    p = result.provenance
    return str(p.get("variant") or p.get("checkpoint") or "unknown"), str(p.get("dtype") or "float32")


def _committed(result) -> bool:
    """Whether committed per-group bounds judge this result: not for reduced precision with a float64 reference,
    whose per-row bounds come from that run itself (the engine's verdict), nor for a derived-map run of another
    architecture (``parity.engine``: its bounds come from HF's float64 run of the same weights in every dtype)."""
    return result.reference != "float64" and result.sections != ["model"]  # derived-map runs: float64 bounds


def make_baseline(results: Mapping[str, object], margin: float = DEFAULT_MARGIN,
                  floor_fraction: float = DEFAULT_FLOOR_FRACTION, previous: Optional[dict] = None) -> dict:
    """Thresholds (the ``thresholds.json`` document) from honest ``{case: ParityResult}``.

    Per (variant, dtype) and layer group: ``observed`` = the largest propagated rel-L2 of the group over all cases,
    ``bound`` = ``min(max(observed * margin, floor_fraction * dtype_max), dtype_max)``. Results judged against a
    float64 reference (bf16 / fp16) take no committed bounds. Entries of ``previous`` for other variants/dtypes are
    kept.

    Raises:
        ValueError: a result fails its own tolerance (a baseline is only taken from a passing model), or
            ``margin < 1``.
    """
    if margin < 1:
        raise ValueError(f"margin must be >= 1 (a bound below what was observed always fails), got {margin}")
    doc = previous or {}
    out = {
        "schema_version": THRESHOLDS_SCHEMA,
        "margin": margin,
        "floor_fraction": floor_fraction,
        "rule": "bound = min(max(observed * margin, floor_fraction * dtype_max_rel_l2), dtype_max_rel_l2); "
                "observed = max rel-L2 of the group over the parity suite's cases on the honest model",
        "groups": dict(doc.get("groups", {})),
    }
    for case, result in results.items():
        if not result.passed or result.first_failure() is not None:
            raise ValueError(f"case {case!r} fails ({result.first_divergent}); fix the model before taking a baseline")
    fresh: dict = {}
    for result in results.values():
        if not _committed(result):
            continue
        variant, dtype = _key(result)
        top = _dtype_max(dtype)
        table = fresh.setdefault(f"{variant}/{dtype}", {})
        for r in result.layers:
            if r.diff is None:
                continue
            g = layer_group(r.name)
            observed = max(table.get(g, {}).get("observed", 0.0), float(r.diff.rel_l2))
            table[g] = {"observed": observed,
                        "bound": min(max(observed * margin, floor_fraction * top), top)}
    out["groups"].update(fresh)
    return out


def _problem(path, where: str, what: str) -> ValueError:
    return ValueError(f"{path}: {where} {what}; restore the committed parity/thresholds.json or rewrite it with "
                      "`parity check --update-baseline`")


def load_thresholds(path: Union[None, str, Path] = None) -> dict:
    """The thresholds document (default: the committed ``parity/thresholds.json``), fully validated.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, not a thresholds document of schema ``THRESHOLDS_SCHEMA``, or a value of the wrong
            type (every ``groups[variant/dtype][group]`` must hold finite numbers ``observed`` >= 0 and ``bound`` >=
            0); the message names the entry.
    """
    path = Path(path) if path is not None else THRESHOLDS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file not found: {path}; create it with `parity check --update-baseline`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != THRESHOLDS_SCHEMA or "groups" not in doc:
        raise ValueError(f"{path} is not a parity thresholds file (schema_version {THRESHOLDS_SCHEMA} with 'groups')")
    groups = doc["groups"]
    if not isinstance(groups, dict):
        raise _problem(path, "'groups'", f"is a {type(groups).__name__}, not an object of variant/dtype tables")
    for key, table in groups.items():
        if not isinstance(table, dict):
            raise _problem(path, f"groups[{key!r}]", f"is a {type(table).__name__}, not an object of layer groups")
        for group, entry in table.items():
            if not isinstance(entry, dict):
                raise _problem(path, f"groups[{key!r}][{group!r}]", f"is a {type(entry).__name__}, not "
                               "{\"observed\": ..., \"bound\": ...}")
            for field_name in ("observed", "bound"):
                value = entry.get(field_name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < 0:
                    raise _problem(path, f"groups[{key!r}][{group!r}].{field_name}", f"is {value!r}, not a finite "
                                   "number >= 0")
    return doc


# -- evaluation -----------------------------------------------------------------------------------------------------


@dataclass
class Regression:
    """One layer of one case over its bound (``bound`` None: the engine's own verdict failed, see ``reason``)."""

    case: str
    layer: str
    group: str
    rel_l2: Optional[float]
    bound: Optional[float]
    reason: str


@dataclass
class CheckOutcome:
    """The gate's verdict.

    Attributes:
        regressions: every failing layer, per case in execution order.
        first_divergent: per case, the first failing layer in execution order (None when the case is clean).
        missing: (variant/dtype) keys that have no committed thresholds (the check fails on them).
        cases: the case names evaluated.
        tables: per case, one row per layer: ``[layer, rel-L2, bound, observed/bound, introduced rel-L2, introduced
            bound, verdict]`` (the bound the layer was judged by: the committed one when tighter than the engine's).
    """

    regressions: list[Regression] = field(default_factory=list)
    first_divergent: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    tables: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no layer regressed, every case was covered by thresholds, and at least one case ran."""
        return bool(self.cases) and not self.regressions and not self.missing

    def to_dict(self) -> dict:
        """JSON-safe dict (with ``passed``)."""
        from parity._json import json_safe

        d = asdict(self)
        d["passed"] = self.passed
        return json_safe(d)


def evaluate(results: Mapping[str, object], thresholds: Optional[dict] = None) -> CheckOutcome:
    """Judge ``{case: ParityResult}`` against ``thresholds`` (default: ``load_thresholds()``).

    A layer regresses when the engine failed it (its bounds, a shape mismatch, a module that did not run, the FMS
    model raising) or its propagated rel-L2 exceeds the committed bound of its group. A group without a committed
    bound is judged by the engine alone; a (variant, dtype) without any thresholds is reported in ``missing`` and
    fails the check, except results judged against a float64 reference (bf16 / fp16), whose bounds come from the run.
    """
    doc = thresholds if thresholds is not None else load_thresholds()
    out = CheckOutcome(cases=list(results))
    for case, result in results.items():
        variant, dtype = _key(result)
        table = doc["groups"].get(f"{variant}/{dtype}")
        if table is None and _committed(result) and f"{variant}/{dtype}" not in out.missing:
            out.missing.append(f"{variant}/{dtype}")
        rows = []
        for r in result.layers:
            g = layer_group(r.name)
            committed = None if table is None or g not in table else float(table[g]["bound"])
            rel = None if r.diff is None else float(r.diff.rel_l2)
            engine = None if r.diff is None else r.diff.tolerance.max_rel_l2
            bound = engine if committed is None else (committed if engine is None else min(engine, committed))
            verdict = "pass"
            if not r.passed:
                out.regressions.append(Regression(case, r.name, g, rel, committed, r.reason or "failed"))
                verdict = "FAIL"
            elif committed is not None and rel is not None and (math.isnan(rel) or rel > committed):
                out.regressions.append(Regression(case, r.name, g, rel, committed,
                                                  f"rel_l2 {rel:.3g} > committed bound {committed:.3g}"))
                verdict = "FAIL"
            intro = r.introduced
            ratio = None if rel is None or bound is None else (rel / bound if bound else (0.0 if rel == 0 else
                                                                                          math.inf))
            rows.append([r.name, rel, bound, ratio, None if intro is None else intro.rel_l2,
                         None if intro is None else intro.tolerance.max_rel_l2, verdict])
        out.tables[case] = rows
        out.first_divergent[case] = next((x.layer for x in out.regressions if x.case == case), None)
    return out


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.2e}"
    return str(x)


def write_check_report(outcome: CheckOutcome, out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``parity-check.json`` and ``parity-check.md`` into ``out_dir``: the verdict, each case's first divergent
    layer, the regressions, and the observed-vs-bound table of every case.

    Returns ``(json_path, md_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / CHECK_JSON, out / CHECK_MD
    jp.write_text(json.dumps(outcome.to_dict(), indent=2, allow_nan=False) + "\n")
    lines = [f"# Parity check: {'PASS' if outcome.passed else 'FAIL'}", ""]
    for case in outcome.cases:
        first = outcome.first_divergent.get(case)
        lines.append(f"- `{case}`: first divergent layer: {first or 'none'}")
    if outcome.missing:
        lines += ["", "No committed thresholds for: " + ", ".join(outcome.missing) +
                  " (run `parity check --update-baseline` on a known-good model)"]
    if outcome.regressions:
        lines += ["", "## Regressions (execution order per case)", "",
                  "| case | layer | rel-L2 | committed bound | reason |", "|---|---|---|---|---|"]
        for r in outcome.regressions:
            lines.append(f"| {r.case} | `{r.layer}` | {_cell(r.rel_l2)} | {_cell(r.bound)} | "
                         f"{r.reason.replace('|', '/')} |")
    lines += ["", "## Observed vs bound, every case", "",
              "Propagated rel-L2 against the bound it was judged by (the committed group bound when tighter than "
              "the engine's), and the introduced rel-L2 (the FMS module on HF's exact input) against its bound.", ""]
    for case in outcome.cases:
        lines += [f"### `{case}`", "", "| layer | rel-L2 | bound | observed/bound | introduced | introduced bound | "
                  "result |", "|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(c) if k else f"`{c}`" for k, c in enumerate(row)) + " |"
                  for row in outcome.tables.get(case, [])]
        lines.append("")
    mp.write_text("\n".join(lines) + "\n")
    return jp, mp


def load_suite(path: Union[str, Path]) -> dict:
    """``{case: ParityResult}`` from a merged ``parity-suite.json`` written by the pytest plugin.

    Raises:
        FileNotFoundError / ValueError: missing or malformed file.
    """
    from parity.result import ParityResult

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite results not found: {path} (did the parity suite run with the plugin?)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ValueError(f"{path} is not a merged parity suite file (no 'results' object)")
    return {name: ParityResult.from_dict(d) for name, d in doc["results"].items()}


def run_check(out_dir: Union[str, Path] = "parity-report", workers: str = "auto",
              thresholds: Union[None, str, Path] = None, update_baseline: bool = False,
              pytest_args: Sequence[str] = (), quiet: bool = False) -> int:
    """Run the CPU parity suite with pytest and gate it; returns the exit status (0 pass, 1 regression/failure).

    Runs ``python -m pytest <parity/tests> -m "not gpu" -n WORKERS --junitxml ... --parity-report ...`` with the
    hypothesis ``ci`` profile (derandomized, no example database: the same tree gets the same verdict every run),
    loads the plugin's merged ``parity-suite.json``, ``evaluate``s it against ``thresholds`` and writes
    ``parity-check.{md,json}``. Every file of the run (suite report, JUnit XML, verdict) is written into a staging
    folder and moved into ``out_dir`` together at the end (``parity._atomic``): a run that records nothing or cannot
    be judged leaves the previous run's files untouched, and a verdict always sits beside the results it judged.
    The thresholds file is validated before pytest runs. With ``update_baseline`` the thresholds file is rewritten
    from the results instead, only when pytest exited 0 and every case passed (a missing thresholds file is then
    created).

    Raises:
        FileNotFoundError: ``thresholds`` given (or the committed file) and absent, without ``update_baseline``.
        ValueError: ``thresholds`` is not a valid thresholds document, or ``out_dir`` cannot be written.
    """
    import os

    from parity._atomic import check_writable, staged, write_atomic
    from parity.report import SUITE_MD, SUITE_PNG

    path = Path(thresholds) if thresholds else THRESHOLDS_PATH
    doc = load_thresholds(path) if not update_baseline or path.is_file() else None
    out = check_writable(out_dir).resolve()
    if update_baseline:  # before the suite runs, not after: the baseline must be writable where it goes
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                                             and not os.access(path, os.W_OK)):
            raise ValueError(f"cannot write the baseline to {path}: {'the file' if path.exists() else folder} is "
                             "not writable; give --thresholds a writable path")
    owned = (SUITE_JSON, SUITE_MD, SUITE_PNG, CHECK_JSON, CHECK_MD, JUNIT)
    suite_dir = Path(__file__).with_name("tests")
    try:
        with staged(out, owned) as stage:
            cmd = [sys.executable, "-m", "pytest", str(suite_dir), "-m", "not gpu", "-q", "-p", "no:cacheprovider",
                   "--junitxml", str(stage / JUNIT), "--parity-report", str(stage)]
            if workers and workers != "0":
                cmd += ["-n", str(workers)]
            if not _plugin_installed():
                cmd[3:3] = ["-p", "parity.plugin"]
            cmd += list(pytest_args)
            if not quiet:
                print("parity check:", " ".join(cmd), file=sys.stderr, flush=True)
            env = dict(os.environ, HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE") or "ci")
            rc = subprocess.call(cmd, cwd=str(suite_dir.parent.parent), env=env,
                                 stdout=subprocess.DEVNULL if quiet else None)
            if not (stage / SUITE_JSON).is_file():
                print(f"parity check: error: pytest (exit {rc}) recorded no parity results; {out} is unchanged",
                      file=sys.stderr)
                raise _Abandon(1)
            try:
                results = load_suite(stage / SUITE_JSON)
            except ValueError as err:
                print(f"parity check: error: {err}; {out} is unchanged", file=sys.stderr)
                raise _Abandon(1) from None
            if update_baseline:
                if rc != 0:
                    print(f"parity check: error: pytest exited {rc}; baseline NOT written to {path}", file=sys.stderr)
                    raise _Abandon(1)
                try:
                    new_doc = make_baseline(results, previous=doc)
                except ValueError as err:
                    print(f"parity check: error: {err}; baseline NOT written", file=sys.stderr)
                    raise _Abandon(1) from None
                write_atomic(path, json.dumps(new_doc, indent=2) + "\n")
                print(f"parity check: baseline written to {path}")
                return 0
            outcome = evaluate(results, doc)
            write_check_report(outcome, stage)
    except _Abandon as stop:
        return stop.code
    for case in outcome.cases:
        print(f"  {case}: first divergent layer: {outcome.first_divergent.get(case) or 'none'}")
    for r in outcome.regressions[:20]:
        print(f"  REGRESSION {r.case} {r.layer}: {r.reason}")
    print(f"parity check: {'PASS' if outcome.passed and rc == 0 else 'FAIL'} (pytest exit {rc}); "
          f"report {out / CHECK_MD}, junit {out / JUNIT}")
    return 0 if outcome.passed and rc == 0 else 1


JUNIT = "junit.xml"


class _Abandon(Exception):
    """Leave the staged files unpublished (the previous run's stay); carries the exit status."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _plugin_installed() -> bool:
    """Whether the ``pytest11`` entry point of this package is installed (else the check loads it with ``-p``)."""
    from importlib.metadata import entry_points

    return any(ep.value == "parity.plugin" for ep in entry_points(group="pytest11"))
