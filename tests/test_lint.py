"""The 100-column wrapper (.ci/wrap_long.py) and check (.ci/lint.py) for exported notebook code."""
import ast, importlib.util, json, subprocess, sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

ROOT = Path(__file__).resolve().parent.parent

def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT/'.ci'/f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT/'.ci'))
    try: spec.loader.exec_module(mod)
    finally: sys.path.remove(str(ROOT/'.ci'))
    return mod

wl, lint = _load('wrap_long'), _load('lint')

def wrap(src, limit=100):
    "Wrap `src`; check the AST is unchanged, no line got longer than the limit, and a second run is a no-op."
    out, left = wl.wrap_source(src, limit)
    assert wl.ast_key(src) == wl.ast_key(out) is not None     # imports compared name by name
    assert wl.wrap_source(out, limit) == (out, left)
    assert left == [n for n, l in enumerate(out.split('\n'), 1) if len(l) > limit]
    return out, left

def test_short_lines_untouched():
    src = "def f(x):\n    if x: return 1   # aligned\n    try: y = 1\n    except E: y = 2\n    return y"
    assert wrap(src) == (src, [])

def test_only_long_lines_change():
    src = "a = 1\nb = foo(" + ", ".join(f"arg{i}" for i in range(30)) + ")\nc = 2"
    out, left = wrap(src)
    assert left == [] and out.split('\n')[0] == 'a = 1' and out.split('\n')[-1] == 'c = 2'
    assert out.split('\n')[2].startswith(' ' * len('b = foo('))       # visual indent under the bracket

def test_trailing_comment_moves_above():
    src = "def f():\n    x = compute_something(alpha, beta)                 # " + "why " * 15
    out, left = wrap(src)
    assert left == []
    assert out.split('\n')[1:] == ["    # " + ("why " * 15).rstrip(), "    x = compute_something(alpha, beta)"]

def test_comment_line_reflowed():
    src = "# " + " ".join(["word"] * 30) + "\nx = 1"
    out, left = wrap(src)
    assert left == [] and all(l.startswith('# ') for l in out.split('\n')[:-1]) and out.endswith('x = 1')
    assert ' '.join(l[2:] for l in out.split('\n')[:-1]) == ' '.join(["word"] * 30)

def test_one_liner_body_moves():
    src = ("def f(d):\n    if not isinstance(d, dict): raise ValueError(f\"needs a mapping, got "
           "{type(d).__name__} and more words here\")")
    out, left = wrap(src)
    assert left == [] and out.split('\n')[1] == "    if not isinstance(d, dict):"
    assert out.split('\n')[2].startswith("        raise ValueError(")

def test_try_except_one_liners():
    src = ("try: import yaml\nexcept ImportError as e: raise RuntimeError(\"pyyaml is needed to read configs; "
           "install it with pip install pyyaml\") from e")
    out, left = wrap(src)
    assert left == [] and out.split('\n')[0] == 'try: import yaml'
    assert out.split('\n')[1] == 'except ImportError as e:'

def test_fstring_split_keeps_fields_whole():
    src = ('def f(name, tp, value):\n    raise ConfigError(f"config field {name!r} expects {_type_name(tp)}, '
           'got {type(value).__name__:>12} {value!r:.{3}} and {{literal braces}}")')
    out, left = wrap(src, limit=70)
    assert left == []
    import io, tokenize
    pieces = [t.string for t in tokenize.generate_tokens(io.StringIO(out).readline) if t.type == tokenize.STRING]
    assert len(pieces) >= 2
    for p in pieces: compile(p, '<piece>', 'eval')          # each piece is a whole literal on its own
    assert '{{literal braces}}' in out and '{value!r:.{3}}' in out

def test_fstring_prefix_only_where_needed():
    src = 'x = foo(f"{a} ' + 'plain words ' * 8 + 'end", b)'
    out, _ = wrap(src)
    second = out.split('\n')[1].strip()
    assert second.startswith('"') and not second.startswith('f"')        # no field: no f prefix
    assert out.split('\n')[0].split('(', 1)[1].startswith('f"')

