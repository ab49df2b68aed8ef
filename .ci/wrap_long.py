#!/usr/bin/env python3
"""Wrap exported notebook code to 100 columns, touching only the lines that are wider.

fttk's house style is compact (one-line `if x: return y`, `try: a` / `except E: b`, aligned comments), which
black/ruff format would rewrite wholesale, so this is a small, careful wrapper instead. For every physical
line wider than the limit in a cell exported by nbdev (`#| export`, `#| exports`, `#| exporti`) it tries, in
order: reflow a long comment line; move a trailing comment to its own line above; move the body of a
one-line compound statement (`if c: body`) to its own line; split a long string literal into adjacent
literals; break after a top-level comma (or before an operator) inside the innermost bracket spanning the
limit, continuing one column after the bracket (PEP 8 visual indent); split `import a, b, ...`; wrap a
right-hand side in parentheses and break that. Every step is kept only if the cell's AST is unchanged
(imports are compared name by name), so the exported code behaves the same; a line no step can fix (e.g.
inside a triple-quoted string) is left alone and reported. Running it twice changes nothing.

Usage: python .ci/wrap_long.py nbs/*.ipynb          # rewrite in place, report per notebook
       python .ci/wrap_long.py --check nbs/*.ipynb  # report only; exit 1 if an exported line is too long
"""
import argparse, ast, io, json, re, sys, tokenize
from pathlib import Path

LIMIT = 100
_EXPORT = re.compile(r'^\s*#\s*\|\s*export[si]?\b')
_OPEN, _CLOSE = '([{', ')]}'
_BREAK_OPS = {'and', 'or', 'if', 'else', 'for', '+', '-', '*', '/', '//', '%', '@', '|', '&', '==', '!=',
              '<', '>', '<=', '>=', '->'}
_COMPOUND = {'if', 'elif', 'else', 'for', 'while', 'try', 'except', 'finally', 'with', 'def', 'class'}

def is_exported(src: str) -> bool:
    "Does this cell's nbdev directive block (its leading `#|` lines) say export/exports/exporti?"
    for line in src.splitlines():
        if not line.strip(): continue
        if not re.match(r'\s*#\s*\|', line): return False
        if _EXPORT.match(line): return True
    return False

# ---------------------------------------------------------------- AST equality (the safety net)
def _flatten_imports(tree):
    "`import a, b` and `import a` + `import b` are the same program: compare imports name by name."
    for node in ast.walk(tree):
        for field in ('body', 'orelse', 'finalbody'):
            body = getattr(node, field, None)
            if not isinstance(body, list): continue
            new = []
            for st in body:
                if isinstance(st, ast.Import): new += [ast.Import(names=[a]) for a in st.names]
                else: new.append(st)
            setattr(node, field, new)
        if isinstance(node, ast.Try):
            for h in node.handlers: _flatten_imports(ast.Module(body=h.body, type_ignores=[]))
    return tree

class _Blank(ast.NodeTransformer):
    """Where only whitespace counts, compare whitespace-normalized text: docstrings (rendered as markdown,
    where a line break inside a paragraph is a space) and `'''word word ...'''.split()` word lists."""
    def _doc(self, node):
        b = node.body
        if b and isinstance(b[0], ast.Expr) and isinstance(b[0].value, ast.Constant) and \
           isinstance(b[0].value.value, str): b[0].value.value = ' '.join(b[0].value.value.split())
        self.generic_visit(node)
        return node
    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _doc
    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == 'split' and not node.args and not node.keywords and \
           isinstance(f.value, ast.Constant) and isinstance(f.value.value, str):
            f.value.value = ' '.join(f.value.value.split())
        self.generic_visit(node)
        return node

def ast_key(src: str):
    "The cell's AST as text, or None if it does not parse (then the cell is never touched)."
    try: return ast.dump(_Blank().visit(_flatten_imports(ast.parse(src))))
    except (SyntaxError, ValueError): return None

_TRIPLE = re.compile(r'[A-Za-z]*("""|' + "''')")

