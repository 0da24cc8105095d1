"""Reports of a ``ParityResult``: a terminal/Markdown table and the ``parity-report/`` folder.

Every format is generated from the JSON form of the result (``write_report`` renders the Markdown from the JSON it
has just written, read back), so the JSON file is the single source and a saved report can be re-rendered or
re-checked (``compare.recheck``) later without the models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from tabulate import tabulate

from parity.pathmap import DEPTH_ROWS, template_of
from parity.result import LayerResult, ParityResult

__all__ = [
    "DEFAULT_REPORT_DIR",
    "attribution_markdown",
    "attribution_table",
    "depth_series",
    "drift_table",
    "environment",
    "format_table",
    "plot_depth",
    "regenerate",
    "render_markdown",
    "result_mode",
    "summary_lines",
    "write_report",
    "write_suite_report",
]

DEFAULT_REPORT_DIR = "parity-report"
JSON_NAME = "parity-report.json"
MD_NAME = "parity-report.md"
PNG_NAME = "parity-report.png"
SUITE_JSON, SUITE_MD, SUITE_PNG = "parity-suite.json", "parity-suite.md", "parity-depth.png"
REL_L2_FLOOR = 1e-12  # where an exact match (rel-L2 == 0) is drawn on the log axis

HEADERS = ("layer", "rel-L2", "bound", "introduced", "intro bound", "obs/bound", "mismatched", "max abs",
           "max ULP", "result")
HEADERS_FULL = HEADERS[:-1] + ("mean abs", "cosine", "worst index", "result")


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.{digits}e}" if x != 0 else "0"


def _ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _mismatched(d) -> str:
    """Mismatched elements as ``torch.testing.assert_close`` counts them with its default tolerances."""
    if d is None:
        return "-"
    pct = 100.0 * d.mismatched / d.numel if d.numel else 0.0
    return f"{d.mismatched} ({pct:.1f}%)"


def _verdict(r: LayerResult) -> str:
    if r.passed:
        return "pass"
    if r.error is not None:
        return f"FAIL: {r.error}"
    return "FAIL (introduced here)" if r.introduces else "FAIL (propagated)"


def _row(r: LayerResult, full: bool = False) -> list[str]:
    d, i = r.diff, r.introduced
    transform = f" [x {r.pair.transform}]" if r.pair.transform else ""
    cells = [r.name + transform, _num(None if d is None else d.rel_l2),
             _num(None if d is None else d.tolerance.max_rel_l2), _num(None if i is None else i.rel_l2),
             _num(None if i is None else i.tolerance.max_rel_l2), _ratio(r.ratio), _mismatched(d),
             _num(None if d is None else d.max_abs), "-" if d is None else str(d.max_ulp)]
    if full:
        worst = "-" if d is None or d.worst_index is None else "(" + ", ".join(map(str, d.worst_index)) + ")"
        cells += [_num(None if d is None else d.mean_abs), "-" if d is None else f"{d.cosine:.9f}", worst]
    return cells + [_verdict(r)]


def format_table(result: ParityResult, names: Optional[Iterable[str]] = None, tablefmt: str = "simple",
                 full: bool = False) -> str:
    """A table of per-layer statistics, in execution order.

    Columns (``HEADERS``; ``full`` adds mean abs, cosine and the worst element's index): the propagated rel-L2 (both
    models end to end) and its bound, the introduced rel-L2 (the FMS module on HF's exact input) and its bound, the
    larger of observed/bound, the mismatched elements as ``torch.testing.assert_close`` counts them (count and %),
    max abs, max ULP and the verdict (``introduced here`` / ``propagated``).

    Args:
        result: the parity result.
        names: layers to show (default: the requested ones).
        tablefmt: a ``tabulate`` format (``"simple"`` for terminals, ``"github"`` for Markdown).
    """
    wanted = set(result.requested if names is None else names)
    rows = [_row(r, full) for r in result.layers if r.name in wanted]
    return tabulate(rows, headers=HEADERS_FULL if full else HEADERS, tablefmt=tablefmt, disable_numparse=True)


def drift_table(result: ParityResult, names: Optional[Iterable[str]] = None, tablefmt: str = "simple") -> str:
    """Drift-mode table: per layer, HF compiled vs HF eager and FMS compiled vs FMS eager (max abs, rel-L2), and the
    verdict of both. ``names`` as for ``format_table``."""
    wanted = set(result.requested if names is None else names)
    hf = {r.name: r for r in result.hf_drift}

    def cells(r: Optional[LayerResult]) -> list[str]:
        if r is None:
            return ["-", "-"]
        if r.diff is None:
            return ["-", f"error: {r.error}"]
        return [_num(r.diff.max_abs), _num(r.diff.rel_l2)]

    rows = []
    for r in result.layers:
        if r.name in wanted:
            h = hf.get(r.name)
            ok = r.passed and (h is None or h.passed)
            rows.append([r.name] + cells(h) + cells(r) + ["pass" if ok else "FAIL"])
    return tabulate(rows, headers=("layer", "hf drift max abs", "hf drift rel-L2", "fms drift max abs",
                                   "fms drift rel-L2", "result"), tablefmt=tablefmt, disable_numparse=True)


def attribution_table(attribution: Mapping, tablefmt: str = "simple") -> str:
    """Propagated vs introduced rel-L2 per attributed layer of an ``AttributionResult.to_dict()``."""
    rows = [[a["name"], _num(_float(a.get("propagated_rel_l2"))), _num(_float(a.get("introduced_rel_l2"))),
             _num(_float(a.get("budget"))), "OVER" if a.get("over_budget") else "ok"]
            for a in attribution.get("layers", [])]
    table = tabulate(rows, headers=("layer", "propagated rel-L2", "introduced rel-L2", "budget", "introduced"),
                     tablefmt=tablefmt, disable_numparse=True)
    return f"{table}\nfirst introducing layer: {attribution.get('first_introducing_layer') or 'none'}"


def attribution_markdown(attribution: Mapping) -> list[str]:
    """The Markdown section of an attribution (``AttributionResult.to_dict()``), as lines."""
    first = attribution.get("first_introducing_layer")
    out = ["## Error attribution (propagated vs introduced)", "",
           f"- first introducing layer: {'`' + first + '`' if first else 'none'}",
           "- propagated: both models end to end; introduced: the FMS block run on HF's exact inputs "
           "(parity.attribution)", ""]
    out += [attribution_table(attribution, "github"), ""]
    return out


def _float(x) -> Optional[float]:
    return None if x is None else float(x)  # "nan"/"inf" strings of strict JSON parse back with float()


def summary_lines(result: ParityResult) -> list[str]:
    """The verdict in words: requested layers pass/fail, the first divergent layer over everything that ran (and
    whether it introduces the error or inherits it), the worst observed/bound, how bounds were set."""
    req = result.requested_results()
    failed = [r for r in req if not r.passed]
    ran = len(result.layers)
    lines = [f"requested layers: {len(req) - len(failed)}/{len(req)} pass"]
    first = result.first_failure()
    if first is None:
        ratios = [(r.ratio, r.name) for r in result.layers if r.ratio is not None]
        worst = max(ratios) if ratios else None
        tail = f"; worst observed/bound {worst[0]:.2f} at {worst[1]}" if worst else ""
        lines.append(f"first divergent layer: none ({ran} layers compared in {', '.join(result.sections)}; "
                     f"every one within its bound{tail})")
    else:
        where = ("introduced here" if first.introduces else
                 "every earlier row agrees" if first.introduced is None and first.pair.kind is None else
                 "its own computation passes; the error reaches it")
        lines.append(f"first divergent layer (over {ran} layers compared in {', '.join(result.sections)}): "
                     f"{first.name} ({where}) -- {first.reason}")
    for r in result.layers:
        if r.explanation:
            lines.append(f"why {r.name}: {r.explanation.get('text')}"
                         + (f" ({r.explanation['note']})" if r.explanation.get("note") else ""))
    if result.reference == "float64":
        lines.append("bounds: from HF's own rounding against a float64 run (reduced precision)")
    elif result.reference == "flat":
        lines.append("bounds: flat per-dtype tolerance (no float64 reference in this run)")
    if result.hf_drift:
        hf_first = next((r for r in result.hf_drift if not r.passed), None)
        lines.append("first HF drift layer (HF compiled vs HF eager): "
                     + ("none" if hf_first is None else f"{hf_first.name} -- {hf_first.reason}"))
    return lines


def _tolerance_line(result: ParityResult) -> str:
    if result.tolerance is None:
        return "per-dtype default (parity.metrics.default_tolerance)"
    t = result.tolerance
    return (f"atol {t['atol']:g}, rtol {t['rtol']:g}, max rel-L2 {t['max_rel_l2']:g}, "
            f"min cosine {t['min_cosine']:.9g}")


def _md_cell(value) -> str:
    """Text for a Markdown table cell: ``|`` (as in ``<|audio|>``) escaped so it does not split the cell."""
    return "" if value is None else str(value).replace("|", "\\|")


def render_markdown(result: ParityResult, png_name: Optional[str] = None) -> str:
    """The full Markdown report: verdict, provenance (environment, versions, config, dtype, device, seed, audio and a
    command that reproduces the run), notes (every transform stated), the depth plot ``png_name`` when given, all
    layers, exclusions."""
    p, inp = result.provenance, result.inputs
    verdict = "PASS" if result.passed else "FAIL"
    out = [f"# Parity report: {verdict}", ""]
    out += [f"- {line}" for line in summary_lines(result)]
    out += [f"- requested: {', '.join(result.requested[:12])}{' ...' if len(result.requested) > 12 else ''}", ""]
    out += ["## Run", ""]
    rows = [
        ("pair", f"{p['hf_class']} (transformers) vs FMS {p.get('fms_architecture')}" if p.get("hf_class") else None),
        ("case", inp.get("case")),
        ("weights", p.get("weights")),
        ("variant", p.get("variant")),
        ("checkpoint", p.get("checkpoint")),
        ("conversion", p.get("conversion")),
        ("dtype", p.get("dtype")),
        ("device", p.get("device")),
        ("seed", p.get("seed")),
        ("LoRA", p.get("lora")),
        ("audio", ", ".join(inp.get("audio") or []) or None),
        ("prompt", inp.get("prompt")),
        ("input_ids", inp.get("input_ids")),
        ("input_features", inp.get("input_features")),
        ("audio tokens", inp.get("audio_tokens")),
        ("sections run", ", ".join(result.sections)),
        ("tolerance", _tolerance_line(result)),
        ("mode", result_mode(result)),
        ("compile backend", result.compile_backend),
        ("compiled", {"whole": "FMS whole forward (compile_model(whole=True))",
                      "pieces": "FMS encoder, projector, decoder apart (compile_model)",
                      "regional": "each repeated block once per kind"}.get(result.compile_scope or "")),
        ("FMS weights", p.get("fms_weights")),
        ("bounds", {"float64": "from HF's own rounding against float64", "flat": "flat per-dtype tolerance"}.get(
            result.reference or "", "per dtype (float32: metrics.default_tolerance)")),
        ("memory", result.memory),
        ("peak memory", ", ".join(f"{k} {v}" for k, v in (result.peak_memory or {}).items()) or None),
        ("elapsed", f"{result.elapsed_s:.2f} s"),
    ] + [(name, version) for name, version in result.versions.items()]
    rows += [(f"env {k}", v) for k, v in (p.get("environment") or {}).items()]
    rows += [("config", _config_line(result.config)), ("reproduce", _reproduce(result))]
    if result.sections == ["model"]:  # a derived-map run (parity.engine): only what the run had (no audio)
        rows = [(k, v) for k, v in rows if v not in (None, "", [])]
    out += [tabulate([(k, _md_cell(v)) for k, v in rows], headers=("", ""), tablefmt="github"), ""]
    if result.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if png_name:
        out += ["## Error against depth", "", f"![rel-L2 against depth]({png_name})", ""]
    names = [r.name for r in result.layers]
    body = drift_table(result, names, "github") if result.mode == "drift" else format_table(result, names, "github",
                                                                                             full=True)
    out += ["## Layers (execution order)", "", body, ""]
    if result.attribution is not None:
        out += attribution_markdown(result.attribution)
    failures = [r for r in result.layers if not r.passed]
    failures += [dataclasses.replace(r, pair=dataclasses.replace(r.pair, name=f"hf drift {r.name}"))
                 for r in result.hf_drift if not r.passed]
    if failures:
        out += ["## Failures", ""] + [f"- `{r.name}`: {r.reason}" for r in failures] + [""]
    if result.excluded:
        out += ["## Not compared element-wise", ""]
        out += [f"- `{e['name']}` (HF `{e['hf']}`, FMS `{e['fms']}`): {e['reason']}" for e in result.excluded] + [""]
    return "\n".join(out)


def write_report(result: ParityResult, out_dir: Union[str, Path] = DEFAULT_REPORT_DIR,
                 add_environment: bool = True) -> tuple[Path, Path]:
    """Write ``parity-report.json``, ``parity-report.md`` and the depth plot ``parity-report.png`` into ``out_dir``.

    The Markdown and the plot are rendered from the JSON just written, read back, so all three always agree. The
    three files are written into a staging folder and moved into ``out_dir`` together (``parity._atomic.staged``):
    a failure on the way leaves an earlier report byte-identical. When the result's provenance has no
    ``environment``, the current process's (``environment()``) is added first: call this right after ``run_parity`` in
    the same process, as the CLI does (``add_environment=False`` to leave it out).

    Returns:
        ``(json_path, markdown_path)``.

    Raises:
        ValueError: ``out_dir`` exists and is not a folder, or cannot be created/written (the OS reason is given).
    """
    from parity._atomic import ReportFolderError, staged

    out = Path(out_dir)
    if add_environment:
        result.provenance.setdefault("environment", environment())
    try:
        with staged(out, (JSON_NAME, MD_NAME, PNG_NAME)) as stage:
            (stage / JSON_NAME).write_text(result.to_json() + "\n")
            saved = ParityResult.from_json((stage / JSON_NAME).read_text())
            plot_depth(_mode_lines(saved), stage / PNG_NAME,
                       title=f"parity: {saved.provenance.get('variant') or saved.provenance.get('checkpoint')}, "
                             f"{saved.provenance.get('dtype')}")
            (stage / MD_NAME).write_text(render_markdown(saved, png_name=PNG_NAME))
    except OSError as err:
        raise ReportFolderError(f"cannot write the parity report to {out}: {err.strerror or err}") from None
    return out / JSON_NAME, out / MD_NAME


def publish_runs(runs, out_dir: Union[str, Path], json_path: Optional[str], payload: Optional[str]) -> list[Path]:
    """Publish one command's results: ``payload`` (the results' JSON, when ``--json`` asked for it) is written aside
    first, the report (``write_report`` for one run, ``write_suite_report`` for several ``(name, result)``) is
    published, then the JSON file is renamed into place, so a full disk or a failed publish leaves both the earlier
    report and the earlier JSON whole. ``json_path == "-"`` prints ``payload`` instead. Returns the report's paths.

    Raises:
        ValueError / OSError: the report folder or the JSON file cannot be written (nothing was replaced).
    """
    from parity._atomic import stage_file

    to_stdout = json_path == "-"
    json_tmp = stage_file(json_path, payload + "\n") if payload is not None and not to_stdout else None
    try:
        paths = list(write_report(runs[0][1], out_dir) if len(runs) == 1
                     else write_suite_report({name: r for name, r in runs}, out_dir))
    except BaseException:
        if json_tmp is not None:
            json_tmp.unlink(missing_ok=True)
        raise
    if json_tmp is not None:
        os.replace(json_tmp, json_path)
    if to_stdout:
        print(payload)
    return paths


# -- environment, depth plot, suite report, regeneration --------------------------------------------------------------


def environment() -> dict:
    """Where this process runs: OS, machine, CPU count, torch threads, CUDA device name/capability, env knobs.

    Stored in a result's provenance so a run can be reproduced (the library versions are in ``result.versions``).
    """
    import torch

    env = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for var in ("HYPOTHESIS_PROFILE", "CUBLAS_WORKSPACE_CONFIG", "PYTORCH_CUDA_ALLOC_CONF"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def result_mode(result: ParityResult) -> str:
    """The execution mode a result was taken in (``eager``, ``compiled``, ``drift``...): the result's ``mode``
    attribute or ``provenance["mode"]`` when set, else ``eager``."""
    return str(getattr(result, "mode", None) or result.provenance.get("mode") or "eager")


def _mode_lines(result: ParityResult) -> dict[str, ParityResult]:
    """Plot lines of one result: its mode, or in drift mode one line per side (``fms drift``, ``hf drift``)."""
    if result.mode == "drift" and result.hf_drift:
        return {"fms drift": result, "hf drift": dataclasses.replace(result, layers=result.hf_drift, hf_drift=[])}
    return {result_mode(result): result}


def _config_line(config: dict) -> str:
    e, p, d = (config or {}).get("encoder", {}), (config or {}).get("projector", {}), (config or {}).get("decoder", {})
    if not e:
        return "-"
    return (f"encoder {e.get('num_layers')}x{e.get('hidden_dim')} (context {e.get('context_size')}), "
            f"projector {p.get('num_layers')}x{p.get('hidden_size')} (window {p.get('window_size')}), "
            f"decoder {d.get('nlayers')}x{d.get('emb_dim')} (full config in the JSON)")


def _reproduce(result: ParityResult) -> str:
    """The command that repeats the run: the one the CLI recorded, else one rebuilt from the provenance."""
    if result.command:
        return result.command
    p, inp = result.provenance, result.inputs
    cmd = ["parity diff"]
    cmd.append(f"--checkpoint {p['checkpoint']}" if p.get("checkpoint") else f"--variant {p.get('variant')}")
    if p.get("seed") is not None and not p.get("checkpoint"):
        cmd.append(f"--seed {p['seed']}")
    cmd += [f"--dtype {p.get('dtype')}", f"--device {p.get('device')}", f"--mode {result_mode(result)}"]
    if result.compile_backend:
        cmd.append(f"--compile-backend {result.compile_backend}")
    if result.compile_scope not in (None, "regional"):
        cmd.append(f"--compile {result.compile_scope}")
    if str(p.get("fms_weights", "")).startswith("unfused"):
        cmd.append("--unfused")
    if inp.get("case"):
        cmd.append(f"--cases {inp['case']}")
    audio = inp.get("audio") or []
    if audio and all(not a.startswith("tensor[") for a in audio):
        cmd += [f"--audio {a}" for a in audio]
    elif audio and not inp.get("case"):
        cmd.append("(tensor audio: see inputs.audio in the JSON)")
    return " ".join(cmd)


def depth_series(result: ParityResult) -> tuple[list[str], list[Optional[float]]]:
    """(layer names, rel-L2) along the depth of the model: the input projection, each encoder block, each Q-Former
    layer, the projector output, the merged embeddings, each decoder block, the final norm and the logits, in
    execution order. rel-L2 is None where the layer has no diff (it did not run or could not be compared)."""
    names, values = [], []
    derived = result.sections == ["model"]  # a derived-map run (parity.engine): each block and the model output
    for r in result.layers:
        if (derived and r.pair.tensor == "output" and (re.search(r"\.\d+$", r.name) or r.name == "model")) or \
                (not derived and template_of(r.name) in DEPTH_ROWS):
            names.append(r.name)
            values.append(None if r.diff is None else float(r.diff.rel_l2))
    return names, values


def plot_depth(results: Mapping[str, ParityResult], path: Union[str, Path], title: str = "parity") -> Path:
    """PNG of rel-L2 (log scale) against depth: one line per entry of ``results`` (label -> result; a mode such as
    ``eager`` / ``compiled`` / ``drift``), sections separated by vertical lines, each line's first failing depth
    point circled. Exact matches (rel-L2 0) are drawn at ``REL_L2_FLOOR``. Uses matplotlib's Agg backend.

    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    order: list[str] = []
    for res in results.values():
        for n in depth_series(res)[0]:
            if n not in order:
                order.append(n)
    x_of = {n: k for k, n in enumerate(order)}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * len(order) + 3), 4.5), dpi=110)
    for label, res in results.items():
        names, vals = depth_series(res)
        xs = [x_of[n] for n, v in zip(names, vals) if v is not None and not math.isnan(v)]
        ys = [max(v, REL_L2_FLOOR) for v in vals if v is not None and not math.isnan(v)]
        line, = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=label)
        failed = {r.name for r in res.layers if not r.passed}
        bad = [(x_of[n], max(v, REL_L2_FLOOR)) for n, v in zip(names, vals) if n in failed and v is not None
               and not math.isnan(v)]
        if bad:
            ax.plot(*bad[0], marker="o", markersize=10, markerfacecolor="none", color=line.get_color())
    ax.set_yscale("log")
    ax.set_ylabel("rel-L2 (FMS vs HF)")
    ax.set_title(title)
    edges, last = [], None
    for k, n in enumerate(order):
        sec = n.split(".", 1)[0] if n != "logits" else "decoder"
        if last is not None and sec != last:
            edges.append((k - 0.5, sec))
        last = sec
    for x, sec in edges:
        ax.axvline(x, color="0.6", linestyle="--", linewidth=0.8)
    for sec, start in [("encoder", 0)] + [(s, x + 0.5) for x, s in edges]:
        ax.text(start, 1.02, sec, transform=ax.get_xaxis_transform(), fontsize=8, color="0.35")
    step = max(1, len(order) // 40)
    ticks = list(range(0, len(order), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short(order[t]) for t in ticks], rotation=70, fontsize=7)
    ax.axhline(REL_L2_FLOOR, color="0.85", linewidth=0.6)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.text(len(order) - 0.5, REL_L2_FLOOR, "exact (0)", fontsize=7, color="0.45", ha="right", va="bottom")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return (name.replace("encoder.blocks.", "enc.").replace("projector.layers.", "qf.")
            .replace("decoder.layers.", "dec.").replace("decoder.merged_embeddings", "embed")
            .replace("encoder.input_linear", "enc.in").replace("decoder.norm", "norm"))


def _plot_labels(results: Mapping[str, ParityResult]) -> dict[str, ParityResult]:
    """One plot label per result: its mode when the modes are distinct, else ``name (mode)``."""
    modes = [result_mode(r) for r in results.values()]
    if len(set(modes)) == len(modes):
        return {m: r for m, r in zip(modes, results.values())}
    return {f"{name} ({result_mode(r)})": r for name, r in results.items()}


def write_suite_report(results: Mapping[str, ParityResult], out_dir: Union[str, Path] = DEFAULT_REPORT_DIR
                       ) -> tuple[Path, Path, Path]:
    """ONE report for many results (a parity suite): ``parity-suite.json`` ({name: result}), ``parity-suite.md``
    (a verdict line per result, then each result's full report) and ``parity-depth.png`` (every result on one
    depth plot). The Markdown and plot are rendered from the JSON read back; the three files are moved into
    ``out_dir`` together (``parity._atomic.staged``).

    Returns ``(json_path, md_path, png_path)``.

    Raises:
        ValueError: ``results`` is empty, or ``out_dir`` cannot be written.
    """
    from parity._atomic import ReportFolderError, staged

    if not results:
        raise ValueError("write_suite_report needs at least one ParityResult")
    out = Path(out_dir)
    try:
        with staged(out, (SUITE_JSON, SUITE_MD, SUITE_PNG)) as stage:
            jp = stage / SUITE_JSON
            jp.write_text(json.dumps({"results": {k: v.to_dict() for k, v in results.items()}}, indent=1,
                                     allow_nan=False) + "\n")
            _render_suite(jp, stage)
    except OSError as err:
        raise ReportFolderError(f"cannot write the parity suite report to {out}: {err.strerror or err}") from None
    return out / SUITE_JSON, out / SUITE_MD, out / SUITE_PNG


def _render_suite(json_path: Path, out: Path) -> tuple[Path, Path]:
    doc = json.loads(json_path.read_text())
    results = {k: ParityResult.from_dict(v) for k, v in doc["results"].items()}
    png = plot_depth(_plot_labels(results), out / SUITE_PNG, title=f"parity suite ({len(results)} results)")
    ok = all(r.passed for r in results.values())
    lines = [f"# Parity suite: {'PASS' if ok else 'FAIL'}", "", f"![rel-L2 against depth]({SUITE_PNG})", "",
             "| result | mode | variant | dtype | verdict | first divergent layer |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r.provenance
        lines.append(f"| {_md_cell(name)} | {result_mode(r)} | {p.get('variant') or p.get('checkpoint')} | "
                     f"{p.get('dtype')} | {'pass' if r.passed else 'FAIL'} | {r.first_divergent or 'none'} |")
    for name, r in results.items():
        body = render_markdown(r).replace("# Parity report", "## Parity report", 1).replace("\n## ", "\n### ")
        lines += ["", f"# {_md_cell(name)}", "", body.replace("### Parity report", "## Parity report", 1)]
    md = out / SUITE_MD
    md.write_text("\n".join(lines) + "\n")
    return md, png


def regenerate(json_path: Union[str, Path], out_dir: Union[None, str, Path] = None) -> list[Path]:
    """Re-render the Markdown and PNG of a saved report from its JSON alone (no model is built).

    ``json_path`` is a single result (``parity-report.json``) or a merged suite (``parity-suite.json``); ``out_dir``
    defaults to the JSON's folder (a copy of the JSON is written there when it differs).

    Returns the paths written. Raises:
        FileNotFoundError: no such file. ValueError: neither a parity result nor a suite file.
    """
    src = Path(json_path)
    if not src.is_file():
        raise FileNotFoundError(f"report JSON not found: {src}")
    out = Path(out_dir) if out_dir is not None else src.parent
    try:
        text = src.read_text()
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{src} is not a parity result: not JSON ({err})") from None
    if isinstance(doc, dict) and "results" in doc and "layers" not in doc:
        if not isinstance(doc["results"], dict) or not doc["results"]:
            raise ValueError(f"{src} is not a parity suite result: 'results' is not a non-empty object")
        try:
            results = {k: ParityResult.from_dict(v) for k, v in doc["results"].items()}
        except ValueError as err:
            raise ValueError(f"{src}: {err}") from None
        return list(write_suite_report(results, out))
    try:
        result = ParityResult.from_dict(doc)
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from None
    return list(write_report(result, out, add_environment=False)) + [out / PNG_NAME]
