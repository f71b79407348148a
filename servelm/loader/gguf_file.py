"""A fast reader of GGUF files (llama.cpp's format, versions 2 and 3): metadata and tensor infos.

`gguf.GGUFReader` builds a numpy view per item of every metadata array, which for a tokenizer
of ~50k tokens and ~50k merges takes ~2.2 s per open (SmolLM2 on the CPU machine; servelm
opened the file twice per start, transformers' tokenizer a third time). This reader parses the
header with `struct` over one read-only memory map (0.035 s) and maps tensor data only when
asked for.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; then
metadata (key string, u32 value type, value), tensor infos (name string, u32 n_dims, u64 dims in
ggml order (fastest first), u32 ggml type, u64 offset), padding to `general.alignment` (32), data.
A string is a u64 byte length and UTF-8 bytes; an array is a u32 item type, u64 count, items.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# value type -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# array item type -> numpy dtype, for reading numeric arrays in one call
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}
# ggml types that GGUFReader exposes as typed elements (everything else: raw uint8 blocks)
_PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                27: np.int64, 28: np.float64}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    tensor_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file


class GGUFFile:
    """`metadata` (key -> str, int, float, bool or list) and `tensors` (file order) of a .gguf.

    The file stays mapped while this object or an array from `tensor_data` lives.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise ValueError(f"{path!r} is empty, not a GGUF file") from None
        buf = self._map
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (it does not start with b'GGUF')")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 and 3 are; a "
                             "huge number means a big-endian file)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ggml_type, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), int(ggml_type), int(offset)))
        align = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // align) * align
        self.tensors = [GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in infos]

    def field(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor_data(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as `gguf.GGUFReader` gives them (a read-only view of the file):
        plain types as elements of shape reversed(info.shape); quantized ones as uint8 blocks of
        shape [*reversed(info.shape)[:-1], row bytes], which `gguf.quants.dequantize` takes."""
        np_shape = tuple(reversed(info.shape))
        n_elems = int(np.prod(info.shape)) if info.shape else 1
        if info.tensor_type in _PLAIN_TYPES:
            dtype = np.dtype(_PLAIN_TYPES[info.tensor_type])
            count = n_elems
        else:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.tensor_type)]
            if np_shape[-1] % block_size:
                raise ValueError(f"{self.path!r}: tensor {info.name} has rows of {np_shape[-1]} "
                                 f"values, not a multiple of its quant block ({block_size})")
            dtype = np.dtype(np.uint8)
            count = n_elems // block_size * type_size
            np_shape = (*np_shape[:-1], np_shape[-1] // block_size * type_size)
        if info.offset + count * dtype.itemsize > len(self._map):
            raise ValueError(f"{self.path!r}: tensor {info.name} runs past the end of the file; "
                             "the file is truncated")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=info.offset).reshape(np_shape)

    # ---- parsing --------------------------------------------------------------------------
    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        self._pos = start + n
        return self._map[start:self._pos].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path!r}: unknown GGUF metadata value type {vtype}")
        item_type, count = self._unpack("<IQ")
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
            self._pos += count * dtype.itemsize
            return values.tolist()
        if item_type == _STRING:
            return [self._string() for _ in range(count)]
        return [self._value(item_type) for _ in range(count)]  # nested arrays
