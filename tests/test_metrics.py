"fttk.metrics: from-scratch ROUGE/BLEU/AUC equal to the reference libraries; exact match; errors; offline evaluate modules."
import json, os, subprocess, sys, textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from fttk.metrics import (accuracy, bleu, exact_match, exact_match_scores, metric_path, metric_script, normalize_answer,
                          roc_auc, rouge, rouge_scores, rouge_tokenize, token_f1, tokenize_13a, METRICS)

rouge_scorer = pytest.importorskip('rouge_score.rouge_scorer')
sacrebleu = pytest.importorskip('sacrebleu')

TYPES = ['rouge1', 'rouge2', 'rouge3', 'rougeL', 'rougeLsum']

# --------------------------------------------------------------------------- ROUGE
ROUGE_CASES = [
    ('the cat sat on the mat', 'the cat was on the mat'),
    ('', 'a reference with words'),                              # empty prediction
    ('a prediction with words', ''),                             # empty reference
    ('', ''),
    ('Ada Lindqvist was born in Oslo.', 'Ada Lindqvist was born in Oslo.'),   # identical
    ('word', 'word'),                                            # too short for bigrams
    ('the the the the', 'the cat'),                              # clipping
    ('a b c d', 'd c b a'),
    ("Dr. Lindqvist's café, 1984!", 'dr lindqvist s caf 1984'),  # tokenizer: punctuation, non-ASCII
    ('Ada studied physics.\nShe was born in Oslo in 1984.', 'Ada was born in Oslo.\nShe studied physics in Bergen.'),
    ('a b a b a\nb a b\n\nc a', 'a a b\nb b a a\nc'),            # Lsum: repeated tokens, blank line
    ('!!! ...', 'only punctuation on the other side'),
]


def _ref_scores(pred, ref, types=TYPES):
    return rouge_scorer.RougeScorer(types, use_stemmer=False).score(ref, pred)


@pytest.mark.parametrize('pred,ref', ROUGE_CASES)
def test_rouge_scratch_equals_rouge_score(pred, ref):
    ours, theirs = rouge_scores(pred, [ref], TYPES), _ref_scores(pred, ref)
    for t in TYPES:
        assert tuple(map(float, ours[t])) == tuple(map(float, theirs[t])), (t, ours[t], theirs[t])


def test_rouge_tokenizer_equals_rouge_score():
    from rouge_score import tokenize
    for text in [p for p, _ in ROUGE_CASES] + ['İstanbul ǅ x_y ½ 3.14 e-mail', 'TAB\there\r\nnew']:
        assert rouge_tokenize(text) == tokenize.tokenize(text, None)


def test_rouge_corpus_both_backends_equal_rouge_score():
    preds = [p for p, _ in ROUGE_CASES]
    refs = [r for _, r in ROUGE_CASES]
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    per = [scorer.score(r, p) for p, r in zip(preds, refs)]
    expect = {t: [float(s[t].fmeasure) for s in per] for t in TYPES}
    for backend in ('fttk', 'rouge_score'):
        assert rouge(preds, refs, TYPES, use_aggregator=False, backend=backend) == expect
        agg = rouge(preds, refs, TYPES, backend=backend)
        assert agg == {t: sum(v) / len(v) for t, v in expect.items()}


def test_rouge_multiple_references_takes_best_like_score_multi():
    preds = ['Bo Berg teaches music.', 'x y z']
    refs = [['Bo Berg is a music teacher.', 'Bo Berg teaches music in Lund.', 'nothing'], ['a b', 'c d']]   # second: all ties at 0
    scorer = rouge_scorer.RougeScorer(TYPES)
    for p, rs in zip(preds, refs):
        ours, theirs = rouge_scores(p, rs, TYPES), scorer.score_multi(rs, p)
        for t in TYPES: assert tuple(map(float, ours[t])) == tuple(map(float, theirs[t]))
    assert rouge(preds, refs, TYPES, backend='fttk') == rouge(preds, refs, TYPES, backend='rouge_score')


_words = st.sampled_from(['a', 'b', 'c', 'the', 'Oslo', 'oslo.', '1984', ',', '\n', 'x-y'])
_texts = st.lists(_words, max_size=14).map(' '.join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts, st.lists(_texts, min_size=1, max_size=3))
def test_rouge_property_equals_rouge_score(pred, refs):
    ours = rouge_scores(pred, refs, TYPES)
    theirs = rouge_scorer.RougeScorer(TYPES).score_multi(refs, pred)
    for t in TYPES:
        assert tuple(map(float, ours[t])) == tuple(map(float, theirs[t])), t


