"""`servelm bench throughput` and `servelm bench latency`: the offline engine, like vLLM's
commands of the same names."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def add_offline_parsers(sub) -> None:
    from servelm.config import EngineArgs
    t = sub.add_parser("throughput", help="offline throughput of the engine")
    EngineArgs.add_cli_args(t, model_positional=False)
    t.add_argument("--dataset-name", default="random", choices=["random", "sharegpt-like"])
    t.add_argument("--num-prompts", type=int, default=1000)
    t.add_argument("--input-len", type=int, default=256)
    t.add_argument("--output-len", type=int, default=256)
    t.add_argument("--output-json", default=None)
    t.set_defaults(func=main_throughput)
    lat = sub.add_parser("latency", help="latency of one batch, end to end")
    EngineArgs.add_cli_args(lat, model_positional=False)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.add_argument("--output-json", default=None)
    lat.set_defaults(func=main_latency)


def _llm(args):
    from servelm import LLM
    from servelm.config import EngineArgs
    return LLM(**vars(EngineArgs.from_cli_args(args)))


def _random_ids(n: int, lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # stay clear of the lowest ids, which are special tokens in most vocabularies
    return [rng.integers(100, vocab, size=L).tolist() for L in lens]


def main_throughput(args: argparse.Namespace) -> int:
    from servelm import SamplingParams
    from servelm.bench.datasets import sharegpt_like_requests
    llm = _llm(args)
    mc = llm.engine.config.model
    if args.dataset_name == "random":
        prompts = _random_ids(args.num_prompts, [args.input_len] * args.num_prompts, mc.vocab_size, args.seed)
        outs = [args.output_len] * args.num_prompts
    else:
        reqs = sharegpt_like_requests(args.num_prompts, seed=args.seed, vocab_size=mc.vocab_size,
                                      max_model_len=mc.max_model_len)
        prompts, outs = [r.prompt for r in reqs], [r.output_len for r in reqs]
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True) for n in outs]
    t = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=True)
    dt = time.perf_counter() - t
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in res)
    summary = {"elapsed_time": dt, "num_requests": len(prompts), "total_num_tokens": n_in + n_out,
               "requests_per_second": len(prompts) / dt, "tokens_per_second": (n_in + n_out) / dt,
               "output_tokens_per_second": n_out / dt}
    print(f"Throughput: {summary['requests_per_second']:.2f} requests/s, "
          f"{summary['tokens_per_second']:.2f} total tokens/s, "
          f"{summary['output_tokens_per_second']:.2f} output tokens/s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def main_latency(args: argparse.Namespace) -> int:
    from servelm import SamplingParams
    llm = _llm(args)
    vocab = llm.engine.config.model.vocab_size
    prompts = _random_ids(args.batch_size, [args.input_len] * args.batch_size, vocab, args.seed)
    sp = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.num_iters_warmup):
        llm.generate(prompts, sp, use_tqdm=False)
    lat = []
    for _ in range(args.num_iters):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        lat.append(time.perf_counter() - t)
    q = np.percentile(lat, [10, 25, 50, 75, 90, 99])
    print(f"Avg latency: {statistics.mean(lat):.4f} s")
    for p, v in zip([10, 25, 50, 75, 90, 99], q):
        print(f"{p}% percentile latency: {v:.4f} s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"avg_latency": statistics.mean(lat), "latencies": lat,
                       "percentiles": dict(zip(map(str, [10, 25, 50, 75, 90, 99]), q.tolist()))}, f)
    return 0
