"""Ahead-of-time export: a text-to-image model as three StableHLO programs, compiled by IREE.

  pipe = TextToImagePipeline.from_pretrained('runs/r1')
  pipe.export('export/r1', batch=1, num_steps=20)      # or: python -m charred.export
  model = aot.IreeModel('export/r1')                   # iree.runtime, no JAX
  images = model(['A sign that says "hello".'], seed=0)  # uint8 [N, H, W, 3]

The folder holds, for fixed shapes (batch, text length, image size) and fixed sampling
settings (steps, guidance, scheduler):

  encode_text   (tokens i32[B,L], mask i32[B,L]) -> (context f32[B,L,D], uncond f32[B,L,D])
                the captions' hidden states and the empty caption's (guidance's other branch)
  sample        (tokens, mask, context, uncond, seed i32[] [, boxes i32[B,4]]) -> x f32[B,h,w,C]
                the whole guided sampling loop (one while loop) from noise drawn with `seed`,
                as `ImageGenerator` draws it for one batch; `boxes` for a box-conditioned model
  decode        (x) -> image f32[B,H,W,3] in [-1, 1]  (the VAE's decoder; for a pixel-space
                model the identity, exported all the same so every model has three artefacts)

each as `NAME.jax_export` (`jax.export` serialised StableHLO, for `jax.export.deserialize`),
`NAME.mlir` (what IREE compiled) and `NAME.TARGET.vmfb` (llvm-cpu; cuda too where the IREE
compiler has that target), with `weights.irpa` and `manifest.json` (inputs, outputs,
shapes, dtypes, settings, parameter names; see `write`).

Parameters. Weights are never constants of a program. JAX exports each function with its
parameters as explicit leading arguments (a flat list, named in the manifest), and the
`.jax_export` artefacts keep that signature. For IREE each module gets a public `main`
taking only the data inputs: every parameter is a `util.global` initialised from
`#stream.parameter.named<"model"::"NAME">`, which `main` loads and passes to the exported
function (now private). `weights.irpa` (written with `iree.runtime.ParameterIndex`) holds
the values under those names; at run time `iree.runtime.create_io_parameters_module`
serves them from the archive, mapped, not copied into the module. Why: inlined weights
make the import slow and the compile run out of memory at Stable Diffusion sizes, and one
compiled module then serves any archive with the same names and shapes (retrained
weights), which `IreeModel(..., parameters=PATH)` loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from charred.models.generation import ImageGenerator, check_boxes, to_uint8, tokenize_prompts

FORMAT = 'charred-iree-export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
PARAMETERS = 'weights.irpa'
SCOPE = 'model'  # the parameter scope every module names and the runtime provides
FUNCTIONS = ('encode_text', 'sample', 'decode')
CPU_TARGET = 'llvm-cpu'
GPU_TARGET = 'cuda'
# IREE's runtime driver for each compile target.
DRIVERS = {CPU_TARGET: 'local-task', GPU_TARGET: 'cuda'}

_DTYPES = {'float32': 'f32', 'float16': 'f16', 'bfloat16': 'bf16', 'int32': 'i32',
           'int8': 'i8', 'uint8': 'ui8', 'uint32': 'ui32', 'bool': 'i1'}


class ExportError(ValueError):
  """A bad export request or artefact, in one line."""


# --- the functions ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Function:
  """One exported function: its parameters (flat, named) and data inputs."""
  name: str
  fn: Any  # fn(*params, *inputs) -> tuple of arrays
  param_names: list[str]
  params: list[np.ndarray]
  inputs: list[tuple[str, jax.ShapeDtypeStruct]]
  outputs: list[str]


def _name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def _flat(prefix: str, tree) -> tuple[list[str], list[np.ndarray], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return ([f'{prefix}/{_name(p)}' for p, _ in leaves],
          [np.asarray(v) for _, v in leaves], treedef)


def _used(fn, args) -> list[bool]:
  """Which positional arguments `fn`'s program reads (the rest need no parameter)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return [id(v) in read for v in jaxpr.invars]


