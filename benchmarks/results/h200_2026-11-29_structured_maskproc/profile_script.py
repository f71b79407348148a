"""Per-step host breakdown of B=256 JSON-constrained decode (and plain), by wrappers."""
import collections, statistics, sys, time
sys.path.insert(0, "benchmarks")
from structured_bench import PROMPT, TPOT_SCHEMA
from servelm import SamplingParams, StructuredOutputsParams
from servelm.config import EngineArgs
from servelm.engine.engine import Engine
import servelm.engine.core as core_mod
import servelm.worker.model_runner as mr
import servelm.structured_output.processor as P
import servelm.sampling.sampler as S

acc = collections.defaultdict(float)
def wrap(obj, name, key):
    f = getattr(obj, name)
    def w(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t0
    setattr(obj, name, w)
wrap(core_mod.Scheduler, "schedule", "schedule")
wrap(core_mod.Scheduler, "update", "sched_update")
wrap(core_mod.EngineCore, "_land", "land")
wrap(mr.ModelRunner, "execute_async", "execute")
wrap(mr._DeferredStep, "flush", "flush")
wrap(P.GrammarLogitsProcessor, "prepare", "prepare")
wrap(P.GrammarLogitsProcessor, "apply", "apply")
wrap(P.GrammarLogitsProcessor, "update", "proc_update")
wrap(P.GrammarLogitsProcessor, "_landed_ops", "landed_ops")
wrap(S.Sampler, "__call__", "sampler")

mode = sys.argv[1] if len(sys.argv) > 1 else "on"
engine = Engine.from_engine_args(EngineArgs(
    model="devscripts/smol8b", load_format="dummy", max_model_len=1024, max_num_seqs=256,
    structured_outputs_config={"mask_process": mode == "on"}))
so = StructuredOutputsParams(json=TPOT_SCHEMA)
def run(constrained, B=256, T=96):
    stamp = time.time_ns()
    for i in range(B):
        engine.add_request(f"{stamp}-{i}", PROMPT, SamplingParams(
            temperature=0.8, seed=i, max_tokens=T, ignore_eos=True,
            structured_outputs=so if constrained else None))
    rows = []
    svc = None
    while engine.has_unfinished_requests():
        acc.clear()
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        sched = engine.core.scheduler
        if sum(1 for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens) == B and not sched.waiting:
            d = dict(acc); d["step"] = dt
            b = engine.core.grammars._backend
            if constrained and mode == "on" and b is not None and b.done():
                svc = b.result(); d["child_busy"] = svc.busy_s; d["mask_wait"] = svc.wait_s
            rows.append(d)
    return rows
run(True, 4, 16); run(False, 4, 16)
for rep in range(3):
    for constrained in (False, True):
        rows = run(constrained)
        keys = sorted({k for r in rows for k in r})
        steps = sorted(r["step"] for r in rows)
        cut = statistics.median(steps)
        print(f"\n{mode} {'json' if constrained else 'plain'} rep {rep}: {len(rows)} steps, median {1e3*cut:.2f} ms")
        fast = [r for r in rows if r["step"] <= 1.1 * steps[0]]
        slow = [r for r in rows if r["step"] > 1.2 * steps[0]]
        print(f"  {'key':14s} {'all':>7s} {'fast':>7s} {'slow':>7s}  (ms medians; fast n={len(fast)} slow n={len(slow)})")
        for k in keys:
            m = lambda rs: 1e3 * statistics.median([r.get(k, 0.0) for r in rs]) if rs else float('nan')
            print(f"  {k:14s} {m(rows):7.2f} {m(fast):7.2f} {m(slow):7.2f}")
