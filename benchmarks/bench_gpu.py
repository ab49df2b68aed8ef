#!/usr/bin/env python3
"""LoRA training throughput on one GPU: transformers + peft, fttk (`fttk.accel.load_model`) and Unsloth.

Every case trains the same thing: a Llama-3.2-1B-shaped model with random weights (bf16), one fixed
random batch (4 x 2048 tokens, labels = input ids), LoRA r=16, alpha=16, dropout 0 on
q,k,v,o,gate,up,down (float32 adapters, peft's default, unless the case says bf16),
torch.optim.AdamW(lr=1e-4) over the trainable parameters; 3 warm-up steps, then 10 timed steps with a
CUDA synchronize around each. Each case runs in its own process (Unsloth patches transformers globally
at import) and appends one JSON line to the results file, failure included. `summary` prints tokens/s
and peak memory as ratios to hf_peft from the same results file, and how far each loss curve is from
hf_peft's.

Cases: hf_peft, hf_peft_gc (transformers' checkpointing), hf_qlora_gc (bitsandbytes NF4);
fttk (kernels + fused loss, no checkpointing), fttk_gc, fttk_offload (offloaded checkpointing),
fttk_bf16 (bf16 adapters: the fused LoRA functions), fttk_qlora (fttk NF4 + offload);
unsloth (its offloaded checkpointing), unsloth_nogc, unsloth_qlora.

    python3 benchmarks/bench_gpu.py env
    python3 benchmarks/bench_gpu.py make-model /tmp/llama1b
    python3 benchmarks/bench_gpu.py case fttk --model /tmp/llama1b --out results.jsonl
    python3 benchmarks/bench_gpu.py summary results.jsonl
    python3 benchmarks/bench_gpu.py all --tiny --device cpu          # CPU smoke test (seconds)

benchmarks/run_gpu.sh drives the whole GPU run with the ../shared/gpu package bundle.
"""
from __future__ import annotations
import argparse, json, math, os, signal, statistics, subprocess, sys, time, traceback

TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
R, ALPHA, LR = 16, 16, 1e-4

# Llama-3.2-1B's shape (no llama3 rope scaling: plain rope, theta 500000).
FULL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=8192, vocab_size=128256, head_dim=64, max_position_embeddings=4096,
            batch=4, seq=2048)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=172, vocab_size=1024, head_dim=16, max_position_embeddings=256,
            batch=2, seq=64)

CASES = ['hf_peft', 'hf_peft_gc', 'hf_qlora_gc', 'fttk', 'fttk_gc', 'fttk_offload', 'fttk_bf16', 'fttk_qlora',
         'unsloth', 'unsloth_nogc', 'unsloth_qlora']
SMOKE = ['hf_peft', 'hf_peft_gc', 'fttk', 'fttk_offload', 'fttk_bf16']     # `all` default: no bnb, no Unsloth

# Packages whose version goes into every result line (only those already imported by the case).
VERSIONED = ['torch', 'transformers', 'peft', 'accelerate', 'triton', 'bitsandbytes', 'unsloth', 'unsloth_zoo',
             'trl', 'datasets', 'torchao', 'tokenizers', 'safetensors', 'huggingface_hub', 'numpy', 'xformers']


def shape(tiny: bool) -> dict:
    return TINY if tiny else FULL


def special_ids(vocab: int) -> dict:
    "Llama 3's special-token ids relative to the vocab end: bos 128000, eos 128001, pad 128004 for 128256."
    return {'bos': vocab - 256, 'eos': vocab - 255, 'pad': vocab - 252}


# ---------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------
def dist_version(name: str) -> str | None:
    from importlib.metadata import version, PackageNotFoundError
    try: return version(name)
    except PackageNotFoundError: return None


def module_origin(name: str) -> str | None:
    import importlib.util
    try: spec = importlib.util.find_spec(name)
    except (ImportError, ValueError): return None
    return None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))


