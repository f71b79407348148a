"""Speculative decoding on one GPU, speculation on vs off in the same process: one table.

    python benchmarks/spec_gpu.py                    # every part, 3 fresh processes each
    python benchmarks/spec_gpu.py --parts tree --repeat 1
    python benchmarks/spec_gpu.py --parts b1 draft --repeat 1

Llama-3-8B-shaped dummy bf16 weights. Random weights make acceptance meaningless, so drafts
replay the target's own greedy trajectory (recorded by the run with speculation off, on the
same prompts), each draft token independently replaced by another with probability
1 - acceptance: per-token acceptance 0.6 / 0.8 / 0.9 (the measured mean acceptance length is
reported beside). Parts, each in a fresh process, each measuring its own baseline:
  b1     batch 1 (128 in / 256 out, 3 prompts): off, then replayed drafts (no draft cost), k=4
  draft  the same with a Llama-3.2-1B-shaped dummy draft model that runs in full (its KV,
         its k passes) before its proposals are replaced by the replayed ones
  load   replayed drafts (acceptance 0.8) with 64 and 256 requests at once: off, speculation
         with the adaptive gate, and without it (drafting at every step)
  ngram  1000 requests at once whose prompts repeat a span (n-gram finds drafts): off, n-gram
         with the gate, n-gram without it
  tree   a [2, 2, 1, 1] token tree from the 1B dummy draft, batch 1: ms per verification step
         with the target's tree CUDA graphs and without (acceptance is meaningless here)
Decode speed at batch 1: (tokens - 1) / (last token - first token); under load, output tokens
per second of wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from servelm.spec_decode.proposer import Proposer, ProposerInput  # noqa: E402

PRESET, DRAFT = "llama-3-8b", "llama-3.2-1b"
K, PROMPT_LEN, OUT_LEN = 4, 128, 256


class ReplayProposer(Proposer):
    """Drafts: the recorded greedy continuation of a request's prompt, each token replaced
    with probability 1 - acceptance (by its own seeded draw: reproducible). With `inner`, that
    proposer runs first (its whole cost paid, its KV kept) and its drafts are discarded."""

    def __init__(self, vocab: int, inner: Proposer | None = None) -> None:
        self.vocab, self.inner = vocab, inner
        # prompt bytes -> (trajectory [L], uniform draws [L, K], replacement offsets [L, K]):
        # the draws are made once per trajectory (proposing is then a few slices a request)
        self.trajectories: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.acceptance = 0.8

    def load(self, ctx) -> None:
        pass

    def record(self, prompt: list[int], output: list[int]) -> None:
        key = np.asarray(prompt, dtype=np.int32).tobytes()
        rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
        L = len(output)
        self.trajectories[key] = (np.asarray(output, dtype=np.int64), rng.random((L, K)),
                                  1 + rng.integers(0, self.vocab - 1, (L, K)))

    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        if self.inner is not None:
            self.inner.propose(batch)
        out = {}
        for rid, toks in zip(batch.req_ids, batch.token_ids):
            rec = self.trajectories.get(toks[:PROMPT_LEN].tobytes())
            m = len(toks) - PROMPT_LEN  # outputs so far: the drafts replay traj[m:m+K]
            if rec is None or m >= len(rec[0]):
                continue
            traj, u, shift = rec
            d = traj[m:m + K].copy()
            bad = u[m, :len(d)] >= self.acceptance
            d[bad] = (d[bad] + shift[m, :len(d)][bad]) % self.vocab
            out[rid] = d.tolist()
        return out


def prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(0, vocab, PROMPT_LEN).tolist() for _ in range(n)]


def repeated_span_prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    """A 32-token span said 6 times with 16 fresh tokens between: 288 tokens."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        span = g.integers(0, vocab, 32).tolist()
        p = []
        for _ in range(6):
            p += span + g.integers(0, vocab, 16).tolist()
        out.append(p)
    return out


def decode_tok_s(o) -> float:
    m, n = o.metrics, len(o.outputs[0].token_ids)
    return (n - 1) / (m.last_token_time - m.first_token_time)


def mean_acc_len(llm, before: dict) -> float | None:
    s = llm.spec_decode_stats()
    n = s["num_drafts"] - before["num_drafts"]
    return 1 + (s["num_accepted_tokens"] - before["num_accepted_tokens"]) / n if n else None


