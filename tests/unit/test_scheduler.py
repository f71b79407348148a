"""The token-budget Scheduler driven by a fake model runner.

The fake runner keeps the runner's side of the contract (state from NewRequestData, diffs from
CachedRequestData, drops finished/preempted ids) and plays the model: it "writes" a key for every
computed token into its KV slot (the key is a chained hash of the token and everything before it)
and, before sampling, checks that every position the request attends to holds the right key. So a
wrong prefix-cache hit, a block shared while written, or a lost block shows up as a failed read.
A request whose computed tokens reach its token count gets one sampled token: a deterministic
function of its tokens, so outputs do not depend on batching or preemption. With a fake proposer,
requests get draft tokens that the fake runner writes into the KV like real ones and verifies
(keeping the accepted prefix and one more token), so a wrong roll-back of rejected drafts shows
up as a read of stale KV, and outputs must still match the plain reference.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

from servelm.config import CacheConfig, SchedulerConfig
from servelm.core.request import Request, RequestStatus
from servelm.core.scheduler import Scheduler
from servelm.core.slo import StepCostModel
from servelm.core.step import ModelRunnerOutput, NewRequestData, SchedulerOutput
from servelm.sampling.rejection import accept_by_match
from servelm.sampling_params import SamplingParams

EOS = 2


def next_token(token_ids: list[int]) -> int:
    """The fake model: deterministic in the sequence, never EOS (>= 10)."""
    return (sum(token_ids[-3:]) * 31 + 7 * len(token_ids)) % 1000 + 10


def _key(prev: Optional[int], tok: int) -> int:
    return hash((prev, tok))


@dataclass
class _State:
    token_ids: list[int]
    num_prompt: int
    block_ids: list[int]
    num_computed: int
    keys: list[int] = field(default_factory=list)  # chained key of each position

    def key(self, p: int, drafts: list[int] = ()) -> int:
        """Key of position p of token_ids + drafts (draft keys are never cached)."""
        n = len(self.token_ids)
        while len(self.keys) <= min(p, n - 1):
            prev = self.keys[-1] if self.keys else None
            self.keys.append(_key(prev, self.token_ids[len(self.keys)]))
        if p < n:
            return self.keys[p]
        k = self.keys[n - 1]
        for d in drafts[:p - n + 1]:
            k = _key(k, d)
        return k


def fake_proposer(rid: str, toks: list[int]) -> list[int]:
    """Three drafts, right (the fake model's next tokens) or wrong by a fixed pattern."""
    out, seq = [], list(toks)
    for j in range(3):
        t = next_token(seq)
        if (len(toks) * 7 + j + len(rid)) % 4 == 0:
            t += 1  # a wrong draft: it and the ones after it get rejected
        out.append(t)
        seq.append(t)
    return out


class FakeRunner:
    def __init__(self, block_size: int,
                 policy: Optional[Callable[[str, list[int], int], int]] = None,
                 proposer: Optional[Callable[[str, list[int]], list[int]]] = None) -> None:
        self.bs = block_size
        self.policy = policy or (lambda rid, toks, n_prompt: next_token(toks))
        self.proposer = proposer
        self.states: dict[str, _State] = {}
        self.kv: dict[int, int] = {}  # slot -> key
        self.host: dict[int, int] = {}  # host slot -> key (swap preemption)

    def _slot(self, st: _State, p: int) -> int:
        return st.block_ids[p // self.bs] * self.bs + p % self.bs

    def _copy_blocks(self, src: dict[int, int], dst: dict[int, int],
                     pairs: list[tuple[int, int]]) -> None:
        for a, b in pairs:
            for o in range(self.bs):
                if a * self.bs + o in src:
                    dst[b * self.bs + o] = src[a * self.bs + o]
                else:
                    dst.pop(b * self.bs + o, None)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        # swaps before the forward, outs first, then copy-on-write copies (the runner's order)
        self._copy_blocks(self.kv, self.host, so.blocks_to_swap_out)
        self._copy_blocks(self.host, self.kv, so.blocks_to_swap_in)
        self._copy_blocks(self.kv, self.kv, so.blocks_to_copy)
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.states.pop(rid, None)
        for nr in so.new_reqs:
            self.states[nr.req_id] = _State(list(nr.token_ids[:nr.num_tokens]),
                                            nr.num_prompt_tokens, list(nr.block_ids),
                                            nr.num_computed_tokens)
        for cr in so.cached_reqs:
            st = self.states[cr.req_id]
            st.block_ids.extend(cr.new_block_ids)
            assert st.num_computed == cr.num_computed_tokens
        # all writes of the step first (as the attention layer stores KV before reading it)
        written: dict[int, int] = {}
        spec = so.scheduled_spec_decode_tokens
        for rid, n in so.num_scheduled_tokens.items():
            st = self.states[rid]
            drafts = spec.get(rid, [])
            assert n >= 1
            assert st.num_computed + n <= len(st.token_ids) + len(drafts), \
                "scheduled tokens that don't exist"
            assert not drafts or st.num_computed + n == len(st.token_ids) + len(drafts)
            assert len(st.block_ids) * self.bs >= st.num_computed + n, "too few blocks"
            assert len(set(st.block_ids)) == len(st.block_ids)
            for p in range(st.num_computed, st.num_computed + n):
                slot, k = self._slot(st, p), st.key(p, drafts)
                assert written.setdefault(slot, k) == k, f"two requests write slot {slot}"
                self.kv[slot] = k
        out = ModelRunnerOutput()
        for rid, n in so.num_scheduled_tokens.items():
            st = self.states[rid]
            drafts = spec.get(rid, [])
            end = st.num_computed + n
            for p in range(end):
                assert self.kv.get(self._slot(st, p)) == st.key(p, drafts), \
                    f"{rid}: wrong KV at position {p}"
            st.num_computed = end
            if end == len(st.token_ids) + len(drafts):
                seq = st.token_ids + drafts
                base = len(st.token_ids)
                samples = [self.policy(rid, seq[:base + j], st.num_prompt)
                           for j in range(len(drafts) + 1)]
                acc = accept_by_match(samples, drafts)
                st.num_computed -= len(drafts) - (len(acc) - 1)  # rejected drafts: stale KV
                st.token_ids.extend(acc)
                out.sampled_token_ids[rid] = acc
                if self.proposer is not None:
                    out.draft_token_ids[rid] = self.proposer(rid, st.token_ids)
        return out


@dataclass
class Result:
    tokens: list[int]
    finish_reason: Optional[str] = None
    stop_reason: object = None
    num_cached_tokens: int = 0


def make(num_blocks=256, block_size=4, budget=64, max_num_seqs=16, max_model_len=4096,
         chunked=True, caching=True, policy=None, proposer=None,
         swap_blocks=0) -> tuple[Scheduler, FakeRunner]:
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                      max_model_len=max_model_len, enable_chunked_prefill=chunked,
                                      preemption_mode="swap" if swap_blocks else "recompute"),
                      CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                      num_blocks, swap_blocks)
    return sched, FakeRunner(block_size, policy, proposer)


