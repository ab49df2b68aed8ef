"""fttk chat / eval / export (fttk.inference): export equals the unmerged model, eval equals the functions it
wraps, chat streams the greedy reply through a pseudo-terminal, bad input gets one clear line."""
import json, os, pty, select, sys, time
from pathlib import Path

import pytest
import torch

from fttk.cli import main
from fttk.inference import chat_reply, evaluate_model, export, fit_context, gold_reward_mean
from fttk.sft import chat_generate, evaluate_sft, split_people
from fttk.train import load_run, train
from fttk.world import lab_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('inference')/'sft'
    return train({'stage': 'sft', 'model_name_or_path': 'lab:test', 'dataset': 'lab:instructions',
                  'finetuning_type': 'lora', 'r': 8, 'lora_alpha': 16, 'target_modules': 'all-linear',
                  'learning_rate': 2e-3, 'max_steps': 20, 'per_device_train_batch_size': 8,
                  'output_dir': str(out)}, progress=False)['run']


def test_export_loads_with_plain_transformers_and_equals_the_unmerged_model(run, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok, _ = load_run(run)
    out = export(run, tmp_path/'x')
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any('lora' in n for n, _ in plain.named_parameters())
    base, _, _ = load_run('lab:test')
    w = lambda m: dict(m.named_parameters())['model.layers.0.self_attn.q_proj.weight']
    assert not torch.equal(w(plain), w(base))          # the adapter moved the merged weight
    x = tok(["Where was Ada born?", "Write a short biography of Bo."], return_tensors='pt', padding=True)
    with torch.no_grad(): a, b = plain(**x).logits, model(**x).logits
    # merging reorders float32 sums over d_in + r terms per layer: |diff| ~ eps32 * depth * |logit|,
    # about 1e-5 here; 1e-3 leaves two orders of margin and still catches a wrong merge (~1e-1)
    assert (a - b).abs().max().item() < 1e-3 * max(1.0, b.abs().max().item())


def test_export_refuses_a_non_empty_folder_and_an_unfinished_run(run, tmp_path):
    (tmp_path/'x').mkdir(); (tmp_path/'x'/'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match=r'export folder .*x is not empty: choose another --out'):
        export(run, tmp_path/'x')
    assert [p.name for p in (tmp_path/'x').iterdir()] == ['notes.txt']
    (tmp_path/'r'/'checkpoints').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r'is an fttk run without final/'):
        export(tmp_path/'r', tmp_path/'y')


def test_eval_equals_the_functions_it_wraps(run):
    model, tok, _ = load_run(run)
    got = evaluate_model(model, tok, 'test', limit=2)
    w = lab_world('test'); people = split_people(w)[1][:2]
    want = evaluate_sft(model, tok, w, people)
    assert {k: got[k] for k in want} == want
    assert got['gold_reward'] == gold_reward_mean(model, tok, w, people)
    assert got['people'] == 2


def test_eval_command_writes_markdown_and_json(run, tmp_path, capsys):
    assert main(['eval', str(run), '--limit', '1', '--json', str(tmp_path/'m.json')]) == 0
    out = capsys.readouterr().out
    assert out.startswith('| metric | value |\n|---|---|\n| people | 1 |')
    m = json.loads((tmp_path/'m.json').read_text())
    assert set(m) == {'people', 'qa_em', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'fact_recall', 'gold_reward'}


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(['chat', str(tmp_path/'missing')]) == 2
    assert capsys.readouterr().err.strip().startswith('fttk: error: model folder')
    assert main(['eval', 'lab:test', '--limit', '0']) == 2
    assert capsys.readouterr().err.strip() == 'fttk: error: limit must be >= 1, got 0'


def test_fit_context_drops_the_oldest_turns_first():
    _, tok, _ = load_run('lab:test')
    q = [{'role': 'user', 'content': 'Where was Ada born?'}]
    turns = [{'role': 'user', 'content': 'hi ' * 40}, {'role': 'assistant', 'content': 'hello'}] * 3
    sys_ = [{'role': 'system', 'content': 'Be brief.'}]
    assert fit_context(tok, sys_ + turns + q, 10_000, 32) == sys_ + turns + q
    assert fit_context(tok, sys_ + turns + q, 70, 16) == sys_ + q


def _read_until(fd, marker: bytes, timeout: float = 60) -> bytes:
    buf, end = b'', time.time() + timeout
    while marker not in buf:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.time()))
        if not r: raise TimeoutError(f"no {marker!r} within {timeout} s; got {buf[-500:]!r}")
        try: chunk = os.read(fd, 4096)
        except OSError: break                      # the child closed the terminal
        if not chunk: break
        buf += chunk
    return buf


def test_chat_streams_the_greedy_reply_in_a_pseudo_terminal(run):
    model, tok, _ = load_run(run)
    q = f"Where was {lab_world('test').known[0].name} born?"
    want = chat_generate(model, tok, [[{'role': 'user', 'content': q}]], max_new_tokens=24)[0]
    assert want == chat_reply(model, tok, [{'role': 'user', 'content': q}], max_new_tokens=24)
    pid, fd = pty.fork()
    if pid == 0:                                   # the child: fttk chat on a terminal
        os.environ.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
        os.execv(sys.executable, [sys.executable, '-c', 'import sys; from fttk.cli import main; '
                                  f'sys.exit(main(["chat", {str(run)!r}, "--max-new-tokens", "24"]))'])
    try:
        assert b'/reset forgets the conversation' in _read_until(fd, b'user> ')
        os.write(fd, (q + '\n').encode())
        text = _read_until(fd, b'user> ').decode()
        reply = text.split('assistant> ', 1)[1].rsplit('\r\nuser> ', 1)[0]
        assert reply.strip() == want
        os.write(fd, b'/reset\n')
        assert b'(conversation cleared)' in _read_until(fd, b'user> ')
        os.write(fd, b'/exit\n')
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
