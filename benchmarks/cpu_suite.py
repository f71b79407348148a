"""servelm on the CPU, side by side with transformers (and llama.cpp when llama-cpp-python is
installed), on the embedded SmolLM2-135M-Instruct GGUF.

    python benchmarks/cpu_suite.py [--new-tokens 128] [--batch 64]

Rows: batch-1 decode tok/s, and total output tok/s for a batch of prompts submitted at once.
servelm (fp32 and bf16) and transformers (fp32) run weights dequantized from the GGUF (fp32 is
token-identical to transformers); llama.cpp runs the Q4_1 file as is (its own numerics).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["Write a short story about a robot learning to paint.",
           "Explain how photosynthesis works in simple terms.",
           "List five tips for staying productive while working from home.",
           "What are the main differences between Python and C?"]


def servelm_rows(path: str, new: int, batch: int, dtype: str) -> dict:
    from servelm import LLM, SamplingParams
    llm = LLM(path, kv_cache_memory=1 << 30, dtype=dtype)
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=4), use_tqdm=False)
    runs = []
    for _ in range(3):
        o = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0]
        runs.append((new - 1) / (o.metrics.last_token_time - o.metrics.first_token_time))
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (variant {i})" for i in range(batch)]
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    return {"b1": statistics.median(runs), "batch": sum(len(o.outputs[0].token_ids) for o in outs) / dt}


def hf_rows(path: str, new: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        ids = tok(PROMPTS[0], return_tensors="pt")
        model.generate(**ids, max_new_tokens=4, **gen)
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            model.generate(**ids, max_new_tokens=new, **gen)
            runs.append(new / (time.perf_counter() - t))
        prompts = [PROMPTS[i % len(PROMPTS)] + f" (variant {i})" for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=new, **gen)
        dt = time.perf_counter() - t
    return {"b1": statistics.median(runs), "batch": batch * new / dt}


def llamacpp_rows(path: str, new: int, batch: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    msgs = [{"role": "user", "content": PROMPTS[0]}]  # a raw prompt ends at once (EOS) here
    runs = []
    for _ in range(3):
        stamps = []  # decode rate: first content chunk to last, like servelm's row
        for chunk in llm.create_chat_completion(msgs, max_tokens=new, temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"b1": statistics.median(runs), "batch": None}  # llama-cpp-python serves one at a time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    from servelm.loader import default_model_path
    path = default_model_path()
    res = {"servelm fp32": servelm_rows(path, args.new_tokens, args.batch, "float32"),
           "servelm bf16": servelm_rows(path, args.new_tokens, args.batch, "bfloat16")}
    if not args.skip_hf:
        res["transformers"] = hf_rows(path, args.new_tokens, args.batch)
    lc = llamacpp_rows(path, args.new_tokens, args.batch)
    if lc:
        res["llama.cpp"] = lc
    print(f"\nSmolLM2-135M-Instruct on CPU ({os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}), {args.new_tokens} new tokens")
    print(f"| engine | batch-1 decode tok/s | {args.batch} prompts, output tok/s |\n|---|---|---|")
    for k, v in res.items():
        b = "n/a" if v["batch"] is None else f"{v['batch']:.1f}"
        print(f"| {k} | {v['b1']:.1f} | {b} |")


if __name__ == "__main__":
    main()