def test_raw_and_escapes_kept():
    src = 'pat = compile(r"\\d+ \\s* ' + 'words and more ' * 6 + '\\w+", flags)\nmsg = foo("tab\\there ' + \
          'x ' * 40 + '\\N{BULLET} end")'
    out, left = wrap(src)
    assert left == []
    assert all(l.lstrip().startswith(('pat', 'msg', 'r"', '"')) for l in out.split('\n'))
    assert '\\N{BULLET}' in out

def test_nested_brackets_visual_indent():
    src = ("result = outer(first_argument, inner(alpha, beta, gamma), [item_one, item_two, item_three], "
           "key=value_of_key)")
    out, left = wrap(src)
    assert left == [] and out.split('\n')[1].startswith(' ' * len('result = outer('))

def test_rhs_wrapped_in_parens():
    src = "total = first_quantity_of_something + second_quantity_of_something + third_quantity + fourth_one_more"
    out, left = wrap(src)
    assert left == [] and out.startswith('total = (first_quantity') and out.endswith(')')

def test_docstring_split_keeps_doc():
    src = 'def f():\n    "' + 'A docstring that is rather long ' * 4 + '."\n    return 1'
    out, left = wrap(src)
    assert left == []
    ns = {}; exec(out, ns); exec(src, ns2 := {})
    assert ns['f'].__doc__ == ns2['f'].__doc__

def test_import_split():
    src = "import " + ", ".join(f"module_number_{i}" for i in range(10))
    out, left = wrap(src)
    assert left == [] and all(l.startswith('import ') for l in out.split('\n'))

def test_from_import_parenthesized():
    src = "from fttk.world import " + ", ".join(f"name_{i}" for i in range(16))
    out, left = wrap(src)
    assert left == [] and out.startswith('from fttk.world import (name_0')

def test_semicolon_statements_split():
    src = "def f():\n    ax.set_xlabel('optimizer step'); ax.set_ylabel('train loss (assistant tokens)'); ax.set_title(title)"
    out, left = wrap(src)
    assert left == [] and out.split('\n')[-1] == '    ax.set_title(title)'

def test_unfixable_line_left_alone():
    "Inside a multi-line template string every character counts: the line is reported, the cell unchanged."
    src = 'TEMPLATE = """first line\n' + ' '.join(['Ada'] * 40) + '\n"""\nx = 1'
    assert wrap(src) == (src, [2])

def test_word_list_and_docstring_reflowed():
    "Where whitespace only separates words (a `.split()` word list, a docstring) long lines break at a space."
    src = ('NAMES = """Ada Alan\n' + ' '.join(['Ada'] * 40) + '\nZeno""".split()\n'
           'def f():\n    """Doc line one ' + 'word ' * 25 + 'end.\n    - a list item stays."""\n    return 1')
    out, left = wrap(src)
    assert left == []
    ns, ns2 = {}, {}
    exec(out, ns); exec(src, ns2)
    assert ns['NAMES'] == ns2['NAMES'] and ns['f'].__doc__.split() == ns2['f'].__doc__.split()
    assert '\n    - a list item stays.' in out

def test_no_break_inside_comprehension_target():
    src = "row = {'step': step, **{key_name: (value.item() if hasattr(value, 'item') else value) for key_name, value in m.items()}}"
    out, left = wrap(src)
    assert 'for key_name, value in' in out

def test_unparsable_cell_untouched():
    src = "%timeit " + "x" * 120
    assert wl.wrap_source(src) == (src, [1])

REAL_LINES = [
    '        raise PermissionError(f"fttk cache directory {p} cannot be created ({e.strerror}); set FTTK_CACHE to a writable folder") from e',
    "    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available(): return torch.device('mps')",
    "        self._special_re = (regex.compile('(' + '|'.join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ')')\n                            if self.special_tokens else None)",
    "    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, max(1, int(cfg.warmup_ratio * total)), cfg.min_lr_ratio))",
    '            raise FileNotFoundError(f"cannot resume: run folder {self.path} has no complete checkpoint "\n                                    f"(checkpoints/step_*/COMPLETE); it holds {\', \'.join(held) or \'nothing\'}")',
]

