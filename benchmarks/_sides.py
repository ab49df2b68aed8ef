"""What the fttk-vs-reference benchmarks share: each side runs in its own subprocess (so its peak RSS is its own),
the sides alternate, and each keeps its best rate (a shared machine only ever slows a run down) and lowest peak."""
from __future__ import annotations
import argparse, json, os, subprocess, sys


def rss_mb() -> float:
    "This process's resident memory now, in MB."
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024
    return float('nan')


def run_sides(script: str, kinds, argv: list[str], repeats: int, env: dict, rate_key: str):
    "`({kind: result}, {kind: [rate per run]})`: `script --side KIND` for every kind, `repeats` rounds."
    res, rates = {}, {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            p = subprocess.run([sys.executable, script, *argv, '--side', kind], env=env, capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
            if p.returncode or not line: sys.exit(f"{kind} side failed:\n{p.stderr[-3000:]}")
            r = json.loads(line[0][7:]); rates[kind].append(r[rate_key])
            res.setdefault(kind, r)
            res[kind][rate_key] = max(rates[kind])
            res[kind]['peak_rss_mb'] = min(res[kind]['peak_rss_mb'], r['peak_rss_mb'])
    return res, rates


def bench_args(steps: dict, side):
    ("The flags every benchmark takes; in a `--side KIND` subprocess, run `side` and exit. Returns "
     "`(args, steps, env)` for the parent.")
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', default='default', choices=['test', 'default'])
    ap.add_argument('--steps', type=int, default=None)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--side', default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    n = a.steps or steps[a.size]
    if a.side:
        print('RESULT ' + json.dumps(side(a.side, a.size, n, a.threads))); sys.exit(0)
    return a, n, {**os.environ, 'OMP_NUM_THREADS': str(a.threads)}
