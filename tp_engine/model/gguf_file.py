"""A GGUF file (llama.cpp's format): its metadata, its tensors, and row ranges dequantized.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per
array element and takes 2.5-3.3 s on SmolLM2's 98k tokens and merges, in every process that
opens the file; this parse takes a tenth of that. The `gguf` package still supplies the types,
their block sizes and the dequantization itself.

Quantized blocks run along a row (a tensor's first GGUF dimension), so any range of rows is
read and dequantized alone, and so is a range of columns that falls on block boundaries."""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

GGUF_MAGIC = b"GGUF"
_U64 = struct.Struct("<Q")
SUPPORTED_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"))
_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


def _scales(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """A block's 32 four-bit values: the low nibbles are the first 16, the high the rest."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


# the three plain block formats, in one vectorized pass (the gguf package works through them
# in groups of rows, several times slower: 0.9 s of a SmolLM2 rank's load); the same values
_SIMPLE_BLOCKS = {
    GGMLQuantizationType.Q8_0: lambda b: _scales(b, 0) * b[:, 2:].view(np.int8),
    GGMLQuantizationType.Q4_0: lambda b: _scales(b, 0) * (_nibbles(b[:, 2:]) - 8),
    GGMLQuantizationType.Q4_1: lambda b: _scales(b, 0) * _nibbles(b[:, 4:]) + _scales(b, 2),
}


class GGUFError(ValueError):
    """A GGUF file that cannot be read; the message names the file (and the tensor)."""


class _Cursor:
    def __init__(self, data: mmap.mmap, file: Path):
        self.data, self.at, self.file = data, 0, file

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise GGUFError(f"{self.file}: the header ends early (truncated file?)")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        size = self.unpack("<Q")
        raw = self.data[self.at:self.at + size]
        if len(raw) != size:
            raise GGUFError(f"{self.file}: the header ends early (truncated file?)")
        self.at += size
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: 49k tokens and 49k merges in SmolLM2), in a
        tight loop over the bytes."""
        data, at, length = self.data, self.at, _U64.unpack_from
        out = []
        for _ in range(count):
            size = length(data, at)[0]
            out.append(data[at + 8:at + 8 + size].decode("utf-8", errors="replace"))
            at += 8 + size
        if at > len(data):
            raise GGUFError(f"{self.file}: the header ends early (truncated file?)")
        self.at = at
        return out

    def value(self, kind: int) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:  # numbers in one read
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self.data, dtype, count, self.at)
                self.at += values.nbytes
                return values.tolist()
            if item == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFError(f"{self.file}: unknown metadata value type {kind}")
        return self.unpack(_SCALARS[kind])


class GGUFTensor:
    """One tensor: `shape` in numpy order (rows, columns), its rows dequantized on demand."""

    def __init__(self, file: Path, name: str, dims: list[int], qtype: int, raw: np.ndarray):
        self.file, self.name, self.raw = file, name, raw
        self.shape = tuple(reversed(dims))
        try:
            self.qtype = GGMLQuantizationType(qtype)
        except ValueError:
            raise GGUFError(f"{file}: tensor {name}: unknown GGML type {qtype}") from None

    def check_supported(self) -> None:
        if self.qtype not in SUPPORTED_TYPES:
            raise GGUFError(f"{self.file}: tensor {self.name}: type {self.qtype.name} is not "
                            f"supported ({', '.join(t.name for t in SUPPORTED_TYPES)} are)")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32: only their blocks are read."""
        self.check_supported()
        block, size = GGML_QUANT_SIZES[self.qtype]
        width = self.shape[-1]
        per_row = width // block * size
        raw = self.raw[start * per_row:stop * per_row].reshape(stop - start, per_row)
        return self._dequantized(raw, width)

    def _dequantized(self, raw: np.ndarray, width: int) -> np.ndarray:
        """[rows, bytes of `width` values] -> [rows, width] float32."""
        fast = _SIMPLE_BLOCKS.get(self.qtype)
        if fast is not None:
            rows = fast(raw.reshape(-1, GGML_QUANT_SIZES[self.qtype][1]))
        else:
            rows = dequantize(raw, self.qtype)
        rows = rows.reshape(raw.shape[0], width)
        return rows if rows.flags.writeable else rows.copy()  # F32 is a view of the file

    def columns(self, start: int, stop: int) -> np.ndarray | None:
        """Columns [start, stop) of every row as float32, reading only their blocks; None
        when the range does not fall on block boundaries."""
        self.check_supported()
        block, size = GGML_QUANT_SIZES[self.qtype]
        if start % block or stop % block or len(self.shape) != 2:
            return None
        blocks = self.raw.reshape(self.shape[0], -1, size)[:, start // block:stop // block]
        part = np.ascontiguousarray(blocks).reshape(self.shape[0], -1)
        return self._dequantized(part, stop - start)

    def all(self) -> np.ndarray:
        flat = self.rows(0, int(np.prod(self.shape[:-1], dtype=np.int64)))
        return flat.reshape(self.shape)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise GGUFError(f"{path}: cannot open: {e}") from None
        self._map = np.frombuffer(mapped, dtype=np.uint8)  # the tensors' bytes, read on use
        cursor = _Cursor(mapped, path)
        if mapped[:4] != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
        cursor.at = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        num_tensors, num_fields = cursor.unpack("<Q"), cursor.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_fields):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.unpack("<I"))
        infos = []
        for _ in range(num_tensors):
            name = cursor.string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cursor.at // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            self.tensors[name] = self._tensor(name, dims, qtype, data_start + offset)

    def _tensor(self, name: str, dims: list[int], qtype: int, start: int) -> GGUFTensor:
        tensor = GGUFTensor(self.path, name, dims, qtype, self._map[:0])
        block, size = GGML_QUANT_SIZES.get(tensor.qtype, (1, 0))
        if dims and dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name}: row length {dims[0]} is not a "
                            f"multiple of {tensor.qtype.name}'s block of {block}")
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * size
        if start + nbytes > len(self._map):
            raise GGUFError(f"{self.path}: tensor {name} runs past the end of the file "
                            "(truncated file?)")
        tensor.raw = self._map[start:start + nbytes]
        return tensor


@functools.lru_cache(maxsize=4)
def open_gguf(path: str | Path) -> GGUFFile:
    """One parse per file and process: the config, the tokenizer and the loader share it."""
    return GGUFFile(path)


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf file in a directory without a
    config.json. None when `path` is a Hugging Face checkpoint directory."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise GGUFError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}):"
                        " name the one to load")
    return files[0] if files else None
