"""The scoring planner: optimal buckets, the program budget, and packing."""

import itertools

import numpy as np
import pytest

from ipo_jax.ipo import planner
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.model.architecture import ModelConfig
from tests.ipo.test_scorer import TOY_CONFIG


# ----------------------------------------------------------------------------------------------------------------
# Buckets and plans.


def test_choose_buckets_is_optimal():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 300, size=60)
  cost = lambda b: b * (1 + 0.01 * b)
  partial = lambda b: 3.0 * b
  values = np.unique(-(-lengths // 16) * 16)
  for count in (1, 2, 3, 4):
    got = planner.choose_buckets(lengths, count, 16, cost, partial)
    total = lambda bs: sum(cost(min(b for b in bs if b >= x)) for x in lengths) + sum(partial(b) for b in bs)
    best = min((c for k in range(1, count + 1) for c in itertools.combinations(values, k) if c[-1] == values[-1]),
               key=total)
    assert len(got) <= count and total(got) == pytest.approx(total(best))


def test_plan_stays_within_the_program_budget():
  cfg = TOY_CONFIG
  rng = np.random.default_rng(1)
  lengths = rng.integers(20, 1000, size=(500, 2))
  shared = rng.integers(0, 200, size=500)
  for programs in (2, 4, 8):
    settings = scorer_lib.Settings(max_programs=programs)
    plain = planner.plan(cfg, lengths, None, settings)
    assert plain.prefix == 0 and len(plain.buckets) <= programs and plain.buckets[-1] >= lengths.max()
    shared_plan = planner.plan(cfg, lengths, shared, scorer_lib.Settings(max_programs=programs, prefix_length=64))
    assert shared_plan.prefix == 64 and len(shared_plan.buckets) + 1 <= programs
  fixed = planner.plan(cfg, lengths, None, scorer_lib.Settings(buckets=(512, 1024)))
  assert fixed.buckets == (512, 1024)
  with pytest.raises(ValueError, match="do not hold sequences"):
    planner.plan(cfg, lengths, None, scorer_lib.Settings(buckets=(256,)))


# ----------------------------------------------------------------------------------------------------------------
# Packing.


def test_packing_fills_rows_and_streams_by_window():
  rng = np.random.default_rng(3)
  lengths = rng.integers(5, 100, size=40)
  rows = planner.first_fit(lengths, range(40), 128)
  assert sorted(i for r in rows for i in r) == list(range(40))
  assert all(lengths[r].sum() <= 128 for r in rows)
  assert len(rows) <= -(-2 * lengths.sum() // 128)  # first fit: at most twice the ideal rows (in fact near 1x)
  batches = planner.pack_batches(lengths, 128, 4, window=5)  # windows of 10 sequences
  assert sorted(i for b in batches for r in b for i in r) == list(range(40))
  assert all(len(b) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
  first_seen = [min(k for k, b in enumerate(batches) if any(i in r for r in b)) for i in range(40)]
  assert first_seen == sorted(first_seen) or max(first_seen[:10]) <= min(first_seen[30:])


def test_planner_packs_when_padding_costs_more():
  cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True)  # SmolLM2-135M's shapes
  lengths = np.array([[30, 200], [31, 40], [200, 33], [35, 36]] * 16)
  packed = planner.plan(cfg, lengths, None, scorer_lib.Settings(max_programs=2, batch_tokens=1024))
  assert packed.packed and packed.buckets == (224,) and packed.rows == (4,)
  assert sum(len(r) for b in packed.packed for r in b) == lengths.size
  unpacked = planner.plan(cfg, lengths, None, scorer_lib.Settings(max_programs=2, batch_tokens=1024,
                                                               packing="never"))
  assert not unpacked.packed and packed.cost < unpacked.cost
  uniform = planner.plan(cfg, np.full((64, 2), 200), None, scorer_lib.Settings(max_programs=2, batch_tokens=1024))
  assert not uniform.packed  # nothing to gain: one bucket holds every row without padding


def test_batch_tokens_default_per_platform_and_fixed_for_a_mesh():
  settings = scorer_lib.Settings()
  assert [settings.tokens_per_batch(p) for p in ("cpu", "gpu", "tpu")] == [2048, 8192, 8192]
  assert settings.on("cpu").batch_tokens == 2048 and settings.on("tpu").batch_tokens == 8192
  assert scorer_lib.Settings(batch_tokens=96).on("tpu").tokens_per_batch("cpu") == 96  # set explicitly: kept
  assert planner.batch_rows(256, settings.on("tpu"), 4) == 32  # 8192 tokens / 256, within max_batch 64
