"""DPO: fttk's loop vs TRL's DPOTrainer, full fine-tuning with a reference model and with LoRA; and fttk's loop
with the reference log-probs precomputed (TRL's precompute_ref_log_probs) against the reference model in memory.

Same SFT lab model (fttk.sft.sft_model), the same lab preference pairs in the same order, the same config,
the same steps. Full fine-tuning: a second copy of the SFT model is the frozen reference. LoRA: r=16 on every
linear, the same adapter weights on both sides (B = 0), the reference is the base with the adapters off (TRL,
given a wrapped model: a frozen copy of the starting adapters, the same function while B = 0). Precomputed:
no reference model at all; one no-grad pass over the pairs before training, as TRL does. Each side runs in its
own subprocess (so its peak RSS is its own), best of --repeats; the parent prints, in one run, pairs/s and
peak RSS as ratios against TRL, and the largest per-step loss difference against TRL (they must agree).
pairs/s counts training as TRL's train_runtime does: the reference pass (precomputed sides) included, the
tokenization before it not; the whole call (tokenization and trainer set-up too) is a second row (from the first run).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_dpo.py            # default lab model
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_dpo.py --size test
"""
from __future__ import annotations
import os, resource, sys, tempfile, time, warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sides import bench_args, rss_mb, run_sides   # noqa: E402

STEPS = {'test': 8, 'default': 30}
BATCH_PAIRS = 8
KINDS = ('fttk-full', 'trl-full', 'fttk-lora', 'trl-lora', 'fttk-full-pre')
LABELS = {'fttk-full': 'fttk full+ref', 'trl-full': 'TRL full+ref', 'fttk-lora': 'fttk LoRA',
          'trl-lora': 'TRL LoRA', 'fttk-full-pre': 'fttk full, precomp.'}


