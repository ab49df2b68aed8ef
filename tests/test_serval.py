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
