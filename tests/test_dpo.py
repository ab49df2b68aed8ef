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


def _trl_dpo_runs() -> bool:
    "trl 1.12-1.15 compute DPO log-probs only through a Triton kernel; CPU builds of torch have no Triton."
    from trl.trainer import utils as tu
    return getattr(tu, '_ChunkedLogProbFunction', True) is not None


needs_trl_dpo = pytest.mark.skipif(not _trl_dpo_runs(),
                                   reason="this trl's DPOTrainer needs Triton for its log-probs (not installed)")
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


def _tolerance(dtype, S: float, float32_parts: bool = False) -> float:
    """Rounding bound of every compared quantity, per unit of its size. Each per-token log-prob carries a relative
    rounding of eps (eps32 when TRL's kernel computes it, whatever the model's dtype); a sequence log-prob sums up to
    MAXLEN of them, so it is off by at most eps x MAXLEN x S, S the largest |sequence log-prob|; rewards, margins,
    losses and gradients are functions of these with slopes of the size of the value itself. `float32_parts`: TRL
    computes part of the loss in float32 whatever the dtype (exo_pair's log(eps) and log1p(-eps))."""
    eps = EPS32 if _fused_head() or float32_parts else torch.finfo(dtype).eps
    return eps * MAXLEN * S


# A floor under the float64 gradient bound, measured, not derived: with TRL 1.10 and transformers 5.5.4 (the
# lowest pins), ipo + forward_kl differs from TRL by 2.3e-10 at one entry of the tied embedding's gradient (4.4e-10
# of its largest entry; 1e-12 elsewhere), where ours against ours on the batch in reverse order differs by 6e-16:
# a difference between the two codes that rounding in the bound above does not explain. A wrong formula (a sign,
# a factor, a missing term) moves gradients by 1e-4 of their size or more, 1e5 times this floor.
GRAD_FLOOR = 1e-9


def _check_equal(ours, theirs, tol: float, n_chosen_tokens: int, n_pairs: int = 8) -> dict:
    """Loss and every logged metric equal within tol x their size; every gradient within tol x its size x the
    2 x n_pairs sequences whose positions it sums over. Returns the differences."""
    (l_o, m_o, g_o), (l_t, m_t, g_t) = ours, theirs
    diffs = {'loss': abs(l_o.item() - l_t.item())}
    assert diffs['loss'] <= tol * max(abs(l_t.item()), 1.0)
    assert g_o.keys() == g_t.keys() and g_o
    diffs['grad (rel.)'] = 0.0
    for k in g_o:
        scale = g_t[k].abs().max().item()
        d = (g_o[k] - g_t[k]).abs().max().item()
        assert d <= max(2 * n_pairs * tol, GRAD_FLOOR) * scale, (k, d, scale)
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
@needs_trl_dpo
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
    diffs = _check_equal(ours, theirs, _tolerance(dtype, S, 'exo_pair' in cfg['loss_type']), n_tok,
                         len(rows))
    print(' '.join(f'{k}={v:.1e}' for k, v in diffs.items()))