def add(sched: Scheduler, rid: str, prompt: list[int], parent_id=None, **kw) -> Request:
    kw.setdefault("max_tokens", 8)
    r = Request(rid, prompt, SamplingParams(**kw), arrival_time=0.0, eos_token_ids=(EOS,),
                parent_id=parent_id)
    sched.add_request(r)
    return r


class Driver:
    """Steps the scheduler and the fake runner, checking the step invariants.

    pipelined: asynchronous scheduling as EngineCore does it: step N+1 is scheduled and run
    before step N's output reaches Scheduler.update (except after a step that proposed drafts:
    the next schedule needs them, so it waits)."""

    def __init__(self, sched: Scheduler, runner: FakeRunner, pipelined: bool = False) -> None:
        self.sched, self.runner = sched, runner
        self.pipelined = pipelined
        self.inflight: Optional[tuple[SchedulerOutput, ModelRunnerOutput]] = None
        self.results: dict[str, Result] = {}
        self.trace: list[SchedulerOutput] = []
        self.prompts: dict[str, list[int]] = {}
        self.preempted_ever: set[str] = set()
        self.resumed: list[NewRequestData] = []

    def step(self, between: Optional[Callable[[], None]] = None):
        outs = []
        if self.inflight is not None and self.inflight[1].draft_token_ids:
            outs += self._land(between)
            between = None
        so = self._schedule_and_execute()
        if self.pipelined:
            outs += self._land(between)  # the previous step, after this one started
            self.inflight = self.pending
        else:
            self.inflight = self.pending
            outs += self._land(between)
        return so, outs

    def _land(self, between) -> list:
        if self.inflight is None:
            return []
        so, result = self.inflight
        self.inflight = None
        if between is not None:
            between()
        outs = self.sched.update(so, result)
        for o in outs:
            res = self.results.setdefault(o.req_id, Result([]))
            assert res.finish_reason is None, f"{o.req_id} reported after finishing"
            res.tokens += o.new_token_ids
            res.num_cached_tokens = o.num_cached_tokens
            if o.finish_reason is not None:
                res.finish_reason, res.stop_reason = o.finish_reason, o.stop_reason
        return outs

    def _schedule_and_execute(self) -> SchedulerOutput:
        s = self.sched
        for r in list(s.waiting) + s.running:
            self.prompts.setdefault(r.request_id, list(r.prompt_token_ids))
        running_before = [r.request_id for r in s.running]
        so = s.schedule()
        self.trace.append(so)
        cfg = s.config
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= cfg.max_num_seqs
        assert len(s.running) <= cfg.max_num_seqs
        # FCFS preemption takes the newest running requests (priority: the least urgent, and an
        # urgent arrival may take a preempted one's place in the same step)
        if so.preempted_req_ids and s.policy == "fcfs":
            k = len(so.preempted_req_ids)
            assert set(running_before[-k:]) == so.preempted_req_ids
            assert not so.new_reqs, "admitted waiting requests in a step that preempted"
        for nr in so.new_reqs:
            if nr.req_id in self.preempted_ever:
                got = self.results[nr.req_id].tokens if nr.req_id in self.results else []
                assert list(nr.token_ids[:nr.num_tokens]) == self.prompts[nr.req_id] + got
                assert nr.num_prompt_tokens == len(self.prompts[nr.req_id])
                self.resumed.append(nr)
        self.preempted_ever |= so.preempted_req_ids
        for rid in so.num_scheduled_tokens:
            assert s.requests[rid].status == RequestStatus.RUNNING
        self.pending = (so, self.runner.execute(so))
        return so

    def run(self, max_steps: int = 2000) -> dict[str, Result]:
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                break
            self.step()
        else:
            pytest.fail("scheduler did not finish within the step bound")
        self._land(None)
        assert_idle(self.sched)
        return self.results


def assert_idle(sched: Scheduler) -> None:
    assert not sched.running and not sched.waiting and not sched.ignored and not sched.swapped
    assert not sched.requests
    assert sorted(sched.kv.host_free) == list(range(sched.kv.num_host_blocks))
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks
    assert all(c == 0 for c in sched.kv.pool.ref_cnt)


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 5000) for _ in range(n)]


