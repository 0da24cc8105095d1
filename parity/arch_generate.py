"""``parity generate --architecture NAME``: greedy generation of a causal-LM pair, HF ``generate`` against FMS's
``fms.utils.generation.generate`` with its KV cache.

Both sides decode ``max_new_tokens`` greedily from the same prompt (no stop token: every step is compared). The check
is conclusive only when HF's continuation varies (at least ``min(8, 1 + n // 3)`` distinct tokens): a model that
repeats one token would match a broken cache too, so the prompt seed is the first of 0..15 (and the weight seed the
first of ``seed .. seed + 7``) whose continuation varies, and the report says which. Then:

* tokens: the first step where FMS's token differs from HF's;
* logits: both models run (teacher-forced) on HF's whole sequence, prompt plus generated tokens, through the derived
  map (``parity.engine``): the logits of every generated position and every layer are compared, so a divergence is
  named at its first layer even when the tokens agree.

Raises ``parity.models.BuildError`` / ``parity.derive.DeriveError`` as the engine does, ``ValueError`` for a pair
that is not a causal LM with token inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from parity._shell import error_line
from parity.engine import run_architecture
from parity.models import PairPlugin, TextInputs
from parity.result import ParityResult

__all__ = ["ArchGeneration", "generate_architecture", "required_distinct"]


def required_distinct(n: int) -> int:
    """Distinct tokens a continuation of ``n`` tokens needs to make a token comparison conclusive."""
    return min(8, 1 + n // 3)


@dataclass
class ArchGeneration:
    """What ``generate_architecture`` found.

    Attributes:
        hf_tokens, fms_tokens: the generated token ids (prompt excluded), [n] each.
        first_mismatch: the first step (0-based) where they differ, None when identical.
        prompt_seed, weight_seed: the seeds of the prompt's tokens and of the weights (the first pair, from the
            given weight seed on, whose continuation varies); varied: the check was conclusive.
        forward: the teacher-forced layer-by-layer comparison on HF's whole sequence.
        fms_error: the FMS generate call raised (its first line), else None.
    """

    hf_tokens: list[int]
    fms_tokens: list[int]
    first_mismatch: Optional[int]
    prompt_seed: int
    varied: bool
    weight_seed: int = 0
    forward: Optional[ParityResult] = None
    fms_error: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.fms_error is None and self.varied and self.first_mismatch is None
                and self.forward is not None and self.forward.passed)

    def verdict(self) -> str:
        """One line: PASS, or what failed first."""
        if self.fms_error:
            return f"FAIL: FMS generate raised on the prompt HF generated from: {self.fms_error}"
        if not self.varied:
            return (f"INCONCLUSIVE: HF's continuation has fewer than {required_distinct(len(self.hf_tokens))} "
                    "distinct tokens for every prompt seed tried (raise --max-new-tokens or change --seed)")
        parts = []
        if self.first_mismatch is not None:
            parts.append(f"token {self.first_mismatch} differs (HF {self.hf_tokens[self.first_mismatch]}, FMS "
                         f"{self.fms_tokens[self.first_mismatch]})")
        if self.forward is not None and not self.forward.passed:
            parts.append(f"teacher-forced on HF's sequence, first divergent layer {self.forward.first_divergent}")
        return "PASS: tokens identical, every layer and the logits of every step within bounds" if not parts \
            else "FAIL: " + "; ".join(parts)


def _hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, num_beams=1, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _fms_greedy(fms, ids: torch.Tensor, n: int) -> list[int]:
    from fms.utils.generation import generate

    out = generate(fms, ids, max_seq_len=ids.shape[1] + n, max_new_tokens=n, do_sample=False, use_cache=True)
    return out[0, ids.shape[1]:].tolist()


def generate_architecture(plugin: PairPlugin, *, dtype: str = "float32", max_new_tokens: int = 16, seed: int = 0,
                          built=None, progress=None) -> ArchGeneration:
    """Greedy generation on both sides of ``plugin``'s pair and the teacher-forced comparison (module docstring).

    Raises:
        ValueError: the pair is not a causal LM fed tokens alone (vision and speech pairs have their own commands),
            or ``max_new_tokens`` < 1.
    """
    if not plugin.causal or type(plugin).inputs is not PairPlugin.inputs:
        raise ValueError(f"parity generate --architecture takes a causal LM fed tokens; {plugin.name} is not one "
                         "(parity generate without --architecture runs Granite Speech)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    say = progress or (lambda _m: None)
    need = required_distinct(max_new_tokens)
    given = built is not None
    weight_seed = seed
    with torch.no_grad():
        # the first (weight seed, prompt seed) whose greedy continuation varies: random tiny weights often make a
        # model repeat one token, which a broken cache would repeat too
        for weight_seed in ([seed] if given else range(seed, seed + 8)):
            if not given:
                say(f"building {plugin.name} ({dtype}, weight seed {weight_seed})")
                built = plugin.build(dtype, seed=weight_seed)
            for prompt_seed in range(16):
                x = plugin.inputs("prompt", built.hf_config, prompt_seed)
                hf_tokens = _hf_greedy(built.hf, x.input_ids, max_new_tokens)
                if len(set(hf_tokens)) >= need:
                    break
            if len(set(hf_tokens)) >= need:
                break
        varied = len(set(hf_tokens)) >= need
        say(f"FMS generate, {max_new_tokens} tokens")
        try:
            fms_tokens = _fms_greedy(built.fms, x.input_ids, max_new_tokens)
            fms_error = None
        except Exception as err:  # noqa: BLE001 - the FMS generate raising is the verdict
            fms_tokens, fms_error = [], error_line(err)
    mismatch = next((i for i, (a, b) in enumerate(zip(hf_tokens, fms_tokens)) if a != b),
                    None if len(fms_tokens) == len(hf_tokens) else min(len(hf_tokens), len(fms_tokens)))
    seq = torch.cat([x.input_ids, torch.tensor([hf_tokens])], dim=1)
    valid = torch.ones(seq.shape, dtype=torch.bool)
    forced = TextInputs(case="generated", input_ids=seq, attention_mask=valid.long(),
                        position_ids=torch.arange(seq.shape[1])[None], fms_kwargs={}, valid=valid)
    say("teacher-forced comparison on HF's sequence")
    forward = run_architecture(plugin, dtype=dtype, built=built, inputs=forced)
    return ArchGeneration(hf_tokens=hf_tokens, fms_tokens=fms_tokens, first_mismatch=mismatch,
                          prompt_seed=prompt_seed, weight_seed=weight_seed, varied=varied, forward=forward,
                          fms_error=fms_error)
