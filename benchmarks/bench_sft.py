"""SFT with LoRA: fttk's loop + fused LoRA fast path vs TRL's SFTTrainer + peft. Same model, data, order, steps, adapters.

Each side runs in its own subprocess (so peak RSS is its own); the parent prints, in one run:
tokens/s and peak RSS as ratios (fttk / TRL), the per-step losses of both (they must agree), and MFU:
achieved FLOP/s (6 N per token, N = all parameters) over this machine's measured fp32 and bf16 matmul peak
on the same number of threads. Both sides train in fp32 (SFTConfig.bf16=False). Every note after the
table is printed only when this run's numbers support it, and the run names the precision this machine
measurably does best (the rule of fttk.core.best_precision: bf16 only if >= BF16_SPEEDUP x fp32).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_sft.py            # default lab model
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_sft.py --size test
"""
from __future__ import annotations
import argparse, json, math, os, resource, subprocess, sys, tempfile, time, warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sides import bench_args, rss_mb, run_sides   # noqa: E402

STEPS = {'test': 8, 'default': 30}



def _canonical(name: str) -> str:
    return name.replace('base_model.model.', '', 1).replace('.default', '')


def _init_adapters(model, seed: int = 1):
    "Give both sides the same adapter weights: A random (seeded per layer, by canonical name), B small random (a real update)."
    g = torch.Generator().manual_seed(seed)
    params = sorted(((n, p) for n, p in model.named_parameters() if 'lora_' in n), key=lambda t: _canonical(t[0]))
    with torch.no_grad():
        for n, p in params:
            p.copy_(torch.randn(p.shape, generator=g) * (1 / math.sqrt(p.shape[1]) if 'lora_A' in n else 1e-3))
    return len(params)


