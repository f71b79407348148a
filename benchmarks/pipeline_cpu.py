"""Pipeline parallelism on this CPU: do two stages overlap? A random Llama (hidden 1024, 8
layers, fp32) on 2 stages of 1 thread each, with up to 2 steps in flight (the engine's
default under -pp 2: each stage works on one batch while the other works on the one before)
against 1 step at a time, and one process with 2 threads, side by side; median of --runs.

    python benchmarks/pipeline_cpu.py [--runs 3] [--requests 16]

Two workloads: prompt-heavy (256 in / 2 out: compute-bound, where stages overlapping pays) and
decode-heavy (32 in / 64 out: each stage reads its weights once per batch, so two half batches
read them twice and overlapping gains nothing on a bandwidth-bound CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_model(path: str) -> None:
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def run(path: str, pp: int, depth: int, requests: int, tokens: int, prompt: int) -> float:
    """Tokens (prompt and output) per second of `requests` prompts x `tokens` new tokens."""
    import torch

    from servelm import SamplingParams
    from servelm.config import EngineArgs
    from servelm.engine.engine import Engine
    cfg = EngineArgs(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True,
                     kv_cache_memory=1 << 28, pipeline_parallel_size=pp,
                     threads=2).create_engine_config()
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler,
                                                                 pipeline_depth=depth))
    engine = Engine(cfg)
    g = torch.Generator().manual_seed(1)

    def generate(n: int, new: int) -> None:
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        for i in range(n):
            engine.add_request(f"r{time.monotonic_ns()}-{i}",
                               torch.randint(1, 4000, (prompt,), generator=g).tolist(), sp)
        while engine.has_unfinished_requests():
            engine.step()

    generate(2, 4)  # warm-up
    t = time.perf_counter()
    generate(requests, tokens)
    dt = time.perf_counter() - t
    engine.core.shutdown()
    return requests * (prompt + tokens) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args()
    workloads = [("prompts: 256 in / 2 out", 256, 2), ("decode: 32 in / 64 out", 32, 64)]
    cases = [("one process, 2 threads", 1, 1), ("-pp 2, 1 step at a time", 2, 1),
             ("-pp 2, 2 steps in flight", 2, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        make_model(d)
        for wname, prompt, tokens in workloads:
            res: dict = {c[0]: [] for c in cases}
            for _ in range(args.runs):
                for name, pp, depth in cases:
                    res[name].append(run(d, pp, depth, args.requests, tokens, prompt))
            base = statistics.median(res[cases[1][0]])
            for name, _, _ in cases:
                m = statistics.median(res[name])
                rows.append(f"| {wname} | {name} | {m:.1f} | "
                            f"{', '.join(f'{x:.1f}' for x in res[name])} | {m / base:.2f}x |")
    print(f"\n{args.requests} requests, random Llama (1024 hidden, 8 layers, fp32), tokens (in + "
          f"out) per second, median of {args.runs}")
    print("| workload | configuration | tok/s | runs | vs 1 step at a time |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