def cmd_env(_args):
    "Print what this Python sees: versions, where each package comes from, the GPU."
    info = {'python': sys.version.split()[0], 'executable': sys.executable,
            'PYTHONPATH': os.environ.get('PYTHONPATH', '')}
    for name in VERSIONED + ['fttk', 'cut_cross_entropy', 'dill', 'multiprocess', 'fsspec', 'pydantic', 'diffusers',
                             'certifi', 'tyro', 'msgspec', 'hf_transfer', 'kernels', 'flash_attn']:
        origin = module_origin(name)
        info[name] = 'absent' if origin is None else f"{dist_version(name) or dist_version(name.replace('_', '-'))} @ {origin}"
    try:
        import torch
        info['torch_cuda'] = torch.version.cuda
        info['cuda_available'] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info['gpu'] = {'name': p.name, 'capability': list(torch.cuda.get_device_capability(0)),
                           'memory_gib': round(p.total_memory / 2**30, 1), 'count': torch.cuda.device_count()}
            info['bf16_supported'] = torch.cuda.is_bf16_supported()
    except Exception as e:
        info['torch_error'] = repr(e)
    print(json.dumps(info, indent=1))


def cmd_pythonpath(args):
    """Print the PYTHONPATH for the cases: the always-needed site dir, then each optional dir under `opt`
    (one package each, named after its import name) only where this Python lacks that package or has
    it older than the minimum in MIN_OPT. Run it with PYTHONPATH unset, so it sees the machine's own packages."""
    MIN_OPT = {'peft': '0.18.0'}      # unsloth_zoo needs peft>=0.18 (!=0.11.0)
    from importlib.metadata import version, PackageNotFoundError
    parts = [args.site]
    if args.opt and os.path.isdir(args.opt):
        for name in sorted(os.listdir(args.opt)):
            have = module_origin(name)
            try: v = version(name)
            except PackageNotFoundError: v = None
            need = have is None or v is None
            if not need and name in MIN_OPT:
                from packaging.version import Version
                need = Version(v) < Version(MIN_OPT[name])
            print(f"[pythonpath] {name}: machine has {v or 'nothing'}{' -> using the bundled copy' if need else ''}",
                  file=sys.stderr)
            if need: parts.append(os.path.join(args.opt, name))
    print(':'.join(parts + ([args.extra] if args.extra else [])))


# ---------------------------------------------------------------------------------------------------
# the model: random init, saved once with a tokenizer that AutoTokenizer (and Unsloth) can load
# ---------------------------------------------------------------------------------------------------
def build_tokenizer(vocab: int, max_len: int):
    "A word-level tokenizer with exactly `vocab` tokens and Llama 3's special-token ids; training ids are random anyway."
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    sp = special_ids(vocab)
    names = {0: '<unk>', sp['bos']: '<|begin_of_text|>', sp['eos']: '<|end_of_text|>', sp['pad']: '<|finetune_right_pad_id|>'}
    tok = Tokenizer(models.WordLevel(vocab={names.get(i, f't{i}'): i for i in range(vocab)}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names[sp['bos']], eos_token=names[sp['eos']],
                                   pad_token=names[sp['pad']], unk_token='<unk>', model_max_length=max_len,
                                   padding_side='right')


def cmd_make_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    s = shape(args.tiny)
    sp = special_ids(s['vocab_size'])
    cfg = LlamaConfig(**{k: v for k, v in s.items() if k not in ('batch', 'seq')}, tie_word_embeddings=True,
                      rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act='silu', attention_bias=False, mlp_bias=False,
                      bos_token_id=sp['bos'], eos_token_id=sp['eos'], pad_token_id=sp['pad'], dtype='bfloat16')
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    t0 = time.time()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(old)
    model.save_pretrained(args.out)
    build_tokenizer(s['vocab_size'], s['max_position_embeddings']).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({'made_model': args.out, 'params': n, 'dtype': str(next(model.parameters()).dtype),
                      'seconds': round(time.time() - t0, 1), 'files': sorted(os.listdir(args.out))}))


