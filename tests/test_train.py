"`fttk train CONFIG.yaml`: the schema's errors, every example run and chained, the saved model, resume, other model families."
import json, re
from pathlib import Path

import pytest
import torch
import yaml

from fttk.cli import main
from fttk.core import ConfigError
from fttk.lora import enable_fast_lora, lora_layers
from fttk.quant import is_quantized_layer
from fttk.train import load_run, parse_train_config, run_train, train, valid_keys

EXAMPLES = Path(__file__).resolve().parent.parent/'examples'
FAST = {'max_steps': 2, 'max_samples': 24, 'per_device_train_batch_size': 4, 'save_steps': None}
BASE = {'stage': 'sft', 'model_name_or_path': 'lab:test', 'dataset': 'lab:instructions'}


def _yaml(tmp_path, d, name='train.yaml'):
    p = tmp_path/name; p.write_text(yaml.safe_dump(d)); return p


def _ids(tok):
    return tok.apply_chat_template([{'role': 'user', 'content': 'Where was Ada born?'}],
                                   add_generation_prompt=True, return_tensors='pt',
                                   return_dict=True)['input_ids']


@torch.no_grad()
def _logits(model, ids): return model(ids).logits


def test_unknown_key_names_it_and_the_nearest(tmp_path):
    p = _yaml(tmp_path, {**BASE, 'learning_rat': 1e-4})
    with pytest.raises(ConfigError, match=re.escape(
            f"unknown key 'learning_rat' in {p} (stage sft); did you mean 'learning_rate'?")):
        parse_train_config(p)
    with pytest.raises(ConfigError, match=re.escape(
            "key 'beta' in the train config is not a setting of stage sft; it belongs to stage dpo")):
        parse_train_config({**BASE, 'beta': 0.1})
    with pytest.raises(ConfigError, match=re.escape(
            "key 'r' in the train config is a LoRA setting, but finetuning_type is 'full'")):
        parse_train_config({**BASE, 'finetuning_type': 'full', 'r': 8})


def test_bad_values_and_missing_keys(tmp_path):
    p = _yaml(tmp_path, {**BASE, 'learning_rate': 'fast'})
    with pytest.raises(ConfigError, match=re.escape(
            f"{p}: config field 'learning_rate' expects float, got str 'fast'")):
        parse_train_config(p)
    cases = [({**BASE, 'max_steps': 0}, "the train config: max_steps must be -1"),
             ({**BASE, 'r': 0}, "the train config: r must be a positive integer, got 0"),
             ({'model_name_or_path': 'lab:test', 'dataset': 'lab:qa'},
              "the train config: missing required key 'stage' (one of pt, sft, rm, ppo, dpo)"),
             ({**BASE, 'stage': 'rlhf'}, "the train config: stage must be one of pt, sft, rm, ppo, "
                                         "dpo, got 'rlhf'"),
             ({'stage': 'sft', 'model_name_or_path': 'lab:test'},
              "the train config: missing required key 'dataset'"),
             ({**BASE, 'stage': 'ppo', 'dataset': 'lab:prompts'},
              "the train config: missing required key 'reward_model'"),
             ({**BASE, 'finetuning_type': 'qlora8'},
              "the train config: finetuning_type must be one of full, lora, qlora, got 'qlora8'"),
             ({**BASE, 'max_samples': -3}, "max_samples must be a positive integer, got -3"),
             ({**BASE, 'resume': 'yes'}, "resume must be true or false, got 'yes'")]
    for d, msg in cases:
        with pytest.raises(ConfigError, match=re.escape(msg)): parse_train_config(d)
    with pytest.raises(FileNotFoundError, match='train config .*nope.yaml not found'):
        parse_train_config(tmp_path/'nope.yaml')
    (tmp_path/'list.yaml').write_text('- 1\n- 2\n')
    with pytest.raises(ConfigError, match='must hold a mapping of keys to values, got list'):
        parse_train_config(tmp_path/'list.yaml')


def test_keys_follow_the_dataclasses():
    "A field added to TrainingConfig (the distributed work adds some) is a valid key of every stage."
    from fttk.sft import TrainingConfig
    import dataclasses
    for f in dataclasses.fields(TrainingConfig):
        assert all(f.name in valid_keys(s, 'full') for s in ('pt', 'sft', 'rm', 'ppo', 'dpo'))


