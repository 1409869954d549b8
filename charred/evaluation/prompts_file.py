"""Prompts files for `charred.evaluate --prompts_file`: any prompt, and the text its image
must show.

Each line is `<prompt><TAB><expected text>` (`read_prompts`); blank lines and lines
starting with '#' are skipped. The expected text is what OCR must read, compared after
`text_metrics.normalize` as the held-out words are, and may hold several words. A prompt
the run cannot sample fairly is skipped and counted, never sampled (`screen`):

* 'too_long': more tokens (the model's tokenizer, EOS included) than the model's
  `text_length`, which `ImageGenerator.tokenize` would refuse;
* 'no_glyph': an expected text holding a character that one of the run's ground-truth
  fonts has no glyph for (whitespace needs none): the training signs never showed it and
  the ceiling's render could not.

A prompt that is both counts as 'too_long'.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

from charred.evaluation import text_metrics

TOO_LONG, NO_GLYPH = 'too_long', 'no_glyph'
SKIP_REASONS = (TOO_LONG, NO_GLYPH)
_WHY = {TOO_LONG: "too long for the model's text length",
        NO_GLYPH: 'a character the ground-truth fonts lack'}
LINE_FORMAT = '<prompt><TAB><expected text>'


def parse_line(line: str) -> tuple[str, str]:
  """(prompt, expected text) of one line, each stripped; ValueError saying what is wrong."""
  fields = line.split('\t')
  if len(fields) != 2:
    what = 'no tab' if len(fields) == 1 else f'{len(fields) - 1} tabs'
    raise ValueError(f'{what}; expected one, as {LINE_FORMAT}')
  prompt, expected = (f.strip() for f in fields)
  if not prompt:
    raise ValueError('empty prompt')
  if not text_metrics.normalize(expected):
    # Empty once normalised (e.g. only quotes): nothing for OCR to read.
    raise ValueError(f'empty expected text {expected!r}' if expected else
                     'empty expected text')
  return prompt, expected


def read_prompts(path: str) -> list[tuple[str, str]]:
  """The (prompt, expected text) pairs of `path`, in file order.

  Raises ValueError naming the file and line of the first line that does not parse, or
  when there is no prompt at all; FileNotFoundError when `path` is missing.
  """
  pairs = []
  with open(path, 'rb') as f:
    # Bytes, decoded line by line: a bad byte's error names its line too.
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8-sig' if number == 1 else 'utf-8').rstrip('\r\n')
        if line.strip() and not line.startswith('#'):
          pairs.append(parse_line(line))
      except ValueError as e:  # a UnicodeDecodeError too
        text = raw.decode('utf-8', errors='replace').rstrip('\r\n')
        raise ValueError(f'{path}, line {number}: {e}: {_short(text)}') from None
  if not pairs:
    raise ValueError(f'{path} holds no prompts: expected lines {LINE_FORMAT}.')
  return pairs


def _short(text: str, limit: int = 50) -> str:
  return repr(text if len(text) <= limit else text[:limit - 3] + '...')


@functools.lru_cache(maxsize=None)
def font_codepoints(path: str) -> frozenset[int]:
  """The code points the font file at `path` maps to a glyph (its best cmap)."""
  from fontTools import ttLib  # pylint: disable=g-import-not-at-top
  with ttLib.TTFont(path, lazy=True) as font:
    return frozenset(font['cmap'].getBestCmap())


def drawable_codepoints(font_paths: Sequence[str]) -> frozenset[int]:
  """The code points every one of the fonts has: the renderer may draw with any of them."""
  if not font_paths:
    raise ValueError('No ground-truth fonts to check glyphs against.')
  return frozenset.intersection(*(font_codepoints(p) for p in font_paths))


def missing_glyphs(text: str, codepoints: frozenset[int]) -> str:
  """The distinct characters of `text`, in order, that have no glyph; whitespace is
  always drawable (it is drawn as space)."""
  return ''.join(dict.fromkeys(c for c in text if not c.isspace() and ord(c) not in codepoints))


def skip_reason(prompt: str, expected: str, *, num_tokens: Callable[[str], int],
                text_length: int, codepoints: frozenset[int]) -> tuple[str, str] | None:
  """None if the run can sample and score the pair, else (reason, what to tell)."""
  n = num_tokens(prompt)
  if n > text_length:
    return TOO_LONG, f'{_short(prompt)}: {n} tokens > {text_length}'
  missing = missing_glyphs(expected, codepoints)
  if missing:
    return NO_GLYPH, f'{_short(expected)}: no glyph for {missing!r}'
  return None


def screen(pairs: Iterable[tuple[str, str]], **kwargs
           ) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
  """(the pairs kept, in order; what was skipped, per reason in SKIP_REASONS); kwargs
  as `skip_reason`."""
  kept, skipped = [], {reason: [] for reason in SKIP_REASONS}
  for prompt, expected in pairs:
    why = skip_reason(prompt, expected, **kwargs)
    if why:
      skipped[why[0]].append(why[1])
    else:
      kept.append((prompt, expected))
  return kept, skipped


def skip_counts(skipped: dict[str, list[str]]) -> dict[str, int]:
  """`num_skipped` and `num_skipped/<reason>` for the JSON line."""
  counts = {f'num_skipped/{reason}': len(told) for reason, told in skipped.items()}
  return {'num_skipped': sum(counts.values()), **counts}


def skip_summary(skipped: dict[str, list[str]], total: int, examples: int = 3) -> str:
  """One line: how many of `total` prompts were skipped, per reason, with the first
  `examples` of each."""
  parts = []
  for reason, told in skipped.items():
    if told:
      more = f'; {len(told) - examples} more' if len(told) > examples else ''
      parts.append(f'{len(told)} {reason} ({_WHY[reason]}: {"; ".join(told[:examples])}{more})')
  return f'Skipped {sum(map(len, skipped.values()))} of {total} prompts: {", ".join(parts)}.'
