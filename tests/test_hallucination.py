"""fttk.hallucination: SliCK categories from exact counts on a hand-made bigram model, the teacher-forced greedy and
sampling verdicts equal to generation and to transformers' warpers, the exposure world, the fine-tuning runner
resuming bit for bit, run folders read back or refused, the stop points and the Table-1 fit, and bad inputs."""
import copy, math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fttk.core import ConfigError
from fttk.hallucination import (CATEGORIES, IDK_ANSWER, FinetuneConfig, answer_scores, category_set,
                                category_sizes, check_qa_rows, evaluate_qa, exposure_world, finetune_run,
                                greedy_exact, linear_fit, mean_sd, qa_chat, qa_examples, run_or_load,
                                slick_categories, slick_category, slick_prompts, split_facts, stop_points,
                                unknown_mix)
from fttk.world import World, WorldConfig, base_model, greedy_complete, lab_tokenizer, lab_world


@pytest.fixture(scope='module')
def tok():
    return lab_tokenizer('test')


class Bigram(torch.nn.Module):
    "A language model whose next-token logits depend on the last token only: table[token]."
    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
    @property
    def device(self): return self.table.device
    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


def _one(tok, text):
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the test tokenizer"
    return ids[0]


@pytest.fixture(scope='module')
def bigram(tok):
    "After ' in' and ' of': Aldermoor (logit 5) then Brightwater (4); after ' is' the other way round."
    A, B = _one(tok, ' Aldermoor'), _one(tok, ' Brightwater')
    t = torch.zeros(len(tok), len(tok), dtype=torch.float64)
    for w, (a, b) in {' in': (A, B), ' of': (A, B), ' is': (B, A)}.items():
        t[_one(tok, w), a], t[_one(tok, w), b] = 5.0, 4.0
    return Bigram(t)


def test_slick_category_rules():
    assert [slick_category(g, 4, s) for g, s in [(4, 0), (4, 9), (3, 0), (1, 5), (0, 1), (0, 0)]] == [
        'HighlyKnown', 'HighlyKnown', 'MaybeKnown', 'MaybeKnown', 'WeaklyKnown', 'Unknown']
    with pytest.raises(ValueError, match=r'got greedy_hits=5, n_prompts=4, sample_hits=0'):
        slick_category(5, 4, 0)
    with pytest.raises(ValueError, match=r'sample_hits=-1'):
        slick_category(0, 4, -1)


def test_slick_categories_exact_counts(bigram, tok):
    # employer_city prompts end in ' of', ' in', ' in', ' in'; birth_city in ' in', ' in', ' is', ' in'
    rows = [{'name': 'Ada Berg', 'attribute': 'employer_city', 'answer': 'Aldermoor'},
            {'name': 'Ada Berg', 'attribute': 'birth_city', 'answer': 'Aldermoor'},
            {'name': 'Ada Berg', 'attribute': 'employer_city', 'answer': 'Brightwater'},
            {'name': 'Ada Berg', 'attribute': 'employer_city', 'answer': 'Calderon'}]
    assert [p.split()[-1] for p in slick_prompts(rows[1])] == ['in', 'in', 'is', 'in']
    out = slick_categories(bigram, tok, rows, n_samples=50, temperature=0.5, top_k=2)
    assert [r['category'] for r in out] == ['HighlyKnown', 'MaybeKnown', 'WeaklyKnown', 'Unknown']
    assert [r['greedy_hits'] for r in out] == [4, 3, 0, 0]
    # top-2 at T = 0.5: P(first) = 1 / (1 + exp(-(5 - 4) / 0.5)); the third city is cut by top-k: exactly 0
    hi, lo = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    for r, p in zip(out, [hi, (3 * hi + lo) / 4, lo, 0.0]):
        assert r['p_sample'] == pytest.approx(p, abs=1e-12)
    assert out[3]['sample_hits'] == 0 and out[2]['sample_hits'] > 0
    assert category_sizes(out) == {c: 1 for c in CATEGORIES}
    assert category_sizes(out, by='attribute') == {
        'birth_city': {'HighlyKnown': 0, 'MaybeKnown': 1, 'WeaklyKnown': 0, 'Unknown': 0},
        'employer_city': {'HighlyKnown': 1, 'MaybeKnown': 0, 'WeaklyKnown': 1, 'Unknown': 1}}
    # same seed, same draws
    assert slick_categories(bigram, tok, rows, n_samples=50, top_k=2) == slick_categories(
        bigram, tok, rows, n_samples=50, top_k=2)


@pytest.fixture(scope='module')
def lab():
    model, tok = base_model('test', progress=False)
    return model, tok, lab_world('test')


