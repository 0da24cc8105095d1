"""``parity check``: the pre-merge gate -- the CPU parity suite judged against committed per-layer-group bounds.

Pieces (each a library function; the CLI and the pytest suite are thin over them):

* ``CASES`` / ``case_inputs`` / ``run_cases``: the CPU suite's cases on shipped speech (batch 1, a mixed-length
  batch, text-only), run with ``compare.run_parity``. ``parity/tests`` runs the same cases.
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
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

__all__ = [
    "CASES",
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
    "write_check_report",
]

THRESHOLDS_PATH = Path(__file__).with_name("thresholds.json")
THRESHOLDS_SCHEMA = 1
DEFAULT_MARGIN = 10.0
DEFAULT_FLOOR_FRACTION = 0.1
CHECK_JSON, CHECK_MD = "parity-check.json", "parity-check.md"
SUITE_JSON = "parity-suite.json"
TEXT_PROMPT = "USER: can you say something? ASSISTANT:"


# -- the suite's cases ----------------------------------------------------------------------------------------------


def _speech_b1(pair):
    from fms_granite_speech.features import shipped_audio
    from parity.pair import build_inputs

    return build_inputs(pair, audio=[str(shipped_audio("fox"))])


def _speech_mixed_batch(pair):
    """Three clips of different lengths (one shorter than a projector window): padding flows through every layer."""
    from parity.fuzz import AudioClip, make_waveform, samples_for_frames
    from parity.pair import build_inputs

    w = pair.config.projector.window_size
    clips = [AudioClip("ships", 0, samples_for_frames(2 * pair.config.encoder.context_size + 3)),
             AudioClip("transcribe", 4000, samples_for_frames(w - 1, odd_mel=True)),
             AudioClip("fox", 1000, samples_for_frames(w + 1))]
    return build_inputs(pair, audio=[make_waveform(c) for c in clips], sampling_rate=16_000)


def _text_only(pair):
    from parity.pair import ParityInputs

    ids = pair.get_tokenizer()(TEXT_PROMPT, return_tensors="pt")["input_ids"].to(pair.device)
    return ParityInputs(input_ids=ids, prompt=TEXT_PROMPT)


CASES: dict[str, Callable] = {
    "speech_b1": _speech_b1,
    "speech_mixed_batch": _speech_mixed_batch,
    "text_only": _text_only,
}


def case_inputs(pair, name: str):
    """The ``ParityInputs`` of suite case ``name`` for ``pair``.

    Raises:
        ValueError: unknown case (the message lists ``CASES``).
    """
    if name not in CASES:
        raise ValueError(f"unknown parity suite case {name!r}; known: {', '.join(CASES)}")
    return CASES[name](pair)


def run_cases(pair, names: Optional[Sequence[str]] = None) -> dict:
    """``{case: ParityResult}`` of the whole model (encoder to logits; the decoder alone for text-only cases) for
    each case (default: all of ``CASES``)."""
    from parity.compare import run_parity

    out = {}
    for name in names or list(CASES):
        inputs = case_inputs(pair, name)
        out[name] = run_parity(pair, inputs, layers=None if inputs.input_features is not None else "decoder")
    return out


# -- thresholds -----------------------------------------------------------------------------------------------------


def layer_group(name: str) -> str:
    """The path-map row a parity layer name belongs to: layer indices replaced by ``{}``.

    ``encoder.blocks.7.attn`` -> ``encoder.blocks.{}.attn``; ``logits`` -> ``logits``.
    """
    return re.sub(r"\.\d+(?=\.|$)", ".{}", name)


def _dtype_max(dtype: str) -> float:
    from parity.metrics import default_tolerance
    from parity.pair import parse_dtype

    return default_tolerance(parse_dtype(dtype)).max_rel_l2


def _key(result) -> tuple[str, str]:
    p = result.provenance
    return str(p.get("variant") or p.get("checkpoint") or "unknown"), str(p.get("dtype") or "float32")


def make_baseline(results: Mapping[str, object], margin: float = DEFAULT_MARGIN,
                  floor_fraction: float = DEFAULT_FLOOR_FRACTION, previous: Optional[dict] = None) -> dict:
    """Thresholds (the ``thresholds.json`` document) from honest ``{case: ParityResult}``.

    Per (variant, dtype) and layer group: ``observed`` = the largest rel-L2 of the group over all cases, ``bound`` =
    ``min(max(observed * margin, floor_fraction * dtype_max), dtype_max)``. Entries of ``previous`` for other
    variants/dtypes are kept.

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


