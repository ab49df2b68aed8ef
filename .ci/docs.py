#!/usr/bin/env python3
"""Render the docs site without Quarto: nbdev's processed notebooks, rendered by smalldocs from the same `_quarto.yml`.

`nbdev-docs` needs Quarto, which this workplace cannot install (and `nbdev-proc-nbs` tries to download it
first). So this script runs the steps of `nbdev-docs` that need no Quarto, with nbdev's own functions:

1. `refresh_quarto_yml` writes `nbs/nbdev.yml` (title, site-url, output-dir from pyproject.toml). It only
   writes `nbs/_quarto.yml` when none exists; ours is a symlink to `../_quarto.yml`, which it leaves alone.
2. `nbdev_sidebar` writes `nbs/sidebar.yml`; `proc_nbs` writes processed copies of every page into
   `_proc/` (front matter from the title cell, `show_doc` for exports, hidden cells dropped, doc links).
3. smalldocs renders a copy of `_proc/` as a Quarto website, reading the same `_quarto.yml`.
   Before that, `_patch_nbdev` changes nbdev's processing for this build (never for Quarto's):
   - every `#| export` cell is shown as nbdev shows `#| exports` (its source under its `show_doc`, in an open
     "Exported source" fold), and `#| exporti` cells show their source ("Internal source"), so the site
     shows the code each lesson explains;
   - `show_doc` entries of a cell appear in definition order (nbdev inserts them reversed);
   - `show_doc` renders from the source (`ApiRenderer`): `class X(...)` for classes, a field table (name,
     type, default, the field's trailing `# comment`) for dataclasses, an entry per public method, types and
     defaults as written (no `<factory>`, no quoted `Literal`), and a "source" link to a local source page.
4. smalldocs names every page after its source (`00_core.html`); Quarto honours nbdev's `output-file`
   front matter (`core.html`), and nbdev's doc links point there. So pages with an `output-file` are
   renamed afterwards and every link to them (HTML, search index, sitemap) is rewritten.

5. Post-render (`finish_site`): KaTeX is served from the site (`site_libs/katex/`, vendored in
   .ci/vendor/katex, see package.json) instead of a CDN; links to the site's own URL become relative;
   `src/fttk/*.py.html` show each module with line anchors for the "source" links.

    python .ci/docs.py                 # render into _docs/ (pyproject's doc_path)
    python -m http.server -d _docs     # serve it (search needs a server): http://localhost:8000
    python .ci/docs.py --dest DIR      # render into DIR
"""
import argparse, ast, dataclasses, html, inspect, io, json, os, posixpath, re, shutil, sys, tempfile, time, tokenize
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parent.parent
_SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')
_ATTR = re.compile(r'''\b(href|src)=(["'])(.*?)\2''', re.S)
PAGE_EXTS = ('.ipynb', '.qmd', '.md')

def front_matter(path: Path) -> dict:
    "The YAML front matter of a processed page: the first raw cell of a notebook, or the head of a .qmd/.md."
    if path.suffix == '.ipynb':
        cells = json.loads(path.read_text(encoding='utf-8')).get('cells', [])
        text = ''.join(cells[0]['source']) if cells and cells[0]['cell_type'] == 'raw' else ''
    else: text = path.read_text(encoding='utf-8')
    m = re.match(r'\s*---\s*\n(.*?)\n---\s*(\n|$)', text, re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}

def output_file_map(proc: Path) -> dict[PurePosixPath, PurePosixPath]:
    "Where smalldocs puts each page -> where its `output-file` says Quarto puts it (only the pages that differ)."
    res = {}
    for p in sorted(proc.rglob('*')):
        rel = p.relative_to(proc)
        if p.suffix not in PAGE_EXTS or any(o.startswith(('.', '_')) for o in rel.parts): continue
        of = front_matter(p).get('output-file')
        if not of: continue
        old, new = PurePosixPath(rel.as_posix()).with_suffix('.html'), PurePosixPath(rel.parent.as_posix())/of
        if old != new: res[old] = new
    targets = list(res.values())
    dup = {str(t) for t in targets if targets.count(t) > 1}
    if dup: raise SystemExit(f"two pages claim the same output-file: {sorted(dup)}")
    return res

def _rewrite_link(value: str, page_dir: PurePosixPath, mapping: dict) -> str:
    if not value or value.startswith(('#', '?', '/')) or _SCHEME.match(value): return value
    m = re.match(r'([^#?]*)(.*)', value, re.S)
    path, tail = m.group(1), m.group(2)
    if not path: return value
    target = PurePosixPath(posixpath.normpath(posixpath.join(str(page_dir), path)))
    if target not in mapping: return value
    return posixpath.relpath(str(mapping[target]), str(page_dir)) + tail

