"""What the fttk-vs-reference benchmarks share: each side runs in its own subprocess (so its peak RSS is its own),
the sides alternate, and each keeps its best rate (a shared machine only ever slows a run down) and lowest peak."""
from __future__ import annotations
import json, subprocess, sys


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
