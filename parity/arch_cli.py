"""The ``--architecture NAME`` forms of ``parity map`` and ``parity diff``: any registered model pair
(``parity.models.ARCHITECTURES``) through its map derived from FMS's adapter (``parity.derive``, ``parity.engine``).

Exit codes as in ``parity.cli``: 0 pass, 1 a verdict of failure (a row diverges, or a step of building the pair fails:
FMS cannot build or load transformers' model, which a porter must be told, not a skip), 2 a usage error.
"""

from __future__ import annotations

import shlex
from typing import Sequence

__all__ = ["GRANITE_SPEECH_ONLY", "diff", "map_"]

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# options of `parity diff` that belong to the Granite Speech pair (audio, its engine's modes)
GRANITE_SPEECH_ONLY = {"audio": "--audio", "prompt": "--prompt", "same_inputs": "--same-inputs",
                       "distributed": "--distributed", "explain": "--explain", "repro": "--repro",
                       "save_activations": "--save-activations", "attribute": "--attribute"}
_DEFAULTS = {"mode": ("eager", "--mode"), "memory": ("auto", "--memory"), "reference": ("auto", "--reference"),
             "device": ("cpu", "--device")}


def check(args, found: list[str]) -> list[str]:
    """Problems of an ``--architecture`` command line (appended to ``found``); returns the cases to run."""
    from parity.models import CASES, plugin

    try:
        p = plugin(args.architecture)
    except ValueError as err:
        found.append(str(err))
        return []
    for attr, flag in GRANITE_SPEECH_ONLY.items():
        if getattr(args, attr, None):
            found.append(f"{flag} belongs to the Granite Speech pair; drop it with --architecture")
    for attr, (default, flag) in _DEFAULTS.items():
        if getattr(args, attr, default) != default:
            found.append(f"{flag} {getattr(args, attr)} is not available with --architecture (eager, CPU, both "
                         "models held, float64 bounds)")
    if getattr(args, "dtype", "float32") == "float64":
        found.append("--dtype float64 is the bounds' reference; compare float32, bfloat16 or float16")
    variant = getattr(args, "variant", None)
    if variant and variant not in p.variants:
        found.append(f"unknown variant {variant!r} of {p.name}; known: {', '.join(p.variants)}")
    if variant and getattr(args, "checkpoint", None):
        found.append("give --variant or --checkpoint, not both")
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        from pathlib import Path

        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            found.append(f"checkpoint folder not found: {checkpoint}" if not folder.exists()
                         else f"--checkpoint {checkpoint} is a file, not a checkpoint folder")
        elif not (folder / "config.json").is_file():
            found.append(f"{checkpoint} has no config.json: not an HF checkpoint folder (give the folder "
                         "save_pretrained wrote)")
    cases_arg = getattr(args, "cases", None)
    if cases_arg is None:
        return [p.default_case]
    if cases_arg.strip() == "all":
        return None  # every case that applies to the pair (known once it is built)
    known = list(CASES) + [c for c in getattr(p, "CLIPS", {}) if c not in CASES]
    cases = [c.strip() for c in cases_arg.split(",") if c.strip()]
    unknown = [c for c in cases if c not in known]
    if unknown or not cases:
        found.append(f"unknown case(s) {unknown or [cases_arg]} for --architecture; known: {', '.join(known)}, or all")
    return cases


def map_(args) -> int:
    """``parity map --architecture NAME``: build the tiny pair, derive its map, print every row and every unpaired
    module with the reason."""
    from tabulate import tabulate

    from parity.derive import DeriveError
    from parity.engine import derived_map
    from parity.models import BuildError, plugin

    p = plugin(args.architecture)
    try:
        built = p.build("float32", seed=0, variant=args.variant or "tiny", checkpoint=args.checkpoint,
                        fused_weights=not getattr(args, "unfused", False))
        dmap = derived_map(built, p, p.inputs(p.default_case, built.hf_config))
    except (BuildError, DeriveError) as err:
        print(f"parity map --architecture {p.name}: FAIL: {err}")
        return EXIT_FAIL
    rows = [(d.name, d.hf or "<model>", "+".join(d.parts) if len(d.parts) > 1 else (d.fms or "<model>"),
             d.relation, "" if d.index is None else f"{len(d.index)} channels") for d in dmap.pairs]
    print(f"{p.hf_class} <-> FMS {built.architecture}: {len(dmap.pairs)} rows derived from FMS's "
          f"{built.architecture!r} 'hf' adapter ({'cached' if dmap.cached else f'{dmap.seconds:.2f} s'}), "
          "0 written by hand")
    print(tabulate(rows, headers=("row", "HF module", "FMS module", "relation", "gather")))
    unfilled = [k for k, v in dmap.tensors.items() if v == "not filled by the adapter"]
    if unfilled or dmap.unused:
        print(f"\nFMS tensors no checkpoint key fills: {', '.join(unfilled) or 'none'}; adapted keys FMS does not "
              f"have: {', '.join(dmap.unused) or 'none'}")
    print(f"\nunpaired ({len(dmap.unpaired)}):")
    for u in dmap.unpaired:
        print(f"  {u.side} {u.path or '<model>'}: {u.reason}")
    return EXIT_PASS


