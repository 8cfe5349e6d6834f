"""GGUF files: a small reader (metadata and the tensor table from the header, tensors dequantized on demand) and
`GGUFSource`, their tensors under Hugging Face names and conventions for the loader.

`gguf.GGUFReader` parses every vocabulary entry into its own numpy view (tens of seconds for Gemma 3's 262k
tokens); this reads the header in well under a second and maps tensor data lazily. Dequantization uses the `gguf`
package. transformers' own reader cannot be used: it imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import re
import struct
from typing import Any

import numpy as np

from ipo_jax.model.params import hf_name_of_gguf

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
    self._check_complete()

  def _qtype(self, name: str) -> Any:
    import gguf  # pylint: disable=import-outside-toplevel
    try:
      return gguf.GGMLQuantizationType(self.tensors[name].ggml_type)
    except ValueError:
      raise ValueError(f"{self.path}: tensor {name!r} has an unknown GGML type {self.tensors[name].ggml_type}; "
                       "the file is corrupt or newer than the installed `gguf` package") from None

  def nbytes(self, name: str) -> int:
    """Bytes of tensor `name`'s data in the file."""
    import gguf  # pylint: disable=import-outside-toplevel
    block, type_size = gguf.GGML_QUANT_SIZES[self._qtype(name)]
    return math.prod(self.tensors[name].shape) // block * type_size

  def _check_complete(self) -> None:
    """Every tensor's data lies within the file (a download cut short fails here, naming the tensor)."""
    size = os.path.getsize(self.path)
    for name, info in sorted(self.tensors.items(), key=lambda item: item[1].offset):
      end = info.offset + self.nbytes(name)
      if end > size:
        raise ValueError(f"{self.path}: the file is cut short: tensor {name!r} is incomplete (its data ends at "
                         f"byte {end}, the file has {size}); download the file again")

  def dequantize(self, name: str) -> np.ndarray:
    """The tensor as fp32 in numpy order (for matrices: [rows = output features, cols = input features])."""
    import gguf  # pylint: disable=import-outside-toplevel
    info = self.tensors[name]
    qtype = self._qtype(name)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = self.nbytes(name)
    raw = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=info.offset)
    if raw.size < nbytes:
      raise ValueError(f"{self.path}: the file is cut short: tensor {name!r} is incomplete; download it again")
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
      dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)
      if dtype is None:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
      return raw.view(dtype).astype(np.float32).reshape(info.shape)
    rows = raw.reshape(-1, info.shape[-1] // block * type_size)
    return gguf.quants.dequantize(rows, qtype).astype(np.float32).reshape(info.shape)


# ----------------------------------------------------------------------------------------------------------------
# The loader's view: HF names, layouts and config.

_GGUF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
              "gemma3": "gemma3_text"}
_GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "rope.freq_base": "rope_theta", "context_length": "max_position_embeddings",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping",
}


class GGUFSource:
  """Tensors of a GGUF file, dequantized with the `gguf` package and mapped to HF names and conventions.

  Llama-family files store Q/K rows permuted for llama.cpp's rotary layout (undone here, per head); Gemma files
  store norm weights as 1 + w (returned as w). `read` dequantizes a tensor once and keeps it (fp32) only while the
  loader reads the same parameter (every layer's tensor of one stacked parameter, for each device's slice).
  """

  def __init__(self, path: str):
    self.file = GGUFFile(path)
    self.metadata = self.file.metadata
    self.arch = self.metadata.get("general.architecture")
    if self.arch not in _GGUF_ARCH:
      raise ValueError(f"{path}: GGUF architecture {self.arch!r} is not supported; supported: {sorted(_GGUF_ARCH)}")
    self.model_type = _GGUF_ARCH[self.arch]  # transformers' model_type
    self._tensors = {hf_name_of_gguf(name, self.arch): name for name in self.file.tensors}
    self._tensors.pop(None, None)
    self._parameter: str | None = None  # the parameter whose tensors `_held` keeps
    self._held: dict[str, np.ndarray] = {}

  def hf_config_dict(self) -> dict[str, Any]:
    """Keyword arguments of the transformers config this file describes."""
    arch, cfg = self.arch, {}
    meta = self.metadata
    for key, hf_key in _GGUF_CONFIG_KEYS.items():
      if f"{arch}.{key}" in meta:
        cfg[hf_key] = meta[f"{arch}.{key}"]
    cfg["vocab_size"] = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
      value = meta.get(f"tokenizer.ggml.{key}")
      if value is not None:
        cfg[key.replace("padding", "pad")] = int(value)
    cfg["attention_bias"] = "model.layers.0.self_attn.o_proj.bias" in self._tensors
    return cfg

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.file.tensors[self._tensors[name]].shape

  def where(self, name: str) -> str:
    return f"{self.file.path} ({self._tensors[name]})"

  def full(self, name: str) -> np.ndarray:
    """The whole tensor `name` (an HF name) in HF layout and convention, fp32."""
    w = self.file.dequantize(self._tensors[name])
    if self.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
      heads = self.metadata[f"{self.arch}.attention.head_count"]
      if ".k_proj." in name:
        heads = self.metadata.get(f"{self.arch}.attention.head_count_kv", heads)
      w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if self.arch.startswith("gemma") and name.endswith("norm.weight"):
      w = w - 1.0
    return w

  def read(self, name: str, index: tuple) -> np.ndarray:
    """`full(name)[index]`; tensors of the parameter being read are dequantized once (see the class docstring)."""
    parameter = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", name)
    if parameter != self._parameter:
      self._parameter, self._held = parameter, {}
    if name not in self._held:
      self._held[name] = self.full(name)
    return self._held[name][index]

  def release(self) -> None:
    """Drops the held tensors (the loader calls this when it is done)."""
    self._parameter, self._held = None, {}
