"Tests for fttk.sft: data checks, masks, packing equivalence, our loop vs TRL, checkpoint/resume after SIGKILL, NaN stop."
import copy, json, os, signal, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from fttk.core import RunFolder, load_tensors, ConfigError
from fttk.world import base_model, lab_world
from fttk.core import best_precision, CorruptFileError
from fttk.sft import (SFTConfig, SFTDataError, SFTLossError, check_row, tokenize_chat, prepare_sft_data, pack_examples,
                      collate, example_losses, sft_train, trl_train, lr_factor, trainable_state, trl_field_map,
                      use_bf16, grade_reply, names_other_person)

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps

torch.set_num_threads(1)

@pytest.fixture(scope='module')
def lab():
    model, tok = base_model('test', progress=False)
    rows = lab_world('test').instruction_rows()
    return model, tok, rows

def _qa(rows, n=96): return [r for r in rows if r['task'] == 'qa'][:n]

@pytest.mark.parametrize('row, msg', [
    ({'text': 'x'}, "row 9: has no 'messages' field"),
    ({'messages': 'hi'}, "row 9: 'messages' must be a non-empty list"),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, "row 9, turn 0: role 'robot' is not one of"),
    ({'messages': [{'role': 'user', 'content': ['a']}, {'role': 'assistant', 'content': 'b'}]}, "row 9, turn 0: content must be a string"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': ''}]}, "row 9, turn 1: the assistant turn is empty"),
    ({'messages': [{'role': 'user', 'content': 'q'}]}, "row 9: has no assistant turn"),
])
def test_bad_rows_named(row, msg):
    with pytest.raises(SFTDataError, match=msg.replace('(', r'\(').replace('[', r'\[')): check_row(row, 9)

