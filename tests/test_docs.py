"""The docs site: rendered from the one `_quarto.yml` by `.ci/docs.py` (nbdev processing + smalldocs), then
checked in headless Chromium: every notebook has a page with its title, its plots load, no internal link or
anchor is broken, and no page asks the server for a file it does not have.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package. Without them the browser tests
are skipped locally and fail under CI (CI=true), so a CI run can never pass by skipping them.

FTTK_DOCS_ONLY='^(index|00_core)' limits the build and the checks to the notebooks whose names match (a regex),
for a quick look at one page while others are being written; CI leaves it unset and checks every notebook."""
import ast, importlib.util, json, os, re, shutil, subprocess, sys, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1280,1600']
ONLY = os.environ.get('FTTK_DOCS_ONLY', '')
# Screenshots of the index and every notebook's page land here, for a person to look at (gitignored).
SHOTS = Path(os.environ.get('FTTK_DOCS_SCREENSHOTS') or ROOT/'_docs_screenshots')
MAX_STDERR_BLOCKS = 3  # more than this on one page is a progress bar or warnings printed update by update
LOCAL_PATHS = re.compile(r'/root/|/home/|/work/|/tmp/|site-packages')
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/svg+xml', 'image/gif')

def _load_ci_module(name):
    spec = importlib.util.spec_from_file_location(f'ci_{name}', ROOT/'.ci'/f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def notebooks():
    "Every notebook nbdev renders: the ones in nbs/ whose names do not start with '_' or '.'."
    return sorted(p.name for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')) and re.search(ONLY, p.name))

def _unavailable(msg):
    if os.environ.get('CI'): pytest.fail(f'{msg} (CI=true: the docs check must run, not skip)')
    pytest.skip(msg)

def _directives(src):
    lines = src.splitlines()
    return [l.split('#|', 1)[1].strip().replace(' ', '') for l in lines if re.match(r'\s*#\|', l)]

def expected_title(nb_name):
    "The title nbdev gives a notebook: the `# heading` of its first markdown cell."
    nb = json.loads((NBS/nb_name).read_text(encoding='utf-8'))
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        m = re.search(r'^#\s+(.+?)\s*$', ''.join(c['source']), re.M)
        if m: return m.group(1)
    return None

def expected_plots(nb_name):
    "How many image outputs the notebook shows: those of cells that are not hidden and whose output is kept."
    nb = json.loads((NBS/nb_name).read_text(encoding='utf-8'))
    n = 0
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        ds = _directives(''.join(c['source']))
        if {'hide', 'include:false', 'output:false', 'export', 'exporti'} & set(ds) or any(d.startswith('default_exp') for d in ds): continue
        n += sum(any(m in o.get('data', {}) for m in IMAGE_MIMES) for o in c.get('outputs', []))
    return n

# ---------------------------------------------------------------- the site, the server, the browser

@pytest.fixture(scope='session')
def site(tmp_path_factory):
    "Render the whole site once per test run, into a scratch folder."
    out = tmp_path_factory.mktemp('docs')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, str(ROOT/'.ci'/'docs.py'), '--dest', str(out/'site'), '--json', str(out/'summary.json')] + (['--file-re', ONLY] if ONLY else [])
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode: pytest.fail(f'.ci/docs.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}')
    return dict(dir=out/'site', **json.loads((out/'summary.json').read_text()))

class _Handler(SimpleHTTPRequestHandler):
    missing: list
    def log_message(self, *a): pass
    def send_error(self, code, *a, **kw):
        path = unquote(urlsplit(self.path).path)
        # Chromium asks every site for /favicon.ico on its own; a page that links an icon is checked with its links
        if code == 404 and path != '/favicon.ico': self.missing.append(path)
        return super().send_error(code, *a, **kw)

@pytest.fixture(scope='session')
def server(site):
    "The site over HTTP on localhost, as a reader would get it; records every request that found no file."
    missing = []
    handler = type('H', (_Handler,), {'missing': missing})
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(handler, directory=str(site['dir'])))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield dict(base=f'http://127.0.0.1:{httpd.server_address[1]}/', missing=missing)
    httpd.shutdown(); httpd.server_close()

