"""NF4 quantize / dequantize: fttk.quant vs bitsandbytes on the CPU, same tensors, one process.

Prints throughput (million weights per second) of each side and the ratio ours/theirs (>1: we are faster),
and checks that the codes and the dequantized weights are identical.
Run: OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_quant.py [--threads 1] [--repeat 7]
"""
import argparse, logging, time, warnings

import torch
import bitsandbytes.functional as bnbF

from fttk.quant import quantize_nf4, dequantize_nf4

logging.getLogger('torch._dynamo').setLevel(logging.ERROR)
warnings.filterwarnings('ignore')


def best_time(fn, repeat):
    fn()                                                  # warm-up (also compiles/caches on either side)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeat', type=int, default=7)
    ap.add_argument('--shapes', default='1024x1024,4096x4096,4096x11008')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bitsandbytes CPU")
    print(f"{'shape':>12} {'dtype':>9} {'op':>16} {'fttk Mw/s':>10} {'bnb Mw/s':>10} {'ratio':>6}  identical")
    ratios = {}
    for s in args.shapes.split(','):
        shape = tuple(int(v) for v in s.split('x'))
        for dtype in (torch.float32, torch.bfloat16):
            w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
            n = w.numel() / 1e6
            for dq in (False, True):
                name = 'quantize+dq' if dq else 'quantize'
                ours = quantize_nf4(w, double_quant=dq)
                packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type='nf4')
                same = torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, qs.absmax)
                t_ours = best_time(lambda: quantize_nf4(w, double_quant=dq), args.repeat)
                t_bnb = best_time(lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type='nf4'), args.repeat)
                ratios.setdefault(name, []).append(t_bnb / t_ours)
                print(f"{s:>12} {str(dtype)[6:]:>9} {name:>16} {n / t_ours:10.1f} {n / t_bnb:10.1f} {t_bnb / t_ours:6.2f}  {same}")
                name = 'dequantize+dq' if dq else 'dequantize'
                same = torch.equal(dequantize_nf4(ours), bnbF.dequantize_4bit(packed, qs))
                t_ours = best_time(lambda: dequantize_nf4(ours), args.repeat)
                t_bnb = best_time(lambda: bnbF.dequantize_4bit(packed, qs), args.repeat)
                ratios.setdefault(name, []).append(t_bnb / t_ours)
                print(f"{s:>12} {str(dtype)[6:]:>9} {name:>16} {n / t_ours:10.1f} {n / t_bnb:10.1f} {t_bnb / t_ours:6.2f}  {same}")
    print('\ngeometric-mean throughput ratio fttk / bitsandbytes (>1: fttk faster)')
    for k, v in ratios.items():
        g = torch.tensor(v).log().mean().exp().item()
        print(f"  {k:16} {g:5.2f}x  (min {min(v):.2f}, max {max(v):.2f})")


if __name__ == '__main__':
    main()
