"""fttk.ppo: every PPO term equal to verl's `core_algos` on the same float64 tensors (KL penalty and reward, GAE,
whitening, clipped policy loss, clipped value loss, entropy, the adaptive KL controller), one PPO update on a bandit
equal to the analytic gradient, rollout log-probs equal to what `generate` sampled from, a short lab run where the
proxy reward rises and the frozen weights stay frozen, bit-exact resume, the NaN guard, and bad inputs."""
import copy, json, math, os, re, shutil, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fttk.ppo as ppo
from fttk.core import ConfigError, RunFolder, load_tensors, set_seed
from fttk.ppo import (KLController, PolicyAndValue, PPOConfig, PPOLossError, check_prompts, entropy_from_logits,
                      forward_batch, gae, gold_grader, kl_penalty, masked_mean, masked_whiten, policy_loss,
                      ppo_prompts, ppo_train, ppo_update, rollout, stop_ids, token_mean, token_rewards, value_loss)

ROOT = Path(__file__).resolve().parent.parent
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
B, T, V = 6, 9, 11          # rollouts, response tokens, vocabulary of the entropy check
N = B * T                   # the longest reduction of any term
# float64 rounding: each term is a reduction over at most N entries (or a recursion over T steps) of the same
# operations in the same order as verl, so any difference is bounded by a few ulps per operation: N * eps64,
# times 16 for the exp/log/rsqrt in between. Relative to the magnitude of the values (all O(1) here).
TOL64 = 16 * N * EPS64

VERL_INSTALL = ("python -m venv .venv-ppo-ref && echo \"$PWD/.venv/lib/python3.11/site-packages\" > "
                ".venv-ppo-ref/lib/python3.11/site-packages/zz_main_venv.pth && "
                ".venv-ppo-ref/bin/pip install --no-deps -r .ci/constraints-ppo-ref.txt")


# ---------------------------------------------------------------------------------------------------------------
# verl, in its own environment
# ---------------------------------------------------------------------------------------------------------------

VERL_SCRIPT = r'''
import sys, warnings
import torch
warnings.simplefilter('ignore')
from verl.trainer.ppo import core_algos as ca
import verl.utils.torch_functional as vf
import verl
x = torch.load(sys.argv[1])
out = {'version': verl.__version__}
m = x['mask']
for est in ('k1', 'k2', 'k3'):
    out['kl_' + est] = ca.kl_penalty(x['logp'], x['ref'], kl_penalty=est)
    # verl.trainer.ppo.ray_trainer.apply_kl_penalty, line by line (its module pulls in the whole Ray trainer)
    ctl = ca.AdaptiveKLController(init_kl_coef=x['beta'], target_kl=x['target'], horizon=x['horizon'])
    kld = ca.kl_penalty(x['logp'], x['ref'], kl_penalty=est) * m
    out['rewards_' + est] = x['token_scores'] - ctl.value * kld
    current_kl = torch.mean(vf.masked_mean(kld, mask=m, axis=-1), dim=0).item()
    ctl.update(current_kl=current_kl, n_steps=m.shape[0])
    out['current_kl_' + est], out['beta_' + est] = current_kl, float(ctl.value)  # numpy float
for g, l in x['gammas_lams']:
    a, r = ca.compute_gae_advantage_return(x['rewards'], x['values'], x['gae_mask'], gamma=g, lam=l)
    out[f'gae_{g}_{l}'] = (a, r)
out['whiten'] = vf.masked_whiten(x['values'], m)
out['whiten_keep_mean'] = vf.masked_whiten(x['values'], m, shift_mean=False)
for c in (3.0, 1e30):
    lp = x['new'].clone().requires_grad_()
    loss, clipfrac, ppo_kl, _ = ca.compute_policy_loss(x['old'], lp, x['adv'], m, cliprange=0.2,
                                                      clip_ratio_c=c, loss_agg_mode='token-mean')
    loss.backward()
    out[f'pg_{c}'] = (loss.detach(), clipfrac, ppo_kl, lp.grad)
vp = x['vpreds'].clone().requires_grad_()
loss, clipfrac = ca.compute_value_loss(vp, x['returns'], x['values'], m, cliprange_value=0.2)
loss.backward()
out['vf'] = (loss.detach(), clipfrac, vp.grad)
lg = x['logits'].clone().requires_grad_()
ent = ca.compute_entropy_loss(lg, m, loss_agg_mode='token-mean')
ent.backward()
out['entropy'] = (ent.detach(), vf.entropy_from_logits(x['logits']), lg.grad)
ctl = ca.AdaptiveKLController(init_kl_coef=x['beta'], target_kl=x['target'], horizon=x['horizon'])
seq = []
for kl, n in x['ctl_updates']:
    ctl.update(current_kl=kl, n_steps=n); seq.append(float(ctl.value))
out['ctl'] = seq
torch.save(out, sys.argv[2])
'''


