"""Build a rank's shard of the model and fill it from the checkpoint: safetensors files or a
GGUF file.

Each rank opens the files itself and reads only the rows or columns its layers own: through
`safe_open(...).get_slice` for safetensors, so no rank materialises a whole tensor it shards.
A GGUF tensor is dequantized in blocks: a rank dequantizes only its rows of a tensor split by
rows (q, k, v, gate, up, the embedding), and only its columns of one split by columns
(o_proj, down_proj) where they fall on block boundaries (quantized blocks run along a row),
else the whole rows, keeping its columns."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from tp_engine.model.config import ModelConfig
from tp_engine.model.gguf_checkpoint import gguf_tensors
from tp_engine.model.gguf_file import GGUFError, GGUFFile, GGUFTensor, find_gguf
from tp_engine.model.llama import CausalLM
from tp_engine.model.packed_linear import pack_model
from tp_engine.model.parallel import TensorParallel, copy_shard

log = logging.getLogger(__name__)

class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; names the file."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, tp: TensorParallel, dtype: torch.dtype,
               device: torch.device | str = "cpu", max_positions: int | None = None,
               config: ModelConfig | None = None) -> CausalLM:
    """This rank's shard of the checkpoint at `path` (`config`: its ModelConfig, if parsed)."""
    config = config or ModelConfig.load(path)
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
    gguf = find_gguf(path)
    files = [gguf] if gguf is not None else checkpoint_files(path)
    for file in files:
        try:
            with _tensors(file, model.config) as tensors:
                loaded |= _load_tensors(model, file, tensors, params)
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


@contextmanager
def _tensors(file: Path, config: ModelConfig) -> Iterator[Iterator[tuple[str, str, Any]]]:
    """(name in the file, Hugging Face name, slice source) of every tensor of one file."""
    if file.suffix == ".gguf":
        # opened here, not through open_gguf's cache: a worker needs the file only while it
        # loads, and the mapping goes with the last tensor's reference
        yield ((tensor.name, name, GGUFSource(tensor, heads))
               for name, tensor, heads in gguf_tensors(GGUFFile(file), config))
        return
    with safe_open(file, framework="pt", device="cpu") as f:
        yield ((name, name, f.get_slice(name)) for name in f.keys())


def _load_tensors(model: CausalLM, file: Path, tensors: Iterator[tuple[str, str, Any]],
                  params: dict) -> set[tuple[str, object]]:
    loaded = set()
    for file_name, tensor_name, source in tensors:
        target = _target(model, tensor_name)
        if target is None:
            continue
        name, shard = target
        if name not in params:
            log.warning("%s: tensor %s has no place in the model; skipped",
                        file.name, file_name)
            continue
        param = params[name]
        loader = getattr(param, "weight_loader", load_replicated)
        try:
            loader(param, source, shard)
        except GGUFError as e:  # names the file and tensor already
            raise CheckpointError(str(e)) from None
        except ValueError as e:
            raise CheckpointError(f"{file}: tensor {file_name}: {e}") from None
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


class GGUFSource:
    """What a layer's weight loader slices: `[a:b]` reads rows a..b, `[:, a:b]` (or `[:]`)
    the whole tensor, as a float32 torch tensor. `heads`, for a permuted query or key: the
    number of heads whose rows go back to the Hugging Face order."""

    def __init__(self, tensor: GGUFTensor, heads: int | None = None):
        self.tensor, self.heads = tensor, heads

    def get_shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows = index[0] if isinstance(index, tuple) else index
        if len(self.tensor.shape) == 1:  # a bias or a norm: small, read whole
            return torch.from_numpy(self._unpermuted(self.tensor.all(), 0))[index]
        start, stop, step = rows.indices(self.tensor.shape[0])
        if step != 1:
            raise ValueError(f"{self.tensor.name}: only a plain range of rows can be read")
        if isinstance(index, tuple) and (start, stop) == (0, self.tensor.shape[0]):
            first, last, _ = index[1].indices(self.tensor.shape[1])
            part = self.tensor.columns(first, last)  # every row, only these columns' blocks
            if part is not None:
                return torch.from_numpy(self._unpermuted(part, 0))
        out = torch.from_numpy(self._unpermuted(self.tensor.rows(start, stop), start))
        if isinstance(index, tuple):  # the rows are in hand: now the columns
            out = out[(slice(None), *index[1:])]
        return out

    def _unpermuted(self, rows: np.ndarray, start: int) -> np.ndarray:
        if self.heads is None:
            return rows
        head_dim = self.tensor.shape[0] // self.heads
        if start % head_dim or rows.shape[0] % head_dim:
            raise ValueError(f"rows {start}..{start + rows.shape[0]} of {self.tensor.name} "
                             f"split a head of {head_dim} rows")
        # per head: [pairs, 2, ...] (llama.cpp) -> [2, pairs, ...] (Hugging Face)
        per_head = rows.reshape(-1, head_dim // 2, 2, *rows.shape[1:])
        return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(rows.shape)