def engine(args, spec: dict, **kw):
    """The engine, every CUDA graph captured (the target's and a draft model's; a server
    captures the ones it skipped at start-up in idle time): no first-use capture in a run."""
    from servelm import LLM
    llm = LLM(args.preset, load_format="dummy", seed=0, skip_tokenizer_init=True,
              speculative_config=spec, **kw)
    while llm.engine.core.executor.runner.capture_pending_graph():
        pass
    return llm


def settle(llm, replay: ReplayProposer, ps: list, sp, rounds: int) -> None:
    """Re-record the trajectories as the speculative run itself produces them. In bf16 a
    verification step's multi-token matmuls round differently from one-token steps, so a
    random model's near-ties can flip and the run leave the recorded trajectory, after which
    replayed drafts are all wrong. The corruption is seeded per position, so a run with the
    same trajectory repeats its step structure: after a few rounds the trajectory is the
    speculative run's own, and the set acceptance holds to the end."""
    for _ in range(rounds):
        for p, o in zip(ps, llm.generate(ps, sp, use_tqdm=False)):
            replay.record(p, o.outputs[0].token_ids)


class Breakdown:
    """Where a speculative step's time goes: wall ms per step in the scheduler, the input
    build, the target's forward (verification), the host-side acceptance, the proposer, the
    rest; each timed between CUDA synchronisations (so the run is slightly slower)."""

    def __init__(self, llm) -> None:
        import torch
        import servelm.worker.model_runner as mr
        core = llm.engine.core
        runner = core.executor.runner
        self.ms: dict[str, float] = {}
        self.steps = 0
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def wrap(obj, name, label):
            fn = getattr(obj, name)

            def timed(*a, **k):
                sync()
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    sync()
                    self.ms[label] = self.ms.get(label, 0.0) + 1e3 * (time.perf_counter() - t)
            setattr(obj, name, timed)
        wrap(core, "step", "step")
        wrap(core.scheduler, "schedule", "schedule")
        wrap(core.scheduler, "update", "update")
        wrap(runner, "_prepare_inputs", "prepare inputs")
        if runner.graphs is not None:
            wrap(runner.graphs, "run", "target forward (graph)")
        if getattr(runner, "tree_graphs", None) is not None:
            wrap(runner.tree_graphs, "run", "target forward (tree graph)")
        wrap(runner, "_forward", "target forward (eager)")
        wrap(mr, "collect_verified", "accept (host)")
        wrap(runner.proposer, "propose", "propose")
        if getattr(runner.proposer, "inner", None) is not None:
            wrap(runner.proposer.inner, "propose", "draft model")

    def table(self) -> dict:
        n = max(1, int(self.ms.get("_steps", 0)))
        return {k: v / n for k, v in self.ms.items() if not k.startswith("_")}


def part_b1(args, draft: bool) -> dict:
    from servelm import SamplingParams
    spec = ({"method": "draft_model", "model": args.draft, "num_speculative_tokens": K}
            if draft else {"method": "ngram", "num_speculative_tokens": K})
    llm = engine(args, spec, max_model_len=2048)
    runner = llm.engine.core.executor.runner
    V = runner.config.model.vocab_size
    replay = ReplayProposer(V, inner=runner.proposer if draft else None)
    sp = SamplingParams(temperature=0, max_tokens=OUT_LEN, ignore_eos=True)
    ps = prompts(args.prompts + 1, 0, V)
    rates = (0.6, 0.8, 0.9) if not draft else (0.8,)
    res = {"off": [], **{f"a{a}": [] for a in rates}, **{f"a{a}_mal": [] for a in rates}}
    for i, p in enumerate(ps):  # the first prompt warms up (compiles), unmeasured
        runner.proposer = None
        o = llm.generate([p], sp, use_tqdm=False)[0]
        off_traj = o.outputs[0].token_ids
        if i:
            res["off"].append(decode_tok_s(o))
        runner.proposer = replay
        for a in rates:
            replay.acceptance = a
            replay.record(p, off_traj)
            settle(llm, replay, [p], sp, args.settle)
            before = llm.spec_decode_stats()
            o = llm.generate([p], sp, use_tqdm=False)[0]
            if i:
                res[f"a{a}"].append(decode_tok_s(o))
                res[f"a{a}_mal"].append(mean_acc_len(llm, before))
    # one more run at acceptance 0.8, timed part by part, drafting at every step (the gate
    # would mix in plain steps, whose time this per-verification figure must not count)
    replay.acceptance = 0.8
    runner.gate = None
    bd = Breakdown(llm)
    before = llm.spec_decode_stats()
    llm.generate([ps[-1]], sp, use_tqdm=False)
    bd.ms["_steps"] = llm.spec_decode_stats()["num_drafts"] - before["num_drafts"]
    res["breakdown_ms_per_spec_step"] = bd.table()
    return res