def _ref_python():
    for p in (os.environ.get('FTTK_PPO_REF_PYTHON'), ROOT/'.venv-ppo-ref'/'bin'/'python'):
        if p and Path(p).exists(): return str(p)
    return None


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale
    lengths = torch.tensor([9, 1, 5, 7, 3, 9])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()     # right-padded responses, one of 1 token
    gae_mask = mask.clone(); gae_mask[0, 3:5] = 0                   # a hole: verl's "observation tokens"
    logp = -r(B, T).abs() - 0.1
    old = logp + r(B, T, scale=0.8)          # log ratios up to ~+-2.5: both clips and the dual clip are active
    return dict(mask=mask, gae_mask=gae_mask, logp=logp, ref=logp + r(B, T, scale=0.5), old=old, new=logp,
                adv=r(B, T), values=r(B, T), vpreds=r(B, T, scale=1.5), returns=r(B, T),
                rewards=r(B, T), logits=r(B, T, V, scale=3.0),
                token_scores=torch.zeros(B, T, dtype=torch.float64).index_put_(
                    (torch.arange(B), lengths - 1), r(B)),
                beta=0.1, target=0.05, horizon=50,
                gammas_lams=[(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)],
                ctl_updates=[(0.2, 6), (0.01, 6), (0.06, 12), (0.0, 3), (1.0, 6)])


@pytest.fixture(scope='module')
def verl_ref(tmp_path_factory):
    py = _ref_python()
    if py is None:
        pytest.skip(f"verl reference environment absent (no $FTTK_PPO_REF_PYTHON, no .venv-ppo-ref); build it: "
                    f"{VERL_INSTALL}")
    d = tmp_path_factory.mktemp('verl')
    x = _inputs()
    torch.save(x, d/'in.pt'); (d/'ref.py').write_text(VERL_SCRIPT)
    p = subprocess.run([py, str(d/'ref.py'), str(d/'in.pt'), str(d/'out.pt')], capture_output=True, text=True,
                       timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ''})
    if p.returncode:
        if 'No module named' in p.stderr and 'verl' in p.stderr:
            pytest.skip(f"{py} does not import verl; build the reference environment: {VERL_INSTALL}")
        raise RuntimeError(f"the verl reference script failed:\n{p.stderr[-3000:]}")
    return x, torch.load(d/'out.pt')


def _close(ours, theirs, tol=TOL64):
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= tol * max(1.0, theirs.abs().max().item()), f"max difference {err:.3e} > {tol:.3e}"


@pytest.mark.reference
def test_verl_version_is_the_pinned_one(verl_ref):
    pin = next(l for l in (ROOT/'.ci'/'constraints-ppo-ref.txt').read_text().splitlines() if l.startswith('verl=='))
    assert verl_ref[1]['version'] == pin.split('==')[1]


@pytest.mark.reference
@pytest.mark.parametrize('est', ['k1', 'k2', 'k3'])
def test_kl_penalty_reward_and_controller_equal_verl(verl_ref, est):
    x, v = verl_ref
    _close(kl_penalty(x['logp'], x['ref'], est), v['kl_' + est])
    scores = x['token_scores'].sum(1)                 # one score per response, at its last token
    rewards, kl = token_rewards(scores, x['logp'], x['ref'], x['mask'], x['beta'], est)
    _close(rewards, v['rewards_' + est])
    current_kl = masked_mean(kl, x['mask'], dim=1).mean().item()
    _close(current_kl, v['current_kl_' + est])
    ctl = KLController(x['beta'], x['target'], x['horizon']); ctl.update(current_kl, B)
    _close(ctl.value, v['beta_' + est])


@pytest.mark.reference
@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_equals_verl(verl_ref, gamma, lam):
    x, v = verl_ref
    adv_w, ret = v[f'gae_{gamma}_{lam}']
    adv, returns = gae(x['rewards'], x['values'], x['gae_mask'], gamma, lam)
    _close(returns, ret)
    _close(masked_whiten(adv, x['gae_mask']), adv_w)          # verl returns the advantages whitened


