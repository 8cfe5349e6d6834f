"""Test settings: quiet, deterministic CPU runs; tests whose third-party data cannot be had are skipped.

Third-party data reaches the tests only through `ipo_jax.sources` (cache, real source, offline copy). A test that
needs a source that cannot be had anywhere is reported as skipped with the resolver's one-line reason; with the
data reachable, nothing is skipped.
"""

import hashlib
import os
import socket

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _hub_reachable() -> bool:
  try:
    socket.create_connection(("huggingface.co", 443), timeout=5).close()
    return True
  except OSError:
    return False


if "HF_HUB_OFFLINE" not in os.environ and not _hub_reachable():
  # No hub: its clients fail at once instead of retrying (the resolver then takes the offline copy).
  os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

from ipo_jax import sources  # pylint: disable=wrong-import-position


def source_path(ref: str, **kwargs) -> str:
  """The local file of a registered source, or a skip with the reason when no copy can be had."""
  try:
    return str(sources.resolve(ref, **kwargs))
  except sources.SourceUnavailable as e:
    pytest.skip(str(e))


def file_hashes(directory) -> dict[str, str]:
  """{path relative to `directory`: SHA-256} of every file under it (to show a refused run wrote nothing)."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A test (or fixture) that stopped on unavailable third-party data is a skip with the resolver's reason."""
  outcome = yield
  report = outcome.get_result()
  if call.excinfo is not None and call.excinfo.errisinstance(sources.SourceUnavailable):
    report.outcome = "skipped"
    report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
