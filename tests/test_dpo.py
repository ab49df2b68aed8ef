"""fttk.dpo: equal to TRL's DPOTrainer (tokenization, truncation, every loss type's loss, gradients and logged
metrics, training curves), reference log-probs cached equal to computed ones, resume bit for bit, the NaN guard,
LoRA freezes the base, and bad configs and rows."""
import copy, inspect, math, shutil, warnings

import pytest
import torch

from fttk.core import ConfigError, CorruptFileError, RunFolder, load_tensors, set_seed
from fttk.dpo import (DPOConfig, DPODataError, DPOLossError, collate_pairs, dpo_batch, dpo_train,
                      precompute_ref_logps, prepare_dpo_data, trl_dpo_train)
from fttk.lora import LoRAConfig, from_peft_name, inject_lora, peft_lora_config
from fttk.sft import sft_model, trainable_state
from fttk.world import lab_world, preference_pairs, preference_rows

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
MAXLEN = 256
KEEP = ('prompt', 'chosen', 'rejected')


@pytest.fixture(scope='module')
def lab():
    from datasets.utils.tqdm import disable_progress_bars
    disable_progress_bars()
    lm, tok = sft_model('test')
    pairs = preference_pairs(preference_rows(lab_world('test')))
    return lm, tok, pairs


def _standard(pairs, n, prompt=True):
    "The same pairs as plain strings, with an explicit prompt or (prompt=False) with it left implicit."
    rows = [{'prompt': p['prompt'][0]['content'] + '\n', 'chosen': p['chosen'][0]['content'],
             'rejected': p['rejected'][0]['content']} for p in pairs[:n]]
    return rows if prompt else [{'chosen': r['prompt'] + r['chosen'], 'rejected': r['prompt'] + r['rejected']}
                                for r in rows]


def _trl_trainer(model, tok, rows, tmp_path, ref_model=None, peft_config=None, **kw):
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer
    kw = {'max_length': MAXLEN, **kw}
    args = TRLDPOConfig(output_dir=str(tmp_path), report_to='none', use_cpu=True, bf16=False,
                        pad_to_multiple_of=None, disable_dropout=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{k: r[k] for k in KEEP if k in r} for r in rows]),
                          peft_config=peft_config)


# ---- 1. tokenization and truncation ----

@pytest.mark.reference
@pytest.mark.parametrize('form', ['conversational', 'standard', 'implicit_prompt'])
def test_tokenization_equals_trl(lab, form, tmp_path):
    lm, tok, pairs = lab
    rows = {'conversational': lambda: pairs[:12], 'standard': lambda: _standard(pairs, 12),
            'implicit_prompt': lambda: _standard(pairs, 12, prompt=False)}[form]()
    trainer = _trl_trainer(copy.deepcopy(lm), tok, rows, tmp_path, ref_model=copy.deepcopy(lm))
    ours, rep = prepare_dpo_data(rows, tok, max_length=MAXLEN)
    theirs = trainer.train_dataset
    assert rep == {'rows': 12, 'kept': 12, 'dropped_long': 0, 'truncated': 0}
    for k in ('prompt_ids', 'chosen_ids', 'rejected_ids'):
        assert [e[k] for e in ours] == theirs[k], k
    assert all(e['prompt_ids'] and e['chosen_ids'] for e in ours)


@pytest.mark.reference
def test_keep_start_truncation_equals_trl_collator(lab, tmp_path):
    lm, tok, pairs = lab
    long = {**pairs[0], 'prompt': [{'role': 'user', 'content': pairs[0]['prompt'][0]['content'] * 4}]}
    rows = pairs[:6] + [long] + pairs[6:11]
    full, _ = prepare_dpo_data(rows, tok, max_length=None)
    # a max_length that cuts most completions and drops the row whose prompt alone fills it
    L = sorted(len(e['prompt_ids']) for e in full)[-2] + 3
    assert any(len(e['prompt_ids']) >= L for e in full)
    trainer = _trl_trainer(copy.deepcopy(lm), tok, rows, tmp_path, ref_model=copy.deepcopy(lm), max_length=L,
                           truncation_mode='keep_start')
    ours, rep = prepare_dpo_data(rows, tok, max_length=L, truncation_mode='keep_start')
    dropped = sum(len(e['prompt_ids']) >= L for e in full)
    assert rep['dropped_long'] == dropped and rep['kept'] == 12 - dropped == len(trainer.train_dataset)
    assert rep['truncated'] == sum(len(e['prompt_ids']) < L < len(e['prompt_ids']) + max(
        len(e['chosen_ids']), len(e['rejected_ids'])) for e in full) > 0
    b_ours = collate_pairs(ours, tok.pad_token_id)
    b_trl = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    for k in ('input_ids', 'attention_mask', 'completion_mask'):
        assert torch.equal(b_ours[k], b_trl[k]), k