@pytest.mark.reference
def test_whitening_equals_verl(verl_ref):
    x, v = verl_ref
    _close(masked_whiten(x['values'], x['mask']), v['whiten'])
    _close(masked_whiten(x['values'], x['mask'], shift_mean=False), v['whiten_keep_mean'])


@pytest.mark.reference
@pytest.mark.parametrize('c', [3.0, None])
def test_policy_loss_and_gradient_equal_verl(verl_ref, c):
    x, v = verl_ref
    loss_v, clipfrac_v, kl_v, grad_v = v[f'pg_{3.0 if c else 1e30}']
    lp = x['new'].clone().requires_grad_()
    loss, st = policy_loss(lp, x['old'], x['adv'], x['mask'], cliprange=0.2, clip_ratio_c=c)
    loss.backward()
    _close(loss, loss_v); _close(st['clipfrac'], clipfrac_v); _close(st['approx_kl'], kl_v)
    _close(lp.grad, grad_v)
    # the inputs exercise what is being compared: both clips, and the dual clip where it is on
    ratio = (x['new'] - x['old']).exp()[x['mask'].bool()]
    adv = x['adv'][x['mask'].bool()]
    assert ((ratio > 1.2) & (adv > 0)).any() and ((ratio < 0.8) & (adv < 0)).any() and ((ratio > 3) & (adv < 0)).any()


@pytest.mark.reference
def test_value_loss_and_gradient_equal_verl(verl_ref):
    x, v = verl_ref
    vp = x['vpreds'].clone().requires_grad_()
    loss, st = value_loss(vp, x['values'], x['returns'], x['mask'], cliprange_value=0.2)
    loss.backward()
    _close(loss, v['vf'][0]); _close(st['vf_clipfrac'], v['vf'][1]); _close(vp.grad, v['vf'][2])
    assert 0 < st['vf_clipfrac'] < 1


@pytest.mark.reference
def test_entropy_and_gradient_equal_verl(verl_ref):
    x, v = verl_ref
    lg = x['logits'].clone().requires_grad_()
    ent = token_mean(entropy_from_logits(lg), x['mask'])
    ent.backward()
    _close(ent, v['entropy'][0]); _close(entropy_from_logits(x['logits']), v['entropy'][1])
    _close(lg.grad, v['entropy'][2])


@pytest.mark.reference
def test_adaptive_kl_controller_equals_verl(verl_ref):
    x, v = verl_ref
    ctl, seq = KLController(x['beta'], x['target'], x['horizon']), []
    for kl, n in x['ctl_updates']:
        ctl.update(kl, n); seq.append(ctl.value)
    _close(torch.tensor(seq), torch.tensor(v['ctl']), tol=16 * len(seq) * EPS64)
    assert seq[0] > x['beta'] and seq[1] < seq[0]           # KL over target raises beta, under target lowers it


# ---------------------------------------------------------------------------------------------------------------
# a bandit: one PPO update against the analytic gradient
# ---------------------------------------------------------------------------------------------------------------

class _Body(nn.Module):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1, dtype=torch.float64))


