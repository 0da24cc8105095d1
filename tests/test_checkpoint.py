"""Loading HF Granite Speech checkpoint folders into FMS: get_model (source="hf" and "hf_pretrained") and
checkpoint.load_checkpoint, against transformers' own model and its own reloading of the same folder.

Tiny config, float32, CPU, seeded realistic weights, non-zero LoRA B. Logits are compared as
``fms_logits * logits_scaling`` vs HF logits (FMS's Granite divides by ``logits_scaling``, transformers 5.x does not;
transformers 5.17's ``GraniteSpeechForConditionalGeneration.forward``).
"""

import json
import shutil

import pytest
import torch

import fms_granite_speech as fgs
from fms.models import get_model
from fms.utils import serialization
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GraniteSpeechForConditionalGeneration
from transformers.models.granite_speech.feature_extraction_granite_speech import (
    GraniteSpeechFeatureExtractor as HFExtractor,
)

from fms_granite_speech.checkpoint import check_safetensors_folder, load_checkpoint, read_lora_config
from fms_granite_speech.config import LoRAConfig, get_config
from fms_granite_speech.features import load_wav, shipped_audio
from fms_granite_speech.model import GraniteSpeech
from fms_granite_speech.testing import (
    build_hf_model,
    lora_weights_are_nontrivial,
    random_input_ids,
    write_hf_checkpoint,
)

TOL = 1e-5  # relative L2 error of the logits


