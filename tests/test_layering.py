"""Imports point one way: a module never imports (even inside a function) from a layer
above its own, and no import cycle runs between modules. The commands (`python -m
charred.X`) are the top layer and live at the top of the package."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'charred'
MAIN_GUARD = re.compile(r"^if __name__ == ['\"]__main__['\"]:", re.M)

# Lowest first. Every module file is named in exactly one layer (a package by its
# __init__.py); where a file sits in the tree does not decide its layer.
LAYERS = (
    # 0: no model, no file paths: tokenizers, text metrics, reading checkpoint formats.
    ('basics', (
        'charred', 'charred.tokenizer', 'charred.subword',
        'charred.evaluation.text_metrics', 'charred.evaluation.grid',
        'charred.evaluation.ocr',
        'charred.models.convert.sources')),
    # 1: the networks, the diffusion objective's pieces, sampling; no weight files, no gin.
    ('models', (
        'charred.models.base_model', 'charred.models.diffusion',
        'charred.models.diffusion_model', 'charred.models.generation',
        'charred.models.image_codec', 'charred.models.losses', 'charred.models.model_kinds',
        'charred.models.preprocess', 'charred.models.quantize', 'charred.models.sampling',
        'charred.models.schedulers', 'charred.models.t5_encoder',
        'charred.models.text_frame', 'charred.models.text_to_image',
        'charred.models.tracing', 'charred.models.unet', 'charred.models.vae',
        'charred.evaluation.attention_maps')),
    # 2: reading and converting weights.
    ('weights', (
        'charred.models', 'charred.models.pretrained',
        'charred.models.convert', 'charred.models.convert.__main__',
        'charred.models.convert.core', 'charred.models.convert.diffusers',
        'charred.models.convert.t5')),
    # 3: training, checkpoints, evaluators and the data pipeline.
    ('training and data', (
        'charred.trainers', 'charred.trainers.checkpoints', 'charred.trainers.distributed',
        'charred.trainers.monitoring', 'charred.trainers.optimizer',
        'charred.trainers.partitioning', 'charred.trainers.train_state',
        'charred.trainers.trainer',
        'charred.evaluation', 'charred.evaluation.curves', 'charred.evaluation.evaluators',
        'charred.evaluation.prompts_file',
        'charred.datasets', 'charred.datasets.aesthetic', 'charred.datasets.bucketing',
        'charred.datasets.calligraphy', 'charred.datasets.chromium',
        'charred.datasets.doc_layout', 'charred.datasets.encoder_cache',
        'charred.datasets.filters', 'charred.datasets.font_faces',
        'charred.datasets.html_layouts', 'charred.datasets.jxl_shards',
        'charred.datasets.ladder', 'charred.datasets.laion_hr', 'charred.datasets.languages',
        'charred.datasets.packaged_fonts', 'charred.datasets.palette',
        'charred.datasets.pipeline', 'charred.datasets.prepare',
        'charred.datasets.prepare_beam', 'charred.datasets.render',
        'charred.datasets.scene_text', 'charred.datasets.shard_inputs',
        'charred.datasets.signs', 'charred.datasets.source_tasks', 'charred.datasets.streams',
        'charred.datasets.svg_scenes', 'charred.datasets.tasks', 'charred.datasets.textcaps',
        'charred.datasets.typography', 'charred.datasets.web_images',
        'charred.datasets.webdataset_tar', 'charred.datasets.wit', 'charred.datasets.words')),
    # 4: experiments: what gin binds and parses, and runs rebuilt from their workdirs.
    ('experiments', (
        'charred.configs', 'charred.configs.experiment', 'charred.configs.gin_utils',
        'charred.configs.runs', 'charred.pipeline', 'charred.aot')),
    # 5: entry points (flags): the `python -m charred.X` commands, all at the top of the
    # package, and the flags two of them share.
    ('entry points', (
        'charred.main', 'charred.evaluate', 'charred.sample', 'charred.sweep',
        'charred.cache_encoder', 'charred.convert', 'charred.prepare', 'charred.curves',
        'charred.export', 'charred.sampling_flags')),
)


def layer_of(module: str) -> int:
  for rank, (_, modules) in enumerate(LAYERS):
    if module in modules:
      return rank
  raise KeyError(f'{module} is in no layer of tests/test_layering.py: give it one.')


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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  return [f'{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})'
          for m, deps in graph.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]


def test_every_module_has_one_layer_and_every_layer_entry_is_a_module():
  named = [m for _, modules in LAYERS for m in modules]
  assert len(named) == len(set(named)), 'a module is named in two layers'
  files = set(import_graph())
  assert not files - set(named), f'in no layer: {sorted(files - set(named))}'
  assert not set(named) - files, f'no such module: {sorted(set(named) - files)}'


def test_no_module_imports_from_a_layer_above():
  upward = upward_imports(import_graph())
  assert not upward, '\n'.join(upward)


def test_commands_are_at_the_top_of_the_package():
  """Every `python -m charred.X` is a module of `charred` itself; a command path below the
  top is an alias that runs one of those (runpy, under its main guard)."""
  for path in sorted(PACKAGE.rglob('*.py')):
    text = path.read_text()
    if PACKAGE / 'gin' in path.parents or not MAIN_GUARD.search(text):
      continue
    module = module_name(path)
    if module.count('.') == 1:
      continue
    alias = re.search(r"runpy\.run_module\(['\"](charred\.\w+)['\"]", text)
    assert alias, f'{module} is a command below the top of the package'
    assert layer_of(alias.group(1)) == len(LAYERS) - 1, f'{module} runs {alias.group(1)}'


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


def test_the_checker_sees_imports_inside_functions():
  # Can fail: a function-level upward import must be found.
  probe = PACKAGE / 'models' / '_layering_probe.py'
  probe.write_text('def f():\n  from charred.configs import runs\n  return runs\n')
  try:
    imports = charred_imports(probe)
  finally:
    probe.unlink()
  assert imports == {'charred.configs.runs'}
  assert upward_imports({'charred.models.text_to_image': imports})
