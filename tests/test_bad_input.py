"""Bad input, audited: every public entry point (CLI subcommands, Config classes, file readers) given a bad
input raises a clear error that names the problem, and leaves the user's files as they were.

CASES is the audit. Each case is one distinct bad input: the entry point, what is wrong, a function of a
scratch folder that feeds it, the exception expected and a regex its message must match. The docs page
"Bad input, audited" (nbs/95_bad_input.ipynb) renders this same list as a table, with the real messages."""
import contextlib, functools, io, json, math, pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from fttk.core import ConfigError, CorruptFileError
from fttk.dpo import DPODataError, DPOLossError


@dataclass
class Case:
    entry: str                       # the public entry point
    bad: str                         # what is wrong with the input
    run: Callable[[Path], object]    # feeds the bad input; gets a fresh scratch folder
    exc: type                        # the exception a user sees
    match: str                       # a regex the message must match
    intact: Callable[[Path], bool] | None = None   # after the error: the user's files are as they were


class CLIError(Exception):
    "A CLI run that exited non-zero: its exit status and the last line of its stderr."


def cli(*argv):
    from fttk.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    text = err.getvalue()
    if 'Traceback' in text: raise AssertionError(f"a raw traceback reached the CLI user:\n{text}")
    if code: raise CLIError(f"exit {code}: {text.strip().splitlines()[-1] if text.strip() else ''}")
    return code


def _cfg(cls_path, **kw):
    mod, name = cls_path.rsplit('.', 1)
    import importlib
    return lambda tmp: getattr(importlib.import_module(mod), name)(**kw)


def _yaml(text, cls='fttk.sft.SFTConfig'):
    def run(tmp):
        import importlib
        mod, name = cls.rsplit('.', 1)
        p = tmp/'cfg.yaml'; p.write_text(text)
        return getattr(importlib.import_module(mod), name).from_yaml(p)
    return run


def _file(name, content: bytes, reader):
    def run(tmp):
        p = tmp/name; p.write_bytes(content)
        return reader(p)
    return run


def _read_jsonl(p):
    from fttk.core import read_jsonl
    return read_jsonl(p)


def _load_tensors(p):
    from fttk.core import load_tensors
    return load_tensors(p)


def _safe_torch_load(p):
    from fttk.core import safe_torch_load
    return safe_torch_load(p)


class _Evil:
    def __reduce__(self): return (print, ('pwned',))


def _run_folder(setup, **kw):
    def run(tmp):
        from fttk.core import RunFolder
        target = setup(tmp)
        return RunFolder(target, **kw)
    return run


def _with_notes(tmp):
    d = tmp/'results'; d.mkdir(); (d/'notes.txt').write_text('mine'); return d


def _notes_intact(tmp): return (tmp/'results'/'notes.txt').read_text() == 'mine' and len(list((tmp/'results').iterdir())) == 1


def _world_into(tmp):
    from fttk.world import World, WorldConfig
    d = tmp/'data'; d.mkdir(); (d/'qa.jsonl').write_text('shipped')
    return World(WorldConfig(n_people=10, bios_per_person=1)).write_jsonl(d)


@functools.lru_cache(maxsize=1)
def _lab_tokenizer():
    from fttk.world import lab_tokenizer
    return lab_tokenizer('test')


def _reward_rows(rows):
    from fttk.reward import prepare_reward_data
    return prepare_reward_data(rows, _lab_tokenizer(), max_length=256)


def _cfg_obj(cls_path, **kw):
    mod, name = cls_path.rsplit('.', 1)
    return getattr(__import__(mod, fromlist=[name]), name)(**kw)


def _reward_run(out):
    from fttk.reward import RewardConfig, reward_train
    return reward_train(None, None, [{'chosen': 'A', 'rejected': 'B'}], RewardConfig(output_dir=str(out)), progress=False)


def _dpo_rows(rows, **kw):
    from fttk.dpo import prepare_dpo_data
    return prepare_dpo_data(rows, _lab_tokenizer(), **{'max_length': 256, **kw})


def _dpo_cfg(out, **kw):
    from fttk.dpo import DPOConfig
    return DPOConfig(output_dir=str(out), learning_rate=1e-3, max_steps=1, per_device_train_batch_size=4,
                     max_length=256, seed=0, **kw)


@functools.lru_cache(maxsize=1)
def _dpo_pairs():
    from fttk.world import lab_world, preference_pairs, preference_rows
    return preference_pairs(preference_rows(lab_world('test')))[:4]


_DPO_BEFORE = {}


def _dpo_nan_loss(tmp):
    "A reference model with NaN weights: the loss is NaN at step 1."
    import copy
    from fttk.dpo import dpo_train
    from fttk.sft import sft_model
    model, tok = sft_model('test')
    ref = copy.deepcopy(model)
    with torch.no_grad(): next(ref.parameters()).fill_(math.nan)
    _DPO_BEFORE[tmp] = (model, {n: p.detach().clone() for n, p in model.named_parameters()})
    return dpo_train(model, tok, _dpo_pairs(), _dpo_cfg(tmp/'run'), ref_model=ref, progress=False)