def test_bad_data_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "lab:corpus: stage dpo needs rows with 'chosen', 'rejected'; row 0 has ['text'] "
            "(a lab data set for dpo: lab:preferences)")):
        train({**BASE, **FAST, 'stage': 'dpo', 'dataset': 'lab:corpus'}, progress=False)
    with pytest.raises(ValueError, match="unknown lab data set 'lab:chats'"):
        train({**BASE, **FAST, 'dataset': 'lab:chats'}, progress=False)
    with pytest.raises(FileNotFoundError, match='model folder ./missing does not exist'):
        train({**BASE, **FAST, 'model_name_or_path': './missing'}, progress=False)
    with pytest.raises(FileNotFoundError, match='no JSONL file at missing.jsonl'):
        train({**BASE, **FAST, 'dataset': 'missing.jsonl'}, progress=False)
    assert not (tmp_path/'runs').exists()         # nothing written before the inputs are checked


def test_examples_chain(tmp_path, monkeypatch):
    "Every examples/ file at test size, in the README's order: sft -> rm -> ppo and sft -> dpo."
    monkeypatch.chdir(tmp_path)
    base = load_run('lab:test')[0].state_dict()
    order = ['pt_lora', 'sft_lora', 'sft_full', 'sft_qlora', 'rm_lora', 'ppo_lora', 'dpo_lora']
    assert sorted(order) == sorted(p.stem for p in EXAMPLES.glob('*.yaml'))
    runs = {}
    for name in order:
        runs[name] = train(EXAMPLES/f'{name}.yaml', FAST, progress=False)
        out = tmp_path/'runs'/'examples'/name
        assert runs[name]['run'] == Path('runs/examples')/name
        for f in ('config.yaml', 'fingerprint.json', 'metrics.jsonl', 'train.yaml',
                  'plots/loss.png', 'final/fttk_run.json'):
            assert (out/f).is_file(), (name, f)
        assert yaml.safe_load((out/'train.yaml').read_text())['stage'] == name.split('_')[0]
    # LoRA: adapters trained (B starts at zero), base weights frozen and saved nowhere
    m = runs['sft_lora']['model']
    assert all(l.lora_B.weight.abs().sum() > 0 for l in lora_layers(m).values())
    sd = {k.replace('.base_layer', ''): v for k, v in m.state_dict().items()}
    assert all(torch.equal(sd[k], v) for k, v in base.items())
    # full: every weight trainable and moved
    full = runs['sft_full']['model'].state_dict()
    assert all(not torch.equal(full[k], v) for k, v in base.items() if v.ndim == 2)
    metas = {n: load_run(f'runs/examples/{n}')[2] for n in order}
    sft = str((tmp_path/'runs/examples/sft_lora').resolve())
    assert metas['rm_lora']['base_model_name_or_path'] == sft
    assert metas['dpo_lora']['base_model_name_or_path'] == sft
    assert metas['rm_lora']['model_class'] == 'sequence_classification'
    assert metas['sft_qlora']['quant_config']['bnb_4bit_quant_type'] == 'nf4'
    assert metas['pt_lora']['world'] == metas['ppo_lora']['world'] == 'test'
    # chained: the rm starts from the SFT model merged, so its backbone is not the base's
    rm = load_run('runs/examples/rm_lora', merge=True)[0]
    assert not torch.equal(rm.model.layers[0].self_attn.q_proj.weight,
                           base['model.layers.0.self_attn.q_proj.weight'])


