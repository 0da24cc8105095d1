"""Property-based parity: hypothesis strategies over audio lengths and batch compositions, and the property itself.

Lengths are drawn in samples (16 kHz) around the places where length-dependent code paths change behaviour, all
derived from the config (``hop 160`` samples per mel frame, 2 mel frames per encoder frame, so one encoder frame is
320 samples; ``GraniteSpeechFeatureExtractor`` of transformers 5.17):

* the projector window (``projector.window_size`` encoder frames, 15): shorter than one window, exact multiples and
  +-1 around them (the last window is zero-padded unless ``T % window == 0``);
* the encoder's attention block (``encoder.context_size`` encoder frames: 200 real, 32 tiny): +-1 around one and
  two blocks (the last block is zero-padded and masked unless ``T % context == 0``);
* odd mel-frame counts (the feature extractor drops the last mel frame when the count is odd);
* long clips spanning several attention blocks.

Audio content is a real shipped speech clip (``features.shipped_audio``) cropped, or tiled when too short, to the
drawn length from a drawn offset; nothing is synthesised.

``check_parity(pair, audio_batch)`` is the property: it runs ``compare.run_parity`` and raises ``AssertionError``
naming the first divergent layer, so hypothesis shrinks a failure to the smallest failing length and batch.
Profiles: ``ci`` (few examples, derandomized, no example database: the same examples every run) and ``nightly``
(hundreds, random, failures kept in ``.hypothesis/examples`` and replayed first), chosen with ``HYPOTHESIS_PROFILE``
(``fuzz_settings``). The named edge cases of ``parity.inputs.CASES`` run on every ``parity check`` besides.
"""

from __future__ import annotations

from pathlib import Path

import os
from typing import Optional, Sequence, Union

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from fms_granite_speech.config import GraniteSpeechConfig
from parity.inputs import (HOP_SAMPLES, MIN_SAMPLES, SAMPLES_PER_FRAME, SAMPLING_RATE, AudioClip, encoder_frames,
                           make_waveform, samples_for_frames)

__all__ = [
    "HOP_SAMPLES",
    "MIN_SAMPLES",
    "PROFILES",
    "SAMPLES_PER_FRAME",
    "AudioClip",
    "audio_batches",
    "audio_clips",
    "check_parity",
    "edge_frame_counts",
    "encoder_frames",
    "fuzz_settings",
    "lengths",
    "make_waveform",
    "samples_for_frames",
]

EXAMPLE_DB = os.path.join(".hypothesis", "examples")

# -- profiles -----------------------------------------------------------------------------------------------------------

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                    HealthCheck.data_too_large])
# ci: the same examples every run (derandomize, no example database), so one tree always gets one verdict; the named
# edge cases (parity.inputs.CASES) and the @examples of the suite run on top of them. nightly: random exploration,
# failures kept in the example database and replayed first.
PROFILES = {"ci": dict(max_examples=8, derandomize=True, database=None, **_COMMON),
            "nightly": dict(max_examples=300, database=DirectoryBasedExampleDatabase(EXAMPLE_DB), **_COMMON)}
for _name, _kw in PROFILES.items():
    settings.register_profile(_name, **_kw)


def fuzz_settings(profile: Optional[str] = None) -> settings:
    """The hypothesis ``settings`` of ``profile`` (default: ``$HYPOTHESIS_PROFILE``, else ``ci``).

    The profiles are registered globally but never loaded globally, so other hypothesis tests keep their own settings;
    decorate parity properties with ``@fuzz_settings()``.

    Raises:
        ValueError: an unknown profile name (the message lists ``PROFILES``).
    """
    name = profile or os.environ.get("HYPOTHESIS_PROFILE") or "ci"
    if name not in PROFILES:
        raise ValueError(f"unknown hypothesis profile {name!r} for parity fuzzing; use one of {', '.join(PROFILES)} "
                         "(set HYPOTHESIS_PROFILE)")
    return settings.get_profile(name)


# -- lengths --------------------------------------------------------------------------------------------------------


def edge_frame_counts(config: GraniteSpeechConfig, long_blocks: int = 3) -> list[int]:
    """Encoder frame counts at the length edges of ``config``, ascending, without duplicates.

    1 frame; projector window ``w``: ``w-1, w, w+1, 2w-1, 2w, 2w+1``; encoder attention block ``c``:
    ``c-1, c, c+1, 2c-1, 2c, 2c+1``; and a long clip of ``long_blocks`` blocks and a bit (``long_blocks*c + w + 1``),
    which spans several attention blocks and ends mid-window.
    """
    w, c = config.projector.window_size, config.encoder.context_size
    edges = {1, w - 1, w, w + 1, 2 * w - 1, 2 * w, 2 * w + 1, c - 1, c, c + 1, 2 * c - 1, 2 * c, 2 * c + 1,
             long_blocks * c + w + 1}
    return sorted(e for e in edges if e >= 1)


def lengths(config: GraniteSpeechConfig, max_frames: Optional[int] = None) -> st.SearchStrategy[int]:
    """Audio lengths in samples: an edge frame count (``edge_frame_counts``) with an even or odd mel-frame count and
    an offset within the hop, or any length from ``MIN_SAMPLES`` up to ``max_frames`` encoder frames.

    Any length comes first so that hypothesis shrinks a failure towards the shortest failing clip.
    ``max_frames`` defaults to the longest edge.
    """
    edges = edge_frame_counts(config)
    top = max_frames or max(edges)
    edges = [e for e in edges if e <= top]
    anywhere = st.integers(MIN_SAMPLES, samples_for_frames(top, odd_mel=True, offset=HOP_SAMPLES - 1))
    at_edge = st.builds(samples_for_frames, st.sampled_from(edges), st.booleans(),
                        st.integers(0, HOP_SAMPLES - 1))
    return st.one_of(anywhere, at_edge)