# ---- 2. every loss type: loss, gradients and metrics on one batch ----

def _has_loss(loss_type: str) -> bool:
    from trl import DPOTrainer
    return f'loss_type == "{loss_type}"' in inspect.getsource(DPOTrainer._compute_loss)


@pytest.fixture(scope='module')
def batch_setup(lab):
    "A float64 policy moved off its reference (a seeded perturbation of every weight), and 8 pairs."
    lm, tok, pairs = lab
    ref = copy.deepcopy(lm).double().eval()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters(): p.add_(0.05 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=g,
                                                                                        dtype=p.dtype))
    rows = [{k: p[k] for k in KEEP} for p in pairs[:8]]
    return policy, ref, tok, rows


METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
           'logps/rejected', 'logits/chosen', 'logits/rejected', 'entropy', 'mean_token_accuracy')


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _ours_one_batch(policy, ref, tok, rows, **cfg):
    ex, _ = prepare_dpo_data(rows, tok, max_length=MAXLEN)
    policy.train(); policy.zero_grad()
    loss, mets = dpo_batch(policy, collate_pairs(ex, tok.pad_token_id), DPOConfig(**cfg), ref)
    loss.backward()
    return loss.detach(), mets, _grads(policy)


def _trl_one_batch(policy, ref, tok, rows, tmp_path, peft_config=None, **cfg):
    trainer = _trl_trainer(policy, tok, rows, tmp_path, ref_model=ref, peft_config=peft_config, **cfg)
    model = trainer.model
    b = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train(); model.zero_grad()
    loss = trainer.compute_loss(model, b)
    loss.backward()
    mets = {k: v[-1] for k, v in trainer._metrics['train'].items()}
    return loss.detach(), mets, {from_peft_name(n): p.grad.clone() for n, p in model.named_parameters()
                                 if p.requires_grad}


CASES = [pytest.param(dict(loss_type=[k]), id=k) for k in (
    'sigmoid', 'hinge', 'ipo', 'nca_pair', 'bco_pair', 'sppo_hard', 'aot_unpaired', 'apo_zero', 'apo_down',
    'discopop', 'sft', 'sigmoid_norm')]
CASES += [pytest.param(dict(loss_type=[k], label_smoothing=e), id=f'{k}-ls{e}')
          for k, eps in (('robust', (0.0, 0.2)), ('exo_pair', (1e-3, 0.2)), ('aot', (0.0, 0.2)),
                         ('aot_unpaired', (0.2,))) for e in eps]
CASES += [pytest.param(dict(loss_type=['sigmoid', 'sft'], loss_weights=[1.0, 0.5]), id='sigmoid+sft'),
          pytest.param(dict(loss_type=['sigmoid'], f_divergence_type='forward_kl'), id='sigmoid-forward_kl'),
          pytest.param(dict(loss_type=['hinge'], f_divergence_type='js_divergence'), id='hinge-js_divergence'),
          pytest.param(dict(loss_type=['ipo'], f_divergence_type='forward_kl'), id='ipo-forward_kl'),
          pytest.param(dict(loss_type=['sigmoid'], f_divergence_type='alpha_divergence',
                            f_alpha_divergence_coef=0.3), id='sigmoid-alpha_divergence'),
          pytest.param(dict(loss_type=['sigmoid'], ld_alpha=0.5), id='sigmoid-ld_alpha'),
          pytest.param(dict(loss_type=['ipo'], ld_alpha=0.3), id='ipo-ld_alpha')]


def _fused_head() -> bool:
    "TRL >= 1.12 computes its log-probs with a chunked LM-head kernel that works in float32 whatever the model's dtype."
    from trl import DPOTrainer
    return 'fused_lm_head' in inspect.getsource(DPOTrainer._compute_loss)


def _tolerance(dtype, S: float) -> float:
    """Rounding bound of every compared quantity, per unit of its size. Each per-token log-prob carries a relative
    rounding of eps (eps32 when TRL's kernel computes it, whatever the model's dtype); a sequence log-prob sums up to
    MAXLEN of them, so it is off by at most eps x MAXLEN x S, S the largest |sequence log-prob|; rewards, margins,
    losses and gradients are functions of these with slopes of the size of the value itself."""
    eps = EPS32 if _fused_head() else torch.finfo(dtype).eps
    return eps * MAXLEN * S