def test_answer_scores_equal_generation_and_warpers(lab):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper
    model, tok, world = lab
    rows = world.qa_rows(world.known[:6] + world.unknown[:3])
    prompts, answers = [r['prompt'] for r in rows], [r['answer'] for r in rows]
    sc = answer_scores(model, tok, prompts, answers, batch_size=7)
    outs = greedy_complete(model, tok, prompts, max_new_tokens=12)
    assert [ok for ok, _ in sc] == [o.strip().startswith(a) for o, a in zip(outs, answers)]
    assert any(ok for ok, _ in sc) and not all(ok for ok, _ in sc)
    for i in (0, 7):
        pi, ai = tok(prompts[i])['input_ids'], tok(' ' + answers[i], add_special_tokens=False)['input_ids']
        ids = torch.tensor([pi + ai])
        with torch.no_grad(): lg = model(ids).logits[0].double()
        logp = 0.0
        for j, t in enumerate(ai):
            pos = len(pi) - 1 + j
            w = TopKLogitsWarper(40)(ids[:, :pos + 1],
                                     TemperatureLogitsWarper(0.5)(ids[:, :pos + 1], lg[pos:pos + 1]))
            logp += torch.log_softmax(w, -1)[0, t].item()
        # float32 logits, padded (batch of 7) vs alone, divided by T = 0.5: well under 1e-5 per token
        if sc[i][1] > 0: assert math.log(sc[i][1]) == pytest.approx(logp, abs=1e-5 * len(ai))


def test_exposure_world():
    w = exposure_world(WorldConfig(n_people=30), exposures=(1, 3))
    ten = World(WorldConfig(n_people=30, bios_per_person=3))
    assert [w.exposure[p.name] for p in w.known[:4]] == [1, 3, 1, 3]
    assert all(w.exposure[p.name] == 0 for p in w.unknown)
    assert all(w.bios[p.name] == ten.bios[p.name][:w.exposure[p.name]] for p in w.known)
    assert len(w.corpus()) == sum(w.exposure.values())
    assert [p.to_dict() for p in w.people] == [p.to_dict() for p in World(WorldConfig(n_people=30)).people]


def _tiny(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=True,
                                        pad_token_id=tok.pad_token_id))


@pytest.fixture(scope='module')
def qa(tok):
    rows = lab_world('test').qa_rows()[:24]
    return [{**r, 'category': CATEGORIES[i % 4]} for i, r in enumerate(rows)]


def test_finetune_run_resumes_bit_exactly(tok, qa, tmp_path):
    base = _tiny(tok)
    cfg = FinetuneConfig(output_dir=str(tmp_path/'a'), num_train_epochs=3, learning_rate=3e-3,
                         per_device_train_batch_size=8)
    m1 = copy.deepcopy(base)
    log1 = finetune_run(m1, tok, qa[:16], {'dev': qa[16:]}, cfg)['log']
    assert [r['epoch'] for r in log1] == [0, 1, 2, 3] and log1[-1]['loss'] < log1[1]['loss']
    assert {'train_acc_known', 'train_acc_unknown', 'train_fit_known', 'dev_acc', 'dev_acc_Unknown'} <= set(log1[-1])
    class Crash(Exception): pass
    def crash(row):
        if row['epoch'] == 2: raise Crash
    cfg2 = FinetuneConfig.from_dict({**cfg.to_dict(), 'output_dir': str(tmp_path/'b')})
    with pytest.raises(Crash): finetune_run(copy.deepcopy(base), tok, qa[:16], {'dev': qa[16:]}, cfg2, callback=crash)
    m2 = copy.deepcopy(base)
    log2 = finetune_run(m2, tok, qa[:16], {'dev': qa[16:]}, cfg2, resume=True)['log']
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    drop = lambda log: [{k: v for k, v in r.items() if k != 'seconds'} for r in log]
    assert drop(log1) == drop(log2)
    # only the newest checkpoint is kept
    assert [p.name for p in (tmp_path/'a'/'checkpoints').iterdir()] == ['step_000006']


def test_greedy_exact_equals_generation(tok, qa, tmp_path):
    from fttk.sft import chat_generate, prepare_sft_data
    m = _tiny(tok)
    finetune_run(m, tok, qa[:8], {}, FinetuneConfig(output_dir=str(tmp_path/'r'), num_train_epochs=30,
                                                    learning_rate=1e-2, per_device_train_batch_size=8))
    rows = qa[:8] + qa[8:16]
    replies = chat_generate(m, tok, [qa_chat(r)['messages'][:1] for r in rows], max_new_tokens=24)
    targets = [qa_chat(r)['messages'][1]['content'] for r in rows]
    whole = prepare_sft_data([qa_chat(r) for r in rows], tok, max_length=None)[0]
    verdict = greedy_exact(m, whole, batch_size=5, pad_token_id=tok.pad_token_id)
    assert verdict == [y == t for y, t in zip(replies, targets)]
    assert any(verdict[:8])              # it fitted some of its training rows
    # n_check: only the value, '.' and <|end|> are judged
    ex = qa_examples(tok, rows[:1])[0]
    assert ex['n_check'] == len(tok(' ' + rows[0]['answer'] + '.', add_special_tokens=False)['input_ids']) + 1
    assert qa_examples(tok, rows[:1], idk=True)[0]['n_check'] == len(
        [t for t in qa_examples(tok, rows[:1], idk=True)[0]['labels'] if t != -100])


