"""A small GGUF reader: metadata and the tensor table from the file header, tensors dequantized on demand.

`gguf.GGUFReader` parses every vocabulary entry into its own numpy view (tens of seconds for Gemma 3's 262k
tokens); this reads the header in well under a second and maps tensor data lazily. Dequantization uses the `gguf`
package. transformers' own reader cannot be used: it imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from typing import Any

import numpy as np

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
# Fixed-size GGUF value types: u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
  (length,) = struct.unpack_from("<Q", buf, pos)
  pos += 8
  return buf[pos:pos + length].decode("utf-8"), pos + length


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
  """One metadata value (arrays as lists) and the offset just past it."""
  if value_type in _SCALAR_FORMATS:
    fmt = "<" + _SCALAR_FORMATS[value_type]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
  if value_type == _STRING:
    return _read_string(buf, pos)
  if value_type == _ARRAY:
    element_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if element_type in _SCALAR_FORMATS:
      fmt = f"<{count}{_SCALAR_FORMATS[element_type]}"
      return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
    values = []
    for _ in range(count):
      value, pos = _read_value(buf, pos, element_type)
      values.append(value)
    return values, pos
  raise ValueError(f"unknown GGUF metadata value type {value_type}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  shape: tuple[int, ...]  # numpy (row-major) order: the reverse of GGUF's dims
  ggml_type: int
  offset: int  # absolute byte offset in the file


def _read_header(path: str) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
  """Metadata and tensor table of a GGUF file (v2/v3, little-endian); tensor data is never read."""
  with open(path, "rb") as f:
    head = f.read(24)
    if head[:4] != _GGUF_MAGIC or len(head) < 24:
      raise ValueError(f"{path}: not a GGUF file (it does not start with a GGUF header)")
    version, tensor_count, kv_count = struct.unpack("<IQQ", head[4:])
    if version not in _GGUF_VERSIONS:
      raise ValueError(f"{path}: GGUF version {version} is not supported (supported: {_GGUF_VERSIONS})")
    metadata, pos, key = {}, 24, None
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      try:
        for _ in range(kv_count):
          key, pos = _read_string(buf, pos)
          (value_type,) = struct.unpack_from("<I", buf, pos)
          metadata[key], pos = _read_value(buf, pos + 4, value_type)
        raw = []
        for _ in range(tensor_count):
          key, pos = _read_string(buf, pos)
          (n_dims,) = struct.unpack_from("<I", buf, pos)
          dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
          ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
          pos += 4 + 8 * n_dims + 12
          raw.append((key, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
      except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read GGUF header entry {key!r} ({e}); the file is truncated or corrupt"
                        ) from e
  alignment = int(metadata.get("general.alignment", 32))
  data_start = -(-pos // alignment) * alignment
  tensors = {name: TensorInfo(shape, ggml_type, data_start + offset) for name, shape, ggml_type, offset in raw}
  return metadata, tensors


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Every metadata key of a GGUF file with its value."""
  return _read_header(os.fspath(path))[0]


class GGUFFile:
  """Metadata, tensor table and fp32 dequantization of one GGUF file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.metadata, self.tensors = _read_header(self.path)

  def dequantize(self, name: str) -> np.ndarray:
    """The tensor as fp32 in numpy order (for matrices: [rows = output features, cols = input features])."""
    import gguf  # pylint: disable=import-outside-toplevel
    info = self.tensors[name]
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(info.shape) // block * type_size
    raw = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=info.offset)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
      dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)
      if dtype is None:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
      return raw.view(dtype).astype(np.float32).reshape(info.shape)
    rows = raw.reshape(-1, info.shape[-1] // block * type_size)
    return gguf.quants.dequantize(rows, qtype).astype(np.float32).reshape(info.shape)
