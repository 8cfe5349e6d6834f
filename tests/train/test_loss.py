"""DPO losses against a numpy re-derivation and TRL 1.16's own loss code; gradients; chunked sequence log-probs."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ipo_jax
from ipo_jax.train import loss as loss_lib
from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig

BETA = 0.3


def _inputs(n=16, seed=0):
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = (rng.normal(-20, 4, n).astype(np.float32) for _ in range(4))
  lengths = rng.integers(3, 40, (2, n)).astype(np.float32)
  return pc, pr, rc, rr, lengths


def _numpy_loss(pc, pr, rc, rr, lengths, loss_type, eps):
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  z = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    losses = -(1 - eps) * log_sigmoid(BETA * z) - eps * log_sigmoid(-BETA * z)
  elif loss_type == "hinge":
    losses = np.maximum(0.0, 1 - BETA * z)
  elif loss_type == "ipo":
    losses = (z - 1 / (2 * BETA)) ** 2
  else:
    losses = ((pc - rc) / lengths[0] - (pr - rr) / lengths[1] - 1 / (2 * BETA)) ** 2
  chosen, rejected = BETA * (pc - rc), BETA * (pr - rr)
  return losses.mean(), {
      "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
      "rewards/accuracies": (chosen > rejected).mean(), "rewards/margins": (chosen - rejected).mean(),
      "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("ipo_norm", 0.0)]


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_loss_matches_numpy(loss_type, eps):
  pc, pr, rc, rr, lengths = _inputs()
  pr[:3] = pc[:3] - rc[:3] + rr[:3]  # ties: equal rewards do not count as accurate
  loss, metrics = ipo_jax.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=eps,
                                   chosen_lengths=lengths[0], rejected_lengths=lengths[1])
  want_loss, want = _numpy_loss(pc, pr, rc, rr, lengths, loss_type, eps)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)
  for k, v in want.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_loss_rejects_unknown_type_and_missing_lengths():
  pc, pr, rc, rr, _ = _inputs(4)
  with pytest.raises(ValueError, match="not one of"):
    loss_lib.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="kto")
  with pytest.raises(ValueError, match="chosen_lengths"):
    loss_lib.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="ipo_norm")


@pytest.fixture(scope="module")
def trl_loss():
  """TRL 1.16's `DPOTrainer._compute_loss` on given sequence log-probs (a stub model returns them)."""
  import datasets
  import tokenizers
  import torch
  import transformers
  import trl

  assert trl.__version__ == "1.16.0", "the expected values below follow TRL 1.16.0"
  vocab = {f"t{i}": i for i in range(8)} | {"<pad>": 8, "</s>": 9}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
  tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
  rows = datasets.Dataset.from_list([{"prompt": "t1", "chosen": " t2", "rejected": " t3"}] * 2)

  def compute(pc, pr, rc, rr, lengths, loss_type, eps, tmp):
    args = trl.DPOConfig(output_dir=str(tmp), loss_type=[loss_type], beta=BETA, label_smoothing=eps,
                         precompute_ref_log_probs=True, use_cpu=True, report_to=[], max_length=8,
                         per_device_train_batch_size=2)
    trainer = trl.DPOTrainer(model=tiny, args=args, train_dataset=rows, processing_class=tokenizer)
    n, t = len(pc), int(lengths.max()) + 2
    completion = np.zeros((2 * n, t), np.int64)  # batch is [chosen..., rejected...]; responses end the rows
    for i, m in enumerate(np.concatenate([lengths[0], lengths[1]]).astype(int)):
      completion[i, t - m:] = 1
    per_token = np.zeros((2 * n, t - 1), np.float64)  # each sequence's log-prob on its last token
    per_token[:, -1] = np.concatenate([pc, pr])

    class Stub(torch.nn.Module):
      def forward(self, input_ids, **_):
        zeros = torch.zeros(input_ids.shape[0], t - 1)
        return types.SimpleNamespace(log_probs=torch.tensor(per_token), entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool())

    trainer.model = Stub()
    inputs = {"input_ids": torch.zeros(2 * n, t, dtype=torch.long), "completion_mask": torch.tensor(completion),
              "attention_mask": torch.ones(2 * n, t, dtype=torch.long),
              "ref_chosen_logps": torch.tensor(rc, dtype=torch.float64),
              "ref_rejected_logps": torch.tensor(rr, dtype=torch.float64)}
    loss = float(trainer._compute_loss(trainer.model, inputs, False))  # pylint: disable=protected-access
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}  # pylint: disable=protected-access

  return compute


