"""Published notebook outputs are current: every notebook that shows results of a lab base model prints
`base model recipe: <name>` beside them, and the name must be today's recipe (size, config hash, world hash).
A change to the pretraining recipe therefore fails here until the notebooks that depend on it are re-run."""
import json, re
from pathlib import Path

import pytest

from fttk.world import base_model_recipe

NBS = Path(__file__).resolve().parent.parent/'nbs'
RECIPE = re.compile(r'base model recipe: (lab-(test|default)-[0-9a-f]{12})')
USES = re.compile(r'\bbase_model\((?!_)')     # a call of base_model(...), not base_model_report(...)


def _texts(cell):
    for o in cell.get('outputs', []):
        if 'text' in o: yield ''.join(o['text'])
        for v in o.get('data', {}).values():
            if isinstance(v, (list, str)): yield ''.join(v)


def published(nb_path):
    "(uses a base model in a published cell, [(cell index, recipe name, size)]) for one notebook."
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    uses, found = False, []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        if src.lstrip().startswith('#| export') or re.search(r'^\s*#\|\s*(hide|eval:\s*false)', src, re.M): continue
        if USES.search(src) and c.get('outputs'): uses = True
        for t in _texts(c): found += [(i, m.group(1), m.group(2)) for m in RECIPE.finditer(t)]
    return uses, found


NOTEBOOKS = sorted(p for p in NBS.glob('[0-9]*.ipynb'))


@pytest.mark.parametrize('nb_path', NOTEBOOKS, ids=lambda p: p.stem)
def test_published_outputs_come_from_todays_base_model(nb_path):
    uses, found = published(nb_path)
    if uses: assert found, (f"{nb_path.name} publishes outputs of a lab base model but never prints "
                            "`base model recipe: ` + base_model_recipe(size) beside them")
    for i, name, size in found:
        assert name == base_model_recipe(size), (
            f"{nb_path.name} cell {i} was produced with base model {name}; today's {size} recipe is "
            f"{base_model_recipe(size)}: re-run the notebook and revise its prose")


def test_checker_catches_a_stale_recipe(tmp_path):
    "The check can fail: a notebook whose output names another recipe is reported."
    nb = {'cells': [{'cell_type': 'code', 'source': ['model, tok = base_model(SIZE)\n'], 'metadata': {},
                     'outputs': [{'output_type': 'stream', 'name': 'stdout',
                                  'text': ['base model recipe: lab-default-000000000000\n']}]}]}
    p = tmp_path/'99_stale.ipynb'; p.write_text(json.dumps(nb))
    uses, found = published(p)
    assert uses and found == [(0, 'lab-default-000000000000', 'default')]
    assert found[0][1] != base_model_recipe('default')
