"""Imports point one way: a module never imports (even inside a function) from a layer
above its own, and no import cycle runs between modules."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'charred'

# Lowest first. The longest matching prefix gives a module its layer.
LAYERS = (
    # 0: no model, no file paths: tokenizers, rendering and data sources, text metrics.
    ('basics', ('charred.tokenizer', 'charred.subword', 'charred.evaluation.text_metrics',
                'charred.evaluation.grid', 'charred.evaluation.ocr',
                'charred.models.convert.sources')),
    # 1: the networks, the diffusion objective's pieces, sampling; no weight files, no gin.
    ('models', ('charred.models.diffusion', 'charred.models.schedulers',
                'charred.models.unet', 'charred.models.vae', 'charred.models.t5_encoder',
                'charred.models.preprocess', 'charred.models.sampling',
                'charred.models.text_to_image', 'charred.models.generation',
                'charred.models.image_codec', 'charred.models.model_kinds',
                'charred.models.losses', 'charred.models.diffusion_model',
                'charred.models.base_model', 'charred.models.tracing',
                'charred.models.quantize',
                'charred.evaluation.attention_maps')),
    # 2: reading and converting weights.
    ('weights', ('charred.models', 'charred.models.pretrained', 'charred.models.convert')),
    # 3: training, checkpoints, evaluators and the data pipeline.
    ('training and data', ('charred.trainers', 'charred.datasets', 'charred.evaluation')),
    # 4: experiments: what gin binds and parses, and runs rebuilt from their workdirs.
    ('experiments', ('charred.configs', 'charred.pipeline')),
    # 5: entry points (flags).
    ('entry points', ('charred.main', 'charred.evaluate', 'charred.sample', 'charred.sweep',
                      'charred.cache_encoder', 'charred.configs.sampling_flags',
                      'charred.models.convert.__main__', 'charred.datasets.prepare')),
)


def layer_of(module: str) -> int:
  if module == 'charred':
    return 0
  best, rank = '', None
  for i, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + '.')) and len(prefix) > len(best):
        best, rank = prefix, i
  if rank is None:
    raise KeyError(f'{module} is in no layer of tests/test_layering.py: give it one.')
  return rank


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def charred_imports(path: pathlib.Path) -> set[str]:
  """Every charred module `path` imports, at the top or inside any function."""
  package = module_name(path).split('.')
  if path.name != '__init__.py':
    package.pop()
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
      # `from charred.models import unet` imports the module charred.models.unet.
      names = [f'{base}.{a.name}' if _is_module(f'{base}.{a.name}') else base
               for a in node.names]
    else:
      continue
    found.update(n for n in names if n == 'charred' or n.startswith('charred.'))
  return found


def _is_module(name: str) -> bool:
  path = PACKAGE.parent.joinpath(*name.split('.'))
  return path.with_suffix('.py').exists() or (path / '__init__.py').exists()


def import_graph() -> dict[str, set[str]]:
  # charred/gin/sweeps/*.py are sweep files (data loaded by path), not modules.
  return {module_name(p): charred_imports(p) for p in sorted(PACKAGE.rglob('*.py'))
          if PACKAGE / 'gin' not in p.parents}


def test_every_module_has_a_layer():
  for module in import_graph():
    layer_of(module)


def test_no_module_imports_from_a_layer_above():
  upward = [f'{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})'
            for m, deps in import_graph().items() for d in sorted(deps)
            if d != 'charred' and layer_of(d) > layer_of(m)]
  assert not upward, '\n'.join(upward)


def test_no_import_cycles():
  graph = import_graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(module, path):
    state[module] = 1
    for dep in sorted(graph.get(module, ())):
      if state.get(dep) == 1:
        pytest.fail('import cycle: ' + ' -> '.join(path[path.index(dep):] + [dep]))
      if dep in graph and not state.get(dep):
        visit(dep, path + [dep])
    state[module] = 2

  for module in graph:
    if not state.get(module):
      visit(module, [module])


def test_the_checker_sees_imports_inside_functions(tmp_path):
  # Can fail: a function-level upward import must be found.
  source = PACKAGE / 'models' / 'text_to_image.py'
  probe = PACKAGE / 'models' / '_layering_probe.py'
  probe.write_text('def f():\n  from charred.configs import runs\n  return runs\n')
  try:
    assert 'charred.configs.runs' in charred_imports(probe)
    assert layer_of('charred.configs.runs') > layer_of('charred.models._layering_probe')
  finally:
    probe.unlink()
  assert source.exists()