@pytest.mark.parametrize("ours,theirs", [("sigmoid", "sigmoid"), ("hinge", "hinge"), ("ipo_norm", "ipo")])
def test_loss_matches_trl(trl_loss, tmp_path, ours, theirs):
  pc, pr, rc, rr, lengths = _inputs(8, seed=1)
  want_loss, want = trl_loss(pc, pr, rc, rr, lengths, theirs, 0.0, tmp_path)
  loss, metrics = loss_lib.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=ours, chosen_lengths=lengths[0],
                               rejected_lengths=lengths[1])
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"):
    np.testing.assert_allclose(metrics[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_label_smoothed_sigmoid_matches_trl(trl_loss, tmp_path):
  """TRL 1.16 keeps the conservative-DPO formula in `aot`, which for a single pair is exactly that formula."""
  pc, pr, rc, rr, lengths = _inputs(4, seed=2)
  for i in range(4):
    one = lambda x: x[i:i + 1]
    want, _ = trl_loss(one(pc), one(pr), one(rc), one(rr), lengths[:, i:i + 1], "aot", 0.2, tmp_path)
    loss, _ = loss_lib.dpo_loss(one(pc), one(pr), one(rc), one(rr), beta=BETA, label_smoothing=0.2)
    np.testing.assert_allclose(loss, want, rtol=2e-5)


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_loss_gradients_match_finite_differences(loss_type, eps):
  pc, pr, rc, rr, lengths = _inputs(6, seed=3)
  pc = pc + 3.0  # keep the hinge away from its kink
  f = lambda *x: loss_lib.dpo_loss(*x, beta=BETA, loss_type=loss_type, label_smoothing=eps,
                              chosen_lengths=lengths[0], rejected_lengths=lengths[1])[0]
  with jax.enable_x64(True):
    check_grads(f, tuple(np.float64(x) for x in (pc, pr, rc, rr)), order=1, modes=["rev"], eps=1e-4)


def _tiny(softcap=None, tied=False):
  return ModelConfig(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, attn_scale=8**-0.5, final_softcap=softcap,
                     tie_embeddings=tied)


def test_chunked_log_softmax_equals_full():
  cfg = _tiny(softcap=4.0)
  params = transformer.init_params(cfg, jax.random.key(0), scale=0.3)
  hidden = jax.random.normal(jax.random.key(1), (3, 5, 32))
  targets = jax.random.randint(jax.random.key(2), (3, 5), 0, 101)
  weights = jax.random.normal(jax.random.key(3), (3, 5))

  def full(p, h):
    logp = jax.nn.log_softmax(transformer.lm_head(p, cfg, h))
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]

  @jax.jit
  def value_and_grads(p, h):
    fns = [full] + [lambda p, h, c=c: loss_lib.token_logps(p, cfg, h, targets, vocab_chunk=c) for c in (7, 4096)]
    return [(f(p, h), jax.grad(lambda p, h: (f(p, h) * weights).sum(), argnums=(0, 1))(p, h)) for f in fns]

  (want, want_grads), *chunked = value_and_grads(params, hidden)
  for got, grads in chunked:  # 7 does not divide 101 (padded chunks); 4096 is one chunk
    np.testing.assert_allclose(got, want, atol=2e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(a, b, atol=2e-6)


def test_sequence_logps_sum_response_tokens_only():
  cfg = _tiny(tied=True)
  params = transformer.init_params(cfg, jax.random.key(0), scale=0.3)
  rng = np.random.default_rng(0)
  # Two pairs, right-padded to 12: prompt lengths 4 and 3; responses (3, 5) and (6, 2).
  ids = rng.integers(0, 101, (2, 2, 12)).astype(np.int32)
  spans = [[(4, 3), (4, 5)], [(3, 6), (3, 2)]]
  attention, loss = np.zeros_like(ids), np.zeros_like(ids)
  for b, pair in enumerate(spans):
    for j, (n, m) in enumerate(pair):
      attention[b, j, :n + m] = 1
      loss[b, j, n:n + m] = 1
  batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
  padded = {k: np.where(attention == 1, v, 7 if k == "input_ids" else 0) for k, v in batch.items()}
  pair_logps = jax.jit(lambda b: loss_lib.pair_logps(params, cfg, b, vocab_chunk=16))
  got = pair_logps(batch)
  logp = np.asarray(jax.nn.log_softmax(transformer.full_logits(params, cfg, ids.reshape(4, 12),
                                                            attention.reshape(4, 12)))).reshape(2, 2, 12, -1)
  for b, pair in enumerate(spans):
    for j, (n, m) in enumerate(pair):
      want = sum(logp[b, j, t - 1, ids[b, j, t]] for t in range(n, n + m))
      np.testing.assert_allclose(got[b, j], want, rtol=1e-5)
  np.testing.assert_allclose(pair_logps(padded), got, rtol=1e-6)  # padding ids do not matter
  np.testing.assert_allclose(loss_lib.response_lengths(batch), [[3, 5], [6, 2]])


def test_gradients_through_the_model_match_the_full_log_softmax():
  cfg = dataclasses.replace(_tiny(), num_layers=1, layer_types=())
  params = transformer.init_params(cfg, jax.random.key(0), scale=0.3)
  ids = jax.random.randint(jax.random.key(1), (2, 2, 10), 0, 101)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": (jnp.arange(10) >= 4) * 1 + 0 * ids}

  def reference(p):  # full [B, T, V] log-softmax
    flat = ids.reshape(4, 10)
    logp = jax.nn.log_softmax(transformer.full_logits.__wrapped__(p, cfg, flat, jnp.ones_like(flat))[:, :-1])
    tok = jnp.take_along_axis(logp, flat[:, 1:, None], -1)[..., 0]
    return (tok * batch["loss_mask"].reshape(4, 10)[:, 1:]).sum()

  ours = lambda p, remat=True: loss_lib.pair_logps(p, cfg, batch, vocab_chunk=16, remat=remat).sum()
  g_ours, g_ref = jax.jit(lambda p: (jax.grad(ours)(p), jax.grad(reference)(p)))(params)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # `remat` wraps the layer body in one more jax.checkpoint (the vocabulary chunks always are).
  count = lambda remat: str(jax.make_jaxpr(lambda p: ours(p, remat))(params)).count("remat2[")
  assert count(True) == count(False) + 1


def test_shared_prompt_rows_give_the_separate_rows_log_probs_and_gradients():
  """One row per pair (prompt once, responses as branches, LM head at the target slots) equals the [B, 2, T] layout:
  log-probs, response lengths and the gradient of a loss over both, with truncation and uneven lengths."""
  from ipo_jax.train import pairs as pairs_lib  # pylint: disable=import-outside-toplevel
  cfg = _tiny()
  params = transformer.init_params(cfg, jax.random.key(0), scale=0.3)
  rng = np.random.default_rng(1)
  draw = lambda n: rng.integers(1, 101, n).astype(np.int32)
  pset = pairs_lib.PreferenceSet([draw(5), draw(2), draw(9)], [draw(4), draw(7), draw(3)],
                                 [draw(6), draw(1), draw(8)])
  kw = dict(max_length=12, max_prompt_length=6, pad_id=0)  # row 2's prompt and chosen are cut
  sep, shared = pairs_lib.collate(pset, [0, 1, 2], **kw), pairs_lib.collate_shared(pset, [0, 1, 2], **kw)
  assert shared["input_ids"].shape[0] == 3 and shared["target_pos"].shape[1] >= 12
  np.testing.assert_array_equal(loss_lib.response_lengths(shared), loss_lib.response_lengths(sep))
  weights = jnp.asarray([[1.0, -0.5], [0.3, 2.0], [-1.0, 0.7]])

  @jax.jit
  def value_and_grad(p, b):
    f = lambda p: (loss_lib.pair_logps(p, cfg, b, vocab_chunk=16) * weights).sum()
    return loss_lib.pair_logps(p, cfg, b, vocab_chunk=16), jax.grad(f)(p)

  (want, g_want), (got, g_got) = value_and_grad(params, sep), value_and_grad(params, shared)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