def test_rouge_stemmer_needs_library_backend():
    with pytest.raises(ValueError, match=r"use_stemmer=True needs backend='rouge_score'"):
        rouge(['running'], ['run'], backend='fttk', use_stemmer=True)
    got = rouge(['running fast'], ['run fast'], ['rouge1'], use_stemmer=True)['rouge1']
    assert got == 1.0


# --------------------------------------------------------------------------- BLEU
def _streams(refs):
    refs = [[r] if isinstance(r, str) else r for r in refs]
    k = max(map(len, refs))
    return [[rs[i] if i < len(rs) else None for rs in refs] for i in range(k)]


def _sacre(preds, refs, **kw):
    s = sacrebleu.corpus_bleu(preds, _streams(refs), **kw)
    return dict(score=s.score, counts=list(s.counts), totals=list(s.totals), precisions=list(s.precisions),
                bp=s.bp, sys_len=s.sys_len, ref_len=s.ref_len)


BLEU_CORPORA = {
    'basic': (['Ada Lindqvist was born in Oslo in 1984.', 'She studies physics.'],
              ['Ada Lindqvist was born in 1984 in Oslo.', 'She is a physics student.']),
    'identical': (['The cat sat on the mat.', 'Bo Berg teaches music in Lund.'],
                  ['The cat sat on the mat.', 'Bo Berg teaches music in Lund.']),
    'empty_prediction': (['', 'the cat sat on the mat'], ['a b c', 'the cat sat on a mat']),
    'all_empty_predictions': (['', ''], ['a b c', 'd e']),
    'empty_everything': ([''], ['']),
    'multi_refs': (['It is a guide to action which ensures that the military always obeys the commands of the party.',
                    'he read the book because he was interested in world history'],
                   [['It is a guide to action that ensures that the military will forever heed Party commands.',
                     'It is the guiding principle which guarantees the military forces always being under the command of the Party.',
                     'It is the practical guide for the army always to heed the directions of the party.'],
                    ['he was interested in world history because he read the book', 'he read a book about world history',
                     'history']]),
    'variable_ref_counts': (['a b c d e', 'x y z'], [['a b c d e f', 'a b'], 'x y w']),
    'no_3_or_4gram_match': (['She studies physics.'], ['She studied physics.']),
    'short_no_4grams': (['a b c'], ['a b c d']),
    'clipping': (['the the the the the the the'], [['the cat is on the mat', 'there is a cat on the mat']]),
    'tokenizer': (['Born 1984-05-01; cost $1,000.50 &amp; "more" (x/y) a.b,c'],
                  ['Born 1984 - 05 - 01 ; cost $ 1,000.50 & " more " ( x / y ) a . b , c']),
    'case': (['THE Cat sat'], ['the cat sat']),
    'longer_than_ref': (['a b c d e f g h i j'], ['a b c']),
}
SMOOTHS = [('exp', None), ('none', None), ('floor', None), ('floor', 0.3), ('add-k', None), ('add-k', 2)]


@pytest.mark.parametrize('name', list(BLEU_CORPORA))
@pytest.mark.parametrize('smooth_method,smooth_value', SMOOTHS)
def test_bleu_scratch_equals_sacrebleu(name, smooth_method, smooth_value):
    preds, refs = BLEU_CORPORA[name]
    kw = dict(smooth_method=smooth_method, smooth_value=smooth_value)
    expect = _sacre(preds, refs, **kw)
    for backend in ('fttk', 'sacrebleu'):
        got = bleu(preds, refs, backend=backend, **kw)
        assert got == expect, (backend, got, expect)   # bit-identical, not merely close


@pytest.mark.parametrize('name', list(BLEU_CORPORA))
def test_bleu_options_equal_sacrebleu(name):
    preds, refs = BLEU_CORPORA[name]
    for kw in (dict(lowercase=True), dict(tokenize='none'), dict(effective_order=True), dict(max_ngram_order=2)):
        expect = _sacre(preds, refs, **{('use_effective_order' if k == 'effective_order' else k): v for k, v in kw.items()}) \
            if 'max_ngram_order' not in kw else None
        if expect is None:
            from sacrebleu.metrics import BLEU
            s = BLEU(max_ngram_order=2).corpus_score(preds, _streams(refs))
            expect = dict(score=s.score, counts=list(s.counts), totals=list(s.totals), precisions=list(s.precisions),
                          bp=s.bp, sys_len=s.sys_len, ref_len=s.ref_len)
        assert bleu(preds, refs, backend="fttk", **kw) == expect, kw