@pytest.mark.reference
@needs_trl_dpo
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
    diffs = _check_equal(o, t, _tolerance(torch.float64, S), n_tok, len(rows))
    print(" ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
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
@needs_trl_dpo
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


# ---- 4. our own behaviour ----

@pytest.mark.parametrize('reference', ['ref_model', 'lora'])
def test_precomputed_reference_equals_on_the_fly(batch_setup, lab, tmp_path, reference):
    policy, ref, tok, rows = batch_setup
    if reference == 'lora':            # reference: the adapters off; move them so policy != reference
        policy, ref = inject_lora(copy.deepcopy(ref), LoRAConfig(target_modules='all-linear', r=4, lora_alpha=8)), None
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for n, p in policy.named_parameters():
                if p.requires_grad: p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ex, _ = prepare_dpo_data(rows, tok, max_length=MAXLEN)
    # batches of 3 for the cache, 8 for training: other padding, the same values
    cfg = DPOConfig(per_device_train_batch_size=8, precompute_ref_batch_size=3, beta=0.5)
    policy.train()
    cached = precompute_ref_logps(policy, ex, cfg, ref, tok.pad_token_id)
    assert policy.training                       # put back in train mode
    assert all(e['ref_chosen_logps'] != e['ref_rejected_logps'] for e in cached)
    l_c, m_c = dpo_batch(policy, collate_pairs(cached, tok.pad_token_id), cfg)
    l_f, m_f = dpo_batch(policy, collate_pairs(ex, tok.pad_token_id), cfg, ref)
    S, _ = _batch_sizes(policy, tok, rows)
    tol = EPS64 * MAXLEN * S
    assert abs(l_c.item() - l_f.item()) <= tol and abs(m_c['rewards/margins']) > 1e-3
    assert all(abs(m_c[k] - m_f[k]) <= tol * max(1.0, abs(m_f[k])) for k in m_f), (m_c, m_f)
    if reference == 'ref_model':                 # and TRL's precomputed column holds the same numbers
        trainer = _trl_trainer(copy.deepcopy(policy), tok, rows, tmp_path, ref_model=copy.deepcopy(ref),
                               precompute_ref_log_probs=True, precompute_ref_batch_size=3)
        for k in ('ref_chosen_logps', 'ref_rejected_logps'):
            d = max(abs(x - e[k]) for x, e in zip(trainer.train_dataset[k], cached))
            assert d <= _tolerance(torch.float64, S) * S, (k, d)


def _run_cfg(tmp_path, name, **kw):
    return DPOConfig(**{**dict(output_dir=str(tmp_path/name), learning_rate=1e-3, max_steps=6,
                               per_device_train_batch_size=4, max_length=MAXLEN, seed=0, save_steps=3), **kw})


@pytest.mark.parametrize('setup', ['full', 'lora-precompute'])
def test_resume_is_bit_exact(lab, tmp_path, setup, monkeypatch):
    import fttk.dpo
    lm, tok, pairs = lab
    rows, pre = pairs[:40], setup != 'full'
    def fresh():
        if setup == 'full': return copy.deepcopy(lm), copy.deepcopy(lm)
        set_seed(0); return inject_lora(copy.deepcopy(lm), LoRAConfig(target_modules='all-linear', r=4)), None
    full, ref = fresh()
    r_full = dpo_train(full, tok, rows, _run_cfg(tmp_path, 'full', precompute_ref_log_probs=pre), ref_model=ref,
                       progress=False)
    half, ref = fresh()
    dpo_train(half, tok, rows, _run_cfg(tmp_path, 'half', precompute_ref_log_probs=pre), ref_model=ref,
              progress=False)
    # interrupted after step 3: drop the later checkpoint and resume from step 3 in a fresh model
    run = RunFolder.open(tmp_path/'half')
    shutil.rmtree(run.checkpoints/'step_000006')
    if pre:       # the reference log-probs are read back from the run folder, never recomputed
        assert (run.path/'ref_logps.safetensors').exists()
        def no_recompute(*a, **k): raise AssertionError('precompute_ref_logps called on resume')
        monkeypatch.setattr(fttk.dpo, 'precompute_ref_logps', no_recompute)
    resumed, ref = fresh()
    r_res = dpo_train(resumed, tok, rows, _run_cfg(tmp_path, 'half', precompute_ref_log_probs=pre), ref_model=ref,
                      resume=True, progress=False)
    assert len(r_res['log']) == len(r_full['log']) == 6
    for k in ('loss', 'rewards/margins', 'rewards/accuracies', 'logps/chosen', 'grad_norm', 'lr'):
        assert [r[k] for r in r_res['log']] == [r[k] for r in r_full['log']], k
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))


