"""Gin at the entry points only: flags, search path, parsing, the operative config.

Experiment files use `from __gin__ import dynamic_registration` and bind the library's
plain dataclasses and functions directly, as t5x does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Sequence

import gin

import charred

# Shipped inside the package (the repo's gin/ links here), so a plain `pip install .`
# finds experiments/, models/ and sweeps/ too.
GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(charred.__file__)), 'gin')


def rewrite_gin_shorthand(argv: Sequence[str]) -> list[str]:
  """t5x's `--gin.NAME=VALUE` shorthand -> `--gin_bindings=NAME=VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      arg = '--gin_bindings=' + arg[len('--gin.'):]
    out.append(arg)
  return out


_search_paths_added: set[str] = set()


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str] = ()) -> None:
  """Parses files and bindings. Names resolve against the working directory, charred's
  gin/ directory (`experiments/x.gin`) and its parent (`gin/experiments/x.gin`, the
  README's spelling, from any directory)."""
  for path in (GIN_DIR, os.path.dirname(GIN_DIR), os.getcwd()):
    if path not in _search_paths_added:
      gin.add_config_file_search_path(path)
      _search_paths_added.add(path)
  for f in gin_files:
    if not _find(f):
      raise FileNotFoundError(f'gin file not found: {f} (searched ., {GIN_DIR})')
  with _quiet_root_logger():
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings),
                                        finalize_config=False)


@contextlib.contextmanager
def _quiet_root_logger():
  """Gin logs 'Path not found' for every search-path miss before it finds an include;
  real failures still raise."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    root.setLevel(level)


def _find(path: str) -> bool:
  return any(os.path.exists(os.path.join(d, path))
             for d in ('', GIN_DIR, os.path.dirname(GIN_DIR)))


def error_line(e: BaseException) -> str:
  """Gin's messages span lines (with the offending file and line); keep one."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return ' '.join(lines[:2]) if lines else type(e).__name__


def exit_with_error(prog: str, e: BaseException) -> None:
  print(f'{prog}: error: {error_line(e)}', file=sys.stderr)
  sys.exit(2)


def workdir_flag(help_text: str):
  """The `--workdir` flag: defined by the first CLI module imported (main, sample,
  evaluate and sweep all take one), reused by the others, so that they import together
  (in tests, or a launcher) without absl's duplicate-flag error."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if 'workdir' in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS['workdir'])
  return flags.DEFINE_string('workdir', None, help_text)
