"""The one settings builder of the tests: dicts through the real decoder (validation included)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_pool.config import Settings, decode_settings

#: The ``source`` every test settings error names.
SOURCE = "test settings"


def make_settings(
    models: Mapping[str, Mapping[str, Any]] | None = None,
    raw: Mapping[str, Any] | None = None,
    *,
    base_dir: str | Path = ".",
) -> Settings:
    """:class:`config.Settings` from ``raw`` (a whole settings mapping) with ``models`` (model name
    → its keys) added to ``raw``'s ``engine.models``.  A model given in ``models`` gets
    ``model_path = "<name>.gguf"`` unless it says otherwise (the fake backends never read it);
    ``raw`` is decoded as given.  Relative paths resolve against ``base_dir``."""
    data: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (raw or {}).items()}
    if models is not None:
        engine = data.setdefault("engine", {})
        all_models = dict(engine.get("models", {}))
        for name, keys in models.items():
            all_models[name] = {"model_path": f"{name}.gguf", **keys}
        engine["models"] = all_models
    return decode_settings(data, source=SOURCE, base_dir=str(base_dir))
