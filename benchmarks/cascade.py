"""Cascade inference on the CPU: share escalated, latency and agreement per threshold, one table.

    python benchmarks/cascade.py [--thresholds 0.3 0.5 0.6 0.7 0.8] [--num-prompts 24]
                                 [--max-tokens 48] [--small-quantization int4]

The embedded SmolLM2-135M-Instruct GGUF twice: the small model quantized (--small-quantization,
int4 weights by default) and the large one in bf16 (the same weights, dense). Fixed chat prompts
(servelm's sharegpt-like prompts' openings), greedy, batch of all prompts at once. For each
threshold on the small model's confidence (geometric mean of its sampled tokens'
probabilities): the share of requests escalated, the wall time per request of the whole batch
(small pass + large pass on the escalated ones), and the agreement of the answers with the large
model alone (whole answer identical; and the mean share of tokens matching before the first
difference), next to the large model alone and the small model alone.

    python benchmarks/cascade.py --gpu-presets llama-3.2-1b llama-3-8b [--one-at-a-time]

On a GPU, two dummy-weight presets sharing the device (the speed side: thresholds at quantiles
of the small model's confidences, --quantiles, escalate those shares; gpu_cascade's docstring).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPICS = ["how tides work", "the causes of the French Revolution", "a recipe for pancakes",
          "why the sky is blue", "how to learn a new language", "the water cycle",
          "what a black hole is", "how vaccines work", "tips for a job interview",
          "the history of the bicycle", "how a compiler works", "photosynthesis",
          "the rules of chess", "why exercise matters", "how bees make honey",
          "the plot of Hamlet", "how to save money", "what DNA is", "how airplanes fly",
          "the benefits of reading", "how volcanoes erupt", "what inflation is",
          "how to write a good email", "the life of Marie Curie"]


def gpu_cascade(small: str, large: str, num_prompts: int, max_tokens: int,
                one_at_a_time: bool, quantiles: list[float]) -> None:
    """Two dummy-weight presets on one GPU (each engine half of the memory): confidence means
    nothing with dummy weights, so the thresholds are set at quantiles of the small model's
    measured confidences, which escalates that share of the requests; the speed side only."""
    import statistics
    from benchmarks.gpu_suite import random_prompts
    from servelm import SamplingParams
    from servelm.cascade import CascadeLLM
    from servelm.loader import preset_config
    vocab = preset_config(small).vocab_size
    prompts = [{"prompt_token_ids": p}
               for p in random_prompts(num_prompts, [128] * num_prompts, 0, vocab)]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    common = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048,
                  gpu_memory_utilization=0.45, enable_prefix_caching=False)
    cascade = CascadeLLM(small, large, 0.0, **common)
    for llm in (cascade.small, cascade.large):  # warm-up
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)

    def run(fn):
        t = time.perf_counter()
        outs = [o for p in prompts for o in fn([p])] if one_at_a_time else fn(prompts)
        return outs, time.perf_counter() - t

    _, t_large = run(lambda ps: cascade.large.generate(ps, sp, use_tqdm=False))
    res, t_small = run(lambda ps: cascade.generate(ps, sp))
    conf = sorted(r.confidence for r in res)
    rows = [("small alone (threshold 0)", 0.0, t_small)]
    for q in quantiles:
        thr = conf[min(len(conf) - 1, int(q * len(conf)))]
        cascade.config = type(cascade.config)(thr, cascade.config.criterion)
        res, dt = run(lambda ps: cascade.generate(ps, sp))
        esc = sum(r.model == "large" for r in res) / len(res)
        rows.append((f"cascade, threshold at the {q:.2f} quantile", esc, dt))
    cascade.shutdown()
    n = len(prompts)
    how = "one after another" if one_at_a_time else "at once"
    print(f"\nGPU cascade: small = {small}, large = {large}, dummy bf16, one GPU (each engine "
          f"gpu_memory_utilization 0.45); {n} prompts of 128 tokens {how}, {max_tokens} new "
          f"tokens; confidences {statistics.median(conf):.3g} median")
    print(f"| configuration | escalated | s per request ({how}) | vs large alone |\n"
          "|---|---|---|---|")
    print(f"| large alone | 1.00 | {t_large / n:.4f} | 1.00x |")
    for label, esc, dt in rows:
        print(f"| {label} | {esc:.2f} | {dt / n:.4f} | {dt / t_large:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--small-quantization", default="int4")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="send the prompts one after another (batch 1: latency per request)")
    ap.add_argument("--gpu-presets", nargs=2, metavar=("SMALL", "LARGE"), default=None,
                    help="GPU, dummy weights: the speed side with two presets")
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    args = ap.parse_args()
    if args.gpu_presets:
        gpu_cascade(*args.gpu_presets, args.num_prompts, args.max_tokens, args.one_at_a_time,
                    args.quantiles)
        return
    from servelm import SamplingParams
    from servelm.cascade import CascadeLLM
    prompts_text = [f"Explain {TOPICS[i % len(TOPICS)]} in a few sentences."
                    for i in range(args.num_prompts)]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    common = dict(device="cpu", enable_prefix_caching=False)
    # threshold 0: never escalate, so one cascade object serves every threshold's small pass
    cascade = CascadeLLM(None, None, 0.0, small_args={"quantization": args.small_quantization},
                         large_args={"dtype": "bfloat16", "quantization": "none"}, **common)
    tok = cascade.large.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}],
                                       add_generation_prompt=True, tokenize=False)
               for t in prompts_text]
    prompts = [{"prompt": p} for p in prompts]
    for llm in (cascade.small, cascade.large):  # warm-up
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    def run(fn):
        """fn(prompts) -> outputs, over all prompts at once or one after another; (outputs,
        seconds)."""
        t = time.perf_counter()
        outs = ([o for p in prompts for o in fn([p])] if args.one_at_a_time else fn(prompts))
        return outs, time.perf_counter() - t

    large, t_large = run(lambda ps: cascade.large.generate(ps, sp, use_tqdm=False))
    large_ids = [o.outputs[0].token_ids for o in large]

    def agreement(ids_list):
        same = sum(a == b for a, b in zip(ids_list, large_ids)) / len(large_ids)
        pref = []
        for a, b in zip(ids_list, large_ids):
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            pref.append(k / max(1, len(b)))
        return same, sum(pref) / len(pref)

    rows = []
    for thr in [0.0] + args.thresholds:
        cascade.config = type(cascade.config)(thr, cascade.config.criterion)
        res, dt = run(lambda ps: cascade.generate(ps, sp))
        ids = [r.output.outputs[0].token_ids for r in res]
        esc = sum(r.model == "large" for r in res) / len(res)
        rows.append((thr, esc, dt, *agreement(ids)))
        print(f"threshold {thr}: escalated {esc:.2f}, {dt:.1f} s", flush=True)
    cascade.shutdown()
    n = len(prompts)
    how = "one after another" if args.one_at_a_time else "at once"
    print(f"\nSmolLM2-135M-Instruct: small = {args.small_quantization} weights, large = bf16; "
          f"{n} chat prompts {how}, greedy, {args.max_tokens} tokens; 2-core CPU")
    print(f"| configuration | escalated | s per request ({how}) | vs large alone | "
          "answers identical to large | mean matching prefix |\n|---|---|---|---|---|---|")
    print(f"| large alone | 1.00 | {t_large / n:.3f} | 1.00x | 1.00 | 1.00 |")
    for thr, esc, dt, same, pref in rows:
        label = "small alone (threshold 0)" if thr == 0 else f"cascade, threshold {thr}"
        print(f"| {label} | {esc:.2f} | {dt / n:.3f} | {dt / t_large:.2f}x | {same:.2f} | "
              f"{pref:.2f} |")


if __name__ == "__main__":
    main()
