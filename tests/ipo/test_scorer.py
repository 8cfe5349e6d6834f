"""The IPO scorer: shared prefixes, packing, compilations, ensembles, and parity with HF PyTorch (the layouts and
the planner: test_layout.py, test_planner.py). Other tests use its toy model and tokenizers."""

import dataclasses
import functools
import os
import string
import subprocess
import sys

import jax
import numpy as np
import pytest

from ipo_jax import data, sharding
from ipo_jax.evals import ipo_rows
from ipo_jax.ipo import prompts
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.model import loading, transformer
from ipo_jax.model import tokenizer as tokenizer_lib
from ipo_jax.model.architecture import ModelConfig
from tests.conftest import source_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def smollm_tokenizer():
  return tokenizer_lib.load_tokenizer(loading.embedded_model_path())


def sentencepiece_like_tokenizer():
  """Characters plus '▁', 'Yes', 'No' under a Metaspace pre-tokenizer: ' Yes' becomes '▁' + 'Yes'."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0), ("Yes", -1.0), ("No", -1.0)]
  pieces += [(c, -5.0) for c in string.printable if c != " "]
  tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="</s>")


TOY_CONFIG = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True, max_position_embeddings=2048)


def toy_model(mesh=None, tokenizer=None):
  """A 2-layer random model over SmolLM2's vocabulary, with its tokenizer."""
  cfg = TOY_CONFIG
  mesh = mesh or sharding.make_mesh()
  params = transformer.init_params(cfg, jax.random.key(0), scale=0.3)
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  return loading.Model(config=cfg, params=params, tokenizer=tokenizer or smollm_tokenizer(), mesh=mesh,
                       hf_config=None, name="toy")


@functools.lru_cache(maxsize=None)
def rewardbench_rows():
  return data.read_local(source_path("allenai/reward-bench", split="filtered"))


def short_rows(count, max_chars=700, stride=7):
  rows = [r for r in rewardbench_rows()[::stride]
          if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < max_chars]
  return rows[:count]


# ----------------------------------------------------------------------------------------------------------------
# Shared prefixes, compilations, ensembles (toy model).


@pytest.fixture(scope="module")
def toy():
  return toy_model()


def _results(scorer, rows, prompt_set):
  out = [r for chunk in ipo_rows.score_rewardbench_pairs(scorer, rows, prompt_set) for r in chunk]
  return {(r["subset"], r["id"]): r for r in out}


def test_shared_prefix_equals_plain_and_compilations_are_bounded(toy):
  rows = short_rows(24)
  ps = prompts.default_prompts()
  common = dict(max_length=256, batch_tokens=1024, max_programs=3, progress=False)
  plain = scorer_lib.Scorer(toy, scorer_lib.Settings(shared_prefix=False, packing="never", **common))
  shared = scorer_lib.Scorer(toy, scorer_lib.Settings(prefix_length=32, window=8, packing="never", **common))
  packed = scorer_lib.Scorer(toy, scorer_lib.Settings(packing="always", window=5, **common))
  packed_apart = scorer_lib.Scorer(toy, scorer_lib.Settings(packing="always", shared_prefix=False, window=5, **common))
  compiled = [scorer_lib.num_compilations()]
  results = []
  for scorer in (plain, shared, packed, packed_apart):
    results.append(_results(scorer, rows, ps))
    compiled.append(scorer_lib.num_compilations())
  a = results[0]
  assert shared.last_plan.prefix == 32 and plain.last_plan.prefix == 0 and not plain.last_plan.packed
  assert packed.last_plan.packed and packed.last_plan.prefix == 0
  pair_segments = [u for b in packed.last_plan.packed for row in b for u in row if len(u) == 2]
  assert len(pair_segments) >= len(rows) // 2  # most pairs packed as one segment: their shared start once
  assert all(len(u) == 1 for b in packed_apart.last_plan.packed for row in b for u in row)
  assert packed.stats["processed_slots"] < packed_apart.stats["processed_slots"]
  for b in results[1:]:
    assert a.keys() == b.keys() == {(r["subset"], r["id"]) for r in rows}
    for key in a:
      for field in ("score_chosen", "score_rejected", "yes_no_mass_chosen", "yes_no_mass_rejected"):
        assert abs(a[key][field] - b[key][field]) <= 1e-5, (key, field)
      assert a[key]["tokens_chosen"] == b[key]["tokens_chosen"]
  assert compiled[1] - compiled[0] <= plain.num_programs == len(plain.last_plan.buckets) <= 3
  assert compiled[2] - compiled[1] <= shared.num_programs == len(shared.last_plan.buckets) + 1 <= 3
  assert compiled[3] - compiled[2] <= packed.num_programs == 1
  assert compiled[4] - compiled[3] <= packed_apart.num_programs == 1
  _results(shared, rows, ps)
  assert scorer_lib.num_compilations() == compiled[4]  # a second pass compiles nothing
  assert shared.stats["processed_slots"] >= shared.stats["tokens"] / 2
  assert packed.stats["processed_slots"] < plain.stats["processed_slots"]


