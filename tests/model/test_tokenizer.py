"""Torch-free GGUF tokenizers against transformers' own (SmolLM2: byte-level BPE; Gemma 3: SentencePiece)."""

import json
import os
import subprocess
import sys

import gguf
import pytest
import transformers
from transformers.integrations.gguf import gguf_tokenizer_mapping, reader
from transformers.models.auto import tokenization_auto

from ipo_jax.model import loading
from ipo_jax.model import gguf as gguf_reader
from ipo_jax.model import tokenizer as tokenizer_lib

CONVERSATION = [
    {"role": "system", "content": "You are a careful judge of answers."},
    {"role": "user", "content": "Is 17 prime?\nAnswer briefly."},
    {"role": "assistant", "content": "Yes: 17 has no divisors other than 1 and itself."},
]
# Gemma 3 270M is a base model and its GGUF has no chat template; a Gemma-style turn format stands in, so its turn
# markers (control tokens of the vocabulary) are exercised too.
GEMMA_TURNS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TEXTS = {
    "code": "def score(xs):\n\tif not xs:\n\t\treturn 0.0\n    total = sum(x ** 2 for x in xs)  # squares\n"
            "\treturn total / len(xs)\n\n\nclass A:\n  pass\n",
    "unicode": "日本語のテキスト、中文文本 🙂👍🏽 café cafe\u0301 naïve Ångström — עברית مرحبا بالعالم ẞ ﬁ ½",
    "whitespace": "  two  spaces,         nine,\t\ttabs\n\n\nnewlines   \r\n \n",
    "judge_format": "\n    User : x\n    Response : y\n    ",
    "yes_space": " Yes",
    "no_space": " No",
    "yes": "Yes",
    "no": "No",
}
MODELS = ("smollm2", "gemma3")


@pytest.fixture(scope="module")
def gguf_paths(tmp_path_factory):
  return {"smollm2": loading.embedded_model_path(),
          "gemma3": loading.gemma3_270m_path(str(tmp_path_factory.mktemp("gemma3")))}


def _reference(tokenizer_class, path):
  return tokenizer_class.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def references(gguf_paths):
  """transformers' own GGUF tokenizers (its GGUF reader needs torch).

  For Gemma, `AutoTokenizer` first rebuilds the model config with `gguf.GGUFReader` (tens of seconds for a 262k
  vocabulary) only to pick `GemmaTokenizer` (checked below), then calls `GemmaTokenizer.from_pretrained`; that call
  is made directly.
  """
  gemma_config = transformers.AutoConfig.for_model("gemma3_text")
  assert tokenization_auto.TOKENIZER_MAPPING[type(gemma_config)] is transformers.GemmaTokenizer
  return {"smollm2": _reference(transformers.AutoTokenizer, gguf_paths["smollm2"]),
          "gemma3": _reference(transformers.GemmaTokenizer, gguf_paths["gemma3"])}


@pytest.fixture(scope="module", params=MODELS)
def tokenizers(request, gguf_paths, references):
  """(path, ours, transformers' reference) for one GGUF."""
  path = gguf_paths[request.param]
  return path, tokenizer_lib.load_gguf_tokenizer(path), references[request.param]


def _chat_texts(tok):
  """A full system/user/assistant conversation, and its first two turns with the generation prompt."""
  template = None if tok.chat_template else GEMMA_TURNS_TEMPLATE
  return {"chat": tok.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False),
          "chat_generation_prompt": tok.apply_chat_template(CONVERSATION[:2], chat_template=template,
                                                            add_generation_prompt=True, tokenize=False)}


def test_metadata_matches_transformers_reader(gguf_paths):
  for path in gguf_paths.values():
    ours = gguf_reader.read_gguf_metadata(path)
    string_arrays = [k for k, v in ours.items() if isinstance(v, list) and v and isinstance(v[0], str)]
    theirs, _ = reader.read_gguf_metadata(path, string_arrays)
    assert ours == theirs
    architecture, tokenizer_dict, init_kwargs = gguf_tokenizer_mapping.get_gguf_tokenizer(path)
    assert ours["general.architecture"] == architecture
    # pylint: disable-next=protected-access
    assert tokenizer_lib._gguf_tokenizer_inputs(ours) == (tokenizer_dict, init_kwargs)


def test_attributes_match_transformers(tokenizers):
  path, ours, ref = tokenizers
  assert type(ours) is type(ref) and isinstance(ours, transformers.PreTrainedTokenizerFast)
  for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "unk_token_id",
               "pad_token_id", "add_bos_token", "add_eos_token", "padding_side", "all_special_tokens"):
    assert getattr(ours, attr) == getattr(ref, attr), attr
  assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
  gguf_template = reader.read_gguf_metadata(path)[0].get("tokenizer.chat_template")
  assert ours.chat_template == ref.chat_template == gguf_template