class Bandit(nn.Module):
    "A one-token 'language model' over K arms whose logits are the parameter theta."
    base_model_prefix = 'body'
    def __init__(self, theta):
        super().__init__()
        self.config, self.body = SimpleNamespace(hidden_size=1), _Body()
        self.head = nn.Linear(1, len(theta), bias=False, dtype=torch.float64)
        with torch.no_grad(): self.head.weight.copy_(theta[:, None])
    def get_output_embeddings(self): return self.head


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_one_ppo_update_on_a_bandit_follows_the_analytic_gradient(temperature):
    K, n, eta = 5, 32, 0.3
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(K, dtype=torch.float64, generator=g)
    pv = PolicyAndValue(Bandit(theta))
    arms = torch.multinomial((theta / temperature).softmax(0), n, replacement=True, generator=g)
    b = {'query': torch.zeros(n, 1, dtype=torch.long), 'query_mask': torch.ones(n, 1, dtype=torch.long),
         'response': arms[:, None], 'response_mask': torch.ones(n, 1, dtype=torch.long)}
    with torch.no_grad(): _, b['old_logprobs'], b['values'] = forward_batch(pv, b, temperature)
    b['advantages'] = torch.linspace(-1, 1, K, dtype=torch.float64)[arms][:, None]
    b['returns'] = torch.zeros(n, 1, dtype=torch.float64)
    cfg = PPOConfig(num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8,
                    gradient_accumulation_steps=4, max_grad_norm=0.0, temperature=temperature)
    opt = torch.optim.SGD([pv.policy.head.weight], lr=eta)
    ppo_update(pv, opt, b, cfg, step=0, lr_at=lambda k: eta)
    # d/dtheta log softmax(theta / T)[a] = (e_a - pi) / T; the loss is the token mean of -A * ratio
    pi = (theta / temperature).softmax(0)
    grad = -(b['advantages'] * (F.one_hot(arms, K).double() - pi)).mean(0) / temperature
    moved = pv.policy.head.weight.detach()[:, 0] - theta
    assert (moved - (-eta * grad)).abs().max() <= 16 * n * EPS64
    assert ((moved + theta) / temperature).softmax(0) @ torch.linspace(-1, 1, K, dtype=torch.float64) > \
        pi @ torch.linspace(-1, 1, K, dtype=torch.float64)                  # the expected reward rose


