"""Data resolution: local path, cache, remote (a local HTTP server stands in for it), offline copy; the one-line
error; the extraction of the authors' literals; every config default names a registered source."""

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import threading

import pytest

from configs import dpo, generate, rewardbench as rewardbench_config, rewardbench_self_reward, self_improve
from ipo_jax import data, literals, sources

AUTHORS_FILE = b'''import torch

def get_eval_prompt(subset_name, instruction, response):
    prompts = {
        "alpha": "Is the answer to {x} right? Answer Yes/No",  # a comment
        "beta": "Is it safe?" " Answer Yes/No",
    }
    prompt_template = prompts.get(subset_name, prompts['alpha'])
    return f"""{prompt_template}
    User : {instruction}
    Response : {response}
    """
'''


class _Server:
  """Serves `files` (URL path -> bytes) on 127.0.0.1 and counts the requests."""

  def __init__(self, files):
    self.files, self.hits = files, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        server.hits.append(self.path)
        body = server.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

      def log_message(self, *args):
        del args

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def remote(monkeypatch, tmp_path):
  """A raw-file server standing in for GitHub, an empty cache and an empty offline directory."""
  server = _Server({"/owner/repo/abc123/src/ours.py": AUTHORS_FILE})
  monkeypatch.setenv(sources.GITHUB_ENV, server.url)
  monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(sources.DATA_ENV, str(tmp_path / "offline"))
  monkeypatch.setattr(sources, "_UNREACHABLE", {})
  yield server
  server.close()


def _source(**overrides):
  fields = dict(name="test:prompts", kind="github", repo="owner/repo", path="src/ours.py", commit="abc123",
                sha256=hashlib.sha256(AUTHORS_FILE).hexdigest(),
                extract=literals.prompt_table("get_eval_prompt", "fallback_subset",
                                             layout={"prompt_template": "instruction", "instruction": "prompt",
                                                     "response": "response"}),
                filename="test/prompts.json", offline="ipo/test_prompts.json")
  return sources.Source(**{**fields, **overrides})


def test_download_then_cache_then_corrupted_cache_is_fetched_again(remote, monkeypatch, tmp_path):
  source = _source()
  monkeypatch.setitem(sources.SOURCES, source.name, source)
  path = sources.resolve(source.name)
  assert path == tmp_path / "cache" / "test" / "prompts.json" and remote.hits == ["/owner/repo/abc123/src/ours.py"]
  table = json.loads(path.read_text())
  assert table["prompts"] == {"alpha": "Is the answer to {x} right? Answer Yes/No", "beta": "Is it safe? Answer Yes/No"}
  assert table["fallback_subset"] == "alpha" and table["source"] == "owner/repo@abc123:src/ours.py get_eval_prompt"
  assert table["layout"] == "{instruction}\n    User : {prompt}\n    Response : {response}\n    "
  record = path.with_name("prompts.json.sha256").read_text().split()[0]
  assert record == hashlib.sha256(path.read_bytes()).hexdigest()

  assert sources.resolve(source.name) == path and len(remote.hits) == 1  # the second run reads the cache

  path.write_text(path.read_text().replace("safe", "SAFE"))  # corrupted (or half-written) cache file
  assert sources.resolve(source.name) == path and len(remote.hits) == 2  # detected by its checksum, fetched again
  assert json.loads(path.read_text()) == table


def test_a_remote_file_that_does_not_match_its_pinned_hash_is_refused(remote, monkeypatch):
  source = _source(sha256="0" * 64)
  monkeypatch.setitem(sources.SOURCES, source.name, source)
  with pytest.raises(sources.SourceUnavailable, match="does not match the pinned SHA-256"):
    sources.resolve(source.name)
  assert not list((sources.cache_dir()).rglob("prompts.json"))  # nothing cached


def test_offline_copy_when_the_remote_fails_and_the_one_line_error_when_it_is_missing(remote, monkeypatch, tmp_path):
  source = _source(commit="gone")  # 404 on the server
  monkeypatch.setitem(sources.SOURCES, source.name, source)
  with pytest.raises(sources.SourceUnavailable) as error:
    sources.resolve(source.name)
  message = str(error.value)
  assert "\n" not in message and message.startswith("cannot get test:prompts (owner/repo@gone:src/ours.py): ")
  assert "HTTP Error 404" in message and str(tmp_path / "offline" / "ipo" / "test_prompts.json") in message
  assert message.endswith("Fix: connect to the network, or set $IPO_JAX_DATA to a directory holding "
                          "ipo/test_prompts.json.")
  (tmp_path / "offline" / "ipo").mkdir(parents=True)
  (tmp_path / "offline" / "ipo" / "test_prompts.json").write_text('{"x": 1}')
  assert sources.resolve(source.name) == tmp_path / "offline" / "ipo" / "test_prompts.json"


