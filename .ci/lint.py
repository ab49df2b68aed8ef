#!/usr/bin/env python3
"""CI check: exported code is within 100 columns.

The notebooks are the source: every line of a cell nbdev exports (`#| export`, `#| exports`, `#| exporti`)
must be at most 100 columns. nbdev-export copies those cells verbatim, so this is the same as checking the
library; fttk/*.py (all but the generated index _modidx.py) are checked as well, as a second guard.
Fix what it reports with `python .ci/wrap_long.py nbs/*.ipynb` (then `nbdev-export`).

Usage: python .ci/lint.py [--limit 100] [notebooks or .py files ...]   (default: nbs/*.ipynb and fttk/*.py)
"""
import argparse, ast, json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from wrap_long import LIMIT, _cell_src, is_exported

ROOT = Path(__file__).resolve().parent.parent

def long_lines(path, limit=LIMIT):
    "[(where, line number, width)] of the too-wide lines in an exported notebook cell or a library file."
    path = Path(path)
    if path.suffix == '.ipynb':
        out = []
        for c in json.loads(path.read_text(encoding='utf-8'))['cells']:
            src = _cell_src(c)
            if c['cell_type'] != 'code' or not is_exported(src): continue
            out += [(f"cell {c.get('id', '?')} ", n, len(l))
                    for n, l in enumerate(src.split('\n'), 1) if len(l) > limit]
        return out
    text = path.read_text(encoding='utf-8')
    skip = set()
    # nbdev writes two things no notebook cell holds: the module docstring (the notebook's title and
    # description) and the `__all__` list after `# %% auto` (wrapped by nbdev at 120 columns)
    for node in ast.parse(text).body:
        gen = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.lineno == 1) or \
              (isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == ['__all__'])
        if gen: skip |= set(range(node.lineno, node.end_lineno + 1))
    return [('', n, len(l)) for n, l in enumerate(text.splitlines(), 1) if len(l) > limit and n not in skip]

def default_paths(root=ROOT):
    "The notebooks, and the library files nbdev generates from them (not the index `_modidx.py`)."
    py = sorted(p for p in (root/'fttk').glob('*.py') if p.name != '_modidx.py')
    return sorted((root/'nbs').glob('*.ipynb')) + py

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('paths', nargs='*')
    p.add_argument('--limit', type=int, default=LIMIT)
    a = p.parse_args(argv)
    paths = [Path(x) for x in a.paths] or default_paths()
    bad = 0
    for path in paths:
        for where, n, w in long_lines(path, a.limit):
            print(f"{path}: {where}line {n} is {w} columns (limit {a.limit})")
            bad += 1
    if bad: print(f"{bad} exported line(s) over {a.limit} columns; fix with: "
                  "python .ci/wrap_long.py nbs/*.ipynb && nbdev-export", file=sys.stderr)
    return 1 if bad else 0

if __name__ == '__main__': sys.exit(main())
