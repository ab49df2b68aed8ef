"""DPO memory: the bytes a real fttk DPO run holds against the memory accountant's prediction (fttk.memory).

Full fine-tuning of the SFT lab model in fp32 with AdamW, two ways: a frozen copy of the model as the reference
(MemoryConfig(method='dpo')), and the reference log-probs precomputed with no reference model
(MemoryConfig(method='dpo', precompute_ref_log_probs=True)). Each runs fttk.dpo.dpo_train for a few steps in its
own subprocess; an optimizer step hook counts, after the first update, the bytes of the policy's parameters,
their gradients and AdamW's states (m, v and its per-parameter step counters), and the bytes of the reference
model's parameters and of the cached reference log-probs. The accountant gets the run's own model config
(as the PPO notebook does: the trained tokenizer sets the vocabulary). The parent prints, per component,
predicted vs measured MB, and each run's peak RSS.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mem_dpo.py            # default lab model
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mem_dpo.py --size test
"""
from __future__ import annotations
import os, resource, sys, tempfile, warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sides import bench_args, run_sides   # noqa: E402

STEPS = {'test': 3, 'default': 3}
BATCH_PAIRS = 8
KINDS = ('reference', 'precomputed')
MB = 2**20


def nbytes(ts) -> int: return sum(t.numel() * t.element_size() for t in ts)


def side(kind: str, size: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    warnings.simplefilter('ignore')
    import fttk.dpo as D
    from fttk.core import load_tensors
    from fttk.memory import estimate_memory
    from fttk.sft import sft_model
    from fttk.world import lab_world, preference_pairs, preference_rows
    model, tok = sft_model(size)
    ref = sft_model(size)[0] if kind == 'reference' else None
    pairs = preference_pairs(preference_rows(lab_world(size)))[:steps * BATCH_PAIRS]
    out = Path(tempfile.mkdtemp())
    cfg = D.DPOConfig(output_dir=str(out/'run'), learning_rate=1e-5, max_steps=steps,
                      per_device_train_batch_size=BATCH_PAIRS, max_length=256, seed=0,
                      precompute_ref_log_probs=(kind == 'precomputed'))
    held, make_opt = {}, D._optimizer

    def counting_optimizer(m, c):        # dpo_train builds its AdamW here; count after its first step
        opt = make_opt(m, c)
        def count(o, args, kwargs):
            if held: return
            ps = [p for g in o.param_groups for p in g['params']]
            held['policy params'] = nbytes(ps)
            held['gradients'] = nbytes(p.grad for p in ps if p.grad is not None)
            held['AdamW states'] = nbytes(t for s in o.state.values() for t in s.values()
                                          if torch.is_tensor(t))
        opt.register_step_post_hook(count)
        return opt
    D._optimizer = counting_optimizer
    D.dpo_train(model, tok, pairs, cfg, ref_model=ref, progress=False)
    held['reference model'] = nbytes(ref.parameters()) if ref is not None else 0
    cache = out/'run'/'ref_logps.safetensors'
    held['reference log-probs'] = nbytes(load_tensors(cache).values()) if cache.exists() else 0
    run_cfg = out/'config.json'; model.config.to_json_file(run_cfg)
    est = estimate_memory(config=str(run_cfg), dtype='fp32', optim='adamw', method='dpo',
                          precompute_ref_log_probs=(kind == 'precomputed'))
    a = est.rows
    predicted = {'policy params': a['params'], 'gradients': a['grads'], 'AdamW states': a['optim'],
                 'reference model': a.get('reference model', 0), 'reference log-probs': 0}
    return {'kind': kind, 'held': held, 'predicted': predicted, 'pairs': len(pairs),
            'n_params': sum(p.numel() for p in model.parameters()), 'pairs_per_s': 0.0,
            'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    a, steps, env = bench_args(STEPS, side)
    res, _ = run_sides(__file__, KINDS, ['--size', a.size, '--steps', str(steps), '--threads', str(a.threads)],
                       1, env, 'pairs_per_s')
    r = res['reference']
    print(f"DPO full fine-tuning, lab SFT model '{a.size}' ({r['n_params']:,} params), fp32 AdamW, "
          f"{steps} steps x {BATCH_PAIRS} pairs: accountant (fttk.memory) vs bytes held after the first update")
    w = 24
    print(f"{'':22}" + ''.join(f"{f'{k}: predicted':>{w}}{'measured MB':>14}" for k in KINDS))
    for comp in res['reference']['held']:
        print(f"{comp:22}" + ''.join(f"{res[k]['predicted'][comp] / MB:>{w}.3f}{res[k]['held'][comp] / MB:>14.3f}"
                                     for k in KINDS))
    tot = lambda k, d: sum(res[k][d].values()) / MB
    print(f"{'total':22}" + ''.join(f"{tot(k, 'predicted'):>{w}.3f}{tot(k, 'held'):>14.3f}" for k in KINDS))
    print(f"{'peak RSS of the run':22}" + ''.join(f"{'':>{w}}{res[k]['peak_rss_mb']:>14.0f}" for k in KINDS))
    p = res['precomputed']
    print(f"precomputing saves {tot('reference', 'held') - tot('precomputed', 'held'):.3f} MB held "
          f"(accountant: {tot('reference', 'predicted') - tot('precomputed', 'predicted'):.3f} MB); "
          f"its cache of {p['pairs']} pairs is {p['held']['reference log-probs'] / 2**10:.2f} KB "
          "(not in the accountant: it depends on the data, 16 bytes a pair)")
    print("AdamW states measured include torch's per-parameter step counters (4 bytes per tensor), "
          "which the accountant's 8 bytes/param leave out")


if __name__ == '__main__':
    main()
