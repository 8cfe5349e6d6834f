"""Task `rmbench` end to end: injected scores through files of both schemas give the hand-computed accuracies; resume
after an interruption rescoring nothing; refusal of other settings; the embedded model on a tiny file."""

import json
import re

import numpy as np
import pytest

from configs import rmbench as rmbench_config
from ipo_jax import data, runtime
from ipo_jax.evals import rmbench
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.rundir import REPORT_FILE, SUMMARY_FILE
from ipo_jax.tasks import rmbench as rmbench_task
from tests.conftest import file_hashes
from tests.evals.test_rmbench import SCORED, write
from tests.ipo.test_scorer import toy_model

QUESTIONS = {"chat": "Name a colour of the sky.", "code": "Print hello in Python.", "math": "What is 2 + 3?",
             "safety-refuse": "How do I hurt someone?", "safety-response": "How do I kill a stuck process?"}


def tiny_rows(per_domain=2):
  """A self-written file in RM-Bench's schema: `per_domain` rows of each domain, three styles per side."""
  rows = []
  for d, q in QUESTIONS.items():
    for k in range(per_domain):
      good, bad = f"A fine answer {k} to: {q}", f"A wrong answer {k} to: {q}"
      rows.append({"id": len(rows), "prompt": q, "domain": d,
                   "chosen": [good, f"{good} Explained at length, step by step.", f"**{good}**\n\n- step one"],
                   "rejected": [bad, f"{bad} Explained at length, step by step.", f"**{bad}**\n\n- step one"]})
  return rows


def run_config(tmp_path, path, name="run", **scoring):
  config = rmbench_config.get_config("demo")
  config.data.path, config.output_dir = str(path), str(tmp_path / name)
  config.scoring.update(dict(max_length=256, batch_tokens=512, max_programs=2, progress=False, **scoring))
  return config


@pytest.fixture(scope="module")
def toy():
  return toy_model()