def apply_output_files(site: Path, mapping: dict, site_url: str = '') -> None:
    "Rename pages in the rendered `site` as `mapping` says, and rewrite every link to them."
    if not mapping: return
    for old, new in mapping.items():
        src, dst = site/old, site/new
        if not src.exists(): raise SystemExit(f"{old} was not rendered, so it cannot become {new}")
        if dst.exists(): raise SystemExit(f"{new} exists already; {old} cannot take its name")
    for old, new in mapping.items(): (site/old).rename(site/new)
    for html in site.rglob('*.html'):
        rel = PurePosixPath(html.relative_to(site).as_posix())
        text = html.read_text(encoding='utf-8')
        new_text = _ATTR.sub(lambda m: f'{m[1]}={m[2]}{_rewrite_link(m[3], rel.parent, mapping)}{m[2]}', text)
        if new_text != text: html.write_text(new_text, encoding='utf-8')
    search = site/'search.json'
    if search.exists():
        entries = json.loads(search.read_text(encoding='utf-8'))
        for e in entries:
            for k in ('href', 'objectID'):
                if isinstance(e.get(k), str): e[k] = _rewrite_link(e[k], PurePosixPath('.'), mapping)
        search.write_text(json.dumps(entries, ensure_ascii=False), encoding='utf-8')
    sitemap = site/'sitemap.xml'
    if sitemap.exists() and site_url:
        text = sitemap.read_text(encoding='utf-8')
        for old, new in mapping.items(): text = text.replace(f'<loc>{site_url}/{old}</loc>', f'<loc>{site_url}/{new}</loc>')
        sitemap.write_text(text, encoding='utf-8')

# ---------------------------------------------------------------- nbdev processing for this build

SRC_DIR = 'src'  # the site folder of the module source pages (src/fttk/core.py.html)
KATEX_CDN = 'https://cdn.jsdelivr.net/npm/katex@0.16.11/dist'  # smalldocs' URL; .ci/vendor/katex is that version
KATEX_DIR = ROOT/'.ci'/'vendor'/'katex'

def show_exported_source(cell):
    "Processor: show `#| export` cells as nbdev shows `#| exports`, and the source of `#| exporti` cells."
    if cell.cell_type != 'code' or not cell.directives_: return
    d = cell.directives_
    if 'export' in d: d['exports'] = d.pop('export')  # add_fold and mv_exports then treat it as exports
    elif 'exporti' in d:
        cell.source = f'#| code-fold: show\n#| code-summary: "Internal source"\n{cell.source}'

def _ordered_add_show_docs():
    "nbdev's `add_show_docs`, inserting a cell's `show_doc`s in definition order (nbdev's reverses them)."
    from nbdev import processors as P
    class add_show_docs(P.add_show_docs):
        def begin(self):
            nb = self.nb
            exports = P.L(c for c in nb.cells if P._want_doc(c))
            trees = P.L(nb.cells).map(P.NbCell.parsed_).concat()
            shown = {P._get_nm(t) for t in P._show_docs(trees)}
            for cell in reversed(exports):
                if P.cell_lang(cell) != 'python': raise ValueError(f"{cell.metadata.language} can't export:\n{cell.source}")
                for nm in reversed(P._def_names(cell, shown)):
                    new = P.mk_cell(f'show_doc({nm})'); new.has_sd = True
                    nb.cells.insert(cell.idx_+1, new)
            nb.has_docs_ = shown or exports
    return add_show_docs

_re_gh = re.compile(r'^https?://[^#]*/blob/[^/]+/(?P<path>[^#]+\.py)#L(?P<line>\d+)$')

def _locate(url):
    "The library file and line of a `show_doc`'s GitHub source URL (nbdev's lookup), or None."
    m = _re_gh.match(url or '')
    if not m or not (ROOT/m['path']).is_file(): return None
    return m['path'], int(m['line'])

def _def_at(path, line):
    "The source text of `path` and the top-level class or function that starts (or is decorated) at `line`."
    src = (ROOT/path).read_text(encoding='utf-8')
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            starts = [node.lineno] + [d.lineno for d in node.decorator_list]
            if line in starts: return src, node
    return src, None