def rel_l2(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def hf(cfg):
    model = build_hf_model(cfg, seed=1)
    assert lora_weights_are_nontrivial(model)
    return model


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def inputs(cfg):
    clips = [load_wav(shipped_audio(n))[0][0] for n in ("transcribe", "fox")]
    feats = HFExtractor()(clips)
    ids = random_input_ids(cfg, feats["audio_embed_sizes"], seed=4)
    return ids, feats["input_features"], feats["input_features_mask"]


@pytest.fixture(scope="module")
def hf_logits(hf, inputs):
    ids, features, mask = inputs
    with torch.no_grad():
        return hf(input_ids=ids, input_features=features, input_features_mask=mask).logits


@pytest.fixture(scope="module")
def reference(ckpt, inputs):
    """Logits of the FMS model loaded by load_checkpoint from the single-file folder (shared by exactness checks)."""
    with torch.no_grad():
        return load_checkpoint(ckpt)(*inputs)


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_written_folder_is_what_transformers_writes_and_reloads(ckpt, hf, inputs, hf_logits):
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= set(names)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "language_model.model.model.layers.0.self_attn.q_proj.weight" in keys  # transformers 5.17 layout
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert "language_model.lm_head.weight" not in keys  # tied
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    # HF's own loading path (base from the folder, then the peft adapter) reproduces the model exactly.
    reloaded = GraniteSpeechForConditionalGeneration.from_pretrained(ckpt).eval()
    assert reloaded._hf_peft_config_loaded
    ids, features, mask = inputs
    with torch.no_grad():
        got = reloaded(input_ids=ids, input_features=features, input_features_mask=mask).logits
    assert torch.equal(got, hf_logits)


def test_get_model_source_hf_matches_hf(ckpt, cfg, inputs, hf_logits, reference):
    model = get_model("granite_speech", "tiny", model_path=str(ckpt), source="hf")
    assert isinstance(model, GraniteSpeech) and not model.training and model.adapter_enabled
    got = _logits(model, inputs)
    assert rel_l2(got * cfg.decoder.logits_scaling, hf_logits) < TOL
    assert torch.equal(got, reference)


def test_load_checkpoint_matches_hf(ckpt, cfg, inputs, hf_logits, reference):
    assert rel_l2(reference * cfg.decoder.logits_scaling, hf_logits) < TOL
    model = load_checkpoint(ckpt, variant="tiny")
    assert model.config == cfg
    assert torch.equal(_logits(model, inputs), reference)


def test_get_model_hf_pretrained(ckpt, cfg, inputs, reference):
    model = get_model("hf_pretrained", model_path=str(ckpt))
    assert isinstance(model, GraniteSpeech)
    assert model.config == cfg  # architecture from config.json, LoRA rank/alpha/targets from adapter_config.json
    assert torch.equal(_logits(model, inputs), reference)


def test_sharded_checkpoint_with_index(hf, cfg, inputs, reference, tmp_path):
    folder = write_hf_checkpoint(hf, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (folder / "model.safetensors").exists()
    files, adapter = check_safetensors_folder(folder, for_glob=True)
    assert [f.name for f in files] == shards and adapter.name == "adapter_model.safetensors"
    assert torch.equal(_logits(load_checkpoint(folder), inputs), reference)
    assert torch.equal(_logits(get_model("granite_speech", "tiny", model_path=str(folder), source="hf"), inputs),
                       reference)

    # A stale shard from another save: FMS's glob would mix it in (and transformers would not), so every loader of
    # the project refuses the folder, naming the stray file.
    shutil.copy(folder / shards[0], folder / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors.*get_model loads every"):
        fgs.get_model("tiny", model_path=folder)
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors"):
        get_model("hf_pretrained", model_path=str(folder))
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors"):
        load_checkpoint(folder)


def test_untied_embeddings(cfg, inputs, tmp_path):
    untied = cfg.replace(decoder=cfg.decoder.updated(tie_heads=False))
    hf_untied = build_hf_model(untied, seed=2)
    assert hf_untied.lm_head.weight is not hf_untied.model.language_model.embed_tokens.weight
    folder = write_hf_checkpoint(hf_untied, tmp_path / "untied")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "language_model.lm_head.weight" in f.keys()
    ids, features, mask = inputs
    with torch.no_grad():
        want = hf_untied(input_ids=ids, input_features=features, input_features_mask=mask).logits
    for model in (load_checkpoint(folder), get_model("granite_speech", "tiny", model_path=str(folder), source="hf",
                                                     config=untied)):
        head, emb = model.decoder.head.weight, model.decoder.base_model.embedding.weight
        assert head is not emb and not torch.equal(head, emb)
        assert rel_l2(_logits(model, inputs) * cfg.decoder.logits_scaling, want) < TOL


def test_runtime_and_4x_layouts(hf, cfg, ckpt, inputs, reference, tmp_path):
    """The same weights named as a live HF model's state_dict() (peft-wrapped: base_layer, lora_A.default) and as
    transformers-4.x checkpoints (``language_model.model.layers``) load to bit-identical models."""
    runtime_sd = hf.state_dict()
    assert any(".base_layer." in k for k in runtime_sd) and any(".lora_A.default." in k for k in runtime_sd)
    with torch.device("meta"):
        model = GraniteSpeech(cfg)
    serialization.load_state_dict_into_model(model, dict(runtime_sd), "granite_speech", "hf")
    model.post_init()
    assert torch.equal(_logits(model, inputs), reference)

    old = tmp_path / "v4"
    old.mkdir()
    for name in ("config.json", "adapter_config.json"):
        shutil.copy(ckpt / name, old / name)
    for name, rename in (
        ("model.safetensors", ("language_model.model.model.", "language_model.model.")),
        ("adapter_model.safetensors", ("base_model.model.model.language_model.",
                                       "base_model.model.language_model.model.")),
    ):
        with safe_open(str(ckpt / name), "pt") as f:
            sd = {k.replace(*rename): f.get_tensor(k) for k in f.keys()}
        assert any(k.startswith(rename[1]) for k in sd)
        save_file(sd, str(old / name))
    assert torch.equal(_logits(load_checkpoint(old), inputs), reference)
    assert torch.equal(_logits(get_model("granite_speech", "tiny", model_path=str(old), source="hf"), inputs),
                       reference)


def _edited_copy(ckpt, dest, edit, file="model.safetensors"):
    shutil.copytree(ckpt, dest)
    with safe_open(str(dest / file), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, str(dest / file))
    return dest


@pytest.mark.parametrize(
    "file, edit, load_message, get_model_message",
    [
        (
            "model.safetensors",
            lambda sd: sd.pop("encoder.layers.3.attn.to_q.weight"),
            r"missing tensor 'encoder\.blocks\.3\.attn\.query\.weight'",
            r"not filled by the checkpoint.*encoder\.blocks\.3\.attn\.query\.weight",
        ),
        (
            "adapter_model.safetensors",
            lambda sd: sd.pop("base_model.model.model.language_model.layers.2.self_attn.v_proj.lora_B.weight"),
            r"missing tensor 'lora\.layers\.2\.v_proj\.B'",
            r"not filled by the checkpoint.*lora\.layers\.2\.v_proj\.B",
        ),
        (
            "model.safetensors",
            lambda sd: sd.update({"projector.qformer.bogus.weight": torch.zeros(3)}),
            r"unexpected tensor 'projector\.qformer\.bogus\.weight'",
            r"unexpected tensor 'projector\.qformer\.bogus\.weight'",
        ),
        (
            "model.safetensors",
            lambda sd: sd.update({"projector.linear.weight": torch.zeros(57, 40)}),
            r"'projector\.linear\.weight' has shape \[57, 40\], the model expects \[56, 40\]",
            r"'projector\.linear\.weight' has shape \[57, 40\], the model expects \[56, 40\]",
        ),
        (
            "model.safetensors",
            lambda sd: sd.pop("language_model.model.model.layers.1.self_attn.k_proj.weight"),
            r"model\.layers\.1\.self_attn\.k_proj\.weight",
            r"model\.layers\.1\.self_attn\.k_proj\.weight",
        ),
    ],
    ids=["missing-encoder", "missing-lora", "extra", "wrong-shape", "missing-fused-member"],
)
def test_bad_checkpoints_are_refused_naming_the_key(ckpt, tmp_path, file, edit, load_message, get_model_message):
    bad = _edited_copy(ckpt, tmp_path / "bad", edit, file)
    with pytest.raises(ValueError, match=load_message):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match=get_model_message):
        get_model("granite_speech", "tiny", model_path=str(bad), source="hf")


def test_load_checkpoint_lists_every_problem(ckpt, tmp_path):
    def edit(sd):
        sd.pop("encoder.out.bias")
        sd["extra.tensor"] = torch.zeros(2)
        sd["projector.query"] = torch.zeros(1, 3, 41)

    bad = _edited_copy(ckpt, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=r"3 problems") as err:
        load_checkpoint(bad)
    for key in ("encoder.out.bias", "extra.tensor", "projector.query"):
        assert key in str(err.value)


def test_adapter_declared_but_absent_and_variant_mismatch(ckpt, tmp_path):
    base_only = tmp_path / "base"
    shutil.copytree(ckpt, base_only)
    (base_only / "adapter_config.json").unlink()
    (base_only / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has_lora_adapter=true .* adapter=False"):
        load_checkpoint(base_only)
    assert load_checkpoint(base_only, adapter=False).config.lora is None
    with pytest.raises(ValueError, match=r"not filled by the checkpoint.*no adapter_model\.safetensors"):
        get_model("granite_speech", "tiny", model_path=str(base_only), source="hf")
    with pytest.raises(ValueError, match=r"has_lora_adapter=true .* adapter=False"):
        get_model("hf_pretrained", model_path=str(base_only))
    with pytest.raises(ValueError, match="does not describe the '3.3-2b' variant"):
        load_checkpoint(ckpt, variant="3.3-2b")


def _write_adapter_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 64, "lora_alpha": 32, "bias": "none", "target_modules": ["q_proj", "v_proj"]}
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_read_lora_config(ckpt, cfg, tmp_path):
    assert read_lora_config(ckpt) == cfg.lora  # the regex target_modules that add_adapter wrote
    released = read_lora_config(_write_adapter_config(tmp_path / "released"))  # the released checkpoints' form
    assert released == LoRAConfig(rank=64, alpha=32.0, target_modules=("q_proj", "v_proj"))
    assert released.scaling == 0.5
    assert read_lora_config(tmp_path / "nothing-here") is None
    with pytest.raises(ValueError, match="LoRA target 'query' is not a decoder projection"):
        read_lora_config(_write_adapter_config(tmp_path / "qformer", target_modules=["q_proj", "query"]))
    with pytest.raises(ValueError, match="use_dora"):
        read_lora_config(_write_adapter_config(tmp_path / "dora", use_dora=True))
    with pytest.raises(ValueError, match="use_rslora"):
        read_lora_config(_write_adapter_config(tmp_path / "rslora", use_rslora=True))
    with pytest.raises(ValueError, match="selects none of the decoder projections"):
        read_lora_config(_write_adapter_config(tmp_path / "regex", target_modules=r".*encoder.*to_q"))


def test_factory_overrides(cfg):
    no_lora = get_model("granite_speech", "tiny", device_type="meta", lora=None)
    wider = get_model("granite_speech", "tiny", device_type="meta", decoder={"src_vocab_size": 300})
    full = get_model("granite_speech", "3.3-2b", device_type="meta", config=cfg)
    assert no_lora.config.lora is None and not hasattr(no_lora, "lora")
    assert wider.decoder.head.weight.shape[0] == 300
    assert full.config == cfg
    with pytest.raises(TypeError, match=r"unknown Granite Speech config fields \['nlayers'\]"):
        get_model("granite_speech", "tiny", device_type="meta", nlayers=3)


def test_one_parity_pair_reads_each_file_of_the_folder_once(hf, tmp_path, monkeypatch):
    """``build_pair(checkpoint=DIR)`` with both models built: every file of the folder is opened once by this
    project's code (config.json and adapter_config.json read once, each safetensors header checked once, each
    tensor's data read once by the FMS loader); transformers is handed the parsed config and peft config, so it reads
    config.json no more (its own loader reads the weights, and peft the adapter file, for the reference side)."""
    import builtins
    import collections
    import io
    import traceback
    from pathlib import Path

    import safetensors

    from parity.pair import build_pair

    folder = write_hf_checkpoint(hf, tmp_path / "once")
    opens, tensors = collections.Counter(), collections.Counter()
    ours = ("/fms_granite_speech/", "/parity/")
    real_open, real_safe_open = builtins.open, safetensors.safe_open

    def counted_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).parent == folder:
            caller = next(f for f in reversed(traceback.extract_stack()[:-1])
                          if not f.filename.endswith(("pathlib.py", "/json/__init__.py")))
            project = any(o in caller.filename for o in ours) and "site-packages" not in caller.filename
            opens[(Path(file).name, "ours" if project else "library")] += 1
        return real_open(file, *args, **kwargs)

    class CountedSafeOpen:
        def __init__(self, filename, *args, **kwargs):
            self.name, self.inner = Path(filename).name, real_safe_open(filename, *args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return self.inner.get_slice(key)

        def get_tensor(self, key):
            tensors[(self.name, key)] += 1
            return self.inner.get_tensor(key)

    monkeypatch.setattr(builtins, "open", counted_open)
    monkeypatch.setattr(io, "open", counted_open)
    monkeypatch.setattr(safetensors, "safe_open", CountedSafeOpen)
    pair = build_pair(checkpoint=str(folder))
    pair.get("hf"), pair.get("fms")
    for name in ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors"):
        assert opens[(name, "ours")] == 1, (name, dict(opens))
    assert opens[("config.json", "library")] == 0, dict(opens)
    with real_safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {k for (file, k) in tensors if file == "model.safetensors"} == keys
    assert set(tensors.values()) == {1}, [k for k, v in tensors.items() if v != 1][:5]
