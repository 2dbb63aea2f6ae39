"""Imports only run downward (issue 29 item 2): every module of ``safety_align/`` sits in one
layer of ``LAYERS`` (by ``TABLE``, longest prefix first) and imports only its own layer or lower
ones, with no import cycle between modules; eval, defences and serving reach the decoder only
through the model object; no module imports another by a computed name; the config files import
only the config helpers.

Imports are read with ``ast`` from the whole file (module level and inside functions and
classes), relative forms resolved; ``from pkg import name`` counts as an import of
``pkg.name`` when that is a module, else of ``pkg``. A package's ``__init__`` is the module
named by the package.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "safety_align"

LAYERS = ("core", "data_decode", "io", "model_object", "train", "attacks_defences", "eval",
          "serving", "entry")

# module prefix -> (layer, why it sits there). A key matches the module of that name and every
# module under it; the longest matching key wins. The package root matches itself only.
TABLE = {
    # core: pure functions over arrays and pytrees, settings and helpers with no model state
    "safety_align.model": ("core", "the transformer and its parameter layout"),
    "safety_align.model_config": ("core", "ModelConfig: the architecture's settings"),
    "safety_align.masks": ("core", "the [CLS] attention rules table"),
    "safety_align.attention": ("core", "attention kernels over masks"),
    "safety_align.losses": ("core", "LM and [CLS] losses over logits"),
    "safety_align.sharding": ("core", "meshes and partition rules of the model's pytrees"),
    "safety_align.optim": ("core", "optimiser and schedules"),
    "safety_align.config_lib": ("core", "helpers the config files share"),
    "safety_align.console": ("core", "logging and terminal output settings"),
    "safety_align.stats": ("core", "pure statistics and list-field parsing (Wilson, AUROC)"),
    # data and decode: tokens in, tokens out, over the core
    "safety_align.data": ("data_decode", "corpora, tokenizer, templates, packing, pipelines"),
    "safety_align.decode": ("data_decode", "the compiled gated decoding loop and its state"),
    # io: weights and workdirs on disk
    "safety_align.formats": ("io", "HF / GGUF readers and writers"),
    "safety_align.workdir": ("io", "the workdir format: config, phases, what a load returns"),
    "safety_align.checkpoint": ("io", "orbax checkpoints and their integrity"),
    "safety_align.gate_calibration": ("io", "calibration.json: the calibrated gate of a workdir"),
    # the model object: the one door to the decoder
    "safety_align": ("model_object", "the package root re-exports the public API (api)"),
    "safety_align.api": ("model_object", "SafetyModel and load: the one door to the decoder"),
    "safety_align.safety_model": ("model_object", "SafetyModel itself"),
    "safety_align.calls": ("model_object", "what SafetyModel's calls take and give"),
    "safety_align.defence": ("model_object", "the Defence protocol SafetyModel provides"),
    "safety_align.scoring": ("model_object", "the [CLS] scoring layout behind SafetyModel"),
    "safety_align.moderation": ("model_object", "GateStream, SafetyModel's streaming moderation"),
    # train
    "safety_align.train_step": ("train", "the compiled training step"),
    "safety_align.training_loop": ("train", "the training run: phases, data, checkpoints"),
    # attacks and defences: take a model, attack or defend it
    "safety_align.attacks": ("attacks_defences", "the attacks (white-box: may use the gate)"),
    "safety_align.defences": ("attacks_defences", "the competitor defences"),
    # eval: runs attacks and defences, judges and reports
    "safety_align.eval": ("eval", "the evaluation: registry, judging, metrics, report"),
    # serving: the HTTP server over the model object
    "safety_align.serving": ("serving", "the OpenAI-compatible server"),
    # entry points and tools: nothing imports them but other entry points
    "safety_align.train": ("entry", "python -m safety_align.train"),
    "safety_align.evaluate": ("entry", "python -m safety_align.evaluate"),
    "safety_align.serve": ("entry", "python -m safety_align.serve"),
    "safety_align.generate": ("entry", "python -m safety_align.generate"),
    "safety_align.convert": ("entry", "python -m safety_align.convert: import and export"),
    "safety_align.calibrate": ("entry", "python -m safety_align.calibrate (and its procedure)"),
    "safety_align.validation_report": ("entry", "python -m safety_align.validation_report: "
                                       "the recipe's ablation figures"),
    "safety_align.demo": ("entry", "make demo's driver"),
    "safety_align.demo_real": ("entry", "make demo's driver"),
    "safety_align.demo_data": ("entry", "make demo's data stage (reads the eval's utility file)"),
    "safety_align.model_card": ("entry", "MODEL_CARD.md, written by make demo-real's driver"),
    "safety_align.tools": ("entry", "command-line tools: AOT compilation, parity, roofline"),
}

# Known violations, each in a file another change of issue 29 is rewriting: (importer, imported)
# -> what removes it. A new violation fails; so does an entry here that no longer occurs.
PENDING = {
}


def _new(found: list[tuple[tuple[str, str], str]]) -> list[str]:
  """The messages of ``found`` ((importer, imported), message) that PENDING does not hold."""
  return [message for edge, message in found if edge not in PENDING]


# Packages whose modules reach the decoder only through the model object (api): they import no
# safety_align.decode module (GateConfig and SCHEDULES come from safety_align.api).
THROUGH_MODEL_OBJECT = ("safety_align.eval", "safety_align.defences", "safety_align.serving")
# What the config files (configs/**/*.py, loaded by path) may import from the package.
CONFIG_IMPORTS = ("safety_align.config_lib",)


def _module_files() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


MODULES = _module_files()


def _imports(module: str, path: pathlib.Path) -> dict[str, int]:
  """{imported safety_align module: line of its first import} of ``module``'s file."""
  is_package = path.name == "__init__.py"
  out = {}
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        pkg = ".".join(base + ([node.module] if node.module else []))
      else:
        pkg = node.module
      names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in MODULES else pkg for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in MODULES:  # `import a.b.c` of a function-free path: its module
        name = name.rpartition(".")[0]
      if name and name != module:
        out.setdefault(name, node.lineno)
  return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> str | None:
  if module == PACKAGE:
    return TABLE[PACKAGE][0]
  keys = [k for k in TABLE if k != PACKAGE and (module == k or module.startswith(k + "."))]
  return TABLE[max(keys, key=len)][0] if keys else None