def test_clipped_tokens_get_no_gradient():
    # a second epoch on the same rollouts: once the ratio left [1 - eps, 1 + eps] in the advantage's direction,
    # that token's gradient is exactly zero
    old = torch.zeros(1, 4, dtype=torch.float64)
    new = torch.tensor([[0.3, -0.3, 0.3, -0.3]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    policy_loss(new, old, adv, torch.ones_like(adv), cliprange=0.2)[0].backward()
    assert new.grad[0, :2].tolist() == [0.0, 0.0] and (new.grad[0, 2:] != 0).all()


def test_k1_reward_gives_the_kl_gradient_and_k3_does_not():
    th = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ref = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).log_softmax(0)
    lp = th.log_softmax(0)
    kl = (lp.exp() * (lp - ref)).sum()
    g_kl = torch.autograd.grad(kl, th, retain_graph=True)[0]
    sf = lambda est: torch.autograd.grad((lp.exp().detach() * kl_penalty(lp, ref, est).detach() * lp).sum(), th,
                                         retain_graph=True)[0]
    assert (sf('k1') - g_kl).abs().max() <= 16 * 7 * EPS64
    # k3's score-function gradient is grad KL(pi||ref) - grad KL(ref||pi)
    g_rev = torch.autograd.grad((ref.exp() * (ref - lp)).sum(), th, retain_graph=True)[0]
    assert (sf('k3') - (g_kl - g_rev)).abs().max() <= 16 * 7 * EPS64
    assert (sf('k3') - g_kl).abs().max() > 1e-3


def test_masked_statistics_ignore_what_is_masked():
    x = torch.tensor([[1.0, float('nan'), 2.0], [3.0, float('inf'), 5.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    assert token_mean(x, m).item() == 2.75
    assert abs(masked_mean(x, m).item() - 2.75) <= 2.75 * 1e-8 + EPS64    # the 1e-8 in the denominator
    w = masked_whiten(x, m)
    assert torch.isfinite(w[m.bool()]).all()


# ---------------------------------------------------------------------------------------------------------------
# the lab world at size 'test'
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    from fttk.reward import RewardConfig, reward_model, reward_train
    from fttk.sft import sft_model, split_people
    from fttk.world import lab_world, preference_pairs, preference_rows
    from fttk.lora import LoRAConfig, inject_lora
    world = lab_world('test')
    rm, rtok = reward_model(*sft_model('test'))
    reward_train(rm, rtok, preference_pairs(preference_rows(world)),
                 RewardConfig(output_dir=str(tmp_path_factory.mktemp('rm')/'rm'), learning_rate=1e-3,
                              num_train_epochs=1, per_device_train_batch_size=8, max_length=256, seed=0),
                 progress=False)
    rm.requires_grad_(False)
    lm, tok = sft_model('test')
    set_seed(0)
    inject_lora(lm, LoRAConfig(target_modules='all-linear', r=8, lora_alpha=16))
    prompts = ppo_prompts(world, split_people(world)[1])
    return SimpleNamespace(world=world, rm=rm, rtok=rtok, policy=lm, tok=tok, prompts=prompts)


LAB = dict(learning_rate=2e-3, per_device_train_batch_size=16, num_mini_batches=2, num_ppo_epochs=2,
           response_length=24, temperature=1.0, kl_coef=0.05, seed=0, lr_scheduler_type='constant')


def test_rollout_logprobs_are_those_generate_sampled_from(lab):
    pv = PolicyAndValue(copy.deepcopy(lab.policy))
    cfg = PPOConfig(response_length=16, temperature=0.8)
    prompts = [r['prompt'] for r in lab.prompts[:6]]
    set_seed(5); b = rollout(pv, lab.tok, prompts, cfg)
    # the same sampling with the scores generate used (temperature applied, KV cache on)
    texts = [lab.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lab.tok.padding_side = 'left'
    enc = lab.tok(texts, return_tensors='pt', padding=True, add_special_tokens=False)
    lab.tok.padding_side = 'right'
    set_seed(5)
    out = pv.policy.generate(**enc, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=16,
                             eos_token_id=stop_ids(lab.tok), pad_token_id=lab.tok.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
    gen_lp = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, b['response'][..., None]).squeeze(-1)
    with torch.no_grad(): _, lp, _ = forward_batch(pv, b, cfg.temperature)
    m = b['response_mask'].bool()
    assert torch.equal(out.sequences[:, enc['input_ids'].shape[1]:][m], b['response'][m])
    # incremental (KV cache) and full forward differ by float32 rounding of reductions over the hidden size
    assert (lp - gen_lp)[m].abs().max() <= 64 * EPS32 * lab.policy.config.hidden_size


def test_short_lab_run_raises_the_proxy_reward_and_keeps_frozen_weights(lab, tmp_path):
    policy = copy.deepcopy(lab.policy)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    rm_before = {n: p.detach().clone() for n, p in lab.rm.named_parameters()}
    res = ppo_train(policy, None, lab.rm, lab.tok, lab.prompts, PPOConfig(output_dir=str(tmp_path/'run'),
                    max_steps=12, **LAB), reward_tokenizer=lab.rtok, gold=gold_grader(lab.world), progress=False)
    L = res['log']
    assert [r['step'] for r in L] == list(range(1, 13))
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(L[-3:], 'score') > mean(L[:3], 'score') + 0.05, [round(r['score'], 3) for r in L]
    assert mean(L[-3:], 'kl') > mean(L[:3], 'kl')                      # it paid for it in KL
    assert abs(L[0]['kl']) < 1e-4 * L[0]['response_length']            # step 1: policy = reference
    assert all(math.isfinite(r['gold']) for r in L)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in policy.named_parameters() if n in trained)
    assert all(torch.equal(p, rm_before[n]) for n, p in lab.rm.named_parameters())
    assert res['value_model'].v_head.weight.abs().sum() > 0
    run = RunFolder.open(res['run'])
    assert len(run.read_metrics()) == 12 and PPOConfig.from_yaml(run.path/'config.yaml').max_steps == 12
    assert run.latest_checkpoint() is None                                 # save_steps=None: no checkpoint


def test_adaptive_controller_moves_beta_toward_the_target(lab, tmp_path):
    res = ppo_train(copy.deepcopy(lab.policy), None, lab.rm, lab.tok, lab.prompts,
                    PPOConfig(output_dir=str(tmp_path/'a'), max_steps=4, kl_ctrl_type='adaptive', target_kl=1e-4,
                              horizon=100, **{**LAB, 'learning_rate': 5e-3}),
                    reward_tokenizer=lab.rtok, progress=False)
    L = res['log']
    betas = [r['kl_coef'] for r in L] + [res['kl_coef']]
    assert betas[0] == LAB['kl_coef']
    # Ziegler et al.'s update on each step's measured per-token KL (batch of 32 rollouts)
    for r, before, after in zip(L, betas, betas[1:]):
        e = min(max(r['kl_per_token'] / 1e-4 - 1, -0.2), 0.2)
        assert abs(after - before * (1 + e * 32 / 100)) <= 4 * EPS64 * after
    assert betas[1] < betas[0]              # step 1: policy = reference, KL 0 < target: beta falls 6.4%
    assert betas[-1] > betas[-2] > betas[1]   # then the policy moves away, KL > target: beta rises


def test_resume_is_bit_exact(lab, tmp_path):
    base = dict(max_steps=4, save_steps=2, **LAB)
    full = copy.deepcopy(lab.policy)
    r_full = ppo_train(full, None, lab.rm, lab.tok, lab.prompts, PPOConfig(output_dir=str(tmp_path/'full'), **base),
                       reward_tokenizer=lab.rtok, progress=False)
    ppo_train(copy.deepcopy(lab.policy), None, lab.rm, lab.tok, lab.prompts,
              PPOConfig(output_dir=str(tmp_path/'half'), **base), reward_tokenizer=lab.rtok, progress=False)
    shutil.rmtree(RunFolder.open(tmp_path/'half').checkpoints/'step_000004')     # interrupted after step 2
    resumed = copy.deepcopy(lab.policy)
    r_res = ppo_train(resumed, None, lab.rm, lab.tok, lab.prompts, PPOConfig(output_dir=str(tmp_path/'half'), **base),
                      reward_tokenizer=lab.rtok, resume=True, progress=False)
    drop = ('rollout_tok_s', 'update_tok_s')
    clean = lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log]
    assert clean(r_res['log']) == clean(r_full['log'])
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert torch.equal(r_full['value_model'].v_head.weight, r_res['value_model'].v_head.weight)


def test_nan_loss_stops_before_the_update(lab, tmp_path, monkeypatch):
    calls = {'n': 0}
    real = ppo.value_loss
    def nan_after_two_steps(*a, **k):
        calls['n'] += 1
        loss, st = real(*a, **k)
        return (loss * float('nan') if calls['n'] > 2 else loss), st
    monkeypatch.setattr(ppo, 'value_loss', nan_after_two_steps)
    policy = copy.deepcopy(lab.policy)
    # one rollout batch of 16, one epoch, one minibatch: one value_loss call per PPO step
    cfg = PPOConfig(output_dir=str(tmp_path/'nan'), max_steps=5, save_steps=2,
                    **{**LAB, 'num_mini_batches': 1, 'num_ppo_epochs': 1})
    with pytest.raises(PPOLossError, match=r"loss became nan at PPO step 3 \(epoch 1, minibatch 1\); this update was "
                                           r"not applied\. Last good checkpoint: .*step_000002"):
        ppo_train(policy, None, lab.rm, lab.tok, lab.prompts, cfg, reward_tokenizer=lab.rtok, progress=False)
    w = load_tensors(RunFolder.open(cfg.output_dir).latest_checkpoint()/'model.safetensors')
    mine = {'policy.' + n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert set(mine) <= set(w) and all(torch.equal(w[n], p) for n, p in mine.items())


def test_nan_reward_stops_before_any_update(lab, tmp_path):
    rm = copy.deepcopy(lab.rm)
    orig = rm.forward
    def forward(*a, **k):
        out = orig(*a, **k); out.logits = out.logits * float('nan'); return out
    rm.forward = forward
    with pytest.raises(PPOLossError, match=r"reward model score became nan at PPO step 1; no update was applied\. "
                                           r"Last good checkpoint: none"):
        ppo_train(copy.deepcopy(lab.policy), None, rm, lab.tok, lab.prompts,
                  PPOConfig(output_dir=str(tmp_path/'r'), max_steps=2, **LAB), reward_tokenizer=lab.rtok,
                  progress=False)


def test_missing_eos_penalty_and_reward_normalization(lab, tmp_path):
    res = ppo_train(copy.deepcopy(lab.policy), None, lab.rm, lab.tok, lab.prompts,
                    PPOConfig(output_dir=str(tmp_path/'n'), max_steps=1, normalize_reward=True,
                              missing_eos_penalty=1.0, **LAB), reward_tokenizer=lab.rtok, progress=False)
    r = res['log'][0]
    mu, sd = res['reward_norm']
    assert abs(mu - r['score']) < 1e-6 * max(1, abs(mu)) and sd > 0
    # normalized scores have mean 0 on this first batch; the penalty takes 1 per response without an end token
    # and the KL penalty is 0 at step 1, so the mean total reward is -(1 - eos_rate)
    assert abs(r['reward'] - (-(1 - r['eos_rate']))) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw,msg', [
    (dict(cliprange=0), "cliprange must be > 0, got 0.0"),
    (dict(cliprange_value=-1), "cliprange_value must be > 0, got -1.0"),
    (dict(temperature=0), "temperature must be > 0, got 0.0"),
    (dict(gamma=1.5), r"gamma must be in \[0, 1\], got 1.5"),
    (dict(lam=-0.1), r"lam must be in \[0, 1\], got -0.1"),
    (dict(num_ppo_epochs=0), "num_ppo_epochs must be >= 1, got 0"),
    (dict(num_mini_batches=0), "num_mini_batches must be >= 1, got 0"),
    (dict(response_length=0), "response_length must be >= 1, got 0"),
    (dict(kl_coef=-0.1), "kl_coef must be >= 0, got -0.1"),
    (dict(vf_coef=-1), "vf_coef must be >= 0, got -1.0"),
    (dict(kl_estimator='k4'), r"config field 'kl_estimator' must be one of \['k1', 'k2', 'k3'\], got 'k4'"),
    (dict(kl_ctrl_type='pid'), r"config field 'kl_ctrl_type' must be one of \['fixed', 'adaptive'\], got 'pid'"),
    (dict(target_kl=0), "target_kl must be > 0, got 0.0"),
    (dict(horizon=0), "horizon must be >= 1, got 0"),
    (dict(missing_eos_penalty=-1), r"missing_eos_penalty must be None or >= 0 \(it is subtracted\), got -1.0"),
    (dict(clip_ratio_c=1.0), r"clip_ratio_c must be None or > 1"),
    (dict(learning_rate=0), "learning_rate must be > 0"),
    (dict(value_head_init='xavier'),
     r"config field 'value_head_init' must be one of \['zeros', 'normal', 'reward'\], got 'xavier'"),
])
def test_bad_config_values(kw, msg):
    with pytest.raises(ConfigError, match=msg): PPOConfig(**kw)


@pytest.mark.parametrize('prompts,msg', [
    ([], "prompts is empty: PPO needs prompts to sample responses to"),
    ({'prompt': 'x'}, "prompts must be a list of rows, got dict"),
    ([{'prompt': 'ok'}, {'question': 'x'}], r"prompt row 1: needs 'prompt', a non-empty string or a list of "
                                           r"\{'role', 'content'\} messages, got \{'question': 'x'\}"),
    ([{'prompt': [{'role': 'user'}]}], "prompt row 0: needs 'prompt'"),
    ([{'prompt': '  '}], "prompt row 0: needs 'prompt'"),
])
def test_bad_prompts_name_the_row(prompts, msg):
    with pytest.raises(ValueError, match=msg): check_prompts(prompts)


def test_reference_none_needs_a_lora_policy(lab, tmp_path):
    from fttk.sft import sft_model
    lm, tok = sft_model('test')
    with pytest.raises(ValueError, match=r"ref=None takes the policy with its LoRA adapters disabled as the "
                                         r"reference, but the policy has no LoRA layer"):
        ppo_train(lm, None, lab.rm, tok, lab.prompts, PPOConfig(output_dir=str(tmp_path/'x'), max_steps=1))


def test_plain_reference_model_gives_the_same_first_step(lab, tmp_path):
    # ref=None (adapters off) and an explicit frozen copy of the base are the same reference
    from fttk.sft import sft_model
    ref, _ = sft_model('test')
    kw = dict(max_steps=1, **LAB)
    a = ppo_train(copy.deepcopy(lab.policy), None, lab.rm, lab.tok, lab.prompts,
                  PPOConfig(output_dir=str(tmp_path/'a'), **kw), reward_tokenizer=lab.rtok, progress=False)
    b = ppo_train(copy.deepcopy(lab.policy), ref, lab.rm, lab.tok, lab.prompts,
                  PPOConfig(output_dir=str(tmp_path/'b'), **kw), reward_tokenizer=lab.rtok, progress=False)
    assert abs(a['log'][0]['kl'] - b['log'][0]['kl']) <= 64 * EPS32 * lab.policy.config.hidden_size
    assert abs(a['log'][0]['reward'] - b['log'][0]['reward']) <= 1e-5


def test_kl_penalty_and_whiten_errors():
    with pytest.raises(ValueError, match="estimator must be 'k1', 'k2' or 'k3', got 'kl'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), 'kl')
    with pytest.raises(ValueError, match="whitening needs at least 2 unmasked entries, got 1"):
        masked_whiten(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0]]))


