#!/usr/bin/env python3
"""Render the docs site without Quarto: nbdev's processed notebooks, rendered by smalldocs from the same `_quarto.yml`.

`nbdev-docs` needs Quarto, which this workplace cannot install (and `nbdev-proc-nbs` tries to download it
first). So this script runs the steps of `nbdev-docs` that need no Quarto, with nbdev's own functions:

1. `refresh_quarto_yml` writes `nbs/nbdev.yml` (title, site-url, output-dir from pyproject.toml). It only
   writes `nbs/_quarto.yml` when none exists; ours is a symlink to `../_quarto.yml`, which it leaves alone.
2. `nbdev_sidebar` writes `nbs/sidebar.yml`; `proc_nbs` writes processed copies of every page into
   `_proc/` (front matter from the title cell, `show_doc` for exports, hidden cells dropped, doc links).
3. smalldocs renders a copy of `_proc/` as a Quarto website, reading the same `_quarto.yml`.
4. smalldocs names every page after its source (`00_core.html`); Quarto honours nbdev's `output-file`
   front matter (`core.html`), and nbdev's doc links point there. So pages with an `output-file` are
   renamed afterwards and every link to them (HTML, search index, sitemap) is rewritten.

    python .ci/docs.py                 # render into _docs/ (pyproject's doc_path)
    python .ci/docs.py --dest DIR      # render into DIR
"""
import argparse, json, os, posixpath, re, shutil, sys, tempfile, time
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
        apply_output_files(out, mapping, str(cfg.get('doc_host', '')) + str(cfg.get('doc_baseurl', '')))
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