def _where(module: str, line: int) -> str:
  return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_table_is_well_formed():
  bad = {k: v for k, v in TABLE.items() if v[0] not in LAYERS or not v[1]}
  assert not bad, f"TABLE entries with an unknown layer or no reason: {bad}"


def test_every_module_has_a_layer():
  unmapped = [m for m in MODULES if layer_of(m) is None]
  assert not unmapped, (f"Modules in no layer: {unmapped}; add their prefix to TABLE in "
                        f"{pathlib.Path(__file__).name} with the reason for its layer.")


def _upward() -> list[tuple[tuple[str, str], str]]:
  found = []
  for module, imported in GRAPH.items():
    mine = layer_of(module)
    for target, line in imported.items():
      theirs = layer_of(target)
      if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
        found.append(((module, target),
                      f"{_where(module, line)}: {module} ({mine}) imports {target} ({theirs})"))
  return found


def test_imports_only_run_downward():
  upward = _new(_upward())
  assert not upward, ("Upward imports (a lower layer imports a higher one: move what it needs "
                      "down, or pass it in):\n  " + "\n  ".join(upward))


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """One cycle (start, ..., start) per strongly connected component of more than one module of
  ``graph`` ({module: {imported module: line}}; Tarjan's algorithm)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
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
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for component in components:  # a path back to the start inside the component
    start = min(component)
    path, seen = [start], {start}
    while True:
      nxt = sorted(w for w in graph[path[-1]] if w in component)
      if start in nxt:
        break
      step = next((w for w in nxt if w not in seen), None)
      if step is None:  # dead end: step back
        path.pop()
        continue
      path.append(step)
      seen.add(step)
    cycles.append(path + [start])
  return cycles


def _reaches(start: str, goal: str) -> bool:
  todo, seen = [start], {start}
  while todo:
    for w in GRAPH[todo.pop()]:
      if w == goal:
        return True
      if w not in seen:
        seen.add(w)
        todo.append(w)
  return False


def _cycle_findings() -> list[tuple[tuple[str, str], str]]:
  """The cycles left without the PENDING edges (new ones), and each PENDING edge that still
  closes a cycle."""
  rest = {m: {t: n for t, n in imported.items() if (m, t) not in PENDING}
          for m, imported in GRAPH.items()}
  found = [((c[0], c[1]), " -> ".join(f"{m} ({layer_of(m)})" for m in c)) for c in _cycles(rest)]
  return found + [((m, t), f"{m} -> {t} closes a cycle") for m, imported in GRAPH.items()
                  for t in imported if (m, t) in PENDING and _reaches(t, m)]


def test_no_import_cycles():
  cycles = _new(_cycle_findings())
  assert not cycles, "Import cycles:\n  " + "\n  ".join(cycles)


def test_cycle_finder_reports_each_cycle():
  graph = {"a": {"b": 1}, "b": {"c": 1, "d": 1}, "c": {"a": 1}, "d": {}, "e": {"f": 1},
           "f": {"e": 1}, "g": {"a": 1}}
  assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
  assert not _cycles({"a": {"b": 1}, "b": {}})


def _decoder_imports() -> list[tuple[tuple[str, str], str]]:
  return [((m, t), f"{_where(m, line)}: {m} imports {t}")
          for m, imported in GRAPH.items() if m.startswith(THROUGH_MODEL_OBJECT)
          for t, line in imported.items()
          if t == "safety_align.decode" or t.startswith("safety_align.decode.")]


def test_decoder_only_through_the_model_object():
  direct = _new(_decoder_imports())
  assert not direct, ("Eval, defences and serving reach the decoder through the model object "
                      "(safety_align.api re-exports GateConfig, SCHEDULES, DEFAULT_REFUSAL):\n  "
                      + "\n  ".join(direct))


def _computed_imports() -> list[tuple[tuple[str, str], str]]:
  found = []
  for module, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and (
          isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
          or isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")):
        found.append(((module, "importlib"), _where(module, node.lineno)))
  return found


def test_no_computed_imports():
  found = _new(_computed_imports())
  assert not found, ("Modules imported by a computed name hide their edges from this test: "
                     "import them plainly: " + ", ".join(found))


def _config_imports() -> list[tuple[tuple[str, str], str]]:
  found = []
  for path in sorted((ROOT / "configs").rglob("*.py")):
    where = str(path.relative_to(ROOT))
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      found += [((where, n), f"{where}:{node.lineno} imports {n}") for n in names
                if n.split(".")[0] == PACKAGE and n not in CONFIG_IMPORTS]
  return found


def test_configs_import_only_config_helpers():
  bad = _new(_config_imports())
  assert not bad, ("Config files hold settings and import only "
                   f"{', '.join(CONFIG_IMPORTS)}:\n  " + "\n  ".join(bad))


def test_pending_violations_still_occur():
  """A PENDING entry that no check meets any more is fixed, and comes out of PENDING."""
  met = {e for check in (_upward, _cycle_findings, _decoder_imports, _computed_imports,
                         _config_imports) for e, _ in check()}
  fixed = sorted(set(PENDING) - met)
  assert not fixed, f"Fixed: remove from PENDING in {pathlib.Path(__file__).name}: {fixed}"