def load_thresholds(path: Union[None, str, Path] = None) -> dict:
    """The thresholds document (default: the committed ``parity/thresholds.json``).

    Raises:
        FileNotFoundError: no such file. ValueError: not a thresholds document of schema ``THRESHOLDS_SCHEMA``.
    """
    path = Path(path) if path is not None else THRESHOLDS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file not found: {path}; create it with `parity check --update-baseline`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != THRESHOLDS_SCHEMA or "groups" not in doc:
        raise ValueError(f"{path} is not a parity thresholds file (schema_version {THRESHOLDS_SCHEMA} with 'groups')")
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
    """

    regressions: list[Regression] = field(default_factory=list)
    first_divergent: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no layer regressed, every case was covered by thresholds, and at least one case ran."""
        return bool(self.cases) and not self.regressions and not self.missing

    def to_dict(self) -> dict:
        """JSON-safe dict (with ``passed``)."""
        d = asdict(self)
        d["passed"] = self.passed
        return d


def evaluate(results: Mapping[str, object], thresholds: Optional[dict] = None) -> CheckOutcome:
    """Judge ``{case: ParityResult}`` against ``thresholds`` (default: ``load_thresholds()``).

    A layer regresses when the engine failed it (its dtype tolerance, a shape mismatch, a module that did not run)
    or its rel-L2 exceeds the bound of its group. A group without a committed bound is judged by the dtype
    tolerance alone; a (variant, dtype) without any thresholds is reported in ``missing`` and fails the check.
    """
    doc = thresholds if thresholds is not None else load_thresholds()
    out = CheckOutcome(cases=list(results))
    for case, result in results.items():
        variant, dtype = _key(result)
        table = doc["groups"].get(f"{variant}/{dtype}")
        if table is None and f"{variant}/{dtype}" not in out.missing:
            out.missing.append(f"{variant}/{dtype}")
        for r in result.layers:
            g = layer_group(r.name)
            bound = None if table is None or g not in table else float(table[g]["bound"])
            rel = None if r.diff is None else float(r.diff.rel_l2)
            if not r.passed:
                out.regressions.append(Regression(case, r.name, g, rel, bound, r.reason or "failed"))
            elif bound is not None and rel is not None and (math.isnan(rel) or rel > bound):
                out.regressions.append(Regression(case, r.name, g, rel, bound,
                                                  f"rel_l2 {rel:.3g} > committed bound {bound:.3g}"))
        out.first_divergent[case] = next((x.layer for x in out.regressions if x.case == case), None)
    return out