def fix_blank_string(lines, i, limit, v):
    """A line inside a triple-quoted docstring or `'''...'''.split()` word list: break it at a space
    (whitespace there means no more than a space). Other triple-quoted strings are left alone."""
    row = i + 1
    ks = [k for k, t in enumerate(v.toks) if t.type == tokenize.STRING and t.start[0] <= row <= t.end[0]
          and _TRIPLE.match(t.string)]
    if not ks: return None
    k = ks[0]
    t = v.toks[k]
    nxt = [x.string for x in v.toks[k + 1:k + 5]]
    prev = v.toks[k - 1] if k else None
    is_split = nxt == ['.', 'split', '(', ')']
    is_doc = (prev is None or prev.type in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.DEDENT)) \
        and k + 1 < len(v.toks) and v.toks[k + 1].type == tokenize.NEWLINE and _is_docstring(lines, t.start[0])
    if not (is_split or is_doc): return None
    line = lines[i]
    lo = t.start[1] + 4 if row == t.start[0] else _indent(line) + 1
    cut = line.rfind(' ', lo, limit + 1)
    if cut < 0: return None
    rest = line[cut:].strip()
    if not rest or _TRIPLE.match(rest) or (is_doc and re.match(r'([-*+>#|]|\d+[.)])(\s|$)', rest)): return None
    ind = 0 if is_split else (t.start[1] if row == t.start[0] else _indent(line))
    if row < t.end[0]:              # the rest joins the next line of the string: a word list, or the rest
        nl = lines[i + 1]           # of a docstring paragraph, is re-packed (to its blank line or list item)
        joined = nl[:_indent(nl)] + rest + ' ' + nl.lstrip()
        if nl.strip() and (is_split or not re.match(r'([-*+>#|]|\d+[.)])(\s|$)', nl.lstrip())):
            return lines[:i] + [line[:cut].rstrip(), joined] + lines[i + 2:]
    return lines[:i] + [line[:cut].rstrip(), ' ' * ind + rest] + lines[i + 1:]

def _is_docstring(lines, row):
    "Is the statement starting on `row` the docstring of a module, class or function?"
    tree = ast.parse('\n'.join(lines))
    for node in ast.walk(tree):
        b = getattr(node, 'body', None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and b and \
           isinstance(b[0], ast.Expr) and isinstance(b[0].value, ast.Constant) and b[0].lineno == row: return True
    return False

# ---------------------------------------------------------------- token view of a cell
class View:
    "Tokens of `lines` with, for each token, the stack of open-bracket token indices around it."
    def __init__(self, lines):
        self.lines = lines
        self.toks = list(tokenize.generate_tokens(io.StringIO('\n'.join(lines) + '\n').readline))
        self.stack, stack, self.lstart, start = [], [], [], None
        for k, t in enumerate(self.toks):
            if t.type == tokenize.OP and t.string in _CLOSE and stack: stack.pop()
            self.stack.append(tuple(stack))
            if t.type == tokenize.OP and t.string in _OPEN: stack.append(k)
            if start is None and t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
                                                 tokenize.DEDENT, tokenize.NEWLINE): start = k
            self.lstart.append(start)
            if t.type == tokenize.NEWLINE or (t.type == tokenize.NL and not stack): start = None

    def on_row(self, row):
        "Indices of the tokens that start on 1-based `row` (no NL/NEWLINE)."
        return [k for k, t in enumerate(self.toks) if t.start[0] == row
                and t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]

    def spanned(self, row):
        "Is `row` (partly) inside a token that starts on an earlier row (a multi-line string)?"
        return any(t.start[0] < row <= t.end[0] and t.type not in (tokenize.NL, tokenize.NEWLINE)
                   for t in self.toks)

def _indent(line): return len(line) - len(line.lstrip())

# ---------------------------------------------------------------- the fixes; each returns new lines or None
def fix_comment_line(lines, i, limit, v):
    "A comment-only line: break at the last space that fits; the rest joins the next comment line if it fits."
    line = lines[i]
    text = line.lstrip()
    if not text.startswith('#') or re.match(r'#\s*\|', text) or v.spanned(i + 1): return None
    m = re.match(r'#+\s*', text)
    head = _indent(line) + m.end()
    cut = line.rfind(' ', head + 10, limit + 1)
    if cut < 0: return None
    left, rest = line[:cut].rstrip(), line[cut:].strip()
    if not rest: return None
    prefix = line[:_indent(line)] + text[:m.end()]
    nxt = lines[i + 1] if i + 1 < len(lines) else ''
    if (nxt.startswith(prefix) and nxt[len(prefix):].strip() and nxt[len(prefix):len(prefix) + 1] not in ' -*|'
        and _indent(nxt) == _indent(line) and len(prefix + rest + ' ' + nxt[len(prefix):]) <= limit):
        return lines[:i] + [left, prefix + rest + ' ' + nxt[len(prefix):]] + lines[i + 2:]
    return lines[:i] + [left, prefix + rest] + lines[i + 1:]