@pytest.mark.parametrize('ft', ['lora', 'full', 'qlora'])
def test_final_gives_the_trained_logits(tmp_path, monkeypatch, ft):
    "load_run(output_dir) is the model in memory at the end of training, bit for bit."
    monkeypatch.chdir(tmp_path)
    r = train({**BASE, **FAST, 'finetuning_type': ft, 'output_dir': 'out'}, progress=False)
    if ft != 'full': enable_fast_lora(r['model'], False)   # the fused path sums in another order
    m, tok, meta = load_run('out')
    assert (meta['stage'], meta['finetuning_type'], meta['base_model_name_or_path']) == \
        ('sft', ft, 'lab:test')
    files = sorted(p.name for p in (tmp_path/'out'/'final').iterdir())
    assert ('adapter_model.safetensors' in files) == (ft != 'full')
    ids = _ids(tok)
    assert torch.equal(_logits(r['model'], ids), _logits(m, ids))
    assert torch.equal(_logits(load_run('out/final')[0], ids), _logits(m, ids))   # final/ too
    assert not torch.equal(_logits(load_run('lab:test')[0], ids), _logits(m, ids))
    if ft == 'full': return
    # merged (what fttk export saves): plain nn.Linear layers, the trained logits to float32 rounding.
    # A QLoRA adapter merges into the dequantized NF4 weights: measured 7e-6 from the trained logits
    # (max|logit| 15), where merging into the float base it started from is off by 2.5
    merged = load_run('out', merge=True)[0]
    assert not lora_layers(merged) and not any(is_quantized_layer(x) for x in merged.modules())
    ref = _logits(m, ids)
    assert (_logits(merged, ids) - ref).abs().max() < 1e-3 * ref.abs().max()


def test_reward_model_final_scores_match(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = train({**BASE, **FAST, 'stage': 'rm', 'dataset': 'lab:preferences', 'output_dir': 'rm'},
              progress=False)
    enable_fast_lora(r['model'], False)
    m, tok, meta = load_run('rm')
    assert meta['head_seed'] == 0 and type(m).__name__ == 'LlamaForSequenceClassification'
    ids = _ids(tok)
    assert torch.equal(_logits(r['model'], ids), _logits(m, ids))


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = {**BASE, 'max_samples': 32, 'per_device_train_batch_size': 4, 'save_steps': 2,
           'lr_scheduler_type': 'constant'}
    a = train({**run, 'max_steps': 4, 'output_dir': 'a'}, progress=False)
    train({**run, 'max_steps': 2, 'output_dir': 'b'}, progress=False)          # "interrupted"
    b = train({**run, 'max_steps': 4, 'output_dir': 'b', 'resume': True}, progress=False)
    assert [x['loss'] for x in a['result']['log']] == [x['loss'] for x in b['result']['log']]
    wa, wb = load_run('a')[0].state_dict(), load_run('b')[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(FileNotFoundError, match='cannot resume: run folder c does not exist'):
        train({**run, 'output_dir': 'c', 'resume': True}, progress=False)


def _family_folder(path: Path, family: str) -> Path:
    "A small randomly initialised model of another family, saved with the lab test tokenizer."
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    from fttk.world import lab_tokenizer
    tok = lab_tokenizer('test')
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **kw)) if family == 'qwen2'
             else GPTNeoXForCausalLM(GPTNeoXConfig(**kw)))
    model.save_pretrained(path); tok.save_pretrained(path)
    return path


@pytest.mark.parametrize('family', ['qwen2', 'gpt_neox'])
def test_every_stage_on_a_model_folder(tmp_path, monkeypatch, family):
    "A real transformers model folder, not the lab one: pt, sft, then rm, dpo, ppo chained."
    monkeypatch.chdir(tmp_path)
    folder = _family_folder(tmp_path/family, family)
    common = {**FAST, 'target_modules': 'all-linear'}
    stages = [('pt', family, 'lab:corpus@test', {}), ('sft', family, 'lab:instructions@test', {}),
              ('rm', 'sft', 'lab:preferences@test', {}), ('dpo', 'sft', 'lab:preferences@test', {}),
              ('ppo', 'sft', 'lab:prompts@test', {'reward_model': 'rm', 'response_length': 6})]
    for stage, start, data, extra in stages:
        r = train({**common, 'stage': stage, 'model_name_or_path': start, 'dataset': data,
                   'output_dir': stage, **extra}, progress=False)
        enable_fast_lora(r['model'], False)
        m, tok, meta = load_run(stage)
        assert meta['stage'] == stage
        ids = _ids(tok)
        assert torch.equal(_logits(r['model'], ids), _logits(m, ids)), stage
    assert load_run('sft')[2]['base_model_name_or_path'] == str(folder.resolve())
    with pytest.raises(ValueError, match=re.escape(
            "name the size: lab:qa@test or lab:qa@default")):
        train({**common, 'stage': 'sft', 'model_name_or_path': family, 'dataset': 'lab:qa',
               'output_dir': 'x'}, progress=False)