def test_bad_row_in_dataset_named(lab):
    _, tok, rows = lab
    bad = _qa(rows, 5) + [{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': None}]}]
    with pytest.raises(SFTDataError, match='row 5, turn 1: content must be a string'): prepare_sft_data(bad, tok)

def test_labels_only_assistant(lab):
    _, tok, rows = lab
    for r in rows[:40]:
        ex = tokenize_chat(tok, r['messages'])
        target = tok.decode([t for t, l in zip(ex['input_ids'], ex['labels']) if l != -100])
        assert target == ''.join(m['content'] + '<|end|>' for m in r['messages'] if m['role'] == 'assistant')
    full = tokenize_chat(tok, rows[0]['messages'], assistant_only_loss=False)
    assert full['labels'][1:] == full['input_ids'][1:] and full['labels'][0] == -100

def test_truncate_and_drop_counted(lab):
    _, tok, rows = lab
    sub = [r for r in rows if r['task'] != 'qa'][:20] + _qa(rows, 20)
    ex_t, rt = prepare_sft_data(sub, tok, max_length=30)
    ex_d, rd = prepare_sft_data(sub, tok, max_length=30, truncation_mode='drop')
    assert rt['truncated'] > 0 and rd['dropped_too_long'] == rt['truncated'] + rt['dropped_no_target']
    assert rt['kept'] + rt['dropped_no_target'] == 40 and len(ex_d) == rd['kept']
    assert all(len(e['input_ids']) <= 30 for e in ex_t)
    with pytest.raises(SFTDataError, match='no usable example'): prepare_sft_data(_qa(rows, 3), tok, max_length=5, truncation_mode='drop')

@pytest.mark.parametrize('impl', ['sdpa', 'eager'])
def test_packed_equals_unpacked(lab, impl):
    model, tok, rows = lab
    m = copy.deepcopy(model); m.config._attn_implementation = impl; m.eval()
    data, _ = prepare_sft_data(rows[::37], tok, max_length=200)
    separate = [example_losses(m, [[e]])[0] for e in data]
    packed = example_losses(m, pack_examples(data, 200), tok.pad_token_id)
    padding_free = example_losses(m, [data], tok.pad_token_id)
    # packing reorders float32 sums only: a loss is a mean of <= 200 token terms of size <= max(separate)
    tol = EPS32 * 200 * max(separate)
    assert max(abs(a - b) for a, b in zip(packed, separate)) < tol
    assert max(abs(a - b) for a, b in zip(padding_free, separate)) < tol

def _packed_vs_unpacked(model, tok, qa, tmp_path, dtype):
    base = dict(learning_rate=1e-3, max_steps=1, per_device_train_batch_size=16, max_length=256, shuffle=False, seed=0)
    a, b = copy.deepcopy(model).to(dtype), copy.deepcopy(model).to(dtype)
    ra = sft_train(a, tok, qa, SFTConfig(output_dir=str(tmp_path/f'a{dtype}'), **base), progress=False)
    rb = sft_train(b, tok, qa, SFTConfig(output_dir=str(tmp_path/f'b{dtype}'), packing=True, **base), progress=False)
    dw = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    return ra['log'][0], rb['log'][0], ra['data']['tokens'], dw

def test_packed_training_step_matches_unpacked(lab, tmp_path):
    "Packing changes batch composition only: a packed and an unpacked run over one batch give the same update."
    model, tok, rows = lab
    qa = _qa(rows, 16)
    # float64: the two orders of summation differ by eps64 x N (tokens summed) x term size in the loss and gradient.
    # The first AdamW step is lr * g / (|g| + eps_adam), whose slope in g is at most lr / (4 eps_adam): that
    # amplifies a gradient difference eps64 * N * |grad_norm| into the bound on the weights.
    la, lb, N, dw = _packed_vs_unpacked(model, tok, qa, tmp_path, torch.float64)
    assert abs(la['loss'] - lb['loss']) <= EPS64 * N * la['loss']
    assert abs(la['grad_norm'] - lb['grad_norm']) <= EPS64 * N * la['grad_norm']
    assert dw <= 1e-3 / (4 * 1e-8) * EPS64 * N * la['grad_norm']      # ~4e-8; measured ~2e-14
    # float32: same bound on loss and gradient norm with eps32 (weights: the lr/(4 eps_adam) slope makes the
    # float32 bound larger than lr itself, so the update is compared in float64 above)
    la, lb, N, _ = _packed_vs_unpacked(model, tok, qa, tmp_path, torch.float32)
    assert abs(la['loss'] - lb['loss']) <= EPS32 * N * la['loss']
    assert abs(la['grad_norm'] - lb['grad_norm']) <= EPS32 * N * la['grad_norm']

def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key"): SFTConfig.from_dict({'learning_rat': 1.0})
    with pytest.raises(ConfigError, match='warmup_ratio must be in'): SFTConfig(warmup_ratio=1.5)
    with pytest.raises(ConfigError, match='max_steps must be -1'): SFTConfig(max_steps=0)
    assert SFTConfig().bf16 is False     # published runs stay fp32 on every machine unless asked

def test_bf16_none_is_measured_best():
    assert use_bf16(SFTConfig(bf16=None)) == (best_precision() == 'bf16')
    assert use_bf16(SFTConfig(bf16=False)) is False

@pytest.mark.parametrize('kw, msg', [
    ({'learning_rate': float('nan')}, "config field 'learning_rate' must be a finite number, got nan"),
    ({'learning_rate': float('inf')}, "config field 'learning_rate' must be a finite number, got inf"),
    ({'learning_rate': -1e-4}, 'learning_rate must be > 0, got -0.0001'),
    ({'max_steps': -5}, r'max_steps must be -1 \(use num_train_epochs\) or > 0, got -5'),
    ({'per_device_train_batch_size': 0}, 'per_device_train_batch_size must be > 0, got 0'),
    ({'gradient_accumulation_steps': -1}, 'gradient_accumulation_steps must be > 0, got -1'),
    ({'warmup_ratio': 1.0}, r'warmup_ratio must be in \[0, 1\), got 1.0'),
    ({'weight_decay': -0.1}, 'weight_decay must be >= 0, got -0.1'),
    ({'adam_epsilon': 0.0}, 'adam_epsilon must be > 0, got 0.0'),
    ({'max_grad_norm': -1.0}, r'max_grad_norm must be >= 0 \(0 = no clipping\), got -1.0'),
    ({'save_steps': 0}, 'save_steps must be None or > 0, got 0'),
    ({'max_length': 1}, 'max_length must be >= 2, got 1'),
    ({'truncation_mode': 'cut'}, 'truncation_mode'),
])
def test_bad_config_values(kw, msg):
    with pytest.raises(ConfigError, match=msg): SFTConfig(**kw)

def test_overlong_row_without_truncation(lab):
    _, tok, rows = lab
    long = {'messages': [{'role': 'user', 'content': 'who ' * 60}, {'role': 'assistant', 'content': 'me'}]}
    with pytest.raises(SFTDataError, match=r"row 2: \d+ tokens > max_length 48 \(truncation_mode='error'\)"):
        prepare_sft_data(_qa(rows, 2) + [long], tok, max_length=48, truncation_mode='error')

@pytest.mark.parametrize('row, msg', [
    ({'messages': []}, "row 0: 'messages' must be a non-empty list of turns, got \\[\\]"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 3}]},
     'row 0, turn 1: content must be a string, got int 3'),
    ({'messages': [{'role': 'user'}]}, "row 0, turn 0: each turn needs 'role' and 'content'"),
])
def test_bad_rows_in_sft_train(lab, tmp_path, row, msg):
    model, tok, _ = lab
    with pytest.raises(SFTDataError, match=msg):
        sft_train(model, tok, [row], SFTConfig(output_dir=str(tmp_path/'r'), max_steps=1), progress=False)