def _check_equal(ours, theirs, tol: float, n_chosen_tokens: int) -> dict:
    "Loss, every gradient and every logged metric equal within tol x their size; returns the differences."
    (l_o, m_o, g_o), (l_t, m_t, g_t) = ours, theirs
    diffs = {'loss': abs(l_o.item() - l_t.item())}
    assert diffs['loss'] <= tol * max(abs(l_t.item()), 1.0)
    assert g_o.keys() == g_t.keys() and g_o
    diffs['grad (rel.)'] = 0.0
    for k in g_o:
        scale = g_t[k].abs().max().item()
        d = (g_o[k] - g_t[k]).abs().max().item()
        assert d <= tol * scale, (k, d, scale)
        diffs['grad (rel.)'] = max(diffs['grad (rel.)'], d / max(scale, 1e-300))
    for k in METRICS:
        if k not in m_t: continue            # an older TRL that does not log it
        diffs[k] = abs(m_o[k] - m_t[k])
        if k == 'mean_token_accuracy':       # an argmax near a tie may flip at most one token
            assert diffs[k] <= 1 / n_chosen_tokens, (k, m_o[k], m_t[k])
        else: assert diffs[k] <= tol * max(abs(m_t[k]), 1.0), (k, m_o[k], m_t[k])
    assert m_o['rewards/accuracies'] == m_t['rewards/accuracies']
    return diffs


def _batch_sizes(model, tok, rows):
    "S, the largest |sequence log-prob| of the batch (policy), and the number of chosen completion tokens."
    from fttk.dpo import completion_logps, sequence_logps
    ex, _ = prepare_dpo_data(rows, tok, max_length=MAXLEN)
    b = collate_pairs(ex, tok.pad_token_id)
    with torch.no_grad(): out = completion_logps(model, b)
    S = sequence_logps(out['logps'], out['mask']).abs().max().item()
    return max(S, 1.0), int(b['completion_mask'][:len(ex), 1:].sum())


@pytest.mark.reference
@pytest.mark.parametrize('cfg', CASES)
def test_loss_gradients_metrics_equal_trl(batch_setup, cfg, tmp_path):
    missing = [k for k in cfg['loss_type'] if not _has_loss(k)]
    if missing: pytest.skip(f"the installed TRL has no loss_type {missing}")
    policy, ref, tok, rows = batch_setup
    cfg = {'beta': 0.5, **cfg}
    dtype = torch.float64
    if cfg.get('f_divergence_type') == 'alpha_divergence':
        # TRL clamps exp's argument with a table of float16/bfloat16/float32 only: float64 has no entry
        # (KeyError), so this case runs in float32 on both sides
        dtype = torch.float32
    p, r = copy.deepcopy(policy).to(dtype), copy.deepcopy(ref).to(dtype)
    ours = _ours_one_batch(copy.deepcopy(p), r, tok, rows, **cfg)
    theirs = _trl_one_batch(copy.deepcopy(p), copy.deepcopy(r), tok, rows, tmp_path, **cfg)
    S, n_tok = _batch_sizes(policy, tok, rows)
    diffs = _check_equal(ours, theirs, _tolerance(dtype, S), n_tok)
    print(' '.join(f'{k}={v:.1e}' for k, v in diffs.items()))


