"""Streaming reader of webdataset tar shards (as img2dataset writes them).

A sample is a run of consecutive members sharing a key: the member path up
to the first '.' of its file name (`000010003.jpg`, `000010003.txt`,
`000010003.json` -> key '000010003'), webdataset's own grouping rule. Members
are read in streaming mode, never extracted to disk.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
from typing import Iterator

from etils import epath

_BLOCK = 512


class TarDamaged(Exception):
  """A tar shard ended in the middle of its data (truncated or corrupt)."""


def has_end_marker(path: str | os.PathLike[str]) -> bool:
  """Whether the file ends like a complete tar: whole blocks, two zero blocks last.

  Python's streaming reader stops silently at a header cut short, so this is
  how a shard truncated between members is told from a complete one.
  """
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, os.SEEK_END)
    if size < 2 * _BLOCK or size % _BLOCK:
      return False
    f.seek(size - 2 * _BLOCK)
    return not any(f.read(2 * _BLOCK))


def iter_samples(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Yields (key, {extension: bytes}) per sample, in tar order.

  Extensions are lowercased and may contain dots ('seg.png'). Non-file members
  and names without an extension are ignored. Raises TarDamaged, after
  yielding every complete sample before the damage; the sample being read
  when the data ran out is not yielded.
  """
  key, members = None, {}
  try:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
      for info in tar:
        if not info.isfile():
          continue
        dirname, base = posixpath.split(info.name)
        stem, dot, ext = base.partition(".")
        if not stem or not dot:
          continue
        sample_key = posixpath.join(dirname, stem)
        if sample_key != key:
          if key is not None:
            yield key, members
          key, members = sample_key, {}
        members[ext.lower()] = tar.extractfile(info).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    raise TarDamaged(f"{os.fspath(path)}: {e}") from e
  if not has_end_marker(path):
    # The last sample may have lost members with the missing data.
    raise TarDamaged(f"{os.fspath(path)}: no end-of-archive marker (truncated)")
  if key is not None:
    yield key, members
