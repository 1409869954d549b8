"""`charred.evaluate --prompts_file`: parsing, skipping what the run cannot take, end to end."""

import json

import pytest

from charred import tokenizer
from charred.datasets import render
from charred.evaluation import prompts_file
from conftest import run_cli

GOOD = [('A sign that says "hello".', 'hello'), ('A sign: "Big Sale" in red', 'Big Sale'),
        ('a poster', 'ONE two  three')]


def _write(tmp_path, text, name='prompts.tsv'):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


def test_good_file_parses_in_order_keeping_multi_word_texts(tmp_path):
  path = _write(tmp_path, '# prompt<TAB>expected\n\n' +
                ''.join(f'{p}\t{t}\n' for p, t in GOOD) + '\n  \n')
  assert prompts_file.read_prompts(path) == GOOD


def test_windows_line_ends_and_surrounding_spaces_are_not_part_of_the_texts(tmp_path):
  path = _write(tmp_path, ' A sign \t hello \r\nno newline at the end\tbye')
  assert prompts_file.read_prompts(path) == [('A sign', 'hello'), ('no newline at the end', 'bye')]


@pytest.mark.parametrize('bad, what', [
    ('A sign that says hello', 'no tab'),
    ('A sign that says "hello".\t', 'empty expected text'),
    ('A sign that says "".\t""', "empty expected text '\"\"'"),  # nothing left for OCR
    ('\thello', 'empty prompt'),
    ('   \thello', 'empty prompt'),
    ('a\tb\tc', '2 tabs'),
])
def test_a_bad_line_is_named_by_its_number(tmp_path, bad, what):
  # Line 4: after a comment, a good line and a blank one, which count as lines too.
  path = _write(tmp_path, f'# header\nA sign\thi\n\n{bad}\nA sign\tlater\n')
  with pytest.raises(ValueError) as e:
    prompts_file.read_prompts(path)
  message = str(e.value)
  assert message.startswith(f'{path}, line 4: {what}') and '\n' not in message


def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path):
  path = tmp_path / 'p.tsv'
  path.write_bytes(b'A sign\thi\nA sign\th\xffi\n')
  with pytest.raises(ValueError, match=rf'^{path}, line 2: .*utf-8'):
    prompts_file.read_prompts(str(path))


@pytest.mark.parametrize('text', ['', '\n\n# only comments\n'])
def test_a_file_without_prompts_is_an_error(tmp_path, text):
  path = _write(tmp_path, text)
  with pytest.raises(ValueError, match='holds no prompts'):
    prompts_file.read_prompts(path)


def _mono_codepoints():
  return prompts_file.drawable_codepoints([render.font_path(f) for f in render.MONO_FONTS])


def test_missing_glyphs_in_dejavu_sans_mono():
  codepoints = _mono_codepoints()
  assert prompts_file.missing_glyphs('Héllo, wörld — ÆØÅ ß', codepoints) == ''
  assert prompts_file.missing_glyphs('a\t永 b 😀永', codepoints) == '永😀'
  assert prompts_file.missing_glyphs(' \t\n', codepoints) == ''  # whitespace needs no glyph


def test_too_long_and_glyphless_prompts_are_skipped_and_counted():
  too_long = ('A sign that says "' + 'x' * 40 + '".', 'x' * 40)
  pairs = [GOOD[0], too_long, ('A sign that says "永".', '永'), GOOD[1],
           ('A sign with an emoji', 'hi 😀'), GOOD[2], ('x' * 60, '永')]
  kept, skipped = prompts_file.screen(pairs, num_tokens=tokenizer.num_tokens, text_length=32,
                                      codepoints=_mono_codepoints())
  assert kept == GOOD  # the others, in order
  # Too long and glyphless at once counts once, as too long.
  assert prompts_file.skip_counts(skipped) == {
      'num_skipped': 4, 'num_skipped/too_long': 2, 'num_skipped/no_glyph': 2}
  summary = prompts_file.skip_summary(skipped, len(pairs), examples=1)
  assert summary.startswith('Skipped 4 of 7 prompts: 2 too_long (')
  assert '61 tokens > 32' in summary and '1 more' in summary and "no glyph for '永'" in summary
  assert '😀' not in summary and '\n' not in summary  # one example per reason


