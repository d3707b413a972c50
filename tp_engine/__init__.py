"""tp-engine: a multi-process tensor-parallel LLM inference runtime with an exact lifecycle.

The public names load on first use: a worker process imports `tp_engine.wire` and the model,
never the controller's API (its tokenizer, jinja2, tqdm)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tp_engine.engine.api import AsyncEngine, Engine
    from tp_engine.engine.request import RequestOutput
    from tp_engine.engine.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_HOMES = {"AsyncEngine": "tp_engine.engine.api", "Engine": "tp_engine.engine.api",
          "RequestOutput": "tp_engine.engine.request",
          "SamplingParams": "tp_engine.engine.sampling_params"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tp_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