def fix_trailing_comment(lines, i, limit, v):
    "Move a trailing comment to its own line above, at the statement's (or this line's) indentation."
    row, ks = i + 1, v.on_row(i + 1)
    if len(ks) < 2 or v.toks[ks[-1]].type != tokenize.COMMENT or v.spanned(row): return None
    c = v.toks[ks[-1]]
    code = lines[i][:c.start[1]].rstrip()
    first = ks[0]
    ind = v.toks[first].start[1] if v.lstart[first] == first else _indent(lines[i])
    return lines[:i] + [' ' * ind + c.string.rstrip(), code] + lines[i + 1:]

def fix_one_liner(lines, i, limit, v):
    "`if cond: body` (also for/while/try/except/with/def/...): the body moves to its own indented line."
    row, ks = i + 1, v.on_row(i + 1)
    if not ks or v.lstart[ks[0]] != ks[0] or v.spanned(row): return None
    t0 = v.toks[ks[0]]
    if t0.type != tokenize.NAME or t0.string not in _COMPOUND: return None
    depth, lam, colon = v.stack[ks[0]], 0, None
    for k in ks[1:]:
        t = v.toks[k]
        if v.stack[k] != depth: continue
        if t.string == 'lambda': lam += 1
        elif t.type == tokenize.OP and t.string == ':':
            if lam: lam -= 1
            else: colon = k; break
    if colon is None: return None
    rest = [k for k in ks if k > colon and v.toks[k].type != tokenize.COMMENT]
    if not rest: return None
    header = lines[i][:v.toks[colon].end[1]].rstrip()
    if len(header) > limit: return None
    body_col, new_ind = v.toks[rest[0]].start[1], t0.start[1] + 4
    out = lines[:i] + [header, ' ' * new_ind + lines[i][body_col:]]
    # continuation rows of the same statement keep their alignment relative to the moved body
    end_row = max(t.end[0] for k, t in enumerate(v.toks) if v.lstart[k] == ks[0])
    delta = new_ind - body_col
    for r in range(row + 1, end_row + 1):
        ln = lines[r - 1]
        if ln.strip() and not v.spanned(r): ln = ' ' * max(new_ind, _indent(ln) + delta) + ln.lstrip()
        out.append(ln)
    return out + lines[end_row:]

def _split_string(tok, col_budget):
    "Split a one-line string token (text `tok`) into (piece1, piece2) with len(piece1) <= col_budget, or None."
    m = re.match(r'([A-Za-z]*)(["\'])', tok)
    if not m or '\n' in tok: return None
    prefix, q = m.group(1), m.group(2)
    if tok.startswith(q * 3, m.start(2)): q = q * 3              # a one-line triple-quoted string
    body = tok[len(prefix) + len(q):-len(q)]
    is_f, raw = 'f' in prefix.lower(), 'r' in prefix.lower()
    ok, bars, j, depth = [], [], 0, 0                # ok: indices where a split *after* body[j] is allowed
    while j < len(body):
        ch = body[j]
        if depth == 0 and ch == '\\':
            if not raw and body[j + 1:j + 2] == 'N' and body[j + 2:j + 3] == '{': j = body.index('}', j) + 1
            else: j += 2
            continue
        if is_f and depth == 0 and ch in '{}' and body[j + 1:j + 2] == ch: j += 2; continue
        if is_f and ch == '{': depth += 1
        elif is_f and ch == '}': depth -= 1
        elif depth and ch in '\'"':
            j = body.index(ch, j + 1) + 1; continue
        elif depth == 0 and ch == ' ' and body[j + 1:j + 2] not in (' ', ''): ok.append(j)
        elif depth == 0 and ch == '|': bars.append(j)          # a regex alternation, when no space will do
        j += 1
    fit = lambda js: [j for j in js if len(prefix) + 2 * len(q) + j + 1 <= col_budget and j >= 8]
    ok = (fit(bars) or fit(ok)) if raw else (fit(ok) or fit(bars))
    if not ok: return None
    j = ok[-1]
    a, b = body[:j + 1], body[j + 1:]
    def piece(s):
        p = prefix if (not is_f or '{' in s or '}' in s) else re.sub('[fF]', '', prefix)
        return p + q + s + q
    return piece(a), piece(b)

