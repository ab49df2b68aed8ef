"""BPE benchmarks, both sides in one process (run pinned to one core: `taskset -c 1 python benchmarks/bench_bpe.py`).

1. our incremental trainer vs our naive trainer on 1 MiB of CPython's docs: same merges, speed ratio (goal >= 20x);
2. our encode vs HF `tokenizers` encode on the same lines with the same merges: throughput ratio;
3. bytes per token on held-out docs as the vocabulary grows;
4. one long chunk (16 Ki and 64 Ki letters, no spaces: a single pre-split chunk): our heap merge vs HF
   `tokenizers`, and (with `--simple`) the quadratic teaching loop. `--long-only` runs just this part.

Times are CPU seconds of this process (`time.process_time`, all threads), so other jobs sharing the core do not
distort the ratios; HF runs with one rayon thread.
"""
import argparse, os, time

os.environ.setdefault('RAYON_NUM_THREADS', '1')          # HF tokenizers: one thread, like us
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import random

from fttk.tokenization import (BPETokenizer, bpe_merge_simple, count_chunks, docs_corpus, hash_data, hf_merges,
                               byte_merges, to_hf, train_hf, train_incremental, train_naive)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--bytes', type=int, default=2**20, help='corpus size (UTF-8 bytes)')
    ap.add_argument('--vocab', type=int, default=1024, help='vocabulary size for the trainer race')
    ap.add_argument('--curve-max', type=int, default=8192)
    ap.add_argument('--long-only', action='store_true', help='only the long-chunk race (part 4)')
    ap.add_argument('--simple', action='store_true', help='also time the quadratic teaching loop in part 4 (~30 s)')
    args = ap.parse_args()
    if args.long_only: return long_chunks(BPETokenizer.train(docs_corpus(args.bytes), vocab_size=args.vocab), args.simple)

    corpus = docs_corpus(args.bytes)
    nbytes = sum(len(d.encode()) for d in corpus)
    print(f"corpus: {len(corpus):,} docs, {nbytes:,} bytes (pydoc_data.topics + stdlib docstrings), sha256 {hash_data(corpus)}")

    # 1. trainers
    t0 = time.process_time(); counts = count_chunks(corpus); t_count = time.process_time() - t0
    print(f"pre-split + count: {t_count:.2f} s, {len(counts):,} unique chunks")
    t0 = time.process_time(); m_inc, _ = train_incremental(counts, args.vocab); t_inc = time.process_time() - t0
    t0 = time.process_time(); m_naive, _ = train_naive(counts, args.vocab); t_naive = time.process_time() - t0
    assert m_inc == m_naive, "the two trainers disagree"
    t0 = time.process_time(); hf = train_hf(corpus, args.vocab); t_hf = time.process_time() - t0
    ours = BPETokenizer.train(corpus, vocab_size=args.vocab)
    assert byte_merges(ours) == hf_merges(hf), "our merges differ from HF's"
    print(f"[train] vocab {args.vocab} ({len(m_inc)} merges, identical in all three): naive {t_naive:.2f} s, "
          f"incremental {t_inc:.3f} s, HF {t_hf:.3f} s (incl. its pre-split)")
    print(f"[train] incremental / naive speed-up: {t_naive / t_inc:.1f}x (goal >= 20x)")

    # 2. encode throughput, same merges on both sides; best of 3 runs, on lines and on whole documents
    lines = [l for d in corpus for l in d.splitlines(keepends=True)]
    hf_tok = to_hf(ours)
    mb = nbytes / 2**20

    def best(fn, setup=lambda: None, repeat=3):
        ts = []
        for _ in range(repeat):
            arg = setup(); t0 = time.process_time(); out = fn(arg); ts.append(time.process_time() - t0)
        return min(ts), out

    for name, texts in (('lines', lines), ('documents', corpus)):
        t_cold, a = best(lambda t: [t.encode(x) for x in texts], setup=lambda: BPETokenizer(ours.merges))
        warm = BPETokenizer(ours.merges); [warm.encode(x) for x in texts]
        t_warm, b = best(lambda _: [warm.encode(x) for x in texts])
        t_hfb, c = best(lambda _: [e.ids for e in hf_tok.encode_batch(texts, add_special_tokens=False)])
        t_hf1, d = best(lambda _: [hf_tok.encode(x, add_special_tokens=False).ids for x in texts])
        assert a == b == c == d, "ids differ"
        print(f"[encode] {len(texts):,} {name}, identical ids. ours {mb / t_cold:.2f} MiB/s (empty cache), {mb / t_warm:.2f} MiB/s "
              f"(warm cache); HF {mb / t_hfb:.2f} MiB/s (encode_batch), {mb / t_hf1:.2f} MiB/s (encode, one call per text)")
        print(f"[encode] {name}: HF encode_batch is {t_cold / t_hfb:.1f}x our empty-cache encode, {t_warm / t_hfb:.1f}x our warm one")

    # 3. bytes per token vs vocabulary size (prefixes of one run, held-out tenth of the docs)
    train_docs = [d for i, d in enumerate(corpus) if i % 10]
    held = [d for i, d in enumerate(corpus) if i % 10 == 0]
    hb = sum(len(d.encode()) for d in held)
    big = BPETokenizer.train(train_docs, vocab_size=args.curve_max)
    print("[curve] vocab  bytes/token (held-out)")
    v = 256
    while v <= args.curve_max:
        t = BPETokenizer(big.merges[:v - 256])
        print(f"[curve] {v:5d}  {hb / sum(len(t.encode(d)) for d in held):.3f}")
        v *= 2

    long_chunks(ours, args.simple)


def long_chunks(tok, simple=False):
    "Part 4: one chunk of n letters, fttk (heap merge) vs HF tokenizers, same merges, same ids required."
    # a tokenizer that learned runs of 'a' (aa, aaaa, ...): 'a' * n then takes n - 1 merges, the worst case
    deep = BPETokenizer.train(['a' * 4096], vocab_size=300)
    hf_of = {id(tok): to_hf(tok), id(deep): to_hf(deep)}
    rng = random.Random(0)
    for n in (16384, 65536):
        for name, text, tok in (("'a' * n", 'a' * n, tok), ("'a' * n deep", 'a' * n, deep),
                                ('random a-z', ''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=n)), tok)):
            hf_tok = hf_of[id(tok)]
            tok._cache.clear()
            t0 = time.process_time(); ours = tok.encode(text); t_ours = time.process_time() - t0
            t0 = time.process_time(); theirs = hf_tok.encode(text, add_special_tokens=False).ids; t_hf = time.process_time() - t0
            assert ours == theirs, "ids differ"
            line = (f"[long] {n:6d} letters, {name:12s} ({len(ours):5d} tokens): fttk {t_ours:.4f} s, HF {t_hf:.4f} s, "
                    f"fttk/HF {t_ours / max(t_hf, 1e-6):.1f}x")
            if simple:
                t0 = time.process_time(); old = bpe_merge_simple(list(text.encode()), tok._ranks, tok._merge_ids)
                t_old = time.process_time() - t0
                assert old == ours
                line += f"; simple loop {t_old:.2f} s"
            print(line, flush=True)


if __name__ == '__main__':
    main()