def write_check_report(outcome: CheckOutcome, out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``parity-check.json`` and ``parity-check.md`` (verdict, first divergent layer per case, regressions).

    Returns ``(json_path, md_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / CHECK_JSON, out / CHECK_MD
    jp.write_text(json.dumps(outcome.to_dict(), indent=2) + "\n")
    lines = [f"# Parity check: {'PASS' if outcome.passed else 'FAIL'}", ""]
    for case in outcome.cases:
        first = outcome.first_divergent.get(case)
        lines.append(f"- `{case}`: first divergent layer: {first or 'none'}")
    if outcome.missing:
        lines += ["", "No committed thresholds for: " + ", ".join(outcome.missing) +
                  " (run `parity check --update-baseline` on a known-good model)"]
    if outcome.regressions:
        lines += ["", "## Regressions (execution order per case)", "",
                  "| case | layer | rel-L2 | bound | reason |", "|---|---|---|---|---|"]
        for r in outcome.regressions:
            rel = "-" if r.rel_l2 is None else f"{r.rel_l2:.3e}"
            bound = "-" if r.bound is None else f"{r.bound:.3e}"
            lines.append(f"| {r.case} | `{r.layer}` | {rel} | {bound} | {r.reason.replace('|', '/')} |")
    mp.write_text("\n".join(lines) + "\n")
    return jp, mp


def load_suite(path: Union[str, Path]) -> dict:
    """``{case: ParityResult}`` from a merged ``parity-suite.json`` written by the pytest plugin.

    Raises:
        FileNotFoundError / ValueError: missing or malformed file.
    """
    from parity.compare import ParityResult

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite results not found: {path} (did the parity suite run with the plugin?)")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or "results" not in doc:
        raise ValueError(f"{path} is not a merged parity suite file (no 'results')")
    return {name: ParityResult.from_dict(d) for name, d in doc["results"].items()}


def run_check(out_dir: Union[str, Path] = "parity-report", workers: str = "auto",
              thresholds: Union[None, str, Path] = None, update_baseline: bool = False,
              pytest_args: Sequence[str] = ()) -> int:
    """Run the CPU parity suite with pytest and gate it; returns the exit status (0 pass, 1 regression/failure).

    Runs ``python -m pytest <parity/tests> -m "not gpu" -n WORKERS --junitxml OUT/junit.xml --parity-report OUT``,
    loads the plugin's merged ``OUT/parity-suite.json``, ``evaluate``s it against ``thresholds`` and writes
    ``OUT/parity-check.{md,json}``. The thresholds file is loaded before pytest runs, and the previous run's suite
    report in ``OUT`` is deleted first, so a run that records nothing fails instead of judging stale results.
    With ``update_baseline`` the thresholds file is rewritten from the results instead, only when pytest exited 0 and
    every case passed (a missing thresholds file is then created).

    Raises:
        FileNotFoundError: ``thresholds`` given (or the committed file) and absent, without ``update_baseline``.
        ValueError: ``thresholds`` is not a thresholds document.
    """
    from parity.report import SUITE_MD, SUITE_PNG

    path = Path(thresholds) if thresholds else THRESHOLDS_PATH
    doc = load_thresholds(path) if not update_baseline or path.is_file() else None
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (SUITE_JSON, SUITE_MD, SUITE_PNG):
        (out / stale).unlink(missing_ok=True)
    suite_dir = Path(__file__).with_name("tests")
    cmd = [sys.executable, "-m", "pytest", str(suite_dir), "-m", "not gpu", "-q", "-p", "no:cacheprovider",
           "--junitxml", str(out / "junit.xml"), "--parity-report", str(out)]
    if workers and workers != "0":
        cmd += ["-n", str(workers)]
    if not _plugin_installed():
        cmd[3:3] = ["-p", "parity.plugin"]
    cmd += list(pytest_args)
    print("parity check:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=str(suite_dir.parent.parent))
    if not (out / SUITE_JSON).is_file():
        print(f"parity check: error: pytest (exit {rc}) recorded no parity results in {out / SUITE_JSON}",
              file=sys.stderr)
        return 1
    try:
        results = load_suite(out / SUITE_JSON)
    except ValueError as err:
        print(f"parity check: error: {err}", file=sys.stderr)
        return 1
    if update_baseline:
        if rc != 0:
            print(f"parity check: error: pytest exited {rc}; baseline NOT written to {path}", file=sys.stderr)
            return 1
        try:
            new_doc = make_baseline(results, previous=doc)
        except ValueError as err:
            print(f"parity check: error: {err}; baseline NOT written", file=sys.stderr)
            return 1
        path.write_text(json.dumps(new_doc, indent=2) + "\n")
        print(f"parity check: baseline written to {path}")
        return 0
    outcome = evaluate(results, doc)
    jp, mp = write_check_report(outcome, out)
    for case in outcome.cases:
        print(f"  {case}: first divergent layer: {outcome.first_divergent.get(case) or 'none'}")
    for r in outcome.regressions[:20]:
        print(f"  REGRESSION {r.case} {r.layer}: {r.reason}")
    print(f"parity check: {'PASS' if outcome.passed and rc == 0 else 'FAIL'} (pytest exit {rc}); "
          f"report {mp}, junit {out / 'junit.xml'}")
    return 0 if outcome.passed and rc == 0 else 1


def _plugin_installed() -> bool:
    """Whether the ``pytest11`` entry point of this package is installed (else the check loads it with ``-p``)."""
    from importlib.metadata import entry_points

    return any(ep.value == "parity.plugin" for ep in entry_points(group="pytest11"))