def test_evaluate_qa_idk(tok, qa):
    m = _tiny(tok)
    out = evaluate_qa(m, tok, qa[:8], 'test', idk=True)
    assert {'test_acc', 'test_answered', 'test_acc_answered', 'test_acc_HighlyKnown'} <= set(out)
    assert 0 <= out['test_answered'] <= 1


def test_run_or_load_reads_back_and_refuses_other_runs(tok, qa, tmp_path):
    base = _tiny(tok)
    cfg = FinetuneConfig(output_dir=str(tmp_path/'r'), num_train_epochs=2, per_device_train_batch_size=8)
    log = run_or_load(base, tok, qa[:8], {'dev': qa[8:12]}, cfg)
    assert not (tmp_path/'r'/'checkpoints').exists()
    before = (tmp_path/'r'/'metrics.jsonl').stat().st_mtime_ns
    assert run_or_load(base, tok, qa[:8], {'dev': qa[8:12]}, cfg) == log
    assert (tmp_path/'r'/'metrics.jsonl').stat().st_mtime_ns == before
    other = FinetuneConfig.from_dict({**cfg.to_dict(), 'learning_rate': 0.5})
    with pytest.raises(ValueError, match=r"holds a run with other config fields \['learning_rate'\]"):
        run_or_load(base, tok, qa[:8], {'dev': qa[8:12]}, other)
    with pytest.raises(ValueError, match=r'holds a run with other training rows'):
        run_or_load(base, tok, qa[1:9], {'dev': qa[8:12]}, cfg)


def test_stop_points():
    log = [{'epoch': 0, 'dev_acc': 0.9, 'train_acc': 0.0}, {'epoch': 1, 'dev_acc': 0.3, 'train_acc': 0.5},
           {'epoch': 2, 'dev_acc': 0.4, 'train_acc': 0.9}, {'epoch': 3, 'dev_acc': 0.4, 'train_acc': 1.0},
           {'epoch': 4, 'dev_acc': 0.2, 'train_acc': 1.0}]
    sp = stop_points(log)
    # epoch 0 (no training) is never a stop point; ties go to the earlier epoch
    assert (sp['EARLY_STOP']['epoch'], sp['CONVERGENCE']['epoch'], sp['CONVERGENCE']['converged']) == (2, 3, True)
    sp = stop_points(log[:3])
    assert (sp['CONVERGENCE']['epoch'], sp['CONVERGENCE']['converged']) == (2, False)


def test_linear_fit_against_numpy():
    rng = np.random.default_rng(0)
    pts = [{'train_fit_known': int(k), 'train_fit_unknown': int(u), 'n_known': 60, 'n_unknown': 40,
            'test_acc': (30 + 7.3 * k / 100 - 8.3 * u / 100 + e) / 100}
           for k, u, e in zip(rng.integers(0, 60, 30), rng.integers(0, 40, 30), rng.normal(0, 0.5, 30))]
    f = linear_fit(pts)
    X = np.array([[p['train_fit_known'] / 100, p['train_fit_unknown'] / 100] for p in pts])
    y = np.array([100 * p['test_acc'] for p in pts])
    # R^2 of a least-squares fit with intercept = squared correlation of y with the fitted values
    A = np.c_[np.ones(len(y)), X]
    yhat = A @ np.linalg.solve(A.T @ A, A.T @ y)
    assert f['r2'] == pytest.approx(np.corrcoef(y, yhat)[0, 1] ** 2, abs=1e-12)
    assert [f['beta_0'], f['beta_kn'], f['beta_unk']] == pytest.approx(list(np.linalg.solve(A.T @ A, A.T @ y)),
                                                                       abs=1e-9)
    assert f['beta_kn'] > 0 > f['beta_unk']


