"fttk.serval: the risk model, the noisy-label machinery, the vertical model, bad inputs."
import math

import numpy as np
import pytest
import torch

from fttk.core import ConfigError
from fttk.metrics import roc_auc
from fttk.serval import (FEATURES, SCALES, ClinicConfig, FTTransformer, PatientConfig,
                         VerticalConfig, beliefs, feature_matrix, gmm_clean_prob, llm_annotate,
                         patients, render_record, risk_intercept, train_vertical, vertical_predict)


def test_risk_probabilities_match_the_formula():
    cfg = PatientConfig(n=50, seed=3, w_age=1.1, w_glucose_bmi=-0.3)
    b0 = risk_intercept(cfg)
    for r in patients(cfg)[:20]:
        z = {k: (r[k] - m) / s for k, (m, s) in SCALES.items()}
        logit = (b0 + sum(cfg.weights()[k] * (z[k] if k in z else r[k]) for k in FEATURES)
                 + cfg.w_age_smoker * z['age'] * r['smoker']
                 + cfg.w_glucose_bmi * z['glucose'] * z['bmi'])
        assert r['p'] == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-12, abs=1e-15)


def test_prevalence_within_three_standard_errors():
    n = 4000
    rate = np.mean([r['y'] for r in patients(PatientConfig(n=n, prevalence=0.2))])
    assert abs(rate - 0.2) < 3 * math.sqrt(0.2 * 0.8 / n)


def test_beliefs_flip_and_forget():
    w = beliefs(PatientConfig(), 1.0, biased=('smoker',)).weights()
    assert w['smoker'] == -0.8 and w['age'] == 0.9
    assert beliefs(PatientConfig(), 0.0, biased=()).weights() == {k: 0.0 for k in FEATURES}