def _dpo_weights_intact(tmp):
    model, before = _DPO_BEFORE.pop(tmp)
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _dpo_resume_with(content: Callable[[], bytes]):
    "Train one step with precomputed reference log-probs, replace their cache file, resume."
    def run(tmp):
        from fttk.dpo import dpo_train
        from fttk.sft import sft_model
        model, tok = sft_model('test')
        cfg = _dpo_cfg(tmp/'run', precompute_ref_log_probs=True, save_steps=1)
        dpo_train(model, tok, _dpo_pairs(), cfg, progress=False)
        (tmp/'run'/'ref_logps.safetensors').write_bytes(content())
        return dpo_train(model, tok, _dpo_pairs(), cfg, resume=True, progress=False)
    return run


def _ref_cache_bytes(n):
    import safetensors.torch
    return safetensors.torch.save({k: torch.zeros(n, dtype=torch.float64) for k in ('chosen', 'rejected')})


def _safetensors_bytes():
    import safetensors.torch
    return safetensors.torch.save({'w': torch.ones(4, 4)})


def _hal(fn, *a, **kw):
    "A call into fttk.hallucination, imported only when the case runs."
    return lambda tmp: getattr(__import__('fttk.hallucination').hallucination, fn)(*a, **kw)


_QA = [{'name': 'Ada Berg', 'attribute': 'birth_city', 'answer': 'Oslo', 'category': 'Unknown'},
       {'name': 'Bo Lind', 'attribute': 'birth_city', 'answer': 'Rome', 'category': 'HighlyKnown'}]


def _other_run(tmp):
    "A finished unknown-ratio run in tmp/'run' trained at another learning rate, then run_or_load on it."
    from fttk.hallucination import FinetuneConfig, qa_chat, run_or_load
    from fttk.core import RunFolder
    run = RunFolder(tmp/'run')
    run.write_config(FinetuneConfig(output_dir=str(tmp/'run'), learning_rate=1e-3))
    run.write_fingerprint(data=[qa_chat(r) for r in _QA])
    return run_or_load(None, None, _QA, {}, FinetuneConfig(output_dir=str(tmp/'run')))


def _run_intact(tmp): return 'learning_rate: 0.001' in (tmp/'run'/'config.yaml').read_text()


def _train(yaml_text, *extra):
    "fttk train on a config file written into the scratch folder (relative paths resolve there)."
    def run(tmp):
        (tmp/'f.yaml').write_text(yaml_text)
        with contextlib.chdir(tmp): return cli('train', 'f.yaml', *extra)
    return run


_SFT = 'stage: sft\nmodel_name_or_path: lab:test\ndataset: lab:instructions\nmax_steps: 1\n'


