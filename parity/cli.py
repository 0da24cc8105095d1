"""``parity``: command line over the parity library (pathmap, pair, compare, report); no logic of its own.

    parity map [--variant tiny] [--expand]
    parity diff [--layer NAME ...] [--variant tiny | --checkpoint DIR] [--audio PATH ...] [--prompt TEXT]
                [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--seed N] [--report-dir DIR] [--threads N]
                [--mode eager|compiled|drift] [--compile-backend inductor|aot_eager|eager] [--attribute]
    parity compile-report [--variant tiny] [--seed N] [--audio PATH]
    parity generate [--variant tiny | --checkpoint DIR] [--audio PATH ...] [--text-only] [--max-new-tokens N] ...
    parity recheck REPORT.json [--atol X] [--rtol X] [--max-rel-l2 X] [--min-cosine X] [--report-dir DIR]
    parity check [--out DIR] [-n WORKERS] [--thresholds JSON] [--update-baseline]
    parity report RESULT.json [--out DIR]

Exit codes: 0 the requested layers pass, 1 one of them fails, 2 a usage error (unknown layer, missing audio file,
bad checkpoint folder, bad option, unwritable report folder); errors are one line on stderr, never a traceback.
``--mode compiled/drift`` hitting dynamo's recompile limit (``torch._dynamo.exc.FailOnRecompileLimitHit``, raised on
purpose instead of a silent eager fallback) exits 1 with a one-line error: the command was valid but produced no
verdict, so a gate must not pass it and it is not the caller's typo. Any other exception from inside the engine
(a TypeError from a bug, say) is left to surface with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from tabulate import tabulate

__all__ = ["main"]

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# measured: `parity diff --layer encoder.blocks.8 --mode compiled` (tiny, float32), 2-core CPU, torch 2.11: 6 min 19 s
# wall with inductor (a test run shared the cores part of the time), ~40 s with backend eager. Inductor generates C++
# for the whole hooked encoder of each side (16 unrolled blocks, ~100 hooked outputs); compiling one block and
# reusing its graph does not apply while capture hooks differ per block (each block's hooks are distinct closures,
# so dynamo recompiles per block and hits its recompile limit of 8).
_INDUCTOR_TIME = "~6 min"


class _UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parity",
        description="Layer-by-layer parity of the FMS Granite Speech model against the HF transformers reference.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{map,diff,recheck,check,report,compile-report,generate}")

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
    p_diff.add_argument("--mode", default="eager", choices=("eager", "compiled", "drift"),
                        help="eager: HF eager vs FMS eager (default); compiled: both sides torch.compile'd, FMS vs "
                             "HF; drift: each side compiled vs itself eager (HF and FMS drift per layer). Compiled "
                             "modes on the tiny encoder, 2-core CPU: ~35 s with --compile-backend eager (dynamo "
                             "tracing of 16 blocks per side), " + _INDUCTOR_TIME + " with inductor (C++ codegen)")
    p_diff.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend of --mode compiled/drift (default: inductor)")
    p_diff.add_argument("--attribute", action="store_true",
                        help="also run parity.attribution.attribute (eager): propagated vs introduced rel-L2 per "
                             "block, first introducing layer; added to the report JSON and Markdown")

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

    p_cr = sub.add_parser("compile-report", help="torch._dynamo.explain of the FMS encoder, projector and decoder: "
                                                 "graphs, breaks, ops, reasons; exit 1 on any graph break")
    p_cr.add_argument("--variant", default="tiny", help="named config for random weights (default: tiny)")
    p_cr.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p_cr.add_argument("--audio", default=None, metavar="PATH", help="WAV file (default: the shipped clip)")

    from parity.generation import add_cli as add_generate

    add_generate(sub)

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
        if getattr(args, "func", None) is not None:  # sub-commands registered by other modules (generate)
            return args.func(args)
        return {"map": _cmd_map, "diff": _cmd_diff, "recheck": _cmd_recheck, "check": _cmd_check,
                "report": _cmd_report, "compile-report": _cmd_compile_report}[args.command](args)
    except _UsageError as err:
        print(f"parity {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 -- only dynamo's recompile limit is turned into a one-line error
        if not _is_recompile_limit(err):
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"parity {args.command}: error: torch.compile hit its recompile limit ({first}); compare fewer layers "
              "(--layer) or use --mode eager", file=sys.stderr)
        return EXIT_FAIL


def _is_recompile_limit(err: BaseException) -> bool:
    """``err`` is dynamo's ``FailOnRecompileLimitHit`` (looked up lazily: torch is not imported for ``map``)."""
    exc = sys.modules.get("torch._dynamo.exc")
    cls = getattr(exc, "FailOnRecompileLimitHit", None)
    return cls is not None and isinstance(err, cls)


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
    from parity.report import (DEFAULT_REPORT_DIR, attribution_table, drift_table, format_table, summary_lines,
                               write_report)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # from_pretrained's per-file progress bars would bury the table
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        pair = build_pair(variant=args.variant, checkpoint=args.checkpoint, seed=args.seed, dtype=args.dtype,
                          device=args.device)
        inputs = build_inputs(pair, audio=args.audio, prompt=args.prompt or DEFAULT_PROMPT)
        result = run_parity(pair, inputs, layers=args.layer, mode=args.mode, compile_backend=args.compile_backend)
        if args.attribute:
            from parity.attribution import attribute

            result.attribution = attribute(pair, inputs, layers=args.layer).to_dict()
    except (ValueError, FileNotFoundError) as err:
        raise _UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    finally:
        torch.set_num_threads(threads)

    source = f"checkpoint {args.checkpoint}" if args.checkpoint else f"variant {args.variant}, seed {args.seed}"
    mode = args.mode if args.mode == "eager" else f"{args.mode}, backend {args.compile_backend}"
    print(f"parity diff {' '.join(args.layer or ['(whole model)'])}: {source}, {args.dtype} on {pair.device}, "
          f"audio {', '.join(inputs.audio)}, mode {mode}")
    print(drift_table(result) if result.mode == "drift" else format_table(result))
    for line in summary_lines(result):
        print(line)
    if result.attribution is not None:
        print(attribution_table(result.attribution))
    for note in result.notes:
        print(f"note: {note}")
    try:
        json_path, md_path = write_report(result, args.report_dir or DEFAULT_REPORT_DIR)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    print(f"report: {json_path} {md_path}")
    return EXIT_PASS if result.passed else EXIT_FAIL


