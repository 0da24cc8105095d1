"""Every execution path the project ships, compared with HF on the tiny variant (``parity.check.PATHS``).

``parity check`` gates what this module runs, so a porting bug on any shipped path (the unfused decoder layout,
``compile_model`` whole or by pieces, FMS generate on a padded batch, the static-cache decode eager and compiled)
fails the pre-merge gate, not only the command a porter might remember to run. The eager path is the tiny suite
(``test_tiny_suite.py``, every named case); tensor parallelism runs under torchrun in ``tests/test_tp.py``.
"""

from __future__ import annotations

import pytest

from parity.check import PATHS, run_path, shipped_path

DIFF_PATHS = [p.name for p in PATHS if not p.generation and p.name not in ("eager", "tp")]
GENERATION_PATHS = [p.name for p in PATHS if p.generation]


@pytest.mark.parametrize("name", DIFF_PATHS)
def test_each_diff_path_passes_every_mapped_layer(tiny_pair, record, name):
    shared = tiny_pair if name.startswith("compiled") else None  # the unfused path builds its own FMS side
    for case, result in run_path(name, pair=shared).items():
        record(result, name=f"tiny/float32/{name}/{case}")
        failing = [(r.name, r.reason) for r in result.layers if not r.passed]
        assert failing == [], f"{name} {case}: first divergent {result.first_divergent}"
        assert len(result.layers) == 136  # the pipelines, every encoder, projector and decoder row, the logits
        if name.startswith("compiled"):
            assert any("132 of 132 rows seen" in n for n in result.notes), result.notes
        else:
            assert result.provenance["fms_weights"].startswith("unfused")


@pytest.mark.parametrize("name", GENERATION_PATHS)
def test_each_generation_path_is_token_identical_and_conclusive(name):
    result = run_path(name, max_new_tokens=12)[name]
    assert result.fms_error is None
    assert result.varied, result.verdict  # a continuation that varies: the token comparison proves something
    assert result.tokens_identical and result.logits_passed, result.verdict
    assert len(result.steps) == 12 and all(s.passed for s in result.steps)
    assert result.engine == dict(shipped_path(name).run).get("engine", "generate")
    if name == "generate-batch":
        assert result.batch_size == 2