def part_load(args) -> dict:
    from servelm import SamplingParams
    llm = engine(args, {"method": "ngram", "num_speculative_tokens": K}, max_model_len=2048)
    runner = llm.engine.core.executor.runner
    V = runner.config.model.vocab_size
    replay, gate = ReplayProposer(V), runner.gate
    replay.acceptance = 0.8
    sp = SamplingParams(temperature=0, max_tokens=OUT_LEN, ignore_eos=True)
    res = {}
    for batch in args.load_batches:
        ps = prompts(batch, batch, V)
        runner.proposer = None
        llm.generate(ps[:8], sp, use_tqdm=False)  # warm-up
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        res[f"{batch}_off"] = batch * OUT_LEN / (time.perf_counter() - t)
        for p, o in zip(ps, outs):
            replay.record(p, o.outputs[0].token_ids)
        runner.proposer = replay
        settle(llm, replay, ps, sp, args.settle)
        for name, g in (("gate", gate), ("always", None)):
            runner.gate = g
            before = llm.spec_decode_stats()
            t = time.perf_counter()
            llm.generate(ps, sp, use_tqdm=False)
            res[f"{batch}_{name}"] = batch * OUT_LEN / (time.perf_counter() - t)
            res[f"{batch}_{name}_mal"] = mean_acc_len(llm, before)
        runner.gate = gate
    return res


def part_ngram(args) -> dict:
    from servelm import SamplingParams
    llm = engine(args, {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2,
                        "prompt_lookup_max": 4}, max_model_len=2048)
    runner = llm.engine.core.executor.runner
    V = runner.config.model.vocab_size
    ngram, gate = runner.proposer, runner.gate
    ps = repeated_span_prompts(args.ngram_requests, 3, V)
    sp = SamplingParams(temperature=0, max_tokens=OUT_LEN, ignore_eos=True)
    res = {}
    for name, prop, g in (("off", None, None), ("gate", ngram, gate), ("always", ngram, None)):
        runner.proposer, runner.gate = prop, g
        llm.generate(ps[:16], sp, use_tqdm=False)  # warm-up
        before = llm.spec_decode_stats()
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        res[name] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
        res[f"{name}_mal"] = mean_acc_len(llm, before) if prop else None
    return res


def part_tree(args) -> dict:
    """A token tree [2, 2, 1, 1] (14 nodes) drafted by the 1B dummy draft, verified with and
    without the tree CUDA graphs: ms per verification step, whole and the target's forward
    (random weights: the draft's branches are rejected, acceptance means nothing here)."""
    from servelm import SamplingParams
    spec = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": K,
            "tree": [2, 2, 1, 1], "adaptive": False}
    llm = engine(args, spec, max_model_len=2048)
    runner = llm.engine.core.executor.runner
    V = runner.config.model.vocab_size
    tg = runner.tree_graphs
    bd = Breakdown(llm)
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    res = {}
    for name, g in (("warm-up", tg), ("graph", tg), ("eager", None)):
        runner.tree_graphs = g
        bd.ms.clear()
        before = llm.spec_decode_stats()
        for p in prompts(args.prompts, 11, V):  # batch 1: a verification per step
            llm.generate([p], sp, use_tqdm=False)
        steps = max(1, llm.spec_decode_stats()["num_drafts"] - before["num_drafts"])
        if name != "warm-up":
            res[name] = {k: v / steps for k, v in bd.ms.items()}
    return res


