"""tp-engine: a multi-process tensor-parallel LLM inference runtime with an exact lifecycle."""

from tp_engine.engine.async_engine import AsyncEngine
from tp_engine.engine.llm import Engine
from tp_engine.engine.request import RequestOutput
from tp_engine.engine.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