# -- compile-report -------------------------------------------------------------------------------------------------


def _cmd_compile_report(args) -> int:
    if args.audio is not None and not Path(args.audio).is_file():
        raise _UsageError(f"audio file not found: {args.audio}")
    _config(args.variant)
    from fms_granite_speech.compile import explain_graph_breaks
    from parity.pair import DEFAULT_PROMPT, build_inputs, build_pair

    try:
        pair = build_pair(variant=args.variant, seed=args.seed)
        inputs = build_inputs(pair, audio=args.audio, prompt=DEFAULT_PROMPT)
        reports = explain_graph_breaks(pair.fms, inputs)
    except (ValueError, FileNotFoundError) as err:
        raise _UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    print(f"parity compile-report: variant {args.variant}, seed {args.seed}, audio {', '.join(inputs.audio)}")
    print(tabulate([r.row() for r in reports], headers=("piece", "graphs", "breaks", "ops", "reasons"),
                   disable_numparse=True))
    breaks = sum(r.graph_break_count for r in reports)
    print(f"graph breaks: {breaks}")
    return EXIT_FAIL if breaks else EXIT_PASS


# -- recheck ----------------------------------------------------------------------------------------------------------


def _cmd_recheck(args) -> int:
    from parity.compare import ParityResult, recheck
    from parity.metrics import Tolerance, default_tolerance
    from parity.pair import parse_dtype
    from parity.report import drift_table, format_table, summary_lines, write_report

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
    print(drift_table(new, names) if new.mode == "drift" else format_table(new, names))
    for line in summary_lines(new):
        print(line)
    out_dir = args.report_dir or str(path.parent) + "-rechecked"
    try:
        json_path, md_path = write_report(new, out_dir)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    print(f"report: {json_path} {md_path}")
    shown = set(names or new.requested)
    # like ParityResult.passed (diff's exit code): in drift mode HF's own drift counts as well
    rows = [r for r in new.layers + new.hf_drift if r.name in shown]
    return EXIT_PASS if all(r.passed for r in rows) else EXIT_FAIL


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