def test_resume_refuses_a_bad_reference_cache(lab, tmp_path):
    from fttk.core import save_tensors
    lm, tok, pairs = lab
    cfg = _run_cfg(tmp_path, 'pre', precompute_ref_log_probs=True)
    dpo_train(copy.deepcopy(lm), tok, pairs[:24], cfg, progress=False)     # full FT: the policy is its own ref
    f = RunFolder.open(cfg.output_dir).path/'ref_logps.safetensors'
    t = load_tensors(f)
    assert len(t['chosen']) == 24 and t['chosen'].dtype == torch.float64
    save_tensors({k: v[:3] for k, v in t.items()}, f)
    with pytest.raises(CorruptFileError, match=r"ref_logps\.safetensors holds 3 pairs, the data has 24: delete it "
                                               r"or train into a new output_dir"):
        dpo_train(copy.deepcopy(lm), tok, pairs[:24], cfg, resume=True, progress=False)
    f.unlink()     # without it, the fully fine-tuned policy can no longer give the reference
    with pytest.raises(CorruptFileError, match=r"cannot resume .*: its reference log-probs are missing and the "
                                               r"model has already moved from the reference"):
        dpo_train(copy.deepcopy(lm), tok, pairs[:24], cfg, resume=True, progress=False)


def test_nan_loss_stops_before_the_update(lab, tmp_path, nan_logits_after):
    lm, tok, pairs = lab
    m = nan_logits_after(copy.deepcopy(lm), 2)
    cfg = _run_cfg(tmp_path, 'nan', max_steps=5, per_device_train_batch_size=2, save_steps=2)
    with pytest.raises(DPOLossError, match=r"loss became nan at step 3 \(rows \[\d+, \d+\]\); the update was not "
                                           r"applied\. Last good checkpoint: .*step_000002"):
        dpo_train(m, tok, pairs[:40], cfg, ref_model=copy.deepcopy(lm), progress=False)
    w = load_tensors(RunFolder.open(cfg.output_dir).latest_checkpoint()/'model.safetensors')
    assert all(torch.equal(w[n], t) for n, t in trainable_state(m).items())   # the bad update never happened
    assert all(p.grad is None for p in m.parameters())


def test_lora_freezes_the_base_and_learns(lab, tmp_path):
    lm, tok, pairs = lab
    m = inject_lora(copy.deepcopy(lm), LoRAConfig(target_modules='all-linear', r=4, lora_alpha=8))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    res = dpo_train(m, tok, pairs[:96], _run_cfg(tmp_path, 'lora', learning_rate=5e-3, max_steps=12,
                                                 per_device_train_batch_size=8, precompute_ref_log_probs=True),
                    progress=False)
    L = [r['loss'] for r in res['log']]
    assert L[0] == pytest.approx(math.log(2), abs=1e-6)       # B = 0: the policy starts at the reference
    assert sum(L[-3:]) / 3 < sum(L[:3]) / 3
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in m.named_parameters() if n in trained)


@pytest.mark.parametrize('kw,msg', [
    (dict(loss_type='dpo'), r"loss_type \['dpo'\] unknown; choose from \['aot', "),
    (dict(loss_type=[]), r"loss_type \[\] unknown"),
    (dict(loss_type=['sigmoid', 'sft'], loss_weights=[1.0]),
     r"loss_weights has 1 weights for 2 loss types \['sigmoid', 'sft'\]"),
    (dict(beta=0.0), r"beta must be > 0, got 0\.0"),
    (dict(beta=float('nan')), r"config field 'beta' must be a finite number, got nan"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0\.5\), got 0\.5"),
    (dict(loss_type='exo_pair'), r"exo_pair needs label_smoothing > 0"),
    (dict(loss_type='bco_pair', f_divergence_type='forward_kl'),
     r"f_divergence_type='forward_kl' has no form for loss_type \['bco_pair'\]"),
    (dict(ld_alpha=1.5), r"ld_alpha must be None or in \[0, 1\], got 1\.5"),
    (dict(discopop_tau=0.0), r"discopop_tau must be > 0, got 0\.0"),
    (dict(max_length=1), r"max_length must be >= 2, got 1"),
    (dict(use_weighting=True), r"use_weighting=True is not implemented in fttk's DPO loop; use trl_dpo_train"),
    (dict(sync_ref_model=True), r"sync_ref_model=True is not implemented in fttk's DPO loop"),
])
def test_bad_config_is_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        DPOConfig(**kw)