def _sig(node, name=None, width=100):
    "`def name(args)->ret:` as written in the source, one argument per line when it is long."
    args = ast.unparse(node.args)
    ret = f' -> {ast.unparse(node.returns)}' if node.returns else ''
    kw = 'async def' if isinstance(node, ast.AsyncFunctionDef) else 'def'
    one = f'{kw} {name or node.name}({args}){ret}:'
    if len(one) <= width or not args: return one
    parts, depth, cur = [], 0, ''
    for ch in args:  # split at top-level commas only
        if ch in '([{': depth += 1
        elif ch in ')]}': depth -= 1
        if ch == ',' and depth == 0: parts.append(cur.strip()); cur = ''
        else: cur += ch
    parts.append(cur.strip())
    return f'{kw} {name or node.name}(\n' + ''.join(f'    {p},\n' for p in parts) + f'){ret}:'

def _comments(src):
    "Line number (1-based, in `src`) -> the trailing `# comment` on that line."
    res = {}
    try:
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.type == tokenize.COMMENT: res[t.start[0]] = t.string.lstrip('#').strip()
    except (tokenize.TokenError, IndentationError): pass
    return res

def _cell(s): return str(s).replace('|', '\\|').replace('\n', ' ')

def _doc_of(node):
    "The docstring written in `node` itself (not one inherited from a base class), in italics when one line."
    d = ast.get_docstring(node) or ''
    return f'\n\n*{d.strip()}*' if d and '\n' not in d.strip() else (f'\n\n{d}' if d else '')

def _class_md(cls, node, src, name, level):
    "A class: its header, docstring, field table (dataclasses), `__init__` signature, and public methods."
    bases = ', '.join(ast.unparse(b) for b in node.bases)
    out = [f'```python\nclass {name}{f"({bases})" if bases else ""}:\n```{_doc_of(node)}']
    if any('dataclass' in ast.unparse(d) for d in node.decorator_list) or dataclasses.is_dataclass(cls):
        com, rows = _comments(src), []
        for st in node.body:
            if not isinstance(st, ast.AnnAssign) or not isinstance(st.target, ast.Name): continue
            ann = ast.unparse(st.annotation)
            if ann.startswith(('ClassVar', 'typing.ClassVar')): continue
            dflt = ''
            if st.value is not None:
                v = st.value
                if isinstance(v, ast.Call) and ast.unparse(v.func) in ('field', 'dataclasses.field'):
                    kws = {k.arg: k.value for k in v.keywords}
                    if 'default' in kws: dflt = ast.unparse(kws['default'])
                    elif 'default_factory' in kws:
                        f = kws['default_factory']
                        dflt = ast.unparse(f.body) if isinstance(f, ast.Lambda) else f'{ast.unparse(f)}()'
                else: dflt = ast.unparse(v)
            note = com.get(st.end_lineno, '') or com.get(st.lineno, '')
            rows.append(f'| `{st.target.id}` | `{_cell(ann)}` | {f"`{_cell(dflt)}`" if dflt else "*required*"} | {_cell(note)} |')
        if rows: out.append('| Field | Type | Default | Meaning |\n|---|---|---|---|\n' + '\n'.join(rows))
    else:
        init = next((s for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == '__init__'), None)
        if init:
            a = init.args
            if a.args and a.args[0].arg == 'self': a.args = a.args[1:]  # shown as the call that builds one
            out.append(f'```python\n{_sig(init, name)[4:].rstrip(":")}\n```')
    for st in node.body:
        if not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) or st.name.startswith('_'): continue
        h = '#' * (level + 1)
        decos = ''.join(f'@{ast.unparse(d)}\n' for d in st.decorator_list)  # @property, @staticmethod, ...
        out.append(f'{h} {name}.{st.name}\n\n```python\n{decos}{_sig(st)}\n```{_doc_of(st)}')
    return '\n\n'.join(out)

def api_markdown(sym, name, title_level, url):
    "The API entry of `sym` from its source in the library (found by nbdev's source `url`), or None."
    loc = _locate(url)
    if not loc: return None
    src, node = _def_at(*loc)
    if node is None: return None
    obj = inspect.unwrap(sym) if callable(sym) else sym
    name = name or getattr(obj, '__qualname__', getattr(obj, '__name__', node.name))
    if isinstance(node, ast.ClassDef): body = _class_md(obj, node, src, name, title_level)
    else: body = f'```python\n{_sig(node, name)}\n```{_doc_of(node)}'
    link = f'{SRC_DIR}/{loc[0]}.html#L-{loc[1]}'
    return f'---\n\n[source]({link}){{style="float:right; font-size:smaller"}}\n\n{"#" * title_level} {name}\n\n{body}'