def test_the_token_limit_is_inclusive_of_eos():
  kwargs = dict(num_tokens=tokenizer.num_tokens, codepoints=_mono_codepoints())
  assert prompts_file.skip_reason('x' * 31, 'x', text_length=32, **kwargs) is None
  assert prompts_file.skip_reason('x' * 32, 'x', text_length=32, **kwargs)[0] == 'too_long'


def test_a_phrase_takes_the_bucket_of_its_rarest_word():
  from charred import evaluate  # pylint: disable=g-import-not-at-top
  pairs = [('p', 'the'), ('q', 'The qzxvw'), ('r', 'Old Bakery'), ('s', 'quokka Tavern')]
  targets = evaluate.prompts_targets(pairs)
  assert [t.bucket for t in targets] == ['frequent', 'unseen', 'common', 'rare']
  assert [(t.prompt, t.text) for t in targets] == pairs


def _error_lines(proc):
  return [l for l in proc.stderr.splitlines() if ': error: ' in l]


def test_words_file_and_prompts_file_together_is_one_usage_error(tmp_path):
  path = _write(tmp_path, 'A sign\thi\n')
  proc = run_cli('evaluate', f'--workdir={tmp_path}', f'--words_file={path}',
                 f'--prompts_file={path}', check=False)
  assert proc.returncode != 0
  assert len(_error_lines(proc)) == 1 and 'exclude each other' in proc.stderr


def test_a_bad_file_fails_before_the_run_loads(tmp_path):
  path = _write(tmp_path, 'A sign\thi\nA sign hi\n')
  # No run there at all: the file's error comes first.
  proc = run_cli('evaluate', f'--workdir={tmp_path / "no_run"}', f'--prompts_file={path}',
                 check=False)
  assert proc.returncode != 0
  assert [l.split(': error: ')[1] for l in _error_lines(proc)] == [
      f"{path}, line 2: no tab; expected one, as <prompt><TAB><expected text>: 'A sign hi'"]


@pytest.mark.slow
def test_evaluate_prompts_file_end_to_end(micro_run, tmp_path):
  path = _write(tmp_path, ''.join(f'{p}\t{t}\n' for p, t in [
      GOOD[0], ('A sign that says "永".', '永'), ('A sign', 'Old Bakery'), ('x' * 40, 'x')]))
  grid = tmp_path / 'grid.png'
  proc = run_cli('evaluate', f'--workdir={micro_run}', f'--prompts_file={path}', '--steps=2',
                 f'--samples_png={grid}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['num_words'] == 2 and result['num_skipped'] == 2
  assert result['num_skipped/too_long'] == 1 and result['num_skipped/no_glyph'] == 1
  for key in ('exact_match', 'ned', 'char_accuracy', 'ceiling/exact_match', 'cer/len_5',
              'exact_match/frequent', 'exact_match/common', 'validation/loss'):
    assert key in result, key
  assert grid.exists()
  summary = [l for l in proc.stderr.splitlines() if l.startswith('Skipped ')]
  assert len(summary) == 1 and summary[0].startswith('Skipped 2 of 4 prompts: 1 too_long')


@pytest.mark.slow
def test_evaluate_malformed_or_unusable_file_writes_nothing(micro_run, tmp_path):
  grid = tmp_path / 'grid.png'
  malformed = _write(tmp_path, 'A sign\thi\nA sign\t\n', 'malformed.tsv')
  proc = run_cli('evaluate', f'--workdir={micro_run}', f'--prompts_file={malformed}',
                 f'--samples_png={grid}', check=False)
  assert proc.returncode != 0 and not grid.exists() and not proc.stdout.strip()
  assert [f'{malformed}, line 2: empty expected text' in l for l in _error_lines(proc)] == [True]
  unusable = _write(tmp_path, 'A sign\t永\n' + 'x' * 40 + '\thi\n', 'unusable.tsv')
  proc = run_cli('evaluate', f'--workdir={micro_run}', f'--prompts_file={unusable}',
                 f'--samples_png={grid}', check=False)
  assert proc.returncode == 1 and not grid.exists() and not proc.stdout.strip()
  (line,) = _error_lines(proc)
  assert 'Skipped 2 of 2 prompts' in line and 'no prompt of' in line
