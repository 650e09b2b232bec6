"""Architecture checks over the project's source (AST only: nothing is imported or run).

- Imports point one way: the project's modules form no import cycle, counting imports inside functions (an
  import inside a function to dodge a cycle is still a cycle).
- A name with a leading underscore stays in its file: no `module._private` of a project module is used from
  another file.

Every `.py` file under the repository root counts, tests and benchmarks included, except the virtual
environment. `PROJECT_ROOT` names the tree to check (default: this checkout).
"""

import ast
import os

ROOT = os.environ.get('PROJECT_ROOT') or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders that hold no project code.
SKIPPED_DIRS = {'.venv', '.git', '__pycache__', 'build', 'node_modules'}
# Folders whose files are imported by their bare name (pytest and the benchmark scripts put them on sys.path).
SCRIPT_DIRS = ('tests', 'bench')


def project_modules(root=ROOT):
  """Maps each project module's import name to its file.

  Root files and packages by their dotted name (`datasets`, `models.layerspp`); files under `SCRIPT_DIRS` by
  their bare name as well (`helpers`), as the tests and benchmarks import them.
  """
  modules = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith('.'))
    rel = os.path.relpath(dirpath, root)
    parts = [] if rel == '.' else rel.split(os.sep)
    for name in sorted(filenames):
      if not name.endswith('.py'):
        continue
      path = os.path.join(dirpath, name)
      stem = name[:-3]
      dotted = parts if stem == '__init__' else parts + [stem]
      if dotted:
        modules.setdefault('.'.join(dotted), path)
      if parts and parts[0] in SCRIPT_DIRS and len(parts) == 1 and stem != '__init__':
        modules.setdefault(stem, path)
  return modules


def _package_of(module, path):
  """The package a relative import in `module` (file `path`) starts from."""
  return module if os.path.basename(path) == '__init__.py' else module.rpartition('.')[0]


def _imports(tree, module, path, modules):
  """Yields `(node, imported project module, bound name or None, imported attribute or None)` for every import
  statement of a file (at any depth)."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in modules:
          yield node, alias.name, alias.asname or alias.name.split('.')[0], None
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        package = _package_of(module, path)
        for _ in range(node.level - 1):
          package = package.rpartition('.')[0]
        base = '.'.join(p for p in (package, base) if p)
      for alias in node.names:
        submodule = f'{base}.{alias.name}' if base else alias.name
        if submodule in modules:
          yield node, submodule, alias.asname or alias.name, None
        elif base in modules:
          yield node, base, None, alias.name


def _parse(path):
  with open(path, encoding='utf-8') as f:
    return ast.parse(f.read(), filename=path)


def import_graph(root=ROOT):
  """`{module: {imported project modules}}` over every project file, imports inside functions included."""
  modules = project_modules(root)
  canonical = {}  # a file importable under two names is one node, named by its first name
  for module, path in modules.items():
    canonical.setdefault(path, module)
  graph = {}
  for path, module in canonical.items():
    targets = {canonical[modules[target]] for _, target, _, _ in _imports(_parse(path), module, path, modules)}
    graph[module] = targets - {module}
  return graph


def find_cycles(graph):
  """The strongly connected components of more than one module (Tarjan's algorithm), each as a sorted list."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def _cycle_path(graph, component):
  """One cycle through a strongly connected component, as `a -> b -> ... -> a`."""
  members = set(component)
  start = component[0]
  path, seen = [start], {start}
  while True:
    nxt = sorted(m for m in graph[path[-1]] if m in members)
    back = [m for m in nxt if m == start]
    if back and len(path) > 1:
      return ' -> '.join(path + [start])
    fresh = [m for m in nxt if m not in seen]
    if not fresh:  # a longer way round: close at the first module already on the path
      loop = next(m for m in nxt if m in seen)
      return ' -> '.join(path[path.index(loop):] + [loop])
    path.append(fresh[0])
    seen.add(fresh[0])


def private_uses(root=ROOT):
  """`file:line: module._name` for every private name of a project module used from another file."""
  modules = project_modules(root)
  canonical = {}  # a file importable under two names is scanned once
  for module, path in modules.items():
    canonical.setdefault(path, module)
  found = []
  for path, module in sorted(canonical.items()):
    tree = _parse(path)
    bound = {}
    rel = os.path.relpath(path, root)
    for node, target, name, attribute in _imports(tree, module, path, modules):
      if modules[target] == path:
        continue
      if attribute is not None:
        if _is_private(attribute):
          found.append((rel, node.lineno, f'from {target} import {attribute}'))
      else:
        bound[name] = target
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and _is_private(node.attr):
        owner = _module_of(node.value, bound, modules)
        if owner is not None and modules[owner] != path:
          found.append((rel, node.lineno, f'{owner}.{node.attr}'))
  return [f'{rel}:{line}: {use}' for rel, line, use in sorted(found)]


def _is_private(name):
  return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


def _module_of(node, bound, modules):
  """The project module an expression names (`x` bound by an import, or `x.sub` of a package), else None."""
  if isinstance(node, ast.Name):
    return bound.get(node.id)
  if isinstance(node, ast.Attribute):
    parent = _module_of(node.value, bound, modules)
    if parent is not None and f'{parent}.{node.attr}' in modules:
      return f'{parent}.{node.attr}'
    if parent is not None and node.attr in modules:  # a module another module imported (`study.demo`)
      return node.attr
  return None


def test_the_checks_see_the_project():
  modules = project_modules()
  assert {'datasets', 'evaluation', 'run_lib', 'models.ncsnpp', 'helpers'} <= set(modules)
  graph = import_graph()
  assert 'datasets' in graph['run_lib'] and 'models.layerspp' in graph['models.ncsnpp']


def test_private_names_are_seen_through_a_module_attribute(tmp_path):
  (tmp_path / 'low.py').write_text('def _hidden():\n  return 1\n')
  (tmp_path / 'mid.py').write_text('import low\n')
  (tmp_path / 'top.py').write_text('import mid\nmid.low._hidden()\n')
  assert private_uses(str(tmp_path)) == ['top.py:2: low._hidden']


def test_find_cycles_reports_each_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': {'e'}}
  assert find_cycles(graph) == [['a', 'b', 'c']]
  assert _cycle_path(graph, ['a', 'b', 'c']) == 'a -> b -> c -> a'


def test_no_import_cycles():
  graph = import_graph()
  cycles = [_cycle_path(graph, component) for component in find_cycles(graph)]
  assert not cycles, ('Import cycles (imports inside functions count; move the shared piece below both, or the '
                      'entry point above them):\n  ' + '\n  '.join(cycles))


def test_no_private_names_across_files():
  uses = private_uses()
  assert not uses, ('Private names used from another file (promote the name, with a docstring, or move the code '
                    'that needs it):\n  ' + '\n  '.join(uses))