def test_splits_and_sets():
    rows = [{'name': f'P{i}', 'attribute': a, 'answer': 'x', 'category': CATEGORIES[i % 4]}
            for i in range(40) for a in ('birth_city', 'major', 'university')]
    sp = split_facts(rows, ood_attributes=('university',), dev_fraction=0.1, test_fraction=0.3, seed=1)
    assert (len(sp['train']), len(sp['dev']), len(sp['test']), len(sp['ood'])) == (48, 8, 24, 12)
    assert {r['name'] for r in sp['ood']} == {r['name'] for r in sp['test']}
    mix = unknown_mix(sp['train'], 12, 0.75, seed=3)
    assert sum(r['category'] == 'Unknown' for r in mix) == 9 and len(mix) == 12
    assert {r['category'] for r in category_set(sp['train'], 'WeaklyKnown', 4)} == {'WeaklyKnown'}
    assert len(category_set(sp['train'], 'Natural', 48)) == 48
    assert qa_chat(rows[0], idk=True)['messages'][1]['content'] == IDK_ANSWER
    assert mean_sd([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))


@pytest.mark.parametrize('call, exc, msg', [
    (lambda: check_qa_rows([]), ValueError, r'qa_rows is empty'),
    (lambda: check_qa_rows([{'name': 'A', 'attribute': 'major', 'answer': 'x'}, {'name': 'B'}]), ValueError,
     r"qa row 1: lacks 'attribute', 'answer'"),
    (lambda: check_qa_rows([{'name': 'A', 'attribute': 'shoe_size', 'answer': 'x'}]), ValueError,
     r"qa row 0: attribute 'shoe_size' is not one of"),
    (lambda: check_qa_rows([{'name': 'A', 'attribute': 'major', 'answer': ' '}]), ValueError,
     r'qa row 0: answer must be a non-empty string'),
    (lambda: check_qa_rows([{'name': 'A', 'attribute': 'major', 'answer': 'x', 'category': 'Famous'}],
                           need=('name', 'attribute', 'answer', 'category')), ValueError,
     r"qa row 0: category 'Famous' is not one of"),
    (lambda: exposure_world(exposures=(1, 0)), ValueError, r'exposures must be positive whole numbers'),
    (lambda: exposure_world(exposures=()), ValueError, r'exposures must be positive whole numbers'),
    (lambda: split_facts([{'name': 'A', 'attribute': 'major', 'answer': 'x'}], ood_attributes=('height',)),
     ValueError, r"ood_attributes \['height'\] are not attributes"),
    (lambda: split_facts([{'name': 'A', 'attribute': 'major', 'answer': 'x'}], dev_fraction=0.5,
                         test_fraction=0.5), ValueError, r'dev_fraction and test_fraction must be > 0 with sum < 1'),
    (lambda: unknown_mix([], 10, 1.5), ValueError, r'unknown_ratio must be in \[0, 1\], got 1.5'),
    (lambda: unknown_mix([{'category': 'Unknown'}] * 3, 10, 0.5), ValueError,
     r'needs 5 Unknown and 5 Known rows; the pool has 3 and 0'),
    (lambda: category_set([], 'Famous', 1), ValueError, r"category must be one of .*got 'Famous'"),
    (lambda: category_set([], 'Unknown', 1), ValueError, r'asked for 1 Unknown rows; the pool has 0'),
    (lambda: FinetuneConfig(num_train_epochs=1.5), ConfigError, r'num_train_epochs must be a whole number'),
    (lambda: FinetuneConfig(max_steps=5), ConfigError, r'max_steps must be -1'),
    (lambda: FinetuneConfig(save_total_limit=0), ConfigError, r'save_total_limit must be >= 1'),
    (lambda: stop_points([{'epoch': 0, 'dev_acc': 0.1, 'train_acc': 0}]), ValueError, r'no trained epoch'),
    (lambda: stop_points([{'epoch': 1, 'train_acc': 0}]), ValueError, r"no 'dev_acc' column"),
    (lambda: linear_fit([{}] * 3), ValueError, r'at least 4 points, got 3'),
    (lambda: mean_sd([]), ValueError, r'mean_sd of no values'),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg): call()


def test_bad_inputs_with_a_model(bigram, tok, qa, tmp_path):
    row = [{'name': 'A B', 'attribute': 'major', 'answer': 'Law'}]
    with pytest.raises(ValueError, match=r'n_samples must be >= 0, got -1'):
        slick_categories(bigram, tok, row, n_samples=-1)
    with pytest.raises(ValueError, match=r'temperature must be > 0, got 0'):
        slick_categories(bigram, tok, row, temperature=0)
    with pytest.raises(ValueError, match=r'top_k must be >= 1, got 0'):
        slick_categories(bigram, tok, row, top_k=0)
    cfg = FinetuneConfig(output_dir=str(tmp_path/'x'), num_train_epochs=1)
    with pytest.raises(ValueError, match=r"qa row 0: lacks 'category'"):
        finetune_run(_tiny(tok), tok, row, {}, cfg)
    with pytest.raises(ValueError, match=r'eval_sets must map a name to QA rows, got list'):
        finetune_run(_tiny(tok), tok, qa[:4], [qa[4:8]], cfg)
