"""Reward model: fttk's loop (pair batches, and InstructGPT's ranking batches) vs TRL's RewardTrainer.

Same SFT lab model with the same scalar head, the same preference pairs in the same order, the same steps.
Each side runs in its own subprocess (so peak RSS is its own); the parent prints, in one run, pairs/s and peak
RSS as ratios against TRL, and the per-step losses of fttk's pair loop and TRL (they must agree). The ranking
side sees the same pairs grouped by ranking (one forward pass per distinct response): its pairs/s is the
point of InstructGPT's batching; its losses differ (other batches), so they are not compared.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_reward.py            # default lab model
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_reward.py --size test
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, tempfile, warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sides import bench_args, rss_mb, run_sides   # noqa: E402

STEPS = {'test': 8, 'default': 30}
BATCH_PAIRS = 12          # pairs per optimizer step; ranking side: 2 rankings of K=4 (6 pairs each)



def side(kind: str, size: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    warnings.simplefilter('ignore')
    import logging; logging.getLogger('transformers').setLevel(logging.ERROR)
    from fttk.reward import RewardConfig, reward_model, reward_train, trl_reward_train
    from fttk.sft import sft_model
    from fttk.world import lab_world, preference_pairs, preference_rows
    rm, tok = reward_model(*sft_model(size))
    pairs = preference_pairs(preference_rows(lab_world(size)))[:steps * BATCH_PAIRS]
    per_step = BATCH_PAIRS // 6 if kind == 'ranking' else BATCH_PAIRS
    cfg = RewardConfig(output_dir=tempfile.mkdtemp(), learning_rate=1e-3, max_steps=steps,
                       per_device_train_batch_size=per_step, max_length=256, seed=0, shuffle=False,
                       batch_by='ranking' if kind == 'ranking' else 'pair')
    rss0 = rss_mb()
    if kind == 'trl':
        res = trl_reward_train(rm, tok, pairs, cfg)
        seconds = next(r['train_runtime'] for r in res['trainer'].state.log_history if 'train_runtime' in r)
    else:
        res = reward_train(rm, tok, pairs, cfg, progress=False)
        seconds = res['seconds']
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {'kind': kind, 'seconds': seconds, 'pairs': len(pairs), 'pairs_per_s': len(pairs) / seconds,
            'losses': [r['loss'] for r in res['log']], 'peak_rss_mb': peak, 'rss_before_train_mb': rss0,
            'n_params': sum(p.numel() for p in rm.parameters())}


def main():
    a, steps, env = bench_args(STEPS, side)
    kinds = ('pair', 'ranking', 'trl')
    res, speeds = run_sides(__file__, kinds, ['--size', a.size, '--steps', str(steps), '--threads', str(a.threads)], a.repeats, env, 'pairs_per_s')
    t = res['trl']
    print(f"Reward model, lab SFT model '{a.size}' + scalar head ({t['n_params']/1e6:.2f}M params), {steps} steps x "
          f"{BATCH_PAIRS} pairs, {a.threads} thread(s)")
    print('pairs/s per run: ' + '; '.join(f"{k} " + ', '.join(f'{v:.0f}' for v in vs) for k, vs in speeds.items()))
    print(f"{'':24}{'fttk, pair batches':>20}{'fttk, ranking batches':>23}{'TRL RewardTrainer':>19}")
    print(f"{'pairs/s':24}" + ''.join(f"{res[k]['pairs_per_s']:{w}.0f}" for k, w in zip(kinds, (20, 23, 19))))
    print(f"{'pairs/s vs TRL':24}" + ''.join(f"{res[k]['pairs_per_s'] / t['pairs_per_s']:{w - 1}.2f}x"
                                               for k, w in zip(kinds, (20, 23, 19))))
    print(f"{'peak RSS (MB)':24}" + ''.join(f"{res[k]['peak_rss_mb']:{w}.0f}" for k, w in zip(kinds, (20, 23, 19))))
    print(f"{'peak RSS vs TRL':24}" + ''.join(f"{res[k]['peak_rss_mb'] / t['peak_rss_mb']:{w - 1}.2f}x"
                                               for k, w in zip(kinds, (20, 23, 19))))
    dl = max(abs(x - y) for x, y in zip(res['pair']['losses'], t['losses']))
    print(f"max |loss difference| fttk pair loop vs TRL over {len(t['losses'])} steps: {dl:.2e}")


if __name__ == '__main__':
    main()
