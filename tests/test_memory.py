"Tests for fttk.memory: the paper's numbers, shapes from configs, LoRA/QLoRA, activations, CLI and bad input."
import json
import re
import pytest
import torch

from fttk.core import ConfigError
from fttk.memory import (GB, NF4_DQ_BITS, MemoryConfig, activation_bytes, comm_volume, deepspeed_zero2_estimate,
                         deepspeed_zero3_estimate, deepspeed_zero2_mem, deepspeed_zero3_mem, estimate_memory, lab_config, lora_params, measure_saved_activations,
                         memory_main, model_spec, state_bytes, zero_model_states)

LLAMA2_7B = dict(model_type='llama', hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


@pytest.fixture(scope='module')
def llama7b(): return model_spec(LLAMA2_7B)


@pytest.fixture(scope='module')
def lab(): return model_spec('lab:default')


def test_paper_table():
    # ZeRO paper / slides: Psi = 7.5B, N_d = 64, K = 12
    got = [sum(zero_model_states(7.5e9, s, 64).values()) / GB for s in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    assert got[1] == pytest.approx(4*7.5 + 12*7.5/64)
    assert got[2] == pytest.approx(2*7.5 + 14*7.5/64)


def test_three_b_times_sixteen():
    assert 3e9 * state_bytes('mixed', 'adamw').total / GB == 48


@pytest.mark.parametrize('dtype,optim,expected', [('mixed', 'adamw', (2, 2, 12)), ('fp32', 'adamw', (4, 4, 8)),
                                                  ('bf16', 'adamw', (2, 2, 4)), ('mixed', 'sgd', (2, 2, 8)),
                                                  ('fp32', 'sgd', (4, 4, 4))])
def test_state_bytes(dtype, optim, expected):
    b = state_bytes(dtype, optim)
    assert (b.param, b.grad, b.optim) == expected


def test_fsdp2_engine_differs_only_at_stage_2():
    for s in (0, 1, 3):
        assert zero_model_states(1000, s, 4, 'fp32', engine='fsdp2') == zero_model_states(1000, s, 4, 'fp32')
    assert sum(zero_model_states(1000, 2, 4, 'fp32', engine='fsdp2').values()) == 4000 + 16000/4


@pytest.mark.parametrize('kwargs,msg', [
    (dict(ranks=0), 'ranks (data-parallel processes) must be a positive integer, got 0'),
    (dict(ranks=-3), 'must be a positive integer, got -3'),
    (dict(stage=4), 'ZeRO stage must be 0, 1, 2 or 3'),
    (dict(optim='lion'), "unknown optimizer 'lion'; choose one of: adamw, adam, sgd"),
    (dict(dtype='fp8'), "unknown dtype 'fp8'; choose one of: mixed, fp32, bf16"),
])
def test_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=None) as e: zero_model_states(1e9, **{'stage': 0, **kwargs})
    assert msg in str(e.value)
    with pytest.raises(ConfigError) as e: MemoryConfig(params=1e9, **kwargs)
    assert msg in str(e.value)


def test_config_missing_hidden_size(tmp_path):
    with pytest.raises(ValueError, match='model config has no hidden size'):
        model_spec({'model_type': 'llama', 'num_hidden_layers': 2})
    p = tmp_path/'config.json'; p.write_text(json.dumps({'model_type': 'llama', 'vocab_size': 100}))
    with pytest.raises(ValueError, match='no hidden size'): model_spec(p)
    with pytest.raises(FileNotFoundError, match='no model config file'): model_spec(tmp_path/'nope.json')


def test_llama7b_param_count(llama7b, tmp_path):
    assert llama7b.n_params == 6_738_415_616
    (tmp_path/'config.json').write_text(json.dumps(LLAMA2_7B))
    assert model_spec(tmp_path).n_params == llama7b.n_params


def test_lora_matches_fttk_lora(lab):
    from transformers import LlamaForCausalLM
    from fttk.lora import inject_lora, trainable_parameters
    targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
    for r, t in ((8, targets), (2, ['q_proj', 'v_proj'])):
        m = inject_lora(LlamaForCausalLM(lab_config('default')), r=r, target_modules=t)
        assert trainable_parameters(m)[0] == lora_params(lab, r, t)
    assert lora_params(lab, 8) == lora_params(lab, 8, targets)   # default = every linear in the blocks


def test_nf4_matches_fttk_quant():
    from fttk.quant import bits_per_param, quantize_nf4
    assert bits_per_param('nf4_dq') == NF4_DQ_BITS
    w = torch.randn(256, 256)
    assert quantize_nf4(w, double_quant=True).nbytes == pytest.approx(w.numel()*NF4_DQ_BITS/8, rel=1e-3)


def test_qlora_estimate(llama7b):
    e = estimate_memory(MemoryConfig(config='x', lora_r=16, qlora=True), spec=llama7b)
    lin = llama7b.linear_params
    assert e.rows['frozen base'] == pytest.approx(lin*NF4_DQ_BITS/8 + (llama7b.n_params - lin)*2)
    assert e.psi_trainable == lora_params(llama7b, 16)
    assert e.rows['optim'] == 12*e.psi_trainable


@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
def test_activations_match_autograd(lab, attn):
    from transformers import LlamaForCausalLM
    cfg = lab_config('default'); cfg._attn_implementation = attn
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    assert activation_bytes(lab, 2, 48, 'fp32', attn=attn) == pytest.approx(measure_saved_activations(m, ids), rel=0.01)


def test_checkpointing_and_methods(llama7b):
    kw = dict(config='x', batch=2, seq=1024)
    a = estimate_memory(MemoryConfig(**kw), spec=llama7b).rows['activations']
    ac = estimate_memory(MemoryConfig(gradient_checkpointing=True, **kw), spec=llama7b).rows['activations']
    assert ac < a / 5
    dpo = estimate_memory(MemoryConfig(method='dpo', **kw), spec=llama7b)
    assert dpo.rows['reference model'] == 2*llama7b.n_params and dpo.rows['activations'] == 2*a
    ppo = estimate_memory(MemoryConfig(method='ppo', **kw), spec=llama7b)
    assert ppo.rows['value model'] == 16*llama7b.n_params
    lora_dpo = estimate_memory(MemoryConfig(method='dpo', lora_r=8, **kw), spec=llama7b)
    assert 'reference model' not in lora_dpo.rows        # adapters off = the reference



def test_dpo_precomputed_reference(llama7b):
    "TRL's precompute_ref_log_probs: the reference model row goes, nothing else moves; LoRA has none either way."
    kw = dict(config='x', batch=2, seq=1024, method='dpo')
    ref = estimate_memory(MemoryConfig(**kw), spec=llama7b)
    pre = estimate_memory(MemoryConfig(precompute_ref_log_probs=True, **kw), spec=llama7b)
    assert ref.rows == {**pre.rows, 'reference model': 2*llama7b.n_params}
    assert list(pre.rows) == ['params', 'grads', 'optim', 'activations'] and pre.comm_bytes == ref.comm_bytes
    for stage in (2, 3):          # the reference is sharded only at stage 3
        r = estimate_memory(MemoryConfig(stage=stage, ranks=4, **kw), spec=llama7b)
        p = estimate_memory(MemoryConfig(stage=stage, ranks=4, precompute_ref_log_probs=True, **kw), spec=llama7b)
        assert r.total - p.total == 2*llama7b.n_params / (4 if stage == 3 else 1)
    lora = [estimate_memory(MemoryConfig(lora_r=8, precompute_ref_log_probs=b, **kw), spec=llama7b) for b in (False, True)]
    assert lora[0].rows == lora[1].rows and 'reference model' not in lora[0].rows
    assert 'method: dpo (reference log-probs precomputed)' in pre.table()
    assert MemoryConfig(params=7e9).precompute_ref_log_probs is False
    with pytest.raises(ConfigError, match=_exact("precompute_ref_log_probs is for method='dpo' (PPO scores responses "
                                                 "it samples during training), got method='ppo'")):
        MemoryConfig(params=7e9, method='ppo', precompute_ref_log_probs=True)

def test_comm_volume():
    assert comm_volume(1e9, stage=0, ranks=2) == 1e9
    assert comm_volume(1e9, stage=3, ranks=2) == 1.5e9
    assert comm_volume(10, 100, stage=3, ranks=2) == (200 + 10)/2


def test_deepspeed_formulas():
    # DeepSpeed >= PR #5099: 2 Psi + 18 Psi/N at stage 2 (the paper's 2 Psi + 14 Psi/N plus fp32 grads)
    assert deepspeed_zero2_estimate(1e9, 8) == 2e9 + 18e9/8
    assert deepspeed_zero3_estimate(1e9, 1e8, 8) == 4e8 + 18e9/8
    assert deepspeed_zero2_estimate(1e9, 8) - sum(zero_model_states(1e9, 2, 8).values()) == 4e9/8


@pytest.fixture(scope='module')
def ds():
    "DeepSpeed's own estimators (imports on CPU; its 'Setting accelerator to CPU' log line is harmless)."
    pytest.importorskip('deepspeed')
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    return stage_1_and_2.estimate_zero2_model_states_mem_needs, stage3.estimate_zero3_model_states_mem_needs


# (total params, largest layer, gpus per node, nodes): a lab model, Llama-2-7B (and its largest layer),
# a count that does not divide evenly, and multi-node setups where CPU and GPU terms part ways
DS_SETTINGS = [(2_164_416, 393_216, 1, 1), (6_738_415_616, 131_072_000, 8, 1), (7.5e9, 1e8, 8, 8),
               (1_000_000_007, 12_345_679, 3, 2), (175e9, 2.5e9, 16, 64), (1e6, 1e6, 1, 4)]


@pytest.mark.parametrize('psi,largest,gpus,nodes', DS_SETTINGS)
@pytest.mark.parametrize('cpu_offload', [False, True])
def test_zero2_equals_deepspeed(ds, psi, largest, gpus, nodes, cpu_offload):
    z2, _ = ds
    for f in (1.5, 1.0):
        assert deepspeed_zero2_mem(psi, gpus, nodes, cpu_offload, f) == z2(psi, gpus, nodes, cpu_offload, f)


@pytest.mark.parametrize('psi,largest,gpus,nodes', DS_SETTINGS)
@pytest.mark.parametrize('cpu_offload,offload_params', [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize('zero_init', [True, False])
def test_zero3_equals_deepspeed(ds, psi, largest, gpus, nodes, cpu_offload, offload_params, zero_init):
    _, z3 = ds
    ours = deepspeed_zero3_mem(psi, largest, gpus, nodes, cpu_offload, offload_params, zero_init)
    assert ours == z3(psi, largest, gpus, nodes, cpu_offload, offload_params, zero_init)[:2]


def test_estimate_wrappers_equal_deepspeed(ds):
    z2, z3 = ds
    assert deepspeed_zero2_estimate(6_738_415_616, 8) == z2(6_738_415_616, 8, 1, cpu_offload=False)[1]
    assert deepspeed_zero3_estimate(6_738_415_616, 131_072_000, 8) == \
        z3(6_738_415_616, 131_072_000, 8, 1, cpu_offload=False)[1]


def test_cli_table(capsys):
    assert memory_main(['--params', '7.5e9', '--stage', '2', '--ranks', '64']) == 0
    out = capsys.readouterr().out
    assert 'ZeRO stage 2 x 64 rank(s)' in out and '16.641' in out
    assert memory_main(['--config', 'lab:test', '--lora-r', '4', '--qlora', '--batch', '2', '--seq', '16',
                        '--checkpointing', '--method', 'dpo']) == 0
    out = capsys.readouterr().out
    assert 'frozen base' in out and 'activations' in out and 'QLoRA' in out


@pytest.mark.parametrize('argv,msg', [
    (['--params', '7e9', '--ranks', '0'], 'must be a positive integer, got 0'),
    (['--params', '7e9', '--ranks', '-1'], 'must be a positive integer, got -1'),
    (['--params', '-5'], 'must be a positive number'),
    (['--params', '7e9', '--optim', 'lion'], "invalid choice: 'lion'"),
    (['--params', '7e9', '--dtype', 'fp8'], "invalid choice: 'fp8'"),
    (['--params', '7e9', '--stage', '5'], 'invalid choice: 5'),
    (['--stage', '1'], 'one of the arguments --config --params is required'),
])
def test_cli_argparse_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e: memory_main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_cli_semantic_errors(capsys, tmp_path):
    assert memory_main(['--params', '7e9', '--lora-r', '8']) == 2
    assert 'need layer shapes' in capsys.readouterr().err
    p = tmp_path/'c.json'; p.write_text(json.dumps({'model_type': 'llama'}))
    assert memory_main(['--config', str(p)]) == 2
    assert 'no hidden size' in capsys.readouterr().err
    assert memory_main(['--params', '7e9', '--qlora']) == 2
    assert 'qlora needs lora_r' in capsys.readouterr().err


def _exact(msg): return '^' + re.escape(msg) + '$'


@pytest.mark.parametrize('call,exc,msg', [
    (lambda: zero_model_states(float('nan')), ValueError,
     'parameter count psi must be a finite positive whole number, got nan'),
    (lambda: zero_model_states(float('inf'), 2, 8), ValueError,
     'parameter count psi must be a finite positive whole number, got inf'),
    (lambda: zero_model_states(-1), ValueError, 'parameter count psi must be a finite positive whole number, got -1'),
    (lambda: zero_model_states(0), ValueError, 'parameter count psi must be a finite positive whole number, got 0'),
    (lambda: zero_model_states(1.5), ValueError, 'parameter count psi must be a finite positive whole number, got 1.5'),
    (lambda: zero_model_states(True), TypeError, 'parameter count psi must be a number, got bool True'),
    (lambda: zero_model_states('7e9'), TypeError, "parameter count psi must be a number, got str '7e9'"),
    (lambda: zero_model_states(1e9, 2, 2.0), ValueError,
     'ranks (data-parallel processes) must be a positive integer, got 2.0'),
    (lambda: zero_model_states(1e9, True), ValueError, 'ZeRO stage must be 0, 1, 2 or 3, got True'),
    (lambda: zero_model_states(1e9, 2, 8, engine='megatron'), ValueError,
     "unknown engine 'megatron'; choose one of: zero, fsdp2"),
    (lambda: state_bytes('fp16'), ValueError, "unknown dtype 'fp16'; choose one of: mixed, fp32, bf16"),
    (lambda: state_bytes('mixed', 'lion'), ValueError, "unknown optimizer 'lion'; choose one of: adamw, adam, sgd"),
    (lambda: comm_volume(float('nan')), ValueError, 'psi_trainable must be a finite positive whole number, got nan'),
    (lambda: comm_volume(1e9, -5.0, 3, 2), ValueError, 'psi_total must be a finite positive whole number, got -5.0'),
    (lambda: comm_volume(1e9, stage=3, ranks=0), ValueError,
     'ranks (data-parallel processes) must be a positive integer, got 0'),
    (lambda: deepspeed_zero2_mem(1e9, 0), ValueError, 'gpus_per_node must be a finite positive whole number, got 0'),
    (lambda: deepspeed_zero2_mem(1e9, 8, 1.5), ValueError, 'nodes must be a finite positive whole number, got 1.5'),
    (lambda: deepspeed_zero3_mem(1e9, float('nan')), ValueError,
     'largest_layer must be a finite positive whole number, got nan'),
    (lambda: deepspeed_zero2_estimate(float('inf'), 8), ValueError, 'psi must be a finite positive whole number, got inf'),
])
def test_numeric_inputs_refused(call, exc, msg):
    with pytest.raises(exc, match=_exact(msg)): call()


@pytest.mark.parametrize('kwargs,msg', [
    (dict(params=float('nan')), "config field 'params' must be a finite number, got nan"),
    (dict(params=float('inf')), "config field 'params' must be a finite number, got inf"),
    (dict(params=1.5), 'params must be a positive whole number (a parameter count), got 1.5'),
    (dict(params=-5), 'params must be a positive whole number (a parameter count), got -5.0'),
    (dict(params=7e9, ranks=2.5), "config field 'ranks' expects int, got float 2.5"),
    (dict(params=7e9, stage=7), 'ZeRO stage must be 0, 1, 2 or 3, got 7'),
    (dict(params=7e9, method='kto'), "config field 'method' must be one of ['sft', 'dpo', 'ppo'], got 'kto'"),
    (dict(params=7e9, engine='megatron'), "config field 'engine' must be one of ['zero', 'fsdp2'], got 'megatron'"),
    (dict(params=7e9, dtype='fp16'), "unknown dtype 'fp16'; choose one of: mixed, fp32, bf16"),
    (dict(params=7e9, optim='lion'), "unknown optimizer 'lion'; choose one of: adamw, adam, sgd"),
    (dict(config='lab:default', lora_r=0), 'lora_r must be a positive integer, got 0'),
    (dict(config='lab:default', batch=0, seq=8), 'batch must be a positive integer, got 0'),
])
def test_memory_config_refuses(kwargs, msg):
    with pytest.raises(ConfigError, match=_exact(msg)): MemoryConfig(**kwargs)


@pytest.mark.parametrize('argv,msg', [
    (['--params', 'nan'], 'argument --params: must be a positive number, got nan'),
    (['--params', 'inf'], 'argument --params: must be a positive number, got inf'),
    (['--params', '1e400'], 'argument --params: must be a positive number, got 1e400'),
    (['--params', '0'], 'argument --params: must be a positive number, got 0'),
    (['--params', '1.5'], 'argument --params: must be a whole number of parameters, got 1.5'),
    (['--params', 'seven'], "argument --params: expected a number like 7.5e9, got 'seven'"),
    (['--params', '7e9', '--ranks', '2.5'], "argument --ranks: expected a positive integer, got '2.5'"),
    (['--params', '7e9', '--ranks', 'nan'], "argument --ranks: expected a positive integer, got 'nan'"),
    (['--params', '7e9', '--stage', 'two'], "argument --stage: invalid int value: 'two'"),
    (['--params', '7e9', '--stage', '4'], 'argument --stage: invalid choice: 4 (choose from 0, 1, 2, 3)'),
    (['--params', '7e9', '--dtype', 'fp16'], "argument --dtype: invalid choice: 'fp16' (choose from mixed, fp32, bf16)"),
    (['--params', '7e9', '--optim', 'lion'], "argument --optim: invalid choice: 'lion' (choose from adamw, adam, sgd)"),
    (['--params', '7e9', '--engine', 'megatron'], "argument --engine: invalid choice: 'megatron' (choose from zero, fsdp2)"),
    (['--config', 'lab:test', '--batch', '-2', '--seq', '8'], 'argument --batch: must be a positive integer, got -2'),
    (['--config', 'lab:test', '--lora-r', '0'], 'argument --lora-r: must be a positive integer, got 0'),
])
def test_cli_bad_numbers_exact(argv, msg, capsys):
    with pytest.raises(SystemExit) as e: memory_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    # argparse quotes string choices in some Python versions, not in others: compare the list unquoted
    unquote = lambda line: re.sub(r'\(choose from .*\)', lambda m: m.group(0).replace("'", ''), line)
    assert unquote(err.splitlines()[-1]) == f'fttk memory: error: {msg}'


def test_cli_unreadable_config_is_one_line(tmp_path, capsys):
    d = tmp_path/'cfg.json'; d.mkdir()          # a folder named like a file: reading it is an OSError
    assert memory_main(['--config', str(d/'config.json')]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.splitlines()[-1].startswith('fttk memory: error: no model config file at')