def _patch_nbdev():
    "Change nbdev's processing for this build only, as the module docstring says."
    from nbdev import processors as P, showdoc as S
    class ApiRenderer(S.BasicMarkdownRenderer):
        def _repr_markdown_(self):
            url = S.NbdevLookup().code(self.fn)
            return api_markdown(self.sym, self.name, self.title_level, url) or super()._repr_markdown_()
    S.BasicMarkdownRenderer = ApiRenderer  # show_doc looks the name up in nbdev.showdoc when it runs
    ordered = _ordered_add_show_docs()
    def base_procs(self):
        procs = P.FilterDefaults.__dict__['_fttk_base'](self)
        return [show_exported_source] + [ordered if p is P.add_show_docs else p for p in procs]
    if '_fttk_base' not in P.FilterDefaults.__dict__:
        P.FilterDefaults._fttk_base = P.FilterDefaults.base_procs
        P.FilterDefaults.base_procs = base_procs

# ---------------------------------------------------------------- after smalldocs

def write_source_pages(site: Path, lib: Path) -> list[str]:
    "One HTML page per module under `site/src/`, with an `L-<n>` anchor on every line."
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    fmt = HtmlFormatter(linenos='inline', lineanchors='L', anchorlinenos=True, wrapcode=True)
    css = fmt.get_style_defs('.highlight') + '\n:target { background: #fff3bf; } body { font-family: sans-serif; }'
    pages = []
    for py in sorted(lib.glob('*.py')):
        rel = py.relative_to(ROOT).as_posix()
        out = site/SRC_DIR/f'{rel}.html'; out.parent.mkdir(parents=True, exist_ok=True)
        up = '../' * (len(PurePosixPath(rel).parts))
        body = highlight(py.read_text(encoding='utf-8'), PythonLexer(), fmt)
        out.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(rel)}</title>'
                       f'<style>{css}</style></head><body><p><a href="{up}index.html">fttk docs</a> / '
                       f'<code>{html.escape(rel)}</code></p>{body}</body></html>', encoding='utf-8')
        pages.append(str(out.relative_to(site)))
    return pages

_ID = re.compile(r"""\bid=["']([^"']+)["']""")
_PRIVATE_LINK = re.compile(r'<a href="([^"#]*)#(_\w+)"[^>]*>(.*?)</a>', re.S)

def unlink_private(site: Path) -> int:
    ("nbdev links every backticked name in `_modidx`, private ones too (`_coerce`), but only exported "
     "public names get an entry with an anchor: drop links to private anchors a page does not have.")
    pages = {PurePosixPath(p.relative_to(site).as_posix()): p for p in site.rglob('*.html')}
    ids = {rel: set(_ID.findall(p.read_text(encoding='utf-8'))) for rel, p in pages.items()}
    n = 0
    for rel, page in pages.items():
        text = page.read_text(encoding='utf-8')
        def keep(m):
            nonlocal n
            target = PurePosixPath(posixpath.normpath(posixpath.join(str(rel.parent), m[1]))) if m[1] else rel
            if target in ids and m[2] not in ids[target]: n += 1; return m[3]
            return m[0]
        new = _PRIVATE_LINK.sub(keep, text)
        if new != text: page.write_text(new, encoding='utf-8')
    return n

def finish_site(site: Path, site_url: str) -> None:
    "Serve KaTeX from the site, and make links to the site's own URL relative."
    shutil.copytree(KATEX_DIR, site/'site_libs'/'katex', dirs_exist_ok=True)
    base = site_url.rstrip('/') + '/' if site_url else None
    for page in site.rglob('*.html'):
        rel = PurePosixPath(page.relative_to(site).as_posix())
        up = posixpath.relpath('.', str(rel.parent)) + '/'
        up = '' if up == './' else up
        text = page.read_text(encoding='utf-8')
        new = text.replace(KATEX_CDN, f'{up}site_libs/katex')
        if base: new = _ATTR.sub(lambda m: f'{m[1]}={m[2]}{up}{m[3][len(base):] or "index.html"}{m[2]}'
                                 if m[3].startswith(base) else m[0], new)
        if new != text: page.write_text(new, encoding='utf-8')
    unlink_private(site)