def test_load_run_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _family_folder(tmp_path/'qwen', 'qwen2')
    m, tok, meta = load_run(folder)
    assert type(m).__name__ == 'Qwen2ForCausalLM' and meta['finetuning_type'] is None
    assert tok.chat_template                         # saved with the folder
    train({**BASE, **FAST, 'save_steps': 1, 'output_dir': 'r'}, progress=False)
    import shutil; shutil.rmtree(tmp_path/'r'/'final')
    with pytest.raises(FileNotFoundError, match=re.escape(
            "r is an fttk run without final/ (unfinished?)")):
        load_run('r')


def test_cli_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = _yaml(tmp_path, {**BASE, 'output_dir': 'cli'})
    assert main(['train', str(p), 'max_steps=1', 'max_samples=8', 'per_device_train_batch_size=4',
                 'learning_rate=1.0e-3']) == 0
    out = capsys.readouterr().out
    assert 'run folder: cli; trained model: cli/final' in out
    assert yaml.safe_load((tmp_path/'cli'/'train.yaml').read_text())['max_steps'] == 1
    bad = _yaml(tmp_path, {**BASE, 'learning_rat': 1e-4}, 'bad.yaml')
    assert main(['train', str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == (f"fttk: error: unknown key 'learning_rat' in {bad} (stage sft); "
                   "did you mean 'learning_rate'?\n")
    assert main(['train', str(p), 'max_steps']) == 2
    assert "override 'max_steps' is not key=value" in capsys.readouterr().err


def test_output_dir_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path/'old').mkdir(); (tmp_path/'old'/'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match=re.escape(
            "output_dir old is not empty: set resume: true to continue the run in it, "
            "overwrite_output_dir: true to replace it, or choose another output_dir")):
        train({**BASE, **FAST, 'output_dir': 'old'}, progress=False)
    assert [p.name for p in (tmp_path/'old').iterdir()] == ['notes.txt']


def test_ref_model_key(tmp_path, monkeypatch):
    "dpo's `ref_model:` given as the start model trains exactly as the default reference does."
    monkeypatch.chdir(tmp_path)
    d = {**BASE, **FAST, 'stage': 'dpo', 'dataset': 'lab:preferences', 'finetuning_type': 'full'}
    a = train({**d, 'output_dir': 'a'}, progress=False)
    b = train({**d, 'output_dir': 'b', 'ref_model': 'lab:test'}, progress=False)
    assert [r['loss'] for r in a['result']['log']] == [r['loss'] for r in b['result']['log']]
    with pytest.raises(ConfigError, match="key 'ref_model' in the train config is not a setting "
                                          "of stage sft; it belongs to stage ppo, dpo"):
        parse_train_config({**BASE, 'ref_model': 'lab:test'})


def test_hf_backend_adapter_loads(tmp_path, monkeypatch):
    "backend: hf trains a peft model; its saved adapter loads through load_run with the same logits."
    monkeypatch.chdir(tmp_path)
    r = train({**BASE, **FAST, 'backend': 'hf', 'output_dir': 'hf'}, progress=False)
    assert type(r['model']).__name__.startswith('Peft') and r['meta']['backend'] == 'hf'
    cfg = json.loads((tmp_path/'hf'/'final'/'adapter_config.json').read_text())
    assert cfg['base_model_name_or_path'] == 'lab:test'           # the spec, not a cache folder
    m, tok, meta = load_run('hf')
    ids = _ids(tok)
    assert torch.equal(_logits(r['model'], ids), _logits(m, ids))


