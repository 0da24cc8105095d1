"""A standalone repro of one divergent row: the two modules, their weights and HF's recorded inputs, and a script.

``write_repro(pair, inputs, layer, out)`` writes a folder an upstream maintainer can run without the checkpoint, the
whole model or this parity engine (the script imports torch, safetensors, transformers and ``fms_granite_speech``):

* ``manifest.json``: the row, its kind, the two module paths, the HF call (each argument a saved tensor, a tuple of
  them, or a plain value), how the FMS module is called on it (the row's replay recipe), the bound, the dtype;
* ``hf_config.json`` / ``fms_config.json``: the two models' configs (the modules are built from them on the meta
  device, then only the row's module is given memory);
* ``hf_module.safetensors`` / ``fms_module.safetensors``: the row's parameters and buffers as each model holds them
  (HF's peft LoRA merged into the base weight, as FMS merges it; FMS's own LoRA-merged weights);
* ``inputs.safetensors``: the tensors of HF's recorded call (and what the FMS recipe needs besides, e.g. FMS's
  relative-distance table);
* ``repro.py``: builds both modules, loads the weights, runs both on the inputs, prints rel-L2 / max abs / cosine
  against the bound, exits 1 when they diverge (0 when they agree).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["RECIPES", "write_repro"]

# how the repro script calls the FMS module of each replay kind (parity.runner.REPLAYS, in data): "x" is the HF
# call's first tensor, a name is the HF call's argument of that name, "$NAME" a saved extra input
RECIPES: dict[str, dict] = {
    "module": {"args": ["x"]},
    "conformer_attn": {"args": ["x", "$attention_dists"]},
    "conformer_block": {"args": ["x", "$attention_dists"]},
    "qformer_cross": {"args": ["x", "encoder_hidden_states"]},
    "qformer_mlp": {"args": ["input_tensor"]},
    "qformer_layer": {"args": ["x", "encoder_hidden_states"]},
    "decoder_attn": {"args": ["x"], "first": True},
    "decoder_layer": {"kwargs": {"x": "x"}, "fixed": {"position_ids": None, "past_key_value_state": None,
                                                      "use_cache": False}},
    "logits": {"args": ["x"], "module": "decoder.head"},
}


def _merged_hf_state(module: nn.Module) -> dict:
    """The HF module's parameters and buffers by name, peft's LoRA merged into each base weight (``base_layer``
    unwrapped), so a module built from the config without peft takes them."""
    out = {}
    lora = {}
    for name, sub in module.named_modules():
        if hasattr(sub, "get_delta_weight") and hasattr(sub, "base_layer") and getattr(sub, "active_adapters", None):
            deltas = [sub.get_delta_weight(a) for a in sub.active_adapters if a in getattr(sub, "lora_A", {})]
            if deltas:
                lora[name] = sum(deltas)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if ".lora_" in name or name.startswith("lora_"):
            continue
        clean = name.replace(".base_layer.", ".").replace("base_layer.", "")
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else (
            "" if name.startswith("base_layer.") else None)
        value = t.detach()
        if owner is not None and clean.endswith("weight") and owner in lora:
            value = value + lora[owner].to(value.dtype)
        out[clean] = value.contiguous().clone()
    return out


def _spec(value: Any, key: str, tensors: dict) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return {"tuple": [_spec(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    return {"unsupported": type(value).__name__}


def write_repro(pair, inputs, layer: str, out: Union[str, Path], tolerance: Optional[dict] = None) -> Path:
    """Write the repro folder of parity row ``layer`` (see the module docstring); returns the folder.

    Raises:
        ValueError: an unknown layer, a row without a replay (the input pipelines) or of the merge kind, or a pair
            not built with both models (``memory="together"``).
    """
    from parity.capture import Capture
    from parity.compare import requested_pairs, set_adapters
    from parity.metrics import default_tolerance
    from parity.runner import bind, run_section

    rows = [p for p in requested_pairs(pair.config, layer) if p.name == layer]
    if not rows:
        raise ValueError(f"{layer} is not a parity row; `parity map --expand` lists them")
    p = rows[0]
    if p.kind is None or p.kind not in RECIPES:
        raise ValueError(f"{layer} ({p.kind or 'an input pipeline row'}) has no standalone repro; write one for a "
                         "block, layer or sub-module row (encoder.blocks.N..., projector.layers.N..., "
                         "decoder.layers.N..., logits)")
    hf, fms = pair.get("hf"), pair.get("fms")
    recipe = RECIPES[p.kind]
    cap = Capture(hf, [p.hf], store=False, call_args=True)
    with torch.no_grad(), set_adapters(pair, inputs.has_audio), cap:
        run_section("hf", hf, inputs.side("hf"), p.section, pair.dtype)
    calls = cap.call_args.get(p.hf) or []
    if not calls:
        raise ValueError(f"{p.hf} did not run on these inputs")
    args, kwargs = calls[0]
    hf_module = hf.get_submodule(p.hf)
    bound = bind(hf_module, args, kwargs)
    fms_path = recipe.get("module", p.fms)
    tensors: dict = {}
    call = {name: _spec(v, f"call.{name}", tensors) for name, v in bound.items()}
    if "$attention_dists" in recipe.get("args", []):
        tensors["extra.attention_dists"] = fms.encoder.attention_dists.detach().cpu().clone()
    out = Path(out)
    stage = out.with_name(f".{out.name}.writing")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        with set_adapters(pair, inputs.has_audio):
            save_file(_merged_hf_state(hf_module), str(stage / "hf_module.safetensors"))
            fms_state = {k: v.detach().contiguous().clone() for k, v in
                         list(fms.get_submodule(fms_path).named_parameters())
                         + list(fms.get_submodule(fms_path).named_buffers())}
        save_file(fms_state, str(stage / "fms_module.safetensors"))
        save_file(tensors, str(stage / "inputs.safetensors"))
        hf_config = hf.config.to_dict()
        (stage / "hf_config.json").write_text(json.dumps(hf_config, indent=1, default=str))
        (stage / "fms_config.json").write_text(json.dumps(pair.config.as_dict(), indent=1, default=str))
        tol = tolerance or default_tolerance(pair.dtype).to_dict()
        manifest = {"layer": layer, "kind": p.kind, "dtype": str(pair.dtype).removeprefix("torch."),
                    "hf_module": p.hf, "fms_module": fms_path, "hf_call": call, "fms_recipe": recipe,
                    "tolerance": tol, "how": "HF module on its recorded call; the FMS module on the same call, as its "
                                               "FMS parent calls it (parity.runner.REPLAYS)"}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (stage / "repro.py").write_text(_SCRIPT)
        (stage / "README.md").write_text(
            f"# Repro of `{layer}`\n\nThe HF module `{p.hf}` and the FMS module `{fms_path}` with their weights "
            f"({manifest['dtype']}) and HF's recorded inputs. Run `python repro.py` (needs torch, safetensors, "
            "transformers and fms-granite-speech; no checkpoint): it prints rel-L2, max abs and cosine against the "
            f"bound (max rel-L2 {tol['max_rel_l2']:g}) and exits 1 when the modules diverge.\n")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


_SCRIPT = '''"""Standalone repro: one HF module and its FMS port on HF's recorded inputs (see manifest.json, README.md).

