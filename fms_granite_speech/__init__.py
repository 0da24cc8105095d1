"""IBM Granite Speech 3.3 on the Foundation Model Stack (ibm-fms).

Importing the package registers the model with FMS (``fms.models.get_model("granite_speech", variant,
model_path=DIR, source="hf")``, and ``get_model("hf_pretrained", model_path=DIR)`` for transformers folders whose
config names ``GraniteSpeechForConditionalGeneration``). ``get_model`` here is FMS's with the checkpoint folder
checked first; ``load_checkpoint(DIR)`` is the strict loader.

Modules: ``config`` (typed configs, named variants), ``conformer`` (encoder), ``projector`` (Q-Former), ``lora``
(the audio adapter), ``model`` (the model), ``registration`` (FMS registries, HF adapter steps), ``folder`` and
``checkpoint`` (loading HF folders), ``features`` / ``processor`` (audio and prompts), ``generation`` (FMS generate),
``compile`` (torch.compile), ``testing`` (seeded reference models for tests), ``speech5`` (Granite Speech 5.0's
encoder-only CTC model, FMS architecture ``granite_speech5``).
"""

from fms_granite_speech.config import (
    EncoderConfig,
    GraniteSpeechConfig,
    LoRAConfig,
    ProjectorConfig,
    VARIANTS,
    get_config,
)
from fms_granite_speech.model import GraniteSpeech
from fms_granite_speech.registration import get_model  # registers "granite_speech" with FMS
from fms_granite_speech.checkpoint import load_checkpoint, read_lora_config
from fms_granite_speech import speech5  # registers "granite_speech5" (Granite Speech 5.0, CTC) with FMS

__all__ = [
    "EncoderConfig",
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "LoRAConfig",
    "ProjectorConfig",
    "VARIANTS",
    "get_config",
    "get_model",
    "load_checkpoint",
    "read_lora_config",
    "speech5",
]