def test_bleu_default_is_exact_sacrebleu_score():
    preds, refs = BLEU_CORPORA['multi_refs']
    assert bleu(preds, refs, backend='fttk')['score'] == sacrebleu.corpus_bleu(preds, _streams(refs)).score


def test_tokenize_13a_equals_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    tok = Tokenizer13a()
    lines = [p for ps, _ in BLEU_CORPORA.values() for p in ps] + [
        'a-\nb<skipped>c&quot;d&lt;e&gt;f&amp;amp;', '3.14, 2,5. x.5 .5 5. ,a', 'üñí©ødé — “quotes” 1-2-3 a-b',
        "it's {a|b}~[c\\d]^_`e`!#%*+=?@", '  spaces   \t tabs  ']
    for line in lines: assert tokenize_13a(line) == tok(line), line


_bwords = st.sampled_from(['the', 'cat', 'sat', 'on', 'mat', 'a', '1984', '-', '.', ',', '5', 'Oslo', 'oslo'])
_btexts = st.lists(_bwords, max_size=12).map(' '.join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_btexts, st.lists(_btexts, min_size=1, max_size=3)), min_size=1, max_size=4),
       st.sampled_from(SMOOTHS))
def test_bleu_property_equals_sacrebleu(pairs, smooth):
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    kw = dict(smooth_method=smooth[0], smooth_value=smooth[1])
    assert bleu(preds, refs, backend="fttk", **kw) == _sacre(preds, refs, **kw)


# --------------------------------------------------------------------------- exact match
@pytest.mark.parametrize('text,norm', [
    ('  The Eiffel-Tower! ', 'eiffeltower'),
    ('“Oslo”, Norway.', 'oslo norway'),              # Unicode quotes go too
    ('Theodore and an ant', 'theodore and ant'),     # articles only as whole words
    ('A', ''),
    ('1,984', '1984'),
    ('$5 + 3%', '5 3'),                              # ASCII symbols are punctuation in SQuAD's set
    ('Ada\tLINDQVIST\n', 'ada lindqvist'),
    ('l’Aquila — Italy', 'laquila italy'),
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_normalize_answer_matches_squad_on_ascii():
    import re, string
    def squad(s):   # the SQuAD v1.1 evaluation script's normalisation
        s = ''.join(ch for ch in s.lower() if ch not in set(string.punctuation))
        return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', s).split())
    for s in ['The answer is: (b) an apple!', "Don't stop-believing", 'A.B.C. the end', 'a  an   the']:
        assert normalize_answer(s) == squad(s)


def test_exact_match_modes():
    preds = ['Oslo.', '1984, in a small town near Oslo', 'It was in 1984.', '19845', 'the', 'Oslo', 'in 1984 and']
    golds = ['oslo', '1984', '1984', '1984', 'The', 'The', ['2001', 'In 1984']]
    assert exact_match_scores(preds, golds, 'exact') == [True, False, False, False, True, False, False]
    assert exact_match_scores(preds, golds, 'prefix') == [True, True, False, False, True, False, True]
    assert exact_match_scores(preds, golds, 'contains') == [True, True, True, False, True, False, True]
    assert exact_match(preds, golds, 'contains') == 5 / 7
    assert exact_match(['Paris'], [['Lyon', 'paris!']]) == 1.0


def test_token_f1():
    assert token_f1(['born in Oslo Norway'], ['Oslo']) == pytest.approx(0.4)
    assert token_f1(['', 'x', 'a b'], ['the', 'y', ['b', 'a b']], average=False) == [1.0, 0.0, 1.0]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('fn', [exact_match, token_f1, rouge, bleu])
def test_text_metric_errors(fn):
    name = fn.__name__
    with pytest.raises(ValueError, match=rf'^{name}: 2 predictions but 1 references; they must pair up one to one$'):
        fn(['a', 'b'], ['a'])
    with pytest.raises(TypeError, match=rf'^{name}: predictions\[1\] is int 5, expected a string$'):
        fn(['a', 5], ['a', 'b'])
    with pytest.raises(TypeError, match=rf'^{name}: predictions\[0\] is list \[1, 2\], expected a string$'):
        fn([[1, 2]], ['a'])   # token ids instead of decoded text
    with pytest.raises(TypeError, match=rf'^{name}: predictions must be a list of strings, got a single str'):
        fn('a', ['a'])
    with pytest.raises(TypeError, match=rf'^{name}: references\[0\]\[1\] is NoneType None, expected a string$'):
        fn(['a'], [['a', None]])
    with pytest.raises(ValueError, match=rf'^{name}: references\[0\] is an empty list'):
        fn(['a'], [[]])
    with pytest.raises(ValueError, match=rf'^{name}: no predictions given$'):
        fn([], [])


def test_other_errors():
    with pytest.raises(ValueError, match=r"exact_match: mode must be one of \['exact', 'prefix', 'contains'\], got 'fuzzy'"):
        exact_match(['a'], ['a'], mode='fuzzy')
    with pytest.raises(ValueError, match=r"rouge: unknown rouge type\(s\) \['rouge0', 'rougeX'\]"):
        rouge(['a'], ['a'], rouge_types=['rouge1', 'rouge0', 'rougeX'])
    with pytest.raises(ValueError, match=r"bleu: smooth_method must be one of \['none', 'floor', 'add-k', 'exp'\], got 'laplace'"):
        bleu(['a'], ['a'], smooth_method='laplace')
    with pytest.raises(ValueError, match=r"bleu: the fttk backend knows tokenize='13a' or 'none', got 'intl'"):
        bleu(['a'], ['a'], tokenize='intl', backend='fttk')
    with pytest.raises(ValueError, match=r"bleu: backend must be 'auto', 'fttk' or 'sacrebleu', got 'nltk'"):
        bleu(['a'], ['a'], backend='nltk')
    with pytest.raises(ValueError, match=r'^accuracy: 3 predictions but 2 references'):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r'^roc_auc: references hold only negatives; AUC needs both classes$'):
        roc_auc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match=r'^roc_auc: references\[1\] is 2; labels must be 0 or 1$'):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r'^roc_auc: prediction_scores\[0\] is nan; scores must be finite numbers$'):
        roc_auc([float('nan'), 0.2], [0, 1])
    with pytest.raises(ValueError, match=r"^roc_auc: prediction_scores\[0\] is 'high'; scores must be finite numbers$"):
        roc_auc(['high', 0.2], [0, 1])
    with pytest.raises(ValueError, match=r'^accuracy: predictions must be 1-d'):
        accuracy(np.zeros((2, 2)), [0, 1])
    with pytest.raises(TypeError, match=r'^normalize_answer: expected a string, got NoneType None$'):
        normalize_answer(None)