TRL_116 = {'output_dir', 'activation_checkpointing', 'gradient_checkpointing', 'warmup_steps', 'train_sampling_strategy'}
TRL_115 = {'output_dir', 'gradient_checkpointing', 'warmup_steps', 'train_sampling_strategy'}
OLD_TF = {'output_dir', 'gradient_checkpointing', 'warmup_steps', 'warmup_ratio'}

def test_trl_field_map():
    kw = {'output_dir': 'o', 'activation_checkpointing': False, 'warmup_steps': 0.1, 'train_sampling_strategy': 'random'}
    assert trl_field_map(kw, TRL_116) == kw
    assert trl_field_map(kw, TRL_115) == {'output_dir': 'o', 'gradient_checkpointing': False, 'warmup_steps': 0.1,
                                          'train_sampling_strategy': 'random'}
    assert trl_field_map(kw, OLD_TF, 0.1) == {'output_dir': 'o', 'gradient_checkpointing': False,
                                              'warmup_steps': 0, 'warmup_ratio': 0.1}
    with pytest.raises(TypeError, match="this trl's SFTConfig has no field 'train_sampling_strategy'"):
        trl_field_map({**kw, 'train_sampling_strategy': 'sequential'}, OLD_TF)

def test_trl_args_on_installed_trl():
    import dataclasses, trl
    from fttk.sft import _trl_args
    args = _trl_args(SFTConfig(output_dir='o'))
    names = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert (args.activation_checkpointing if 'activation_checkpointing' in names else args.gradient_checkpointing) is False

NAMES = ['Magnus Amsel', 'Klara Amsel', 'Ada Brook']

@pytest.mark.parametrize('reply, ok', [
    ('Klara Amsel was born on July 6, 1950.', False),     # another person's fact
    ('Klara was born on July 6, 1950.', False),           # a relative's first name
    ('Ada Brook was born on July 6, 1950.', False),
    ('Magnus Amsel was born on July 6, 1950.', True),
    ('Magnus Amsel, like Klara Amsel, was born on July 6, 1950.', True),
    ('Born on July 6, 1950.', True),                      # no name, right answer
    ('Magnus Amsel was born on May 1, 1950.', False),
    ('Magnus Amsel was born in 1950. He was born on July 6, 1950.', False),   # first sentence only
])
def test_grade_reply_about_person(reply, ok):
    assert grade_reply(reply, 'July 6, 1950', 'Magnus Amsel', NAMES) is ok
    assert grade_reply(reply, 'July 6, 1950') is ('May' not in reply and 'in 1950.' not in reply)

def test_names_other_person():
    assert names_other_person('Klara Amsel was born on July 6, 1950.', 'Magnus Amsel', NAMES) == 'Klara Amsel'
    assert names_other_person('He was born on July 6, 1950.', 'Magnus Amsel', NAMES) is None

def test_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    for fn, kind in [(get_cosine_schedule_with_warmup, 'cosine'), (get_linear_schedule_with_warmup, 'linear')]:
        p = torch.nn.Parameter(torch.zeros(1)); o = torch.optim.SGD([p], lr=1.0); s = fn(o, 4, 30)
        for step in range(30):
            assert abs(o.param_groups[0]['lr'] - lr_factor(step, 30, 4, kind)) < 1e-12; o.step(); s.step()