def _function(name, body, groups, inputs, outputs) -> Function:
  """`body(*trees, *inputs)` as a Function of the parameter leaves it reads.

  `groups`: [(archive prefix, parameter tree)], one per leading tree argument of `body`.
  """
  names, values, treedefs, sizes = [], [], [], []
  for prefix, tree in groups:
    n, v, treedef = _flat(prefix, tree)
    names += n
    values += v
    treedefs.append(treedef)
    sizes.append(len(v))

  def full(*args):
    leaves, rest = list(args[:len(values)]), args[len(values):]
    trees, start = [], 0
    for treedef, size in zip(treedefs, sizes):
      trees.append(jax.tree_util.tree_unflatten(treedef, leaves[start:start + size]))
      start += size
    return tuple(body(*trees, *rest))

  specs = [s for _, s in inputs]
  used = _used(full, [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in values] + specs)
  keep = [i for i in range(len(values)) if used[i]]

  def fn(*args):
    leaves = [jnp.zeros(v.shape, v.dtype) for v in values]  # unread: constant-folded away
    for i, a in zip(keep, args[:len(keep)]):
      leaves[i] = a
    return full(*leaves, *args[len(keep):])

  return Function(name, fn, [names[i] for i in keep], [values[i] for i in keep],
                  list(inputs), list(outputs))


def functions(generator: ImageGenerator, batch: int) -> list[Function]:
  """The three exported functions of `generator`'s model and settings, for `batch`."""
  c = generator.model.config
  length = c.text_length
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  tokens, mask = np.zeros((1, length), np.int32), np.ones((1, length), np.int32)
  width = jax.eval_shape(lambda p: generator.encode_prompts(p, tokens, mask)[0],
                         generator.params).shape[-1]
  text = [('tokens', i32(batch, length)), ('mask', i32(batch, length))]
  contexts = [('context', f32(batch, length, width)), ('uncond', f32(batch, length, width))]
  latent = f32(batch, *c.sampled_shape(generator.codec))
  box = [('boxes', i32(batch, 4))] if c.box_conditioning else []

  def sample(params, tokens, mask, context, uncond, seed, boxes=None):
    # As ImageGenerator.__call__ keys its first batch of a seed.
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    return (generator.sample_loop(params, tokens, mask, context, uncond, rng, boxes),)

  return [
      _function('encode_text', generator.encode_prompts, [('model', generator.params)],
                text, ['context', 'uncond']),
      _function('sample', sample, [('model', generator.params)],
                text + contexts + [('seed', i32())] + box, ['x']),
      _function('decode', lambda p, x: (generator.decode(p, x),),
                [('vae', generator.codec_params())], [('x', latent)], ['image']),
  ]


# --- StableHLO and IREE -------------------------------------------------------------------


def _tensor_type(shape, dtype) -> str:
  return 'tensor<' + ''.join(f'{d}x' for d in shape) + _DTYPES[np.dtype(dtype).name] + '>'


def iree_module(exported: jax.export.Exported, name: str, param_names: Sequence[str]) -> str:
  """`exported`'s StableHLO as an IREE module @name whose public `main` takes the data
  inputs only: each leading parameter argument becomes a global read from the parameter
  archive (scope `SCOPE`) by its name."""
  text = exported.mlir_module()
  text, n = re.subn(r'^module @[\w$.-]+', f'module @{name}', text, count=1, flags=re.M)
  text, m = re.subn(r'func\.func public @main\(', 'func.func private @exported_main(', text)
  if n != 1 or m != 1:
    raise ExportError(f'{name}: unexpected jax.export module layout (module {n}, main {m}).')
  types = [_tensor_type(a.shape, a.dtype) for a in exported.in_avals]
  outs = [_tensor_type(a.shape, a.dtype) for a in exported.out_avals]
  k = len(param_names)
  lines = []
  for i, key in enumerate(param_names):
    lines.append(f'  util.global private @param{i} = #stream.parameter.named<"{SCOPE}"::'
                 f'{json.dumps(key)}> : {types[i]}')
  args = ', '.join(f'%arg{j}: {t}' for j, t in enumerate(types[k:]))
  lines.append(f'  func.func public @main({args}) -> ({", ".join(outs)}) {{')
  for i in range(k):
    lines.append(f'    %param{i} = util.global.load @param{i} : {types[i]}')
  operands = [f'%param{i}' for i in range(k)] + [f'%arg{j}' for j in range(len(types) - k)]
  lines.append(f'    %out:{len(outs)} = func.call @exported_main({", ".join(operands)}) : '
               f'({", ".join(types)}) -> ({", ".join(outs)})')
  lines.append('    return ' + ', '.join(f'%out#{i}' for i in range(len(outs))) + ' : '
               + ', '.join(outs))
  lines.append('  }')
  head = re.search(r'^module @\S+(?: attributes \{.*\})? \{\n', text, re.M)
  return text[:head.end()] + '\n'.join(lines) + '\n' + text[head.end():]