@pytest.mark.parametrize('body', REAL_LINES)
def test_real_lines(body):
    src = 'def f(self):\n    if True:\n' + '\n'.join('    ' + l for l in body.split('\n'))
    out, left = wrap(src)
    assert left == []

_words = st.text(alphabet='abc {}!:x', min_size=1, max_size=12)
@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(['alpha', 'beta_gamma', 'f(x, y)', '[1, 2, 3]', '"a string with spaces"',
                                 'f"{x!r:>8} and {y} words"', "r'\\d+ \\w'", 'a + b * c', 'not q', '{k: v}',
                                 "'x' if c else 'y'", '(lambda z, w: z)']), min_size=3, max_size=16),
       st.integers(0, 12), st.sampled_from(['x = ', 'return ', 'foo(', 'if c: y = ', '    z += ']))
def test_ast_unchanged_fuzz(parts, indent, head):
    "Any wrap the tool makes keeps the AST; it never makes a line longer; a second run changes nothing."
    expr = ', '.join(parts)
    line = head + ('[' + expr + ']' if head != 'foo(' else expr + ')')
    src = ('def g():\n' + ' ' * (4 + indent) + line.lstrip()) if head.startswith(('return', '    ')) else line
    if head.startswith('    '): src = 'def g():\n    z = 0\n    z += [' + expr + ']'
    out, left = wrap(src, limit=60)
    assert max(map(len, out.split('\n'))) <= max(max(map(len, src.split('\n'))), 60)

def test_notebook_roundtrip(tmp_path):
    "Only exported cells change; ids, outputs and other cells stay; the file stays nbdev's JSON format."
    long = "x = foo(" + ", ".join(f"argument_{i}" for i in range(20)) + ")"
    cells = [{'cell_type': 'code', 'id': 'aaaa0001', 'metadata': {}, 'execution_count': None, 'outputs': [],
              'source': ['#| export\n', long]},
             {'cell_type': 'code', 'id': 'aaaa0002', 'metadata': {}, 'execution_count': None, 'outputs': [],
              'source': [long]},
             {'cell_type': 'markdown', 'id': 'aaaa0003', 'metadata': {}, 'source': ['# ' + 'y' * 150]}]
    nb = tmp_path/'t.ipynb'
    nb.write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}, indent=1) + '\n')
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'lint.py'), str(nb)], capture_output=True, text=True)
    assert r.returncode == 1 and 'cell aaaa0001 line 2 is' in r.stdout and 'aaaa0002' not in r.stdout
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'wrap_long.py'), '--check', str(nb)], capture_output=True, text=True)
    assert r.returncode == 1
    subprocess.run([sys.executable, str(ROOT/'.ci'/'wrap_long.py'), str(nb)], check=True, capture_output=True)
    new = json.loads(nb.read_text())
    assert [c['id'] for c in new['cells']] == ['aaaa0001', 'aaaa0002', 'aaaa0003']
    assert new['cells'][1]['source'] == [long] and new['cells'][2] == cells[2]
    assert all(len(l.rstrip('\n')) <= 100 for l in new['cells'][0]['source'])
    assert nb.read_text().endswith('}\n')
    assert subprocess.run([sys.executable, str(ROOT/'.ci'/'lint.py'), str(nb)]).returncode == 0

def test_exported_code_within_100_columns():
    "The style rule itself: every exported notebook line (and fttk/*.py) is at most 100 columns."
    bad = [(str(p.relative_to(ROOT)), where, n, w) for p in lint.default_paths() for where, n, w in lint.long_lines(p)]
    assert not bad, f"{len(bad)} exported lines over 100 columns (run python .ci/wrap_long.py nbs/*.ipynb): {bad[:10]}"
