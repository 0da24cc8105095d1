"""``parity``: command line over the parity library (pathmap, pair, compare, report); no logic of its own.

    parity map [--variant tiny] [--expand]
    parity diff [--layer NAME ...] [--variant tiny | --checkpoint DIR] [--audio PATH ...] [--prompt TEXT]
                [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--seed N] [--report-dir DIR] [--threads N]
    parity recheck REPORT.json [--atol X] [--rtol X] [--max-rel-l2 X] [--min-cosine X] [--report-dir DIR]
    parity check [--out DIR] [-n WORKERS] [--thresholds JSON] [--update-baseline]
    parity report RESULT.json [--out DIR]

Exit codes: 0 the requested layers pass, 1 one of them fails, 2 a usage error (unknown layer, missing audio file,
bad checkpoint folder, bad option); errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from tabulate import tabulate

__all__ = ["main"]

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parity",
        description="Layer-by-layer parity of the FMS Granite Speech model against the HF transformers reference.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{map,diff,recheck,check,report}")

    p_map = sub.add_parser("map", help="print the HF <-> FMS module-path map")
    p_map.add_argument("--variant", default="tiny", help="config whose layer counts fill the map (default: tiny)")
    p_map.add_argument("--expand", action="store_true", help="one row per concrete layer, in execution order")

    p_diff = sub.add_parser("diff", help="run both models and compare a layer and its sub-modules")
    p_diff.add_argument("--layer", action="append", default=None, metavar="NAME",
                        help="parity layer name, e.g. encoder.blocks.8 (repeatable; default: the whole model)")
    p_diff.add_argument("--variant", default="tiny", help="named config for random weights (default: tiny)")
    p_diff.add_argument("--checkpoint", default=None, metavar="DIR", help="HF-format checkpoint folder")
    p_diff.add_argument("--audio", action="append", default=None, metavar="PATH",
                        help="WAV file (repeatable; default: the shipped clip)")
    p_diff.add_argument("--prompt", default=None, help="prompt with one <|audio|> per clip")
    p_diff.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p_diff.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p_diff.add_argument("--seed", type=int, default=0, help="weight seed for random weights (default: 0)")
    p_diff.add_argument("--report-dir", default=None, metavar="DIR", help="where the report goes "
                        "(default: parity-report/)")
    p_diff.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU intra-op threads (default: torch's); 1 is fastest for the tiny model on a busy host")

    p_re = sub.add_parser("recheck", help="re-judge a saved parity-report.json against new tolerances")
    p_re.add_argument("report", metavar="REPORT.json")
    for flag in ("--atol", "--rtol", "--max-rel-l2", "--min-cosine"):
        p_re.add_argument(flag, type=float, default=None)
    p_re.add_argument("--layer", action="append", default=None, metavar="NAME", help="layers to show")
    p_re.add_argument("--report-dir", default=None, metavar="DIR",
                      help="write the rechecked report here (default: next to REPORT.json, suffixed -rechecked)")
    p_check = sub.add_parser("check", help="pre-merge gate: run the CPU parity suite against parity/thresholds.json")
    p_check.add_argument("--out", default="parity-report", metavar="DIR",
                         help="report, JUnit XML and check verdict go here (default: parity-report/)")
    p_check.add_argument("-n", "--workers", default="auto", help="pytest-xdist workers (default: auto; 0: none)")
    p_check.add_argument("--thresholds", default=None, metavar="JSON", help="default: the committed parity/thresholds.json")
    p_check.add_argument("--update-baseline", action="store_true",
                         help="rewrite the thresholds from this run (only when every case passes)")

    p_rep = sub.add_parser("report", help="regenerate the Markdown and PNG of a saved report from its JSON")
    p_rep.add_argument("result", metavar="RESULT.json", help="parity-report.json or parity-suite.json")
    p_rep.add_argument("--out", default=None, metavar="DIR", help="default: the JSON's folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code (0 pass, 1 fail, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    try:
        return {"map": _cmd_map, "diff": _cmd_diff, "recheck": _cmd_recheck,
                "check": _cmd_check, "report": _cmd_report}[args.command](args)
    except _UsageError as err:
        print(f"parity {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


# -- map --------------------------------------------------------------------------------------------------------------


def _config(variant: str):
    from fms_granite_speech.config import get_config

    try:
        return get_config(variant)
    except ValueError as err:
        raise _UsageError(str(err)) from None


def _cmd_map(args) -> int:
    from parity import pathmap

    config = _config(args.variant)
    if args.expand:
        rows = [(p.name, p.hf, p.fms or "<model output>", p.tensor, p.transform or "")
                for p in pathmap.expand(config)]
        print(tabulate(rows, headers=("parity name", "HF module", "FMS module", "tensor", "transform")))
    else:
        counts = {"encoder.blocks": config.encoder.num_layers, "projector.layers": config.projector.num_layers,
                  "decoder.layers": config.decoder.nlayers}

        def index_range(name: str) -> str:
            for prefix, n in counts.items():
                if name.startswith(prefix + ".{}"):
                    return f"0..{n - 1}"
            return ""

        rows = [(e.name, e.hf, e.fms or "<model output>", e.tensor, e.transform or "", index_range(e.name))
                for e in pathmap.PATH_MAP]
        print(f"HF <-> FMS path map ({args.variant}: {len(pathmap.expand(config))} comparable layers)")
        print(tabulate(rows, headers=("parity name", "HF module", "FMS module", "tensor", "transform", "{}")))
    print("\ntransforms (applied to the FMS tensor, stated in every report):")
    for name, text in pathmap.TRANSFORMS.items():
        print(f"  {name}: {text}")
    print("\nnot compared element-wise:")
    for e in pathmap.EXCLUDED:
        print(f"  {e.name}: {e.reason}")
    return EXIT_PASS


# -- diff -------------------------------------------------------------------------------------------------------------


def _cmd_diff(args) -> int:
    from parity import pathmap

    if args.checkpoint is None:  # fail fast on a bad layer name, before building any model
        config = _config(args.variant)
        for name in args.layer or []:
            try:
                pathmap.resolve(name, config)
            except pathmap.UnknownLayerError as err:
                raise _UsageError(str(err)) from None
    for path in args.audio or []:
        if not Path(path).is_file():
            raise _UsageError(f"audio file not found: {path}")

    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")

    import torch

    from parity.compare import run_parity
    from parity.pair import DEFAULT_PROMPT, build_inputs, build_pair
    from parity.report import DEFAULT_REPORT_DIR, format_table, summary_lines, write_report

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # from_pretrained's per-file progress bars would bury the table
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        pair = build_pair(variant=args.variant, checkpoint=args.checkpoint, seed=args.seed, dtype=args.dtype,
                          device=args.device)
        inputs = build_inputs(pair, audio=args.audio, prompt=args.prompt or DEFAULT_PROMPT)
        result = run_parity(pair, inputs, layers=args.layer)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    finally:
        torch.set_num_threads(threads)

    source = f"checkpoint {args.checkpoint}" if args.checkpoint else f"variant {args.variant}, seed {args.seed}"
    print(f"parity diff {' '.join(args.layer or ['(whole model)'])}: {source}, {args.dtype} on {pair.device}, "
          f"audio {', '.join(inputs.audio)}")
    print(format_table(result))
    for line in summary_lines(result):
        print(line)
    for note in result.notes:
        print(f"note: {note}")
    try:
        json_path, md_path = write_report(result, args.report_dir or DEFAULT_REPORT_DIR)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    print(f"report: {json_path} {md_path}")
    return EXIT_PASS if result.passed else EXIT_FAIL


# -- recheck ----------------------------------------------------------------------------------------------------------


def _cmd_recheck(args) -> int:
    from parity.compare import ParityResult, recheck
    from parity.metrics import Tolerance, default_tolerance
    from parity.pair import parse_dtype
    from parity.report import format_table, summary_lines, write_report

    path = Path(args.report)
    if not path.is_file():
        raise _UsageError(f"report not found: {path}")
    try:
        result = ParityResult.from_json(path.read_text())
        base = (Tolerance.from_dict(result.tolerance) if result.tolerance is not None
                else default_tolerance(parse_dtype(result.provenance.get("dtype", "float32"))))
        overrides = {k: getattr(args, k) for k in ("atol", "rtol", "max_rel_l2", "min_cosine")
                     if getattr(args, k) is not None}
        tol = Tolerance(**{**base.to_dict(), **overrides})
    except (ValueError, TypeError, KeyError) as err:
        raise _UsageError(f"{path}: {err}") from None
    new = recheck(result, tol)
    names = None
    if args.layer:
        names = [r.name for r in new.layers if any(r.name == n or r.name.startswith(n + ".") for n in args.layer)]
        if not names:
            raise _UsageError(f"none of {args.layer} is in {path}")
    print(format_table(new, names))
    for line in summary_lines(new):
        print(line)
    out_dir = args.report_dir or str(path.parent) + "-rechecked"
    json_path, md_path = write_report(new, out_dir)
    print(f"report: {json_path} {md_path}")
    shown = [r for r in new.layers if r.name in set(names or new.requested)]
    return EXIT_PASS if all(r.passed for r in shown) else EXIT_FAIL


# -- check / report ---------------------------------------------------------------------------------------------------


def _cmd_check(args) -> int:
    from parity.check import run_check

    try:
        return run_check(out_dir=args.out, workers=args.workers, thresholds=args.thresholds,
                         update_baseline=args.update_baseline)
    except (FileNotFoundError, ValueError) as err:
        raise _UsageError(str(err)) from None


def _cmd_report(args) -> int:
    from parity.report import regenerate

    try:
        paths = regenerate(args.result, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise _UsageError(str(err)) from None
    print("report: " + " ".join(str(p) for p in paths))
    return EXIT_PASS


if __name__ == "__main__":
    sys.exit(main())