def fix_string(lines, i, limit, v, depth0=False):
    """A string literal inside brackets that crosses the limit (or the last one before the code that does):
    split it into adjacent literals at a space, the rest aligned under the literal's start."""
    row, line = i + 1, lines[i]
    x = _cross(v, row, limit)
    if x is None or v.spanned(row): return None
    strs = [k for k in v.on_row(row) if v.toks[k].type == tokenize.STRING and v.toks[k].end[0] == row
            and v.toks[k].start[1] < limit - 10 and k <= x]
    if not strs: return None
    k = strs[-1]
    t = v.toks[k]
    if len(t.string) < 30: return None                    # splitting a short literal reads worse than a break
    if not v.stack[k] and not depth0: return None
    parts = _split_string(t.string, limit - t.start[1])
    if not parts: return None
    col = t.start[1]
    return lines[:i] + [line[:col] + parts[0], ' ' * col + parts[1] + line[t.end[1]:]] + lines[i + 1:]

def _cross(v, row, limit):
    "The first code token on `row` that ends past the limit."
    for k in v.on_row(row):
        t = v.toks[k]
        if t.type != tokenize.COMMENT and t.end[1] > limit: return k
    return None

def _cont_col(v, o, row, line):
    t = v.toks[o]
    return t.start[1] + 1 if t.start[0] == row else _indent(line)

def fix_comma(lines, i, limit, v, only_fitting=False):
    """Break inside a bracket: after a top-level comma or before an operator (continuing one column after the
    bracket, PEP 8 visual indent), or right after the bracket (hanging indent). The candidate kept: both lines
    fit if possible; then the outermost bracket; commas before operators before hanging breaks; the latest."""
    row, line = i + 1, lines[i]
    x = _cross(v, row, limit)
    if x is None or v.spanned(row): return None
    ks = v.on_row(row)
    code = [k for k in ks if v.toks[k].type != tokenize.COMMENT]
    opens = sorted({o for k in code for o in v.stack[k]} | {k for k in code if v.toks[k].string in _OPEN})
    start = ks[0] if v.lstart[ks[0]] == ks[0] else None
    hang = _indent(line) + (8 if start is not None and v.toks[start].string in _COMPOUND else 4)
    cands = []                                        # (fits, depth, kind, -col, col, continuation col)
    for o in opens:
        t_o, level = v.toks[o], v.stack[o] + (o,)
        cc = _cont_col(v, o, row, line)
        inside = [n for n, k in enumerate(code) if v.stack[k] == level]
        binding = False                               # between `for` and `in`, or `lambda` and `:`
        for n in inside:
            k, t = code[n], v.toks[code[n]]
            if t.string in ('for', 'lambda'): binding = True
            elif t.string in ('in', ':'): binding = False
            if n + 1 >= len(code): continue
            if t.string == ',' and not binding: kind, c = 0, t.end[1]
            elif t.string in _BREAK_OPS and v.toks[code[n - 1]].string not in _OPEN + ',=:' and \
                 not (v.toks[code[n - 1]].type == tokenize.OP and v.toks[code[n - 1]].string not in _CLOSE):
                kind, c = 1, t.start[1]
            else: continue
            if c - cc < 20: continue                  # `isinstance(x,` / `max(1,`: too little on the first line
            cands.append((kind, c, cc, len(v.stack[o]), level))
        closes = [k for k in code if k > o and v.stack[k] == v.stack[o] and v.toks[k].string in _CLOSE]
        if closes and t_o.start[0] == row and o + 1 < len(v.toks) and v.toks[o + 1].start[0] == row and \
           v.toks[o + 1].type not in (tokenize.COMMENT, tokenize.NL) and v.toks[o + 1].string not in _CLOSE:
            cands.append((2, t_o.end[1], hang, len(v.stack[o]), level))
    best = None
    for kind, c, cc, depth, level in cands:
        first, second = line[:c].rstrip(), ' ' * cc + line[c:].lstrip()
        if len(first) > limit or len(second) >= len(line): continue
        fits = len(second) <= limit
        if not fits and cc > limit // 2: continue    # far right and still too long: it would only get worse
        if only_fitting and not fits: continue
        key = (not fits, depth, kind, -c)
        if best is None or key < best[0]: best = (key, first, second, cc, level)
    if best is None: return None
    _, first, second, cc, level = best
    # a short remainder joins the next line when that one continues the same bracket at the same column,
    # so an argument list is re-packed instead of leaving `pad_token=PAD,` alone on a line
    nxt = v.on_row(row + 1)
    if len(second.strip()) < 40 and i + 1 < len(lines) and nxt and v.stack[nxt[0]] == level and \
       not v.spanned(row + 1) and second.rstrip().endswith(','):
        nl = lines[i + 1]
        return lines[:i] + [first, nl[:_indent(nl)] + second.strip() + ' ' + nl.lstrip()] + lines[i + 2:]
    return lines[:i] + [first, second] + lines[i + 1:]