def expected_output(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def add_random(sched: Scheduler, rng: random.Random, n: int, prompt_lens: tuple[int, int],
               max_tokens: tuple[int, int]) -> dict[str, list[int]]:
    """n requests r0.. of random prompts and max_tokens; returns their expected outputs."""
    want = {}
    for i in range(n):
        p = rand_prompt(rng, rng.randrange(*prompt_lens))
        m = rng.randrange(*max_tokens)
        add(sched, f"r{i}", p, max_tokens=m)
        want[f"r{i}"] = expected_output(p, m)
    return want


# ---- speculative tokens through the step contract ------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_spec_tokens_several_tokens_per_step(caching):
    """A fake proposer drafts 3 tokens per request; the fake runner verifies them (accepting a
    prefix). Steps return 1..4 tokens per request, the scheduler schedules the drafts as spec
    tokens (k + 1 computed tokens), rolls back rejected ones, and outputs equal the plain ones."""
    rng = random.Random(7)
    sched, runner = make(budget=64, max_num_seqs=8, num_blocks=200, caching=caching,
                         proposer=fake_proposer)
    want = add_random(sched, rng, 6, (3, 20), (5, 25))
    d = Driver(sched, runner)
    counts = []
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        so, outs = d.step()
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            assert 1 <= len(drafts) <= 3
            assert so.num_scheduled_tokens[rid] == 1 + len(drafts)
        counts += [len(o.new_token_ids) for o in outs]
    assert_idle(sched)
    for rid, toks in want.items():
        assert d.results[rid].tokens == toks and d.results[rid].finish_reason == "length"
    assert max(counts) == 4 and 1 in counts  # all 3 drafts accepted somewhere, none elsewhere
    assert sum(len(so.scheduled_spec_decode_tokens) for so in d.trace) > 0


class FixedCost(StepCostModel):
    """Steps cost 1 ms + 0.1 ms per token, whatever the test's wall clock says."""

    def __init__(self, a: float = 1e-3, b: float = 1e-4) -> None:
        super().__init__()
        self.a, self.b, self.n = a, b, 100

    def observe(self, tokens: int, seconds: float) -> None:
        pass

    def coefficients(self) -> tuple[float, float]:
        return self.a, self.b


@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("free", [True, False])
def test_drafts_follow_acceptance(right, free):
    """Where a verified token costs something against the step (b * B / (a + b * B) = 1/6
    here), drafts that keep failing shrink to one per step (still checked, so a change of
    content is noticed); drafts that keep being accepted stay at the full k; where tokens are
    free (weight-bound steps: b = 0) all drafts are verified."""
    rng = random.Random(8)

    def proposer(rid, toks):
        seq, out = list(toks), []
        for _ in range(3):
            t = next_token(seq) + (0 if right else 1)  # right, or always wrong
            out.append(t)
            seq.append(t)
        return out
    sched, runner = make(budget=64, max_num_seqs=4, num_blocks=200, proposer=proposer)
    sched.cost = FixedCost(b=0.0 if free else 1e-4)
    want = add_random(sched, rng, 2, (3, 8), (30, 31))
    d = Driver(sched, runner)
    d.run()
    for rid, toks in want.items():
        assert d.results[rid].tokens == toks
    sizes = [len(v) for so in d.trace for v in so.scheduled_spec_decode_tokens.values()]
    if right or free:
        assert max(sizes) == 3 and sizes.count(3) >= len(sizes) // 2
    else:  # 3 at first; as acceptance halves (0.5, 0.25, ...) fewer, then 1 for good
        assert sizes[:2] == [3, 3] and sizes == sorted(sizes, reverse=True)
        assert set(sizes[-6:]) == {1}


def test_spec_tokens_clipped_to_max_tokens_and_budget():
    rng = random.Random(8)
    sched, runner = make(budget=3, max_num_seqs=2, max_model_len=14, proposer=fake_proposer)
    pa, pb = rand_prompt(rng, 2), rand_prompt(rng, 6)
    add(sched, "a", pa, max_tokens=6)
    add(sched, "b", pb, max_tokens=None)  # up to max_model_len
    schedule, room = sched.schedule, []

    def recording_schedule():
        so = schedule()
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            r = sched.requests[rid]
            left = min(14 - r.num_tokens, (r.params.max_tokens or 99) - r.num_output_tokens)
            room.append((len(drafts), left))
        return so
    sched.schedule = recording_schedule
    d = Driver(sched, runner)
    res = d.run()
    assert res["a"].tokens == expected_output(pa, 6) and res["b"].tokens == expected_output(pb, 8)
    for so in d.trace:
        assert so.total_num_scheduled_tokens <= 3
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            assert len(drafts) <= 2  # budget 3 = the last token + 2 drafts
            assert so.num_scheduled_tokens[rid] == 1 + len(drafts)
    # all drafts accepted plus one more token always fit max_tokens and max_model_len
    assert room and all(k + 1 <= left for k, left in room)
    assert any(k + 1 == left for k, left in room)  # and drafts were clipped to fit


# ---- budget, batching, chunking ----------------------------------------------------------------
@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("caching", [True, False])
def test_budget_and_max_num_seqs_random_workload(caching, pipelined):
    rng = random.Random(0)
    sched, runner = make(budget=32, max_num_seqs=3, num_blocks=200, caching=caching)
    want = add_random(sched, rng, 14, (1, 70), (1, 12))
    d = Driver(sched, runner, pipelined=pipelined)
    res = d.run()
    for rid, toks in want.items():
        assert res[rid].tokens == toks and res[rid].finish_reason == "length"
    assert max(so.total_num_scheduled_tokens for so in d.trace) == 32  # budget gets used fully
    assert max(len(so.num_scheduled_tokens) for so in d.trace) == 3


@pytest.mark.parametrize("mode", ["sync", "spec", "pipelined", "swap", "swap-pipelined",
                                  "swap-spec"])
@pytest.mark.parametrize("seed", [0, 2, 3, 4, 5, 6])  # seeds whose workload preempts
def test_stress_shared_prefixes_preemption_and_eviction(seed, mode):
    """Shared prefixes, staggered arrivals and a pool small enough to preempt and evict: every
    read sees the right KV, outputs match the unbatched reference, and all blocks come back.
    With spec, draft tokens (some wrong) are verified every step on top of all that; pipelined,
    each step is scheduled before the previous one's tokens are known; swap, preempted requests'
    blocks go to a small host space (falling back to recompute when it is full) and their KV
    must read back exactly."""
    rng = random.Random(100 + seed)
    spec = mode.endswith("spec")
    sched, runner = make(num_blocks=16, block_size=4, budget=rng.choice([8, 16, 32]),
                         max_num_seqs=rng.choice([2, 4, 8]), caching=True,
                         proposer=fake_proposer if spec else None,
                         swap_blocks=10 if mode.startswith("swap") else 0)
    prefixes = [rand_prompt(rng, rng.randrange(4, 30)) for _ in range(3)]
    pending = []
    for i in range(16):
        pre = rng.choice(prefixes)
        p = pre[:rng.randrange(1, len(pre) + 1)] + rand_prompt(rng, rng.randrange(0, 8))
        pending.append((f"r{i}", p, rng.randrange(1, 20)))
    d = Driver(sched, runner, pipelined=mode.endswith("pipelined"))
    swapped = []
    swap_out = sched.kv.swap_out
    sched.kv.swap_out = lambda req: swapped.append(swap_out(req)) or swapped[-1]
    want = {}
    for _ in range(3000):
        if pending and rng.random() < 0.6:
            rid, p, m = pending.pop(0)
            add(sched, rid, p, max_tokens=m)
            want[rid] = (p, m)
        if not sched.has_unfinished_requests():
            if not pending:
                break
            continue
        d.step()
    d.run()
    assert_idle(sched)
    for rid, (p, m) in want.items():
        r = d.results[rid]
        if r.finish_reason == "length" and isinstance(r.stop_reason, str):
            continue  # outgrew the 64-token pool
        assert r.tokens == expected_output(p, m), rid
    assert sched.kv.stats.hits > 0 and (spec or sched.num_preemptions > 0)
    if mode.startswith("swap") and sched.num_preemptions:
        assert any(p is not None for p in swapped)


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_stress_random_configs_with_aborts_and_siblings(seed, pipelined):
    """Random configuration (caching on/off, chunked prefill on/off), n>1 siblings, random aborts
    and client-side stops between steps: invariants hold every step, unaborted requests produce
    the reference tokens, and all blocks come back."""
    rng = random.Random(500 + seed)
    caching, chunked = rng.random() < 0.6, rng.random() < 0.7
    max_len = 64
    sched, runner = make(num_blocks=rng.choice([16, 24, 40]), block_size=rng.choice([2, 4, 8]),
                         budget=rng.choice([8, 16, 32]) if chunked else max_len,
                         max_num_seqs=rng.choice([1, 3, 8]), max_model_len=max_len,
                         caching=caching, chunked=chunked,
                         swap_blocks=rng.choice([0, 0, 4, 32]))
    prefix = rand_prompt(rng, 20)
    pending = []
    for i in range(12):
        p = prefix[:rng.randrange(0, 21)] + rand_prompt(rng, rng.randrange(1, 12))
        n = rng.choice([1, 1, 2, 3])
        pending += [(f"r{i}#{j}", p, rng.randrange(1, 16), f"r{i}" if n > 1 else None)
                    for j in range(n)]
    d = Driver(sched, runner, pipelined=pipelined)
    want, cut = {}, set()
    for _ in range(3000):
        if pending and rng.random() < 0.5:
            parent = pending[0][3]
            while pending and (pending[0][3] == parent if parent else True):
                rid, p, m, par = pending.pop(0)
                add(sched, rid, list(p), parent_id=par, max_tokens=m)
                want[rid] = (p, m)
                if par is None:
                    break
        live = list(sched.requests)
        if live and rng.random() < 0.08:
            rid = rng.choice(live)
            status = rng.choice([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED])
            sched.finish_requests([rid], status)
            cut.add(rid)
        if not sched.has_unfinished_requests():
            if not pending:
                break
            continue
        d.step()
    d.run()
    assert_idle(sched)
    assert cut
    for rid, (p, m) in want.items():
        r = d.results.get(rid, Result([]))
        if rid in cut or (r.finish_reason == "length" and isinstance(r.stop_reason, str)):
            assert r.tokens == expected_output(p, len(r.tokens))
            continue
        assert r.tokens == expected_output(p, m), rid
        assert r.finish_reason == "length"
    if not caching:
        assert sched.kv.stats.hits == 0


def test_chunked_prefill_of_long_prompt():
    rng = random.Random(1)
    sched, runner = make(budget=32)
    p = rand_prompt(rng, 100)
    add(sched, "a", p, max_tokens=3)
    d = Driver(sched, runner)
    chunks, outs_per_step = [], []
    for _ in range(4):
        so, outs = d.step()
        chunks.append(so.num_scheduled_tokens["a"])
        outs_per_step.append([t for o in outs for t in o.new_token_ids])
    assert chunks == [32, 32, 32, 4]
    assert outs_per_step[:3] == [[], [], []] and len(outs_per_step[3]) == 1
    assert [len(so.new_reqs) for so in d.trace] == [1, 0, 0, 0]
    assert [c.num_computed_tokens for so in d.trace[1:] for c in so.cached_reqs] == [32, 64, 96]
    res = d.run()
    assert res["a"].tokens == expected_output(p, 3)


def test_chunked_prefill_off_waits_for_room_in_budget():
    rng = random.Random(2)
    sched, runner = make(budget=64, chunked=False)
    pa, pb = rand_prompt(rng, 40), rand_prompt(rng, 40)
    add(sched, "a", pa, max_tokens=3)
    add(sched, "b", pb, max_tokens=3)
    d = Driver(sched, runner)
    so, _ = d.step()
    assert so.num_scheduled_tokens == {"a": 40}
    so, _ = d.step()
    assert so.num_scheduled_tokens == {"a": 1, "b": 40}
    res = d.run()
    assert res["a"].tokens == expected_output(pa, 3) and res["b"].tokens == expected_output(pb, 3)


def test_mixed_decode_and_prefill_in_one_step():
    rng = random.Random(3)
    sched, runner = make(budget=16)
    pa, pb = rand_prompt(rng, 6), rand_prompt(rng, 50)
    add(sched, "a", pa, max_tokens=10)
    d = Driver(sched, runner)
    d.step()
    d.step()
    add(sched, "b", pb, max_tokens=2)
    so, outs = d.step()
    assert so.num_scheduled_tokens == {"a": 1, "b": 15}  # running first, then the new prompt
    assert [c.req_id for c in so.cached_reqs] == ["a"] and [n.req_id for n in so.new_reqs] == ["b"]
    assert [o.req_id for o in outs] == ["a"]  # b is mid-prompt: nothing to report
    res = d.run()
    assert res["a"].tokens == expected_output(pa, 10) and res["b"].tokens == expected_output(pb, 2)


def test_fcfs_order():
    rng = random.Random(4)
    sched, runner = make(budget=64, max_num_seqs=2)
    for i in range(8):
        add(sched, f"r{i}", rand_prompt(rng, rng.randrange(1, 20)), max_tokens=rng.randrange(1, 6))
    d = Driver(sched, runner)
    d.run()
    admitted = [nr.req_id for so in d.trace for nr in so.new_reqs]
    assert admitted == [f"r{i}" for i in range(8)]
    for so in d.trace:  # batch order: oldest first
        ids = [int(r[1:]) for r in so.num_scheduled_tokens]
        assert ids == sorted(ids)


# ---- preemption and requests that never fit ------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_preemption_resumes_with_all_tokens_and_same_output(caching):
    rng = random.Random(5)
    prompts = [rand_prompt(rng, 10) for _ in range(3)]
    # each request ends at 30 tokens = 8 blocks; 3 of them need 24 > 12 blocks
    sched, runner = make(num_blocks=12, block_size=4, budget=64, caching=caching)
    for i, p in enumerate(prompts):
        add(sched, f"r{i}", p, max_tokens=20)
    d = Driver(sched, runner)
    res = d.run()
    assert sched.num_preemptions > 0 and sched.stats().num_preemptions == sched.num_preemptions
    assert d.preempted_ever and d.resumed
    assert {nr.req_id for nr in d.resumed} == d.preempted_ever
    assert any(nr.num_tokens > len(d.prompts[nr.req_id]) for nr in d.resumed)
    for i, p in enumerate(prompts):
        assert res[f"r{i}"].tokens == expected_output(p, 20)
        assert res[f"r{i}"].finish_reason == "length"
    if caching:  # a resumed request takes its own freed blocks back from the prefix cache
        assert any(nr.num_computed_tokens > 0 for nr in d.resumed)


def test_request_that_never_fits_is_ignored():
    rng = random.Random(6)
    sched, runner = make(num_blocks=4, block_size=4)  # 16 tokens of KV
    p_ok = rand_prompt(rng, 3)
    add(sched, "big", rand_prompt(rng, 20), max_tokens=4)
    add(sched, "ok", p_ok, max_tokens=3)
    res = Driver(sched, runner).run(max_steps=100)
    assert res["big"].tokens == [] and res["big"].finish_reason == "length"
    assert isinstance(res["big"].stop_reason, str) and "KV cache" in res["big"].stop_reason
    assert res["ok"].tokens == expected_output(p_ok, 3)


def test_request_that_outgrows_the_cache_ends_with_length():
    rng = random.Random(7)
    sched, runner = make(num_blocks=4, block_size=4)  # 16 tokens of KV
    pa, pb = rand_prompt(rng, 10), rand_prompt(rng, 3)
    add(sched, "a", pa, max_tokens=50)
    add(sched, "b", pb, max_tokens=3)
    res = Driver(sched, runner).run(max_steps=200)
    a = res["a"]
    assert a.finish_reason == "length" and isinstance(a.stop_reason, str)
    assert 0 < len(a.tokens) <= 16 - 10 + 1
    assert a.tokens == expected_output(pa, len(a.tokens))
    assert res["b"].tokens == expected_output(pb, 3) and res["b"].finish_reason == "length"


# ---- abort -----------------------------------------------------------------------------------
def test_abort_frees_blocks_at_once():
    rng = random.Random(8)
    sched, runner = make(num_blocks=64, budget=64, max_num_seqs=2)
    prompts = {f"r{i}": rand_prompt(rng, 13) for i in range(3)}
    for rid, p in prompts.items():
        add(sched, rid, p, max_tokens=10)
    d = Driver(sched, runner)
    d.step()
    d.step()
    r0 = sched.requests["r0"]
    held = len(r0.block_ids)
    free_before = sched.kv.pool.num_free_blocks
    assert held > 0 and r0 in sched.running
    sched.finish_requests(["r0"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free_blocks == free_before + held
    assert r0.status == RequestStatus.FINISHED_ABORTED and r0.status.finish_reason == "abort"
    assert r0 not in sched.running and "r0" not in sched.requests and r0.block_ids == []
    # a waiting request can be aborted too; unknown and repeated ids are ignored
    assert sched.requests["r2"] in sched.waiting
    sched.finish_requests(["r2", "r0", "nope"], RequestStatus.FINISHED_ABORTED)
    assert not any(r.request_id == "r2" for r in sched.waiting)
    so, outs = d.step()
    assert {"r0", "r2"} <= so.finished_req_ids  # the runner hears about it
    assert "r0" not in so.num_scheduled_tokens
    res = d.run()
    assert set(res) == {"r0", "r1"} and res["r0"].finish_reason is None
    assert res["r1"].tokens == expected_output(prompts["r1"], 10)


def test_abort_between_schedule_and_update():
    rng = random.Random(9)
    sched, runner = make()
    pa, pb = rand_prompt(rng, 9), rand_prompt(rng, 9)
    add(sched, "a", pa, max_tokens=5)
    add(sched, "b", pb, max_tokens=5)
    d = Driver(sched, runner)
    d.step()
    so, outs = d.step(between=lambda: sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED))
    assert "a" in so.num_scheduled_tokens and [o.req_id for o in outs] == ["b"]
    res = d.run()
    assert len(res["a"].tokens) == 1 and res["b"].tokens == expected_output(pb, 5)


# ---- prefix caching -----------------------------------------------------------------------------
def test_prefix_cache_hit_for_a_repeated_prompt():
    rng = random.Random(10)
    sched, runner = make(block_size=4)
    p = rand_prompt(rng, 22)
    add(sched, "a", p, max_tokens=4)
    d = Driver(sched, runner)
    d.run()
    q0, h0 = sched.kv.stats.queries, sched.kv.stats.hits
    assert h0 == 0 and q0 == 22
    add(sched, "b", list(p), max_tokens=4)
    so, _ = d.step()
    assert so.new_reqs[0].num_computed_tokens == 20  # 5 full blocks; the last token is computed
    assert so.num_scheduled_tokens == {"b": 2}
    d.run()
    assert d.results["b"].tokens == d.results["a"].tokens == expected_output(p, 4)
    assert d.results["b"].num_cached_tokens == 20 and d.results["a"].num_cached_tokens == 0
    st = sched.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (44, 20)


def test_prefix_cache_hit_in_the_same_step():
    """Two requests with one prompt arriving together: the second hits the blocks the first
    registers this very step (their KV is written before it is read)."""
    rng = random.Random(11)
    sched, runner = make(block_size=4, budget=64)
    p = rand_prompt(rng, 17)
    add(sched, "a", p, max_tokens=3)
    add(sched, "b", list(p), max_tokens=3)
    d = Driver(sched, runner)
    so, _ = d.step()
    assert so.num_scheduled_tokens == {"a": 17, "b": 1}
    res = d.run()
    assert res["a"].tokens == res["b"].tokens == expected_output(p, 3)


def test_prefix_caching_off_never_shares_blocks():
    rng = random.Random(12)
    sched, runner = make(block_size=4, budget=32, caching=False)
    p = rand_prompt(rng, 21)
    for i in range(4):
        add(sched, f"r{i}", list(p), max_tokens=5)
    d = Driver(sched, runner)
    while sched.has_unfinished_requests():
        so, _ = d.step()
        assert all(nr.num_computed_tokens == 0 for nr in so.new_reqs)
        assert all(c <= 1 for c in sched.kv.pool.ref_cnt)
        tables = [b for r in sched.running for b in r.block_ids]
        assert len(tables) == len(set(tables))
        assert len(d.trace) < 500
    assert_idle(sched)
    assert sched.kv.stats.hits == 0
    assert all(d.results[f"r{i}"].tokens == expected_output(p, 5) for i in range(4))


@pytest.mark.parametrize("caching", [True, False])
def test_n_siblings_wait_for_the_prompt_then_hit(caching):
    rng = random.Random(13)
    sched, runner = make(block_size=4, budget=16, caching=caching)
    p = rand_prompt(rng, 40)
    for i in range(3):
        add(sched, f"p#{i}", list(p), parent_id="p", max_tokens=4)
    d = Driver(sched, runner)
    res = d.run()
    if caching:
        # p#0 prefills 16 + 16 + 8; its siblings wait and join in the step of its last chunk
        steps = [set(so.num_scheduled_tokens) for so in d.trace]
        assert steps[0] == {"p#0"} and steps[1] == {"p#0"}
        assert d.trace[2].num_scheduled_tokens == {"p#0": 8, "p#1": 4, "p#2": 4}
        assert res["p#1"].num_cached_tokens == res["p#2"].num_cached_tokens == 36
        assert sched.kv.stats.hits == 72
    else:
        assert set(d.trace[0].num_scheduled_tokens) == {"p#0"}  # budget-bound, no waiting rule
        assert all(r.num_cached_tokens == 0 for r in res.values())
    for i in range(3):
        assert res[f"p#{i}"].tokens == expected_output(p, 4)


def test_n_siblings_without_chunking_hit_in_the_same_step():
    rng = random.Random(14)
    sched, runner = make(block_size=4, budget=64, chunked=False)
    p = rand_prompt(rng, 40)
    for i in range(3):
        add(sched, f"p#{i}", list(p), parent_id="p", max_tokens=2)
    d = Driver(sched, runner)
    so, _ = d.step()
    assert so.num_scheduled_tokens == {"p#0": 40, "p#1": 4, "p#2": 4}
    res = d.run()
    assert all(res[f"p#{i}"].tokens == expected_output(p, 2) for i in range(3))


# ---- stop conditions -----------------------------------------------------------------------------
def _scripted(scripts: dict[str, list[int]]):
    def policy(rid, toks, n_prompt):
        return scripts[rid][len(toks) - n_prompt]
    return policy


def test_stop_conditions():
    rng = random.Random(15)
    filler = [rng.randrange(10, 5000) for _ in range(30)]
    scripts = {
        "eos": filler[:3] + [EOS] + filler,
        "ignore_eos": filler[:3] + [EOS] + filler,
        "stop_id": filler[:2] + [77] + filler,
        "eos_is_stop_id": filler[:1] + [EOS] + filler,
        "max_tokens": filler,
        "max_model_len": filler,
    }
    sched, runner = make(max_model_len=20, policy=_scripted(scripts))
    add(sched, "eos", rand_prompt(rng, 5), max_tokens=20)
    add(sched, "ignore_eos", rand_prompt(rng, 5), max_tokens=6, ignore_eos=True)
    add(sched, "stop_id", rand_prompt(rng, 5), max_tokens=20, stop_token_ids=[77, 78])
    add(sched, "eos_is_stop_id", rand_prompt(rng, 5), max_tokens=20, stop_token_ids=[EOS])
    add(sched, "max_tokens", rand_prompt(rng, 5), max_tokens=4)
    add(sched, "max_model_len", rand_prompt(rng, 15), max_tokens=None)
    res = Driver(sched, runner).run(max_steps=100)

    def check(rid, n, reason, stop_reason=None):
        r = res[rid]
        assert r.tokens == scripts[rid][:n], rid
        assert (r.finish_reason, r.stop_reason) == (reason, stop_reason), rid

    check("eos", 4, "stop")  # the EOS token is part of the output
    check("ignore_eos", 6, "length")
    check("stop_id", 3, "stop", 77)
    check("eos_is_stop_id", 2, "stop")
    # min_tokens is not the scheduler's: the min_tokens logits processor keeps EOS and stop
    # ids from being sampled (tests/unit/test_logits_processors.py, tests/e2e)
    check("max_tokens", 4, "length")
    check("max_model_len", 5, "length")


def test_stats_and_usage():
    rng = random.Random(16)
    sched, runner = make(num_blocks=32, block_size=4)
    add(sched, "a", rand_prompt(rng, 9), max_tokens=3)
    add(sched, "b", rand_prompt(rng, 3), max_tokens=3)
    st = sched.stats()
    assert (st.num_running, st.num_waiting, st.kv_cache_usage) == (0, 2, 0.0)
    d = Driver(sched, runner)
    d.step()
    st = sched.stats()
    assert (st.num_running, st.num_waiting) == (2, 0)
    assert st.kv_cache_usage == pytest.approx(4 / 32)
    d.run()
    assert sched.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("pipelined", [False, True])
def test_prefill_tokens_capped_while_decoding(pipelined):
    """With max_prefill_tokens_while_decoding, a step that decodes computes at most that many
    prompt tokens (long prompts are chunked finer); alone, prompts get the whole budget.
    Outputs are unchanged."""
    rng = random.Random(21)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                      max_model_len=4096, max_prefill_tokens_while_decoding=10),
                      CacheConfig(block_size=4), 400)
    runner = FakeRunner(4)
    want = add_random(sched, rng, 1, (80, 81), (30, 31))  # r0 decodes first
    d = Driver(sched, runner, pipelined=pipelined)
    so, _ = d.step()
    assert so.total_num_scheduled_tokens == 64  # alone: the whole budget
    for i in range(1, 4):  # long prompts arrive while r0 decodes
        p = rand_prompt(rng, 150)
        add(sched, f"late{i}", p, max_tokens=5)
        want[f"late{i}"] = expected_output(p, 5)
    res = d.run()
    for rid, toks in want.items():
        assert res[rid].tokens == toks
    capped = 0
    for so in d.trace[1:]:
        prefill = sum(n for n in so.num_scheduled_tokens.values() if n > 1)
        if any(n == 1 for n in so.num_scheduled_tokens.values()):  # a step that decodes
            assert prefill <= 10, so.num_scheduled_tokens
            capped += prefill == 10
    assert capped >= 25  # prompt tokens went in chunks of 10 beside the decodes


