"""Multi-LoRA serving throughput and TTFT against the base model in the same run, one table.

    python benchmarks/lora.py                          # CPU: the embedded SmolLM2-135M
    python benchmarks/lora.py --gpu-preset llama-3-8b  # GPU: dummy Llama-3-8B weights

Adapters are random PEFT adapters of --rank on all seven linear projections of every layer
(servelm/lora/synthetic.py), written to a temporary directory; --distinct-files of them are
written and the adapter ids are spread over them round-robin (ids, not files, are what the
engine keys slots, host copies and the prefix cache by, so a run of 64 ids pages and computes
64 adapters). Each row is a B2-style offline run: --num-requests prompts of --prompt-len random
tokens, --output-len greedy tokens each, all submitted at once; each request takes an adapter
uniformly at random among the row's (seeded). TTFT: one --ttft-len-token prompt alone, median of
3 fresh prompts (no prefix hits). Rows: the base model (an engine without LoRA), then one engine
with --max-loras slots for 1, 8 (and on a GPU 64) adapters, then on a GPU one with 32 slots for
256 adapters (paging from host memory and disk).
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def b2(llm, reqs, out_len: int, loras) -> dict:
    from servelm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(reqs, sp, use_tqdm=False, lora_request=loras)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"req_s": len(reqs) / dt, "out_tok_s": n_out / dt, "seconds": dt}


def ttft(llm, length: int, vocab: int, lora, seed: int) -> float:
    from servelm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for i in range(3):
        p = prompts(1, length, seed + i, vocab)
        o = llm.generate(p, sp, use_tqdm=False, lora_request=lora)[0]
        times.append(o.metrics.first_token_time - o.metrics.arrival_time)
    return statistics.median(times)


def profile(llm, length: int, vocab: int, lora) -> None:
    """CUDA time by kernel of one prompt of ``length`` tokens with the adapter, then
    without: where a LoRA prefill's time goes."""
    import torch
    from servelm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for name, lo in (("with adapter", lora), ("base", None)):
        p = prompts(1, length, 999 if lo else 998, vocab)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(p, sp, use_tqdm=False, lora_request=lo)
        print(f"-- prefill of {length} tokens, {name}", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def shutdown(llm) -> None:
    """Stops llm's engine; the caller drops its last reference before the next engine."""
    llm.engine.core.shutdown()
    gc.collect()
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-preset", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--ttft-len", type=int, default=None)
    ap.add_argument("--distinct-files", type=int, default=16)
    ap.add_argument("--counts", type=int, nargs="+", default=None,
                    help="adapters per row (default: 1 8 on the CPU, 1 8 64 on a GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="print the CUDA time by kernel of a LoRA prefill and a base one")
    ap.add_argument("--paging", type=int, nargs=2, default=None, metavar=("ADAPTERS", "SLOTS"),
                    help="a paging row (default on a GPU: 256 adapters through 32 slots)")
    args = ap.parse_args()
    gpu = args.gpu_preset is not None
    n = args.num_requests or (1000 if gpu else 32)
    p_len, o_len = args.prompt_len or (256 if gpu else 128), args.output_len or (256 if gpu else 32)
    t_len = args.ttft_len or (2048 if gpu else 512)
    counts = args.counts or ([1, 8, 64] if gpu else [1, 8])
    paging = args.paging or ((256, 32) if gpu else None)
    if paging is not None and paging[0] == 0:  # --paging 0 0: no paging row
        paging = None

    from servelm import LLM, LoRARequest
    from servelm.lora.synthetic import write_random_adapter
    if gpu:
        import torch
        kw = dict(model=args.gpu_preset, load_format="dummy", skip_tokenizer_init=True,
                  max_model_len=max(4096, t_len + 16), seed=0)
        dtype = torch.bfloat16
        where = torch.cuda.get_device_name()
    else:
        import torch
        kw = dict(device="cpu", max_model_len=max(2048, t_len + 16))
        dtype = torch.float32
        where = "CPU"
    base = LLM(**kw)
    hf_config = base.engine.config.model.hf_config
    vocab = base.engine.config.model.vocab_size
    reqs = prompts(n, p_len, 1, vocab)
    rows = []
    t = time.perf_counter()
    r = b2(base, reqs, o_len, None)
    r["ttft_s"] = ttft(base, t_len, vocab, None, 100)
    rows.append(("base", r))
    print("base", r, f"({time.perf_counter() - t:.0f} s)", flush=True)
    shutdown(base)
    base = None  # (its KV cache and graphs freed before the next engine sizes its own)

    tmp = tempfile.mkdtemp(prefix="servelm-lora-bench-")
    most = max(counts + ([paging[0]] if paging else []))
    n_files = min(args.distinct_files, most)
    t = time.perf_counter()
    files = [write_random_adapter(os.path.join(tmp, f"a{i}"), hf_config, rank=args.rank,
                                  seed=i, dtype=dtype) for i in range(n_files)]
    print(f"wrote {n_files} adapters in {time.perf_counter() - t:.0f} s", flush=True)
    loras = [LoRARequest(f"lora{i}", i + 1, files[i % n_files]) for i in range(most)]

    def row_loras(k: int, seed: int) -> list:
        rng = random.Random(seed)
        return [loras[rng.randrange(k)] for _ in range(n)]

    slots = max(counts)
    llm = LLM(**kw, enable_lora=True, max_loras=slots, max_lora_rank=args.rank,
              max_cpu_loras=max(slots, n_files))
    # the LoRA kernels compile on first use (the start-up kernel warm-up does not know them
    # yet): a short untimed run over every adapter and a prompt of each size first
    t = time.perf_counter()
    warm = min(n, 4 * slots)
    b2(llm, reqs[:warm], 8, row_loras(slots, 0)[:warm])
    ttft(llm, t_len, vocab, loras[0], 300)
    print(f"LoRA warm-up {time.perf_counter() - t:.0f} s", flush=True)
    if args.profile:
        profile(llm, t_len, vocab, loras[0])
    for k in counts:
        t = time.perf_counter()
        r = b2(llm, reqs, o_len, row_loras(k, k))
        if k == 1:
            r["ttft_s"] = ttft(llm, t_len, vocab, loras[0], 200)
        rows.append((f"{k} adapter{'s' * (k > 1)}", r))
        print(k, r, f"({time.perf_counter() - t:.0f} s)", flush=True)
    shutdown(llm)
    llm = None
    if paging:
        k, s = paging
        llm = LLM(**kw, enable_lora=True, max_loras=s, max_lora_rank=args.rank,
                  max_cpu_loras=max(s, n_files * 2))
        r = b2(llm, reqs, o_len, row_loras(k, k))
        mgr = llm.engine.core.executor.runner.lora
        r["slot_loads"], r["disk_reads"] = mgr.num_slot_loads, mgr.num_disk_reads
        rows.append((f"{k} adapters, {s} slots", r))
        print(k, s, r, flush=True)
        shutdown(llm)

    b = rows[0][1]
    print(f"\nmulti-LoRA on {where} ({args.gpu_preset or 'SmolLM2-135M-Instruct'}), rank "
          f"{args.rank} on q/k/v/o/gate/up/down, {n} requests x {p_len} in / {o_len} out; "
          f"TTFT of one {t_len}-token prompt")
    print(f"| {'run':<22} | {'req/s':>7} | {'out tok/s':>9} | {'x base':>6} | {'TTFT ms':>8} |"
          f" {'x base':>6} |")
    print("|" + "|".join("-" * w for w in (24, 9, 11, 8, 10, 8)) + "|")
    for name, r in rows:
        tt = r.get("ttft_s")
        ms = "" if tt is None else f"{tt * 1e3:.1f}"
        ratio = "" if tt is None else f"{tt / b['ttft_s']:.2f}"
        print(f"| {name:<22} | {r['req_s']:7.2f} | {r['out_tok_s']:9.1f} | "
              f"{r['out_tok_s'] / b['out_tok_s']:6.2f} | {ms:>8} | {ratio:>6} |")
    if paging:
        r = rows[-1][1]
        print(f"paging: {r['slot_loads']} adapter loads into device slots, "
              f"{r['disk_reads']} reads from disk")


if __name__ == "__main__":
    main()
