"""The one conversion from a config section (ConfigDict or dict) to a frozen settings dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_section(cls: type[T], section: Any, **given: Any) -> T:
  """`cls` from the fields of `section` it knows (other keys are ignored; absent or None ones keep their
  defaults); `given` values take precedence. Lists become tuples, so the settings stay hashable (jit statics)."""
  get = section.get if hasattr(section, "get") else lambda key, default=None: getattr(section, key, default)
  kwargs = {}
  for field in dataclasses.fields(cls):
    value = given[field.name] if field.name in given else get(field.name, None)
    if value is not None:
      kwargs[field.name] = tuple(value) if isinstance(value, list) else value
  return cls(**kwargs)
