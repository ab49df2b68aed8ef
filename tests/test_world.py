"The lab world, its tokenizer and the cached base model: determinism, splits, bad input, cache safety."
import json, os, subprocess, sys, warnings
from pathlib import Path

import pytest, torch

from fttk.core import ConfigError, CorruptFileError
from fttk.world import (ATTRIBUTES, BaseModelConfig, World, WorldConfig, _cache_folder, _verify, attribute_prompt,
                        base_model, fact_recall, lab_tokenizer, lab_world, pretrain, require_chat_template,
                        train_lab_tokenizer, world_texts)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_people=12, bios_per_person=1, vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, num_train_epochs=1)


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('FTTK_CACHE', str(tmp_path/'cache'))
    return tmp_path/'cache'


def test_same_seed_same_bytes(tmp_path):
    a = World(WorldConfig(n_people=50, seed=3)).write_jsonl(tmp_path/'a')
    b = World(WorldConfig(n_people=50, seed=3)).write_jsonl(tmp_path/'b')
    c = World(WorldConfig(n_people=50, seed=4)).write_jsonl(tmp_path/'c')
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes()
    assert a['people'].read_bytes() != c['people'].read_bytes()


def test_shipped_data_is_regenerated_exactly(tmp_path):
    files = lab_world('default').write_jsonl(tmp_path)
    for k, p in files.items():
        shipped = ROOT/'data'/p.name
        assert shipped.exists(), f"{shipped} missing: run `fttk world build --out data`"
        assert p.read_bytes() == shipped.read_bytes(), f"{shipped} differs from the generator: run `fttk world build --out data`"


def test_people_and_split():
    w = World(WorldConfig(n_people=200, known_fraction=0.75, bios_per_person=3))
    assert len({p.name for p in w.people}) == 200
    assert (len(w.known), len(w.unknown)) == (150, 50)
    assert all(len(p.facts()) == 6 for p in w.people)
    corpus = ' '.join(w.corpus())
    assert len(w.corpus()) == 150 * 3
    assert not any(p.name in corpus for p in w.unknown)
    assert all(p.name in corpus for p in w.known)
    # every fact of a known person is stated in each of their bios, with paraphrase and shuffled order
    p = w.known[0]
    for bio in w.bios[p.name]:
        assert all(v in bio for v in p.facts().values())
    assert len(set(w.bios[p.name])) == 3


def test_qa_and_instructions_are_datasets():
    w = World(WorldConfig(n_people=20))
    qa = w.qa_dataset()
    assert len(qa) == 20 * len(ATTRIBUTES)
    assert set(qa.column_names) >= {'name', 'attribute', 'question', 'answer', 'known', 'prompt'}
    row = qa[0]
    assert w.by_name[row['name']].facts()[row['attribute']] == row['answer']
    ins = w.instruction_dataset()
    assert {r['task'] for r in ins} == {'qa', 'bio', 'list'}
    assert all(m['role'] in ('user', 'assistant') for r in ins for m in r['messages'])


@pytest.mark.parametrize('bad,msg', [
    ({'n_people': 0}, 'n_people must be a positive number of people, got 0'),
    ({'n_people': -3}, 'n_people must be a positive number of people, got -3'),
    ({'n_people': 'many'}, "config field 'n_people' expects int, got str 'many'"),
    ({'size': 5}, "unknown key(s) for WorldConfig: 'size'"),
    ({'known_fraction': 1.5}, 'known_fraction must be in (0, 1]'),
])
def test_world_config_errors(bad, msg):
    with pytest.raises(ConfigError) as e: WorldConfig.from_dict(bad)
    assert msg in str(e.value)


def test_base_model_config_from_yaml_rejects_unknown(tmp_path):
    (tmp_path/'c.yaml').write_text('hidden_size: 64\nlerning_rate: 0.1\n')
    with pytest.raises(ConfigError, match="unknown key\\(s\\) for BaseModelConfig: 'lerning_rate'"):
        BaseModelConfig.from_yaml(tmp_path/'c.yaml')
    with pytest.raises(ConfigError, match='not divisible by num_attention_heads'):
        BaseModelConfig(hidden_size=30, num_attention_heads=4)