def diff(args, argv: Sequence[str], cases: Sequence[str], progress=None) -> int:
    """``parity diff --architecture NAME``: the derived-map comparison of each case; a report per run."""
    import torch

    from parity.derive import DeriveError
    from parity.engine import run_architecture
    from parity.models import BuildError, plugin
    from parity.report import DEFAULT_REPORT_DIR, format_table, publish_runs, summary_lines

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    p = plugin(args.architecture)
    label = f"parity diff --architecture {p.name}"
    try:
        if progress:
            progress(f"building {p.hf_class} and FMS {p.name} ({args.dtype})")
        import time

        started = time.perf_counter()
        built = p.build(args.dtype, seed=args.seed, variant=args.variant or "tiny", checkpoint=args.checkpoint,
                        fused_weights=not args.unfused)
        build_s = time.perf_counter() - started
    except BuildError as err:
        print(f"{label}: FAIL: {err}")
        return EXIT_FAIL
    applicable = p.cases(built.hf_config)
    cases = applicable if cases is None else cases
    skipped = [c for c in cases if c not in applicable]
    if skipped and args.cases and args.cases.strip() != "all":
        raise ValueError(f"case(s) {skipped} do not apply to {p.name} (its cases: {', '.join(applicable)})")
    runs = []
    for case in [c for c in cases if c in applicable]:
        words = [w for w in argv]
        try:
            result = run_architecture(p, dtype=args.dtype, case=case, seed=args.seed, layers=args.layer, built=built,
                                      progress=progress, command="parity " + shlex.join(words))
        except DeriveError as err:
            print(f"{label}: FAIL: {err}")
            return EXIT_FAIL
        if not runs:  # the first run paid for building both models: its elapsed says so
            result.elapsed_s = round(result.elapsed_s + build_s, 3)
            result.notes.append(f"elapsed includes {build_s:.1f} s building the models before the run")
        runs.append((case, result))
    out_dir = args.report_dir or DEFAULT_REPORT_DIR
    to_stdout = args.json == "-"
    for case, result in runs:
        if to_stdout:
            continue
        print(f"{label} case {case}: {p.hf_class} vs FMS {built.architecture}, {args.dtype}, "
              f"{'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'variant ' + (args.variant or 'tiny')}, "
              f"seed {args.seed}{', FMS unfused' if args.unfused else ''}")
        print(format_table(result, names=[r.name for r in result.requested_results()]))
        for line in summary_lines(result):
            print(line)
        for note in result.notes:
            print(f"note: {note}")
        print(f"elapsed {result.elapsed_s:.1f} s")
    import json

    payload = None
    if args.json:
        payload = runs[0][1].to_json() if len(runs) == 1 else json.dumps(
            {"results": {c: r.to_dict() for c, r in runs}}, indent=1, allow_nan=False)
    paths = publish_runs(runs, out_dir, args.json, payload)
    if not to_stdout:
        print("report: " + " ".join(str(x) for x in paths))
    return EXIT_PASS if all(r.passed for _, r in runs) else EXIT_FAIL


def check_generate(args, found: list[str]) -> None:
    """Problems of ``parity generate --architecture`` (appended to ``found``)."""
    from parity.models import plugin

    try:
        p = plugin(args.architecture)
    except ValueError as err:
        found.append(str(err))
        return
    for attr, flag in (("audio", "--audio"), ("text_only", "--text-only"), ("prompt", "--prompt"),
                       ("static", "--static"), ("compile", "--compile"), ("tied_head", "--tied-head"),
                       ("eos_token_id", "--eos-token-id"), ("checkpoint", "--checkpoint"), ("variant", "--variant")):
        if getattr(args, attr, None) not in (None, False):
            found.append(f"{flag} is not available with --architecture (a tiny pair, seeded prompts, no stop token)")
    if getattr(args, "device", "cpu") != "cpu":
        found.append("--architecture runs on the CPU; drop --device")
    if args.dtype == "float64":
        found.append("--dtype float64 is the bounds' reference; compare float32, bfloat16 or float16")
    if args.max_new_tokens < 1:
        found.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if (not p.causal or p.default_case != "prompt") and p.name != "granite_speech5":
        found.append(f"{p.name} is not a causal LM fed tokens: parity generate --architecture takes "
                     f"{', '.join(n for n, q in _causal().items())}, and granite_speech5 (greedy CTC)")


