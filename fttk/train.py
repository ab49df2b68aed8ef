from __future__ import annotations
import copy, dataclasses, difflib, json, os, shutil, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from .core import Config, ConfigError, RunFolder, atomic_write_text, read_jsonl

STAGES = ('pt', 'sft', 'rm', 'ppo', 'dpo')
FINETUNING_TYPES = ('full', 'lora', 'qlora')
RUN_FILE = 'fttk_run.json'          # what `final/` holds besides the weights: how to load them

def lab_size(spec) -> str | None:
    "'test' for 'lab:test' (and 'default' for 'lab:default'); None for anything else."
    s = str(spec)
    return s[4:] if s.startswith('lab:') and s[4:] in ('test', 'default') else None

def save_final(model, tokenizer, folder, meta: dict) -> Path:
    ("Write a trained model to `folder` (replaced if it exists): full weights, or the LoRA adapter "
     "alone (`meta['finetuning_type']` 'lora'/'qlora'), the tokenizer, and `fttk_run.json`.")
    folder = Path(folder)
    if folder.exists(): shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if meta['finetuning_type'] == 'full': model.save_pretrained(folder)
    elif hasattr(model, 'fttk_lora_config'):
        from fttk.lora import save_adapter
        save_adapter(model, folder, base_model_name_or_path=meta['base_model_name_or_path'])
    else: model.save_pretrained(folder)         # a peft model (backend 'hf' or 'unsloth')
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder/RUN_FILE, json.dumps(meta, indent=2, default=str))
    return folder

def _final_folder(path: Path) -> Path | None:
    "The folder holding `fttk_run.json`: `path` itself, or its `final/`; None if neither."
    for p in (path, path/'final'):
        if (p/RUN_FILE).is_file(): return p
    return None

def _load_plain(spec, model_class: str = 'causal_lm'):
    "(model, tokenizer) of a lab size, a model folder or a hub name, not an fttk run."
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from fttk.world import base_model
    if lab_size(spec): return base_model(lab_size(spec), progress=False)
    s = str(spec)
    if s.startswith(('.', '/', '~')) and not Path(s).expanduser().exists():
        raise FileNotFoundError(f"model folder {s} does not exist")
    if model_class == 'sequence_classification':
        return (AutoModelForSequenceClassification.from_pretrained(s).eval(),
                AutoTokenizer.from_pretrained(s))
    return base_model(str(Path(s).expanduser()) if Path(s).expanduser().exists() else s,
                      progress=False)

def _model_class(folder) -> str:
    "'sequence_classification' if the HF folder's config names a *ForSequenceClassification."
    p = Path(folder)/'config.json'
    archs = json.loads(p.read_text()).get('architectures') or [] if p.is_file() else []
    return ('sequence_classification' if any(a.endswith('ForSequenceClassification')
                                              for a in archs) else 'causal_lm')

def load_run(run_or_model, merge: bool = False):
    ("`(model, tokenizer, meta)` ready for inference from an fttk run folder, its `final/`, a model "
     "folder, 'lab:test'/'lab:default' or a hub name; LoRA adapters applied (merged if `merge`).")
    p = Path(str(run_or_model)).expanduser()
    final = _final_folder(p) if p.is_dir() else None
    if final is None:
        if p.is_dir() and (p/'checkpoints').is_dir():
            raise FileNotFoundError(f"{p} is an fttk run without final/ (unfinished?): resume it "
                                    "with `resume: true`, or load a checkpoint")
        cls = _model_class(p) if p.is_dir() else 'causal_lm'
        model, tok = _load_plain(run_or_model, cls)
        meta = {'stage': None, 'finetuning_type': None, 'model_class': cls,
                'base_model_name_or_path': str(run_or_model), 'world': lab_size(run_or_model)}
        return model.eval(), tok, meta
    meta = json.loads((final/RUN_FILE).read_text())
    return _load_final(final, meta, merge)

