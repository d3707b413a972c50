"""The built-in tiny models: `tiny-llama`, `tiny-qwen2` and `tiny-mistral` name random
checkpoints made on first use (no download) and kept in the user's cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUILTIN = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-mistral": "mistral"}


def resolve_model(model: str) -> str:
    if model not in BUILTIN or Path(model).exists():
        return model
    cache = Path(os.environ.get("TP_ENGINE_CACHE", "~/.cache/tp-engine")).expanduser()
    target = cache / model
    if not (target / "config.json").is_file():
        from tp_engine.model.tiny import make_tiny_model

        cache.mkdir(parents=True, exist_ok=True)
        # built aside and renamed, so concurrent ranks never see half a checkpoint
        staging = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=cache))
        try:
            make_tiny_model(staging, arch=BUILTIN[model])
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
