"""Imports in mkdm_jax point down the layers of shared/DESIGN.md and form no circle; no library module reads absl
flags or grows past about 450 lines."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'mkdm_jax'
# Bottom to top; a module may import its own unit and the units of lower layers only.
LAYERS = [
    {'errors', 'paths', 'provenance', 'runtime', 'allocator', 'workdir', 'stats', 'metrics'},
    {'data'},
    {'models', 'losses'},
    {'train'},
    {'saved_model', 'distill'},
    {'predictions', 'teachers'},
    {'config'},
    {'context', 'saved_runs'},
    {'teacher_logits'},
    {'report', 'studies'},
    {'pipeline'},
    {'cli'},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path):
  return '.'.join(path.relative_to(PACKAGE.parent).with_suffix('').parts).removesuffix('.__init__')


def imports(path):
  """The mkdm_jax modules `path` imports (a name imported from a package counts as its submodule if it is one)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'mkdm_jax':
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        is_module = (PACKAGE.parent / sub.replace('.', '/')).with_suffix('.py').exists() or (
            PACKAGE.parent / sub.replace('.', '/')).is_dir()
        out.add(sub if is_module else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('mkdm_jax.')}
  return out


MODULES = {module_name(p): p for p in PACKAGE.rglob('*.py')}
# A package's __init__ re-exporting its own submodules is not an edge of the layering.
GRAPH = {name: {m for m in imports(path) & set(MODULES) if not m.startswith(name + '.')}
         for name, path in MODULES.items()}
unit = lambda name: name.split('.')[1] if '.' in name else ''


def test_every_unit_has_a_layer():
  assert {unit(m) for m in MODULES} - {''} <= set(RANK)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_imports_point_down(name):
  upward = [m for m in GRAPH[name] if unit(m) and unit(name) and RANK[unit(m)] > RANK[unit(name)]]
  assert upward == [], f'{name} imports higher layers: {upward}'


def test_no_import_circles():
  """Module-level circles, through packages' __init__ too (their re-exports aside)."""
  state, path = {}, []

  def visit(node):
    state[node] = 'open'
    path.append(node)
    for nxt in sorted(GRAPH[node]):
      if state.get(nxt) == 'open':
        raise AssertionError(f'import circle: {" -> ".join(path[path.index(nxt):] + [nxt])}')
      elif nxt not in state:
        visit(nxt)
    path.pop()
    state[node] = 'done'

  for name in sorted(GRAPH):
    if name not in state:
      visit(name)


def test_library_reads_no_absl_flags_and_stays_small():
  for name, path in MODULES.items():
    text = path.read_text()
    assert 'absl import flags' not in text and 'FLAGS.' not in text, name
    assert len(text.splitlines()) <= 460, f'{name}: {len(text.splitlines())} lines'
