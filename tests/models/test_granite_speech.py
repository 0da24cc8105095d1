"""FMS's own model test suites applied to Granite Speech, the way ibm-fms's ``tests/models/test_llava_next.py``
applies them to LlavaNext: ``ModelConfigTestSuite``, ``ModelConsistencyTestSuite`` and ``ModelCompileTestSuite`` on
the ``tiny`` variant, with expectation files under ``tests/resources/expectations`` captured once with
``pytest tests/models --capture_expectation`` and committed (as upstream keeps them).

Adaptations for audio, each the counterpart of one in upstream's llava_next test:

* the signature input carries audio as llava_next's carries ``pixel_values``: ``input_features`` /
  ``input_features_mask`` of a shipped speech clip from the project's feature extractor, and ``input_ids`` holding
  that clip's run of ``<|audio|>`` tokens (``_get_signature_optional_params``); ``TestGraniteSpeechTextOnly`` runs the
  same suites on a text-only prompt;
* ``_maybe_get_initialized_parameter`` (the suite's hook for parameters its ``randn`` fill cannot serve, as
  upstream's GPTQ test uses it): the Conformer's BatchNorm ``running_var`` must be positive;
* ``test_config_passed_to_model_and_updated`` is defined per model, as upstream's is.

Nothing is skipped: upstream skips ``test_config_params_passed_as_kwargs_to_model`` for llava_next because its nested
configs come back from ``as_dict()`` as dicts; ``GraniteSpeechConfig`` turns nested dicts back into its dataclasses,
so that test runs and passes here.
"""

import pytest
import torch
from fms.testing._internal.model_test_suite import (
    ConfigFixtureMixin,
    ModelCompileTestSuite,
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelFixtureMixin,
)
from fms.utils.config import ModelConfig

from fms_granite_speech.config import get_config
from fms_granite_speech.features import GraniteSpeechFeatureExtractor, load_wav, shipped_audio
from fms_granite_speech.model import GraniteSpeech
from fms_granite_speech.testing import random_input_ids

pytestmark = pytest.mark.compile  # ModelCompileTestSuite compiles the whole forward with inductor


class GraniteSpeechFixtures(ConfigFixtureMixin, ModelFixtureMixin):
    """The tiny variant (real depth, small widths, a LoRA adapter) and its uninitialised model."""

    @pytest.fixture(scope="class", autouse=True)
    def uninitialized_model(self, config):
        return GraniteSpeech(config)

    @pytest.fixture(scope="class", autouse=True)
    def config(self) -> ModelConfig:
        return get_config("tiny")

    def _maybe_get_initialized_parameter(self, key, parameter):
        if key.endswith("batch_norm.running_var"):
            return torch.rand_like(parameter) + 0.5  # a variance: positive
        return None


def _speech_inputs():
    config = get_config("tiny")
    wave, _ = load_wav(shipped_audio("fox"))
    feats = GraniteSpeechFeatureExtractor()(wave[0])
    ids = random_input_ids(config, feats.audio_token_counts, text_len=9, seed=1)
    return ids, feats.input_features, feats.input_features_mask


_IDS, _FEATURES, _MASK = _speech_inputs()


class TestGraniteSpeech(ModelConfigTestSuite, ModelConsistencyTestSuite, ModelCompileTestSuite, GraniteSpeechFixtures):
    _get_signature_params = ["input_ids_or_embeds"]
    _get_signature_input_ids = _IDS
    _get_signature_optional_params = {"input_features": _FEATURES, "input_features_mask": _MASK}

    def test_config_passed_to_model_and_updated(self, model, config):
        """The constructor merges kwargs into a copy of the config, never the caller's object (as upstream's)."""
        model = type(model)(config=config, audio_token_index=config.audio_token_index - 1,
                            decoder={"pad_id": config.decoder.pad_id + 1})
        assert model.get_config() is not config
        config.audio_token_index -= 1
        config.decoder.pad_id += 1
        assert model.get_config().as_dict() == config.as_dict()

    @pytest.mark.slow  # inductor over the whole 16-block forward: about 2 minutes on 2 cores (the slower tier)
    def test_model_compile_no_graph_breaks(self, model):
        super().test_model_compile_no_graph_breaks(model)


class TestGraniteSpeechTextOnly(ModelConsistencyTestSuite, ModelCompileTestSuite, GraniteSpeechFixtures):
    """The same model on a prompt without audio (the decoder alone, as a text-only chat turn runs it)."""

    _get_signature_params = ["input_ids_or_embeds"]
    _get_signature_input_ids = random_input_ids(get_config("tiny"), [0], text_len=20, seed=2)
    _get_signature_optional_params = {}

    @pytest.mark.slow  # inductor over the decoder: about 23 s on 2 cores (the slower tier)
    def test_model_compile_no_graph_breaks(self, model):
        super().test_model_compile_no_graph_breaks(model)