def test_ensemble_combines_each_candidate(toy):
  rows = short_rows(4, max_chars=400)
  instructions = ("Is this response good? Answer Yes or No.", "Is the answer right? Answer Yes or No.")
  ensemble = prompts.PromptSet({"chat": instructions}, "chat")
  settings = dict(max_length=256, batch_tokens=1024, max_programs=2, progress=False, shared_prefix=False)
  mean_prob = _results(scorer_lib.Scorer(toy, scorer_lib.Settings(**settings)), rows, ensemble)
  mean_lo = _results(scorer_lib.Scorer(toy, scorer_lib.Settings(ensemble="mean_log_odds", **settings)), rows, ensemble)
  single_scorer = scorer_lib.Scorer(toy, scorer_lib.Settings(**settings))
  singles = [_results(single_scorer, rows, prompts.PromptSet({"chat": (i,)}, "chat")) for i in instructions]
  for key, r in mean_prob.items():
    lo = np.array([[s[key]["log_odds_chosen"], s[key]["log_odds_rejected"]] for s in singles])
    np.testing.assert_allclose(r["candidates"]["log_odds_chosen"], lo[:, 0], atol=1e-5)
    np.testing.assert_allclose(r["candidates"]["log_odds_rejected"], lo[:, 1], atol=1e-5)
    probs = 1 / (1 + np.exp(-lo))
    assert r["score_chosen"] == pytest.approx(probs[:, 0].mean(), abs=1e-6)
    assert r["correct"] == (probs[:, 0].mean() > probs[:, 1].mean())
    assert mean_lo[key]["score_chosen"] == pytest.approx(1 / (1 + np.exp(-lo[:, 0].mean())), abs=1e-6)
    assert mean_lo[key]["correct"] == (lo[:, 0].mean() > lo[:, 1].mean())
  assert not list(ipo_rows.score_rewardbench_pairs(single_scorer, [], ensemble))  # a finished run's rerun


def test_combine():
  lo = np.array([[2.0, -1.0], [0.0, 0.0]])
  prob, key = ipo_rows.combine(lo, "mean_prob")
  np.testing.assert_allclose(prob, [(scorer_lib.sigmoid(2.0) + scorer_lib.sigmoid(-1.0)) / 2, 0.5])
  prob, key = ipo_rows.combine(lo, "mean_log_odds")
  np.testing.assert_allclose(key, [0.5, 0.0])
  np.testing.assert_allclose(prob, scorer_lib.sigmoid(np.array([0.5, 0.0])))


# ----------------------------------------------------------------------------------------------------------------
# Parity with Hugging Face PyTorch.