# -- audio ----------------------------------------------------------------------------------------------------------


def audio_clips(config: GraniteSpeechConfig, max_frames: Optional[int] = None) -> st.SearchStrategy[AudioClip]:
    """``AudioClip``s of a shipped speech clip with a length from ``lengths(config, max_frames)``."""
    from fms_granite_speech.features import list_shipped_audio

    names = list_shipped_audio()
    return st.builds(AudioClip, st.sampled_from(names), st.integers(0, 50_000), lengths(config, max_frames))


def audio_batches(config: GraniteSpeechConfig, max_batch: int = 3,
                  max_frames: Optional[int] = None) -> st.SearchStrategy[list[AudioClip]]:
    """Batches of 1..``max_batch`` clips of independent lengths (a mixed batch is zero-padded to its longest clip)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return st.lists(audio_clips(config, max_frames), min_size=1, max_size=max_batch)


# -- the property ---------------------------------------------------------------------------------------------------


def check_parity(pair, audio_batch: Sequence[Union[AudioClip, torch.Tensor]],
                 layers: Union[None, str, Sequence[str]] = None, tol=None):
    """Run ``compare.run_parity`` on ``audio_batch`` and fail loudly on any divergence.

    Args:
        pair: a ``parity.pair.ModelPair``.
        audio_batch: ``AudioClip``s or float waveforms [samples] at 16 kHz (one batch, zero-padded by the processor).
        layers: parity layer names to run up to (default: the whole model, encoder to logits).
        tol: a ``metrics.Tolerance`` (default: per dtype).

    Returns:
        the passing ``ParityResult``.

    Raises:
        AssertionError: some layer that ran diverges; the message starts with the first divergent layer (in execution
            order), its reason, and the batch's lengths in samples and encoder frames.
        ValueError: an empty batch.
    """
    from parity.compare import run_parity
    from parity.inputs import build_inputs

    if not audio_batch:
        raise ValueError("audio_batch is empty; give at least one AudioClip or waveform")
    waves = [make_waveform(c) if isinstance(c, AudioClip) else c for c in audio_batch]
    inputs = build_inputs(pair, audio=waves, sampling_rate=SAMPLING_RATE)
    result = run_parity(pair, inputs, layers=layers, tol=tol)
    first = result.first_failure()
    if first is not None or not result.passed:
        shown = first or next(r for r in result.requested_results() if not r.passed)
        sizes = ", ".join(f"{w.numel()} samples/{encoder_frames(w.numel())} frames" for w in waves)
        handover = hand_over(pair, waves, inputs, shown.name, layers, audio_batch)
        raise AssertionError(f"first divergent layer: {shown.name} -- {shown.reason} (batch of {len(waves)}, in "
                             f"this order: {sizes})\n{handover}")
    return result


def hand_over(pair, waves: Sequence[torch.Tensor], inputs, layer: str, layers=None, described=()) -> str:
    """What a fuzz failure leaves a porter: its clips as WAV files (float32, the exact samples), one ``parity diff``
    command that reproduces it alone, and the standalone repro folder of its first divergent layer
    (``parity.repro``), in ``$PARITY_FUZZ_DIR`` or one temporary folder per process (each failure overwrites the
    last, so after hypothesis shrinks, the folder holds the minimal case). Returns the lines to print."""
    import os
    import shlex
    import tempfile

    import soundfile

    global _FOLDER
    folder = Path(os.environ.get("PARITY_FUZZ_DIR") or _FOLDER or tempfile.mkdtemp(prefix="parity-fuzz-"))
    _FOLDER = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("clip_*.wav"):
        old.unlink()
    paths = []
    for k, wave in enumerate(waves):
        path = folder / f"clip_{k}.wav"
        soundfile.write(str(path), wave.detach().cpu().float().numpy(), SAMPLING_RATE, subtype="FLOAT")
        paths.append(str(path))
    words = ["parity", "diff"]
    for path in paths:
        words += ["--audio", path]
    if pair.checkpoint:
        words += ["--checkpoint", pair.checkpoint]
    else:
        words += ["--variant", pair.variant or "tiny", "--seed", str(pair.seed)]
    words += ["--dtype", str(pair.dtype).removeprefix("torch.")]
    for name in ([layers] if isinstance(layers, str) else list(layers or [])):
        words += ["--layer", name]
    lines = ["clips: " + "; ".join(f"{p} ({w.numel()} samples, {encoder_frames(w.numel())} encoder frames"
                                     + (f", {described[k]}" if k < len(described) else "") + ")"
                                     for k, (p, w) in enumerate(zip(paths, waves))),
             "reproduce alone: " + shlex.join(words)]
    try:
        from parity.repro import write_repro

        repro = write_repro(pair, inputs, layer, folder / "repro")
        lines.append(f"standalone repro of {layer}: {repro} (python {repro}/repro.py)")
    except (ValueError, RuntimeError, OSError) as err:
        lines.append(f"no standalone repro of {layer}: {str(err).splitlines()[0] if str(err) else err}")
    return "\n".join(lines)


_FOLDER = None
