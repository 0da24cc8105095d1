"""A porting bug planted on each shipped path is caught by that path's parity command and by the check's path run
(``parity.check.run_path``, what ``parity check`` runs through ``parity/tests/test_paths.py``), named at the layer or
generation step that introduces it; the unmodified tree passes each (``parity/tests/test_paths.py``).

Each plant sits on code that only its own path executes, so the other parity commands pass it: the unfused LoRA
merge (the fused layout merges elsewhere), a merge that only a compiled graph takes, a static-cache decode step.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fms_granite_speech.lora as lora_module
import fms_granite_speech.model as model_module
import fms_granite_speech.projector as projector_module
from fms_granite_speech.static_cache import ATTN_NAME, StaticDecoder
from parity.check import run_path
from parity.cli import main

# -- the plants -----------------------------------------------------------------------------------------------------


def v_delta_into_the_key(monkeypatch):
    """Unfused layout only: the LoRA v_proj delta merged into the key projection (the fused layout is untouched)."""
    spec = lora_module.LORA_TARGETS["v_proj"]
    monkeypatch.setitem(lora_module.LORA_TARGETS, "v_proj", spec._replace(unfused="attn.in_proj.key"))


_merge = model_module.GraniteSpeech.merge_audio_embeddings


def merge_ignores_the_mask_when_compiled(self, input_ids, text_embeds, audio_embeds, input_features_mask=None):
    """Compiled graphs only: the padded audio tokens of a shorter clip are merged as if real."""
    if torch.compiler.is_compiling():
        input_features_mask = None
    return _merge(self, input_ids, text_embeds, audio_embeds, input_features_mask)


def mask_before_marking_the_slot(self, tokens, positions, slot):
    """The static decode step builds its mask before marking the current slot written: a token cannot see itself."""
    cache = self.cache
    mask = cache.written[:, None, :].clone()
    cache.written.index_fill_(1, slot, True)
    logits, _ = self.model(tokens, position_ids=positions, past_key_value_states=cache.layers, use_cache=True,
                           attn_name=ATTN_NAME, mask=mask, cache_position=slot, last_n_tokens=1)
    logits = logits[:, -1]
    return logits.argmax(dim=-1), logits


def write_one_slot_early(self, tokens, positions, slot):
    """The static decode step writes its keys and values one slot early, over the previous token's."""
    cache = self.cache
    cache.written.index_fill_(1, slot, True)
    logits, _ = self.model(tokens, position_ids=positions, past_key_value_states=cache.layers, use_cache=True,
                           attn_name=ATTN_NAME, mask=cache.written[:, None, :], cache_position=slot - 1,
                           last_n_tokens=1)
    logits = logits[:, -1]
    return logits.argmax(dim=-1), logits


def always_an_extra_window(x, window_size):
    """One zero window too many on every clip: the audio token count is off by ``num_queries``."""
    b, t, he = x.shape
    nb = (t + window_size - 1) // window_size + 1
    return F.pad(x, (0, 0, 0, nb * window_size - t)).reshape(b * nb, window_size, he)


# -- unfused weights --------------------------------------------------------------------------------------------------


def test_an_unfused_lora_target_is_named_at_the_attention_it_feeds(monkeypatch, tmp_path):
    v_delta_into_the_key(monkeypatch)
    results = run_path("unfused")
    for case, result in results.items():
        assert not result.passed, case
        assert result.first_divergent == "decoder.layers.0.attn", (case, result.first_divergent)
        # the layer alone on HF's exact input introduces it: a porting bug there, not an inherited error
        assert not result.layer("decoder.layers.0.attn").introduced.passed
        assert all(r.passed for r in result.layers if r.name.startswith(("encoder", "projector", "features")))
    # the command a porter runs for the path: a verdict (exit 1) naming it
    assert main(["diff", "--unfused", "--report-dir", str(tmp_path), "--quiet"]) == 1
    assert json.loads((tmp_path / "parity-report.json").read_text())["first_divergent"] == "decoder.layers.0.attn"
    # the fused layout (every other command) does not take this path
    assert main(["diff", "--report-dir", str(tmp_path / "fused"), "--quiet"]) == 0


# -- the whole-forward compile -----------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.slow  # one whole-forward compile (backend eager) of the planted tree and one eager run: about a minute
def test_a_compiled_only_merge_bug_is_named_at_the_merged_embeddings(monkeypatch, pair):
    monkeypatch.setattr(model_module.GraniteSpeech, "merge_audio_embeddings", merge_ignores_the_mask_when_compiled)
    result = run_path("compiled-whole", pair=pair)["batch_short_first"]
    assert not result.passed and result.first_divergent == "decoder.merged_embeddings", result.first_divergent
    assert all(r.passed for r in result.layers if r.name.startswith(("encoder", "projector", "features")))
    # eager, the same tree passes: only the compiled path takes the planted branch
    eager = run_path("eager", pair=pair)["batch_short_first"]
    assert eager.passed


# -- the static-cache decode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plant", [mask_before_marking_the_slot, write_one_slot_early])
@pytest.mark.parametrize("path", ["static", "static-compiled"])
def test_a_static_cache_bug_is_named_at_its_first_step(monkeypatch, plant, path):
    monkeypatch.setattr(StaticDecoder, "_step", plant)
    result = run_path(path)[path]
    assert not result.passed and not result.logits_passed
    # the prefill is untouched: step 0 passes, the first decode step (1) is where the logits diverge
    assert result.steps[0].passed and result.first_failing_step == 1, result.verdict
    assert result.first_divergent_layer is None  # the prompt's forward passes layer by layer: a decode-path bug
    assert any("decode path" in n for n in result.notes)
    # FMS generate (every other generation command) does not take this path
    assert run_path("generate")["generate"].passed


def test_parity_generate_static_exits_1_naming_the_step(monkeypatch, capsys):
    monkeypatch.setattr(StaticDecoder, "_step", mask_before_marking_the_slot)
    assert main(["generate", "--static", "--max-new-tokens", "8", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "logits exceed the tolerance from step 1" in out or "first failing step 1" in out, out


# -- a token-count divergence in generation -------------------------------------------------------------------------------


def test_a_token_count_bug_is_a_generate_verdict_naming_the_projector(monkeypatch, capsys):
    monkeypatch.setattr(projector_module, "split_windows", always_an_extra_window)
    assert main(["generate", "--max-new-tokens", "8", "--quiet"]) == 1  # a divergence, not a usage error (2)
    out = capsys.readouterr()
    assert "FMS (generate) failed on inputs HF generated from" in out.out
    assert "first diverges at layer projector" in out.out, out.out
    assert "error" not in out.err
    result = run_path("static")["static"]
    assert result.fms_error is not None and result.first_divergent_layer.startswith("projector")