# ---- priority scheduling ---------------------------------------------------------------------
def make_priority(**kw) -> tuple[Scheduler, FakeRunner]:
    c = dict(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=4096, policy="priority")
    c.update(kw.pop("sched", {}))
    swap_blocks = kw.pop("swap_blocks", 0)
    if swap_blocks:
        c["preemption_mode"] = "swap"
    sched = Scheduler(SchedulerConfig(**c), CacheConfig(block_size=4), kw.pop("num_blocks", 256),
                      swap_blocks)
    return sched, FakeRunner(4)


def add_prio(sched: Scheduler, rid: str, prompt: list[int], priority: int, arrival: float,
             max_tokens: int = 6) -> None:
    sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=max_tokens), arrival,
                              eos_token_ids=(EOS,), priority=priority))


def test_priority_order_then_arrival():
    rng = random.Random(30)
    sched, runner = make_priority(sched=dict(max_num_seqs=1))
    prompts = {}
    for rid, prio, t in [("late-urgent", 0, 3.0), ("low", 5, 0.0), ("early-urgent", 0, 1.0),
                         ("mid", 2, 0.5)]:
        prompts[rid] = rand_prompt(rng, 6)
        add_prio(sched, rid, prompts[rid], prio, t)
    assert [r.request_id for r in sched.waiting] == ["early-urgent", "late-urgent", "mid", "low"]
    d = Driver(sched, runner)
    res = d.run()
    first_step = {}
    for step, so in enumerate(d.trace):
        for nr in so.new_reqs:
            first_step.setdefault(nr.req_id, step)
    assert sorted(first_step, key=first_step.get) == ["early-urgent", "late-urgent", "mid", "low"]
    for rid, p in prompts.items():
        assert res[rid].tokens == expected_output(p, 6)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("limit", ["slots", "blocks"])