def _load_final(final: Path, meta: dict, merge: bool):
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)
    tok = AutoTokenizer.from_pretrained(final)
    seq = meta['model_class'] == 'sequence_classification'
    if meta['finetuning_type'] == 'full':
        cls = AutoModelForSequenceClassification if seq else AutoModelForCausalLM
        return cls.from_pretrained(final).eval(), tok, meta
    # an adapter trained on an NF4 base merges into the float base (NF4 weights cannot take it)
    model = _adapter_base(meta, tok, quantize=not merge)
    from fttk.lora import load_adapter, unload_lora
    load_adapter(model, final)
    if merge: unload_lora(model, merge=True)
    return model.eval(), tok, meta

def _adapter_base(meta: dict, tok, quantize: bool = True):
    "The model a LoRA adapter was trained on: the base (merged, if itself a run), head, NF4."
    base, _, _ = load_run(meta['base_model_name_or_path'], merge=True)
    if meta.get('head_seed') is not None:           # the run put a new scalar head on the base
        from fttk.reward import reward_model
        base, _ = reward_model(base, tok, seed=meta.get('head_seed', 0))
    if quantize and meta.get('quant_config') is not None:
        from fttk.quant import QuantConfig, quantize_model
        quantize_model(base, QuantConfig.from_dict(meta['quant_config']))
    return base

def stage_config_class(stage: str):
    "The Config class whose fields a stage's YAML takes (pt trains with SFT's loop and settings)."
    from fttk.sft import SFTConfig
    from fttk.reward import RewardConfig
    from fttk.ppo import PPOConfig
    from fttk.dpo import DPOConfig
    return {'pt': SFTConfig, 'sft': SFTConfig, 'rm': RewardConfig, 'ppo': PPOConfig,
            'dpo': DPOConfig}[stage]

# fttk train's own keys; the rest are fields of the stage's Config and of LoRAConfig
TRAIN_KEYS = ('stage', 'model_name_or_path', 'dataset', 'dataset_split', 'max_samples',
              'finetuning_type', 'resume')
STAGE_KEYS = {'ppo': ('reward_model',)}
# LLaMA-Factory's names for two LoRA fields
LORA_ALIASES = {'lora_rank': 'r', 'lora_target': 'target_modules'}

def _names(cls) -> list[str]: return [f.name for f in dataclasses.fields(cls)]

def valid_keys(stage: str, finetuning_type: str = 'lora') -> list[str]:
    "Every key a train YAML of this stage and finetuning type accepts."
    from fttk.lora import LoRAConfig
    keys = [*TRAIN_KEYS, *STAGE_KEYS.get(stage, ()), *_names(stage_config_class(stage))]
    if finetuning_type != 'full': keys += [*_names(LoRAConfig), *LORA_ALIASES]
    return sorted(set(keys))

