"""Pool settings: the msgspec schema of ``pool.toml`` and its one loader.

Public surface: :func:`load_settings`, :class:`Settings`, :class:`ModelSettings`,
:class:`SettingsError`.  This package decodes and validates; it never loads models.
"""

from llm_pool.config.machine import machine_cores
from llm_pool.config.settings import (
    BACKENDS,
    DEFAULT_SYSTEM_PROMPT,
    MODEL_KINDS,
    CT2Model,
    DecodingSettings,
    EngineSettings,
    ExLlamaV3Model,
    FairnessSettings,
    GGUFModel,
    LlamaServerModel,
    ModelSettings,
    RemoteModel,
    ServiceSettings,
    Settings,
    SettingsError,
    SettingsPaths,
    decode_settings,
    load_settings,
    resolve_model_path,
    settings_paths,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_SYSTEM_PROMPT",
    "MODEL_KINDS",
    "CT2Model",
    "ExLlamaV3Model",
    "GGUFModel",
    "LlamaServerModel",
    "RemoteModel",
    "DecodingSettings",
    "EngineSettings",
    "FairnessSettings",
    "ModelSettings",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "SettingsPaths",
    "decode_settings",
    "load_settings",
    "machine_cores",
    "resolve_model_path",
    "settings_paths",
]
