"""The sampler on a toy model: greedy and sampled tokens against the uncached model and transformers' warpers,
stop ids, shared prompts, the batch split over devices (SmolLM2 against transformers: tests/tasks/test_generate.py)."""

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
from scipy import stats
from transformers.generation import logits_process

from ipo_jax import sharding
from ipo_jax.model import loading, transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.sample import engine

TOY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(), max_position_embeddings=256)
PROMPTS = [[5, 6, 7, 8], [9, 10], list(range(10, 40)), [11, 11, 11]]  # one length bucket (32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_model(cfg: ModelConfig = TOY, mesh=None) -> loading.Model:
  params = transformer.init_params(cfg, jax.random.key(0), scale=0.5)
  return loading.Model(config=cfg, params=params, tokenizer=None, mesh=mesh or sharding.make_mesh(),
                       hf_config=None, name="toy")


@pytest.fixture(scope="module")
def toy():
  return toy_model()


def _run(model, sampling, key=0, prompts=PROMPTS, **kwargs):
  return engine.generate(model, prompts, sampling, key, progress=False, **kwargs)


def _last_logits(model, seqs):
  """Full-recompute logits after each sequence (no cache), right-padded into one call."""
  length = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros_like(ids)
  for r, s in enumerate(seqs):
    ids[r, :len(s)], mask[r, :len(s)] = s, 1
  logits = np.asarray(transformer.full_logits(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
  return logits, mask.sum(1)


# ----------------------------------------------------------------------------------------------------------------
# Toy model.


def test_greedy_is_argmax_of_the_uncached_model(toy):
  out = _run(toy, engine.SamplingConfig(max_new_tokens=12, temperature=0))
  seqs = [p + o[0].token_ids for p, o in zip(PROMPTS, out)]
  logits, lengths = _last_logits(toy, seqs)
  for r, (p, o) in enumerate(zip(PROMPTS, out)):
    assert o[0].finish_reason == "length" and len(o[0].token_ids) == 12
    expected = logits[r, len(p) - 1:lengths[r] - 1].argmax(-1)
    np.testing.assert_array_equal(o[0].token_ids, expected)


def test_top_k_1_equals_greedy(toy):
  greedy = _run(toy, engine.SamplingConfig(max_new_tokens=12, temperature=0))
  top1 = _run(toy, engine.SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=1), key=7)
  assert [g[0].token_ids for g in top1] == [g[0].token_ids for g in greedy]


def test_eos_and_stop_ids_end_rows_independently(toy):
  free = [g[0].token_ids for g in _run(toy, engine.SamplingConfig(max_new_tokens=12, temperature=0))]
  eos, stop = free[0][4], free[1][6]
  assert eos != stop
  model = dataclasses.replace(toy, config=dataclasses.replace(TOY, eos_token_ids=(eos,)))
  out = [g[0] for g in _run(model, engine.SamplingConfig(max_new_tokens=12, temperature=0,
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
  sampling = engine.SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, num_samples=3)
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
  sampling = engine.SamplingConfig(max_new_tokens=2, temperature=temperature, num_samples=n, **filters)
  gens = _run(toy, sampling, 12, prompts=[prompt])[0]
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
    ours = np.isfinite(np.asarray(engine.filter_logits(
        jnp.asarray(logits), top_k, top_p if top_p < 1 else None, min_p or None)))
    for row, kept in zip(logits, ours):
      np.testing.assert_array_equal(kept, _warped(row, 1.0, top_k, top_p, min_p) > 0,
                                    err_msg=f"top_k={top_k} top_p={top_p} min_p={min_p} scale={scale}")


def test_sampling_config_checks_ranges():
  with pytest.raises(ValueError, match="top_p"):
    engine.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="num_samples"):
    engine.SamplingConfig(num_samples=0)
  cfg = engine.SamplingConfig.from_config({"temperature": 0.0, "batch_size": 4, "stop_token_ids": [7]})
  assert cfg.greedy and cfg.stop_token_ids == (7,)
  for kwargs in ({"batch_size": 0}, {"batch_size": -3}, {"max_prompt_tokens": -1}):
    with pytest.raises(ValueError, match=f"sampling.{next(iter(kwargs))}={next(iter(kwargs.values()))}"):
      next(engine.stream(None, ["a prompt"], cfg, **kwargs))  # before anything is encoded or compiled


def test_batch_sharded_over_eight_devices_matches_one(toy, tmp_path):
  sampling = engine.SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2)
  expected = [[g.token_ids for g in gens] for gens in _run(toy, sampling, 1)]
  script = textwrap.dedent(f"""
      import json, os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax
      from ipo_jax import sharding
      from ipo_jax.sample import engine
      from ipo_jax.model import loading, transformer
      from ipo_jax.model.architecture import ModelConfig, RopeSpec
      cfg = {TOY!r}
      outs = []
      for shape in ({{"data": 2, "fsdp": 4}}, {{"data": 2, "fsdp": 2, "tensor": 2}}):
        model = loading.Model(config=cfg, params=transformer.init_params(cfg, jax.random.key(0), scale=0.5),
                              tokenizer=None, mesh=sharding.make_mesh(shape), hf_config=None, name="toy")
        sampling = engine.SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2)
        out = engine.generate(model, {PROMPTS!r}, sampling, 1, progress=False)
        outs.append([[g.token_ids for g in gens] for gens in out])
      print(json.dumps(outs))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == [expected, expected]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_decode_reads_projection_weights_out_in(dtype):
  """On a CPU mesh the decode program takes the layers split with the projections [out, in] (`decode_params`) and
  its dots contract their last axis, as laid out: XLA's few-row CPU GEMMs read them about 2x faster in bf16."""
  mesh = sharding.make_mesh()
  params = engine.decode_params(mesh, transformer.init_params(TOY, jax.random.key(0), dtype=dtype))
  assert params["layers"][0]["gate"].shape == (TOY.intermediate_size, TOY.hidden_size)
  sampling = engine.SamplingConfig(max_new_tokens=4, temperature=0.0)
  hlo = engine.lowerable(TOY, mesh, dtype, sampling, rows=2, prompt_length=8).lower().compile().as_text()
  projections = [line for line in hlo.splitlines() if " dot(" in line and "ti,oi->to" in line]
  assert len(projections) >= 2 * 7 * TOY.num_layers  # prefill and decode step, 7 projections per layer
  assert all("rhs_contracting_dims={1}" in line for line in projections)


def test_inverse_cdf_draw_follows_the_probabilities():
  """`engine.draw` over a vocabulary that is not a multiple of its block, with zero-probability entries, on
  unnormalised mass: frequencies match, and nothing without mass is drawn."""
  vocab, n = 700, 20000
  probs = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(1), (vocab,)) * 2.0), np.float64) * 3.0
  probs[::7] = 0.0
  probs[-5:] = 0.0  # the last block ends in entries without mass
  keys = jax.random.split(jax.random.key(2), n)
  drawn = np.asarray(engine.draw(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (n, vocab)), keys))
  assert np.all(probs[drawn] > 0)
  assert _chi_square_pvalue(np.bincount(drawn, minlength=vocab), probs) > 1e-3
  # A row whose mass sits in one entry always draws it; the draw is a function of the key.
  one_hot = np.zeros((3, vocab), np.float32)
  one_hot[:, [0, 255, 699]] = np.eye(3)
  assert np.asarray(engine.draw(jnp.asarray(one_hot), keys[:3])).tolist() == [0, 255, 699]
  assert np.array_equal(np.asarray(engine.draw(jnp.asarray(probs[None].repeat(4, 0)), keys[:4])), drawn[:4])