def test_urgent_request_preempts_less_urgent_running(limit, pipelined, swap):
    """An urgent arrival takes the slot (or the KV blocks) of the least urgent running request,
    which resumes later with all its tokens and the same output; equals never preempt. Swapped
    out (swap), the victim does not come straight back ahead of the urgent request."""
    rng = random.Random(31)
    kw = dict(sched=dict(max_num_seqs=2)) if limit == "slots" else dict(
        sched=dict(max_num_seqs=8), num_blocks=12)
    sched, runner = make_priority(**kw, swap_blocks=32 if swap else 0)
    p = {r: rand_prompt(rng, 12) for r in ("a", "b", "peer")}
    p["urgent"] = rand_prompt(rng, 20)  # 6 blocks: more than the 4 left free by a and b
    add_prio(sched, "a", p["a"], 1, 0.0, max_tokens=20)
    add_prio(sched, "b", p["b"], 3, 1.0, max_tokens=20)  # the least urgent
    d = Driver(sched, runner, pipelined=pipelined)
    for _ in range(4):
        d.step()
    assert {r.request_id for r in sched.running} == {"a", "b"}
    add_prio(sched, "urgent", p["urgent"], 0, 2.0, max_tokens=4)
    add_prio(sched, "peer", p["peer"], 3, 3.0, max_tokens=4)  # as urgent as b: waits
    so, _ = d.step()
    assert "b" in so.preempted_req_ids and "a" not in so.preempted_req_ids
    assert "urgent" in {nr.req_id for nr in so.new_reqs}
    res = d.run()
    assert res["a"].tokens == expected_output(p["a"], 20)
    assert res["b"].tokens == expected_output(p["b"], 20)
    assert res["urgent"].tokens == expected_output(p["urgent"], 4)
    assert res["peer"].tokens == expected_output(p["peer"], 4)
    assert not any("a" in so.preempted_req_ids for so in d.trace)