@pytest.fixture(scope='session')
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError: _unavailable('selenium is not installed (pip install selenium)')
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _unavailable('chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in CHROMIUM_FLAGS + [f'--user-data-dir={tmp_path_factory.mktemp("chromium-profile")}']: opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60); driver.set_script_timeout(30)
    yield driver
    driver.quit()

_COLLECT = """
const done = arguments[arguments.length - 1];
const imgs = [...document.images];
Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; }))).then(() => {
  const title = document.querySelector('h1.title');
  done({
    doc_title: document.title,
    h1: title ? title.textContent.trim() : null,
    images: imgs.map(i => ({src: i.src.slice(0, 60), width: i.naturalWidth, output: !!i.closest('.cell-output-display')})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    resources: [...document.querySelectorAll('link[href]')].map(l => l.href)
               .concat([...document.querySelectorAll('script[src], img[src]')].map(s => s.src)),
    // every output block of a cell: which cell (its n-th code cell on the page), its kind, and its text
    outputs: [...document.querySelectorAll('.cell')].flatMap((c, i) =>
      [...c.querySelectorAll('[class*="cell-output"]')].filter(o => !o.parentElement.closest('[class*="cell-output"]'))
        .map(o => ({cell: i, cls: o.className, text: o.innerText.slice(0, 20000),
                    code: (c.querySelector('pre code') || {textContent: ''}).textContent.slice(0, 80)}))),
    raw_tex: (() => { const w = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
      const res = []; let n;
      while ((n = w.nextNode())) {
        if (n.parentElement.closest('pre, code, script, style, .katex, .sourceCode')) continue;
        if (['\\\\(', '\\\\[', '$$'].some(d => n.textContent.includes(d))) res.push(n.textContent.trim().slice(0, 120));
      }
      return res; })(),
    katex_errors: [...document.querySelectorAll('.katex-error')].map(e => (e.getAttribute('title') || e.textContent).slice(0, 200)),
    katex_rendered: document.querySelectorAll('.katex').length,
    clipped: [...document.querySelectorAll('main pre, .katex-display, table')].filter(e =>
      e.scrollWidth > e.clientWidth + 1 && !['auto', 'scroll'].includes(getComputedStyle(e).overflowX)).length,
    ids: [...document.querySelectorAll('[id]')].map(e => e.id).concat([...document.querySelectorAll('a[name]')].map(a => a.name)),
  });
});
"""

_pages = {}
@pytest.fixture
def page(site, server, browser):
    "Open a notebook's page once and collect what the tests look at."
    def _open(nb):
        if nb in _pages: return _pages[nb]
        src = site['sources'].get(nb)
        if src is None: pytest.fail(f'{nb} has no page in the rendered site; pages: {sorted(site["sources"])}')
        before = len(server['missing'])
        browser.get(server['base'] + src['html'])
        info = browser.execute_async_script(_COLLECT)
        info.update(html=src['html'], missing=server['missing'][before:])
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS/(Path(src['html']).stem + '.png')))
        _pages[nb] = info
        return info
    return _open

def _local(url, server, site_url):
    "The site-relative path and fragment of an internal link, or None for a link that leaves the site."
    for base in (server['base'], site_url):
        if base and url.startswith(base):
            parts = urlsplit(url[len(base):])
            path = unquote(parts.path)
            if path == '' or path.endswith('/'): path += 'index.html'
            return path, unquote(parts.fragment)
    return None

@pytest.fixture(scope='session')
def site_url():
    from nbdev.config import get_config
    cfg = get_config(str(ROOT))
    return (str(cfg.get('doc_host', '')) + str(cfg.get('doc_baseurl', ''))).rstrip('/') + '/'

# ---------------------------------------------------------------- checks that need no browser

def test_one_site_config():
    "nbs/_quarto.yml is the top-level _quarto.yml (a symlink), and nbdev's refresh leaves it so."
    from nbdev.quarto import refresh_quarto_yml
    qy = NBS/'_quarto.yml'
    assert qy.is_symlink() and os.readlink(qy) == '../_quarto.yml'
    cwd = os.getcwd()
    try: os.chdir(ROOT); refresh_quarto_yml()
    finally: os.chdir(cwd)
    assert qy.is_symlink() and qy.read_text() == (ROOT/'_quarto.yml').read_text()

