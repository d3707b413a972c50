"""The model's shape, read from a Hugging Face `config.json` (hub style or current transformers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    checkpoint_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """The config of a checkpoint directory or of a GGUF file (or a directory holding one)."""
        from tp_engine.model.gguf_file import find_gguf, open_gguf

        gguf = find_gguf(path)
        if gguf is None:
            return cls.from_dir(path)
        from tp_engine.model.gguf_checkpoint import gguf_model_config

        return gguf_model_config(open_gguf(gguf))

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no config.json and no .gguf file in it")
        raw = json.loads(file.read_text())
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            found = archs or raw.get("model_type")
            raise ValueError(f"{source}: unsupported architecture {found!r}; tp-engine runs"
                             f" {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = raw["num_attention_heads"]
        qwen2 = arch == "Qwen2ForCausalLM"
        rope = _rope_parameters(raw)
        window = raw.get("sliding_window")
        if qwen2 and not raw.get("use_sliding_window", False):
            window = None  # Qwen2 carries a window size it does not use unless told to
        eos = raw.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases and no o bias; Llama's `attention_bias` covers all four.
            qkv_bias=qwen2 or bool(raw.get("attention_bias", False)),
            o_bias=not qwen2 and bool(raw.get("attention_bias", False)),
            rope_theta=float(rope.pop("rope_theta", 10000.0)),
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
            sliding_window=window,
            checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype") or "float32",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise a ValueError naming the parameter when `tp` cannot shard this model. Sizes
        that do not divide the heads or the MLP shard unevenly (see model/parallel.py)."""
        if not 1 <= tp <= self.num_heads:
            raise ValueError(f"tensor_parallel_size={tp}: must be 1 to num_attention_heads="
                             f"{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Current transformers writes `rope_parameters`; the hub's files have `rope_theta` and
    `rope_scaling` (with `type` or `rope_type`)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params