def available_targets() -> list[str]:
  """The compile targets of the installed IREE compiler that `write` may use."""
  from iree.compiler import tools  # pylint: disable=g-import-not-at-top
  have = tools.query_available_targets()
  return [t for t in (CPU_TARGET, GPU_TARGET) if t in have]


def compile_module(mlir: str, target: str) -> bytes:
  """IREE-compiled `.vmfb` bytes of a module for `target` ('llvm-cpu' for this host's CPU,
  'cuda' for sm_80 and newer)."""
  import iree.compiler as ireec  # pylint: disable=g-import-not-at-top
  extra = {CPU_TARGET: ['--iree-llvmcpu-target-cpu=host'],
           GPU_TARGET: ['--iree-cuda-target=sm_80']}[target]
  # IREE 3.13's indirect (reusable) command buffers fail at run time on the sampling loop
  # ("indirect buffer reference slot 0 is out range of the declared binding capacity",
  # from hal.command_buffer.copy_buffer); direct ones run it.
  extra.append('--iree-hal-indirect-command-buffers=false')
  return ireec.compile_str(mlir, target_backends=[target], input_type='stablehlo',
                           extra_args=extra)


def _first_error(e: Exception) -> str:
  """The first diagnostic of a compiler failure, in one line."""
  lines = str(e).strip().splitlines()
  errors = [line.strip() for line in lines if 'error:' in line]
  return (errors or lines or [type(e).__name__])[0][:300]


def write_parameters(path: str, names: Sequence[str], values: Sequence[np.ndarray]) -> None:
  """An IREE parameter archive (.irpa) of `values` under `names`."""
  import iree.runtime as ireert  # pylint: disable=g-import-not-at-top
  index = ireert.ParameterIndex()
  for key, value in zip(names, values):
    index.add_buffer(key, np.ascontiguousarray(value))
  index.create_archive_file(path)


def _spec(name, shape, dtype) -> dict:
  return {'name': name, 'shape': list(shape), 'dtype': np.dtype(dtype).name}