# ---------------------------------------------------------------------------------------------------
# the cases: each returns (model, extra-info dict)
# ---------------------------------------------------------------------------------------------------
def hf_load(path, device, dtype, **kw):
    import torch
    from transformers import AutoModelForCausalLM
    dm = {'': torch.device(device).index or 0} if str(device).startswith('cuda') else None
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation='sdpa', device_map=dm, **kw)


LORA = {'r': R, 'lora_alpha': ALPHA, 'lora_dropout': 0.0, 'target_modules': TARGETS}


def peft_wrap(model):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias='none', task_type='CAUSAL_LM')
    return get_peft_model(model, cfg)


def setup_hf_peft(a, gc=False):
    import torch
    model = hf_load(a.model, a.device, torch.bfloat16)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        model.enable_input_require_grads()
    model = peft_wrap(model)
    return model, {'gradient_checkpointing': gc}


def setup_fttk(a, gc=False, lora_dtype='float32', qlora=False):
    "fttk.accel.load_model on the same loaded model as the hf cases (Unsloth's cases load by name)."
    import torch
    from fttk.accel import load_model, patch_kernels
    model = hf_load(a.model, a.device, torch.bfloat16)
    model, _ = load_model(model, 'fttk', 'qlora' if qlora else 'lora', LORA, gradient_checkpointing=gc,
                          lora_dtype=getattr(torch, lora_dtype))
    extra = {'fttk_file': sys.modules['fttk.accel'].__file__, 'gradient_checkpointing': gc,
             'lora_dtype': lora_dtype, 'finetuning_type': 'qlora' if qlora else 'lora',
             'kernels': str(a.device).startswith('cuda'),
             'fast_lora_layers': sum(bool(getattr(m, 'fast', False)) for m in model.modules())}
    return model, extra


def setup_hf_qlora(a):
    import torch
    from transformers import BitsAndBytesConfig
    from peft import prepare_model_for_kbit_training
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = hf_load(a.model, a.device, torch.bfloat16, quantization_config=q)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={'use_reentrant': False})
    return peft_wrap(model), {'gradient_checkpointing': True, 'quant': 'bnb nf4 double-quant, compute bf16'}


def setup_unsloth(a, gc='unsloth', four_bit=False):
    import unsloth                                   # before transformers/peft/trl: it patches them
    from unsloth import FastLanguageModel
    import torch
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=a.model, max_seq_length=a.seq, dtype=torch.bfloat16,
                                                         load_in_4bit=four_bit)
    model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=ALPHA, lora_dropout=0, target_modules=TARGETS,
                                             bias='none', use_gradient_checkpointing=gc, random_state=3407,
                                             max_seq_length=a.seq)
    if hasattr(FastLanguageModel, 'for_training'): FastLanguageModel.for_training(model)
    return model, {'gradient_checkpointing': gc, 'load_in_4bit': four_bit, 'unsloth_file': unsloth.__file__}


SETUP = {
    'hf_peft': lambda a: setup_hf_peft(a, gc=False),
    'hf_peft_gc': lambda a: setup_hf_peft(a, gc=True),
    'fttk': lambda a: setup_fttk(a),
    'fttk_gc': lambda a: setup_fttk(a, gc=True),
    'fttk_offload': lambda a: setup_fttk(a, gc='offload'),
    'fttk_bf16': lambda a: setup_fttk(a, lora_dtype='bfloat16'),
    'fttk_qlora': lambda a: setup_fttk(a, gc='offload', qlora=True),
    'unsloth': lambda a: setup_unsloth(a, gc='unsloth'),
    'unsloth_nogc': lambda a: setup_unsloth(a, gc=False),
    'hf_qlora_gc': setup_hf_qlora,
    'unsloth_qlora': lambda a: setup_unsloth(a, gc='unsloth', four_bit=True),
}


