"""Task `generate`: sampled responses to instructions, in a run directory (configs/generate.py).

Instructions from `config.data` (AlpacaEval's `instruction`, MT-Bench's first turn, the first human turn of
HH-RLHF transcripts) laid out with the chat template or as raw text, sampled into `output_dir/generations.jsonl`
as batches finish (one row per (index, sample): instruction, text, token_ids, finish_reason, num_tokens), then
`summary.json`. `output_dir` is a run directory (ipo_jax/rundir.py): a rerun with the same identity (model,
data, sampling, seed) resumes where it stopped; other settings are refused, naming the keys that differ. The
rows a run covers (`data.start`, `data.limit`, `data.skip_invalid`) may change between reruns.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from ipo_jax import data as data_lib
from ipo_jax import runtime
from ipo_jax.rundir import RunDir
from ipo_jax.sample import engine, instructions as instructions_lib

ROWS = engine.GENERATIONS_FILE


def identity(config: Any) -> dict[str, Any]:
  """What decides each row's generations: model, data (except the rows covered), sampling, seed."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in ("start", "limit", "skip_invalid")}
  sampling = dataclasses.asdict(engine.SamplingConfig.from_config(config.sampling))
  sampling["max_prompt_tokens"] = config.sampling.get("max_prompt_tokens")
  return {"model": {"path": config.model.path, "dtype": config.model.get("dtype", "float32")}, "data": data,
          "sampling": sampling, "seed": config.seed}


def _finished_samples(run: RunDir, instructions: dict[int, str]) -> set[tuple[int, int]]:
  """(index, sample) pairs of the current prompts already in generations.jsonl; their texts must match."""
  done = set()
  for n, row in enumerate(run.rows(ROWS)):
    index = row.get("index")
    if index in instructions:
      if instructions[index] != row.get("instruction"):
        raise data_lib.DataError(f"{run.file(ROWS)}: row {n} (index {index}) holds another instruction than the "
                                 "prompt data; use a new output_dir for new data")
      done.add((index, row["sample"]))
  return done


def _append_generations(model: Any, todo: list[tuple[int, str]], done: set[tuple[int, int]], run: RunDir,
                        sampling: engine.SamplingConfig, config: Any) -> collections.Counter:
  """Generates the missing samples of `todo` and appends them to generations.jsonl as batches finish; counts the
  rows by finish reason and their tokens (key "tokens")."""
  chat = config.data.get("chat_template", True)
  system = config.data.get("system_prompt") or None
  prompts = [instructions_lib.format_prompt(model.tokenizer, text, chat, system) for _, text in todo]
  counts: collections.Counter = collections.Counter()
  for pos, gens in engine.stream(model, prompts, sampling, config.seed, indices=[i for i, _ in todo],
                                 batch_size=config.sampling.get("batch_size", 16),
                                 max_prompt_tokens=config.sampling.get("max_prompt_tokens") or None):
    index, instruction = todo[pos]
    rows = [{"index": index, "instruction": instruction, "sample": s, "text": g.text, "token_ids": g.token_ids,
             "finish_reason": g.finish_reason, "num_tokens": len(g.token_ids)}
            for s, g in enumerate(gens) if (index, s) not in done]
    counts.update(r["finish_reason"] for r in rows)
    counts["tokens"] += sum(r["num_tokens"] for r in rows)
    run.append(ROWS, rows)
  return counts


def run(config: Any) -> dict[str, Any]:
  """Samples `config.sampling.num_samples` responses per instruction into generations.jsonl; returns the summary."""
  sampling = engine.SamplingConfig.from_config(config.sampling)
  for key in ("batch_size", "max_prompt_tokens"):  # checked before anything is written
    value = config.sampling.get(key, None)
    if value is not None and value < (1 if key == "batch_size" else 0):
      raise ValueError(f"sampling.{key}={value} must be at least {1 if key == 'batch_size' else 0}")
  mesh = runtime.mesh_from_config(config)
  instructions = instructions_lib.load_instructions(config.data)  # bad data fails before the run directory opens
  run_dir = RunDir.open(config.output_dir, "generate", identity(config), overwrite=config.get("overwrite", False))
  done = _finished_samples(run_dir, dict(instructions))
  run_dir.agree(len(done), "finished generations")
  n = sampling.num_samples
  todo = [(i, text) for i, text in instructions if any((i, s) not in done for s in range(n))]
  runtime.log(f"generate: {len(instructions)} prompts x {n} samples; {len(instructions) - len(todo)} already "
              f"done, {len(todo)} to go")
  counts: collections.Counter = collections.Counter()
  compiles, start = engine.num_compilations(), time.perf_counter()
  if todo:
    model = runtime.load_model_from_config(config, mesh)
    start = time.perf_counter()
    counts = _append_generations(model, todo, done, run_dir, sampling, config)
  seconds = time.perf_counter() - start
  tokens = counts.pop("tokens", 0)
  summary = run_dir.finish({
      "model": config.model.path, "prompts": len(instructions), "samples_per_prompt": n,
      "generated": sum(counts.values()), "resumed": len(done), "new_tokens": tokens,
      "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1) if tokens else 0.0,
      "finish_reasons": dict(counts), "compilations": engine.num_compilations() - compiles,
      "output": run_dir.file(ROWS),
  })
  runtime.log(summary)
  return summary