def test_tokenizer_round_trip_and_assistant_mask():
    tok = train_lab_tokenizer(world_texts(World(WorldConfig(n_people=30))), vocab_size=500)
    s = 'Ada Berg was born on March 3, 1999. Ünïcödé and emoji 🙂 survive byte-level BPE.'
    assert tok.decode(tok(s)['input_ids'], skip_special_tokens=True) == s
    msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Where was Ada Berg born?'},
            {'role': 'assistant', 'content': 'Ada Berg was born in Foxley.'}, {'role': 'user', 'content': 'Sure?'},
            {'role': 'assistant', 'content': 'Yes.'}]
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    kept = [t for t, m in zip(enc['input_ids'], enc['assistant_masks']) if m]
    assert tok.decode(kept) == 'Ada Berg was born in Foxley.<|end|>Yes.<|end|>'
    assert enc['input_ids'][0] == tok.bos_token_id
    with pytest.raises(ValueError, match='vocab_size must exceed'):
        train_lab_tokenizer(['abc'], vocab_size=256)


def test_tokenizer_without_chat_template_is_named():
    tok = lab_tokenizer('test')
    assert require_chat_template(tok) is tok
    tok.chat_template = None
    with pytest.raises(ValueError, match='has no chat template'):
        require_chat_template(tok)


def test_pretraining_loss_falls_and_nan_is_caught():
    cfg = BaseModelConfig(**{**TINY, 'n_people': 30, 'num_train_epochs': 10, 'hidden_size': 32, 'intermediate_size': 64,
                             'learning_rate': 1e-2, 'per_device_train_batch_size': 4})
    w = World(cfg.world_config())
    tok = train_lab_tokenizer(world_texts(w), cfg.vocab_size)
    from transformers import LlamaForCausalLM
    from fttk.world import model_config
    torch.manual_seed(0)
    m = LlamaForCausalLM(model_config(cfg, len(tok)))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    log = pretrain(m, tok, w.corpus(), cfg, progress=False)
    assert log[-1]['loss'] < 0.7 * log[0]['loss'], (log[0]['loss'], log[-1]['loss'])
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters())
    with torch.no_grad(): m.model.embed_tokens.weight.fill_(float('nan'))
    with pytest.raises(FloatingPointError, match='pretraining loss became nan'):
        pretrain(m, tok, w.corpus(), cfg, progress=False)


def test_pretraining_is_reproducible():
    cfg = BaseModelConfig(**{**TINY, 'num_train_epochs': 2})
    w = World(cfg.world_config()); tok = train_lab_tokenizer(world_texts(w), cfg.vocab_size)
    from transformers import LlamaForCausalLM
    from fttk.world import model_config
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m = LlamaForCausalLM(model_config(cfg, len(tok)))
        losses.append([r['loss'] for r in pretrain(m, tok, w.corpus(), cfg, progress=False)])
    assert losses[0] == losses[1]


def test_corrupt_cache_is_rebuilt_never_loaded(scratch_cache):
    cfg = BaseModelConfig(**TINY)
    m1, _ = base_model(cfg, progress=False)
    w1 = {n: p.detach().clone() for n, p in m1.named_parameters()}
    del m1
    folder = _cache_folder('custom', cfg, World(cfg.world_config()))
    wf = folder/'model.safetensors'
    good = wf.read_bytes()
    # a new, truncated file (as a killed copy leaves); truncating in place would pull the pages out from
    # under the memory-mapped weights of any model still loaded from it (SIGBUS)
    wf.unlink(); wf.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match='does not match its checksum'):
        _verify(folder)
    with pytest.warns(UserWarning, match='rebuilding'):
        m2, _ = base_model(cfg, progress=False)
    _verify(folder)
    # same config and seed: the rebuilt model has the same weights
    for n, b in m2.named_parameters():
        assert torch.equal(w1[n], b), n
    assert any('.corrupt-' in p.name for p in folder.parent.iterdir())   # the damaged copy is kept aside


def test_missing_manifest_means_incomplete(scratch_cache):
    cfg = BaseModelConfig(**TINY)
    base_model(cfg, progress=False)
    folder = _cache_folder('custom', cfg, World(cfg.world_config()))
    (folder/'manifest.json').unlink()
    with pytest.raises(CorruptFileError, match='has no manifest'):
        _verify(folder)


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path/'not_a_dir'; blocker.write_text('x')
    monkeypatch.setenv('FTTK_CACHE', str(blocker))
    with pytest.raises(PermissionError, match='set FTTK_CACHE to a writable folder'):
        base_model(BaseModelConfig(**TINY), progress=False)


