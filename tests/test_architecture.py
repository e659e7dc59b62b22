"""The layout holds: no import cycles between modules or packages of neo_jax (read from the
source), imports at the top of modules (function-level ones only for optional dependencies,
each marked), no lazy export tables, the trainer's loop fits one screen, and the package map
of docs/architecture.md is the tree."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neo_jax"
# a function-level import of a neo_jax module is allowed only on a line (or below a line) that
# says which optional dependency it waits for: `# optional dependency: torch`
OPTIONAL_MARK = re.compile(r"#\s*optional dependency:\s*\S+")
# the one place that imports neo_jax modules by name at run time: the command table of the CLI
DISPATCH = {"neo_jax.cli"}
LOOP_BODY_MAX_LINES = 25


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}
TREES = {name: ast.parse(p.read_text(), str(p)) for name, p in MODULES.items()}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
  """The absolute module of a `from ... import` (relative ones resolved against `importer`)."""
  if not node.level:
    return node.module or ""
  base = importer if importer in PACKAGES else importer.rpartition(".")[0]
  for _ in range(node.level - 1):
    base = base.rpartition(".")[0]
  return f"{base}.{node.module}" if node.module else base


def imported_modules(name: str, node: ast.AST) -> Iterator[str]:
  """The neo_jax modules an import statement loads (`from pkg import mod` names pkg.mod)."""
  if isinstance(node, ast.Import):
    targets = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    base = _resolve(name, node)
    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
  else:
    return
  for target in targets:
    while target and target not in MODULES:  # `import neo_jax.a.b` as a name chain
      target = target.rpartition(".")[0]
    if target.startswith("neo_jax"):
      yield target


def dispatched_modules(name: str) -> Iterator[str]:
  """Modules a dispatch table names as strings ("neo_jax.cli.train")."""
  if name not in DISPATCH:
    return
  for node in ast.walk(TREES[name]):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
      yield node.value


def import_graph() -> dict[str, set[str]]:
  graph = {name: set() for name in MODULES}
  for name, tree in TREES.items():
    for node in ast.walk(tree):
      graph[name].update(imported_modules(name, node))
    graph[name].update(dispatched_modules(name))
    graph[name].discard(name)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def collapse(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
  """The graph between packages `depth` levels below neo_jax (neo_jax.trainer at depth 1);
  modules directly in a shallower package stay nodes of their own."""

  def node(name):
    prefix = ".".join(name.split(".")[: depth + 1])
    return prefix if prefix in PACKAGES else name

  out: dict[str, set[str]] = {}
  for a, targets in graph.items():
    out.setdefault(node(a), set()).update(node(b) for b in targets if node(b) != node(a))
  return out


def test_the_graph_sees_the_imports():
  graph = import_graph()
  assert "neo_jax.trainer.step" in graph["neo_jax.objectives.preference.objective"]
  assert "neo_jax.run_dir" in graph["neo_jax.convert.loading"]
  assert "neo_jax.cli.train" in graph["neo_jax.cli"]  # through the command table
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
  assert cycles(import_graph()) == []


@pytest.mark.parametrize("depth", [1, 2])
def test_no_import_cycle_between_packages(depth):
  graph = collapse(import_graph(), depth)
  assert "neo_jax.trainer" in graph and "neo_jax.objectives" in graph
  assert cycles(graph) == []


def test_core_packages_do_not_reach_up():
  """The trainer core names no objective, evaluator, command or stage; the model and ops know
  nothing of training."""
  graph = import_graph()
  rules = {
    "neo_jax.trainer": ("neo_jax.objectives", "neo_jax.evals", "neo_jax.cli", "neo_jax.stage"),
    "neo_jax.model": ("neo_jax.trainer", "neo_jax.data", "neo_jax.convert"),
    "neo_jax.ops": ("neo_jax.model", "neo_jax.trainer", "neo_jax.data"),
  }
  for package, forbidden in rules.items():
    for name, targets in graph.items():
      if name == package or name.startswith(package + "."):
        bad = [t for t in targets if t.startswith(forbidden)]
        assert not bad, (name, bad)


def _function_level_imports() -> Iterator[tuple[str, int, str]]:
  for name, tree in TREES.items():
    lines = MODULES[name].read_text().splitlines()
    for func in ast.walk(tree):
      if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(func):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and list(imported_modules(name, node)):
          around = " ".join(lines[max(0, node.lineno - 2) : node.end_lineno])
          if not OPTIONAL_MARK.search(around):
            yield name, node.lineno, lines[node.lineno - 1].strip()


def test_imports_of_neo_jax_modules_sit_at_module_top():
  assert list(_function_level_imports()) == []


def test_module_top_imports_come_before_the_code():
  """No import at the bottom of a file: neo_jax imports precede every other statement."""
  for name, tree in TREES.items():
    code_started = False
    for node in tree.body:
      is_docstring = (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
      )
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        assert not (code_started and list(imported_modules(name, node))), (name, node.lineno)
      elif not is_docstring:
        code_started = True


def test_no_lazy_imports_by_name():
  """No `__getattr__` export tables, no importlib / __import__ outside the CLI's dispatch."""
  for name, tree in TREES.items():
    for node in tree.body:
      if isinstance(node, ast.FunctionDef):
        assert node.name != "__getattr__", f"{name}: a lazy export table"
    if name in DISPATCH:
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Call):
        func = ast.unparse(node.func)
        assert func not in ("importlib.import_module", "__import__"), (name, node.lineno)


def test_trainer_loop_fits_one_screen():
  tree = TREES["neo_jax.trainer.loop"]
  trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
  run = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "run")
  body = run.body[1:] if isinstance(run.body[0], ast.Expr) else run.body  # past the docstring
  lines = (
    MODULES["neo_jax.trainer.loop"].read_text().splitlines()[body[0].lineno - 1 : run.end_lineno]
  )
  code = [line for line in lines if line.strip() and not line.strip().startswith("#")]
  assert len(code) <= LOOP_BODY_MAX_LINES, "\n".join(code)


def _package_map() -> dict[str, str]:
  """`neo_jax/...` -> its row, from the table under "## Package map"."""
  text = (ROOT / "docs" / "architecture.md").read_text()
  section = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\|\s*`(neo_jax/[^`]*)`\s*\|(.*)\|\s*$", section, re.M)
  return {path.rstrip("/"): job for path, job in rows}


def test_package_map_is_the_tree():
  documented = _package_map()
  tree = {
    str(p.relative_to(ROOT).parent if p.name == "__init__.py" else p.relative_to(ROOT)).replace(
      "\\", "/"
    )
    for p in PACKAGE.rglob("*.py")
    if p.name == "__init__.py" or p.parent == PACKAGE
  }
  tree.discard("neo_jax")
  assert set(documented) == tree
  for path, job in documented.items():
    folder = ROOT / path
    if folder.is_dir():  # a package's row names each of its modules
      for module in sorted(folder.glob("*.py")):
        if module.name not in ("__init__.py", "__main__.py"):
          assert f"`{module.name}`" in job, (path, module.name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
  importlib.import_module(name)