# ---------------------------------------------------------------------------------------------------
# one case, measured
# ---------------------------------------------------------------------------------------------------
def versions() -> dict:
    "Versions of the packages this case imported, and where the bundled-or-not ones came from."
    out = {'python': sys.version.split()[0]}
    for n in VERSIONED:
        m = sys.modules.get(n)
        if m is not None: out[n] = getattr(m, '__version__', None) or dist_version(n)
    out['from'] = {n: os.path.dirname(sys.modules[n].__file__) for n in ('peft', 'unsloth', 'bitsandbytes', 'trl', 'fttk')
                   if getattr(sys.modules.get(n), '__file__', None)}
    return out


def describe(model) -> dict:
    """What actually got switched on, after setup (Unsloth changes some of it globally): gradient-checkpointing
    flags, attention implementation, float32 matmul precision, the CUDA allocator settings."""
    import torch
    info = {'module_gc_flags': sorted({repr(m.gradient_checkpointing) for m in model.modules()
                                       if hasattr(m, 'gradient_checkpointing') and not callable(m.gradient_checkpointing)})}
    cfg = getattr(model, 'config', None)
    info['attn_implementation'] = getattr(cfg, '_attn_implementation', None)
    v = getattr(model, '_unsloth_gradient_checkpointing', None)
    if v is not None: info['_unsloth_gradient_checkpointing'] = repr(v)
    info['float32_matmul_precision'] = torch.get_float32_matmul_precision()
    info['alloc_conf'] = {k: os.environ[k] for k in ('PYTORCH_ALLOC_CONF', 'PYTORCH_CUDA_ALLOC_CONF') if k in os.environ}
    return info


def gib(x: float) -> float:
    return round(x / 2**30, 3)


_LIVE = {}   # the running case's record, for the SIGTERM handler


def _on_sigterm(signum, frame):
    "run.sh's per-case timeout: write what we have (phase, losses so far, where it was) and leave at once."
    rec, (losses, times) = _LIVE['rec'], _LIVE['progress']
    rec.update(ok=False, error=f"killed by run.sh's case timeout (SIGTERM) in phase {rec.get('phase')!r}",
               traceback_tail=''.join(traceback.format_stack(frame)[-12:]), losses_so_far=list(losses),
               step_ms_so_far=[round(t * 1e3, 2) for t in times], case_s=round(time.time() - _LIVE['t_start'], 1),
               versions=versions())
    emit(rec, _LIVE['out'])
    os._exit(124)


def emit(rec: dict, out: str | None):
    line = json.dumps(rec)
    if out:
        with open(out, 'a') as f: f.write(line + '\n')
    print('RESULT ' + line, flush=True)