def test_output_file_mapping(tmp_path):
    "The post-render step renames a page to its output-file and rewrites links to it, and only those."
    docs = _load_ci_module('docs')
    site = tmp_path/'site'; (site/'sub').mkdir(parents=True)
    (site/'00_core.html').write_text('<a href="#x">self</a><h2 id="x">x</h2>')
    (site/'index.html').write_text('<a href="00_core.html#set_seed">a</a> <a href="./00_core.html">b</a> '
                                   '<a href="https://example.org/00_core.html">c</a> <img src="00_core.html.png">')
    (site/'sub'/'page.html').write_text("<a href='../00_core.html'>d</a>")
    (site/'search.json').write_text(json.dumps([{'href': '00_core.html#x', 'objectID': '00_core.html#x'}]))
    (site/'sitemap.xml').write_text('<loc>https://h/p/00_core.html</loc>')
    docs.apply_output_files(site, {PurePosixPath('00_core.html'): PurePosixPath('core.html')}, 'https://h/p')
    assert not (site/'00_core.html').exists() and (site/'core.html').exists()
    assert (site/'index.html').read_text() == ('<a href="core.html#set_seed">a</a> <a href="core.html">b</a> '
                                               '<a href="https://example.org/00_core.html">c</a> <img src="00_core.html.png">')
    assert (site/'sub'/'page.html').read_text() == "<a href='../core.html'>d</a>"
    assert json.loads((site/'search.json').read_text()) == [{'href': 'core.html#x', 'objectID': 'core.html#x'}]
    assert (site/'sitemap.xml').read_text() == '<loc>https://h/p/core.html</loc>'

def test_nbdev_output_files_are_honoured(site):
    "Pages nbdev names with output-file (core.html for 00_core) exist under that name, and only that name."
    for src, v in site['sources'].items():
        assert (site['dir']/v['html']).exists(), f'{src}: {v["html"]} was not written'
    for old, new in site['renamed'].items():
        assert not (site['dir']/old).exists(), f'{old} should have become {new}'

# ---------------------------------------------------------------- per notebook, in Chromium

@pytest.mark.parametrize('nb', notebooks())
def test_page_has_title(nb, page):
    info = page(nb)
    title = expected_title(nb)
    assert title, f'{nb} has no "# title" markdown cell'
    assert info['h1'] == title, f'{nb}: page title {info["h1"]!r}, notebook title {title!r}'
    assert info['doc_title'].startswith(title)

@pytest.mark.parametrize('nb', notebooks())
def test_page_shows_its_plots(nb, page):
    info = page(nb)
    shown = [i for i in info['images'] if i['output']]
    assert len(shown) >= expected_plots(nb), f'{nb}: {expected_plots(nb)} plots in the notebook, {len(shown)} on the page'
    broken = [i['src'] for i in info['images'] if i['width'] == 0]
    assert not broken, f'{nb}: images that did not load: {broken}'

@pytest.mark.parametrize('nb', notebooks())
def test_no_broken_internal_links(nb, page, site, server, site_url):
    info = page(nb)
    broken = []
    for url in info['links'] + info['resources']:
        loc = _local(url, server, site_url)
        if loc and not (site['dir']/loc[0]).is_file(): broken.append(url)
    assert not broken, f'{nb}: links to pages or files the site does not have: {sorted(set(broken))}'
    assert not info['missing'], f'{nb}: the page requested files the site does not have: {info["missing"]}'

@pytest.mark.parametrize('nb', notebooks())
def test_no_broken_anchors(nb, page, site, server, site_url):
    "Every `page#anchor` link lands on an element with that id (nbdev's doc links included)."
    info = page(nb)
    ids_of = {info['html']: set(info['ids'])}
    broken = []
    for url in info['links']:
        loc = _local(url, server, site_url)
        if not loc or not loc[1] or not (site['dir']/loc[0]).is_file(): continue
        path, frag = loc
        if path not in ids_of:
            text = (site['dir']/path).read_text(encoding='utf-8', errors='replace')
            ids_of[path] = set(re.findall(r'''\s(?:id|name)=["']([^"']+)["']''', text))
        if frag not in ids_of[path]: broken.append(f'{path}#{frag}')
    assert not broken, f'{nb}: links to anchors that do not exist: {sorted(set(broken))}'

def _where(nb, o):
    "Which notebook cell an output on the page belongs to: its index and id in the notebook, found by its code."
    code = o['code'].strip()[:60]
    cells = json.loads((NBS/nb).read_text(encoding='utf-8'))['cells']
    body = lambda c: '\n'.join(l for l in ''.join(c['source']).splitlines() if not re.match(r'\s*#\|', l)).strip()
    for test in (lambda b: b.startswith(code), lambda b: code in b):  # the cell that starts so, else contains it
        for i, c in enumerate(cells):
            if c['cell_type'] == 'code' and code and test(body(c)):
                return f"notebook cell {i} (id {c.get('id')}, {code[:40]!r})"
    return f"page cell {o['cell']} ({code[:40]!r})"

