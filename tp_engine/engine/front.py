"""What Engine and AsyncEngine share: construction from keywords or YAML, state, and the
lifecycle calls. The front holds the core; the core never refers back to the front, so dropping
the last reference to an engine terminates it at once (no cycle waits for the collector)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tp_engine.config import EngineConfig
from tp_engine.engine.core import EngineCore
from tp_engine.engine.lifecycle import track
from tp_engine.errors import ConfigError, EngineError


class EngineFront:
    def __init__(self, model: str | Path, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", **kwargs: Any):
        try:
            config = EngineConfig(model=str(model), tensor_parallel_size=tensor_parallel_size,
                                  device=device, dtype=dtype, **kwargs)
            self._core = EngineCore(config)
        except EngineError:
            raise
        except (ValueError, TypeError, OSError) as e:  # the user's to fix: say so plainly
            raise ConfigError(str(e)) from e
        track(self)

    @classmethod
    def from_config(cls, path: str | Path, **overrides: Any):
        config = EngineConfig.from_yaml(path, **overrides)
        return cls(**config.keywords())

    @property
    def state(self) -> str:
        core = getattr(self, "_core", None)
        return core.state if core is not None else "failed"

    @property
    def config(self) -> EngineConfig:
        return self._core.config

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._core.group.procs]

    @property
    def tokenizer(self):
        return self._core.tokenizer

    def terminate(self, timeout: float | None = None) -> None:
        core = getattr(self, "_core", None)  # absent when the constructor raised
        if core is not None:
            core.terminate(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        self.terminate()
