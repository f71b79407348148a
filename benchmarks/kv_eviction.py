"""KV eviction's quality and its bounded memory, one table.

    python benchmarks/kv_eviction.py [--budget 512] [--max-tokens 0] [--generate 16384]

Perplexity: the fixed text of `servelm bench perplexity` (servelm/bench/data/perplexity.txt,
5,745 tokens under SmolLM2's tokenizer) scored as ONE sequence through the engine (scheduler,
paged cache, eviction and all) as a prompt with prompt_logprobs, under: full attention (all prior
context), a naive window (the last --budget tokens, no sinks: streaming with 0 sink tokens),
StreamingLLM (4 sinks + recent) and H2O (4 sinks, half the rest recent, the rest heavy
hitters), each with a budget of --budget tokens. The model is the embedded SmolLM2-135M-Instruct
GGUF (CPU, fp32). Generation: --generate tokens from a short prompt with max_model_len 2048
under streaming; the KV blocks the request holds, sampled every step once it first evicts,
must stay constant.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def perplexity(ids: list[int], budget: int, policy: str, sinks: int) -> tuple[float, float]:
    from servelm import LLM, SamplingParams
    kw = {} if policy == "none" else dict(kv_eviction=policy, kv_eviction_budget=budget,
                                          sink_tokens=sinks)
    llm = LLM(device="cpu", dtype="float32", max_model_len=len(ids) + 16,
              enable_prefix_caching=False, **kw)
    t = time.perf_counter()
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       use_tqdm=False)[0]
    dt = time.perf_counter() - t
    plp = out.prompt_logprobs  # [None, {token: Logprob}, ...]: position i's own token
    nll = -sum(plp[i][ids[i]].logprob for i in range(1, len(ids)))
    llm.engine.core.shutdown()
    return math.exp(nll / (len(ids) - 1)), dt


def generate(n: int, budget: int) -> dict:
    from servelm import LLM, SamplingParams
    llm = LLM(device="cpu", dtype="float32", max_model_len=2048, kv_eviction="streaming",
              kv_eviction_budget=budget)
    eng = llm.engine
    tok = llm.get_tokenizer()
    prompt = tok.encode("Write a very long story about a lighthouse keeper.")
    eng.add_request("g", prompt, SamplingParams(max_tokens=n, temperature=0.8, seed=0,
                                                ignore_eos=True))
    sched = eng.core.scheduler
    held, first_evict, out = [], None, None
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
        for r in sched.running:
            if r.num_evicted and first_evict is None:
                first_evict = r.num_computed_tokens
            if first_evict is not None:
                held.append(len(r.block_ids))
    dt = time.perf_counter() - t
    eng.core.shutdown()
    return {"tokens": len(out.outputs[0].token_ids), "seconds": dt,
            "first_evict_at": first_evict, "blocks_min": min(held), "blocks_max": max(held),
            "finish": out.outputs[0].finish_reason}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=0, help="score the first N tokens (0: all)")
    ap.add_argument("--generate", type=int, default=16384)
    args = ap.parse_args()
    from servelm.bench.perplexity import DEFAULT_TEXT
    from servelm.loader import load_tokenizer
    tok = load_tokenizer(None, None, "auto")
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        ids = list(tok.encode(f.read()))
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    rows = []
    full = None
    for label, policy, sinks in (("full attention", "none", 0),
                                 (f"naive window ({args.budget})", "streaming", 0),
                                 (f"streaming, 4 sinks ({args.budget})", "streaming", 4),
                                 (f"h2o, 4 sinks ({args.budget})", "h2o", 4)):
        ppl, dt = perplexity(ids, args.budget, policy, sinks)
        full = full or ppl
        rows.append((label, ppl, ppl / full, dt))
        print(f"{label}: ppl {ppl:.3f} ({ppl / full:.3f}x) in {dt:.1f} s", flush=True)
    g = generate(args.generate, args.budget) if args.generate else None
    print(f"\nSmolLM2-135M-Instruct (embedded GGUF, fp32, CPU), {len(ids)} tokens of "
          f"perplexity.txt scored as one sequence, KV budget {args.budget} tokens "
          "(+ up to a block of 16 between evictions)")
    print("| attention | perplexity | vs full | target | seconds |\n|---|---|---|---|---|")
    targets = ["", ">= 2x", "<= 1.15x", "<= 1.15x"]
    for (label, ppl, ratio, dt), tgt in zip(rows, targets):
        print(f"| {label} | {ppl:.3f} | {ratio:.3f}x | {tgt} | {dt:.1f} |")
    if g:
        print(f"\nstreaming generation, max_model_len 2048: {g['tokens']} tokens "
              f"({g['finish']}) in {g['seconds']:.0f} s; first eviction at {g['first_evict_at']} "
              f"tokens, then blocks held {g['blocks_min']}..{g['blocks_max']} "
              f"(budget {args.budget} = {args.budget // 16} blocks of 16)")


if __name__ == "__main__":
    main()