CASES = [
    # --- core: configs from YAML and dicts
    Case('Config.from_yaml', 'YAML syntax error', _yaml('learning_rate: [1e-4\n'), Exception, r'is not valid YAML'),
    Case('Config.from_yaml', 'file does not exist', lambda tmp: __import__('fttk.sft').sft.SFTConfig.from_yaml(tmp/'nope.yaml'),
         FileNotFoundError, r'config file not found: .*nope\.yaml'),
    Case('Config.from_yaml', 'a YAML list, not a mapping', _yaml('- 1\n- 2\n'), Exception, r'SFTConfig needs a mapping, got list'),
    Case('Config.from_yaml', 'misspelt key', _yaml('learning_rte: 1e-4\n'), Exception, r"unknown key\(s\) for SFTConfig: 'learning_rte'"),
    Case('Config.from_yaml', 'NaN for a float', _yaml('learning_rate: .nan\n'), Exception, r"'learning_rate' must be a finite number, got nan"),
    Case('Config.from_yaml', 'infinity for a float', _yaml('learning_rate: .inf\n'), Exception, r"'learning_rate' must be a finite number, got inf"),
    Case('Config.from_yaml', 'a word for a float', _yaml('learning_rate: fast\n'), Exception, r"'learning_rate' expects float, got str 'fast'"),
    Case('Config.from_yaml', 'a bool for an int', _yaml('max_steps: true\n'), Exception, r"'max_steps' expects int, got bool"),
    Case('Config.from_yaml', 'a fraction for an int', _yaml('max_steps: 2.5\n'), Exception, r"'max_steps' expects int, got float"),
    # --- core: files
    Case('read_jsonl', 'last line cut short', _file('rows.jsonl', b'{"a": 1}\n{"a": 2, "b": "cut', _read_jsonl),
         Exception, r'rows\.jsonl line 2 is not valid JSON'),
    Case('read_jsonl', 'a line that is a list', _file('rows.jsonl', b'{"a": 1}\n[1, 2]\n', _read_jsonl),
         Exception, r'rows\.jsonl line 2 is a JSON list, not an object'),
    Case('read_jsonl', 'not UTF-8', _file('rows.jsonl', b'\xff\xfe{"a": 1}\n', _read_jsonl), Exception, r'rows\.jsonl is not UTF-8 text'),
    Case('read_jsonl', 'empty file', _file('rows.jsonl', b'\n\n', _read_jsonl), Exception, r'rows\.jsonl holds no rows'),
    Case('read_jsonl', 'no such file', lambda tmp: _read_jsonl(tmp/'missing.jsonl'), FileNotFoundError, r'no JSONL file at .*missing\.jsonl'),
    Case('load_tensors', 'truncated safetensors file', _file('w.safetensors', _safetensors_bytes()[:40], _load_tensors),
         Exception, r'cannot read tensors from .*w\.safetensors'),
    Case('load_tensors', 'a pickle named .safetensors', _file('w.safetensors', pickle.dumps({'w': 1}), _load_tensors),
         Exception, r'cannot read tensors from .*w\.safetensors'),
    Case('load_tensors', 'no such file', lambda tmp: _load_tensors(tmp/'none.safetensors'), FileNotFoundError, r'no tensor file at'),
    Case('save_tensors', 'a value that is not a tensor', lambda tmp: __import__('fttk.core').core.save_tensors({'w': [1, 2]}, tmp/'x.safetensors'),
         TypeError, r"save_tensors takes tensors only; not tensors: \['w'\]"),
    Case('safe_torch_load', 'a pickle that runs code', _file('evil.pt', pickle.dumps(_Evil()), _safe_torch_load),
         Exception, r'cannot safely load .*evil\.pt'),
    # --- core: run folders
    Case('RunFolder', 'non-empty folder, neither resume nor overwrite', _run_folder(_with_notes), FileExistsError,
         r'results is not empty \(it holds notes\.txt\); pass resume=True', _notes_intact),
    Case('RunFolder', 'overwrite=True on a folder that is not an fttk run', _run_folder(_with_notes, overwrite=True), FileExistsError,
         r'is not an fttk run folder', _notes_intact),
    Case('RunFolder', 'resume=True, folder missing', _run_folder(lambda tmp: tmp/'never', resume=True), FileNotFoundError,
         r'cannot resume: run folder .*never does not exist'),
    Case('RunFolder', 'resume=True, no complete checkpoint', _run_folder(_with_notes, resume=True), FileNotFoundError,
         r'has no complete checkpoint .*it holds notes\.txt', _notes_intact),
    Case('RunFolder', 'resume=True and overwrite=True', _run_folder(lambda tmp: tmp/'r', resume=True, overwrite=True), ValueError,
         r'resume=True and overwrite=True contradict each other'),
    Case('RunFolder', 'the path is a file', _run_folder(lambda tmp: (tmp/'f').write_text('x') and tmp/'f'), NotADirectoryError,
         r'run folder .*f is a file, not a folder'),
    Case('set_seed', 'negative seed', lambda tmp: __import__('fttk.core').core.set_seed(-1), ValueError, r'seed must be a non-negative int, got -1'),
    # --- world
    Case('WorldConfig', 'no people', _cfg('fttk.world.WorldConfig', n_people=0), Exception, r'n_people must be a positive number of people, got 0'),
    Case('WorldConfig', 'more people than unique names', _cfg('fttk.world.WorldConfig', n_people=10**7), Exception, r'exceeds the \d+ unique names'),
    Case('WorldConfig', 'known_fraction above 1', _cfg('fttk.world.WorldConfig', known_fraction=1.5), Exception, r'known_fraction must be in \(0, 1\], got 1\.5'),
    Case('BaseModelConfig', 'hidden_size not divisible by heads', _cfg('fttk.world.BaseModelConfig', hidden_size=100, num_attention_heads=3, num_key_value_heads=3),
         Exception, r'hidden_size 100 is not divisible by num_attention_heads 3'),
    Case('BaseModelConfig', 'vocabulary smaller than the bytes', _cfg('fttk.world.BaseModelConfig', vocab_size=100), Exception,
         r'vocab_size must exceed the 256 byte tokens plus \d+ special tokens, got 100'),
    Case('BaseModelConfig', 'warmup_ratio of 1', _cfg('fttk.world.BaseModelConfig', warmup_ratio=1.0), Exception, r'warmup_ratio must be in \[0, 1\), got 1\.0'),
    Case('BaseModelConfig', 'heads not a multiple of KV heads', _cfg('fttk.world.BaseModelConfig', num_key_value_heads=3), Exception,
         r'num_attention_heads 4 is not a multiple of num_key_value_heads 3'),
    Case('base_model', 'unknown size', lambda tmp: __import__('fttk.world').world.base_model('huge'), ValueError, r"unknown lab model size 'huge'"),
    Case('World.write_jsonl', 'folder holds a file of the same name', _world_into, FileExistsError,
         r'already holds .*qa\.jsonl with other content; pass overwrite=True',
         lambda tmp: (tmp/'data'/'qa.jsonl').read_text() == 'shipped' and not (tmp/'data'/'people.jsonl').exists()),
    Case('PreferenceConfig', 'zero annotator noise', _cfg('fttk.world.PreferenceConfig', temperature=0.0), Exception,
         r'temperature must be > 0, got 0\.0'),
    Case('PreferenceConfig', 'one candidate per prompt', _cfg('fttk.world.PreferenceConfig', k=1), Exception, r'k must be in \[2, 5\], got 1'),
    Case('candidate', 'unknown candidate kind', lambda tmp: __import__('fttk.world').world.candidate(
         __import__('fttk.world').world.World(__import__('fttk.world').world.WorldConfig(n_people=5)), None, 'employer', 'rude', None),
         ValueError, r"unknown candidate kind 'rude'"),
    # --- tokenization
    Case('BPETokenizer', 'unknown split pattern name', lambda tmp: __import__('fttk.tokenization').tokenization.BPETokenizer(pattern='bert'),
         ValueError, r"unknown split pattern 'bert': the names are \['gpt2', 'gpt4', 'none'\]"),
    Case('BPETokenizer', 'special token spelled like a vocabulary token',
         lambda tmp: __import__('fttk.tokenization').tokenization.BPETokenizer(special_tokens=['a']),
         ValueError, r"special token 'a' is spelled like vocabulary token 97"),
    Case('BPETokenizer.load', 'empty tokenizer file', _file('tok.json', b'', lambda p: __import__('fttk.tokenization').tokenization.BPETokenizer.load(p)),
         Exception, r'cannot read tokenizer from .*tok\.json: the file is empty'),
    Case('BPETokenizer.load', 'truncated tokenizer file',
         _file('tok.json', b'{"format": "fttk-bpe", "merges": [[97, 98', lambda p: __import__('fttk.tokenization').tokenization.BPETokenizer.load(p)),
         Exception, r'cannot read tokenizer from .*tok\.json: not valid JSON'),
    # --- LoRA
    Case('LoRAConfig', 'rank 0', _cfg('fttk.lora.LoRAConfig', r=0), Exception, r'r must be a positive integer, got 0'),
    Case('LoRAConfig', 'dropout of 1', _cfg('fttk.lora.LoRAConfig', lora_dropout=1.0), Exception, r'lora_dropout must be in \[0, 1\), got 1\.0'),
    Case('LoRAConfig', 'target_modules not a valid regex', _cfg('fttk.lora.LoRAConfig', target_modules='q_proj('), Exception,
         r"target_modules 'q_proj\(' is not a valid regular expression"),
    Case('load_adapter', 'adapter folder without adapter_config.json', lambda tmp: __import__('fttk.lora').lora.load_adapter(torch.nn.Linear(2, 2), tmp),
         FileNotFoundError, r'no adapter_config\.json in'),
    # --- quantization
    Case('quantize_nf4', 'weights with NaN', lambda tmp: __import__('fttk.quant').quant.quantize_nf4(torch.tensor([1.0, float('nan')] * 32)),
         ValueError, r'cannot quantize weights containing NaN or inf'),
    Case('quantize_nf4', 'float64 weights', lambda tmp: __import__('fttk.quant').quant.quantize_nf4(torch.ones(64, dtype=torch.float64)),
         TypeError, r'weight must be float32, float16 or bfloat16, got torch\.float64'),
    Case('quantize_nf4', 'a block size bitsandbytes does not have', lambda tmp: __import__('fttk.quant').quant.quantize_nf4(torch.ones(64), blocksize=100),
         ValueError, r'blocksize must be one of .*got 100'),
    Case('QuantConfig', 'NaN outlier threshold', _cfg('fttk.quant.QuantConfig', llm_int8_threshold=float('nan')), Exception,
         r"'llm_int8_threshold' must be a finite number, got nan"),
    # --- distributed and memory configs
    Case('ShardedRunConfig', 'unknown engine', _cfg('fttk.distributed.ShardedRunConfig', engines=['ddp', 'zero9']), Exception,
         r"unknown engine\(s\) \['zero9'\]"),
    Case('ShardedRunConfig', 'zero processes', _cfg('fttk.distributed.ShardedRunConfig', world_size=0), Exception, r'world_size must be a positive integer, got 0'),
    Case('ShardedRunConfig', 'negative learning rate', _cfg('fttk.distributed.ShardedRunConfig', learning_rate=-1.0), Exception, r'learning_rate must be > 0, got -1\.0'),
    Case('MemoryConfig', 'both a config and a parameter count', _cfg('fttk.memory.MemoryConfig', config='lab:test', params=1e9), Exception,
         r'give exactly one of config'),
    Case('MemoryConfig', 'NaN parameters', _cfg('fttk.memory.MemoryConfig', params=float('nan')), Exception, r"'params' must be a finite number"),
    Case('MemoryConfig', 'ZeRO stage 4', _cfg('fttk.memory.MemoryConfig', params=1e9, stage=4), Exception, r'stage'),
    # --- reward model (fttk.reward): preference rows, config, run folder
    Case('RewardConfig', 'unknown batch_by', _cfg('fttk.reward.RewardConfig', batch_by='prompt'), Exception,
         r"config field 'batch_by' must be one of \['ranking', 'pair'\], got 'prompt'"),
    Case('RewardConfig', 'negative centering coefficient', _cfg('fttk.reward.RewardConfig', center_rewards_coefficient=-0.1),
         Exception, r'center_rewards_coefficient must be None or >= 0, got -0\.1'),
    Case('prepare_reward_data', 'a row without rejected', lambda tmp: _reward_rows([{'chosen': 'A'}]),
         Exception, r"row 0: missing 'rejected'"),
    Case('prepare_reward_data', 'chosen identical to rejected',
         lambda tmp: _reward_rows([{'chosen': 'A', 'rejected': 'B'}, {'prompt': 'Q', 'chosen': 'A', 'rejected': 'A'}]),
         Exception, r"row 1: 'chosen' and 'rejected' are identical"),
    Case('prepare_reward_data', 'chosen of the wrong type', lambda tmp: _reward_rows([{'chosen': 3, 'rejected': 'B'}]),
         Exception, r"row 0: 'chosen' must be a string or a list of \{'role', 'content'\} messages, got int"),
    Case('prepare_reward_data', 'prompt as a string, responses as messages',
         lambda tmp: _reward_rows([{'prompt': 'Q', 'chosen': [{'role': 'assistant', 'content': 'A'}],
                                    'rejected': [{'role': 'assistant', 'content': 'B'}]}]),
         Exception, r'row 0: mixes plain strings and message lists'),
    Case('prepare_reward_data', 'NaN margin', lambda tmp: _reward_rows([{'chosen': 'A', 'rejected': 'B', 'margin': math.nan}]),
         Exception, r"row 0: 'margin' must be a finite number, got nan"),
    Case('prepare_reward_data', 'a pair over max_length',
         lambda tmp: _reward_rows([{'prompt': 'Q ' * 150, 'chosen': 'A', 'rejected': 'B'}]),
         Exception, r"row 0: \d+ tokens, over max_length=256; raise max_length or set truncation_mode='drop'"),
    Case('reward_train', 'output_dir holds the user\'s files', lambda tmp: _with_notes(tmp) and _reward_run(tmp/'results'),
         FileExistsError, r'run folder .*results is not empty', _notes_intact),
    Case('trl_reward_train', 'ranking batches (TRL trains pair by pair)',
         lambda tmp: __import__('fttk.reward').reward.trl_reward_train(None, None, [], _cfg_obj('fttk.reward.RewardConfig')),
         Exception, r"TRL's RewardTrainer trains pair by pair: set batch_by='pair'"),
    # --- DPO (fttk.dpo): preference rows, config, the loop
    Case('prepare_dpo_data', 'a row without rejected', lambda tmp: _dpo_rows([{'prompt': 'Q', 'chosen': 'A'}]),
         DPODataError, r"row 0: missing 'rejected'"),
    Case('prepare_dpo_data', 'a row without chosen', lambda tmp: _dpo_rows([{'prompt': 'Q', 'rejected': 'B'}]),
         DPODataError, r"row 0: missing 'chosen'"),
    Case('prepare_dpo_data', 'no prompt, and chosen and rejected share no start',
         lambda tmp: _dpo_rows([{'chosen': 'Alice', 'rejected': 'Bob'}]),
         DPODataError, r"row 0: no 'prompt' and 'chosen'/'rejected' share no start to take it from; give the prompt"),
    Case('prepare_dpo_data', 'rejected of the wrong type', lambda tmp: _dpo_rows([{'prompt': 'Q', 'chosen': 'A', 'rejected': 7}]),
         DPODataError, r"row 0: 'rejected' must be a string or a list of \{'role', 'content'\} messages, got int"),
    Case('prepare_dpo_data', 'prompt of the wrong type', lambda tmp: _dpo_rows([{'prompt': None, 'chosen': 'A', 'rejected': 'B'}]),
         DPODataError, r"row 0: 'prompt' must be a string or a list of \{'role', 'content'\} messages, got NoneType"),
    Case('prepare_dpo_data', 'a dict instead of a list of rows',
         lambda tmp: _dpo_rows({'prompt': 'Q', 'chosen': 'A', 'rejected': 'B'}),
         DPODataError, r'expected a list of preference rows, got dict'),
    Case('prepare_dpo_data', 'an empty completion after the prompt', lambda tmp: _dpo_rows([{'prompt': 'Q', 'chosen': '', 'rejected': 'B'}]),
         DPODataError, r"row 0: 'chosen' is empty after the prompt"),
    Case('prepare_dpo_data', 'an empty completion and no prompt', lambda tmp: _dpo_rows([{'chosen': 'A', 'rejected': ''}]),
         DPODataError, r"row 0: 'rejected' is empty"),
    Case('prepare_dpo_data', "a pair over max_length, truncation_mode='error'",
         lambda tmp: _dpo_rows([{'prompt': 'Q ' * 150, 'chosen': 'A', 'rejected': 'B'}]),
         DPODataError, r"row 0: \d+ tokens, over max_length=256; raise max_length, or set truncation_mode='drop' or 'keep_start'"),
    Case('prepare_dpo_data', "every pair over max_length, truncation_mode='drop'",
         lambda tmp: _dpo_rows([{'prompt': 'Q ' * 150, 'chosen': 'A', 'rejected': 'B'}], truncation_mode='drop'),
         DPODataError, r'no usable preference pair in 1 rows \(1 over max_length=256\)'),
    Case('DPOConfig', 'unknown loss_type', _cfg('fttk.dpo.DPOConfig', loss_type=['dpo']), ConfigError,
         r"loss_type \['dpo'\] unknown; choose from \["),
    Case('DPOConfig', 'exo_pair without label_smoothing', _cfg('fttk.dpo.DPOConfig', loss_type='exo_pair'), ConfigError,
         r'exo_pair needs label_smoothing > 0'),
    Case('DPOConfig', 'f_divergence_type with a loss that has no f-form',
         _cfg('fttk.dpo.DPOConfig', loss_type=['bco_pair'], f_divergence_type='forward_kl'), ConfigError,
         r"f_divergence_type='forward_kl' has no form for loss_type \['bco_pair'\]; it works with"),
    Case('DPOConfig', 'unknown f_divergence_type', _cfg('fttk.dpo.DPOConfig', f_divergence_type='kl'), ConfigError,
         r"config field 'f_divergence_type' must be one of .*got 'kl'"),
    Case('DPOConfig', 'loss_weights of the wrong length', _cfg('fttk.dpo.DPOConfig', loss_type=['sigmoid', 'sft'], loss_weights=[1.0]),
         ConfigError, r"loss_weights has 1 weights for 2 loss types \['sigmoid', 'sft'\]"),
    Case('DPOConfig', 'beta = 0', _cfg('fttk.dpo.DPOConfig', beta=0.0), ConfigError, r'beta must be > 0, got 0\.0'),
    Case('DPOConfig', 'label_smoothing = 0.5', _cfg('fttk.dpo.DPOConfig', label_smoothing=0.5), ConfigError,
         r'label_smoothing must be in \[0, 0\.5\), got 0\.5'),
    Case('DPOConfig', 'use_weighting=True (not in fttk\'s loop)', _cfg('fttk.dpo.DPOConfig', use_weighting=True), ConfigError,
         r"use_weighting=True is not implemented in fttk's DPO loop; use trl_dpo_train"),
    Case('DPOConfig', 'unknown truncation_mode', _cfg('fttk.dpo.DPOConfig', truncation_mode='keep_end'), ConfigError,
         r"config field 'truncation_mode' must be one of .*got 'keep_end'"),
    Case('dpo_train', 'the loss becomes NaN', _dpo_nan_loss, DPOLossError,
         r'loss became nan at step 1 \(rows \[0, 1, 2, 3\]\); the update was not applied', _dpo_weights_intact),
    Case('dpo_train', 'ref_model=None on a model without LoRA',
         lambda tmp: __import__('fttk.dpo').dpo.dpo_train(*__import__('fttk.sft').sft.sft_model('test'), _dpo_pairs(),
                                                          _dpo_cfg(tmp/'run'), progress=False),
         ValueError, r'ref_model=None takes the policy with its LoRA adapters disabled as the reference, but the policy '
                    r'has no LoRA layer'),
    Case('dpo_train', 'resume with a corrupt ref_logps.safetensors', _dpo_resume_with(lambda: b'not a safetensors file'),
         CorruptFileError, r'cannot read tensors from .*ref_logps\.safetensors'),
    Case('dpo_train', 'resume with ref_logps.safetensors of other data', _dpo_resume_with(lambda: _ref_cache_bytes(3)),
         CorruptFileError, r'ref_logps\.safetensors holds 3 pairs, the data has 4: delete it or train into a new output_dir'),
    Case('dpo_train', 'resume with a safetensors file that is no reference cache', _dpo_resume_with(_safetensors_bytes),
         CorruptFileError, r"ref_logps\.safetensors is not a reference log-prob cache .*it holds \{'w': \[4, 4\]\}"),
    Case('trl_dpo_train', "loss_type 'cdpo' (fttk's own)",
         lambda tmp: __import__('fttk.dpo').dpo.trl_dpo_train(None, None, [], _cfg_obj('fttk.dpo.DPOConfig', loss_type='cdpo')),
         ConfigError, r"loss_type 'cdpo' is fttk's own"),
    # --- PPO (fttk.ppo)
    Case('PPOConfig', 'discount above 1', _cfg('fttk.ppo.PPOConfig', gamma=1.5), Exception, r'gamma must be in \[0, 1\], got 1\.5'),
    Case('PPOConfig', 'unknown KL estimator', _cfg('fttk.ppo.PPOConfig', kl_estimator='k4'), Exception,
         r"config field 'kl_estimator' must be one of \['k1', 'k2', 'k3'\], got 'k4'"),
    Case('PPOConfig', 'dual-clip bound not above 1', _cfg('fttk.ppo.PPOConfig', clip_ratio_c=1.0), Exception,
         r'clip_ratio_c must be None or > 1'),
    Case('check_prompts', 'no prompts', lambda tmp: __import__('fttk.ppo').ppo.check_prompts([]), ValueError,
         r'prompts is empty: PPO needs prompts to sample responses to'),
    Case('check_prompts', 'a row without a prompt', lambda tmp: __import__('fttk.ppo').ppo.check_prompts([{'prompt': 'Q'}, {'question': 'Q'}]),
         ValueError, r"prompt row 1: needs 'prompt'"),
    # --- the known-vs-unknown study (fttk.hallucination)
    Case('exposure_world', 'an exposure of 0 biographies', _hal('exposure_world', exposures=(0, 2)), ValueError,
         r'exposures must be positive whole numbers of biographies, got \(0, 2\)'),
    Case('slick_category', 'more greedy hits than prompts', _hal('slick_category', 5, 4, 0), ValueError,
         r'need 0 <= greedy_hits <= n_prompts.*got greedy_hits=5, n_prompts=4, sample_hits=0'),
    Case('slick_categories', 'no QA rows', _hal('slick_categories', None, None, []), ValueError,
         r'qa_rows is empty: there is nothing to categorise or train on'),
    Case('slick_categories', 'a row without its answer', _hal('slick_categories', None, None, [{'name': 'A', 'attribute': 'birth_city'}]),
         ValueError, r"qa row 0: lacks 'answer' \(has \['attribute', 'name'\]\)"),
    Case('slick_categories', 'an attribute the world lacks',
         _hal('slick_categories', None, None, [{'name': 'A', 'attribute': 'shoe_size', 'answer': '44'}]), ValueError,
         r"qa row 0: attribute 'shoe_size' is not one of \["),
    Case('slick_categories', 'an empty answer', _hal('slick_categories', None, None, [{'name': 'A', 'attribute': 'birth_city', 'answer': ' '}]),
         ValueError, r"qa row 0: answer must be a non-empty string, got ' '"),
    Case('slick_categories', 'sampling temperature 0', _hal('slick_categories', None, None, _QA, temperature=0), ValueError,
         r'temperature must be > 0, got 0'),
    Case('split_facts', 'a held-out attribute the world lacks', _hal('split_facts', _QA, ood_attributes=('shoe_size',)), ValueError,
         r"ood_attributes \['shoe_size'\] are not attributes of the world"),
    Case('split_facts', 'dev + test fractions above 1', _hal('split_facts', _QA, dev_fraction=0.5, test_fraction=0.6), ValueError,
         r'dev_fraction and test_fraction must be > 0 with sum < 1, got 0\.5 and 0\.6'),
    Case('unknown_mix', 'an Unknown ratio above 1', _hal('unknown_mix', _QA, 2, 1.5), ValueError, r'unknown_ratio must be in \[0, 1\], got 1\.5'),
    Case('unknown_mix', 'a pool too small for the set', _hal('unknown_mix', _QA, 4, 0.5), ValueError,
         r'a set of 4 with 50% Unknown needs 2 Unknown and 2 Known rows; the pool has 1 and 1'),
    Case('category_set', "category 'Known' (not a SliCK category)", _hal('category_set', _QA, 'Known', 1), ValueError,
         r"category must be one of \('HighlyKnown', 'MaybeKnown', 'WeaklyKnown', 'Unknown', 'Natural'\), got 'Known'"),
    Case('FinetuneConfig', 'a fractional number of epochs', _cfg('fttk.hallucination.FinetuneConfig', num_train_epochs=2.5), ConfigError,
         r'num_train_epochs must be a whole number of epochs, got 2\.5'),
    Case('FinetuneConfig', 'max_steps instead of epochs', _cfg('fttk.hallucination.FinetuneConfig', max_steps=10), ConfigError,
         r'max_steps must be -1: these runs count whole epochs, got 10'),
    Case('run_or_load', 'output_dir holds a run with another config', _other_run, ValueError,
         r"run folder .*run holds a run with other config fields \['learning_rate'\]; delete it or choose another output_dir",
         _run_intact),
    Case('linear_fit', 'fewer than 4 points', _hal('linear_fit', [{}] * 3), ValueError, r'a 3-parameter fit needs at least 4 points, got 3'),
    Case('stop_points', 'a log with no trained epoch', _hal('stop_points', [{'epoch': 0, 'dev_acc': 0.1}]), ValueError,
         r'the log has no trained epoch \(epoch >= 1\) to choose from'),
    # --- the command line: one line on stderr, exit 2, no traceback
    Case('fttk', 'no subcommand', lambda tmp: cli(), CLIError, r'exit 2: fttk: error: the following arguments are required: command'),
    Case('fttk world build', 'unknown --size', lambda tmp: cli('world', 'build', '--size', 'huge'), CLIError, r"exit 2: .*invalid choice: 'huge'"),
    Case('fttk world build', '--out holds a file with other content',
         lambda tmp: (_with_notes(tmp) and (tmp/'results'/'qa.jsonl').write_text('mine') and cli('world', 'build', '--size', 'test', '--out', tmp/'results')),
         CLIError, r'exit 2: fttk: error: .*already holds qa\.jsonl with other content',
         lambda tmp: (tmp/'results'/'qa.jsonl').read_text() == 'mine' and not (tmp/'results'/'people.jsonl').exists()),
    Case('fttk demo', '--out is a non-empty folder', lambda tmp: _with_notes(tmp) and cli('demo', '--size', 'test', '--out', tmp/'results'),
         CLIError, r'exit 2: fttk: error: run folder .*results is not empty', _notes_intact),
    Case('fttk demo', '--overwrite on a folder that is not an fttk run',
         lambda tmp: _with_notes(tmp) and cli('demo', '--size', 'test', '--out', tmp/'results', '--overwrite'),
         CLIError, r'exit 2: fttk: error: overwrite=True refused: .* is not an fttk run folder', _notes_intact),
    Case('fttk train', 'a misspelt key', _train(_SFT + 'learning_rat: 0.1\n'), CLIError,
         r"exit 2: fttk: error: unknown key 'learning_rat' in f\.yaml \(stage sft\); did you mean 'learning_rate'\?"),
    Case('fttk train', "another stage's key", _train(_SFT + 'beta: 0.1\n'), CLIError,
         r"exit 2: fttk: error: key 'beta' in f\.yaml is not a setting of stage sft; it belongs to stage dpo"),
    Case('fttk train', 'a LoRA key with full fine-tuning', _train(_SFT + 'finetuning_type: full\nr: 8\n'), CLIError,
         r"exit 2: fttk: error: key 'r' in f\.yaml is a LoRA setting, but finetuning_type is 'full'"),
    Case('fttk train', 'a value of the wrong type', _train(_SFT + 'learning_rate: fast\n'), CLIError,
         r"exit 2: fttk: error: f\.yaml: config field 'learning_rate' expects float, got str 'fast'"),
    Case('fttk train', 'no stage', _train('model_name_or_path: lab:test\ndataset: lab:qa\n'), CLIError,
         r"exit 2: fttk: error: f\.yaml: missing required key 'stage' \(one of pt, sft, rm, ppo, dpo\)"),
    Case('fttk train', 'ppo without a reward model', _train('stage: ppo\nmodel_name_or_path: lab:test\ndataset: lab:prompts\n'),
         CLIError, r"exit 2: fttk: error: f\.yaml: missing required key 'reward_model'"),
    Case('fttk train', 'an override without =', _train(_SFT, 'max_steps'), CLIError,
         r"exit 2: fttk: error: override 'max_steps' is not key=value \(e\.g\. max_steps=10\)"),
    Case('fttk train', 'the config file is missing', lambda tmp: cli('train', tmp/'nope.yaml'), CLIError,
         r"exit 2: fttk: error: train config .*nope\.yaml not found"),
    Case('fttk train', 'output_dir holds files', lambda tmp: _with_notes(tmp) and _train(_SFT + 'output_dir: results\n')(tmp), CLIError,
         r"exit 2: fttk: error: output_dir results is not empty: set resume: true", _notes_intact),
    Case('fttk train', 'data set of the wrong shape for the stage', _train('stage: dpo\nmodel_name_or_path: lab:test\ndataset: lab:corpus\n'),
         CLIError, r"exit 2: fttk: error: lab:corpus: stage dpo needs rows with 'chosen', 'rejected'; row 0 has \['text'\]"),
    Case('load_run', 'a run folder without final/', lambda tmp: (tmp/'r'/'checkpoints').mkdir(parents=True) or (tmp/'r'/'config.yaml').write_text('a: 1') and __import__('fttk.train').train.load_run(tmp/'r'),
         FileNotFoundError, r"is an fttk run without final/ \(unfinished\?\)"),
    Case('fttk memory', 'negative --params', lambda tmp: cli('memory', '--params', '-5'), CLIError, r'exit 2: .*--params'),
    Case('fttk memory', 'NaN --params', lambda tmp: cli('memory', '--params', 'nan'), CLIError, r'exit 2: .*--params.*nan'),
    Case('fttk memory', 'neither --config nor --params', lambda tmp: cli('memory'), CLIError, r'exit 2: .*one of the arguments --config --params is required'),
    Case('fttk memory', 'unknown lab size', lambda tmp: cli('memory', '--config', 'lab:huge'), CLIError,
         r"exit 2: .*unknown lab size 'huge'; choose one of: test, default"),
]


def test_audit_is_broad():
    "At least 40 distinct bad inputs, each named once."
    keys = [(c.entry, c.bad) for c in CASES]
    assert len(set(keys)) == len(keys), [k for k in keys if keys.count(k) > 1]
    assert len(CASES) >= 40


@pytest.mark.parametrize('case', CASES, ids=lambda c: f"{c.entry}: {c.bad}")
def test_bad_input_gets_a_clear_error(case, tmp_path):
    with pytest.raises(case.exc, match=case.match):
        case.run(tmp_path)
    if case.intact is not None: assert case.intact(tmp_path), "the user's files were changed"


def audit_table(tmp_root: Path) -> list[dict]:
    "Run every case and return rows (entry point, bad input, error a user sees) for the docs table."
    rows = []
    for i, c in enumerate(CASES):
        tmp = tmp_root/f'case{i}'; tmp.mkdir()
        try: c.run(tmp); msg = 'NO ERROR'
        except Exception as e: msg = f"{type(e).__name__}: {e}"
        rows.append({'entry point': c.entry, 'bad input': c.bad, 'what the user sees': msg.replace(str(tmp), '…')})
    return rows