PARTS = {"b1": lambda a: part_b1(a, False), "draft": lambda a: part_b1(a, True),
         "load": part_load, "ngram": part_ngram, "tree": part_tree}


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _med(runs: list, key: str):
    vals = []
    for r in runs:
        v = r.get(key)
        vals += v if isinstance(v, list) else [v]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per part")
    ap.add_argument("--prompts", type=int, default=3, help="batch-1 prompts per process")
    ap.add_argument("--ngram-requests", type=int, default=1000)
    ap.add_argument("--load-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--settle", type=int, default=2, help="trajectory re-recording rounds")
    # smaller shapes for a smoke run (e.g. smollm2-135m on the CPU)
    ap.add_argument("--preset", default=PRESET, help=argparse.SUPPRESS)
    ap.add_argument("--draft", default=DRAFT, help=argparse.SUPPRESS)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one part, print JSON
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.one:
        print("RESULT", json.dumps(PARTS[args.one](args)), flush=True)
        return
    results: dict = {}
    for part in args.parts:
        results[part] = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--one", part, "--prompts", str(args.prompts),
                   "--ngram-requests", str(args.ngram_requests), "--preset", args.preset,
                   "--draft", args.draft, "--settle", str(args.settle),
                   "--load-batches", *map(str, args.load_batches)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{part} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}", flush=True)
                break
            results[part].append(json.loads(line[0][7:]))
            print(part, line[0][7:], flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    rows = []
    if results.get("b1"):
        r = results["b1"]
        off = _med(r, "off")
        rows.append(("batch 1, off", f"{off:.1f}", "1.00x", "-"))
        for a in (0.6, 0.8, 0.9):
            v = _med(r, f"a{a}")
            rows.append((f"batch 1, replayed drafts, acceptance {a}", f"{v:.1f}",
                         f"{v / off:.2f}x", _f(_med(r, f"a{a}_mal"))))
    if results.get("draft"):
        r = results["draft"]
        off, v = _med(r, "off"), _med(r, "a0.8")
        rows.append(("batch 1, off (draft-model engine)", f"{off:.1f}", "1.00x", "-"))
        rows.append((f"batch 1, {args.draft} draft run in full, replayed 0.8", f"{v:.1f}",
                     f"{v / off:.2f}x", _f(_med(r, "a0.8_mal"))))
    if results.get("load"):
        r = results["load"]
        for b in args.load_batches:
            off = _med(r, f"{b}_off")
            rows.append((f"{b} at once, off", f"{off:.0f}", "1.00x", "-"))
            for name in ("gate", "always"):
                v = _med(r, f"{b}_{name}")
                label = "adaptive gate" if name == "gate" else "drafting every step"
                rows.append((f"{b} at once, replayed 0.8, {label}", f"{v:.0f}",
                             f"{v / off:.2f}x", _f(_med(r, f"{b}_{name}_mal"))))
    if results.get("ngram"):
        r = results["ngram"]
        off = _med(r, "off")
        rows.append((f"{args.ngram_requests} repeated-span prompts at once, off", f"{off:.0f}",
                     "1.00x", "-"))
        for name in ("gate", "always"):
            v, mal = _med(r, name), _med(r, f"{name}_mal")
            label = "adaptive gate" if name == "gate" else "drafting every step"
            rows.append((f"... n-gram, {label}", f"{v:.0f}", f"{v / off:.2f}x", _f(mal)))
    for r in results.get("tree", []):
        print("\ntree [2, 2, 1, 1] with the 1B draft: ms per verification step, CUDA graph vs "
              "eager")
        for k in sorted(set(r["graph"]) | set(r["eager"]), key=lambda k: -r["eager"].get(k, 0)):
            print(f"  {k:28s} {r['graph'].get(k, 0.0):7.2f} {r['eager'].get(k, 0.0):7.2f}")
    for part in ("b1", "draft"):
        runs = [r["breakdown_ms_per_spec_step"] for r in results.get(part, [])
                if "breakdown_ms_per_spec_step" in r]
        if runs:
            keys = sorted({k for r in runs for k in r}, key=lambda k: -runs[0].get(k, 0))
            print(f"\n{part}: ms per verification step (acceptance 0.8, timed between CUDA "
                  "synchronisations; median over processes)")
            for k in keys:
                print(f"  {k:28s} {statistics.median(r.get(k, 0.0) for r in runs):7.2f}")
    print(f"\n{args.preset} dummy bf16, k={K}, {PROMPT_LEN} in / {OUT_LEN} out, greedy; medians of "
          f"{args.repeat} fresh processes")
    print("| run | tok/s | vs off | mean acceptance length |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
