"""The decoder's decode step alone: HF against FMS, one step each in turn, on a text prompt.

Run from the repository root::

    python benchmarks/decode_step.py --variant 3.3-2b --dtype bfloat16 --steps 64 --threads 2

Both models come from ``parity.pair.build_pair`` (same seeded random weights); the LoRA adapter is off on both sides
(a text-only prompt, as HF's ``generate`` sets it), so the step is the decoder's own; ``--adapter on`` decodes as a
speech prompt does (HF's ``generate`` enables the adapter when audio is given: peft's LoRA runs unmerged beside each
target projection; FMS's ``set_adapter(True)`` merges it into the weights). After one prefill of a random
``--prompt-tokens`` prompt per engine, every step runs each engine once, the order rotating from step to step (HF, FMS,
FMS without a mask; then FMS, FMS without a mask, HF; ...), so drift of the shared machine and the position in the
round hit all alike; the first ``--warmup`` steps are not timed. Engines:

* ``hf``: ``GraniteSpeechForConditionalGeneration`` with its ``DynamicCache``, ``logits_to_keep=1`` (what HF's
  ``generate`` runs per step);
* ``fms``: ``GraniteSpeech`` with its growing KV cache, called as ``generation.transcribe_ids`` calls it through FMS's
  ``generate`` (the prompt mask of ``pad_input_ids`` extended one slot per step, position ids, ``last_n_tokens=1``);
* ``fms (no mask)``: the same without the mask (SDPA's causal path);
* ``fms static`` / ``fms static compiled`` (``--static``): ``static_cache.StaticDecoder``'s step over a preallocated
  cache (prefilled by ``generate_static``), eager or ``torch.compile(fullgraph=True)``; the compiled step's first
  (compiling) call is one of the untimed warm-up steps.

Prints a table (median and min ms per step, ratio of medians to HF) and, with ``--profile N``, torch.profiler's top
ops over N further steps of each engine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate


def engines(pair, prompt: torch.Tensor, static: str = "none", static_steps: int = 0) -> dict:
    from fms.utils.generation import pad_input_ids

    hf, fms = pair.hf, pair.fms
    out = {}

    def hf_engine():
        state = {}

        def prefill():
            state["past"] = hf(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values

        def step(token):
            result = hf(input_ids=token.view(1, 1), past_key_values=state["past"], use_cache=True, logits_to_keep=1)
            state["past"] = result.past_key_values

        return prefill, step

    def fms_engine(with_mask: bool):
        state = {}
        ids, padding = pad_input_ids([prompt[0]], min_pad_length=0)

        def prefill():
            kwargs = dict(padding) if with_mask else {"position_ids": padding["position_ids"]}
            _, state["cache"] = fms(ids, use_cache=True, last_n_tokens=1, **kwargs)
            state["kwargs"] = kwargs

        def step(token):
            kwargs = state["kwargs"]
            if "mask" in kwargs:  # what FMS's generate does between steps (its sdpa update_attn_kwargs)
                last = kwargs["mask"][:, -1:, :]
                kwargs["mask"] = torch.cat((last, torch.zeros(last.shape[0], 1, 1, dtype=last.dtype)), dim=2)
            kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
            _, state["cache"] = fms(token.view(1, 1), past_key_value_states=state["cache"], use_cache=True,
                                    last_n_tokens=1, **kwargs)

        return prefill, step

    def static_engine(compiled: bool):
        from fms_granite_speech.static_cache import StaticCache, StaticDecoder, generate_static

        length = prompt.shape[1]
        state = {}

        def prefill():
            decoder = StaticDecoder(fms, StaticCache.allocate(fms, 1, length + static_steps), compile=compiled)
            # generate_static's own prefill (one eager forward into the cache), then this script steps the decoder
            generate_static(fms, prompt, max_new_tokens=1, decoder=decoder)
            state.update(decoder=decoder, positions=torch.full((1, 1), length - 1), slot=torch.tensor([length - 1]))

        def step(token):
            state["positions"] += 1
            state["slot"] += 1
            state["decoder"].step(token.view(1, 1), state["positions"], state["slot"])

        return prefill, step

    out["hf"] = hf_engine()
    out["fms"] = fms_engine(True)
    out["fms (no mask)"] = fms_engine(False)
    if static in ("eager", "both"):
        out["fms static"] = static_engine(False)
    if static in ("compiled", "both"):
        out["fms static compiled"] = static_engine(True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=32, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per engine first")
    p.add_argument("--prompt-tokens", type=int, default=60)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps of each engine")
    p.add_argument("--static", choices=("none", "eager", "compiled", "both"), default="none",
                   help="also time FMS's static-KV-cache step (static_cache.StaticDecoder), eager and/or compiled "
                        "(torch.compile fullgraph, inductor; compiled in the untimed prefill and first step)")
    p.add_argument("--adapter", choices=("off", "on"), default="off",
                   help="the LoRA adapter on both sides: 'off' (a text-only prompt, the decoder's own step) or 'on' "
                        "(what a speech prompt decodes with: peft's unmerged LoRA on HF, the merged weights on FMS)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from parity.pair import build_pair

    built = time.perf_counter()
    pair = build_pair(args.variant, seed=args.seed, dtype=args.dtype)
    print(f"built {args.variant} {args.dtype} in {time.perf_counter() - built:.0f} s, {torch.get_num_threads()} threads")
    on = args.adapter == "on"
    if getattr(pair.hf, "_hf_peft_config_loaded", False):
        pair.hf.enable_adapters() if on else pair.hf.disable_adapters()
    elif on:
        p.error(f"--adapter on: {args.variant} has no LoRA adapter")
    if getattr(pair.fms, "has_adapter", False):
        pair.fms.set_adapter(on)
    vocab = pair.config.decoder.src_vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, vocab - 1, (1, args.prompt_tokens), generator=gen)
    tokens = torch.randint(1, vocab - 1, (args.warmup + args.steps + args.profile,), generator=gen)
    runs = engines(pair, prompt, args.static, len(tokens) + 1)
    times = {name: [] for name in runs}
    with torch.no_grad():
        for prefill, _ in runs.values():
            prefill()
        names = list(runs)
        for i in range(args.warmup + args.steps):
            for name in names[i % len(names):] + names[:i % len(names)]:  # each engine first in turn
                step = runs[name][1]
                start = time.perf_counter()
                step(tokens[i])
                if i >= args.warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
        base = statistics.median(times["hf"])
        rows = [[name, f"{statistics.median(v):.1f}", f"{min(v):.1f}", f"{statistics.median(v) / base:.3f}"]
                for name, v in times.items()]
        print(f"decode step, {args.variant} {args.dtype}, adapter {args.adapter}, prompt {args.prompt_tokens} tokens, "
              f"{args.steps} steps "
              "per engine, each engine once per step in rotating order")
        print(tabulate(rows, headers=["engine", "median ms", "min ms", "median / hf"]))
        if args.profile:
            from torch.profiler import profile

            for name, (_, step) in runs.items():
                with profile() as prof:
                    for token in tokens[args.warmup + args.steps:]:
                        step(token)
                print(f"== {name}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