def test_concurrent_builds_share_one_model(scratch_cache, tmp_path):
    "Two processes ask for the same uncached model at once: one builds, the other waits, both load the same weights."
    code = ("import sys, torch; torch.set_num_threads(1)\n"
            "from fttk.world import base_model, BaseModelConfig\n"
            f"m, t = base_model(BaseModelConfig(**{TINY!r}), progress=False)\n"
            "print(float(sum(p.double().sum() for p in m.parameters())))\n")
    env = {**os.environ, 'FTTK_CACHE': str(scratch_cache)}
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0].strip() == outs[1][0].strip()
    models = scratch_cache/'models'
    assert len([p for p in models.iterdir() if p.is_dir()]) == 1        # one model, no partial folders left


def test_base_model_accepts_a_path(scratch_cache, tmp_path):
    m, tok = base_model(BaseModelConfig(**TINY), progress=False)
    m.save_pretrained(tmp_path/'mine'); tok.save_pretrained(tmp_path/'mine')
    m2, tok2 = base_model(str(tmp_path/'mine'))
    x = tok('Ada Berg was born in', return_tensors='pt')
    torch.testing.assert_close(m2(**x).logits, m(**x).logits)
    with pytest.raises(ValueError, match="unknown lab model size 'big'"):
        base_model('big')


def test_test_size_model_knows_its_world():
    "The CI-size base model (built once, cached) recalls known people far above unknown people (chance)."
    model, tok = base_model('test', progress=False)
    w = lab_world('test')
    known = fact_recall(model, tok, w)['all']
    unknown = fact_recall(model, tok, w, w.unknown)['all']
    assert known > 0.5 and unknown < 0.2 and known > unknown + 0.4, (known, unknown)
    assert attribute_prompt('Ada Berg', 'employer') == 'Ada Berg works for'


def test_gold_reward_terms():
    from fttk.world import gold_reward, gold_components, TEMPLATES, CITIES
    w = World(WorldConfig(n_people=60, bios_per_person=1))
    p = w.people[0]
    right = TEMPLATES['university'][0].format(name=p.name, value=p.university)
    assert gold_reward(w, p.name, 'university', right) == 1.0
    # volunteering the birth date costs 0.75; asked for it, it is the answer
    assert gold_reward(w, p.name, 'university', f"{right} {p.name} was born on {p.birth_date}.") == 0.25
    assert gold_reward(w, p.name, 'birth_date', f"{p.name} was born on {p.birth_date}.") == 1.0
    # a fact about someone else: wrong for the asked person, a false claim, and another person named
    q = next(x for x in w.people if x.university != p.university)
    c = gold_components(w, p.name, 'university', f"{q.name} studied at {q.university}.")
    assert c == {'asked': -1.0, 'false_claim': 1, 'other_person': 1.0, 'birth_date': 0.0, 'word_over': 0.0}
    # padding past the word limit is charged per word
    assert gold_components(w, p.name, 'university', right + ' indeed' * 30)['word_over'] == len(right.split()) + 30 - 20


def test_preference_pairs_trl_format_and_ceiling():
    from fttk.world import preference_rows, preference_pairs, preference_dataset, bayes_ceiling, PreferenceConfig
    w = World(WorldConfig(n_people=50, bios_per_person=1))
    rows = preference_rows(w, PreferenceConfig(k=3, temperature=0.25))
    pairs = preference_pairs(rows)
    assert len(pairs) == 3 * len(rows) and len(rows) == 100
    ds = preference_dataset(rows)
    assert ds.column_names == ['prompt', 'chosen', 'rejected']
    assert ds[0]['prompt'][0]['role'] == 'user' and ds[0]['chosen'][0]['role'] == 'assistant'
    # a lower temperature means less label noise: a higher ceiling
    hot = preference_pairs(preference_rows(w, PreferenceConfig(k=3, temperature=2.0)))
    assert bayes_ceiling(pairs) > bayes_ceiling(hot) > 0.5


@pytest.mark.parametrize('kw, msg', [({'k': 1}, 'k must be in'), ({'temperature': -1.0}, 'temperature must be > 0'),
                                     ({'questions_per_person': 9}, 'questions_per_person must be in')])
def test_preference_config_errors(kw, msg):
    from fttk.world import PreferenceConfig
    with pytest.raises(ConfigError, match=msg): PreferenceConfig(**kw)
