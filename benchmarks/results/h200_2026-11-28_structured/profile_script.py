# where a constrained step's host time goes (B=256, 8B dummy with SmolLM2's vocab)
import sys, time, statistics, collections
sys.path.insert(0, "benchmarks")
import torch
import structured_bench as sb
import servelm.structured_output.processor as P
from servelm.worker import model_runner as MR
acc = collections.defaultdict(float); cnt = collections.Counter()
def wrap(obj, name, key):
    f = getattr(obj, name)
    def w(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[key] += time.perf_counter() - t; cnt[key] += 1; return r
    setattr(obj, name, w)
wrap(P.GrammarLogitsProcessor, "fill", "fill")
wrap(P.GrammarLogitsProcessor, "_land", "land")
wrap(P.GrammarLogitsProcessor, "apply", "apply")
wrap(P.GrammarLogitsProcessor, "update", "update")
wrap(MR.ModelRunner, "execute_async", "execute_async")
wrap(MR.ModelRunner, "_prepare_inputs", "prepare_inputs")
from servelm.config import EngineArgs
from servelm.engine.engine import Engine
from servelm import SamplingParams, StructuredOutputsParams
e = Engine.from_engine_args(EngineArgs(model="devscripts/smol8b", load_format="dummy", max_model_len=1024, max_num_seqs=256))
so = StructuredOutputsParams(json=sb.TPOT_SCHEMA)
for mode in ["plain", "json", "plain", "json"]:
    mk = (lambda i: SamplingParams(temperature=0.8, seed=i, max_tokens=96, ignore_eos=True, structured_outputs=so if mode == "json" else None))
    acc.clear(); cnt.clear()
    t0 = time.perf_counter()
    ms, n = sb._step_times(e, mk, 256)
    tot = time.perf_counter() - t0
    print(mode, f"median step {ms:.2f} ms over {n} steps; total {tot*1e3:.0f} ms;", {k: f"{v*1e3/max(cnt[k],1):.2f}ms x{cnt[k]}" for k, v in acc.items()})
import cProfile, pstats
mk = (lambda i: SamplingParams(temperature=0.8, seed=i, max_tokens=96, ignore_eos=True, structured_outputs=so))
pr = cProfile.Profile(); pr.enable(); sb._step_times(e, mk, 256); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
