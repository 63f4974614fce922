"""Fake of exllamav3/model/config.py (Config.from_directory)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from .._fake import MARKER_FILENAME

# Architecture strings registered in the real 1.6.5 wheel (exllamav3/architecture/*.py, arch_string)
KNOWN_ARCHITECTURES = frozenset({
    "AfmoeForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM", "BailingMoeV3ForCausalLM", "Cohere2ForCausalLM",
    "CohereForCausalLM", "DFlash2DraftModel", "DFlashDraftModel", "DFlashLagunaForCausalLM", "DeciLMForCausalLM",
    "DeepseekV3ForCausalLM", "DeepseekV4ForCausalLM", "Dots1ForCausalLM", "Ernie4_5_ForCausalLM",
    "Ernie4_5_MoeForCausalLM", "Exaone4ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration", "Gemma4AssistantForCausalLM", "Gemma4ForConditionalGeneration",
    "Gemma4UnifiedForConditionalGeneration", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM",
    "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "Glm5NextForConditionalGeneration",
    "GlmMoeDsaForCausalLM", "GptOssForCausalLM", "HCXVisionV2ForCausalLM", "HYV3ForCausalLM",
    "HyperCLOVAXForCausalLM", "IQuestCoderForCausalLM", "KimiLinearForCausalLM", "LagunaForCausalLM",
    "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Lfm2VlForConditionalGeneration", "LlamaForCausalLM",
    "MiMoForCausalLM", "MiMoV2ForCausalLM", "MiniMaxM2ForCausalLM", "Ministral3ForCausalLM",
    "Mistral3ForConditionalGeneration", "MistralForCausalLM", "MixtralForCausalLM", "MuseGlimmerAssistantModel",
    "MuseGlimmerForConditionalGeneration", "NemotronHForCausalLM", "NemotronH_Omni_Reasoning_V3",
    "Olmo3ForCausalLM", "OlmoHybridForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
    "Qwen2_5_VLForConditionalGeneration", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
    "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration", "Qwen3_5ForCausalLM",
    "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration",
    "Qwen4ExpForConditionalGeneration", "SeedOssForCausalLM", "SmolLM3ForCausalLM", "SolarOpenForCausalLM",
    "Spark2_5ForCausalLM", "Step3p5ForCausalLM", "Step3p7ForConditionalGeneration",
})


class InferParams:
    pass


class Config:
    """
    Real: architecture-specific subclass of exllamav3.model.config.Config, created by Config.from_directory().
    The fake has one class for every architecture string and only accepts directories written by
    tests/fakes/exllamav3_model.py:write_fake_exl3_model() (they carry the fake_exllamav3.json marker).
    """

    arch_string: str | None = None

    def __init__(self, directory: str, **kwargs: Any):
        from .model import Model

        self.directory = directory
        self.model_classes = {"text": Model}
        self.uuid = uuid.uuid4()
        self.config_filename = os.path.join(directory, "config.json")
        with open(self.config_filename, encoding="utf8") as f:
            self.config_dict = json.load(f)
        cd = self.config_dict
        arch = cd["architectures"][0]
        self.architecture = arch
        self.arch_string = arch

        with open(os.path.join(directory, MARKER_FILENAME), encoding="utf8") as f:
            self.fake_marker = json.load(f)

        self.bos_token_id = cd.get("bos_token_id")
        eos = cd.get("eos_token_id")
        self.pad_token_id = cd.get("pad_token_id")
        self.image_token_id = cd.get("image_token_id", cd.get("image_token_index"))
        self.vocab_size = cd.get("vocab_size")
        if isinstance(eos, list):
            self.eos_token_id_list = list(eos)
            self.eos_token_id = eos[0]
        else:
            self.eos_token_id = eos
            self.eos_token_id_list = [eos]
        self.eos_token_id_list = [e for e in self.eos_token_id_list if e is not None]
        self.initializer_range = cd.get("initializer_range", 0.02)

        self.hidden_size = cd["hidden_size"]
        self.num_q_heads = cd["num_attention_heads"]
        self.num_kv_heads = cd.get("num_key_value_heads", self.num_q_heads)
        self.head_dim = cd.get("head_dim") or self.hidden_size // self.num_q_heads
        self.intermediate_size = cd.get("intermediate_size")
        self.num_hidden_layers = cd["num_hidden_layers"]
        self.rms_norm_eps = cd.get("rms_norm_eps")
        self.tie_word_embeddings = cd.get("tie_word_embeddings", False)
        self.max_position_embeddings = cd.get("max_position_embeddings", 8192)
        self.pos_encoding_mode = "NONE"
        self.load_isq = False
        self.layer_map = kwargs.get("layer_map")
        self.layer_map_str = None
        self.infer_params = InferParams()
        self.quantization_config = cd.get("quantization_config")

    @staticmethod
    def from_directory(directory: str, **kwargs: Any) -> Config:
        """
        Real (exllamav3/model/config.py): opens <directory>/config.json (FileNotFoundError if missing), asserts
        "architectures" is present, has one entry and is a registered architecture (AssertionError otherwise),
        then instantiates the architecture's Config subclass.
        """
        config_filename = os.path.join(directory, "config.json")
        with open(config_filename, encoding="utf8") as f:
            config_dict = json.load(f)

        assert "architectures" in config_dict, f"No architecture defined in {config_filename}"
        archs = config_dict["architectures"]
        assert len(archs) == 1, f"Multiple architectures defined in {config_filename}"
        arch = archs[0]
        assert arch in KNOWN_ARCHITECTURES, f"Unknown architecture {arch} in {config_filename}"

        # Fake-only check: refuse real model weights
        assert os.path.exists(os.path.join(directory, MARKER_FILENAME)), \
            f"{directory} is not a fake exllamav3 model (no {MARKER_FILENAME}); the CPU fake cannot run real weights"
        return Config(directory, **kwargs)