def _hf_p_yes(hf_model, ids_list, yes, no):
  """P(Yes) the paper's way: full-vocabulary softmax at the last position, renormalised over Yes and No."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # one sequence at a time: a second thread only adds contention on a busy CPU
  out = []
  try:
    for ids in ids_list:
      with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0, -1].double()
      probs = torch.softmax(logits, -1)
      out.append((float(probs[yes] / (probs[yes] + probs[no])), float(probs[yes] + probs[no])))
  finally:
    torch.set_num_threads(threads)
  return np.array(out)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # biases; softcaps, sliding windows, post-norms
def test_token_scores_match_hf_for_each_family(tmp_path, family):
  from tests import hf_checkpoints
  hf_model = hf_checkpoints.make_checkpoint(family, str(tmp_path))
  model = loading.load_model(str(tmp_path))
  rng = np.random.default_rng(0)
  pairs = []
  for n in range(6):  # pairs sharing 5..30 leading tokens, continuations of different lengths
    prefix = rng.integers(3, 96, size=5 * n + 5).tolist()
    pairs.append((prefix + rng.integers(3, 96, size=2 + 3 * n).tolist(), prefix + rng.integers(3, 96, size=9).tolist()))
  yes, no = 7, 11
  expected = _hf_p_yes(hf_model, [s for p in pairs for s in p], yes, no)
  common = dict(max_length=128, length_multiple=8, progress=False)
  for settings in (scorer_lib.Settings(shared_prefix=False, max_programs=2, **common),
                   scorer_lib.Settings(prefix_length=8, window=4, max_programs=2, **common)):
    scorer = scorer_lib.Scorer(model, settings, answers=(yes, no))
    values = np.zeros((2 * len(pairs), 2))
    for idx, out in scorer.score_pairs(pairs):
      values[idx] = out
    np.testing.assert_allclose(scorer_lib.sigmoid(values[:, 0]), expected[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.exp(values[:, 1]), expected[:, 1], rtol=1e-4)


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


@pytest.mark.slow
def test_paper_scorer_matches_hf_pytorch_on_rewardbench_rows(smollm):
  """The embedded SmolLM2 in JAX against transformers' GGUF loader in torch fp32, paper layout and prompts."""
  import torch
  from transformers import AutoModelForCausalLM
  path = loading.embedded_model_path()
  hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
  paper_prompts = prompts.load_prompts("paper:rewardbench_prompts")
  rows = short_rows(6, max_chars=900, stride=331)
  assert len({r["subset"] for r in rows}) >= 4
  settings = scorer_lib.Settings(truncation="paper", max_programs=2, progress=False)
  got = _results(scorer_lib.Scorer(smollm, settings), rows, paper_prompts)
  tok = smollm.tokenizer
  yes, no = tok.encode(" Yes", add_special_tokens=False), tok.encode(" No", add_special_tokens=False)
  assert len(yes) == len(no) == 1
  texts = [f"{paper_prompts.instruction(r['subset'])}\n    User : {r['prompt']}\n    Response : {r[side]}\n    "
           for r in rows for side in ("chosen", "rejected")]
  expected = _hf_p_yes(hf_model, [tok.encode(t)[:1024] for t in texts], yes[0], no[0])
  for i, r in enumerate(rows):
    g = got[(r["subset"], r["id"])]
    assert abs(g["score_chosen"] - expected[2 * i, 0]) <= 1e-4
    assert abs(g["score_rejected"] - expected[2 * i + 1, 0]) <= 1e-4
    assert g["yes_no_mass_chosen"] == pytest.approx(expected[2 * i, 1], rel=1e-3)
    assert g["correct"] == (expected[2 * i, 0] > expected[2 * i + 1, 0])


# ----------------------------------------------------------------------------------------------------------------
# The batch split over (data, fsdp) on 8 emulated devices.


def test_batch_split_over_data_and_fsdp_gives_the_same_scores(tmp_path):
  out = tmp_path / "scores.npy"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=ROOT, check=True, timeout=300)
  single = _id_scores(sharding.make_mesh(), "plain")
  for split in np.load(out):  # shared-prefix and packed plans on 8 devices
    np.testing.assert_allclose(scorer_lib.sigmoid(split[:, 0]), scorer_lib.sigmoid(single[:, 0]), atol=1e-5)
    np.testing.assert_allclose(split[:, 1], single[:, 1], rtol=1e-5)


def _id_scores(mesh, plan):
  """Log-odds of random id pairs (sharing 6..30 leading tokens) on a small vocabulary, on `mesh`, with the
  `plan` ("plain" buckets, "shared" prefixes or "packed" rows)."""
  cfg = dataclasses.replace(TOY_CONFIG, vocab_size=128)
  params = transformer.init_params(cfg, jax.random.key(1), scale=0.3)
  model = loading.Model(config=cfg, params=jax.device_put(params, sharding.param_shardings(params, mesh)),
                        tokenizer=None, mesh=mesh, hf_config=None, name="toy")
  rng = np.random.default_rng(2)
  pairs = []
  for n in range(12):
    prefix = rng.integers(1, 128, size=6 + 2 * n).tolist()
    pairs.append((prefix + rng.integers(1, 128, size=3 + n).tolist(), prefix + rng.integers(1, 128, size=5).tolist()))
  settings = scorer_lib.Settings(max_length=128, length_multiple=8, batch_tokens=128, max_programs=3, window=8,
                              shared_prefix=plan == "shared", prefix_length=8 if plan == "shared" else 0,
                              packing="always" if plan == "packed" else "never", progress=False)
  scorer = scorer_lib.Scorer(model, settings, answers=(5, 9))
  values = np.zeros((2 * len(pairs), 2))
  for idx, out in scorer.score_pairs(pairs):
    values[idx] = out
  assert bool(scorer.last_plan.packed) == (plan == "packed") and bool(scorer.last_plan.prefix) == (plan == "shared")
  return values


if __name__ == "__main__":  # the 8-device side of the test above
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  np.save(sys.argv[1], np.stack([_id_scores(mesh, "shared"), _id_scores(mesh, "packed")]))
