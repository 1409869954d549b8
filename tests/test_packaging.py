"""A plain `pip install .`: the gin and sweep files ship inside the package, and
`charred.main` trains from any directory with the installed copy, not the checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, micro_args

GIN_DIR = os.path.join(REPO, 'charred', 'gin')

# What the subprocess imported: the installed copy, or (wrongly) the checkout.
_PROBE = ('import json, os, sys, charred; from charred.configs import gin_utils; '
          'print(json.dumps({"file": charred.__file__, "gin_dir": gin_utils.GIN_DIR, '
          '"path": [os.path.abspath(p) for p in sys.path]}))')  # '' -> the cwd


def _run(args, **kwargs):
  proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
  if proc.returncode != 0:
    raise AssertionError(f'{" ".join(args[:4])} failed ({proc.returncode}):\n'
                         f'{proc.stderr[-3000:]}')
  return proc


def _pip(*args):
  # Offline: no index, no dependencies (they come from this environment).
  env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK='1')
  _run([sys.executable, '-m', 'pip', *args, '--no-deps', '--no-index', '--quiet'], env=env)


def _shipped_files():
  """Every gin file and sweep file of the checkout, as wheel paths."""
  out = set()
  for root, _, files in os.walk(GIN_DIR):
    for f in files:
      path = os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, '/')
      if f.endswith('.gin') or (f.endswith('.py') and '/sweeps/' in path):
        out.add(path)
  return out


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """The checkout's wheel, built from a copy: an in-tree build leaves build/ behind, and
  build/lib keeps files deleted since, which a later wheel would ship."""
  tmp = tmp_path_factory.mktemp('wheel')
  src = tmp / 'src'
  shutil.copytree(os.path.join(REPO, 'charred'), src / 'charred',
                  ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(REPO, 'setup.py'), src / 'setup.py')
  _pip('wheel', '--no-build-isolation', '-w', str(tmp / 'dist'), str(src))
  (path,) = (tmp / 'dist').glob('*.whl')
  return path


@pytest.fixture(scope='module')
def site(wheel, tmp_path_factory):
  site_dir = tmp_path_factory.mktemp('site')
  _pip('install', '--target', str(site_dir), str(wheel))
  return str(site_dir)


def _installed_env(site_dir):
  # Only the install on the path (cwd is outside the checkout too). The environment's
  # editable finder sits after the path finders in sys.meta_path, so it cannot shadow it.
  return dict(os.environ, PYTHONPATH=site_dir, TF_CPP_MIN_LOG_LEVEL='3')


def _inside(path, directory):
  return os.path.commonpath([os.path.realpath(path), os.path.realpath(directory)]) == \
      os.path.realpath(directory)


def test_repo_gin_links_to_the_package():
  assert os.path.islink(os.path.join(REPO, 'gin'))
  assert os.path.samefile(os.path.join(REPO, 'gin'), GIN_DIR)


def test_wheel_ships_every_gin_and_sweep_file(wheel):
  shipped = _shipped_files()
  assert 'charred/gin/experiments/typography_tiny.gin' in shipped
  assert 'charred/gin/sweeps/text_rendering_ablation.py' in shipped
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  assert shipped <= names, sorted(shipped - names)
  assert not any(n.startswith('charred/gin/') and n.endswith('__init__.py') for n in names)


def test_installed_copy_is_what_runs_outside_the_checkout(site, tmp_path):
  proc = _run([sys.executable, '-c', _PROBE], cwd=tmp_path, env=_installed_env(site))
  probe = json.loads(proc.stdout.strip().splitlines()[-1])
  assert _inside(probe['file'], site), probe['file']
  assert _inside(probe['gin_dir'], site) and os.path.isdir(probe['gin_dir']), probe['gin_dir']
  on_path = [p for p in probe['path'] if _inside(p, REPO)]
  assert not on_path, on_path


@pytest.mark.slow
def test_installed_main_trains_from_any_directory(site, tmp_path, micro_data_dir):
  workdir = tmp_path / 'run'
  cwd = tmp_path / 'elsewhere'
  cwd.mkdir()
  # Two steps, a checkpoint at the second, no evaluators (0: never): the path, cheaply.
  _run([sys.executable, '-m', 'charred.main',
        *micro_args(workdir, micro_data_dir, '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_EVERY=2',
                    '--gin.EVAL_EVERY=0', '--gin.VALIDATION_EVERY=0')],
       cwd=cwd, env=_installed_env(site), timeout=600)
  assert os.listdir(workdir / 'checkpoints') == ['2']
  assert 'TRAIN_STEPS = 2' in (workdir / 'config.gin').read_text()