# --------------------------------------------------------------------------- accuracy, AUC
def _auc_pairs(s, y):
    pos, neg = [a for a, l in zip(s, y) if l], [b for b, l in zip(s, y) if not l]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6).map(lambda v: v / 3), st.booleans()), min_size=2, max_size=40)
       .filter(lambda r: 0 < sum(l for _, l in r) < len(r)))
def test_roc_auc_equals_pairwise_definition(rows):
    s, y = [a for a, _ in rows], [int(l) for _, l in rows]
    assert roc_auc(s, y) == pytest.approx(_auc_pairs(s, y), abs=1e-12)


def test_roc_auc_and_accuracy_equal_sklearn():
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50); s = np.round(rng.random(50), 1)
        if 0 < y.sum() < 50:
            assert roc_auc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        p = rng.integers(0, 2, 50)
        assert accuracy(p, y) == pytest.approx(metrics.accuracy_score(y, p))


def test_accuracy_and_auc_basics():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(np.array(['a', 'b']), ['a', 'b']) == 1.0
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0 and roc_auc([0.5, 0.5], [0, 1]) == 0.5
    import torch
    assert roc_auc(torch.tensor([0.2, 0.8, 0.4]), torch.tensor([0, 1, 1])) == 1.0


# --------------------------------------------------------------------------- evaluate modules
def test_metric_path_writes_scripts_and_repairs_them(tmp_path, monkeypatch):
    monkeypatch.setenv('FTTK_CACHE', str(tmp_path))
    for name in METRICS:
        p = metric_path(name)
        assert p == tmp_path / 'metrics' / f'fttk_{name}'
        assert (p / f'fttk_{name}.py').read_text() == metric_script(name)
        compile(metric_script(name), f'fttk_{name}.py', 'exec')
    script = metric_path('rouge') / 'fttk_rouge.py'
    script.write_text('broken')                      # stale or edited: rewritten on next use
    metric_path('rouge')
    assert script.read_text() == metric_script('rouge')
    with pytest.raises(ValueError, match=r"no fttk evaluate module named 'meteor'; available: rouge, bleu, exact_match, accuracy, roc_auc"):
        metric_path('meteor')