def _causal() -> dict:
    from parity.models import ARCHITECTURES

    return {n: q for n, q in ARCHITECTURES.items() if q.causal and q.default_case == "prompt"}


def generate(args) -> int:
    """``parity generate --architecture NAME``: greedy tokens on both sides, then the teacher-forced comparison."""
    import json

    import torch

    from parity._atomic import write_atomic
    from parity.arch_generate import generate_architecture, required_distinct
    from parity.derive import DeriveError
    from parity.models import BuildError, plugin
    from parity.progress import reporter
    from parity.report import format_table, summary_lines

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    p = plugin(args.architecture)
    if args.seed is None:
        args.seed = 1  # the first weight seed tried (parity.arch_generate searches on from it)
    if p.name == "granite_speech5":
        return _generate_ctc(p, args)
    label = f"parity generate --architecture {p.name}"
    progress = reporter("parity generate", quiet=args.quiet)
    try:
        built = None
        if args.unfused:
            built = p.build(args.dtype, seed=args.seed, fused_weights=False)
        g = generate_architecture(p, dtype=args.dtype, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  built=built, progress=progress)
    except (BuildError, DeriveError) as err:
        print(f"{label}: FAIL: {err}")
        return EXIT_FAIL
    finally:
        if progress is not None:
            progress.close()
    payload = {"architecture": p.name, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
               "weight_seed": g.weight_seed, "prompt_seed": g.prompt_seed, "hf_tokens": g.hf_tokens,
               "fms_tokens": g.fms_tokens, "first_mismatch": g.first_mismatch, "varied": g.varied,
               "fms_error": g.fms_error, "verdict": g.verdict(), "passed": g.passed,
               "forward": None if g.forward is None else g.forward.to_dict()}
    if args.json == "-":
        print(json.dumps(payload, indent=1, allow_nan=False, default=str))
    else:
        print(f"{label}: {p.hf_class} generate vs FMS generate (KV cache), {args.dtype}, {args.max_new_tokens} "
              f"greedy tokens, weight seed {g.weight_seed}, prompt seed {g.prompt_seed} (the first whose HF "
              f"continuation has >= {required_distinct(args.max_new_tokens)} distinct tokens)")
        print(f"HF : {g.hf_tokens}")
        print(f"FMS: {g.fms_tokens}")
        if g.forward is not None and not g.forward.passed:
            print(format_table(g.forward, names=[r.name for r in g.forward.layers if not r.passed][:12]))
        if g.forward is not None:
            for line in summary_lines(g.forward):
                print(f"teacher-forced: {line}")
        print(g.verdict())
        if args.json:
            write_atomic(args.json, json.dumps(payload, indent=1, allow_nan=False, default=str) + "\n")
    return EXIT_PASS if g.passed else EXIT_FAIL


def _generate_ctc(p, args) -> int:
    """``parity generate --architecture granite_speech5``: greedy CTC decoding on both sides (``parity.ctc``)."""
    import json

    from parity._atomic import write_atomic
    from parity.ctc import check_ctc
    from parity.models import BuildError
    from parity.progress import reporter
    from parity.report import summary_lines

    progress = reporter("parity generate", quiet=args.quiet)
    try:
        r = check_ctc(p, dtype=args.dtype, seed=args.seed, progress=progress)
    except BuildError as err:
        print(f"parity generate --architecture {p.name}: FAIL: {err}")
        return EXIT_FAIL
    finally:
        if progress is not None:
            progress.close()
    payload = {"architecture": p.name, "dtype": args.dtype, "weight_seed": r.weight_seed, "hf_tokens": r.hf_tokens,
               "fms_tokens": r.fms_tokens, "first_frame_mismatch": r.first_frame_mismatch, "notes": r.notes,
               "verdict": r.verdict(), "passed": r.passed, "forward": r.forward.to_dict()}
    if args.json == "-":
        print(json.dumps(payload, indent=1, allow_nan=False, default=str))
    else:
        print(f"parity generate --architecture {p.name}: greedy CTC, GraniteSpeech5ForCTC.generate vs the FMS "
              f"model's logits, {args.dtype}, weight seed {r.weight_seed}, each side on its own pipeline")
        for i, (h, f) in enumerate(zip(r.hf_tokens, r.fms_tokens)):
            print(f"clip {i} HF : {h}")
            print(f"clip {i} FMS: {f}")
        for line in summary_lines(r.forward):
            print(f"layers: {line}")
        for note in r.notes:
            print(f"note: {note}")
        print(r.verdict())
        if args.json:
            write_atomic(args.json, json.dumps(payload, indent=1, allow_nan=False, default=str) + "\n")
    return EXIT_PASS if r.passed else EXIT_FAIL
