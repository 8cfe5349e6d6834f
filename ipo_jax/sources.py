"""Where third-party data comes from: one resolver for every data set, prompt file and rubric the project reads.

ipo_jax ships no third-party data. A data option names its real source, and `resolve` turns it into a local file:

  1. an explicit local path is used as it is;
  2. the cache (`$IPO_JAX_CACHE`, default `~/.cache/ipo_jax`): a file fetched earlier, used when its SHA-256
     still matches the one recorded when it was written (and the pinned one, where the source pins it);
  3. the remote source: a Hugging Face hub data set, or a file of a public repository at a pinned commit (the
     paper's instructions and rubric are read out of the authors' Python literals with `ast`, as plain data);
     what arrives is checked against the pinned SHA-256 where there is one and written to the cache;
  4. the offline copy directory (`$IPO_JAX_DATA`, else `../shared/data` beside the repository).

With none reachable, `SourceUnavailable` says in one line what was tried and the two fixes.

Names a data option takes besides local paths: the names of `SOURCES` — hub ids (with their split and
configuration) and repository files such as `paper:rewardbench_prompts`. Any other hub id is read with
`datasets.load_dataset` and cached the same way (it has no offline copy).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from ipo_jax.literals import module_constants, prompt_table, readme_dict, string_literal

CACHE_ENV = "IPO_JAX_CACHE"
DATA_ENV = "IPO_JAX_DATA"
GITHUB_ENV = "IPO_JAX_GITHUB_RAW"  # base URL of raw repository files (a mirror, or a test server)
GITHUB_RAW = "https://raw.githubusercontent.com"
TIMEOUT_S = 30

PAPER_REPO, PAPER_COMMIT = "shivank21/Implicit_Preference_Optimization", "44662860dc8f361d90849206eea4958016ee8ba1"
RB_REPO, RB_COMMIT = "allenai/reward-bench", "05a9005efb607249822c193590c8ecab87c77052"
FASTCHAT_REPO, FASTCHAT_COMMIT = "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d"
XLA_REPO = "openxla/xla"
_XLA_SPECS = "xla/backends/gpu/target_config/specs"


class SourceUnavailable(FileNotFoundError):
  """No copy of a source could be had; the message is one line with what was tried and the fixes."""


# ----------------------------------------------------------------------------------------------------------------
# The sources.


@dataclasses.dataclass(frozen=True)
class Source:
  """One third-party file: where it lives, how it is read, its offline copy and its license.

  Remote kinds: `github` (repo, commit, path; `extract` turns the fetched bytes into the file), `hub_file` (a file
  of a hub data set repository), `hub_dataset` (rows of `datasets.load_dataset(repo, name, split=split)`, cached
  as .jsonl.gz).
  """

  name: str
  kind: str
  repo: str
  path: str = ""  # github / hub_file: the file in the repository
  commit: str = ""  # github: the pinned commit
  sha256: str = ""  # the fetched bytes' pinned hash (before extraction), where known
  extract: Callable[[bytes, str], bytes] | None = None
  filename: str = ""  # the file's name in the cache
  offline: str = ""  # relative path in the offline copy directory
  license: str = ""
  config_name: str = ""  # hub_dataset
  split: str = ""  # hub_dataset

  @property
  def origin(self) -> str:
    if self.kind == "github":
      return f"{self.repo}@{self.commit[:12]}:{self.path}"
    if self.kind == "hub_file":
      return f"hf:{self.repo}/{self.path}"
    return f"hf:{self.repo}" + (f" ({self.config_name})" if self.config_name else "") + f" split {self.split}"

  @property
  def url(self) -> str:
    if self.kind == "github":
      return f"{os.environ.get(GITHUB_ENV, GITHUB_RAW).rstrip('/')}/{self.repo}/{self.commit}/{self.path}"
    if self.kind == "hub_file":
      return f"{_hub_endpoint()}/datasets/{self.repo}/resolve/main/{self.path}"
    return f"{_hub_endpoint()}/datasets/{self.repo}"


def _paper(name: str, path: str, sha: str, extract=None, offline_suffix: str = ".json") -> Source:
  return Source(f"paper:{name}", "github", PAPER_REPO, path, PAPER_COMMIT, sha, extract,
                filename=f"paper/{name}{offline_suffix}", offline=f"ipo/{name}{offline_suffix}", license="Apache-2.0")


_RB, _RM = "Preference_Comparison/Reward_Bench", "Preference_Comparison/RM_Bench"
_SOURCES = (
    Source("allenai/reward-bench", "hub_dataset", "allenai/reward-bench", split="filtered",
           filename="reward-bench/filtered.jsonl.gz", offline="reward_bench/reward_bench_filtered.jsonl.gz",
           license="ODC-BY"),
    Source("tatsu-lab/alpaca_eval", "hub_file", "tatsu-lab/alpaca_eval", "alpaca_eval.json",
           filename="alpaca_eval/alpaca_eval.json", offline="prompts/alpaca_eval.jsonl", license="CC BY-NC 4.0",
           config_name="alpaca_eval", split="eval"),
    Source("Anthropic/hh-rlhf", "hub_file", "Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz",
           filename="hh-rlhf/harmless-base-test.jsonl.gz", offline="prompts/hh_rlhf_harmless_base_test.jsonl.gz",
           license="MIT", config_name="harmless-base", split="test"),
    Source("fastchat:mt_bench_questions", "github", FASTCHAT_REPO, "fastchat/llm_judge/data/mt_bench/question.jsonl",
           FASTCHAT_COMMIT, "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
           filename="mt_bench/question.jsonl", offline="prompts/mt_bench_question.jsonl", license="Apache-2.0"),
    _paper("rewardbench_prompts", f"{_RB}/ours.py",
           "2fc7c4c247592f2ec6b26fa7a6873f57f064e77baa711e06aba88f399fd279fb",
           prompt_table("get_eval_prompt", "fallback_subset")),
    _paper("candidate_prompts", f"{_RB}/candidate_prompts.json",
           "2242241189b5a5e062bba41e184f0199d80a3d0f9e490621afdf486610c3f0f6"),
    _paper("self_improvement_prompts", "DPO/ours.py",
           "e4691f6bfb9278bf7e53958ad79d3bb655cac3d64edd98f92f9d9bef2a6f8dd0",
           prompt_table("get_eval_prompt", "fallback_category")),
    _paper("self_reward_judge_prompt", f"{_RB}/self_reward.py",
           "9d1cb23d26afc792789e865216708b0a713c4a5e54a8915e78c1f581885df999",
           string_literal("get_eval_prompt", "scoring_prompt"), ".txt"),
    _paper("rmbench_prompts", f"{_RM}/ours.py", "efe448f7df949750798596714a9cd406bfd02ac1fa6faee374a2cf6a39c64cf9",
           prompt_table("get_eval_prompt", "fallback_domain",
                        layout={"instruction": "prompt", "response": "response", "prompt_template": "instruction"})),
    _paper("rewardbench_prompts_same", f"{_RB}/ours_same_prompt.py",
           "b91e410f2414bcf68c8990ddfa740445e3a43682a659d2420fe895b18e511caa",
           prompt_table("get_eval_prompt", "fallback_subset")),
    _paper("rewardbench_prompts_shuffled", f"{_RB}/ours_prompt_shuffle.py",
           "cf029b9d24df087a1d3c86f5bb5f1d0f134a776a1dea7a0e4642d134af4aa24e",
           prompt_table("get_eval_prompt", "fallback_subset")),
    _paper("pairwise_judge_prompt", f"{_RB}/binary_gpt.py",
           "cffc75d42a7483645be6ab30d6842550bc9eaedd08954635818f2d175e6ab8e5",
           string_literal("get_comparative_prompt", "comparative_prompt"), ".txt"),
    Source("reward-bench:constants", "github", RB_REPO, "rewardbench/constants.py", RB_COMMIT,
           "4c3661b48b189783b9dc3ed5424f8e2d0e24a9ee3fd2c3531713e212dd9d227d",
           module_constants(example_counts="EXAMPLE_COUNTS", subset_mapping="SUBSET_MAPPING"),
           filename="reward-bench/constants.json", offline="reward_bench/official_constants.json",
           license="Apache-2.0"),
    Source("reward-bench:section_example", "github", RB_REPO, "README.md", RB_COMMIT,
           "303bfafef8be5395ca3ebffb7ee6a629201d81ae7cfce04eba5223d0cf452da5",
           readme_dict("metrics", "per_subset_accuracy"),
           filename="reward-bench/section_example.json", offline="reward_bench/section_scores_example.json",
           license="Apache-2.0"),
    # RM-Bench (ipo_jax/evals/rmbench.py): the benchmark's one file, and the authors' per-domain copies of it.
    Source("THU-KEG/RM-Bench", "hub_file", "THU-KEG/RM-Bench", "total_dataset.json",
           filename="rm-bench/total_dataset.json", offline="rm_bench/total_dataset.json", license="ODC-BY",
           split="train"),
    *(Source(f"Ayush-Singh/RM-Bench-{d}", "hub_dataset", f"Ayush-Singh/RM-Bench-{d}", split="train",
             filename=f"rm-bench/RM-Bench-{d}.jsonl.gz", offline=f"rm_bench/RM-Bench-{d}.jsonl.gz",
             license="ODC-BY (RM-Bench's)") for d in ("chat", "code", "math", "safety-refuse", "safety-response")),
    # SFT examples (ipo_jax/train/sft.py: instruction, context, response).
    Source("databricks/databricks-dolly-15k", "hub_file", "databricks/databricks-dolly-15k",
           "databricks-dolly-15k.jsonl", filename="dolly/databricks-dolly-15k.jsonl",
           offline="sft/databricks-dolly-15k.jsonl", license="CC BY-SA 3.0", split="train"),
)


def _drop_fields(*fields: str) -> Callable[[bytes, str], bytes]:
  """A text proto without the lines of `fields` (ones this jaxlib's proto does not know)."""
  def extract(content: bytes, origin: str) -> bytes:
    del origin
    lines = content.decode().splitlines(keepends=True)
    return "".join(l for l in lines if l.strip().split(":")[0] not in fields).encode()
  return extract


# XLA's GPU target descriptions (ipo_jax/aot/targets.py compiles for GPUs this host does not have with them).
_GPU_SPECS = (
    Source("xla:h100_sxm_target_config", "github", XLA_REPO, f"{_XLA_SPECS}/h100_sxm.txtpb",
           "0774019d97e77dc433ce97604295f6fc0f5b3b65",
           "e41f966984c3e85ad7e22873a6f8c5d965eca55790cf143ffe9637881b75173f",
           extract=_drop_fields("collective_memory_granularity"),
           filename="xla/h100_sxm.txtpb", offline="xla/h100_sxm.txtpb", license="Apache-2.0"),
    Source("xla:h200_target_config", "github", XLA_REPO, f"{_XLA_SPECS}/h200.txtpb",
           "4336d12e0706168f6a382ddb231f3a83853b0657",
           "2bc577bdb19a3294b15fb3ea8ed077e143b8398754666c12b03a8b305300b7b4",
           extract=_drop_fields("collective_memory_granularity"),
           filename="xla/h200.txtpb", offline="xla/h200.txtpb", license="Apache-2.0"),
)
SOURCES: dict[str, Source] = {s.name: s for s in _SOURCES + _GPU_SPECS}


def lookup(ref: str, split: str | None = None, name: str | None = None) -> Source | None:
  """The registered source a data option names: a name of SOURCES; a hub data set's name is its hub id, and it
  matches when the split and configuration asked for are its own (or not given)."""
  source = SOURCES.get(ref)
  if source is None or source.kind == "github":
    return source
  if (split or source.split) == source.split and (name or source.config_name) == source.config_name:
    return source
  return None


# ----------------------------------------------------------------------------------------------------------------
# Directories.


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ipo_jax").expanduser()


def offline_dir() -> Path | None:
  """`$IPO_JAX_DATA`, else `../shared/data` beside the repository (or beside the working directory)."""
  env = os.environ.get(DATA_ENV)
  if env:
    return Path(env).expanduser()
  for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
    candidate = base.parent / "shared" / "data"
    if candidate.is_dir():
      return candidate
  return None


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Fetching.

_UNREACHABLE: dict[str, str] = {}  # host -> the error of its first failure in this process (tried once)


def _check_reachable(url: str) -> None:
  """Fails at once (and for the rest of the process) when `url`'s host cannot be reached, instead of letting a
  client retry with back-off; skipped behind a proxy, which only the clients know how to use."""
  host = urllib.parse.urlsplit(url).hostname or ""
  if host in _UNREACHABLE:
    raise OSError(_UNREACHABLE[host])
  if urllib.request.getproxies():
    return
  try:
    socket.create_connection((host, urllib.parse.urlsplit(url).port or 443), timeout=10).close()
  except OSError as e:
    _UNREACHABLE[host] = f"{host} unreachable ({e.strerror or e})"
    raise OSError(_UNREACHABLE[host]) from None


def _hub_endpoint() -> str:
  return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _fetch_url(url: str) -> bytes:
  _check_reachable(url)
  try:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # nosec: a pinned public file
      return response.read()
  except urllib.error.HTTPError as e:
    raise OSError(f"{url}: HTTP Error {e.code} {e.reason}") from None
  except OSError as e:
    raise OSError(f"{url}: {getattr(e, 'reason', None) or e}") from None


def _fetch_hub_file(source: Source) -> bytes:
  if os.environ.get("HF_HUB_OFFLINE") == "1":
    raise OSError("HF_HUB_OFFLINE=1")
  _check_reachable(_hub_endpoint())
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  path = huggingface_hub.hf_hub_download(source.repo, source.path, repo_type="dataset")
  return Path(path).read_bytes()


def _fetch_hub_rows(repo: str, name: str, split: str) -> bytes:
  if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
    raise OSError("offline mode is set")
  _check_reachable(_hub_endpoint())
  import datasets  # pylint: disable=import-outside-toplevel
  rows = datasets.load_dataset(repo, name or None, split=split)
  buffer = io.BytesIO()
  with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
    for row in rows:
      f.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
  return buffer.getvalue()


def fetch(source: Source) -> bytes:
  """The source's file from its remote (checked against the pinned hash, then extracted)."""
  if source.kind == "github":
    raw = _fetch_url(source.url)
  elif source.kind == "hub_file":
    raw = _fetch_hub_file(source)
  else:
    raw = _fetch_hub_rows(source.repo, source.config_name, source.split)
  if source.sha256 and hashlib.sha256(raw).hexdigest() != source.sha256:
    raise OSError(f"{source.url}: content does not match the pinned SHA-256 {source.sha256[:12]}…")
  return source.extract(raw, source.origin) if source.extract else raw


# ----------------------------------------------------------------------------------------------------------------
# The cache.


def _cached(path: Path, log: Callable[[str], None]) -> bool:
  """Whether `path` is a complete cached file: its SHA-256 equals the one recorded when it was written."""
  record = path.with_name(path.name + ".sha256")
  if not path.exists() or not record.exists():
    return False
  if _sha256(path) == record.read_text().split()[0]:
    return True
  log(f"{path}: cached file does not match its recorded SHA-256 (corrupted); fetching it again")
  path.unlink()
  record.unlink()
  return False


def _store(path: Path, content: bytes) -> None:
  """Writes a cache file and its SHA-256 record atomically (a reader never sees half a file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  tmp.write_bytes(content)
  os.replace(tmp, path)
  record = path.with_name(path.name + ".sha256")
  record_tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
  record_tmp.write_text(f"{hashlib.sha256(content).hexdigest()}  {path.name}\n")
  os.replace(record_tmp, record)


def _through_cache(label: str, cache_name: str, get: Callable[[], bytes], offline: str, tried: list[str],
                   log: Callable[[str], None]) -> Path | None:
  path = cache_dir() / cache_name
  if _cached(path, log):
    return path
  tried.append(f"cache {path} (absent)")
  try:
    content = get()
  except Exception as e:  # pylint: disable=broad-except  # any remote failure falls through to the offline copy
    tried.append(f"remote ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
  else:
    _store(path, content)
    log(f"{label}: fetched into {path}")
    return path
  if offline:
    root = offline_dir()
    if root is not None and (root / offline).is_file():
      return root / offline
    tried.append(f"offline copy {root / offline} (not found)" if root else
                 f"offline copy (none: ${DATA_ENV} unset and no ../shared/data beside the repository)")
  return None


def _hub_cache_name(repo: str, name: str, split: str) -> str:
  return f"hub/{repo.replace('/', '--')}/{name or 'default'}/{split}.jsonl.gz"


def resolve(ref: str, *, split: str | None = None, name: str | None = None,
            log: Callable[[str], None] | None = None, what: str = "data file") -> Path:
  """A local file for a data option: a local path, a registered source, or a hub id (see the module docstring).
  `what` names the file in the error for a missing local path."""
  log = log or (lambda message: None)
  ref = os.path.expanduser(str(ref))
  if os.path.exists(ref):
    return Path(ref)
  source = lookup(ref, split, name)
  tried: list[str] = []
  if source is not None:
    found = _through_cache(source.name, source.filename, lambda: fetch(source), source.offline, tried, log)
    fix = (f"connect to the network, or set ${DATA_ENV} to a directory holding {source.offline}" if source.offline
           else "connect to the network")
    what = f"{source.name} ({source.origin})"
  elif looks_like_hub_id(ref):
    found = _through_cache(ref, _hub_cache_name(ref, name or "", split or "train"),
                           lambda: _fetch_hub_rows(ref, name or "", split or "train"), "", tried, log)
    fix, what = "connect to the network, or give a local file", f"hub data set {ref} split {split or 'train'}"
  else:
    raise FileNotFoundError(f"{what} not found: {ref} (not a local file, a known source "
                            f"({', '.join(sorted(SOURCES))}) or a hub id)")
  if found is None:
    raise SourceUnavailable(f"cannot get {what}: tried {'; '.join(tried)}. Fix: {fix}.")
  return found


def looks_like_hub_id(ref: str) -> bool:
  """owner/name with no file suffix and no path-like start."""
  return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref)) and not ref.endswith(
      (".json", ".jsonl", ".gz", ".parquet", ".txt"))
