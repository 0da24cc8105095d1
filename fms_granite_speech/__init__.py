"""IBM Granite Speech 3.3 on the Foundation Model Stack (ibm-fms).

Importing the package registers the model with FMS (``fms.models.get_model("granite_speech", variant,
model_path=DIR, source="hf")``, and ``get_model("hf_pretrained", model_path=DIR)`` for transformers folders whose
config names ``GraniteSpeechForConditionalGeneration``). ``load_checkpoint(DIR)`` is the strict loader.
"""

from fms_granite_speech.config import (
    EncoderConfig,
    GraniteSpeechConfig,
    LoRAConfig,
    ProjectorConfig,
    VARIANTS,
    get_config,
)
from fms_granite_speech.model import GraniteSpeech  # noqa: E402  (registers "granite_speech" with FMS)
from fms_granite_speech.checkpoint import load_checkpoint, read_lora_config  # noqa: E402

__all__ = [
    "EncoderConfig",
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "LoRAConfig",
    "ProjectorConfig",
    "VARIANTS",
    "get_config",
    "load_checkpoint",
    "read_lora_config",
]