def fix_semicolon(lines, i, limit, v):
    "`a; b` on one line (not the body of a one-liner): split at the last `;` that leaves a fitting line."
    row, ks = i + 1, v.on_row(i + 1)
    if not ks or v.lstart[ks[0]] != ks[0] or v.spanned(row) or v.toks[ks[0]].string in _COMPOUND: return None
    semis = [k for k in ks if v.toks[k].string == ';' and not v.stack[k] and v.toks[k].end[1] <= limit + 1]
    if not semis: return None
    t = v.toks[semis[-1]]
    rest = lines[i][t.end[1]:].strip()
    if not rest or rest.startswith('#'): return None
    return lines[:i] + [lines[i][:t.start[1]].rstrip(), ' ' * v.toks[ks[0]].start[1] + rest] + lines[i + 1:]

def fix_import(lines, i, limit, v):
    "`import a, b, c, ...` too long: several `import` lines, names packed greedily."
    line = lines[i]
    m = re.match(r'(\s*)import\s+(.*?)\s*$', line)
    if not m or '#' in line or '(' in line: return None
    names, out, cur = [s.strip() for s in m.group(2).split(',')], [], []
    for n in names:
        if cur and len(f"{m.group(1)}import {', '.join(cur + [n])}") > limit: out.append(cur); cur = []
        cur.append(n)
    out.append(cur)
    return lines[:i] + [f"{m.group(1)}import {', '.join(c)}" for c in out] + lines[i + 1:]

def fix_wrap(lines, i, limit, v):
    "No bracket to break in: parenthesize the right-hand side (after `=`, `return`, ...), then break inside."
    row, ks = i + 1, v.on_row(i + 1)
    if not ks or v.lstart[ks[0]] != ks[0] or v.spanned(row) or v.stack[ks[0]]: return None
    code = [k for k in ks if v.toks[k].type != tokenize.COMMENT]
    if max(v.toks[k].end[0] for k in code) != row or v.toks[code[-1]].string == ':': return None
    t0, s = v.toks[code[0]], None
    if t0.string in ('return', 'yield'): s = code[1] if len(code) > 1 else None
    elif t0.string == 'assert':
        commas = [k for k in code if v.toks[k].string == ',' and not v.stack[k]]
        s = commas[0] + 1 if commas else None
    elif t0.string == 'from':
        imp = [k for k in code if v.toks[k].string == 'import']
        s = imp[0] + 1 if imp and v.toks[imp[0] + 1].string != '(' else None
    elif t0.type == tokenize.NAME and t0.string in _COMPOUND | {'raise', 'import', 'del', 'global'}: return None
    else:
        eqs = [k for k in code if not v.stack[k] and v.toks[k].type == tokenize.OP and v.toks[k].string.endswith('=')
               and v.toks[k].string not in ('==', '!=', '<=', '>=')]
        s = eqs[-1] + 1 if eqs else code[0]
    if s is None or s > code[-1]: return None
    a, b = v.toks[s].start[1], v.toks[code[-1]].end[1]
    line = lines[i]
    lines = lines[:i] + [line[:a] + '(' + line[a:b] + ')' + line[b:]] + lines[i + 1:]
    # keep the parentheses only if breaking inside them makes the whole statement fit
    j, end = i, i + 1
    while j < end:
        if len(lines[j]) <= limit: j += 1; continue
        w = View(lines)
        new = fix_string_any(lines, j, limit, w) or fix_comma(lines, j, limit, w)
        if not new or end - i > 20: return None
        lines, end = new, end + len(new) - len(lines)
    return lines