def _flipped_task(n=2000, flip=0.3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    p = 1 / (1 + np.exp(-(2 * X[:, 0] - 1.5 * X[:, 1] + X[:, 2] * X[:, 3])))
    y = (rng.random(n) < p).astype(int)
    flipped = rng.random(n) < flip
    return X, y, np.where(flipped, 1 - y, y).astype(np.float32), flipped


def test_gmm_split_separates_injected_noise():
    X, y, noisy, flipped = _flipped_task()
    # a model that learned the clean rule
    p = 1 / (1 + np.exp(-(2 * X[:, 0] - 1.5 * X[:, 1] + X[:, 2] * X[:, 3])))
    loss = -(noisy * np.log(p) + (1 - noisy) * np.log(1 - p))
    w = gmm_clean_prob(loss)
    assert roc_auc(w.tolist(), (~flipped).astype(int).tolist()) > 0.7   # chance is 0.5
    assert w[~flipped].mean() > w[flipped].mean() + 0.2


def test_vertical_model_beats_its_noisy_labels():
    X, y, noisy, _ = _flipped_task(n=1500, flip=0.3)
    Xte, yte, _, _ = _flipped_task(n=1000, flip=0.0, seed=1)
    # soft labels: the noisy label blurred toward 0.5, as an unsure annotator would give
    soft = 0.25 + 0.5 * noisy
    Xv, yv, _, _ = _flipped_task(n=100, flip=0.0, seed=2)     # the small clean validation set
    model, log = train_vertical(X, soft, VerticalConfig(max_epochs=25, seed=0), Xv, yv.tolist())
    noisy_te = _flipped_task(n=1000, flip=0.3, seed=1)[2]     # the annotator on the test rows
    auc_model = roc_auc(vertical_predict(model, Xte).tolist(), yte.tolist())
    assert auc_model > roc_auc(noisy_te.tolist(), yte.tolist()) + 0.05
    assert log['epochs'] <= 25


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ConfigError, match=r"prevalence must be in \(0, 1\), got 0.0"):
        PatientConfig(prevalence=0.0)
    with pytest.raises(ConfigError, match="n must be at least 2 patients, got 1"):
        PatientConfig(n=1)
    with pytest.raises(ConfigError, match=r"quality must be in \[0, 1\], got 2.0"):
        ClinicConfig(quality=2.0)
    with pytest.raises(ConfigError, match=r"biased factors \['salt'\] are not features"):
        ClinicConfig(biased=['salt'])
    with pytest.raises(ValueError, match=r"biased factors \['salt'\] are not features"):
        beliefs(PatientConfig(), 0.5, biased=('salt',))
    with pytest.raises(KeyError, match="row 1 has no feature 'glucose'"):
        feature_matrix([dict.fromkeys(FEATURES, 1), {'age': 1, 'sbp': 1, 'chol': 1, 'bmi': 1}])
    with pytest.raises(KeyError, match=r"render_record: patient has no \['sbp'"):
        render_record({'age': 40})
    with pytest.raises(ValueError, match=r"needs a 1-D array of >= 2 finite losses"):
        gmm_clean_prob([0.1, float('nan')])
    with pytest.raises(ValueError, match=r"expects \(batch, 3\) features, got \(2, 4\)"):
        FTTransformer(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"train_vertical: labels must lie in \[0, 1\]"):
        train_vertical(np.zeros((4, 2)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"one label per row; got \(4, 2\) and \(3,\)"):
        train_vertical(np.zeros((4, 2)), [0, 1, 0])
    with pytest.raises(ConfigError, match="d_token 30 is not divisible by n_heads 4"):
        VerticalConfig(d_token=30)
    with pytest.raises(ValueError, match="read must be 'expected' or 'text', got 'greedy'"):
        llm_annotate(None, None, [], read='greedy')


# --- calibration, back-tuning and the loop

from fttk.serval import (_logit, back_tune, breast_cancer_rows, digit_target, digit_to_prob,
                         platt_scale, render_table, serval_loop)
from fttk.world import base_model


def test_platt_scale_equals_sklearn_logistic_regression():
    sklearn = pytest.importorskip('sklearn.linear_model')
    rng = np.random.default_rng(0)
    s = 1 / (1 + np.exp(-rng.normal(-0.8, 0.3, 3000)))       # squeezed scores
    y = (rng.random(3000) < 1 / (1 + np.exp(-6 * (s - s.mean()) / s.std() * 0.3))).astype(int)
    f = platt_scale(s, y, ridge=0.0)
    u = ((_logit(s) - _logit(s).mean()) / _logit(s).std())[:, None]
    ref = sklearn.LogisticRegression(C=np.inf, tol=1e-12, max_iter=1000).fit(u, y)
    # both maximise the same concave likelihood; Newton converges to double precision
    assert f.a == pytest.approx(ref.coef_[0, 0], rel=1e-6)
    assert f.b == pytest.approx(ref.intercept_[0], rel=1e-6, abs=1e-9)
    assert np.allclose(f(s), ref.predict_proba(u)[:, 1], rtol=1e-6)


def test_digit_target_keeps_the_expectation():
    p = np.linspace(0, 1, 101)
    t = digit_target(p).double().numpy()
    assert np.allclose(t.sum(1), 1) and (t >= 0).all() and ((t > 0).sum(1) <= 2).all()
    assert np.allclose(t @ digit_to_prob(np.arange(10)), np.clip(p, 0.05, 0.95), atol=1e-6)


@pytest.fixture(scope='module')
def lab_llm():
    return base_model('test', progress=False)


def _weights(model): return {k: v.clone() for k, v in model.state_dict().items()}


def test_back_tune_learns_the_targets_and_touches_only_attention(lab_llm):
    model, tok = base_model('test', progress=False)          # a fresh copy: tuning is in place
    rows = patients(PatientConfig(n=96, seed=5))
    target = np.array([r['p'] for r in rows])
    before, w0 = llm_annotate(model, tok, rows), _weights(model)
    log = back_tune(model, tok, rows, target, epochs=3, lr=3e-3, seed=0)
    after = llm_annotate(model, tok, rows)
    assert log['loss'][-1] < log['loss'][0]
    assert np.corrcoef(after, target)[0, 1] > np.corrcoef(before, target)[0, 1] + 0.2
    changed = {k for k in w0 if not torch.equal(w0[k], model.state_dict()[k])}
    assert changed and all(k.split('.')[-2] in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
                           for k in changed), sorted(changed)[:4]


def test_back_tune_undoes_a_tuning_that_hurts_validation(lab_llm):
    model, tok = base_model('test', progress=False)
    rows = patients(PatientConfig(n=64, seed=5))
    val = patients(PatientConfig(n=60, seed=6))
    w0 = _weights(model)
    # validation labels that disagree with the targets: no epoch beats the untuned LLM
    target = np.array([r['p'] for r in rows])
    y_val = (np.array([r['p'] for r in val]) < np.median([r['p'] for r in val])).astype(int)
    before = roc_auc(llm_annotate(model, tok, val).tolist(), y_val.tolist())
    log = back_tune(model, tok, rows, target, val, y_val, epochs=2, lr=3e-3)
    if max(log['val_auc'][1:]) <= before:
        assert log['best_epoch'] == 0
        assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items())
    else:       # a tuning that does help is kept at its best epoch
        assert log['val_auc'][log['best_epoch']] == max(log['val_auc'])


