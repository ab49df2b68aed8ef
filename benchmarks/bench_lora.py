"""fttk's fused LoRA fast path vs peft LoRA: same model, same batch, same seed.

Prints, side by side in one process: training-step time (median of interleaved steps, with the floor: the
same step on the model with no LoRA at all, which bounds any LoRA's speed-up over peft), bytes of
activations saved for backward (torch.autograd.graph.saved_tensors_hooks, parameters excluded, each
storage counted once), the loss of every step (must agree to 1e-5), and peak RSS of each side measured
in its own subprocess so the two runs cannot contaminate each other.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_lora.py            # default size
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_lora.py --size test
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, time, warnings

import torch

from fttk.core import set_seed
from fttk.lora import LoRAConfig, count_saved_bytes, enable_fast_lora, inject_lora, peft_lora_config

SIZES = {  # a Llama shaped like the lab base model (fttk.world) when that is not importable
    'test': dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, batch=4, seq=32, steps=6),
    'default': dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                    vocab_size=2048, batch=8, seq=128, steps=10),
}


def base(size: str):
    "The lab base model if fttk.world has it, else a Llama of similar shape built from a config."
    s = SIZES[size]
    try:
        from fttk.world import base_model
        model, _ = base_model(size)
        return model.float().train(), 'fttk.world.base_model(%r)' % size
    except Exception:
        from transformers import LlamaConfig, LlamaForCausalLM
        set_seed(0)
        cfg = LlamaConfig(max_position_embeddings=max(256, s['seq']), **{k: v for k, v in s.items() if k not in ('batch', 'seq', 'steps')})
        return LlamaForCausalLM(cfg).train(), 'LlamaForCausalLM(%s)' % ', '.join(f'{k}={v}' for k, v in s.items() if k not in ('batch', 'seq', 'steps'))


CFG = LoRAConfig(r=16, lora_alpha=32, target_modules='all-linear', init_lora_weights=False)  # B != 0: a real update


def build(kind: str, size: str):
    model, desc = base(size)
    set_seed(1)
    if kind == 'peft':
        from peft import get_peft_model
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = get_peft_model(model, peft_lora_config(CFG))
    elif kind == 'bound':      # no LoRA at all: the frozen model's forward and input-gradient backward, the floor under any LoRA
        for p in model.parameters(): p.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)    # cheapest way to make backward run through every layer
        return model, torch.optim.SGD([model.get_input_embeddings().weight], lr=0.0), desc
    else:
        inject_lora(model, CFG)
        model.fttk_fast = enable_fast_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt, desc


def batch(size: str, vocab: int):
    s = SIZES[size]
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (s['batch'], s['seq']), generator=g)


def step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.item()


def rss_child(kind: str, size: str):
    "Run in a fresh process: peak RSS of building + 3 training steps, and the RSS just before the steps."
    torch.set_num_threads(1)
    model, opt, _ = build(kind, size)
    ids = batch(size, model.config.vocab_size)
    import psutil
    before = psutil.Process().memory_info().rss
    for _ in range(3): step(model, opt, ids)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and would report the parent's peak
    peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
    print(json.dumps({'before': before, 'peak': peak}))


def thin_products_ms(model, opt, ids, r: int, steps: int = 3) -> tuple[float, float]:
    """ms per step in matrix products with a rank-r side, split into the four every LoRA backward needs
    (X A^T, G B, (G B)^T X, G^T X A^T: plain mm) and the two that expand back to full width (addmm_ into Y and dX)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(steps): step(model, opt, ids)
    need = expand = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ('aten::mm', 'aten::addmm_') and any(r in sh for sh in e.input_shapes if sh):
            if e.key == 'aten::mm': need += e.self_cpu_time_total
            else: expand += e.self_cpu_time_total
    return need / steps / 1e3, expand / steps / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', default='default', choices=list(SIZES))
    ap.add_argument('--rss-child', default=None)
    a = ap.parse_args()
    if a.rss_child: return rss_child(a.rss_child, a.size)
    torch.set_num_threads(1)
    (mp, op, desc), (mf, of, _), (mb, ob, _) = build('peft', a.size), build('fast', a.size), build('bound', a.size)
    ids = batch(a.size, mf.config.vocab_size)
    print(f"model: {desc}; batch {tuple(ids.shape)}; LoRA r={CFG.r} alpha={CFG.lora_alpha} on all linear layers; "
          f"torch threads {torch.get_num_threads()}; fused: {mf.fttk_fast}")

    with count_saved_bytes(mp) as sp: lp = mp(input_ids=ids, labels=ids).loss
    with count_saved_bytes(mf) as sf: lf = mf(input_ids=ids, labels=ids).loss
    del lp, lf

    tp, tf, tb, losses = [], [], [], []
    for i in range(SIZES[a.size]['steps'] + 2):       # interleaved, first two are warm-up
        t0 = time.perf_counter(); l1 = step(mp, op, ids); t1 = time.perf_counter()
        l2 = step(mf, of, ids); t2 = time.perf_counter()
        step(mb, ob, ids); t3 = time.perf_counter()
        losses.append((l1, l2))
        if i >= 2: tp.append(t1 - t0); tf.append(t2 - t1); tb.append(t3 - t2)
    dl = max(abs(x - y) for x, y in losses)

    rss = {}
    for kind in ('peft', 'fast'):
        out = subprocess.run([sys.executable, __file__, '--size', a.size, '--rss-child', kind], capture_output=True, text=True,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
        rss[kind] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        if out.returncode: print(out.stderr[-2000:])

    mp_, mf_, mb_ = statistics.median(tp), statistics.median(tf), statistics.median(tb)
    print(f"step time (median of {len(tp)})  peft {mp_*1e3:8.1f} ms   fast {mf_*1e3:8.1f} ms   speed-up x{mp_/mf_:.2f}  (goal >= 1.2)")
    print(f"  floor: the same step with no LoRA at all {mb_*1e3:.1f} ms, so no LoRA can beat peft by more than x{mp_/mb_:.2f};"
          f" LoRA's own cost: peft {(mp_-mb_)*1e3:.1f} ms, fast {(mf_-mb_)*1e3:.1f} ms (x{(mp_-mb_)/max(mf_-mb_, 1e-9):.2f} less)")
    need, expand = thin_products_ms(mf, of, ids, CFG.r)
    print(f"  torch.profiler: rank-{CFG.r} products in the fast step {need + expand:.1f} ms, of which {need:.1f} ms are the four every"
          f" LoRA backward needs; floor + those = {mb_*1e3 + need:.1f} ms: no LoRA beats peft by more than x{mp_/(mb_ + need/1e3):.2f} here")
    print(f"saved activations         peft {sp['bytes']/2**20:8.2f} MiB  fast {sf['bytes']/2**20:8.2f} MiB  ratio {sf['bytes']/sp['bytes']:.2f}  (goal <= 0.7)"
          f"   [{sp['tensors']} vs {sf['tensors']} tensors]")
    if rss['peft'] and rss['fast']:
        P, Q = rss['peft'], rss['fast']
        print(f"peak RSS                  peft {P['peak']/2**20:8.1f} MiB  fast {Q['peak']/2**20:8.1f} MiB  ratio {Q['peak']/P['peak']:.2f};"
              f"  growth during 3 steps: peft {(P['peak']-P['before'])/2**20:.1f} MiB, fast {(Q['peak']-Q['before'])/2**20:.1f} MiB")
    print(f"loss per step: max |peft - fast| = {dl:.2e} over {len(losses)} AdamW steps (goal <= 1e-5); "
          f"first {losses[0][0]:.6f} / {losses[0][1]:.6f}, last {losses[-1][0]:.6f} / {losses[-1][1]:.6f}")
    return {'speedup': mp_ / mf_, 'floor_speedup': mp_ / mb_, 'saved_ratio': sf['bytes'] / sp['bytes'], 'max_loss_diff': dl}


if __name__ == '__main__':
    main()
