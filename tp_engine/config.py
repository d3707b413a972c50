"""The one configuration object, passed everywhere: built from Engine keywords or a YAML file
whose keys are the keyword names."""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tp_engine.model.builtin import resolve_model
from tp_engine.model.config import ModelConfig

DEVICES = ("auto", "cuda", "cpu")
AUTH_KEY_ENV = "TP_ENGINE_AUTH_KEY"  # the shared secret of the ranks of a multi-node job
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_DECODE_STEPS = 64  # per message: bounds how long one message may hold the workers


@dataclass
class EngineConfig:
    model: str
    tensor_parallel_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None         # default: the model's max_position_embeddings
    block_size: int = 16
    # the most decode steps a worker runs from one message when every running sequence decodes
    # and none waits: fewer messages and less Python per token, but a request that arrives
    # meanwhile waits for the run, and EOS is seen only at its end (the tokens after it are
    # computed and dropped). Runs double from 2 up to this while no request arrives.
    decode_steps: int = 16
    num_kv_blocks: int | None = None         # default: from the memory settings below
    kv_cache_memory_gb: float = 0.25         # per CPU worker
    gpu_memory_utilization: float = 0.85     # share of a GPU's free memory the cache may take
    seed: int = 0
    start_method: str = "forkserver"         # or "spawn"; "torchrun" when torchrun made the ranks
    startup_timeout: float = 120.0
    terminate_timeout: float = 5.0
    host: str | None = None                  # bind the control socket on TCP here, else IPC
    auth_key: str | None = field(default=None, repr=False)  # hex HMAC secret for TCP frames

    def __post_init__(self) -> None:
        self.model = resolve_model(str(self.model))
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.start_method not in ("forkserver", "spawn", "torchrun"):
            raise ValueError(f"start_method must be 'forkserver', 'spawn' or 'torchrun', "
                             f"got {self.start_method!r}")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens",
                     "block_size", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decode_steps > MAX_DECODE_STEPS:
            raise ValueError(f"decode_steps must be at most {MAX_DECODE_STEPS}, "
                             f"got {self.decode_steps}")
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"model directory {self.model} does not exist")
        limit = ModelConfig.from_dir(self.model).max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}")
        self.max_model_len = self.max_model_len or limit
        if self.host is not None and self.auth_key is None:
            self.auth_key = os.environ.get(AUTH_KEY_ENV) or secrets.token_hex(32)

    @property
    def auth_key_bytes(self) -> bytes | None:
        """The HMAC key of TCP frames; None on IPC."""
        return bytes.fromhex(self.auth_key) if self.host is not None else None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of Engine keywords")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**raw)

    def worker_dtype(self, checkpoint_dtype: str) -> str:
        """"auto" keeps the checkpoint's dtype on a GPU and computes in float32 on a CPU."""
        if self.dtype != "auto":
            return self.dtype
        if self.device == "cpu":
            return "float32"
        return checkpoint_dtype if checkpoint_dtype in DTYPES else "bfloat16"


def _cuda_available() -> bool:
    """Without importing torch (a second the controller need not pay) unless it is loaded:
    an NVIDIA driver and some visible device mean the workers will find a GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.is_available()
    return os.path.exists("/proc/driver/nvidia/version")

