"""Structure (issue 16, item 7): no two lavida_jax modules import each other (at the
top or inside a function), and text.py's concerns each sit in a file of their own."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lavida_jax")


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path[:-3], os.path.dirname(PKG)).replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _imports(path: str, modules) -> set[str]:
  """lavida_jax modules `path` imports anywhere (`from lavida_jax import x` counts as x)."""
  deps = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lavida_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        deps.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      deps.update(a.name for a in node.names if a.name in modules)
  return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every import cycle (as the list of its modules), by depth-first search."""
  found, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if dep == node or dep not in graph:
        continue
      if state.get(dep) == "open":
        found.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(p, modules) - {"lavida_jax"} for m, p in modules.items()}
  assert "lavida_jax.evaluate" in graph["lavida_jax.evaluate"] | {"lavida_jax.evaluate"}
  assert "lavida_jax.generate" in graph["lavida_jax.evaluate"]
  assert _cycles(graph) == []


@pytest.mark.parametrize("name", ["text", "tokenizer", "chat", "labels"])
def test_text_is_split_by_concern(name):
  lines = open(os.path.join(PKG, f"{name}.py")).read().count("\n")
  assert lines <= 400, f"{name}.py has {lines} lines"
