"""torch.compile of the FMS model (fms_granite_speech.compile): dynamic audio length, graph breaks, hooks.

Compiled with backend="eager" (dynamo tracing, guards and recompiles exactly as with inductor, without inductor's
C++ codegen, which takes over a minute per graph on a 2-core CPU). Only the encoder is compiled where that suffices.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from fms_granite_speech.compile import compile_model, compile_modules, explain_graph_breaks, is_compiled, uncompile
from parity.capture import Capture

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def pair_inputs(pair, inputs):
    """The shared tiny pair and its default inputs (tests/conftest.py), as one fixture."""
    return pair, inputs


def test_bad_arguments_raise_clear_errors(pair_inputs):
    pair, _ = pair_inputs
    with pytest.raises(ValueError, match="backend"):
        compile_model(pair.fms, backend="nope")
    with pytest.raises(ValueError, match="mode"):
        compile_model(pair.fms, backend="eager", mode="max-autotune")
    with pytest.raises(TypeError, match="encoder"):
        compile_model(torch.nn.Linear(2, 2))
    assert not is_compiled(pair.fms.encoder)


@pytest.mark.slow  # inductor, two lengths: about 16 s on 2 cores (the slower tier)
def test_encoder_new_length_reuses_graph_and_hooks_do_not_change_outputs(pair_inputs):
    pair, inputs = pair_inputs
    enc = pair.fms.encoder
    feats = inputs.input_features
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = enc(feats)
        compile_modules([enc], backend="eager")
        try:
            first = enc(feats)
            assert counters["stats"]["unique_graphs"] == 1
            # a clip of a new length (contiguous, as the feature extractor makes it): no recompile
            shorter = feats[0, :150].clone().unsqueeze(0)  # fresh strides, as a new clip has
            out_short = enc(shorter)
            assert counters["stats"]["unique_graphs"] == 1
            assert out_short.shape[1] == 150
            # hooks on submodules of a compiled module run inside it (one documented recompile per hooked state)
            with Capture(pair.fms, ["encoder.blocks.8", "encoder.blocks.3.attn"]) as cap:
                hooked = enc(feats)
            assert counters["stats"]["unique_graphs"] == 2
            assert [len(v) for v in cap.outputs.values()] == [1, 1]
            unhooked = enc(feats)  # hooks removed: the unhooked graph is reused, not the stale hooked one
            assert counters["stats"]["unique_graphs"] == 2
        finally:
            uncompile([enc])
        with Capture(pair.fms, ["encoder.blocks.8"]) as cap_eager:
            hooked_eager = enc(feats)
    assert not is_compiled(enc)
    assert torch.equal(hooked, first) and torch.equal(unhooked, first)
    assert torch.equal(hooked_eager, eager)
    # the hooked compiled run records what the eager run records for that block
    torch.testing.assert_close(cap.outputs["encoder.blocks.8"][0], cap_eager.outputs["encoder.blocks.8"][0])
    torch.testing.assert_close(first, eager)


@pytest.mark.slow  # inductor over each piece: about 20 s on 2 cores (the slower tier)
def test_zero_graph_breaks(pair_inputs):
    pair, inputs = pair_inputs
    reports = {r.piece: r for r in explain_graph_breaks(pair.fms, inputs)}
    assert list(reports) == ["forward", "encoder", "projector", "decoder"]  # the whole model, then its pieces
    for piece in reports:
        assert reports[piece].graph_break_count == 0, reports[piece].reasons
        assert reports[piece].graph_count == 1
