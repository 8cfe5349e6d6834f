"""Tokenizers for Hugging Face directories, hub ids and GGUF files, built without torch.

A GGUF file carries its tokenizer as llama.cpp metadata (vocabulary, merges or scores, token types, special token
ids, the add-BOS flag, the chat template). `load_gguf_tokenizer` reads that metadata with `model.gguf` and
hands it to transformers' own GGUF converter (`transformers.integrations.gguf.convert_gguf_tokenizer`), so the
result equals `AutoTokenizer.from_pretrained(directory, gguf_file=name)` token for token (transformers' own GGUF
path cannot be used directly: its file reader imports torch).
"""

from __future__ import annotations

import os
from typing import Any

from ipo_jax.model.gguf import read_gguf_metadata

_SPECIAL_TOKENS = ("bos", "eos", "unk", "pad")


def _gguf_tokenizer_inputs(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(tokenizer_dict, init_kwargs)` exactly as `transformers...gguf_tokenizer_mapping.get_gguf_tokenizer`."""
  from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING  # pylint: disable=import-outside-toplevel
  tokenizer_dict, init_kwargs = (
      {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
      for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
  tokenizer_type = tokenizer_dict.get("tokenizer_type")
  if tokenizer_type == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
    init_kwargs.setdefault("add_bos_token", True)
  elif tokenizer_type == "gemma4":  # its chat template writes <bos> itself
    init_kwargs["add_bos_token"] = False
  for name in _SPECIAL_TOKENS:
    token_id = tokenizer_dict.get(f"{name}_token_id")
    init_kwargs[f"{name}_token"] = None if token_id is None else tokenizer_dict["tokens"][token_id]
  return tokenizer_dict, init_kwargs


def _tokenizer_class(architecture: str) -> type:
  """The class `AutoTokenizer` picks for this model type (e.g. `GemmaTokenizer`), else `TokenizersBackend`."""
  # pylint: disable=import-outside-toplevel
  from transformers import TokenizersBackend
  from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
  name = TOKENIZER_MAPPING_NAMES.get(architecture)
  cls = tokenizer_class_from_name(name) if name else None
  return cls if isinstance(cls, type) and issubclass(cls, TokenizersBackend) else TokenizersBackend


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
  """The tokenizer a GGUF file describes, as a `transformers.PreTrainedTokenizerFast`; never imports torch.

  Byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2", e.g. SmolLM2) and SentencePiece ones ("llama" with
  scores, e.g. Gemma 3) are supported. Special tokens, `add_bos_token` and `chat_template` (None when the file has
  none) are set as `AutoTokenizer.from_pretrained(directory, gguf_file=name)` sets them.
  """
  from transformers.integrations.gguf import convert_gguf_tokenizer  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  metadata = read_gguf_metadata(path)
  if "tokenizer.ggml.tokens" not in metadata:
    raise ValueError(f"{path}: the GGUF metadata has no tokenizer (no `tokenizer.ggml.tokens`)")
  architecture = metadata.get("general.architecture", "")
  tokenizer_dict, init_kwargs = _gguf_tokenizer_inputs(metadata)
  try:
    backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  # Named by its directory and marked local, as `from_pretrained` does: transformers looks for a `config.json`
  # there (a Mistral regex check on large vocabularies), and asks the hub about any name it does not take as local.
  directory = os.path.dirname(os.path.abspath(path))
  return _tokenizer_class(architecture)(tokenizer_object=backend, name_or_path=directory, is_local=True,
                                        **init_kwargs, **extra_kwargs)


def load_tokenizer(path: str | os.PathLike) -> Any:
  """The tokenizer of a `.gguf` file, a Hugging Face directory or a hub id (no remote code), padding-ready.

  A tokenizer without a pad token gets pad = eos: padded positions are always masked out, so the id only has to
  be a valid one.
  """
  path = os.fspath(path)
  if path.endswith(".gguf"):
    tokenizer = load_gguf_tokenizer(path)
  else:
    import transformers  # pylint: disable=import-outside-toplevel
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer
