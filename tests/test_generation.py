"""Sampler (toy model and the embedded SmolLM2 against transformers' `generate`), prompt data, the generate task."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy import stats
from transformers.generation import logits_process

from configs import generate
from ipo_jax import data, generation, loading, modeling, sharding
from tests.conftest import source_path
from ipo_jax.config import ModelConfig

TOY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(), max_position_embeddings=256)
PROMPTS = [[5, 6, 7, 8], [9, 10], list(range(10, 40)), [11, 11, 11]]  # one length bucket (32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_model(cfg: ModelConfig = TOY, mesh=None) -> loading.Model:
  params = modeling.init_params(cfg, jax.random.key(0), scale=0.5)
  return loading.Model(config=cfg, params=params, tokenizer=None, mesh=mesh or sharding.make_mesh(),
                       hf_config=None, name="toy")


@pytest.fixture(scope="module")
def toy():
  return toy_model()


def _run(model, sampling, key=0, prompts=PROMPTS, **kwargs):
  return generation.generate(model, prompts, sampling, key, progress=False, **kwargs)


def _last_logits(model, seqs):
  """Full-recompute logits after each sequence (no cache), right-padded into one call."""
  length = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros_like(ids)
  for r, s in enumerate(seqs):
    ids[r, :len(s)], mask[r, :len(s)] = s, 1
  logits = np.asarray(modeling.full_logits(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
  return logits, mask.sum(1)


# ----------------------------------------------------------------------------------------------------------------
# Toy model.


def test_greedy_is_argmax_of_the_uncached_model(toy):
  out = _run(toy, generation.SamplingConfig(max_new_tokens=12, temperature=0))
  seqs = [p + o[0].token_ids for p, o in zip(PROMPTS, out)]
  logits, lengths = _last_logits(toy, seqs)
  for r, (p, o) in enumerate(zip(PROMPTS, out)):
    assert o[0].finish_reason == "length" and len(o[0].token_ids) == 12
    expected = logits[r, len(p) - 1:lengths[r] - 1].argmax(-1)
    np.testing.assert_array_equal(o[0].token_ids, expected)


def test_top_k_1_equals_greedy(toy):
  greedy = _run(toy, generation.SamplingConfig(max_new_tokens=12, temperature=0))
  top1 = _run(toy, generation.SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=1), key=7)
  assert [g[0].token_ids for g in top1] == [g[0].token_ids for g in greedy]


def test_eos_and_stop_ids_end_rows_independently(toy):
  free = [g[0].token_ids for g in _run(toy, generation.SamplingConfig(max_new_tokens=12, temperature=0))]
  eos, stop = free[0][4], free[1][6]
  assert eos != stop
  model = dataclasses.replace(toy, config=dataclasses.replace(TOY, eos_token_ids=(eos,)))
  out = [g[0] for g in _run(model, generation.SamplingConfig(max_new_tokens=12, temperature=0,
                                                             stop_token_ids=(stop,)))]
  for ids, gen in zip(free, out):
    ends = [i for i, t in enumerate(ids) if t in (eos, stop)]
    if ends:
      assert gen.token_ids == ids[:ends[0] + 1]
      assert gen.finish_reason == ("eos" if ids[ends[0]] == eos else "stop")
    else:
      assert gen.token_ids == ids and gen.finish_reason == "length"
  assert out[0].finish_reason == "eos" and out[0].token_ids[-1] == eos and len(out[0].token_ids) <= 5


def test_samples_sharing_a_prompt_equal_independent_runs(toy):
  sampling = generation.SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, num_samples=3)
  keys = jax.random.split(jax.random.key(3), (len(PROMPTS), 3))
  shared = _run(toy, sampling, keys)
  single = dataclasses.replace(sampling, num_samples=1)
  for s in range(3):  # one prompt per batch: another batch composition as well
    alone = _run(toy, single, keys[:, s:s + 1], batch_size=1)
    assert [g[s].token_ids for g in shared] == [g[0].token_ids for g in alone]
  assert len({tuple(g.token_ids) for g in shared[2]}) > 1  # the samples differ
  assert _run(toy, sampling, keys) == shared  # reproducible
  seeded = _run(toy, sampling, 5)
  assert seeded == _run(toy, sampling, 5) and seeded != _run(toy, sampling, 6)


def _chi_square_pvalue(counts, probs):
  """Pearson's test, pooling the bins expected below 5 draws into one."""
  expected = probs / probs.sum() * counts.sum()
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:
    assert observed[-1] == 0
    observed, expected = observed[:-1], expected[:-1]
  return stats.chisquare(observed, expected).pvalue


def _warped(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
  """transformers' warpers, in their order, then softmax."""
  scores = torch.tensor(np.asarray(logits, np.float32))[None]
  warpers = [logits_process.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(logits_process.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(logits_process.TopPLogitsWarper(top_p))
  if min_p:
    warpers.append(logits_process.MinPLogitsWarper(min_p))
  for w in warpers:
    scores = w(None, scores)
  return torch.softmax(scores, -1)[0].double().numpy()


@pytest.mark.parametrize("filters", [{}, {"top_k": 20, "top_p": 0.8, "min_p": 0.05}])
def test_sampled_frequencies_match_the_softmax(toy, filters):
  n, temperature = 4000, 1.5
  prompt = PROMPTS[0]
  sampling = generation.SamplingConfig(max_new_tokens=2, temperature=temperature, num_samples=n, **filters)
  gens = _run(toy, sampling, 11, prompts=[prompt])[0]
  first = np.array([g.token_ids[0] for g in gens])
  logits, _ = _last_logits(toy, [prompt])
  probs = _warped(logits[0, -1], temperature, **filters)
  assert _chi_square_pvalue(np.bincount(first, minlength=TOY.vocab_size), probs) > 1e-3
  assert np.all(probs[first] > 0)  # nothing filtered out is ever drawn
  # The second token, given the most frequent first one: a fresh draw from the conditional distribution.
  top = np.bincount(first).argmax()
  second = np.array([g.token_ids[1] for g in gens if g.token_ids[0] == top])
  logits, _ = _last_logits(toy, [prompt + [int(top)]])
  probs = _warped(logits[0, -1], temperature, **filters)
  assert _chi_square_pvalue(np.bincount(second, minlength=TOY.vocab_size), probs) > 1e-3


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_filter_logits_keeps_what_transformers_keeps(scale):
  logits = np.asarray(jax.random.normal(jax.random.key(0), (16, 4096))) * scale
  for top_k, top_p, min_p in [(0, 0.9, 0.0), (50, 1.0, 0.0), (0, 1.0, 0.1), (40, 0.7, 0.02), (0, 0.3, 0.0)]:
    ours = np.isfinite(np.asarray(generation.filter_logits(
        jnp.asarray(logits), top_k, top_p if top_p < 1 else None, min_p or None)))
    for row, kept in zip(logits, ours):
      np.testing.assert_array_equal(kept, _warped(row, 1.0, top_k, top_p, min_p) > 0,
                                    err_msg=f"top_k={top_k} top_p={top_p} min_p={min_p} scale={scale}")


def test_sampling_config_checks_ranges():
  with pytest.raises(ValueError, match="top_p"):
    generation.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="num_samples"):
    generation.SamplingConfig(num_samples=0)
  cfg = generation.SamplingConfig.from_config({"temperature": 0.0, "batch_size": 4, "stop_token_ids": [7]})
  assert cfg.greedy and cfg.stop_token_ids == (7,)


def test_batch_sharded_over_eight_devices_matches_one(toy, tmp_path):
  sampling = generation.SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2)
  expected = [[g.token_ids for g in gens] for gens in _run(toy, sampling, 1)]
  script = textwrap.dedent(f"""
      import json, os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax
      from ipo_jax import generation, loading, modeling, sharding
      from ipo_jax.config import ModelConfig, RopeSpec
      cfg = {TOY!r}
      model = loading.Model(config=cfg, params=modeling.init_params(cfg, jax.random.key(0), scale=0.5),
                            tokenizer=None, mesh=sharding.make_mesh({{"data": 2, "fsdp": 4}}), hf_config=None,
                            name="toy")
      sampling = generation.SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2)
      out = generation.generate(model, {PROMPTS!r}, sampling, 1, progress=False)
      print(json.dumps([[g.token_ids for g in gens] for gens in out]))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


# ----------------------------------------------------------------------------------------------------------------
# Prompt data.


def test_prompt_formats(tmp_path):
  alpaca = generation.load_instructions(dict(generate.get_config().data, start=800, limit=3))
  assert [i for i, _ in alpaca] == [800, 801, 802] and all(t.strip() for _, t in alpaca)
  mt = generation.load_instructions(dict(generate.get_config("mt_bench").data, limit=2))
  assert mt[0] == (0, json.loads(open(source_path("fastchat:mt_bench_questions")).readline())["turns"][0])
  hh = generation.load_instructions(dict(generate.get_config("hh_rlhf").data, limit=1))
  assert hh == [(0, "what are some pranks with a pen i can do?")]
  path = tmp_path / "p.jsonl"
  path.write_text('{"question": "a"}\n{"question": ""}\n')
  with pytest.raises(data.DataError, match=r"row 1 .*'question'"):
    generation.load_instructions({"path": str(path), "field": "question"})
  assert generation.load_instructions({"path": str(path), "field": "question", "skip_invalid": True}) == [(0, "a")]


# ----------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2 against transformers, through the generate task.


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


@pytest.fixture(scope="module")
def hf_smollm(smollm):
  """transformers' Llama with the same weights (their GGUF loading is checked against ours in test_loading)."""
  state = {}
  for path, (name, transposed) in loading.hf_weight_names(smollm.config).items():
    value = np.asarray(smollm.params["layers"][path[7:]] if path.startswith("layers/") else smollm.params[path])
    for i, w in enumerate(value) if path.startswith("layers/") else [(0, value)]:
      state[name.format(i=i)] = torch.tensor(w.T if transposed else w)
  model = transformers.LlamaForCausalLM(smollm.hf_config).to(torch.float32).eval()
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied head
  model.tie_weights()
  return model


def test_chat_layout_and_end_of_turn(smollm):
  tok = smollm.tokenizer
  text = generation.format_prompt(tok, "Hi")
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert generation.encode_prompt(tok, text) == tok.apply_chat_template(
      [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
  assert generation.end_of_turn_ids(tok) == (tok.convert_tokens_to_ids("<|im_end|>"),)
  assert generation.format_prompt(tok, "Hi", chat_template=False) == "Hi"


def _generate_config(output_dir, **sampling):
  config = generate.get_config("greedy")
  config.output_dir = str(output_dir)
  config.data.start, config.data.limit = 801, 4  # held-out AlpacaEval instructions
  config.sampling.update(sampling)
  return config


def test_generate_task_greedy_matches_transformers_and_resumes(smollm, hf_smollm, tmp_path, monkeypatch):
  monkeypatch.setattr(generation.runtime, "load_model_from_config", lambda config, mesh=None: smollm)
  config = _generate_config(tmp_path, max_new_tokens=64)
  summary = generation.run(config)
  path = tmp_path / generation.GENERATIONS_FILE
  rows = sorted(data.iter_jsonl(path), key=lambda r: r["index"])
  assert [r["index"] for r in rows] == [801, 802, 803, 804] and summary["generated"] == 4
  torch.set_num_threads(1)
  for row in rows:
    ids = torch.tensor([generation.encode_prompt(smollm.tokenizer,
                                                 generation.format_prompt(smollm.tokenizer, row["instruction"]))])
    with torch.no_grad():
      ref = hf_smollm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
    expected = ref.sequences[0, ids.shape[1]:].tolist()
    got = row["token_ids"]
    diverge = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if diverge is None:
      assert got == expected
      assert row["finish_reason"] == ("eos" if expected[-1] == 2 else "length")
      assert row["num_tokens"] == len(got)
      assert row["text"] == smollm.tokenizer.decode(got[:-1] if expected[-1] == 2 else got,
                                                     skip_special_tokens=True)
    else:  # only after a near-tie of transformers' top two logits
      top2 = torch.topk(ref.scores[diverge][0], 2).values
      assert float(top2[0] - top2[1]) < 1e-4, (row["index"], diverge)

  # Resume: lose three rows (the longest prompts: the same compiled shapes) and leave a torn line.
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(lines[-1] + lines[0][:25])
  again = generation.run(config)
  assert again["generated"] == 3 and again["resumed"] == 1 and again["compilations"] == 0
  assert sorted(data.iter_jsonl(path), key=lambda r: r["index"]) == rows
  with pytest.raises(ValueError, match="sampling"):
    generation.run(_generate_config(tmp_path, max_new_tokens=32))