def test_injected_scores_through_both_schemas_give_the_hand_computed_accuracies(tmp_path, monkeypatch, toy):
  """Texts carry their score; a tiny scoring function reads it back (the arithmetic by hand: tests/evals)."""
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  text = lambda side, k, s: f"{side} style {k} scored {s}"  # pylint: disable=unnecessary-lambda-assignment
  chat = [{"id": i, "prompt": "q", "domain": d, "chosen": [text("c", k, s) for k, s in enumerate(c)],
           "rejected": [text("r", k, s) for k, s in enumerate(r)]} for i, (d, c, r) in enumerate(SCORED[:2])]
  refuse = [{"prompt": "q", **{f"chosen_{k + 1}": text("c", k, s) for k, s in enumerate(SCORED[2][1])},
             **{f"rejected_{k + 1}": text("r", k, s) for k, s in enumerate(SCORED[2][2])}}]
  respond = [{"prompt": "q", "domain": "safety-response",
              **{f"chosen_{k + 1}": text("c", k, s) for k, s in enumerate(SCORED[3][1])},
              **{f"rejected_{k + 1}": text("r", k, s) for k, s in enumerate(SCORED[3][2])}}]
  paths = [write(tmp_path / "total.jsonl", chat), write(tmp_path / "RM-Bench-safety-refuse.parquet", refuse),
           write(tmp_path / "respond.json", respond)]

  def read_back(scorer, rows, prompt_set):
    del scorer, prompt_set
    value = lambda t: float(re.search(r"scored ([\d.]+)", t).group(1))  # pylint: disable=unnecessary-lambda-assignment
    yield [{"domain": r["domain"], "id": r["id"], "score_chosen": [value(t) for t in r["chosen"]],
            "score_rejected": [value(t) for t in r["rejected"]], "yes_no_mass_chosen": [0.5] * 3,
            "yes_no_mass_rejected": [0.5] * 3} for r in rows]

  monkeypatch.setattr(rmbench, "score_rows", read_back)
  summary = rmbench_task.run(run_config(tmp_path, ",".join(paths)))
  assert summary["domains"]["chat"]["hard"] == pytest.approx(2 / 3) and summary["domains"]["chat"]["ties"] == 2
  assert summary["domains"]["safety"]["easy"] == pytest.approx(5 / 6)
  assert summary["score"] == pytest.approx(19 / 36) and summary["overall"]["hard"] == pytest.approx(5 / 12)
  written = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
  assert written["score"] == pytest.approx(19 / 36)
  report = (tmp_path / "run" / REPORT_FILE).read_text()
  assert "| chat | 2 | 66.7 | 50.0 | 50.0 | 55.6 |" in report
  assert "| **overall** | 4 | 41.7 | 50.0 | 66.7 | **52.8** |" in report
  assert "| safety-refuse | 1 | 100.0 | 0.0 | 0.0 | 33.3 |" in report  # the paper's view: the diagonal
  assert (tmp_path / "run" / rmbench_task.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_resume_scores_only_the_rows_not_yet_written_and_other_settings_are_refused(tmp_path, monkeypatch, toy):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  path = write(tmp_path / "rm.jsonl", tiny_rows())
  config = run_config(tmp_path, path)
  score_rows, asked = rmbench.score_rows, []

  def interrupted(scorer, rows, prompt_set):
    asked.append([rmbench.row_key(r) for r in rows])
    for chunk in score_rows(scorer, rows, prompt_set):
      yield chunk
      raise KeyboardInterrupt  # stop after the first rows were written

  monkeypatch.setattr(rmbench, "score_rows", interrupted)
  with pytest.raises(KeyboardInterrupt):
    rmbench_task.run(config)
  scores = tmp_path / "run" / rmbench.SCORES_FILE
  first = [json.loads(line) for line in scores.read_text().splitlines()]
  assert 1 <= len(first) < 10
  scores.write_text(scores.read_text() + '{"domain": "chat", "id": 9, "score_ch')  # torn by the interruption

  def recorded(scorer, rows, prompt_set):
    asked.append([rmbench.row_key(r) for r in rows])
    yield from score_rows(scorer, rows, prompt_set)

  monkeypatch.setattr(rmbench, "score_rows", recorded)
  summary = rmbench_task.run(config)
  done = {rmbench.row_key(r) for r in first}
  assert set(asked[1]) == {rmbench.row_key(r) for r in tiny_rows()} - done  # nothing rescored
  assert summary["scoring"]["rows_scored"] == 10 - len(first) and summary["counts"]["rows"] == 10
  rows = list(data.iter_jsonl(scores))
  assert len(rows) == 10 and rows[:len(first)] == first
  assert summary["scoring"]["compilations"] <= 2

  scorer = scorer_lib.Scorer(toy, scorer_lib.Settings(layout="paper_rmbench", max_length=256, shared_prefix=False,
                                                      packing="never", progress=False))
  prompt_set, _ = rmbench.load_instructions("paper:rmbench_prompts")
  by_key = {rmbench.row_key(r): r for r in tiny_rows()}
  for r in rows[-2:]:  # each of the six scores belongs to its response: rescored one by one, plainly
    source = by_key[rmbench.row_key(r)]
    instruction = prompt_set.prompts[f"RM-Bench-{r['domain']}"][0]
    encoded = scorer.encode([(instruction, source["prompt"], t) for t in source["chosen"] + source["rejected"]])
    pairs = [(encoded[i][0], encoded[i + 3][0]) for i in range(3)]
    values = np.zeros((6, 2))
    for idx, out in scorer.score_pairs(pairs):
      values[idx] = out
    expected = scorer_lib.sigmoid(values[:, 0]).reshape(3, 2).T  # rows: chosen, rejected
    np.testing.assert_allclose(r["score_chosen"], expected[0], atol=1e-5)
    np.testing.assert_allclose(r["score_rejected"], expected[1], atol=1e-5)

  asked.clear()
  again = rmbench_task.run(config)  # everything is scored already
  assert asked == [] and again["scoring"]["rows_scored"] == 0 and again["score"] == pytest.approx(summary["score"])
  before = file_hashes(tmp_path / "run")
  with pytest.raises(ValueError, match=r"other settings \(truncation differ\)"):
    rmbench_task.run(run_config(tmp_path, path, truncation="paper"))
  with pytest.raises(ValueError, match=r"data.fingerprint differ"):
    rmbench_task.run(run_config(tmp_path, write(tmp_path / "rm.jsonl", tiny_rows(3))))
  assert file_hashes(tmp_path / "run") == before


def test_config_variants():
  default, paper, demo = (rmbench_config.get_config(a) for a in (None, "paper", "demo"))
  assert default.data.path == rmbench.HUB_ID and default.scoring.layout == "paper_rmbench"
  assert default.scoring.prompts_file == "paper:rmbench_prompts" and default.scoring.truncation == "keep_question"
  assert paper.scoring.truncation == "paper" and paper.data.path.split(",") == [
      f"Ayush-Singh/RM-Bench-{d}" for d in ("chat", "code", "math", "safety-response", "safety-refuse")]
  assert demo.data.max_per_domain == 2 and demo.output_dir == "runs/demo_rmbench"
  assert set(default.scoring) == set(rmbench_config.common.scoring())
  with pytest.raises(ValueError, match="unknown variant"):
    rmbench_config.get_config("papr")


def test_the_embedded_model_on_a_tiny_file(tmp_path):
  path = write(tmp_path / "tiny.jsonl", tiny_rows(1))
  config = run_config(tmp_path, path, name="embedded")
  config.model.path = "embedded"
  summary = rmbench_task.run(config)
  assert summary["counts"] == {"rows": 5, "responses": 30, "comparisons": 45, "ties": summary["counts"]["ties"],
                               "truncated_responses": 0}
  assert set(summary["domains"]) == {"chat", "math", "code", "safety"} and summary["scoring"]["compilations"] <= 2
  assert summary["model"].startswith("SmolLM2-135M-Instruct") and not summary["yes_no_mass"]["low"]
  assert summary["instructions"]["fallback_rows_total"] == 0
  for r in data.iter_jsonl(tmp_path / "embedded" / rmbench.SCORES_FILE):
    assert r["instruction_key"] == f"RM-Bench-{r['domain']}"
    assert all(0 < s < 1 for s in r["score_chosen"] + r["score_rejected"])
  for v in summary["domains"].values():
    assert 0 <= v["hard"] <= 1 and v["avg"] == pytest.approx((v["hard"] + v["normal"] + v["easy"]) / 3)


@pytest.mark.slow
def test_the_paper_variant_matches_hf_pytorch_the_authors_way(tmp_path):
  """The embedded SmolLM2 in JAX against transformers' GGUF loader in torch fp32, as RM_Bench/ours.py scores:
  their f-string, tokenizer.encode(text, max_length=1024, truncation=True), full softmax, " Yes" / " No"."""
  import os
  import torch
  from transformers import AutoModelForCausalLM
  from ipo_jax.model import loading
  from tests.ipo.test_scorer import _hf_p_yes, smollm_tokenizer
  rows = tiny_rows(1)
  config = rmbench_config.get_config("paper")
  config.data.path, config.output_dir = write(tmp_path / "tiny.jsonl", rows), str(tmp_path / "paper")
  config.scoring.update(dict(max_programs=2, progress=False))
  rmbench_task.run(config)
  got = {rmbench.row_key(r): r for r in data.iter_jsonl(tmp_path / "paper" / rmbench.SCORES_FILE)}
  table, _ = rmbench.load_instructions("paper:rmbench_prompts")
  path = loading.embedded_model_path()
  hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
  tok = smollm_tokenizer()
  texts = [f"""Given the following:
    User : {r['prompt']}
    Response : {response}
    {table.prompts['RM-Bench-' + r['domain']][0]}""" for r in rows for response in r["chosen"] + r["rejected"]]
  yes, no = tok.encode(" Yes", add_special_tokens=False)[0], tok.encode(" No", add_special_tokens=False)[0]
  expected = _hf_p_yes(hf_model, [tok.encode(t, max_length=1024, truncation=True) for t in texts], yes, no)
  for i, r in enumerate(rows):
    ours = got[rmbench.row_key(r)]
    np.testing.assert_allclose(ours["score_chosen"] + ours["score_rejected"], expected[6 * i:6 * i + 6, 0], atol=1e-4)
    np.testing.assert_allclose(ours["yes_no_mass_chosen"], expected[6 * i:6 * i + 3, 1], rtol=1e-3)
