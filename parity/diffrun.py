"""What ``parity diff`` runs, as a library call: each requested case of one pair compared, with the optional
standalone repro of the first divergent layer and the saved activations (``parity.cli`` is the shell around it:
arguments, terminal output, the report).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from parity._shell import first_line as _first_line
from parity.result import ParityResult

__all__ = ["DiffOptions", "diff_runs"]


@dataclasses.dataclass(frozen=True)
class DiffOptions:
    """The comparison ``parity diff`` asks for (its flags of the same names; ``parity.compare.run_parity`` for the
    comparison ones).

    Attributes:
        layers: parity names to report (None: the whole model; the decoder alone for a text-only prompt).
        mode, compile_backend, reference, compile_scope, explain: as ``run_parity``.
        audio, prompt, same_inputs: the inputs of a run without a named case (``parity.inputs.build_inputs``).
        save_activations: a folder for every compared tensor (``parity.activations``), with ``save_layers`` and a cap
            of ``save_max_mib`` MiB.
        repro: a folder for the standalone repro of the first divergent model row (``parity.repro.write_repro``).
    """

    layers: Optional[Sequence[str]] = None
    mode: str = "eager"
    compile_backend: str = "inductor"
    reference: str = "auto"
    compile_scope: str = "regional"
    explain: Optional[Sequence[str]] = None
    audio: Optional[Sequence[str]] = None
    prompt: Optional[str] = None
    same_inputs: bool = False
    save_activations: Optional[str] = None
    save_layers: Optional[Sequence[str]] = None
    save_max_mib: float = 512.0
    repro: Optional[str] = None



def diff_runs(pair, cases: Optional[Sequence[str]], options: DiffOptions,
              command: Callable[[Optional[str]], str], progress=None) -> list[tuple[Optional[str], ParityResult]]:
    """``[(case name or None, ParityResult)]``: ``pair`` compared on each named case of ``parity.inputs.CASES`` (or,
    for ``cases=None``, once on ``options``' audio and prompt), in order.

    ``command(case)`` gives the command line that reproduces one run (stored on its result). A repro that cannot be
    written, and a reached activation cap, are notes of the result, not errors.

    Raises:
        ValueError, OSError: inputs or folders the run cannot use (one-line messages from the library calls).
    """
    from parity.compare import run_parity
    from parity.inputs import CASES, build_inputs

    runs = []
    for name in cases or [None]:
        if progress and name:
            progress(f"case {name}")
        if name is None:
            inputs = build_inputs(pair, audio=options.audio, prompt=options.prompt, same_inputs=options.same_inputs)
        else:
            inputs = CASES[name].inputs(pair, same_inputs=options.same_inputs)
        layers = options.layers
        if layers is None and not inputs.has_audio:
            layers = ["input_ids", "decoder"]
        store = None
        if options.save_activations:
            from parity.activations import ActivationStore

            store = ActivationStore(options.save_layers or options.layers, int(options.save_max_mib * 2**20))
        result = run_parity(pair, inputs, layers=layers, mode=options.mode, compile_backend=options.compile_backend,
                            reference=options.reference, compile_scope=options.compile_scope,
                            explain=options.explain, activations=store, progress=progress)
        result.command = command(name)
        first = result.first_failure()
        if options.repro and first is not None and first.pair.tensor != "pipeline":
            from parity.repro import write_repro

            try:
                write_repro(pair, inputs, first.name, options.repro,
                            None if first.diff is None else first.diff.tolerance.to_dict())
                result.notes.append(f"repro of {first.name}: {options.repro} (python {options.repro}/repro.py)")
            except ValueError as err:
                result.notes.append(f"no repro of {first.name}: {_first_line(err)}")
        if store is not None:
            store.save(options.save_activations, float(pair.config.decoder.logits_scaling), result.command)
            cut = ""
            if store.cut:
                cut = (f"; the {options.save_max_mib:g} MiB cap was reached: rows not (wholly) saved: "
                       f"{', '.join(store.cut[:5])}{' ...' if len(store.cut) > 5 else ''} (raise --save-max-mib or "
                       "narrow --save-layers)")
            result.notes.append(f"activations: {len(store.tensors)} tensors, {store.bytes / 2**20:.1f} MiB, in "
                                f"{options.save_activations}{cut}")
        runs.append((name, result))
    return runs
