"""Extractors that read third-party files' literals as plain data (with `ast`; nothing of their code runs).

Each extractor is `extract(raw_bytes, origin) -> bytes of the file the project reads` (see ipo_jax/sources.py).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Callable

def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == name:
      return node
  raise ValueError(f"no function {name!r}")


def _assigned(func: ast.FunctionDef, variable: str) -> ast.expr:
  for node in ast.walk(func):
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
      return node.value
  raise ValueError(f"{func.name} assigns no {variable!r}")


def _get_default(func: ast.FunctionDef, table: str) -> str:
  """K of `table.get(key, table['K'])`: the key whose instruction an unknown name falls back to."""
  for node in ast.walk(func):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == table and len(node.args) == 2
        and isinstance(node.args[1], ast.Subscript)):
      return ast.literal_eval(node.args[1].slice)
  raise ValueError(f"{func.name} has no {table}.get(..., {table}[...]) fallback")


def _returned_layout(func: ast.FunctionDef, names: dict[str, str]) -> str:
  """The returned f-string as a template, its variables renamed by `names` (braces of the text escaped)."""
  ret = next(n for n in ast.walk(func) if isinstance(n, ast.Return) and isinstance(n.value, ast.JoinedStr))
  parts = []
  for value in ret.value.values:
    if isinstance(value, ast.Constant):
      parts.append(value.value.replace("{", "{{").replace("}", "}}"))
    else:
      parts.append("{" + names[value.value.id] + "}")
  return "".join(parts)


def prompt_table(function: str, fallback_key: str, layout: dict[str, str] | None = None
                 ) -> Callable[[bytes, str], bytes]:
  """Extractor: the `prompts` dict of `function` as a prompts file (see ipo_jax/ipo/prompts.py)."""

  def extract(raw: bytes, origin: str) -> bytes:
    func = _function(ast.parse(raw.decode("utf-8")), function)
    out = {"source": f"{origin} {function}", fallback_key: _get_default(func, "prompts"),
           "prompts": ast.literal_eval(_assigned(func, "prompts"))}
    if layout:
      out["layout"] = _returned_layout(func, layout)
    return (json.dumps(out, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

  return extract


def string_literal(function: str, variable: str) -> Callable[[bytes, str], bytes]:
  """Extractor: a string literal assigned in `function`, as a text file."""

  def extract(raw: bytes, origin: str) -> bytes:
    del origin
    return ast.literal_eval(_assigned(_function(ast.parse(raw.decode("utf-8")), function), variable)).encode()

  return extract


def module_constants(**names: str) -> Callable[[bytes, str], bytes]:
  """Extractor: module-level literals (`json key=CONSTANT_NAME`) as a JSON file."""

  def extract(raw: bytes, origin: str) -> bytes:
    found = {}
    for node in ast.parse(raw.decode("utf-8")).body:
      if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        found[node.targets[0].id] = node.value
    out = {"source": origin, **{key: ast.literal_eval(found[const]) for key, const in names.items()}}
    return (json.dumps(out, indent=1) + "\n").encode("utf-8")

  return extract


def readme_dict(variable: str, key: str) -> Callable[[bytes, str], bytes]:
  """Extractor: the dict literal `variable = {...}` of a README code block, its numeric entries under `key`."""

  def extract(raw: bytes, origin: str) -> bytes:
    text = raw.decode("utf-8")
    start = re.search(rf"^{re.escape(variable)} = \{{", text, re.M)
    if start is None:
      raise ValueError(f"no '{variable} = {{' in the file")
    end = text.index("\n}", start.end()) + 2
    table = ast.literal_eval(text[start.end() - 1:end])
    out = {"source": origin, key: {k: v for k, v in table.items() if isinstance(v, (int, float))}}
    return (json.dumps(out, indent=1) + "\n").encode("utf-8")

  return extract