def test_an_unreachable_host_is_tried_once_per_process(monkeypatch, tmp_path):
  monkeypatch.setenv(sources.GITHUB_ENV, "http://127.0.0.1:9")  # nothing listens on the discard port
  monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
  monkeypatch.setenv(sources.DATA_ENV, str(tmp_path))
  monkeypatch.setattr(sources, "_UNREACHABLE", {})
  source = _source()
  monkeypatch.setitem(sources.SOURCES, source.name, source)
  for _ in range(2):
    with pytest.raises(sources.SourceUnavailable, match=r"remote \(127\.0\.0\.1 unreachable"):
      sources.resolve(source.name)
  assert list(sources._UNREACHABLE) == ["127.0.0.1"]  # pylint: disable=protected-access


def test_hub_rows_are_cached_as_jsonl_gz(monkeypatch, tmp_path):
  monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
  calls = []

  def fake_rows(repo, name, split):
    calls.append((repo, name, split))
    return gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s", "id": 1}\n')

  monkeypatch.setattr(sources, "_fetch_hub_rows", fake_rows)
  rows = data.read_records("someone/pairs", split="test")
  assert rows == [{"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s", "id": 1}]
  assert data.read_records("someone/pairs", split="test") == rows and calls == [("someone/pairs", "", "test")]
  assert (tmp_path / "hub" / "someone--pairs" / "default" / "test.jsonl.gz").exists()


def test_local_paths_come_first_and_missing_ones_are_named(tmp_path):
  local = tmp_path / "pairs.jsonl"
  local.write_text('{"a": 1}\n')
  assert sources.resolve(str(local)) == local
  with pytest.raises(FileNotFoundError, match=r"data file not found: .*missing\.jsonl \(not a local file"):
    sources.resolve(str(tmp_path / "missing.jsonl"))


def test_lookup_matches_hub_ids_by_split_and_configuration():
  assert sources.lookup("allenai/reward-bench", "filtered").offline == "reward_bench/reward_bench_filtered.jsonl.gz"
  assert sources.lookup("allenai/reward-bench", "raw") is None  # the raw split: plain hub, no offline copy
  assert sources.lookup("Anthropic/hh-rlhf", "test", "harmless-base").kind == "hub_file"
  assert sources.lookup("Anthropic/hh-rlhf", "test", "helpful-base") is None
  assert sources.lookup("paper:rewardbench_prompts").commit == sources.PAPER_COMMIT


def test_extractors_of_module_constants_and_readme_dicts():
  constants = literals.module_constants(counts="COUNTS")(b"import x\nCOUNTS = {'a': 1, 'b': 2}\nOTHER = 3\n", "o")
  assert json.loads(constants) == {"source": "o", "counts": {"a": 1, "b": 2}}
  readme = b"Text\n```\nmetrics = {\n  \"a\": 0.5,\n  \"model\": \"m\",\n  \"b\": 1\n}\n```\n"
  assert json.loads(literals.readme_dict("metrics", "acc")(readme, "o")) == {"source": "o", "acc": {"a": 0.5, "b": 1}}
  text = b'def get_comparative_prompt(a):\n    comparative_prompt = """Compare {x}\n and {y}"""\n    return 1\n'
  assert literals.string_literal("get_comparative_prompt", "comparative_prompt")(text, "o") == b"Compare {x}\n and {y}"


def _data_options(config, prefix=""):
  """(field path, path, split, name) of every data option in a config."""
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _data_options(value, f"{prefix}{key}.")
    elif key in ("path", "prompts_file", "prompt_file") and value and "model" not in prefix:
      yield f"{prefix}{key}", value, config.get("split") or None, config.get("name") or None


@functools.lru_cache(maxsize=None)
def _all_configs():
  modules = {"rewardbench": (rewardbench_config, ("", "paper", "ensemble", "demo", "chat")),
             "rewardbench_self_reward": (rewardbench_self_reward, ("", "paper", "demo")),
             "generate": (generate, ("", "mt_bench", "hh_rlhf")), "dpo": (dpo, ("local",)),
             "self_improve": (self_improve, ("", "local"))}
  return [(f"{name}:{arg}", module.get_config(arg)) for name, (module, args) in modules.items() for arg in args]


def test_every_config_default_names_a_registered_source():
  seen = set()
  for name, config in _all_configs():
    for field, path, split, cfg_name in _data_options(config):
      source = sources.lookup(path, split, cfg_name)
      assert source is not None, f"{name} {field}={path!r} (split {split!r}, name {cfg_name!r}) is not registered"
      seen.add(source.name)
  assert {"allenai/reward-bench", "tatsu-lab/alpaca_eval", "Anthropic/hh-rlhf", "fastchat:mt_bench_questions",
          "paper:rewardbench_prompts", "paper:candidate_prompts", "paper:self_reward_judge_prompt"} <= seen


def test_every_source_names_its_origin_offline_copy_and_license():
  for source in sources.SOURCES.values():
    assert source.offline and source.filename and source.license, source.name
    if source.kind == "github":
      assert len(source.commit) == 40 and len(source.sha256) == 64, source.name
    assert dataclasses.replace(source).origin  # printable