def test_fcfs_never_preempts_for_arrivals():
    rng = random.Random(32)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64,
                                      max_model_len=4096), CacheConfig(block_size=4), 256)
    d = Driver(sched, FakeRunner(4))
    add_prio(sched, "a", rand_prompt(rng, 5), 3, 0.0, max_tokens=10)
    d.step()
    add_prio(sched, "b", rand_prompt(rng, 5), 0, 1.0, max_tokens=3)
    d.run()
    assert not any(so.preempted_req_ids for so in d.trace)
    assert [nr.req_id for so in d.trace for nr in so.new_reqs] == ["a", "b"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_depth_two_keeps_two_steps_of_disjoint_samplers_in_flight(seed):
    """pipeline_depth=2 (two pipeline stages), driven as EngineCore does: a step is launched
    while the one before is in flight, and the oldest lands once two are. No request samples in
    two steps in flight (its next input is the token still on its way), running requests split
    into two batches that take turns, and every output is the one-step-at-a-time output."""
    import collections
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64,
                                      max_model_len=4096, pipeline_depth=2),
                      CacheConfig(block_size=4), 256, 0)
    runner = FakeRunner(4)
    rng = random.Random(seed)
    prompts = {f"r{i}": rand_prompt(rng, rng.randint(1, 30)) for i in range(8)}
    for rid, p in prompts.items():
        add(sched, rid, p, max_tokens=12)
    queue: collections.deque = collections.deque()
    results: dict[str, list[int]] = {}
    max_in_flight, decode_batches = 0, []
    for _ in range(2000):
        if not sched.has_unfinished_requests() and not queue:
            break
        running = len(sched.running)
        so = sched.schedule()
        launched = bool(so.total_num_scheduled_tokens or so.finished_req_ids
                        or so.preempted_req_ids)
        if launched:
            out = runner.execute(so)
            flying = set().union(*(set(o.sampled_token_ids) for _, o in queue))
            assert not set(out.sampled_token_ids) & flying
            if not so.new_reqs and running == 8:
                decode_batches.append(len(so.num_scheduled_tokens))
            queue.append((so, out))
        max_in_flight = max(max_in_flight, len(queue))
        if queue and (not launched or len(queue) >= 2):
            s, out = queue.popleft()
            for o in sched.update(s, out):
                results.setdefault(o.req_id, []).extend(o.new_token_ids)
    assert max_in_flight == 2
    assert decode_batches and max(decode_batches) <= 4  # half of the 8 running each
    for rid, p in prompts.items():
        assert results[rid] == expected_output(p, 12)
    assert_idle(sched)