@pytest.mark.parametrize('nb', notebooks())
def test_few_stderr_blocks(nb, page):
    "A page shows at most a few stderr blocks: a progress bar printed update by update would be dozens."
    info = page(nb)
    err = [o for o in info['outputs'] if 'stderr' in o['cls']]
    by_cell = {}
    for o in err: by_cell.setdefault(_where(nb, o), []).append(o['text'].strip()[:60])
    assert len(err) <= MAX_STDERR_BLOCKS, (f'{nb}: {len(err)} stderr blocks (at most {MAX_STDERR_BLOCKS}):\n' + '\n'.join(
        f'  {w}: {len(t)} blocks, first {t[0]!r}' for w, t in by_cell.items()))

@pytest.mark.parametrize('nb', notebooks())
def test_no_local_paths(nb, page):
    "No output shows a path of the machine that ran the notebook."
    info = page(nb)
    bad = [f"{_where(nb, o)}: ...{o['text'][max(0, m.start()-40):m.end()+40]!r}..." for o in info['outputs']
           for m in [LOCAL_PATHS.search(o['text'])] if m]
    assert not bad, f'{nb}: outputs with local paths:\n' + '\n'.join(bad)

@pytest.mark.parametrize('nb', notebooks())
def test_maths_rendered(nb, page):
    "All maths is typeset by KaTeX (served by the site): no raw TeX delimiters left in text, no KaTeX errors."
    info = page(nb)
    assert not info['raw_tex'], f'{nb}: raw TeX left in the text: {info["raw_tex"][:5]}'
    assert not info['katex_errors'], f'{nb}: KaTeX errors: {info["katex_errors"][:5]}'

@pytest.mark.parametrize('nb', notebooks())
def test_nothing_clipped(nb, page):
    "Code, equations and tables wider than the column wrap or scroll; none is cut off."
    assert page(nb)['clipped'] == 0, f'{nb}: {page(nb)["clipped"]} elements overflow without scrolling'

def test_katex_is_local(site):
    "The pages load KaTeX from the site, not from a CDN (the docs must read offline)."
    for p in site['dir'].rglob('*.html'):
        assert 'cdn.jsdelivr.net/npm/katex' not in p.read_text(encoding='utf-8'), p
    assert (site['dir']/'site_libs'/'katex'/'katex.min.js').is_file()

def test_exported_source_shown(site):
    "Exported code is on the page (in an 'Exported source' fold under its entry) with a local source link."
    text = (site['dir']/site['sources']['00_core.ipynb']['html']).read_text(encoding='utf-8') if '00_core.ipynb' in site['sources'] else None
    if text is None: pytest.skip('00_core is not built (FTTK_DOCS_ONLY)')
    assert 'Exported source' in text
    links = re.findall(r'href="(src/fttk/core\.py\.html)#(L-\d+)"', text)
    assert links, 'no local source links'
    src = (site['dir']/links[0][0]).read_text(encoding='utf-8')
    assert all(f'id="{a}"' in src for _, a in links)
    # a cell defining in_test then get_device documents them in that order (nbdev alone reverses them)
    assert text.index('id="in_test"') < text.index('id="get_device"')
    assert 'github.com/fttk/fttk/blob' not in text and 'https://fttk.github.io/fttk/' not in text.split('</head>', 1)[1]

def test_api_entries():
    "API entries render from the source: definition order, `class` for dataclasses with their field table."
    docs = _load_ci_module('docs')
    src = 'from dataclasses import dataclass, field\n@dataclass\nclass C:\n    "Doc."\n    a: int = 1  # the a\n' \
          "    b: Literal['x', 'y'] = 'x'\n    c: list = field(default_factory=list)\n    def go(self, n: int) -> int:\n        'Go.'\n" \
          "    @property\n    def p(self): return 1\n    def _hidden(self): pass\n"
    node = ast.parse(src).body[1]
    md = docs._class_md(None, node, src, 'C', 3)
    assert md.startswith('```python\nclass C:\n```\n\n*Doc.*')
    assert "| `a` | `int` | `1` | the a |" in md and "| `b` | `Literal['x', 'y']` | `'x'` |  |" in md and '| `c` | `list` | `list()` |' in md
    assert '#### C.go\n\n```python\ndef go(self, n: int) -> int:\n```\n\n*Go.*' in md
    assert '#### C.p\n\n```python\n@property\ndef p(self):\n```' in md and '_hidden' not in md
    long = ast.parse('def f(' + ', '.join(f'argument_{i}: int = {i}' for i in range(8)) + ') -> int: pass').body[0]
    assert docs._sig(long) == 'def f(\n' + ''.join(f'    argument_{i}: int={i},\n' for i in range(8)) + ') -> int:'