def build(dest: Path | None = None, n_workers: int = 0, quiet: bool = False, file_re: str = '') -> dict:
    "Process the notebooks and render the site into `dest`; returns what happened (paths, timings, warnings, renames)."
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    from smalldocs.site import build as smalldocs_build
    cfg = get_config()
    os.chdir(cfg.config_path)  # nbdev's functions read the config relative to the working directory
    dest = Path(dest or cfg.doc_path).resolve()
    t0 = time.perf_counter()
    _patch_nbdev()
    refresh_quarto_yml()
    qy = cfg.nbs_path/'_quarto.yml'
    if not (qy.is_symlink() and qy.resolve() == (cfg.config_path/'_quarto.yml').resolve()):
        raise SystemExit(f"{qy} must be a symlink to ../_quarto.yml (the one site config); found something else")
    # with --file-re the sidebar lists only the pages that are built, so it links to no missing page
    nbdev_sidebar.__wrapped__(**({'file_re': f'(?={file_re})' + r'.*\.(?:ipynb|qmd|html)$'} if file_re else {}))
    # One notebook at a time, so a failing page does not hide the others: nbdev runs every exported cell and
    # every cell with an import statement while it builds docs (`exec_show_docs`, the same under Quarto), so a
    # plotting cell that starts with `import matplotlib.pyplot as plt` runs without the cells before it.
    names = [p.name for p in sorted(cfg.nbs_path.glob('*.ipynb')) if not p.name.startswith(('_', '.')) and re.search(file_re, p.name)]
    # nbdev's cache keeps a processed page while its notebook is unchanged; the processing here is our own
    # (`_patch_nbdev`), so the pages being built are always processed afresh
    for name in names: (cfg.config_path/'_proc'/name).unlink(missing_ok=True)
    errors = {}
    for name in names or ['']:
        try: proc = proc_nbs(n_workers=n_workers, file_re=f'^{re.escape(name)}$' if name else file_re)
        except Exception as e: errors[name] = str(e)
    if errors:
        msg = '\n\n'.join(f'--- {k}:\n{v}' for k, v in errors.items())
        raise SystemExit(f"nbdev could not process {len(errors)} notebook(s) for the docs:\n{msg}\n\n"
                         "nbdev executes every exported cell and every cell containing an import while building docs "
                         "(the same happens in nbdev-docs with Quarto). Keep imports in their own cell (or in the "
                         "notebook's imports cell) so that cells depending on earlier results are not run alone.")
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='fttk-docs-') as tmp:
        stage = Path(tmp)/'proc'
        shutil.copytree(proc, stage, ignore=shutil.ignore_patterns('_docs', '_site', '.quarto'))
        site = smalldocs_build(stage, quiet=True)
        out = Path(site.out)
        mapping = output_file_map(stage)
        sources = {}
        for src in sorted(stage.rglob('*')):
            rel = src.relative_to(stage)
            if src.suffix not in PAGE_EXTS or any(o.startswith(('.', '_')) for o in rel.parts): continue
            html = PurePosixPath(rel.as_posix()).with_suffix('.html')
            sources[rel.as_posix()] = dict(html=str(mapping.get(html, html)), title=front_matter(src).get('title'))
        site_url = str(cfg.get('doc_host', '')) + str(cfg.get('doc_baseurl', ''))
        apply_output_files(out, mapping, site_url)
        write_source_pages(out, cfg.lib_path)
        finish_site(out, site_url)
        if dest.exists(): shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), dest)
    t2 = time.perf_counter()
    res = dict(dest=str(dest), proc_s=round(t1-t0, 1), render_s=round(t2-t1, 1), warnings=list(site.warnings),
               renamed={str(k): str(v) for k, v in mapping.items()}, sources=sources, pages=sorted(str(p.relative_to(dest)) for p in dest.rglob('*.html')))
    if not quiet:
        for w in res['warnings']: print(f'smalldocs warning: {w}', file=sys.stderr)
        for k, v in res['renamed'].items(): print(f'output-file: {k} -> {v}')
        print(f"rendered {len(res['pages'])} pages into {dest} (nbdev processing {res['proc_s']}s, smalldocs {res['render_s']}s)")
    return res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dest', type=Path, default=None, help="output folder (default: pyproject's doc_path, _docs)")
    p.add_argument('--n-workers', type=int, default=0, help='nbdev processing workers (0: serial, one torch import)')
    p.add_argument('--file-re', default='', help='only process the notebooks whose name matches this regex (the rest of _proc/ stays as it was)')
    p.add_argument('--json', type=Path, default=None, help='also write the summary as JSON here')
    a = p.parse_args(argv)
    res = build(a.dest, a.n_workers, file_re=a.file_re)
    if a.json: a.json.write_text(json.dumps(res, indent=1))
    return 0

if __name__ == '__main__': sys.exit(main())
