"""fttk.reward: equal to TRL's RewardTrainer (tokenization, loss, gradients, curves), ranking batches equal to
pair batches, checkpoints resume bit for bit, the NaN guard, LoRA freezes the backbone, and bad rows."""
import copy, math

import pytest
import torch

from fttk.core import RunFolder, load_tensors
from fttk.reward import (RewardConfig, RewardDataError, RewardLossError, collate_units, evaluate_reward,
                         prepare_reward_data, rank_units, reward_loss, reward_model, reward_train, score,
                         spearman, trl_reward_train, _rewards)
from fttk.sft import sft_model, trainable_state
from fttk.world import lab_world, preference_pairs, preference_rows

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


@pytest.fixture(scope='module')
def lab():
    lm, tok = sft_model('test')
    rm, tok = reward_model(lm, tok)
    pairs = preference_pairs(preference_rows(lab_world('test')))
    return rm, tok, pairs


def _standard(pairs, n):
    "The same pairs in TRL's standard (plain string) form."
    return [{'prompt': p['prompt'][0]['content'] + '\n', 'chosen': p['chosen'][0]['content'],
             'rejected': p['rejected'][0]['content']} for p in pairs[:n]]


@pytest.mark.reference
@pytest.mark.parametrize('form', ['conversational', 'standard'])
def test_tokenization_equals_trl(lab, form, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer
    rm, tok, pairs = lab
    rows = pairs[:12] if form == 'conversational' else _standard(pairs, 12)
    keep = ('prompt', 'chosen', 'rejected')
    args = TRLRewardConfig(output_dir=str(tmp_path), report_to='none', use_cpu=True, bf16=False, max_length=256)
    trainer = RewardTrainer(model=copy.deepcopy(rm), args=args, processing_class=tok,
                            train_dataset=Dataset.from_list([{k: r[k] for k in keep} for r in rows]))
    ours, _ = prepare_reward_data(rows, tok, max_length=256)
    theirs = trainer.train_dataset
    assert [e['chosen_ids'] for e in ours] == theirs['chosen_ids']
    assert [e['rejected_ids'] for e in ours] == theirs['rejected_ids']


def _trl_loss(rm, tok, rows, tmp_path, **kw):
    "TRL's compute_loss on one batch of its own collator, and the gradients it leaves."
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer
    args = TRLRewardConfig(output_dir=str(tmp_path), report_to='none', use_cpu=True, bf16=False, max_length=256,
                           pad_to_multiple_of=None, **kw)
    trainer = RewardTrainer(model=rm, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    rm.train(); rm.zero_grad()
    loss = trainer.compute_loss(rm, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}


def _our_loss(rm, tok, rows, batch_by='pair', center=None):
    ex, _ = prepare_reward_data(rows, tok, max_length=256)
    b = collate_units(rank_units(ex, batch_by), tok.pad_token_id)
    rm.train(); rm.zero_grad()
    r = _rewards(rm, b)
    loss = reward_loss(r[b['chosen']], r[b['rejected']], b['margin'], center)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}


@pytest.mark.reference
@pytest.mark.parametrize('margin,center', [(False, None), (True, 0.01)])
def test_loss_and_gradients_equal_trl(lab, tmp_path, margin, center):
    # float64 on both sides: the same function computed in the same order agrees to rounding, eps64 x the
    # number of terms (tokens x hidden size) x the size of the quantity.
    rm, tok, pairs = lab
    rows = [{k: p[k] for k in ('prompt', 'chosen', 'rejected')} for p in pairs[:8]]
    if margin:
        for r, p in zip(rows, pairs): r['margin'] = p['gold_margin']
    m64 = copy.deepcopy(rm).double()
    ours, g_ours = _our_loss(copy.deepcopy(m64), tok, rows, center=center)
    theirs, g_trl = _trl_loss(copy.deepcopy(m64), tok, rows, tmp_path,
                              center_rewards_coefficient=center, disable_dropout=True)
    n = 256 * rm.config.hidden_size
    assert abs(ours.item() - theirs.item()) < EPS64 * n * abs(theirs.item())
    assert g_ours.keys() == g_trl.keys() and len(g_ours) == len(list(rm.parameters()))
    for k in g_ours:
        scale = g_trl[k].abs().max().item() + EPS64
        assert (g_ours[k] - g_trl[k]).abs().max().item() < EPS64 * n * scale, k


def test_ranking_batches_equal_pair_batches(lab):
    # one forward per response (ranking) or two per pair: the same rewards, so the same loss and gradient;
    # only the padding length differs, which changes no real token's arithmetic beyond float32 rounding
    rm, tok, pairs = lab
    rows = pairs[:12]
    m = copy.deepcopy(rm); m.config.use_cache = False
    l_rank, g_rank = _our_loss(copy.deepcopy(m), tok, rows, 'ranking')
    l_pair, g_pair = _our_loss(copy.deepcopy(m), tok, rows, 'pair')
    ex, _ = prepare_reward_data(rows, tok, max_length=256)
    assert len(rank_units(ex, 'ranking')) == 2 and len(rank_units(ex, 'pair')) == 12
    n = 256 * rm.config.hidden_size
    assert abs(l_rank.item() - l_pair.item()) < EPS32 * n * abs(l_pair.item())
    for k in g_rank:
        assert (g_rank[k] - g_pair[k]).abs().max().item() < EPS32 * n * (g_pair[k].abs().max().item() + EPS32), k


@pytest.mark.reference
def test_ours_equals_trl_curves(lab, tmp_path):
    rm, tok, pairs = lab
    cfg = RewardConfig(output_dir=str(tmp_path/'ours'), learning_rate=1e-3, max_steps=6, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, warmup_ratio=0.1, weight_decay=0.01, max_length=256, seed=0,
                       shuffle=False, batch_by='pair')
    a, b = copy.deepcopy(rm), copy.deepcopy(rm)
    ours = reward_train(a, tok, pairs[:48], cfg, progress=False)
    theirs = trl_reward_train(b, tok, pairs[:48], RewardConfig.from_dict({**cfg.to_dict(), 'output_dir': str(tmp_path/'trl')}))
    assert [r['step'] for r in ours['log']] == [r['step'] for r in theirs['log']] == list(range(1, 7))
    # same arithmetic in another order: float32 eps x terms summed per update (8 pairs x 2 x 256 tokens x hidden)
    # x the size of the loss; the weights: AdamW's first steps move each weight by about lr per step whatever the
    # gradient's scale, so a rounding difference can flip at most the updates of weights whose gradient is ~0.
    n = 8 * 2 * 256 * rm.config.hidden_size
    tol = EPS32 * n * max(r['loss'] for r in ours['log'])
    assert max(abs(x['loss'] - y['loss']) for x, y in zip(ours['log'], theirs['log'])) < tol
    assert max(abs(x['accuracy'] - y['accuracy']) for x, y in zip(ours['log'], theirs['log'])) == 0
    assert max(abs(x['grad_norm'] - y['grad_norm']) for x, y in zip(ours['log'], theirs['log'])) < EPS32 * n * max(
        r['grad_norm'] for r in ours['log'])
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 6 * cfg.learning_rate


def test_training_learns_and_weights_change(lab, tmp_path):
    rm, tok, pairs = lab
    m = copy.deepcopy(rm)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = RewardConfig(output_dir=str(tmp_path/'r'), learning_rate=1e-3, max_steps=24, per_device_train_batch_size=8,
                       max_length=256, seed=0)
    res = reward_train(m, tok, pairs[:600], cfg, progress=False)
    losses = [r['loss'] for r in res['log']]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters())
    held = evaluate_reward(m, tok, pairs[-120:])
    assert held['accuracy'] > evaluate_reward(rm, tok, pairs[-120:])['accuracy']


