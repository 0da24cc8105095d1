"""FMS's own ``get_model`` conventions, the way ibm-fms's ``tests/models/test_getmodel_datatype.py`` and
``test_getmodel_fusedweights.py`` check them for llama, re-targeted to Granite Speech ``tiny``.

One change from upstream: the checkpoints are written with safetensors (upstream uses ``torch.save``), since this
project never unpickles. FMS's ``get_model(..., model_path=FILE)`` loads them with ``source="fms"``, the adapter
this project registers for FMS-format state dicts (``registration._fms_decoder_layout``: the decoder's q/k/v and
gate/up tensors in the layout the model is built with).
"""

from __future__ import annotations

import copy

import pytest
import torch
from fms.models import get_model
from fms.utils.fusion import apply_unfuse_weights
from safetensors.torch import save_file

import fms_granite_speech  # noqa: F401 -- registers granite_speech with FMS

FUSED = (".qkv_fused.", ".wg1_fused.")
UNFUSED = (".in_proj.query.", ".in_proj.key.", ".in_proj.value.", ".ff_sub_layer.w1.", ".ff_sub_layer.wg.")


def _save(sd: dict, path) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _decoder_layout(sd: dict) -> str:
    keys = [k for k in sd if k.startswith("decoder.")]
    fused = all(any(f in k for k in keys) for f in FUSED)
    unfused = all(any(u in k for k in keys) for u in UNFUSED)
    assert fused != unfused, "the decoder holds both layouts, or neither"
    return "fused" if fused else "unfused"


# -- one dtype (test_getmodel_datatype.py) -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[torch.float32, torch.float16], ids=["fp32_sd", "fp16_sd"])
def state_dict(request):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    try:
        sd = get_model("granite_speech", "tiny", model_path=None).state_dict()
    finally:
        torch.set_default_dtype(previous)
    return sd, request.param


def test_datatype_default(state_dict):
    sd, dtype = state_dict
    assert {v.dtype for v in sd.values()} == {dtype}  # BatchNorm keeps no int64 step counter


@pytest.mark.parametrize("data_type, expected", [(None, None), ("float16", torch.float16),
                                                 ("float32", torch.float32)], ids=["as_sd", "force_fp16", "force_fp32"])
def test_datatype_from_a_checkpoint(state_dict, tmp_path, data_type, expected):
    sd, dtype = state_dict
    path = _save(sd, tmp_path / "model.safetensors")
    loaded = get_model("granite_speech", "tiny", model_path=path, data_type=data_type).state_dict()
    assert {v.dtype for v in loaded.values()} == {expected or dtype}


# -- fused and unfused weights (test_getmodel_fusedweights.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return get_model("granite_speech", "tiny", model_path=None)


@pytest.mark.parametrize("fused_weights", [True, False])
def test_fusion_without_a_checkpoint(fused_weights):
    sd = get_model("granite_speech", "tiny", model_path=None, fused_weights=fused_weights).state_dict()
    assert _decoder_layout(sd) == ("fused" if fused_weights else "unfused")


@pytest.mark.parametrize("target", [None, False, True], ids=["fused_weights=None", "fused_weights=False",
                                                             "fused_weights=True"])
@pytest.mark.parametrize("source_layout", ["fused", "unfused"])
def test_fusion_from_a_checkpoint_of_either_layout(reference, tmp_path, source_layout, target):
    model = reference if source_layout == "fused" else apply_unfuse_weights(copy.deepcopy(reference))
    assert _decoder_layout(model.state_dict()) == source_layout
    path = _save(model.state_dict(), tmp_path / "model.safetensors")
    kwargs = {} if target is None else {"fused_weights": target}
    loaded = get_model("granite_speech", "tiny", model_path=path, **kwargs)
    assert _decoder_layout(loaded.state_dict()) == ("unfused" if target is False else "fused")
    ids = torch.randint(0, loaded.config.decoder.src_vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids), reference(ids)
    if target is False:  # separate q/k/v and gate/up GEMMs: the same weights, another accumulation order
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)  # torch's own float32 defaults
    else:  # the fused layout the reference has: the very same tensors
        assert torch.equal(got, want)