_EVAL_SCRIPT = textwrap.dedent('''
    import json, socket, sys
    def no_network(*a, **k): raise RuntimeError("network touched")
    socket.socket.connect = no_network
    socket.create_connection = no_network
    from fttk.metrics import load_metric
    out = {}
    ms = {n: load_metric(n) for n in ("rouge", "bleu", "exact_match", "accuracy", "roc_auc")}
    preds = ["Ada was born in Oslo.\\nShe studies physics.", "", "Bo Berg teaches music."]
    refs = ["Ada Lindqvist was born in Oslo.\\nShe is a physicist.", ["x y", "z"], ["Bo Berg is a music teacher.", "Bo teaches music."]]
    out["rouge"] = ms["rouge"].compute(predictions=preds, references=refs)
    out["rouge_list"] = ms["rouge"].compute(predictions=preds, references=refs, use_aggregator=False, rouge_types=["rouge1"])
    out["bleu"] = ms["bleu"].compute(predictions=preds, references=refs)
    rev = ms["bleu"].compute(predictions=preds[::-1], references=refs[::-1])   # list reference first this time
    out["bleu_rev_score"] = rev["score"]
    out["em"] = ms["exact_match"].compute(predictions=["Oslo.", "1984 in Oslo"], references=["oslo", ["1984"]], mode="prefix")
    out["acc"] = ms["accuracy"].compute(predictions=[1, 0, 1], references=[1, 1, 1])
    out["acc_str"] = ms["accuracy"].compute(predictions=["a", "b"], references=["a", "a"])
    out["auc"] = ms["roc_auc"].compute(prediction_scores=[0.1, 0.8, 0.4, 0.4], references=[0, 1, 0, 1])
    m = ms["rouge"]
    for p, r in zip(preds, refs): m.add(prediction=p, reference=r)
    out["rouge_add"] = m.compute()
    errs = []
    for kw in (dict(predictions=["a", "b"], references=["a"]), dict(predictions=[1, 2], references=["a", "b"])):
        try: ms["bleu"].compute(**kw)
        except Exception as e: errs.append(str(e).splitlines()[0])
    out["errors"] = errs
    print("JSON" + json.dumps(out))
''')


def test_evaluate_modules_offline_equal_functions(tmp_path):
    "Both with HF_HUB_OFFLINE/HF_EVALUATE_OFFLINE set and without them, sockets blocked: no network, same numbers."
    procs = {}
    for offline in (True, False):       # the two runs go side by side: each is mostly `import evaluate`
        env = {k: v for k, v in os.environ.items() if k not in ('HF_HUB_OFFLINE', 'HF_EVALUATE_OFFLINE', 'HF_DATASETS_OFFLINE')}
        d = tmp_path / f'offline_{offline}'
        env.update(FTTK_CACHE=str(d / 'fttk'), HF_MODULES_CACHE=str(d / 'modules'), HF_HOME=str(d / 'hf'), OMP_NUM_THREADS='1')
        if offline: env.update(HF_HUB_OFFLINE='1', HF_EVALUATE_OFFLINE='1')
        procs[offline] = (d, subprocess.Popen([sys.executable, '-c', _EVAL_SCRIPT], env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    preds = ['Ada was born in Oslo.\nShe studies physics.', '', 'Bo Berg teaches music.']
    refs = ['Ada Lindqvist was born in Oslo.\nShe is a physicist.', ['x y', 'z'], ['Bo Berg is a music teacher.', 'Bo teaches music.']]
    for offline, (d, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (offline, stderr[-3000:])
        out = json.loads(stdout.split('JSON', 1)[1])
        assert out['rouge'] == rouge(preds, refs)
        assert out['rouge_add'] == rouge(preds, refs)
        assert out['rouge_list'] == rouge(preds, refs, ['rouge1'], use_aggregator=False)
        assert out['bleu'] == _sacre(preds, refs)
        assert out['bleu_rev_score'] == _sacre(preds[::-1], refs[::-1])['score']
        assert out['em'] == {'exact_match': 1.0}
        assert out['acc'] == {'accuracy': 2 / 3} and out['acc_str'] == {'accuracy': 0.5}
        assert out['auc'] == {'roc_auc': pytest.approx(_auc_pairs([0.1, 0.8, 0.4, 0.4], [0, 1, 0, 1]))}
        assert out['errors'] == ['Mismatch in the number of predictions (2) and references (1)',
                                 "Predictions and/or references don't match the expected format."]
        assert (d / 'modules' / 'evaluate_modules' / 'metrics' / 'fttk_rouge').is_dir()