def test_golden_special_tokens_and_ids(tokenizers):
  path, ours, _ = tokenizers
  special = (ours.bos_token, ours.bos_token_id, ours.eos_token, ours.eos_token_id, ours.pad_token, ours.pad_token_id)
  yes_no = [ours(t).input_ids for t in ("Yes", " Yes", "No", " No")]
  if path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"):  # ChatML; no BOS added: the template opens every turn
    assert special == ("<|im_start|>", 1, "<|im_end|>", 2, "<|im_end|>", 2) and not ours.add_bos_token
    assert ours.chat_template.startswith("{% for message in messages %}")
    assert yes_no == [[10539], [9230], [5230], [2838]]
  else:  # Gemma 3 base: SentencePiece, BOS in front of every encoding, no chat template
    assert special == ("<bos>", 2, "<eos>", 1, "<pad>", 0) and ours.add_bos_token
    assert ours.chat_template is None
    assert yes_no == [[2, 10784], [2, 8438], [2, 3771], [2, 2301]]


def test_token_ids_match_transformers(tokenizers):
  _, ours, ref = tokenizers
  chat = _chat_texts(ref)
  assert _chat_texts(ours) == chat
  texts = {**chat, **TEXTS}
  for name, text in texts.items():
    for special in (True, False):
      assert ours(text, add_special_tokens=special).input_ids == ref(text, add_special_tokens=special).input_ids, name
  ours_batch = ours(list(texts.values()), padding=True)
  ref_batch = ref(list(texts.values()), padding=True)
  assert ours_batch.input_ids == ref_batch.input_ids and ours_batch.attention_mask == ref_batch.attention_mask
  template = None if ref.chat_template else GEMMA_TURNS_TEMPLATE
  assert (ours.apply_chat_template(CONVERSATION, chat_template=template, add_generation_prompt=True)["input_ids"]
          == ref.apply_chat_template(CONVERSATION, chat_template=template, add_generation_prompt=True)["input_ids"])


def test_decode_round_trip(tokenizers):
  _, ours, ref = tokenizers
  texts = {**_chat_texts(ref), **TEXTS}
  for name, text in texts.items():
    ids = ours.encode(text, add_special_tokens=False)
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), name

  def round_trips(tok):
    return {name for name, text in texts.items() if tok.decode(tok.encode(text, add_special_tokens=False)) == text}

  assert round_trips(ours) == round_trips(ref) == set(texts)


def test_load_tokenizer_gguf_and_directory(tmp_path, gguf_paths):
  gguf_tok = tokenizer_lib.load_tokenizer(gguf_paths["smollm2"])
  gguf_tok.pad_token = None
  gguf_tok.save_pretrained(tmp_path / "no_pad")
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "no_pad").pad_token is None
  dir_tok = tokenizer_lib.load_tokenizer(tmp_path / "no_pad")
  assert dir_tok.pad_token == dir_tok.eos_token == "<|im_end|>" and dir_tok.pad_token_id == 2
  text = _chat_texts(gguf_tok)["chat_generation_prompt"] + TEXTS["unicode"]
  assert dir_tok(text).input_ids == gguf_tok(text).input_ids
  gguf_tok.eos_token = None
  gguf_tok.save_pretrained(tmp_path / "no_pad_no_eos")
  with pytest.raises(ValueError, match="no_pad_no_eos: the tokenizer has neither a pad nor an eos token"):
    tokenizer_lib.load_tokenizer(tmp_path / "no_pad_no_eos")


def test_bad_files_name_the_path(tmp_path, gguf_paths):
  not_gguf = tmp_path / "model.gguf"
  not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(ValueError, match=r"model\.gguf: not a GGUF file"):
    tokenizer_lib.load_tokenizer(str(not_gguf))
  (tmp_path / "empty.gguf").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.gguf: not a GGUF file"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "empty.gguf"))
  truncated = tmp_path / "truncated.gguf"
  with open(gguf_paths["smollm2"], "rb") as f:
    truncated.write_bytes(f.read(200_000))  # cut inside the vocabulary
  with pytest.raises(ValueError, match=r"truncated\.gguf: cannot read GGUF header entry 'tokenizer\.ggml\.tokens'"):
    tokenizer_lib.load_gguf_tokenizer(str(truncated))
  no_tokenizer = str(tmp_path / "weights_only.gguf")
  writer = gguf.GGUFWriter(no_tokenizer, "llama")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"weights_only\.gguf: the GGUF metadata has no tokenizer"):
    tokenizer_lib.load_gguf_tokenizer(no_tokenizer)


_TORCH_BLOCKED = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from ipo_jax.model import tokenizer
results = {}
for path, text in json.loads(sys.argv[1]):
  tok = tokenizer.load_tokenizer(path)
  results[path] = {"ids": tok(text).input_ids, "template": tok.chat_template, "pad": tok.pad_token_id}
print(json.dumps(results))
"""


def test_loads_with_torch_blocked(gguf_paths, references):
  text = "".join(TEXTS.values())
  jobs = [(path, text) for path in gguf_paths.values()]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
  out = subprocess.run([sys.executable, "-c", _TORCH_BLOCKED, json.dumps(jobs)], capture_output=True, text=True,
                       env=env, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for model, path in gguf_paths.items():
    ref = references[model]
    assert results[path] == {"ids": ref(text).input_ids, "template": ref.chat_template, "pad": ref.pad_token_id}