def test_resume_is_bit_exact(lab, tmp_path):
    rm, tok, pairs = lab
    base = dict(learning_rate=1e-3, max_steps=6, per_device_train_batch_size=4, max_length=256, seed=0, save_steps=3)
    full = copy.deepcopy(rm)
    r_full = reward_train(full, tok, pairs[:60], RewardConfig(output_dir=str(tmp_path/'full'), **base), progress=False)
    half = copy.deepcopy(rm)
    reward_train(half, tok, pairs[:60], RewardConfig(output_dir=str(tmp_path/'half'), **{**base, 'max_steps': 6}),
                 progress=False)
    # interrupt after step 3: drop the later checkpoint and resume from step 3 in a fresh model
    run = RunFolder.open(tmp_path/'half')
    import shutil
    shutil.rmtree(run.checkpoints/'step_000006')
    resumed = copy.deepcopy(rm)
    r_res = reward_train(resumed, tok, pairs[:60], RewardConfig(output_dir=str(tmp_path/'half'), **base), resume=True,
                         progress=False)
    assert [r['loss'] for r in r_res['log']] == [r['loss'] for r in r_full['log']]
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))


def test_nan_loss_stops_before_the_update(lab, tmp_path, nan_logits_after):
    rm, tok, pairs = lab
    m = nan_logits_after(copy.deepcopy(rm), 2)
    cfg = RewardConfig(output_dir=str(tmp_path/'nan'), learning_rate=1e-3, max_steps=5, per_device_train_batch_size=2,
                       save_steps=2, max_length=256, seed=0, batch_by='pair')
    with pytest.raises(RewardLossError, match=r"loss became nan at step 3 \(rows \[.*\]\); the update was not "
                                              r"applied\. Last good checkpoint: .*step_000002"):
        reward_train(m, tok, pairs[:40], cfg, progress=False)
    w = load_tensors(RunFolder.open(cfg.output_dir).latest_checkpoint()/'model.safetensors')
    assert all(torch.equal(w[n], t) for n, t in trainable_state(m).items())   # the bad update never happened