def run_case(a) -> dict:
    rec = {'case': a.case, 'ok': False, 'phase': 'setup', 'device_kind': a.device, 'tiny': a.tiny}
    losses, times = [], []
    t_start = time.time()
    _LIVE.update(rec=rec, progress=(losses, times), t_start=t_start, out=a.out)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if a.case.startswith('unsloth'):
            import unsloth  # noqa: F401  first of all, as Unsloth asks
        import torch
        cuda = str(a.device).startswith('cuda')
        if cuda:
            torch.cuda.init()
            rec['gpu'] = torch.cuda.get_device_name(0)
        s = shape(a.tiny)
        a.seq = s['seq']
        torch.manual_seed(0)
        model, extra = SETUP[a.case](a)
        rec.update(extra)
        model.train()
        cfg = getattr(model, 'config', None)
        if cfg is not None and hasattr(cfg, 'use_cache'): cfg.use_cache = False
        rec.update(describe(model))
        params = [p for p in model.parameters() if p.requires_grad]
        rec['trainable_params'] = sum(p.numel() for p in params)
        rec['total_params'] = sum(p.numel() for p in model.parameters())
        rec['trainable_dtypes'] = sorted({str(p.dtype).replace('torch.', '') for p in params})
        rec['param_device'] = str(params[0].device) if params else None
        opt = torch.optim.AdamW(params, lr=LR)
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, s['vocab_size'], (s['batch'], s['seq']), generator=g).to(a.device)
        rec.update(batch=s['batch'], seq=s['seq'], tokens_per_step=s['batch'] * s['seq'], warmup=a.warmup, steps=a.steps)
        rec['setup_s'] = round(time.time() - t_start, 1)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            sync()
            rec['mem_after_setup_gib'] = gib(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            return loss.detach().float().item()     # .item() synchronizes too

        rec['phase'] = 'warmup'
        t0 = time.time()
        for _ in range(a.warmup): losses.append(step())
        sync()
        rec['warmup_s'] = round(time.time() - t0, 2)
        rec['phase'] = 'timed'
        for _ in range(a.steps):
            sync(); t = time.perf_counter()
            losses.append(step())
            sync(); times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rec.update(ok=True, phase='done', step_ms_median=round(med * 1e3, 2), step_ms_min=round(min(times) * 1e3, 2),
                   step_ms=[round(t * 1e3, 2) for t in times],
                   tokens_per_s=round(rec['tokens_per_step'] / med, 1),
                   tokens_per_s_mean=round(rec['tokens_per_step'] * len(times) / sum(times), 1),
                   loss_first=losses[0], loss_last=losses[-1], losses=[round(l, 5) for l in losses])
        if cuda:
            rec['peak_mem_gib'] = gib(torch.cuda.max_memory_allocated())
            rec['peak_reserved_gib'] = gib(torch.cuda.max_memory_reserved())
        import resource
        rec['peak_rss_gib'] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if not all(math.isfinite(l) for l in losses): rec['warning'] = 'non-finite loss'
    except BaseException as e:   # also KeyboardInterrupt / SystemExit from inside libraries
        tb = traceback.format_exc()
        rec['error'] = f"{type(e).__name__}: {e}"[:4000]
        rec['traceback_tail'] = '\n'.join(tb.rstrip().splitlines()[-30:])
        rec['losses_so_far'], rec['step_ms_so_far'] = losses, [round(t * 1e3, 2) for t in times]
        print(tb, file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rec['case_s'] = round(time.time() - t_start, 1)
    rec['versions'] = versions()
    return rec


def cmd_case(a):
    a.device = a.device or 'cuda'
    rec = run_case(a)
    emit(rec, a.out)
    return 0 if rec['ok'] else 1


def cmd_fail_line(a):
    "The JSON line run.sh writes for a case whose process died or was killed before writing its own."
    tail = ''
    if a.log and os.path.exists(a.log):
        with open(a.log, errors='replace') as f: tail = '\n'.join(f.read().rstrip().splitlines()[-30:])
    print(json.dumps({'case': a.case, 'ok': False, 'phase': 'process', 'error': a.error, 'log_tail': tail}))


def ratios(rows: list[dict], base: str = 'hf_peft') -> dict:
    """Per successful case: tokens/s and peak memory over `base`'s from the same run, and the largest
    |loss_i - base loss_i| over the steps (same batch, same init: the curves should agree to bf16 noise)."""
    ref = next((r for r in rows if r.get('case') == base and r.get('ok')), None)
    out = {}
    for r in rows:
        if not (r.get('ok') and ref): continue
        mem = 'peak_mem_gib' if 'peak_mem_gib' in r and 'peak_mem_gib' in ref else 'peak_rss_gib'
        n = min(len(r['losses']), len(ref['losses']))
        out[r['case']] = {'speed': r['tokens_per_s'] / ref['tokens_per_s'], 'memory': r[mem] / ref[mem],
                          'mem_key': mem,
                          'loss_dev': max(abs(x - y) for x, y in zip(r['losses'][:n], ref['losses'][:n]))}
    return out


def cmd_summary(a):
    "A table of the results file: tokens/s, peak memory, and both as ratios to hf_peft of the same run."
    rows = []
    with open(a.results) as f:
        for line in f:
            try: rows.append(json.loads(line))
            except json.JSONDecodeError: pass
    rat = ratios(rows)
    hdr = (f"{'case':14} {'ok':3} {'tok/s':>9} {'x hf':>6} {'peak GiB':>8} {'x hf':>6} {'loss first -> last':>19} "
           f"{'|dloss|':>8}  notes")
    print(hdr); print('-' * len(hdr))
    for r in rows:
        if r.get('ok'):
            q = rat.get(r['case'], {})
            mem = r.get('peak_mem_gib', r.get('peak_rss_gib', float('nan')))
            note = ' '.join(f"{k}={r[k]}" for k in ('setup_s', 'warmup_s', 'trainable_dtypes', 'gradient_checkpointing',
                                                     'lora_dtype', 'kernels', 'warning') if r.get(k) not in (None, ''))
            if q.get('mem_key') == 'peak_rss_gib': note += ' (memory: peak RSS, no GPU)'
            print(f"{r['case']:14} {'yes':3} {r['tokens_per_s']:9.0f} {q.get('speed', float('nan')):6.2f} {mem:8.2f} "
                  f"{q.get('memory', float('nan')):6.2f} {r['loss_first']:8.4f} -> {r['loss_last']:8.4f} "
                  f"{q.get('loss_dev', float('nan')):8.4f}  {note}")
        else:
            err = (r.get('error') or '').strip().splitlines()
            print(f"{r['case']:14} {'NO':3} {'':9} {'':6} {'':8} {'':6} {'':19} {'':8}  [{r.get('phase')}] "
                  f"{err[-1][:300] if err else ''}")


def cmd_all(a):
    "Every case (or --cases) in its own process, as run.sh does on the GPU: the CPU smoke test."
    model = a.model or ('/tmp/llama_tiny' if a.tiny else '/tmp/llama1b')
    base = [sys.executable, os.path.abspath(__file__)]
    flags = (['--tiny'] if a.tiny else []) + (['--device', a.device] if a.device else [])
    if not os.path.exists(os.path.join(model, 'config.json')):
        subprocess.run(base + ['make-model', model] + flags, check=True)
    cases = a.cases.split(',') if a.cases else SMOKE
    for c in cases:
        cmd = base + ['case', c, '--model', model, '--warmup', str(a.warmup), '--steps', str(a.steps)] + flags
        if a.out: cmd += ['--out', a.out]
        subprocess.run(cmd, timeout=a.timeout)
    if a.out: cmd_summary(argparse.Namespace(results=a.out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    sub.add_parser('env')
    p = sub.add_parser('pythonpath'); p.add_argument('site'); p.add_argument('opt', nargs='?'); p.add_argument('--extra')
    p = sub.add_parser('fail-line'); p.add_argument('case'); p.add_argument('error'); p.add_argument('--log')
    p = sub.add_parser('summary'); p.add_argument('results')
    p = sub.add_parser('make-model'); p.add_argument('out'); p.add_argument('--tiny', action='store_true')
    p.add_argument('--device')
    for name in ('case', 'all'):
        p = sub.add_parser(name)
        if name == 'case': p.add_argument('case', choices=CASES)
        else:
            p.add_argument('--cases', help='comma-separated; default: ' + ','.join(SMOKE))
            p.add_argument('--timeout', type=float, default=600)
        p.add_argument('--model')
        p.add_argument('--out', help='append the JSON line here')
        p.add_argument('--tiny', action='store_true', help='a tiny Llama and batch, for a CPU smoke test')
        p.add_argument('--device', help='cuda (default) or cpu')
        p.add_argument('--warmup', type=int, default=3)
        p.add_argument('--steps', type=int, default=10)
    a = ap.parse_args(argv)
    if a.cmd == 'case' and not a.model: a.model = '/tmp/llama_tiny' if a.tiny else '/tmp/llama1b'
    return {'env': cmd_env, 'pythonpath': cmd_pythonpath, 'make-model': cmd_make_model, 'case': cmd_case,
            'all': cmd_all, 'fail-line': cmd_fail_line, 'summary': cmd_summary}[a.cmd](a)


if __name__ == '__main__':
    sys.exit(main() or 0)
