"""A mixture-of-experts model on one GPU against its roofline and transformers, one table.

    python benchmarks/moe_suite.py [--preset qwen3-30b-a3b] [--repeat 3] [--hf]

Dummy bf16 weights of the preset's shape, random prompt ids, ignore_eos; each run a fresh
process. B1: batch-1 decode (128 prompt tokens, 256 new; tokens 2..256 over their time) against
the roofline of the bytes a decode token actually reads: attention and router weights, the
top-k experts' weights only (not all experts), the final norm and lm_head (not the embedding
table), at the device-to-device copy bandwidth measured in the same run. B2: --num-requests of
256 in / 256 out, all at once. --hf adds transformers in the same run (B1, and generate_batch
on --hf-subset of B2's requests).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def active_bytes_per_token(cfg, bytes_per_param: int = 2) -> float:
    """Weights one decode token reads: per layer q/k/v/o, the router, k experts' gate/up/down
    (or the dense MLP of a dense layer), two norms; then the final norm and the lm_head."""
    from servelm.models.moe import MoEArgs
    m = MoEArgs.from_hf(cfg)
    H, D = cfg.hidden_size, cfg.head_dim
    attn = H * D * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    total = 0
    for layer in range(cfg.num_hidden_layers):
        if m.is_sparse(layer):
            ffn = m.num_experts * H + m.top_k * 3 * H * m.expert_intermediate_size
            ffn += 3 * H * m.shared_expert_intermediate_size
        else:
            ffn = 3 * H * cfg.intermediate_size
        total += attn + ffn + 2 * H
    total += H + H * cfg.vocab_size
    return total * bytes_per_param


def child(preset: str, num_requests: int) -> dict:
    import torch

    from benchmarks.gpu_suite import copy_bandwidth, random_prompts, run_offline
    from servelm import LLM, SamplingParams
    from servelm.loader import preset_config
    cfg = preset_config(preset)
    out: dict = {"copy_bw_TBps": copy_bandwidth() / 1e12,
                 "active_GB": active_bytes_per_token(cfg) / 1e9}
    torch.cuda.empty_cache()
    llm = LLM(preset, load_format="dummy", max_model_len=2048, seed=0, skip_tokenizer_init=True)
    b1 = random_prompts(1, [128], 0, cfg.vocab_size)[0]
    greedy = dict(temperature=0, ignore_eos=True)
    llm.generate([b1], SamplingParams(max_tokens=16, **greedy), use_tqdm=False)
    runs = []
    for _ in range(3):
        o = llm.generate([b1], SamplingParams(max_tokens=256, **greedy), use_tqdm=False)[0]
        runs.append(255 / (o.metrics.last_token_time - o.metrics.first_token_time))
    out["b1_tok_s"] = statistics.median(runs)
    b2 = random_prompts(num_requests, [256] * num_requests, 1, cfg.vocab_size)
    r = run_offline(llm, b2, [256] * num_requests, "B2")
    out["b2_req_s"], out["b2_out_tok_s"] = r["req_s"], r["out_tok_s"]
    print("RESULT", json.dumps(out), flush=True)
    llm.engine.core.shutdown()
    return out


def hf_child(preset: str, num_requests: int, subset: int) -> dict:
    from benchmarks.gpu_suite import hf_baseline, random_prompts
    from servelm.loader import preset_config
    cfg = preset_config(preset)
    b1 = random_prompts(1, [128], 0, cfg.vocab_size)[0]
    b2 = random_prompts(num_requests, [256] * num_requests, 1, cfg.vocab_size)[:subset]
    r = hf_baseline(cfg, b1, b2, 256, 64)
    print("RESULT", json.dumps(r), flush=True)
    return r


def _run(args: list[str], timeout: int) -> dict | None:
    from benchmarks.gpu_suite import run_child
    return run_child(__file__, args, timeout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--hf-subset", type=int, default=50)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--child", choices=["servelm", "hf"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "servelm":
        child(args.preset, args.num_requests)
        return
    if args.child == "hf":
        hf_child(args.preset, args.num_requests, args.hf_subset)
        return
    common = ["--preset", args.preset, "--num-requests", str(args.num_requests),
              "--hf-subset", str(args.hf_subset)]
    ours, hf = [], []
    for i in range(args.repeat):
        r = _run(["--child", "servelm"] + common, args.timeout)
        if r:
            ours.append(r)
            print(f"run {i} servelm: {r}", flush=True)
        if args.hf:
            r = _run(["--child", "hf"] + common, args.timeout)
            if r:
                hf.append(r)
                print(f"run {i} transformers: {r}", flush=True)
    if not ours:
        raise SystemExit("no servelm run finished")
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    roof = med(ours, "copy_bw_TBps") * 1e12 / (med(ours, "active_GB") * 1e9)
    print(f"\n{args.preset}, dummy bf16, medians of {len(ours)} fresh runs; a decode token reads "
          f"{med(ours, 'active_GB'):.2f} GB (active experts only), copy bandwidth "
          f"{med(ours, 'copy_bw_TBps'):.2f} TB/s")
    print("| figure | servelm | transformers | ratio | roofline |\n|---|---|---|---|---|")
    hb1 = med(hf, "b1_tok_s") if hf else float("nan")
    print(f"| B1 tok/s | {med(ours, 'b1_tok_s'):.1f} | {hb1:.1f} | "
          f"{med(ours, 'b1_tok_s') / hb1:.2f}x | {100 * med(ours, 'b1_tok_s') / roof:.0f}% of "
          f"{roof:.0f} |")
    hb2 = med(hf, "b2_subset_out_tok_s") if hf else float("nan")
    print(f"| B2 out tok/s ({args.num_requests} requests; transformers {args.hf_subset}) | "
          f"{med(ours, 'b2_out_tok_s'):.0f} | {hb2:.0f} | {med(ours, 'b2_out_tok_s') / hb2:.2f}x | |")
    print(f"| B2 req/s | {med(ours, 'b2_req_s'):.2f} | | | |")


if __name__ == "__main__":
    main()
