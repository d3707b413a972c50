"""Build a rank's shard of the model and fill it from the checkpoint's safetensors files.

Each rank opens the files itself and reads, through `safe_open(...).get_slice`, only the rows
or columns its layers own; no rank ever materialises a whole tensor that it shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from tp_engine.model.config import ModelConfig
from tp_engine.model.llama import CausalLM
from tp_engine.model.packed_linear import pack_model
from tp_engine.model.parallel import TensorParallel, copy_shard

log = logging.getLogger(__name__)

class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; names the file."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, tp: TensorParallel, dtype: torch.dtype,
               device: torch.device | str = "cpu", max_positions: int | None = None) -> CausalLM:
    config = ModelConfig.from_dir(path)
    config.check_tensor_parallel(tp.size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created once, directly in the final dtype
    try:
        with torch.device(device):
            model = CausalLM(config, tp, max_positions or config.max_position_embeddings)
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, path)
    pack_model(model)  # CPU: oneDNN copies of the linear weights (see packed_linear)
    return model.eval()


def checkpoint_files(path: str | Path) -> list[Path]:
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [root / name for name in names]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in the checkpoint directory {root}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index} names {file.name}, which does not exist")
    return files


def load_weights(model: CausalLM, path: str | Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {_expected_shards(name) for name in params}
    expected = {(name, shard) for name, shards in expected for shard in shards}
    loaded: set[tuple[str, object]] = set()
    for file in checkpoint_files(path):
        try:
            loaded |= _load_file(model, file, params)
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt or unreadable file: name it
            raise CheckpointError(f"{file}: {type(e).__name__}: {e}") from None
    if model.config.tie_word_embeddings:
        loaded |= {(n, s) for n, s in expected if n == "lm_head.weight"}
    missing = sorted(f"{n}" + (f"[{s}]" if s is not None else "") for n, s in expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors for: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))


def _load_file(model: CausalLM, file: Path, params: dict) -> set[tuple[str, object]]:
    loaded = set()
    with safe_open(file, framework="pt", device="cpu") as f:
        for tensor_name in f.keys():
            target = _target(model, tensor_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                log.warning("%s: tensor %s has no place in the model; skipped",
                            file.name, tensor_name)
                continue
            param = params[name]
            loader = getattr(param, "weight_loader", load_replicated)
            try:
                loader(param, f.get_slice(tensor_name), shard)
            except ValueError as e:
                raise CheckpointError(f"{file}: tensor {tensor_name}: {e}") from None
            loaded.add((name, shard))
    return loaded


def load_replicated(param: torch.nn.Parameter, source, shard=None) -> None:
    """Norm weights and other tensors every rank holds whole."""
    copy_shard(param, source[:], "replicated weight")


def _target(model: CausalLM, tensor_name: str) -> tuple[str, object] | None:
    if "rotary_emb.inv_freq" in tensor_name:
        return None
    if tensor_name == "lm_head.weight" and model.config.tie_word_embeddings:
        return None  # tied: the embedding's rows serve as the LM head
    for part, (merged, shard) in CausalLM.packed_modules.items():
        if f".{part}." in tensor_name:
            return tensor_name.replace(f".{part}.", f".{merged}."), shard
    return tensor_name, None


def _expected_shards(name: str) -> tuple[str, tuple]:
    if ".qkv_proj." in name:
        return name, ("q", "k", "v")
    if ".gate_up_proj." in name:
        return name, (0, 1)
    return name, (None,)