def _unknown_key(key: str, stage: str, ft: str, src: str) -> ConfigError:
    "The error for a key the stage does not take: where it belongs, or the nearest valid key."
    if ft == 'full' and key in valid_keys(stage, 'lora'):
        return ConfigError(f"key {key!r} in {src} is a LoRA setting, but finetuning_type is "
                           "'full'; drop it or set finetuning_type: lora")
    others = [s for s in STAGES if key in valid_keys(s, ft)]
    if others:
        return ConfigError(f"key {key!r} in {src} is not a setting of stage {stage}; it belongs "
                           f"to stage {', '.join(others)}")
    near = difflib.get_close_matches(key, valid_keys(stage, ft), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {valid_keys(stage, ft)}"
    return ConfigError(f"unknown key {key!r} in {src} (stage {stage}){hint}")

def read_train_config(config) -> tuple[dict, str]:
    "`(mapping, name for messages)` of a train YAML file's path, or of a mapping."
    if isinstance(config, dict): return dict(config), 'the train config'
    p = Path(config)
    if not p.is_file(): raise FileNotFoundError(f"train config {p} not found")
    try: d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e: raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values, got {type(d).__name__}")
    return d, str(p)

def _choice(d: dict, key: str, choices, src: str, default=None):
    v = d.get(key, default)
    if v is None:
        raise ConfigError(f"{src}: missing required key {key!r} (one of {', '.join(choices)})")
    if v not in choices:
        raise ConfigError(f"{src}: {key} must be one of {', '.join(choices)}, got {v!r}")
    return v

def _lora_config(d: dict, stage: str, src: str):
    "The LoRAConfig of a train mapping; a reward model also trains its new head ('score')."
    from fttk.lora import LoRAConfig
    kw = {LORA_ALIASES.get(k, k): v for k, v in d.items()
          if k in LORA_ALIASES or k in _names(LoRAConfig)}
    t = kw.get('target_modules')
    if isinstance(t, str) and t != 'all-linear':       # LLaMA-Factory: 'all' or 'q_proj,v_proj'
        kw['target_modules'] = 'all-linear' if t == 'all' else [s.strip() for s in t.split(',')]
    if stage == 'rm': kw.setdefault('modules_to_save', ['score'])
    try: return LoRAConfig.from_dict(kw)
    except ConfigError as e: raise ConfigError(f"{src}: {e}") from None

def parse_train_config(config) -> dict:
    ("Check a train config (YAML path or mapping): `{'stage', 'model', 'dataset', ..., 'config': "
     "the stage's Config, 'lora': LoRAConfig or None, 'raw': the mapping}`.")
    d, src = read_train_config(config)
    stage = _choice(d, 'stage', STAGES, src)
    ft = _choice(d, 'finetuning_type', FINETUNING_TYPES, src, 'lora')
    keys = valid_keys(stage, ft)
    for k in d:
        if k not in keys: raise _unknown_key(k, stage, ft, src)
    for k in ('model_name_or_path', 'dataset', *STAGE_KEYS.get(stage, ())):
        if d.get(k) in (None, ''): raise ConfigError(f"{src}: missing required key {k!r}")
    cls = stage_config_class(stage)
    try: cfg = cls.from_dict({k: v for k, v in d.items() if k in _names(cls)})
    except ConfigError as e: raise ConfigError(f"{src}: {e}") from None
    n, resume = d.get('max_samples'), d.get('resume', False)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{src}: max_samples must be a positive integer, got {n!r}")
    if not isinstance(resume, bool):
        raise ConfigError(f"{src}: resume must be true or false, got {resume!r}")
    return {'stage': stage, 'finetuning_type': ft, 'model': str(d['model_name_or_path']),
            'dataset': str(d['dataset']), 'split': str(d.get('dataset_split', 'train')),
            'max_samples': n, 'resume': resume, 'reward_model': d.get('reward_model'),
            'config': cfg, 'lora': None if ft == 'full' else _lora_config(d, stage, src),
            'raw': d, 'source': src}

def parse_overrides(items: list[str]) -> dict:
    "`['learning_rate=1e-4', 'max_steps=5']` -> a mapping, each value read as YAML."
    out = {}
    for it in items:
        k, eq, v = it.partition('=')
        if not eq or not k.strip():
            raise ConfigError(f"override {it!r} is not key=value (e.g. max_steps=10)")
        out[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return out

def _qa_chats(world) -> list[dict]:
    return [{'messages': [{'role': 'user', 'content': r['question']},
                          {'role': 'assistant', 'content': r['answer_sentence']}],
             'name': r['name'], 'attribute': r['attribute']} for r in world.qa_rows(world.known)]

def _lab_rows(kind: str, world) -> list[dict]:
    from fttk.world import preference_pairs, preference_rows
    from fttk.ppo import ppo_prompts
    return {'corpus': lambda: [{'text': t} for t in world.corpus()],
            'instructions': world.instruction_rows, 'qa': lambda: _qa_chats(world),
            'preferences': lambda: preference_pairs(preference_rows(world)),
            'prompts': lambda: ppo_prompts(world, world.known)}[kind]()

# the lab data set each stage reads
LAB_DATASETS = {'corpus': 'pt', 'instructions': 'sft', 'qa': 'sft', 'preferences': 'rm, dpo',
                'prompts': 'ppo'}

def lab_dataset(spec: str, world_size: str | None = None) -> list[dict]:
    ("The rows of 'lab:NAME' or 'lab:NAME@SIZE' (NAME in `LAB_DATASETS`), from the world of "
     "`SIZE`, else of `world_size` (the model's).")
    from fttk.world import lab_world
    kind, _, size = spec[4:].partition('@')
    if kind not in LAB_DATASETS:
        raise ValueError(f"unknown lab data set {spec!r}; choose one of "
                         f"{', '.join('lab:' + k for k in LAB_DATASETS)}")
    size = size or world_size
    if size not in ('test', 'default'):
        raise ValueError(f"data set {spec!r}: which world? the model is not a lab model, so "
                         f"name the size: lab:{kind}@test or lab:{kind}@default")
    return _lab_rows(kind, lab_world(size))

def load_rows(spec: str, split: str = 'train', world_size: str | None = None,
              max_samples: int | None = None) -> list[dict]:
    ("Rows of a data set: 'lab:NAME[@SIZE]', a .jsonl/.json file, or a hub name "
     "(`datasets.load_dataset(spec, split=split)`); the first `max_samples`.")
    if spec.startswith('lab:'): rows = lab_dataset(spec, world_size)
    elif spec.endswith('.jsonl'): rows = read_jsonl(spec)
    elif spec.endswith('.json') or Path(spec).exists():
        p = Path(spec)
        if not p.is_file(): raise FileNotFoundError(f"no data file at {spec}")
        rows = json.loads(p.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{spec} must hold a JSON list of rows, got {type(rows).__name__}")
    else:
        import datasets
        rows = list(datasets.load_dataset(spec, split=split))
    return rows[:max_samples] if max_samples else rows

# the fields each stage reads from a row (fttk's trainers check the rest, naming the row)
STAGE_FIELDS = {'pt': ('text',), 'sft': ('messages',), 'rm': ('chosen', 'rejected'),
                'dpo': ('chosen', 'rejected'), 'ppo': ('prompt',)}

def _as_chat(r: dict) -> dict:
    "A prompt/completion or Alpaca (instruction/input/output) row as a chat; others unchanged."
    if 'messages' in r: return r
    if isinstance(r.get('prompt'), str) and isinstance(r.get('completion'), str):
        u, a = r['prompt'], r['completion']
    elif 'instruction' in r and 'output' in r:
        u, a = '\n\n'.join(x for x in (r['instruction'], r.get('input')) if x), r['output']
    else: return r
    return {'messages': [{'role': 'user', 'content': u}, {'role': 'assistant', 'content': a}]}

def stage_rows(rows: list[dict], stage: str, name: str = 'dataset') -> list[dict]:
    ("Rows in the form `stage`'s trainer takes (pt: text as one assistant turn); an error names "
     "the fields that are missing and the lab data set that fits.")
    if not rows: raise ValueError(f"{name} has no rows")
    if stage == 'sft': rows = [_as_chat(r) if isinstance(r, dict) else r for r in rows]
    need, first = STAGE_FIELDS[stage], rows[0]
    if not isinstance(first, dict) or any(k not in first for k in need):
        got = sorted(first) if isinstance(first, dict) else type(first).__name__
        fit = ', '.join(f'lab:{k}' for k, s in LAB_DATASETS.items() if stage in s)
        raise ValueError(f"{name}: stage {stage} needs rows with {', '.join(map(repr, need))}; "
                         f"row 0 has {got} (a lab data set for {stage}: {fit})")
    if stage == 'pt':
        return [{'messages': [{'role': 'assistant', 'content': r.get('text')}]} for r in rows]
    return rows

# pt: each text is one 'assistant' turn between BOS and EOS: every token after BOS is a target
PT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% generation %}{{ m['content'] }}"
               "{{ eos_token }}{% endgeneration %}{% endfor %}")

def pt_tokenizer(tokenizer):
    "A copy of `tokenizer` that formats a pt row as plain text: next-token loss on all of it."
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = PT_TEMPLATE
    return tok

def resolve_spec(spec: str) -> str:
    ("A model spec as runs record it: 'lab:SIZE' and hub names as given, an existing folder as its "
     "absolute path (relative paths are relative to the current directory, as in LLaMA-Factory).")
    p = Path(spec).expanduser()
    return spec if lab_size(spec) or not p.exists() else str(p.resolve())

def start_model(spec: str, stage: str):
    ("`(model, tokenizer, meta)` a stage starts from: an earlier run merged (its LoRA adapter "
     "folded into its base), a model folder, a lab size or a hub name; rm gets a scalar head.")
    model, tok, meta = load_run(spec, merge=True)
    head_seed, seq = None, meta['model_class'] == 'sequence_classification'
    if seq and stage != 'rm':
        raise ValueError(f"model_name_or_path {spec} is a reward model (sequence "
                         f"classification); stage {stage} needs a causal LM")
    if stage == 'rm' and not seq:
        from fttk.reward import reward_model
        head_seed = 0
        model, tok = reward_model(model, tok, seed=head_seed)
    if tok.pad_token is None: tok.pad_token = tok.eos_token
    return model, tok, {'world': meta.get('world'), 'head_seed': head_seed}

def prepare_model(model, tok, spec: dict):
    "The model to train: all weights trainable (full), or frozen with LoRA/QLoRA adapters."
    ft, cfg = spec['finetuning_type'], spec['config']
    if ft == 'full':
        model.requires_grad_(True)
        return model, tok
    from fttk.accel import load_model, resolve_backend
    src = model
    # Unsloth loads by name: a lab size or a folder, not an earlier run (merged in memory)
    if resolve_backend(cfg.backend) == 'unsloth' and spec['stage'] in ('pt', 'sft') \
            and not (Path(spec['model'])/'final').is_dir():
        src = lab_size(spec['model']) or spec['model']
    return load_model(src, backend=cfg.backend, finetuning_type=ft,
                      lora_config=spec['lora'], tokenizer=tok)

def final_meta(model, spec: dict, start: dict) -> dict:
    "What `final/fttk_run.json` records: enough for `load_run` to rebuild the model."
    quant = getattr(model, 'fttk_quant_config', None)
    if quant is None and hasattr(model, 'get_base_model'):           # peft wraps the base
        quant = getattr(model.get_base_model(), 'fttk_quant_config', None)
    from fttk import __version__
    return {'stage': spec['stage'], 'finetuning_type': spec['finetuning_type'],
            'base_model_name_or_path': resolve_spec(spec['model']),
            'model_class': 'sequence_classification' if spec['stage'] == 'rm' else 'causal_lm',
            'world': start['world'], 'head_seed': start['head_seed'],
            'backend': getattr(model, 'fttk_backend', None),
            'quant_config': quant.to_dict() if quant is not None else None,
            'train_config': 'train.yaml', 'fttk_version': __version__}

def _reward(spec: dict):
    "PPO's reward model and its tokenizer, from `reward_model:` (an rm run, or a model folder)."
    rm, rtok, meta = load_run(resolve_spec(str(spec['reward_model'])))
    if meta['model_class'] != 'sequence_classification':
        raise ValueError(f"reward_model {spec['reward_model']} is not a reward model (a causal "
                         "LM); give the output_dir of a `stage: rm` run")
    return rm.requires_grad_(False), rtok

def run_stage(model, tok, rows, spec: dict, world, progress: bool) -> dict:
    "Call the stage's trainer (pt is SFT's loop on plain text); returns its result."
    from fttk.sft import sft_train
    cfg, resume, lora = spec['config'], spec['resume'], spec['finetuning_type'] != 'full'
    kw = dict(resume=resume, progress=progress)
    if spec['stage'] in ('pt', 'sft'):
        return sft_train(model, pt_tokenizer(tok) if spec['stage'] == 'pt' else tok, rows, cfg,
                         **kw)
    if spec['stage'] == 'rm':
        from fttk.reward import reward_train
        return reward_train(model, tok, rows, cfg, **kw)
    # the reference is the start model: the adapters switched off, or a frozen copy
    ref = None if lora else copy.deepcopy(model).eval().requires_grad_(False)
    if spec['stage'] == 'dpo':
        from fttk.dpo import dpo_train
        return dpo_train(model, tok, rows, cfg, ref_model=ref, **kw)
    from fttk.ppo import ppo_train, gold_grader
    rm, rtok = _reward(spec)
    gold = gold_grader(world) if world is not None and 'attribute' in rows[0] else None
    return ppo_train(model, ref, rm, tok, rows, cfg, reward_tokenizer=rtok, gold=gold, **kw)

def plot_loss(metrics: list[dict], path, title: str = ''):
    "The loss (PPO: the reward model's score) per step, saved as a PNG at `path`."
    import matplotlib; import matplotlib.pyplot as plt
    key = next((k for k in ('loss', 'score') if any(k in r for r in metrics)), None)
    fig, ax = plt.subplots(figsize=(5, 3))
    if key: ax.plot([r['step'] for r in metrics if key in r], [r[key] for r in metrics if key in r])
    ax.set(xlabel='step', ylabel=key or 'loss', title=title); fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90); plt.close(fig)
    return Path(path)

