"""Beam search with and without copy-on-write partial blocks: tokens computed and wall time.

  python benchmarks/beam_cow.py [--model PATH] [--width 4] [--max-tokens 32] [--repeat 3]

Each repeat runs both modes on a fresh LLM (the embedded SmolLM2 by default), alternating;
"off" is the same engine with the partial-block lookup disabled (every beam step then recomputes
its parent's last partial block, as before copy-on-write). Prints one table of medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):", "The three laws of thermodynamics are"]


def run(model, width: int, max_tokens: int, cow: bool) -> tuple[float, int, int]:
    from servelm import LLM
    from servelm.core.kv_cache import KVCacheManager
    from servelm.engine.beam_search import BeamSearchParams
    orig = KVCacheManager.get_partial_hit
    if not cow:
        KVCacheManager.get_partial_hit = lambda self, req, n: None
    try:
        llm = LLM(model) if model else LLM()
        t0 = time.perf_counter()
        llm.beam_search(PROMPTS, BeamSearchParams(width, max_tokens))
        dt = time.perf_counter() - t0
    finally:
        KVCacheManager.get_partial_hit = orig
    s = llm.engine.stats()
    return dt, s.prefix_cache_queries - s.prefix_cache_hits, s.prefix_cache_hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    res = {True: [], False: []}
    for _ in range(a.repeat):
        for cow in (False, True):
            res[cow].append(run(a.model, a.width, a.max_tokens, cow))
    print(f"\nbeam search, {len(PROMPTS)} prompts, width {a.width}, {a.max_tokens} tokens, "
          f"medians of {a.repeat}")
    print("| partial blocks | wall s | tokens computed | prefix-cache hit tokens |")
    print("|---|---|---|---|")
    for cow in (False, True):
        r = res[cow]
        print(f"| {'copy-on-write' if cow else 'recomputed'} | "
              f"{statistics.median(x[0] for x in r):.2f} ({', '.join(f'{x[0]:.2f}' for x in r)}) | "
              f"{statistics.median(x[1] for x in r):.0f} | {statistics.median(x[2] for x in r):.0f} |")
    off, on = (statistics.median(x[0] for x in res[c]) for c in (False, True))
    print(f"speedup {off / on:.2f}x")


if __name__ == "__main__":
    main()