Run: python repro.py   (exit 0: within the bound; 1: they diverge)
"""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def materialize(model, path, weights):
    """Only the row's module gets memory: built on the meta device with its model, then given its saved tensors."""
    module = model.get_submodule(path) if path else model
    for name, value in weights.items():
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if attr in target._parameters:
            target._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            target._buffers[attr] = value
    missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing:
        sys.exit(f"repro: {path} has tensors the folder does not hold: {missing[:5]}")
    return module.eval()


def value(spec, tensors):
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "tuple" in spec:
        return tuple(value(s, tensors) for s in spec["tuple"])
    if "unsupported" in spec:
        return None
    return spec["value"]


def main():
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    from fms_granite_speech.config import GraniteSpeechConfig as FMSConfig
    from fms_granite_speech.model import GraniteSpeech

    m = json.loads((HERE / "manifest.json").read_text())
    tensors = load_file(str(HERE / "inputs.safetensors"))
    with torch.device("meta"):
        hf_model = GraniteSpeechForConditionalGeneration(
            GraniteSpeechConfig.from_dict(json.loads((HERE / "hf_config.json").read_text())))
        fms_model = GraniteSpeech(FMSConfig.from_dict(json.loads((HERE / "fms_config.json").read_text())))
    hf = materialize(hf_model, m["hf_module"], load_file(str(HERE / "hf_module.safetensors")))
    fms = materialize(fms_model, m["fms_module"], load_file(str(HERE / "fms_module.safetensors")))
    call = {name: value(spec, tensors) for name, spec in m["hf_call"].items()}
    first = next(v for v in call.values() if isinstance(v, torch.Tensor))
    recipe = m["fms_recipe"]

    def arg(name):
        if name == "x":
            return first
        if name.startswith("$"):
            return tensors["extra." + name[1:]]
        return call[name]

    with torch.no_grad():
        ref = hf(**call)
        got = fms(*[arg(a) for a in recipe.get("args", [])],
                  **{k: arg(v) for k, v in recipe.get("kwargs", {}).items()}, **recipe.get("fixed", {}))
    ref = ref if isinstance(ref, torch.Tensor) else next(t for t in (ref.values() if hasattr(ref, "values") else ref)
                                                         if isinstance(t, torch.Tensor))
    got = got if isinstance(got, torch.Tensor) else next(t for t in got if isinstance(t, torch.Tensor))
    r, g = ref.double(), got.double()
    if r.shape != g.shape:
        print(f"{m['layer']}: shapes differ: HF {tuple(r.shape)}, FMS {tuple(g.shape)}")
        return 1
    rel = float((g - r).norm() / r.norm()) if float(r.norm()) else float((g - r).norm())
    cos = float(torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0))
    tol = m["tolerance"]
    ok = rel <= tol["max_rel_l2"] and cos >= tol["min_cosine"]
    print(f"{m['layer']} ({m['dtype']}): rel-L2 {rel:.3e} (bound {tol['max_rel_l2']:g}), max abs "
          f"{float((g - r).abs().max()):.3e}, cosine {cos:.9f}: {'within the bound' if ok else 'DIVERGES'}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the verdict is printed: skip the interpreter's teardown (torch's and transformers' module cleanup paged in
    # ~125 MB and took ~0.8 s on the pinned CUDA build, more than the row's own work)
    os._exit(status)
'''