def side(kind: str, size: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    warnings.simplefilter('ignore')
    from fttk.world import base_model, lab_world
    from fttk.lora import LoRAConfig, inject_lora, peft_lora_config
    from fttk.sft import SFTConfig, sft_train, trl_train, prepare_sft_data
    model, tok = base_model(size, progress=False)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    rows = [r for r in lab_world(size).instruction_rows() if r['task'] == 'qa']
    lcfg = LoRAConfig(target_modules='all-linear', r=16, lora_alpha=32)
    out = tempfile.mkdtemp()
    cfg = SFTConfig(output_dir=out, learning_rate=2e-3, max_steps=steps, per_device_train_batch_size=16, warmup_ratio=0.1,
                    max_length=192, seed=0, shuffle=False, use_fast_lora=(kind == 'fttk'))
    examples, _ = prepare_sft_data(rows, tok, cfg.max_length)
    n_tok = sum(len(e['input_ids']) for e in examples[:steps * cfg.per_device_train_batch_size])
    rss0 = rss_mb()
    if kind == 'fttk':
        inject_lora(model, lcfg); _init_adapters(model)
        res = sft_train(model, tok, rows, cfg, progress=False)
        seconds, losses = res['seconds'], [r['loss'] for r in res['log']]
    else:
        from peft import get_peft_model
        model = get_peft_model(model, peft_lora_config(lcfg)); _init_adapters(model)
        res = trl_train(model, tok, rows, cfg)
        seconds = next(r['train_runtime'] for r in res['trainer'].state.log_history if 'train_runtime' in r)
        losses = [r['loss'] for r in res['log']]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {'kind': kind, 'seconds': seconds, 'tokens': n_tok, 'tokens_per_s': n_tok / seconds, 'losses': losses,
            'peak_rss_mb': peak, 'rss_before_train_mb': rss0, 'n_params': n_params, 'threads': torch.get_num_threads()}


def matmul_peak(dtype, threads: int, n: int = 1024, reps: int = 10) -> float:
    "Best-of-`reps` n x n matmul throughput in FLOP/s on `threads` threads (fttk.core.matmul_gflops)."
    from fttk.core import matmul_gflops
    torch.set_num_threads(threads)
    return matmul_gflops(dtype, n=n, repeats=reps) * 1e9


def precision_notes(fp32: float, bf16: float, cached: str) -> list[str]:
    "What this run's peaks (FLOP/s) say about precision: each line only when the numbers support it."
    from fttk.core import BF16_SPEEDUP
    r = bf16 / fp32
    best = 'bf16' if r >= BF16_SPEEDUP else 'fp32'
    notes = [f"Best precision measured in this run: {best} (bf16 {bf16/1e9:.1f} vs fp32 {fp32/1e9:.1f} GFLOP/s, "
             f"{r:.2f}x; bf16 counts only at >= {BF16_SPEEDUP}x). fttk.core.best_precision(): {cached}."]
    if cached != best:
        notes.append(f"Note: best_precision() ({cached}, measured once and cached for this machine) disagrees with "
                     f"this run's {best}; a shared or throttled machine moves these peaks between runs.")
    if r >= BF16_SPEEDUP:
        notes.append(f"Note: bf16 matmul is {r:.1f}x fp32 here (native bf16: AVX512-BF16/AMX or a GPU). Both sides of "
                     "this benchmark train in fp32, so their MFU against the bf16 peak is what SFTConfig(bf16=True) "
                     "could still gain in the matmuls.")
    elif r < 1:
        notes.append(f"Note: bf16 matmul is slower than fp32 here ({bf16/1e9:.1f} vs {fp32/1e9:.1f} GFLOP/s): "
                     "no fast native bf16, so no MFU against the bf16 peak is shown; train in fp32.")
    else:
        notes.append(f"Note: bf16 matmul is only {r:.2f}x fp32 here (under {BF16_SPEEDUP}x): not worth bf16's "
                     "rounding, so fp32 stays the choice.")
    return notes


def main():
    a, steps, env = bench_args(STEPS, side)
    res, speeds = run_sides(__file__, ('fttk', 'trl'), ['--size', a.size, '--steps', str(steps), '--threads', str(a.threads)], a.repeats, env, 'tokens_per_s')
    f, t = res['fttk'], res['trl']
    dl = max(abs(x - y) for x, y in zip(f['losses'], t['losses']))
    print(f"SFT LoRA r=16 all-linear, lab model '{a.size}' ({f['n_params']/1e6:.2f}M params), {steps} steps x 16 chats, "
          f"{f['tokens']} tokens, {a.threads} thread(s)")
    print(f"{'':22}{'fttk loop + fast LoRA':>24}{'TRL SFTTrainer + peft':>24}{'ratio':>8}")
    print('tokens/s per run: ' + '; '.join(f"{k} " + ', '.join(f'{v:.0f}' for v in vs) for k, vs in speeds.items()))
    print(f"{'tokens/s':22}{f['tokens_per_s']:24.0f}{t['tokens_per_s']:24.0f}{f['tokens_per_s']/t['tokens_per_s']:8.2f}x")
    print(f"{'peak RSS (MB)':22}{f['peak_rss_mb']:24.0f}{t['peak_rss_mb']:24.0f}{f['peak_rss_mb']/t['peak_rss_mb']:8.2f}x")
    df, dt = f['peak_rss_mb'] - f['rss_before_train_mb'], t['peak_rss_mb'] - t['rss_before_train_mb']
    print(f"{'RSS growth in train':22}{df:24.0f}{dt:24.0f}{df/max(dt, 1e-9):8.2f}x")
    print(f"{'final loss':22}{f['losses'][-1]:24.5f}{t['losses'][-1]:24.5f}")
    print(f"max |loss difference| over {len(f['losses'])} steps: {dl:.2e}")
    fp32, bf16 = matmul_peak(torch.float32, a.threads), matmul_peak(torch.bfloat16, a.threads)
    from fttk.core import best_precision
    cached = best_precision()               # same thread count as the peaks above (its cache key includes it)
    for name, r in (('fttk', f), ('TRL', t)):
        achieved = 6 * r['n_params'] * r['tokens_per_s']
        # against the bf16 peak only where bf16 is at least as fast: a slow emulated peak gives MFU > 100%
        vs_bf16 = f", {achieved/bf16:6.1%} of bf16 peak ({bf16/1e9:.1f} GFLOP/s)" if bf16 >= fp32 else ''
        print(f"MFU {name:5}: {achieved/1e9:6.2f} GFLOP/s (6N/token) = {achieved/fp32:6.1%} of fp32 matmul peak "
              f"({fp32/1e9:.1f} GFLOP/s, the precision trained in){vs_bf16}")
    # a property of the 6N count, whatever the machine: LoRA computes no weight gradients for the frozen base
    print("Note: 6N/token counts weight gradients of the frozen base too; LoRA skips them (about 4N/token of real "
          "work, so multiply the MFU by ~0.67). Attention score FLOPs are not counted.")
    for line in precision_notes(fp32, bf16, cached): print(line)

if __name__ == '__main__':
    main()