def test_bad_setups_are_refused(lab, tmp_path):
    lm, tok, pairs = lab
    ex, _ = prepare_dpo_data(pairs[:2], tok, max_length=MAXLEN)
    with pytest.raises(ValueError, match=r"ref_model=None takes the policy with its LoRA adapters disabled as the "
                                         r"reference, but the policy has no LoRA layer"):
        dpo_batch(lm, collate_pairs(ex, tok.pad_token_id), DPOConfig())
    with pytest.raises(ConfigError, match=r"loss_type 'cdpo' is fttk's own \(TRL 1\.16's 'sigmoid' ignores "
                                          r"label_smoothing\): use dpo_train"):
        trl_dpo_train(lm, tok, pairs[:2], DPOConfig(output_dir=str(tmp_path), loss_type='cdpo'))


@pytest.mark.parametrize('rows,msg', [
    ({'chosen': 'A', 'rejected': 'B'}, r"expected a list of preference rows, got dict"),
    ([{'prompt': 'Q', 'chosen': 'A'}], r"row 0: missing 'rejected'"),
    ([{'chosen': 'Yes.', 'rejected': 'No.'}], r"row 0: no 'prompt' and 'chosen'/'rejected' share no start to take "
                                              r"it from; give the prompt"),
    ([{'prompt': 'Q', 'chosen': 'A', 'rejected': 'B'}, {'prompt': 'Q', 'chosen': '', 'rejected': 'B'}],
     r"row 1: 'chosen' is empty after the prompt"),
    ([{'chosen': 'Q: A', 'rejected': 'Q: A'}], r"row 0: 'chosen' and 'rejected' are identical"),
    ([{'prompt': 'Q ' * 300, 'chosen': 'A', 'rejected': 'B'}], r"row 0: \d+ tokens, over max_length=256; raise "
                                                              r"max_length, or set truncation_mode='drop' or "
                                                              r"'keep_start'"),
])
def test_bad_rows_name_the_row(lab, rows, msg):
    lm, tok, _ = lab
    with pytest.raises(DPODataError, match=msg):
        prepare_dpo_data(rows, tok, max_length=MAXLEN)


def test_over_long_rows_dropped_when_asked(lab):
    lm, tok, pairs = lab
    rows = [{'prompt': 'Q ' * 300, 'chosen': 'A', 'rejected': 'B'}, pairs[0]]
    for mode in ('drop', 'keep_start'):        # a prompt that fills max_length alone is dropped in both modes
        ex, rep = prepare_dpo_data(rows, tok, max_length=MAXLEN, truncation_mode=mode)
        assert rep == {'rows': 2, 'kept': 1, 'dropped_long': 1, 'truncated': 0} and ex[0]['row'] == 1
    with pytest.raises(DPODataError, match=r"no usable preference pair in 1 rows \(1 over max_length=256\)"):
        prepare_dpo_data(rows[:1], tok, max_length=MAXLEN, truncation_mode='drop')


@pytest.mark.reference
@pytest.mark.skipif(_trl_dpo_runs(), reason="this trl's DPOTrainer runs here")
def test_trl_path_says_when_this_trl_cannot_run(lab, tmp_path):
    lm, tok, pairs = lab
    with pytest.raises(RuntimeError, match=r"DPOTrainer computes log-probs only through a Triton kernel, and "
                                           r"Triton is not installed .*: install triton or trl>=1.16, or use dpo_train"):
        trl_dpo_train(copy.deepcopy(lm), tok, pairs[:4], DPOConfig(output_dir=str(tmp_path), max_length=256))
