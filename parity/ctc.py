"""CTC decoding parity for an encoder-only CTC pair (Granite Speech 5.0): ``parity generate --architecture
granite_speech5``.

transformers' ``GraniteSpeech5ForCTC.generate`` returns the argmax token of every output frame (frames past a clip's
length set to ``pad_token_id``, the CTC blank); greedy CTC decoding then collapses repeats and drops blanks. The
check compares, per clip and each side on its own input pipeline:

* the per-frame argmax over the clip's real frames (the first frame where they differ is the verdict);
* the decoded token sequence (``speech5.ctc_greedy`` on FMS's logits against the same collapse of HF's frames);
* and, whatever the tokens, every layer through the derived map (``parity.engine``), so a divergence is named where
  it starts. Conclusive only when HF's decoded sequence holds at least 3 distinct tokens (a path of blanks would
  match a broken model too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from parity.engine import run_architecture
from parity.result import ParityResult

__all__ = ["CTCParity", "MIN_DISTINCT", "check_ctc", "conclusive"]

MIN_DISTINCT = 3


def conclusive(hf_frames: list[list[int]], hf_tokens: list[list[int]], blank: int) -> bool:
    """Every clip's HF path decodes to ``MIN_DISTINCT`` distinct tokens and its frames hold the blank and a repeated
    token, so the decoding's blank and collapse rules both act."""
    return all(len(set(t)) >= MIN_DISTINCT and blank in f and any(a == b != blank for a, b in zip(f, f[1:]))
               for t, f in zip(hf_tokens, hf_frames))


@dataclass
class CTCParity:
    """Per clip: HF's and FMS's frame argmaxes over the real frames, the decoded sequences, the first differing frame
    (None when none), and the layer-by-layer result."""

    hf_frames: list[list[int]]
    fms_frames: list[list[int]]
    hf_tokens: list[list[int]]
    fms_tokens: list[list[int]]
    first_frame_mismatch: list[Optional[int]]
    forward: ParityResult
    weight_seed: int = 0
    notes: list[str] = field(default_factory=list)

    blank: int = 0

    @property
    def varied(self) -> bool:
        """Conclusive (``conclusive``)."""
        return conclusive(self.hf_frames, self.hf_tokens, self.blank)

    @property
    def passed(self) -> bool:
        """Conclusive, no frame differing beyond a near tie, every layer within bounds (decoded tokens may then
        differ only through near ties, which ``notes`` name)."""
        return (self.varied and all(m is None for m in self.first_frame_mismatch) and self.forward.passed
                and (self.hf_tokens == self.fms_tokens or bool(self.notes)))

    def verdict(self) -> str:
        if not self.varied:
            return (f"INCONCLUSIVE: for a clip, HF's greedy CTC path decodes to fewer than {MIN_DISTINCT} distinct "
                    "tokens, or never emits the blank or a repeat (give another --seed)")
        parts = [f"clip {i}: frame {m} differs (HF {self.hf_frames[i][m]}, FMS {self.fms_frames[i][m]})"
                 for i, m in enumerate(self.first_frame_mismatch) if m is not None]
        if self.hf_tokens != self.fms_tokens and not self.notes:
            parts.append("the decoded sequences differ while every frame's argmax agrees: the decoding (blank id, "
                         "collapse) differs")
        ties = " (the decoded sequences differ only through near ties: see the notes)" \
            if self.hf_tokens != self.fms_tokens else ""
        if not self.forward.passed:
            parts.append(f"first divergent layer {self.forward.first_divergent}")
        return ("PASS: per-frame argmax and decoded tokens identical, every layer within bounds" if not parts
                and not ties and not self.notes else
                f"PASS: every frame's argmax identical except {len(self.notes)} near tie(s), every layer within "
                f"bounds{ties}" if not parts else "FAIL: " + "; ".join(parts))


def check_ctc(plugin, *, dtype: str = "float32", case: str = "speech_batch", seed: int = 1, built=None,
              progress=None) -> CTCParity:
    """Greedy CTC decoding on both sides of an encoder-only CTC ``plugin`` (module docstring); with no ``built``,
    the first weight seed from ``seed`` on (up to 8) whose HF path decodes to varied tokens."""
    from fms_granite_speech.speech5 import ctc_collapse, ctc_greedy

    say = progress or (lambda _m: None)
    given = built is not None
    for weight_seed in ([seed] if given else range(seed, seed + 8)):
        if not given:
            say(f"building {plugin.name} ({dtype}, weight seed {weight_seed})")
            built = plugin.build(dtype, seed=weight_seed)
        x = plugin.inputs(case, built.hf_config)
        hf_x = x.extra["hf"]
        with torch.no_grad():
            frames = built.hf.generate(input_features=hf_x["input_features"].to(next(built.hf.parameters()).dtype),
                                       attention_mask=hf_x["attention_mask"])
        lengths = x.valid.sum(1)
        blank = int(built.hf.config.pad_token_id or 0)
        hf_frames = [row[: int(n)] for row, n in zip(frames.tolist(), lengths)]
        hf_tokens = [ctc_collapse(f, blank) for f in hf_frames]
        if given or conclusive(hf_frames, hf_tokens, blank):
            break
    with torch.no_grad():
        logits = plugin.run_fms(built.fms, x)
        hf_logits = plugin.run_hf(built.hf, x).logits
    fms_frames = [row[: int(n)] for row, n in zip(logits.argmax(-1).tolist(), lengths)]
    fms_tokens = ctc_greedy(logits, int(getattr(built.fms.config, "blank_id", blank)), lengths)
    notes, mismatch = [], []
    for i, (h, f) in enumerate(zip(hf_frames, fms_frames)):
        first = None
        for t, (a, b) in enumerate(zip(h, f)):
            if a == b:
                continue
            # a near tie: HF's own margin between the two tokens is within the logits' difference at that frame
            margin = float(hf_logits[i, t, a] - hf_logits[i, t, b])
            delta = float((logits[i, t].float() - hf_logits[i, t].float()).abs().max())
            if margin <= 2 * delta:
                notes.append(f"clip {i} frame {t}: argmax HF {a} / FMS {b} on a near tie (HF's margin {margin:.3g} "
                             f"<= 2 x the frame's largest logit difference {delta:.3g}), not a divergence")
                continue
            first = t
            break
        mismatch.append(first)
    say("layer by layer")
    forward = run_architecture(plugin, dtype=dtype, built=built, inputs=x)
    return CTCParity(hf_frames=hf_frames, fms_frames=fms_frames, hf_tokens=hf_tokens, fms_tokens=fms_tokens,
                     first_frame_mismatch=mismatch, forward=forward, weight_seed=weight_seed, notes=notes,
                     blank=blank)
