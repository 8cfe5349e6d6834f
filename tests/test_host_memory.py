"""Freed C-heap memory handed back to the system: by `release_free_memory`, and after each long compilation."""

import ctypes
import ctypes.util
import sys

import jax
import jax.numpy as jnp
import pytest

from ipo_jax import host_memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")


def _rss_mb() -> float:
  with open("/proc/self/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@linux_only
def test_freed_heap_pages_leave_the_resident_set():
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = [libc.malloc(4096) for _ in range(50_000)]  # 200 MB in small blocks: the heap, not mmap
  for b in blocks:
    ctypes.memset(b, 1, 4096)
  pin = libc.malloc(64)  # keeps the freed blocks below the heap's top (glibc trims only a free top by itself)
  for b in blocks:
    libc.free(b)
  before = _rss_mb()
  assert host_memory.release_free_memory()
  after = _rss_mb()
  libc.free(pin)
  assert before - after > 150, (before, after)


def test_a_long_compilation_is_followed_by_a_trim(monkeypatch):
  calls = []
  x, y = jnp.arange(7.0), jnp.arange(9.0)
  monkeypatch.setattr(host_memory, "release_free_memory", lambda: calls.append(1) or True)
  host_memory.release_memory_after_compiles()
  host_memory.release_memory_after_compiles()  # registered once
  monkeypatch.setattr(host_memory, "TRIM_AFTER_COMPILE_S", 0.0)
  jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)(x).block_until_ready()
  assert len(calls) == 1
  monkeypatch.setattr(host_memory, "TRIM_AFTER_COMPILE_S", 1e9)  # a short one is not followed by a trim
  jax.jit(lambda x: jnp.cos(x) * 5.0)(y).block_until_ready()
  assert len(calls) == 1