def check_out_dir(out: str, overwrite: bool) -> None:
  """Refuses an `out` that is a file, or a non-empty folder without `overwrite`."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f'--out={out} is a file, not a folder.')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ExportError(f'--out={out} exists and is not empty: pass --overwrite to replace it.')


def write(generator: ImageGenerator, out: str, *, batch: int = 1,
          targets: Sequence[str] | None = None, overwrite: bool = False,
          settings: dict | None = None) -> dict:
  """Exports `generator` (its model, parameters and sampling settings) for `batch`
  prompts to the folder `out`; returns the manifest it writes there.

  `targets`: IREE targets to compile for; None: llvm-cpu, and cuda where the compiler
  has it (a failed cuda compile is recorded in the manifest, not raised). The folder is
  built beside `out` and moved into place at the end: a failed export leaves `out` as it
  was. `settings`: extra entries for the manifest's settings (e.g. the run's workdir).
  """
  if batch < 1:
    raise ExportError(f'--batch must be >= 1, got {batch}.')
  if generator.progress:
    raise ExportError('A progress bar is a host callback: export a generator without one.')
  check_out_dir(out, overwrite)
  import iree.compiler  # pylint: disable=g-import-not-at-top
  import iree.runtime  # pylint: disable=g-import-not-at-top
  required = targets is not None
  targets = list(targets) if required else available_targets()
  unknown = sorted(set(targets) - set(DRIVERS))
  if unknown:
    raise ExportError(f'Unknown IREE target {unknown[0]!r}: charred exports for '
                      f'{", ".join(DRIVERS)}.')
  if CPU_TARGET not in targets and not required:
    raise ExportError(f'The installed IREE compiler has no {CPU_TARGET} target.')
  tmp = out.rstrip('/') + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  c = generator.model.config
  manifest = {
      'format': FORMAT, 'format_version': FORMAT_VERSION,
      'versions': {'jax': jax.__version__, 'iree': _iree_version()},
      'settings': {
          'batch': batch, 'text_length': c.text_length, 'image_size': list(c.image_size),
          'num_steps': generator.num_steps, 'guidance_scale': generator.guidance_scale,
          'guidance_rescale': generator.guidance_rescale,
          'scheduler': type(generator.scheduler).__name__,
          'spacing': generator.scheduler.spacing,
          'pixel_space': c.pixel_space, 'box_conditioning': c.box_conditioning,
          'tokenizer': 'byt5' if c.text_tokenizer() is None else 'subword',
          **(settings or {})},
      'parameters': {'file': PARAMETERS, 'scope': SCOPE},
      'targets': {}, 'functions': {},
  }
  all_params: dict[str, np.ndarray] = {}
  for f in functions(generator, batch):
    specs = [s for _, s in f.inputs]
    exported = jax.export.export(jax.jit(f.fn, keep_unused=True))(
        *[jax.ShapeDtypeStruct(v.shape, v.dtype) for v in f.params], *specs)
    with open(os.path.join(tmp, f'{f.name}.jax_export'), 'wb') as fh:
      fh.write(exported.serialize())
    mlir = iree_module(exported, f.name, f.param_names)
    with open(os.path.join(tmp, f'{f.name}.mlir'), 'w') as fh:
      fh.write(mlir)
    all_params.update(zip(f.param_names, f.params))
    outs = exported.out_avals
    manifest['functions'][f.name] = {
        'jax_export': f'{f.name}.jax_export', 'mlir': f'{f.name}.mlir', 'module': f.name,
        'entry': 'main', 'vmfb': {},
        'inputs': [_spec(n, s.shape, s.dtype) for n, s in f.inputs],
        'outputs': [_spec(n, a.shape, a.dtype) for n, a in zip(f.outputs, outs)],
        'parameters': [_spec(n, v.shape, v.dtype) for n, v in zip(f.param_names, f.params)],
    }
  for target in targets:
    try:
      for name, entry in manifest['functions'].items():
        with open(os.path.join(tmp, entry['mlir'])) as fh:
          vmfb = compile_module(fh.read(), target)
        file = f'{name}.{target}.vmfb'
        with open(os.path.join(tmp, file), 'wb') as fh:
          fh.write(vmfb)
        entry['vmfb'][target] = {'file': file, 'sha256': hashlib.sha256(vmfb).hexdigest()}
      manifest['targets'][target] = {'driver': DRIVERS[target], 'compiled': True}
    except Exception as e:  # pylint: disable=broad-except
      if required or target == CPU_TARGET:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f'IREE could not compile for {target}: {_first_error(e)}') from e
      for entry in manifest['functions'].values():  # none or all of a target's modules
        entry['vmfb'].pop(target, None)
      manifest['targets'][target] = {'driver': DRIVERS[target], 'compiled': False,
                                     'error': _first_error(e)}
  names = sorted(all_params)
  write_parameters(os.path.join(tmp, PARAMETERS), names, [all_params[n] for n in names])
  manifest['parameters'].update(count=len(names),
                                bytes=int(sum(all_params[n].nbytes for n in names)))
  with open(os.path.join(tmp, MANIFEST), 'w') as fh:
    json.dump(manifest, fh, indent=2)
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  return manifest


def _iree_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version('iree-base-compiler')
  except metadata.PackageNotFoundError:
    return metadata.version('iree-base-runtime')


# --- running the artefacts ------------------------------------------------------------------


def read_manifest(folder: str) -> dict:
  """An export's manifest; ExportError in one line for a folder that holds none."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise ExportError(f'{folder} holds no {MANIFEST}: not a charred export.')
  with open(path) as fh:
    manifest = json.load(fh)
  if manifest.get('format') != FORMAT or manifest.get('format_version') != FORMAT_VERSION:
    raise ExportError(f'{path}: not a {FORMAT} v{FORMAT_VERSION} manifest.')
  return manifest


def jax_function(folder: str, name: str):
  """(the deserialised `jax.export.Exported` of function `name`, its parameters from the
  archive in order): call `exported.call(*params, *inputs)`."""
  manifest = read_manifest(folder)
  entry = manifest['functions'][name]
  with open(os.path.join(folder, entry['jax_export']), 'rb') as fh:
    exported = jax.export.deserialize(fh.read())
  archive = read_parameters(os.path.join(folder, manifest['parameters']['file']))
  return exported, [archive[p['name']].view(p['dtype']).reshape(p['shape'])
                    for p in entry['parameters']]


def read_parameters(path: str) -> dict[str, np.ndarray]:
  """name -> a flat uint8 view of each parameter of an .irpa archive (the bytes, mapped)."""
  import iree.runtime as ireert  # pylint: disable=g-import-not-at-top
  index = ireert.ParameterIndex()
  index.load(path)
  return {key: ireert.parameter_index_entry_as_numpy_flat_ndarray(entry)
          for key, entry in index.items()}


