"""parity: layer-by-layer comparison of the FMS Granite Speech model with the HF transformers reference.

Pieces (Polygraphy-style: capture -> compare -> report, the CLI and pytest plugin thin over them):
``pathmap`` (the HF<->FMS module-path map, as data), ``capture`` (forward hooks), ``metrics`` (per-tensor error
statistics and dtype-aware tolerances), ``compare`` (the engine), ``report`` and ``cli``.
"""