@pytest.mark.reference
def test_lora_reference_equals_trl_peft(lab, tmp_path):
    "LoRA policy, reference = the adapters disabled (ref_model=None), on both sides; B made nonzero identically."
    pytest.importorskip('peft')
    lm, tok, pairs = lab
    base = copy.deepcopy(lm).double()
    lcfg = LoRAConfig(target_modules='all-linear', r=4, lora_alpha=8)
    ours = inject_lora(copy.deepcopy(base), lcfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moved = {n: 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in ours.named_parameters()
                 if p.requires_grad}
        for n, p in ours.named_parameters():
            if n in moved: p.copy_(moved[n])
    rows = [{k: p[k] for k in KEEP} for p in pairs[:8]]
    cfg = dict(loss_type=['sigmoid'], beta=0.5)
    o = _ours_one_batch(ours, None, tok, rows, **cfg)
    trainer = _trl_trainer(copy.deepcopy(base), tok, rows, tmp_path, peft_config=peft_lora_config(lcfg), **cfg)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if p.requires_grad: p.copy_(moved[from_peft_name(n)])
    model = trainer.model
    b = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train(); model.zero_grad()
    loss = trainer.compute_loss(model, b); loss.backward()
    t = (loss.detach(), {k: v[-1] for k, v in trainer._metrics['train'].items()},
         {from_peft_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    S, n_tok = _batch_sizes(ours, tok, rows)
    print(' '.join(f'{k}={v:.1e}' for k, v in _check_equal(o, t, _tolerance(torch.float64, S), n_tok).items()))
    assert abs(o[1]['rewards/margins']) > 1e-3      # the adapters really moved the policy off the reference


# ---- 3. training curves: our loop and TRL's, same seed, same order ----

CURVE_KEYS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'logps/chosen', 'logps/rejected',
              'grad_norm')


def _curves(lab, tmp_path, setup: str, precompute: bool):
    "Our dpo_train and trl_dpo_train from the same model, seed and data order: (our log, TRL's log, our model, TRL's)."
    lm, tok, pairs = lab
    cfg = DPOConfig(output_dir=str(tmp_path/'ours'), learning_rate=1e-3, max_steps=6, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, warmup_ratio=0.2, weight_decay=0.01, max_length=MAXLEN, seed=0,
                    shuffle=False, beta=0.1, precompute_ref_log_probs=precompute)
    tcfg = DPOConfig.from_dict({**cfg.to_dict(), 'output_dir': str(tmp_path/'trl')})
    rows = pairs[:48]
    ref = lambda: copy.deepcopy(lm) if setup == 'full' else None     # 'full-noref': the policy before training
    if setup.startswith('full'):
        a, b, peft_config = copy.deepcopy(lm), copy.deepcopy(lm), None
    else:
        pytest.importorskip('peft')
        lcfg = LoRAConfig(target_modules='all-linear', r=4, lora_alpha=8)
        # DPOTrainer calls set_seed(args.seed) and then peft's get_peft_model: the same seed before inject_lora
        # draws the same A (B starts at zero on both sides)
        set_seed(cfg.seed); a = inject_lora(copy.deepcopy(lm), lcfg)
        b, peft_config = copy.deepcopy(lm), peft_lora_config(lcfg)
    ours = dpo_train(a, tok, rows, cfg, ref_model=ref(), progress=False)
    set_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = trl_dpo_train(b, tok, rows, tcfg, ref_model=ref(), peft_config=peft_config)
    return ours['log'], theirs['log'], a, theirs['trainer'].model


@pytest.mark.reference
@pytest.mark.parametrize('setup,precompute', [('full', False), ('full-noref', True), ('lora', False),
                                              ('lora', True)])
def test_ours_equals_trl_curves(lab, tmp_path, setup, precompute):
    lm, tok, pairs = lab
    ours, theirs, a, b = _curves(lab, tmp_path, setup, precompute)
    assert [r['step'] for r in ours] == [r['step'] for r in theirs] == list(range(1, 7))
    # float32, the same arithmetic in another order: each step's values are off by the one-batch bound
    # (eps32 x MAXLEN x S x their size), and the rounding of every earlier update adds at most as much again
    S, _ = _batch_sizes(lm, tok, pairs[:48])
    tol = len(ours) * EPS32 * MAXLEN * S
    diffs = {}
    for k in CURVE_KEYS:
        diffs[k] = max(abs(x[k] - y[k]) for x, y in zip(ours, theirs))
        assert all(abs(x[k] - y[k]) <= tol * max(1.0, abs(y[k])) for x, y in zip(ours, theirs)), (k, diffs[k])
    # accuracies are multiples of 1/8 per update: a pair whose two rewards tie to rounding may flip
    diffs['rewards/accuracies'] = max(abs(x['rewards/accuracies'] - y['rewards/accuracies'])
                                      for x, y in zip(ours, theirs))
    assert diffs['rewards/accuracies'] <= 1 / 8
    assert all(abs(x['lr'] - y['learning_rate']) <= EPS32 * y['learning_rate'] for x, y in zip(ours, theirs))
    # the weights: AdamW moves each weight by about lr per step whatever its gradient's scale, so rounding can
    # at most flip the updates of weights whose gradient is ~0: 2 lr per step
    pa = {n: p for n, p in a.named_parameters() if p.requires_grad}
    pb = {from_peft_name(n): p for n, p in b.named_parameters() if p.requires_grad}
    assert pa.keys() == pb.keys()
    diffs['weights'] = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert diffs['weights'] < 2 * len(ours) * 1e-3
    print(setup, precompute, ' '.join(f'{k}={v:.1e}' for k, v in diffs.items()))