def fix_string_any(lines, i, limit, v): return fix_string(lines, i, limit, v, depth0=True)

def fix_bracket(lines, i, limit, v):
    "A comma break that makes both lines fit; else a string split; else the best comma/operator break."
    return fix_comma(lines, i, limit, v, only_fitting=True) or fix_string(lines, i, limit, v) or \
        fix_comma(lines, i, limit, v)

STEPS = (fix_blank_string, fix_comment_line, fix_trailing_comment, fix_one_liner, fix_semicolon, fix_bracket, fix_import, fix_wrap)

def wrap_source(src: str, limit: int = LIMIT):
    "Wrap the lines of `src` wider than `limit`. Returns (new source, rows (1-based) still too wide)."
    key = ast_key(src)
    if key is None: return src, [n + 1 for n, l in enumerate(src.split('\n')) if len(l) > limit]
    lines, i, guard = src.split('\n'), 0, 0
    while i < len(lines) and guard < 10_000:
        guard += 1
        if len(lines[i]) <= limit: i += 1; continue
        try: v = View(lines)
        except (tokenize.TokenError, IndentationError, SyntaxError): break
        new = None
        for step in STEPS:
            cand = step(lines, i, limit, v)
            if cand and cand != lines and ast_key('\n'.join(cand)) == key: new = cand; break
        if new is None: i += 1
        else: lines = new
    out = '\n'.join(lines)
    if ast_key(out) != key: out = src            # never happens by construction; the last guard
    return out, [n + 1 for n, l in enumerate(out.split('\n')) if len(l) > limit]

# ---------------------------------------------------------------- notebooks
def _cell_src(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

def process_notebook(path, check=False, limit=LIMIT):
    "Wrap (or only check) the exported cells of one notebook. Returns (fixed, [(cell id, line, text)])."
    nb = json.loads(Path(path).read_text(encoding='utf-8'))
    fixed, left, changed = 0, [], False
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        src = _cell_src(c)
        if not is_exported(src): continue
        before = sum(len(l) > limit for l in src.split('\n'))
        if not before: continue
        new, rows = (src, [n + 1 for n, l in enumerate(src.split('\n')) if len(l) > limit]) if check \
            else wrap_source(src, limit)
        fixed += before - len(rows)
        left += [(c.get('id', '?'), r, new.split('\n')[r - 1]) for r in rows]
        if new != src:
            c['source'] = new.splitlines(keepends=True)
            changed = True
    if changed and not check:
        Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    return fixed, left

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('notebooks', nargs='+')
    p.add_argument('--check', action='store_true', help='only report; exit 1 if an exported line is too long')
    p.add_argument('--limit', type=int, default=LIMIT)
    a = p.parse_args(argv)
    total_fixed = total_left = 0
    for nb in a.notebooks:
        fixed, left = process_notebook(nb, check=a.check, limit=a.limit)
        total_fixed += fixed; total_left += len(left)
        if fixed or left:
            print(f"{nb}: {'' if a.check else f'{fixed} line(s) wrapped, '}{len(left)} line(s) over {a.limit}")
        for cid, r, text in left: print(f"  cell {cid} line {r} ({len(text)} cols): {text.strip()[:70]}")
    print(f"total: {'' if a.check else f'{total_fixed} wrapped, '}{total_left} exported line(s) over {a.limit}")
    return 1 if a.check and total_left else 0

if __name__ == '__main__': sys.exit(main())