class IreeModel:
  """An export folder run by the IREE Python runtime: prompts in, uint8 images out.

  `parameters`: another .irpa with the same names and shapes (retrained weights) in place
  of the folder's. Inputs are checked against the manifest (batch size, prompt length,
  boxes) and the modules against their recorded hashes, each failure a one-line
  ExportError.
  """

  def __init__(self, folder: str, target: str = CPU_TARGET, parameters: str | None = None):
    import iree.runtime as ireert  # pylint: disable=g-import-not-at-top
    self.folder = folder
    self.manifest = manifest = read_manifest(folder)
    self.settings = manifest['settings']
    have = _iree_version()
    if manifest['versions']['iree'] != have:
      raise ExportError(f'{folder} was compiled by IREE {manifest["versions"]["iree"]}; this '
                        f'runtime is {have}: export it again.')
    if not manifest['targets'].get(target, {}).get('compiled'):
      raise ExportError(f'{folder} has no {target} modules (compiled: '
                        f'{[t for t, v in manifest["targets"].items() if v["compiled"]]}).')
    parameters = parameters or os.path.join(folder, manifest['parameters']['file'])
    if not os.path.isfile(parameters):
      raise ExportError(f'{parameters}: no such parameter archive.')
    index = ireert.ParameterIndex()
    index.load(parameters)
    lengths = {key: entry.length for key, entry in index.items()}
    for entry in manifest['functions'].values():
      for p in entry['parameters']:
        want = int(np.prod(p['shape'])) * np.dtype(p['dtype']).itemsize
        if lengths.get(p['name']) != want:
          raise ExportError(f'{parameters}: parameter {p["name"]} has '
                            f'{lengths.get(p["name"])} bytes, the modules need {want}.')
    self._config = ireert.Config(DRIVERS[target])
    instance = self._config.vm_instance
    modules = [ireert.create_io_parameters_module(instance, index.create_provider(scope=SCOPE)),
               ireert.create_hal_module(instance, self._config.device)]
    for name, entry in manifest['functions'].items():
      path = os.path.join(folder, entry['vmfb'][target]['file'])
      with open(path, 'rb') as fh:
        data = fh.read()
      if hashlib.sha256(data).hexdigest() != entry['vmfb'][target]['sha256']:
        raise ExportError(f'{path} is not the module {MANIFEST} names (another model or '
                          'compiler?): export again.')
      modules.append(ireert.VmModule.copy_buffer(instance, data))
    self._context = ireert.SystemContext(vm_modules=modules, config=self._config)
    self._index = index  # the provider reads from it

  def run(self, name: str, *inputs) -> list[np.ndarray]:
    """Function `name` on numpy inputs (checked against the manifest), as numpy outputs."""
    entry = self.manifest['functions'][name]
    if len(inputs) != len(entry['inputs']):
      raise ExportError(f'{name} takes {len(entry["inputs"])} inputs '
                        f'({", ".join(s["name"] for s in entry["inputs"])}), got {len(inputs)}.')
    args = []
    for value, spec in zip(inputs, entry['inputs']):
      value = np.asarray(value)
      if list(value.shape) != spec['shape']:
        raise ExportError(f'{name}: input {spec["name"]} has shape {list(value.shape)}; the '
                          f'export takes {spec["shape"]} (batch {self.settings["batch"]}).')
      args.append(np.array(value, dtype=spec['dtype'], order='C'))  # 0-d stays 0-d
    out = getattr(self._context.modules, name).main(*args)
    out = out if isinstance(out, (tuple, list)) else [out]
    return [np.asarray(o.to_host()) for o in out]

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if self.settings['tokenizer'] != 'byt5':
      raise ExportError('IreeModel tokenizes ByT5 bytes only; pass tokens to run().')
    length, batch = self.settings['text_length'], self.settings['batch']
    if len(prompts) != batch:
      raise ExportError(f'{len(prompts)} prompts for an export of batch {batch}: export '
                        f'again with --batch={len(prompts)}.')
    return tokenize_prompts(prompts, length, owner="the export's")

  def __call__(self, prompts: Sequence[str], seed: int = 0, boxes=None) -> np.ndarray:
    """uint8 images [B, H, W, 3]: encode, sample, decode."""
    if isinstance(prompts, str):
      prompts = [prompts]
    tokens, mask = self.tokenize(prompts)
    extra = []
    if self.settings['box_conditioning'] != (boxes is not None):
      raise ExportError('This export is box-conditioned: pass boxes= (one per prompt).'
                        if boxes is None else 'boxes= is for box-conditioned exports.')
    if boxes is not None:
      extra = [check_boxes(boxes, tuple(self.settings['image_size']))]
    context, uncond = self.run('encode_text', tokens, mask)
    x, = self.run('sample', tokens, mask, context, uncond, np.int32(seed), *extra)
    image, = self.run('decode', x)
    return to_uint8(image)