# ---------------------------------------------------------------------------------------------------------------
# value-head initialization
# ---------------------------------------------------------------------------------------------------------------

def test_value_head_init_gives_what_each_option_promises(lab, tmp_path, monkeypatch):
    d = lab.policy.config.hidden_size
    zeros = PolicyAndValue(lab.policy).v_head
    assert torch.equal(zeros.weight, torch.zeros(1, d)) and torch.equal(zeros.bias, torch.zeros(1))
    # 'normal': N(0, 1/(d+1)), bias 0; the same draws as torch's normal_ under the same seed
    torch.manual_seed(3); normal = PolicyAndValue(lab.policy, 'normal').v_head
    torch.manual_seed(3); nn.Linear(d, 1)                     # the default init the head is made with
    expected = torch.empty(1, d).normal_(0.0, 1 / math.sqrt(d + 1))
    assert torch.equal(normal.weight, expected) and torch.equal(normal.bias, torch.zeros(1))
    # 'reward': the reward model's score head (InstructGPT), and ppo_train passes its reward model on
    reward = PolicyAndValue(lab.policy, 'reward', lab.rm).v_head
    assert torch.equal(reward.weight, lab.rm.score.weight)
    assert torch.equal(reward.bias, torch.zeros(1) if lab.rm.score.bias is None else lab.rm.score.bias)
    made = []
    class Spy(PolicyAndValue):
        def __init__(self, *a): super().__init__(*a); made.append(self.v_head.weight.detach().clone())
    monkeypatch.setattr(ppo, 'PolicyAndValue', Spy)
    ppo_train(copy.deepcopy(lab.policy), None, lab.rm, lab.tok, lab.prompts,
              PPOConfig(output_dir=str(tmp_path/'r'), max_steps=1, value_head_init='reward', **LAB),
              reward_tokenizer=lab.rtok, progress=False)
    assert len(made) == 1 and torch.equal(made[0], lab.rm.score.weight)