def test_loss_falls_and_run_folder(lab, tmp_path):
    model, tok, rows = lab
    cfg = SFTConfig(output_dir=str(tmp_path/'run'), learning_rate=1e-3, max_steps=16, per_device_train_batch_size=8,
                    warmup_ratio=0.1, eval_steps=8, save_steps=8, max_length=128, seed=0)
    m = copy.deepcopy(model)
    res = sft_train(m, tok, _qa(rows, 128), cfg, eval_rows=_qa(rows, 200)[128:], progress=False)
    losses = [r['loss'] for r in res['log']]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:2]) / 2
    run = RunFolder.open(cfg.output_dir)
    assert [p.name for p in run.list_checkpoints()] == ['step_000008', 'step_000016']
    assert (run.path/'config.yaml').exists() and (run.path/'fingerprint.json').exists()
    evals = [r['eval_loss'] for r in run.read_metrics() if 'eval_loss' in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    w = load_tensors(run.latest_checkpoint()/'model.safetensors')
    assert all(torch.equal(w[n], t) for n, t in trainable_state(m).items())

def test_ours_equals_trl(lab, tmp_path):
    model, tok, rows = lab
    cfg = SFTConfig(output_dir=str(tmp_path/'ours'), learning_rate=1e-3, max_steps=8, per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, warmup_ratio=0.1, weight_decay=0.01, max_length=128, seed=0, shuffle=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ours = sft_train(a, tok, _qa(rows, 160), cfg, progress=False)
    theirs = trl_train(b, tok, _qa(rows, 160), SFTConfig.from_dict({**cfg.to_dict(), 'output_dir': str(tmp_path/'trl')}))
    assert [r['step'] for r in ours['log']] == [r['step'] for r in theirs['log']] == list(range(1, 9))
    # same arithmetic in another order: float32 eps x tokens summed per update (<= 8 x 2 x 128) x the term size
    n = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_length
    tol = EPS32 * n * max(r['loss'] for r in ours['log'])
    assert max(abs(x['loss'] - y['loss']) for x, y in zip(ours['log'], theirs['log'])) < tol
    assert max(abs(x['grad_norm'] - y['grad_norm']) for x, y in zip(ours['log'], theirs['log'])) < EPS32 * n * max(
        r['grad_norm'] for r in ours['log'])
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < tol

def test_nan_loss_stops_with_last_checkpoint(lab, tmp_path, nan_logits_after):
    model, tok, rows = lab
    m = nan_logits_after(copy.deepcopy(model), 3)
    cfg = SFTConfig(output_dir=str(tmp_path/'nan'), learning_rate=1e-3, max_steps=6, per_device_train_batch_size=4, save_steps=2,
                    max_length=128, seed=0)
    with pytest.raises(SFTLossError, match=r"loss became nan at step 4 \(batch of rows \[.*\]\); the update was not applied\. Last good checkpoint: .*step_000002"):
        sft_train(m, tok, _qa(rows, 40), cfg, progress=False)
    assert [p.name for p in RunFolder.open(cfg.output_dir).list_checkpoints()] == ['step_000002']

SCRIPT = textwrap.dedent('''
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from fttk.core import RunFolder
    from fttk.world import base_model, lab_world
    from fttk.sft import SFTConfig, sft_train
    out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
    model, tok = base_model('test', progress=False)
    rows = [r for r in lab_world('test').instruction_rows() if r['task'] == 'qa'][:64]
    cfg = SFTConfig(output_dir=out, learning_rate=1e-3, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    warmup_ratio=0.2, save_steps=3, max_length=128, seed=1)
    if kill_at:
        log = RunFolder.log
        def log_then_die(self, step, **kw):
            log(self, step, **kw)
            if step == kill_at: os.kill(os.getpid(), signal.SIGKILL)   # a real SIGKILL: no cleanup, no atexit
        RunFolder.log = log_then_die
    sft_train(model, tok, rows, cfg, resume=resume, progress=False)
''')

def _run(tmp_path, out, kill_at, resume):
    f = tmp_path/'train.py'; f.write_text(SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(f), str(out), str(kill_at), '1' if resume else '0'], env=env,
                          capture_output=True, text=True, timeout=600)

def test_sigkill_resume_identical(tmp_path):
    full = _run(tmp_path, tmp_path/'full', 0, False)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run(tmp_path, tmp_path/'killed', 5, False)
    assert killed.returncode == -signal.SIGKILL
    run = RunFolder.open(tmp_path/'killed')
    assert run.latest_checkpoint().name == 'step_000003'
    resumed = _run(tmp_path, tmp_path/'killed', 0, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_tensors(RunFolder.open(tmp_path/'full').latest_checkpoint()/'model.safetensors')
    b = load_tensors(run.latest_checkpoint()/'model.safetensors')
    assert run.latest_checkpoint().name == 'step_000008' and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed weights differ from the uninterrupted run'
    la = [(r['step'], r['loss']) for r in RunFolder.open(tmp_path/'full').read_metrics()]
    lb = [(r['step'], r['loss']) for r in run.read_metrics()]
    assert la == lb

def test_sft_demo_writes_plot_and_markdown(tmp_path):
    from fttk.sft import sft_demo
    lines = sft_demo(tmp_path, 'test', max_steps=4)
    assert lines[0] == '## Supervised fine-tuning (LoRA)' and any('QA exact match' in l for l in lines)
    assert (tmp_path/'plots'/'sft_loss.png').stat().st_size > 1000
    assert RunFolder.open(tmp_path/'sft').latest_checkpoint().name == 'step_000004'

def test_first_sentence_and_fmt_errors(lab):
    from fttk.sft import first_sentence, few_shot_curve
    assert first_sentence('A was born in B. A works at C.\nmore') == 'A was born in B.'
    assert first_sentence('  born on May 3, 1990\nX') == 'born on May 3, 1990'
    model, tok, rows = lab
    with pytest.raises(ValueError, match="fmt must be 'chat' or 'text'"): few_shot_curve(model, tok, [], _qa(rows, 8), fmt='json')


def _short_run(model, tok, rows, out, **kw):
    cfg = SFTConfig(output_dir=str(out), learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4, save_steps=2,
                    max_length=128, seed=0, **kw)
    return sft_train(copy.deepcopy(model), tok, _qa(rows, 8), cfg, progress=False)

def _snapshot(d: Path) -> dict: return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}

def test_second_run_refused_first_untouched(lab, tmp_path):
    model, tok, rows = lab
    _short_run(model, tok, rows, tmp_path/'run')
    before = _snapshot(tmp_path/'run')
    with pytest.raises(FileExistsError, match=r"run folder .*run is not empty .*pass resume=True"):
        _short_run(model, tok, rows, tmp_path/'run')
    assert _snapshot(tmp_path/'run') == before

def test_resume_nothing_to_resume(lab, tmp_path):
    model, tok, rows = lab
    with pytest.raises(FileNotFoundError, match=r"cannot resume: run folder .* does not exist"):
        sft_train(model, tok, _qa(rows, 8), SFTConfig(output_dir=str(tmp_path/'none'), max_steps=1), resume=True, progress=False)
    (tmp_path/'empty').mkdir(); (tmp_path/'empty'/'notes.txt').write_text('x')
    with pytest.raises(FileNotFoundError, match=r"cannot resume: run folder .* has no complete checkpoint"):
        sft_train(model, tok, _qa(rows, 8), SFTConfig(output_dir=str(tmp_path/'empty'), max_steps=1), resume=True, progress=False)

def test_overwrite_output_dir_replaces(lab, tmp_path):
    model, tok, rows = lab
    _short_run(model, tok, rows, tmp_path/'run')
    (tmp_path/'run'/'stale.txt').write_text('from the first run')
    _short_run(model, tok, rows, tmp_path/'run', overwrite_output_dir=True)
    assert not (tmp_path/'run'/'stale.txt').exists()
    assert [p.name for p in RunFolder.open(tmp_path/'run').list_checkpoints()] == ['step_000002']

@pytest.mark.parametrize('damage, exc, msg', [
    ('truncate', CorruptFileError, 'model.safetensors'),
    ('no_optimizer', FileNotFoundError, r'cannot resume: checkpoint .*step_000002 lacks optimizer\.pt'),
])
def test_corrupt_checkpoint_on_resume(lab, tmp_path, damage, exc, msg):
    model, tok, rows = lab
    _short_run(model, tok, rows, tmp_path/'run')
    ck = RunFolder.open(tmp_path/'run').latest_checkpoint()
    if damage == 'truncate':
        f = ck/'model.safetensors'; f.write_bytes(f.read_bytes()[:100])
    else: (ck/'optimizer.pt').unlink()
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = SFTConfig(output_dir=str(tmp_path/'run'), learning_rate=1e-3, max_steps=4, per_device_train_batch_size=4,
                    save_steps=2, max_length=128, seed=0)
    with pytest.raises(exc, match=msg): sft_train(m, tok, _qa(rows, 8), cfg, resume=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