def train(config, progress: bool | None = None) -> dict:
    ("Run one `fttk train` config (a YAML path or a mapping): `{'run': output folder, 'model', "
     "'tokenizer', 'result': the trainer's, 'meta'}`.")
    spec = parse_train_config(config)
    cfg = spec['config']
    out = Path(cfg.output_dir)
    model, tok, start = start_model(spec['model'], spec['stage'])
    rows = stage_rows(load_rows(spec['dataset'], spec['split'], start['world'],
                                spec['max_samples']), spec['stage'], spec['dataset'])
    model, tok = prepare_model(model, tok, spec)
    print(f"fttk train: stage {spec['stage']} ({spec['finetuning_type']}) of {spec['model']} "
          f"on {spec['dataset']} ({len(rows)} rows) -> {out}")
    if progress is None: progress = 'ipykernel' not in sys.modules    # notebooks: one line
    world = None
    if start['world'] and spec['dataset'].startswith('lab:'):
        from fttk.world import lab_world
        world = lab_world(spec['dataset'].partition('@')[2] or start['world'])
    t0 = time.time()
    res = run_stage(model, tok, rows, spec, world, progress)
    meta = final_meta(model, spec, start)
    atomic_write_text(out/'train.yaml', yaml.safe_dump(spec['raw'], sort_keys=False))
    log = RunFolder.open(out).read_metrics()
    plot_loss(log, out/'plots'/'loss.png', f"{spec['stage']} ({spec['finetuning_type']})")
    save_final(model, tok, out/'final', meta)
    last = log[-1] if log else {}
    said = ', '.join(f"{k} {last[k]:.4g}" for k in ('loss', 'score') if k in last)
    print(f"fttk train: {res['steps']} steps in {time.time() - t0:.0f} s"
          f"{', ' + said if said else ''}; model in {out/'final'}")
    return {'run': out, 'model': model, 'tokenizer': tok, 'result': res, 'meta': meta}

def run_train(config) -> Path:
    "`fttk train CONFIG.yaml` as a function: train, save `output_dir/final/`, return output_dir."
    return train(config)['run']
