"""README.md is generated from nbs/index.ipynb (.ci/readme.py); these tests keep the two, and the index's map of
notebooks, in step with the repository."""
import importlib.util, json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'

def _readme_module():
    spec = importlib.util.spec_from_file_location('ci_readme', ROOT/'.ci'/'readme.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def _index_text():
    nb = json.loads((NBS/'index.ipynb').read_text(encoding='utf-8'))
    return '\n'.join(''.join(c['source']) for c in nb['cells'])

def test_readme_matches_index():
    fresh = _readme_module().readme_text()
    committed = (ROOT/'README.md').read_text(encoding='utf-8')
    assert committed == fresh, 'README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`'

def test_readme_check_mode():
    "`.ci/readme.py --check` is what a person runs; it agrees with the test above and writes nothing."
    before = (ROOT/'README.md').read_bytes()
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (ROOT/'README.md').read_bytes() == before

def test_readme_check_mode_reports_drift(tmp_path, monkeypatch):
    mod = _readme_module()
    stale = tmp_path/'README.md'; stale.write_text('# old\n')
    monkeypatch.setattr(mod, 'README', stale)
    assert mod.main(['--check']) == 1
    assert mod.main([]) == 0 and stale.read_text() == mod.readme_text()

def test_relative_links_point_into_nbs():
    "README sits above nbs/, so a link the index writes as `00_core.ipynb` must read `nbs/00_core.ipynb` there."
    mod = _readme_module()
    md = '[a](00_core.ipynb) [b](https://x.org/y) [c](#quick-start) [d](/abs) ![e](img/p.png) [f](mailto:a@b.c)'
    assert mod._REL_LINK.sub(lambda m: f'{m[1]}nbs/{m[2]}{m[3]}', md) == \
        '[a](nbs/00_core.ipynb) [b](https://x.org/y) [c](#quick-start) [d](/abs) ![e](nbs/img/p.png) [f](mailto:a@b.c)'
    for target in re.findall(r'\]\((nbs/[^)#\s]+)', (ROOT/'README.md').read_text()):
        assert (ROOT/target).exists(), f'README links to {target}, which does not exist'

def test_index_maps_every_notebook():
    "Every notebook in nbs/ is named in the index's map, and linked there, so readers can find it."
    text = _index_text()
    for nb in sorted(NBS.glob('[0-9]*.ipynb')):
        assert f'[{nb.stem}]({nb.name})' in text, f'nbs/index.ipynb does not link {nb.name} from its map of notebooks'

def test_index_links_only_existing_notebooks():
    for target in re.findall(r'\]\(([^)#\s]+\.ipynb)', _index_text()):
        assert (NBS/target).exists(), f'nbs/index.ipynb links {target}, which does not exist'

def test_index_imports_nothing_heavy():
    "The front page must render and test instantly: no code cell imports torch, transformers or the like."
    nb = json.loads((NBS/'index.ipynb').read_text(encoding='utf-8'))
    heavy = re.compile(r'^\s*(?:import|from)\s+(torch|transformers|peft|trl|datasets|bitsandbytes|fttk)\b', re.M)
    for c in nb['cells']:
        if c['cell_type'] == 'code': assert not heavy.search(''.join(c['source'])), ''.join(c['source'])

def test_layout_section_explains_the_config():
    "The layout section says why the nbdev config is in pyproject.toml (nbdev 3) and not in settings.ini."
    text = _index_text()
    assert '[tool.nbdev]' in text and 'settings.ini' in text and 'nbdev 3' in text and 'execnb' in text
    assert not (ROOT/'settings.ini').exists(), 'nbdev 3 refuses a leftover settings.ini'
