"""Deriving the module map of a full-size Granite Speech pair on the meta device: wall time and peak memory.

    python benchmarks/derive_full.py [--variant 3.3-2b]

Both models are built on the meta device (names, shapes and ties only); ``parity.derive`` tags one FMS loader group
of HF tensors at a time in float64, pushes it through the registered ``granite_speech`` adapter and decodes the
lineage. Prints one table row: variant, HF tensors, rows derived, unpaired, seconds, the largest tagged group (MiB)
and the process's peak RSS (GiB).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from tabulate import tabulate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3.3-2b")
    args = parser.parse_args(argv)
    from transformers import GraniteSpeechForConditionalGeneration

    from fms_granite_speech.config import GraniteSpeechConfig
    from fms_granite_speech.model import GraniteSpeech
    from fms_granite_speech.testing import add_lora_adapter
    from parity.derive import derive

    config = GraniteSpeechConfig.variant(args.variant) if hasattr(GraniteSpeechConfig, "variant") else None
    if config is None:
        from fms_granite_speech.config import VARIANTS

        config = VARIANTS[args.variant]
    start = time.perf_counter()
    with torch.device("meta"):
        hf = GraniteSpeechForConditionalGeneration(config.to_hf())
        if config.lora is not None:
            add_lora_adapter(hf, config.lora)
        fms = GraniteSpeech(config)
    built = time.perf_counter() - start
    dmap = derive(hf, fms, "granite_speech", to_checkpoint=None, exclude=[r"lora_"], cache=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(tabulate([(args.variant, dmap.hf_tensors, len(dmap.pairs), len(dmap.unpaired), f"{dmap.seconds:.1f}",
                     f"{built:.1f}", f"{dmap.peak_group_mib:.0f}", f"{peak:.2f}")],
                   headers=("variant", "HF tensors", "rows", "unpaired", "derive s", "meta build s",
                            "largest group MiB", "peak RSS GiB")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