def test_value_head_reward_init_needs_matching_sizes():
    head = nn.Linear(8, 1)
    rm = nn.Module(); rm.score = nn.Linear(12, 1, bias=False)
    with pytest.raises(ValueError, match=r"value_head_init='reward': the reward model's score head maps hidden "
                                         r"size 12 to 1 output\(s\), the value head needs 8 to 1; use 'zeros' "
                                         r"or 'normal' for these models"):
        ppo.init_value_head(head, 'reward', rm)
    with pytest.raises(ValueError, match=r"value_head_init='reward' copies the reward model's linear `score` "
                                         r"head, but got NoneType without one"):
        ppo.init_value_head(head, 'reward', None)
    with pytest.raises(ValueError, match=r"value_head_init must be 'zeros', 'normal' or 'reward', got 'xavier'"):
        ppo.init_value_head(head, 'xavier')


# ---------------------------------------------------------------------------------------------------------------
# the frontier file the DPO notebook reads
# ---------------------------------------------------------------------------------------------------------------

def test_load_frontier_missing_file_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path/'ppo.json'
    with pytest.raises(FileNotFoundError, match=rf"no PPO frontier at {re.escape(str(missing))}: the full-size "
                                                r"run of nbs/10_ppo.ipynb \(IN_TEST unset\) writes it in its "
                                                r"beta sweep; run that notebook or pass path="):
        ppo.load_frontier(missing)
    (tmp_path/'bad.json').write_text('{"steps": []}')
    with pytest.raises(ValueError, match=r"bad.json is not a PPO frontier: it has no 'runs' mapping"):
        ppo.load_frontier(tmp_path/'bad.json')


def test_committed_frontier_follows_the_documented_schema():
    assert ppo.frontier_path() == ROOT/'data'/'frontiers'/'ppo.json'
    fr = ppo.load_frontier()
    assert 'k1' in fr['note'] and 'nats per response' in fr['note']
    assert f"softmax(logits / {fr['setup']['temperature']})" in fr['note']
    seeds = {}
    for name, run in fr['runs'].items():
        assert name == f"{run['setting']}, seed {run['seed']}"
        assert set(run['config']) == {'kl_coef', 'kl_ctrl_type', 'target_kl'}
        assert (run['config']['target_kl'] is None) == (run['config']['kl_ctrl_type'] == 'fixed')
        assert len(run['steps']) == fr['setup']['steps']
        assert [r['step'] for r in run['steps']] == list(range(1, fr['setup']['steps'] + 1))
        assert all(set(r) == {'step', 'kl', 'score', 'gold', 'kl_coef'} for r in run['steps'])
        seeds.setdefault(run['setting'], set()).add(run['seed'])
    assert all(s == {0, 1, 2} for s in seeds.values()), seeds
