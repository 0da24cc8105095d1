"""Reports of a ``ParityResult``: a terminal/Markdown table and the ``parity-report/`` folder.

Every format is generated from the JSON form of the result (``write_report`` renders the Markdown from the JSON it
has just written, read back), so the JSON file is the single source and a saved report can be re-rendered or
re-checked (``compare.recheck``) later without the models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Union

from tabulate import tabulate

from parity.compare import LayerResult, ParityResult

__all__ = ["DEFAULT_REPORT_DIR", "format_table", "render_markdown", "summary_lines", "write_report"]

DEFAULT_REPORT_DIR = "parity-report"
JSON_NAME = "parity-report.json"
MD_NAME = "parity-report.md"

HEADERS = ("layer", "max abs", "mean abs", "rel-L2", "cosine", "max ULP", "worst index", "result")


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.{digits}e}" if x != 0 else "0"


def _row(r: LayerResult) -> list[str]:
    d = r.diff
    verdict = "pass" if r.passed else "FAIL"
    if d is None:
        return [r.name, "-", "-", "-", "-", "-", "-", f"{verdict}: {r.error}"]
    cos = "-" if d.cosine is None else f"{d.cosine:.9f}"
    worst = "-" if d.worst_index is None else "(" + ", ".join(map(str, d.worst_index)) + ")"
    transform = f" [x {r.pair.transform}]" if r.pair.transform else ""
    return [r.name + transform, _num(d.max_abs), _num(d.mean_abs), _num(d.rel_l2), cos, str(d.max_ulp), worst,
            verdict]


def format_table(result: ParityResult, names: Optional[Iterable[str]] = None, tablefmt: str = "simple") -> str:
    """A table of per-layer statistics (``HEADERS``), in execution order.

    Args:
        result: the parity result.
        names: layers to show (default: the requested ones).
        tablefmt: a ``tabulate`` format (``"simple"`` for terminals, ``"github"`` for Markdown).
    """
    wanted = set(result.requested if names is None else names)
    rows = [_row(r) for r in result.layers if r.name in wanted]
    return tabulate(rows, headers=HEADERS, tablefmt=tablefmt, disable_numparse=True)


def summary_lines(result: ParityResult) -> list[str]:
    """The verdict in words: requested layers pass/fail, the first divergent layer over everything that ran."""
    req = result.requested_results()
    failed = [r for r in req if not r.passed]
    ran = len(result.layers)
    lines = [f"requested layers: {len(req) - len(failed)}/{len(req)} pass"]
    first = result.first_failure()
    if first is None:
        lines.append(f"first divergent layer: none ({ran} layers compared in {', '.join(result.sections)}; "
                     "every one within tolerance)")
    else:
        lines.append(f"first divergent layer (over {ran} layers compared in {', '.join(result.sections)}): "
                     f"{first.name} -- {first.reason}")
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


def render_markdown(result: ParityResult) -> str:
    """The full Markdown report: verdict, provenance, notes (every transform stated), all layers, exclusions."""
    p, inp = result.provenance, result.inputs
    verdict = "PASS" if result.passed else "FAIL"
    out = [f"# Parity report: {verdict}", ""]
    out += [f"- {line}" for line in summary_lines(result)]
    out += [f"- requested: {', '.join(result.requested[:12])}{' ...' if len(result.requested) > 12 else ''}", ""]
    out += ["## Run", ""]
    rows = [
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
        ("elapsed", f"{result.elapsed_s:.2f} s"),
    ] + [(name, version) for name, version in result.versions.items()]
    out += [tabulate([(k, _md_cell(v)) for k, v in rows], headers=("", ""), tablefmt="github"), ""]
    if result.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    out += ["## Layers (execution order)", "", format_table(result, [r.name for r in result.layers], "github"), ""]
    failures = [r for r in result.layers if not r.passed]
    if failures:
        out += ["## Failures", ""] + [f"- `{r.name}`: {r.reason}" for r in failures] + [""]
    if result.excluded:
        out += ["## Not compared element-wise", ""]
        out += [f"- `{e['name']}` (HF `{e['hf']}`, FMS `{e['fms']}`): {e['reason']}" for e in result.excluded] + [""]
    return "\n".join(out)


def write_report(result: ParityResult, out_dir: Union[str, Path] = DEFAULT_REPORT_DIR) -> tuple[Path, Path]:
    """Write ``parity-report.json`` and ``parity-report.md`` into ``out_dir`` (created if needed).

    The Markdown is rendered from the JSON just written, read back, so both always agree.

    Returns:
        ``(json_path, markdown_path)``.

    Raises:
        ValueError: ``out_dir`` exists and is not a folder, or cannot be created/written (the OS reason is given).
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / JSON_NAME
        json_path.write_text(result.to_json() + "\n")
        md_path = out / MD_NAME
        md_path.write_text(render_markdown(ParityResult.from_json(json_path.read_text())))
    except (FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError) as err:
        raise ValueError(f"cannot write the parity report to {out}: {err}") from None
    return json_path, md_path