def test_lora_freezes_the_backbone(lab, tmp_path):
    from fttk.lora import LoRAConfig, inject_lora
    rm, tok, pairs = lab
    m = copy.deepcopy(rm)
    inject_lora(m, LoRAConfig(target_modules='all-linear', r=4, lora_alpha=8, modules_to_save=['score']))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert any('score' in n for n in trained) and any('lora_B' in n for n in trained)
    reward_train(m, tok, pairs[:40], RewardConfig(output_dir=str(tmp_path/'l'), learning_rate=1e-3, max_steps=3,
                                                   per_device_train_batch_size=4, max_length=256), progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in m.named_parameters() if n in trained)


def test_saved_reward_model_loads_in_plain_transformers(lab, tmp_path):
    from transformers import AutoModelForSequenceClassification
    rm, tok, pairs = lab
    rm.save_pretrained(tmp_path); tok.save_pretrained(tmp_path)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    p = [x['prompt'] for x in pairs[:5]]; y = [x['chosen'] for x in pairs[:5]]
    assert torch.equal(score(rm, tok, p, y), score(back, tok, p, y))


def test_spearman_matches_pearson_of_ranks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    assert math.isclose(spearman(a, b), torch.corrcoef(torch.stack([ra, rb]))[0, 1].item(), abs_tol=1e-12)


@pytest.mark.parametrize('rows,msg', [
    ([{'prompt': 'Q', 'chosen': 'A'}], r"row 0: missing 'rejected'"),
    ([{'chosen': 'A', 'rejected': 'B'}, {'chosen': 'A', 'rejected': 'A'}], r"row 1: 'chosen' and 'rejected' are identical"),
    ([{'chosen': ['A'], 'rejected': 'B'}], r"row 0: 'chosen' must be a string or a list of \{'role', 'content'\}"),
    ([{'chosen': 'A', 'rejected': 'B', 'margin': 'big'}], r"row 0: 'margin' must be a finite number, got 'big'"),
    (['chosen'], r'row 0: expected a dict'),
    ({'chosen': 'A', 'rejected': 'B'}, r'expected a list of preference rows, got dict'),
    ([{'prompt': 'Q ' * 150, 'chosen': 'A', 'rejected': 'B'}], r'row 0: \d+ tokens, over max_length=256'),
])
def test_bad_rows_name_the_row(lab, rows, msg):
    rm, tok, _ = lab
    with pytest.raises(RewardDataError, match=msg):
        prepare_reward_data(rows, tok, max_length=256)


def test_over_long_rows_dropped_when_asked(lab):
    rm, tok, pairs = lab
    rows = [{'prompt': 'Q ' * 150, 'chosen': 'A', 'rejected': 'B'}] + [pairs[0]]
    ex, rep = prepare_reward_data(rows, tok, max_length=256, truncation_mode='drop')
    assert rep == {'rows': 2, 'kept': 1, 'dropped_long': 1} and ex[0]['row'] == 1
    with pytest.raises(RewardDataError, match=r'no usable preference pair in 1 rows \(1 over max_length=256\)'):
        prepare_reward_data(rows[:1], tok, max_length=256, truncation_mode='drop')