def test_eval_dataset_and_data_folder(tmp_path, monkeypatch):
    "`eval_dataset` adds the eval loss every eval_steps; a folder of JSONL files is a data set."
    from fttk.world import lab_world
    monkeypatch.chdir(tmp_path)
    (tmp_path/'chats').mkdir()
    rows = lab_world('test').instruction_rows()[:12]
    (tmp_path/'chats'/'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = train({**BASE, **FAST, 'dataset': 'chats', 'eval_dataset': 'lab:qa', 'eval_steps': 1,
               'output_dir': 'ev'}, progress=False)
    assert r['result']['data']['rows'] == 12
    assert all('eval_loss' in row for row in r['result']['log'])
    with pytest.raises(ConfigError, match=re.escape(
            "the train config: eval_dataset needs eval_steps (evaluate every so many steps)")):
        parse_train_config({**BASE, 'eval_dataset': 'lab:qa'})


@pytest.mark.skipif(torch.cuda.is_available(), reason='Unsloth may run where there is a GPU')
def test_unsloth_without_gpu_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "backend='unsloth' needs a CUDA GPU (torch.cuda.is_available() is False); use "
            "backend='fttk' or 'hf' here")):
        train({**BASE, **FAST, 'backend': 'unsloth', 'output_dir': 'u'}, progress=False)


HUB_SCRIPT = r'''
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from fttk.cli import main
from fttk.train import load_run
assert main(['train', 'train.yaml']) == 0
m, tok, meta = load_run('out')
ids = tok.apply_chat_template([{'role': 'user', 'content': 'Where was Ada born?'}], add_generation_prompt=True,
                              return_tensors='pt', return_dict=True)['input_ids']
# plain peft on the hub base reads the adapter fttk saved
ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('fttk-test/tiny-qwen2'), 'out/final').eval()
with torch.no_grad(): d = (m(ids).logits - ref(ids).logits).abs().max().item()
assert main(['export', 'out', '--out', 'merged']) == 0
json.dump({'meta': meta, 'peft_diff': d, 'adapter': json.load(open('out/final/adapter_config.json'))},
          open('result.json', 'w'))
'''


def test_a_hub_model_name(tmp_path):
    """`model_name_or_path: org/name` goes through the hub code path (transformers' from_pretrained by name).
    No network here, so the name is served from a hub cache laid out as huggingface_hub writes it, with
    HF_HUB_OFFLINE=1; the run records the name, and plain peft loads its adapter onto that base."""
    import shutil, subprocess, sys
    sha = 'a' * 40
    repo = tmp_path/'hf'/'hub'/'models--fttk-test--tiny-qwen2'
    (repo/'refs').mkdir(parents=True); (repo/'refs'/'main').write_text(sha)
    shutil.copytree(_family_folder(tmp_path/'src', 'qwen2'), repo/'snapshots'/sha)
    _yaml(tmp_path, {**BASE, **FAST, 'model_name_or_path': 'fttk-test/tiny-qwen2',
                     'dataset': 'lab:instructions@test', 'target_modules': 'all-linear', 'output_dir': 'out'})
    (tmp_path/'hub.py').write_text(HUB_SCRIPT)
    env = {**__import__('os').environ, 'HF_HOME': str(tmp_path/'hf'), 'HF_HUB_OFFLINE': '1',
           'PYTHONPATH': str(Path(__file__).resolve().parents[1]), 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, 'hub.py'], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path/'result.json').read_text())
    assert res['meta']['base_model_name_or_path'] == res['adapter']['base_model_name_or_path'] == \
        'fttk-test/tiny-qwen2'
    assert res['peft_diff'] < 1e-5                   # measured 0: the same weights, the same kernels
    assert (tmp_path/'merged'/'model.safetensors').is_file()


def test_a_hub_dataset_name(tmp_path, monkeypatch):
    "`dataset: org/name` is read with datasets.load_dataset(name, split=...) (stood in for here: no network)."
    import datasets
    rows = [{'instruction': f'Say {w}.', 'output': w} for w in ('yes', 'no', 'maybe', 'never')] * 3
    calls = []
    def fake(path, split=None, **kw):
        calls.append((path, split)); return datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, 'load_dataset', fake)
    monkeypatch.chdir(tmp_path)
    r = train({**BASE, **FAST, 'dataset': 'fttk-test/alpaca', 'dataset_split': 'train[:12]',
               'output_dir': 'out'}, progress=False)
    assert calls == [('fttk-test/alpaca', 'train[:12]')]
    assert r['result']['steps'] == 2 and load_run('out')[2]['stage'] == 'sft'