def _init_adapters(model):
    "The same adapters on both LoRA sides: A as in bench_sft (seeded by canonical name), B = 0 (the usual start)."
    from bench_sft import _init_adapters as seeded
    seeded(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.zero_()


def side(kind: str, size: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    warnings.simplefilter('ignore')
    import logging; logging.getLogger('transformers').setLevel(logging.ERROR)
    from fttk.dpo import DPOConfig, dpo_train, trl_dpo_train
    from fttk.lora import LoRAConfig, inject_lora, peft_lora_config
    from fttk.sft import sft_model
    from fttk.world import lab_world, preference_pairs, preference_rows
    model, tok = sft_model(size)
    ref = sft_model(size)[0] if kind in ('fttk-full', 'trl-full') else None
    pairs = preference_pairs(preference_rows(lab_world(size)))[:steps * BATCH_PAIRS]
    lora = kind.endswith('lora')
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), learning_rate=5e-3 if lora else 1e-5, max_steps=steps,
                    per_device_train_batch_size=BATCH_PAIRS, max_length=256, seed=0, shuffle=False,
                    beta=0.1, precompute_ref_log_probs=(kind == 'fttk-full-pre'))
    n_params = sum(p.numel() for p in model.parameters())
    lcfg = LoRAConfig(target_modules='all-linear', r=16, lora_alpha=32)
    if kind == 'fttk-lora': inject_lora(model, lcfg); _init_adapters(model)
    if kind == 'trl-lora':       # a wrapped model: TRL's reference is a frozen copy of these adapters,
        from peft import get_peft_model       # the base itself while B = 0 (fttk: adapters off)
        model = get_peft_model(model, peft_lora_config(lcfg)); _init_adapters(model)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    if kind.startswith('trl'):
        res = trl_dpo_train(model, tok, pairs, cfg, ref_model=ref)
        seconds = time.perf_counter() - t0
        train_s = next(r['train_runtime'] for r in res['trainer'].state.log_history if 'train_runtime' in r)
    else:
        import fttk.dpo as D
        ref_s, cached_ref = [0.0], D._cached_ref       # dpo_train's clock starts after the reference pass
        def timed(*args, **kw):
            t = time.perf_counter()
            try: return cached_ref(*args, **kw)
            finally: ref_s[0] += time.perf_counter() - t
        D._cached_ref = timed
        res = dpo_train(model, tok, pairs, cfg, ref_model=ref, progress=False)
        seconds, train_s = time.perf_counter() - t0, res['seconds'] + ref_s[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {'kind': kind, 'seconds': seconds, 'train_seconds': train_s, 'pairs': len(pairs),
            'pairs_per_s': len(pairs) / train_s, 'call_pairs_per_s': len(pairs) / seconds,
            'losses': [r['loss'] for r in res['log']],
            'peak_rss_mb': peak, 'rss_before_train_mb': rss0, 'n_params': n_params,
            'n_trainable': sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main():
    a, steps, env = bench_args(STEPS, side)
    res, speeds = run_sides(__file__, KINDS, ['--size', a.size, '--steps', str(steps), '--threads', str(a.threads)],
                            a.repeats, env, 'pairs_per_s')
    f = res['fttk-full']
    print(f"DPO (sigmoid, beta 0.1), lab SFT model '{a.size}' ({f['n_params']/1e6:.2f}M params; LoRA r=16 all-linear: "
          f"{res['fttk-lora']['n_trainable']/1e6:.3f}M trainable), {steps} steps x {BATCH_PAIRS} pairs, "
          f"{a.threads} thread(s), best of {a.repeats}")
    print('pairs/s per run: ' + '; '.join(f"{k} " + ', '.join(f'{v:.1f}' for v in vs) for k, vs in speeds.items()))
    w = 21
    trl_of = lambda k: res['trl-lora'] if k.endswith('lora') else res['trl-full']
    print(f"{'':26}" + ''.join(f"{LABELS[k]:>{w}}" for k in KINDS))
    rows = [('pairs/s (training)', lambda k: f"{res[k]['pairs_per_s']:.1f}"),
            ('pairs/s vs TRL', lambda k: f"{res[k]['pairs_per_s'] / trl_of(k)['pairs_per_s']:.2f}x"),
            ('pairs/s, whole call (1st)', lambda k: f"{res[k]['call_pairs_per_s']:.1f}"),
            ('whole call vs TRL', lambda k: f"{res[k]['call_pairs_per_s'] / trl_of(k)['call_pairs_per_s']:.2f}x"),
            ('peak RSS (MB)', lambda k: f"{res[k]['peak_rss_mb']:.0f}"),
            ('peak RSS vs TRL', lambda k: f"{res[k]['peak_rss_mb'] / trl_of(k)['peak_rss_mb']:.2f}x"),
            ('RSS growth in train (MB)', lambda k: f"{res[k]['peak_rss_mb'] - res[k]['rss_before_train_mb']:.0f}")]
    for name, cell in rows: print(f"{name:26}" + ''.join(f"{cell(k):>{w}}" for k in KINDS))
    print("(the 'vs TRL' of the precomputed column is against TRL full+ref)")
    for ours, trl in (('fttk-full', 'trl-full'), ('fttk-lora', 'trl-lora'), ('fttk-full-pre', 'trl-full')):
        dl = max(abs(x - y) for x, y in zip(res[ours]['losses'], res[trl]['losses']))
        print(f"max |loss difference| {LABELS[ours]} vs {LABELS[trl]} over {len(res[trl]['losses'])} steps: {dl:.2e}")
    p, r = res['fttk-full-pre'], res['fttk-full']
    print(f"precomputed vs reference model (fttk loop): {r['pairs_per_s'] / p['pairs_per_s']:.2f}x the training time, "
          f"{p['peak_rss_mb'] / r['peak_rss_mb']:.2f}x the peak RSS "
          f"({p['peak_rss_mb'] - r['peak_rss_mb']:+.0f} MB; the reference model's fp32 weights are "
          f"{r['n_params'] * 4 / 2**20:.1f} MB)")


if __name__ == '__main__':
    main()