class GraniteSpeechPlusFixtures(GraniteSpeechFixtures):
    """``tiny-plus``: the tiny variant whose encoder concatenates the hidden state after block 3 with its output
    (granite-speech-4.1-2b-plus's ``cat_hidden_layers: [3]``), the projector reading twice the encoder width."""

    @pytest.fixture(scope="class", autouse=True)
    def config(self) -> ModelConfig:
        return get_config("tiny-plus")


class TestGraniteSpeechPlus(ModelConfigTestSuite, ModelConsistencyTestSuite, ModelCompileTestSuite,
                            GraniteSpeechPlusFixtures):
    _get_signature_params = ["input_ids_or_embeds"]
    _get_signature_input_ids = _IDS
    _get_signature_optional_params = {"input_features": _FEATURES, "input_features_mask": _MASK}

    def test_config_passed_to_model_and_updated(self, model, config):
        model = type(model)(config=config, encoder={"cat_hidden_layers": (2,)})
        assert model.get_config() is not config
        assert model.get_config().encoder.cat_hidden_layers == (2,) and config.encoder.cat_hidden_layers == (3,)

    @pytest.mark.slow  # inductor over the whole 16-block forward (the slower tier)
    def test_model_compile_no_graph_breaks(self, model):
        super().test_model_compile_no_graph_breaks(model)


class GraniteSpeech40Fixtures(GraniteSpeechFixtures):
    """``tiny-4.0``: granite-4.0-1b-speech's structure, no modality LoRA adapter."""

    @pytest.fixture(scope="class", autouse=True)
    def config(self) -> ModelConfig:
        return get_config("tiny-4.0")


class TestGraniteSpeech40(ModelConfigTestSuite, ModelConsistencyTestSuite, GraniteSpeech40Fixtures):
    """The config and consistency suites. The compile suite is not applied: without an adapter the forward is the
    tiny variant's graph minus the (post_init-merged, forward-free) LoRA, which ``TestGraniteSpeech``'s fullgraph
    compile already traces; compiling it again would add two minutes to the slower tier and trace nothing new."""

    _get_signature_params = ["input_ids_or_embeds"]
    _get_signature_input_ids = _IDS
    _get_signature_optional_params = {"input_features": _FEATURES, "input_features_mask": _MASK}

    def test_config_passed_to_model_and_updated(self, model, config):
        model = type(model)(config=config, audio_token_index=config.audio_token_index - 1)
        assert model.get_config() is not config and model.get_config().lora is None
        assert model.get_config().audio_token_index == config.audio_token_index - 1


class TestGraniteSpeech41(TestGraniteSpeech40):
    """``tiny-4.1``: granite-speech-4.1-2b's structure (no modality LoRA adapter, a granite text_config), through the
    same suites as ``tiny-4.0`` (the FMS graph is the same: the two 4.x tinies differ in the text_config class
    transformers reads)."""

    @pytest.fixture(scope="class", autouse=True)
    def config(self) -> ModelConfig:
        return get_config("tiny-4.1")

    def test_config_passed_to_model_and_updated(self, model, config):
        super().test_config_passed_to_model_and_updated(model, config)
        assert config.decoder_type == "granite" and config.lora is None


# -- Granite Speech 5.0: its own architecture (fms_granite_speech.speech5) ------------------------------------------


def _speech5_features():
    from fms_granite_speech.speech5 import GraniteSpeech5FeatureExtractor

    wave, _ = load_wav(shipped_audio("fox"))
    return GraniteSpeech5FeatureExtractor()(wave[0])["input_features"]


class GraniteSpeech5Fixtures(ConfigFixtureMixin, ModelFixtureMixin):
    """The ``tiny`` variant of ``granite_speech5`` (real depth and subsampling, small widths)."""

    @pytest.fixture(scope="class", autouse=True)
    def uninitialized_model(self, config):
        from fms_granite_speech.speech5 import GraniteSpeech5

        return GraniteSpeech5(config)

    @pytest.fixture(scope="class", autouse=True)
    def config(self) -> ModelConfig:
        from fms_granite_speech.speech5 import VARIANTS

        return VARIANTS["tiny"]

    def _maybe_get_initialized_parameter(self, key, parameter):
        if key.endswith("batch_norm.running_var"):
            return torch.rand_like(parameter) + 0.5  # a variance: positive
        return None


class TestGraniteSpeech5(ModelConfigTestSuite, ModelConsistencyTestSuite, ModelCompileTestSuite,
                         GraniteSpeech5Fixtures):
    # the features travel as an optional parameter: FMS's compile test calls get_signature without ``inp`` (its
    # default is token ids), so a model fed features alone names none of get_signature's positional inputs
    _get_signature_params: list = []
    _get_signature_input_ids = None
    _get_signature_optional_params = {"input_features": _speech5_features()}

    def test_config_passed_to_model_and_updated(self, model, config):
        model = type(model)(config=config, context_size=8)
        assert model.get_config() is not config and model.get_config().context_size == 8
        assert config.context_size == 16

    @pytest.mark.slow  # inductor over the 16 blocks (the slower tier)
    def test_model_compile_no_graph_breaks(self, model):
        super().test_model_compile_no_graph_breaks(model)