def test_serval_loop_takes_a_pair_a_path_and_a_function(lab_llm, tmp_path):
    model, tok = lab_llm
    pool, val, test = (patients(PatientConfig(n=n, seed=s)) for n, s in ((200, 1), (60, 2), (200, 3)))
    model.save_pretrained(tmp_path); tok.save_pretrained(tmp_path)
    a = serval_loop((model, tok), pool, val, test, iterations=1, vcfg=VerticalConfig(max_epochs=8))
    b = serval_loop(str(tmp_path), pool, val, test, iterations=1, vcfg=VerticalConfig(max_epochs=8))
    assert a[0]['llm'] == pytest.approx(b[0]['llm'], abs=1e-9)
    assert a[0]['vertical'] == pytest.approx(b[0]['vertical'], abs=1e-9)
    truth = serval_loop(lambda rows: np.array([r['p'] for r in rows]), pool, val, test,
                        iterations=1, vcfg=VerticalConfig(max_epochs=8))[0]
    assert set(truth) >= {'iteration', 'llm', 'llm_val', 'vertical', 'vertical_val', 'qc_pass',
                          'model'}
    assert truth['llm'] == pytest.approx(roc_auc([r['p'] for r in test], [r['y'] for r in test]))


def test_breast_cancer_rows():
    pytest.importorskip('sklearn')
    rows, names = breast_cancer_rows()
    assert len(rows) == 569 and len(names) == 30 and sum(r['y'] for r in rows) == 212
    assert feature_matrix(rows, names).shape == (569, 30)


def test_more_bad_inputs(monkeypatch):
    with pytest.raises(ValueError, match="needs scores and 0/1 labels of both classes"):
        platt_scale([0.2, 0.3], [1, 1])
    with pytest.raises(ValueError, match="back_tune: 3 rows but 2 probs"):
        back_tune(None, None, [{}, {}, {}], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\], got 0"):
        back_tune(None, None, [{}], [0.1], keep=0)
    with pytest.raises(KeyError, match=r"render_table: row has no \['b'\]"):
        render_table({'a': 1.0}, ['a', 'b'])
    with pytest.raises(TypeError, match="annotator must be .* got int"):
        serval_loop(3, [], [], [])
    with pytest.raises(ValueError, match="a plain annotate function cannot be back-tuned"):
        serval_loop(lambda rows: np.zeros(len(rows)), [], [], [], iterations=2)
    import sys
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)
    with pytest.raises(ImportError, match=r"needs scikit-learn: pip install 'fttk\[serval\]'"):
        breast_cancer_rows()
