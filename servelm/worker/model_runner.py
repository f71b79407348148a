"""Model runner: owns the model, the KV cache tensors and per-request token state; turns a
SchedulerOutput into one flat ragged batch, runs the forward pass and samples."""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from servelm.attention import AttentionMetadata, get_attention_backend
from servelm.config import EngineConfig
from servelm.core.scheduler import NewRequestData, SchedulerOutput
from servelm.layers.sampler import Sampler, SamplingMetadata, SamplerOutput
from servelm.models.registry import build_model
from servelm.sampling_params import SamplingParams
from servelm.worker.cuda_graphs import DecodeGraphs
from servelm.worker.input_batch import InputBatch

logger = logging.getLogger(__name__)

# token id -> (logprob, rank), one dict per position
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class RequestState:
    row: int  # the request's row in the InputBatch (token ids, block table)
    num_prompt_tokens: int
    params: SamplingParams
    num_computed_tokens: int
    generator: Optional[torch.Generator] = None


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class StepInputs:
    """The flat batch of one step (T tokens, S sequences)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    req_ids: list[str]  # [S], batch order
    logits_rows: list[int]  # rows of hidden states to sample from (one per sampling request)
    sample_req_ids: list[str]
    chunk_starts: list[int]  # [S] num_computed_tokens of each request before this step


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        mc = config.model
        self.dtype = mc.dtype
        self.block_size = config.cache.block_size
        self.max_blocks_per_seq = -(-mc.max_model_len // self.block_size)
        self.backend = get_attention_backend(config.attention_backend, config.device,
                                             mc.max_model_len)
        self.use_kernels = self.device.type == "cuda" and self.backend.name == "triton"
        cuda = self.device.type == "cuda"
        if cuda:  # engines dropped earlier in this process must not count as this one's memory
            gc.collect()
            torch.cuda.empty_cache()
        self._mem_at_init = torch.cuda.memory_allocated(self.device) if cuda else 0
        self.model = self._load_model()
        self._mem_weights = (torch.cuda.memory_allocated(self.device) - self._mem_at_init) if cuda else 0
        self.sampler = Sampler()
        self.requests: dict[str, RequestState] = {}
        # rows: running requests (<= max_num_seqs), or the profiling batch
        max_rows = max(config.scheduler.max_num_seqs, len(self._profile_lens()))
        self.batch = InputBatch(max_rows, mc.max_model_len, self.max_blocks_per_seq)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs: Optional[DecodeGraphs] = None

    # ---- set-up ---------------------------------------------------------------------------
    def _load_model(self) -> torch.nn.Module:
        from servelm.loader import initialize_dummy_weights, iter_weights
        mc = self.config.model
        t0 = time.perf_counter()
        torch.manual_seed(mc.seed)
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                model = build_model(mc.hf_config, self.backend, self.use_kernels)
            finally:
                torch.set_default_dtype(prev)
        # rotary cos/sin stay fp32 whatever the model dtype
        for m in model.modules():
            if hasattr(m, "cos_sin_cache"):
                m.cos_sin_cache = m.cos_sin_cache.float()
        if mc.load_format == "dummy":
            initialize_dummy_weights(model, mc.seed)
        else:
            model.load_weights(iter_weights(mc.model, mc.load_format))
        model.eval()
        logger.info("loaded %s in %.1fs", mc.model, time.perf_counter() - t0)
        return model

    def kv_bytes_per_block(self) -> int:
        mc = self.config.model
        return (2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim
                * torch.tensor([], dtype=self.dtype).element_size())

    def determine_num_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cpu":
            budget = cc.kv_cache_memory or 2 * 1024**3
        else:
            budget = self._profile_free_memory()
        n = int(budget // per_block)
        if n < 1:
            raise ValueError(f"no memory left for the KV cache (one block needs {per_block} bytes);"
                             " raise gpu_memory_utilization / kv_cache_memory or lower "
                             "max_num_batched_tokens.")
        return n

    def _profile_lens(self) -> list[int]:
        """The profiling batch: max_num_batched_tokens split into sequences of <= 512 tokens."""
        n_tok = self.config.scheduler.max_num_batched_tokens
        seq = min(512, n_tok, self.config.model.max_model_len - 1)
        return [seq] * (n_tok // seq) + ([n_tok % seq] if n_tok % seq else [])

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Run the largest batch once with a throwaway cache. The KV cache gets what is left of
        gpu_memory_utilization * total after what others use (other processes, other engines in
        this one) and this engine's own peak (weights + activations)."""
        gc.collect()
        torch.cuda.empty_cache()
        free0, total = torch.cuda.mem_get_info(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        sc = self.config.scheduler
        n_tok = sc.max_num_batched_tokens
        lens = self._profile_lens()
        nb = sum(-(-n // self.block_size) for n in lens)
        self._allocate_kv(nb)
        g = torch.Generator().manual_seed(0)
        new, b = [], 0
        for i, n in enumerate(lens):
            k = -(-n // self.block_size)
            ids = torch.randint(0, self.config.model.vocab_size, (n,), generator=g).tolist()
            new.append(NewRequestData(f"profile-{i}", ids, n, SamplingParams(max_tokens=1),
                                      list(range(b, b + k)), 0))
            b += k
        self.execute(SchedulerOutput(new, [], {r.req_id: len(r.token_ids) for r in new}, n_tok,
                                     set()))
        # a full decode batch through the sampler (logits of max_num_seqs rows)
        logits = torch.randn(sc.max_num_seqs, self.config.model.vocab_size, device=self.device)
        self.sampler(logits, SamplingMetadata(temperature=torch.ones(sc.max_num_seqs, device=self.device),
                                              all_greedy=False, top_p=torch.full((sc.max_num_seqs,), 0.9, device=self.device),
                                              max_num_logprobs=self.config.max_logprobs))
        self._update_states(SchedulerOutput([], [], {}, 0, {r.req_id for r in new}))
        torch.cuda.synchronize(self.device)
        # own = weights (allocated before the profile) + the profile's activation peak
        own = max(self._mem_weights, torch.cuda.max_memory_allocated(self.device)
                  - self._mem_at_init - sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches))
        self.kv_caches = []
        torch.cuda.empty_cache()
        # in use by anyone else (other processes, other engines here): all used memory after
        # empty_cache() but this engine's weights, which `own` counts
        others = total - free0 - self._mem_weights
        budget = total * self.config.cache.gpu_memory_utilization - own - others
        logger.info("memory: total %.1f GiB, this engine %.2f GiB, others %.2f GiB -> KV cache "
                    "%.2f GiB", total / 2**30, own / 2**30, others / 2**30, budget / 2**30)
        return max(0, int(budget))

    def _allocate_kv(self, num_blocks: int) -> None:
        mc = self.config.model
        shape = (num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(mc.num_layers)]
        self.num_blocks = num_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._allocate_kv(num_blocks)
        if self.device.type == "cuda" and self.backend.name == "triton" and not self.config.enforce_eager:
            # larger decode batches run eagerly: launch overhead is small against their compute
            self.graphs = DecodeGraphs(self._forward, min(self.config.scheduler.max_num_seqs, 512),
                                       self.max_blocks_per_seq, self.device,
                                       self.config.model.max_model_len)
            self.graphs.capture()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_caches, meta)

    # ---- per step -------------------------------------------------------------------------
    def _update_states(self, s: SchedulerOutput) -> None:
        for rid in s.finished_req_ids | s.preempted_req_ids:
            st = self.requests.pop(rid, None)
            if st is not None:
                self.batch.remove(st.row)
        for nr in s.new_reqs:
            gen = None
            old = self.requests.pop(nr.req_id, None)
            if old is not None:
                self.batch.remove(old.row)
                gen = old.generator  # resumed after preemption: keep the random stream going
            if gen is None and nr.params.seed is not None and not nr.params.greedy:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(nr.params.seed % 2**63)
            row = self.batch.add(nr.token_ids, nr.block_ids)
            self.requests[nr.req_id] = RequestState(row, nr.num_prompt_tokens, nr.params,
                                                    nr.num_computed_tokens, gen)
        for cr in s.cached_reqs:
            st = self.requests[cr.req_id]
            if cr.new_block_ids:
                self.batch.append_blocks(st.row, cr.new_block_ids)
            st.num_computed_tokens = cr.num_computed_tokens

    def _prepare_inputs(self, s: SchedulerOutput) -> StepInputs:
        req_ids = list(s.num_scheduled_tokens)
        S = len(req_ids)
        n_sched = np.fromiter(s.num_scheduled_tokens.values(), dtype=np.int64, count=S)
        states = [self.requests[r] for r in req_ids]
        rows = np.fromiter((st.row for st in states), np.int64, S)
        starts = np.fromiter((st.num_computed_tokens for st in states), np.int64, S)
        ends = starts + n_sched
        T = int(n_sched.sum())
        cu = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(n_sched, out=cu[1:])
        # per token: its sequence, and its position inside that sequence
        seq_of_tok = np.repeat(np.arange(S), n_sched)
        positions = np.arange(T, dtype=np.int64) - np.repeat(cu[:-1] - starts, n_sched)
        b = self.batch
        input_ids = b.token_ids[rows[seq_of_tok], positions].astype(np.int64)
        width = int(-(-ends.max() // self.block_size))
        block_table = b.block_table[rows, :width]
        slots = (block_table[seq_of_tok, positions // self.block_size].astype(np.int64)
                 * self.block_size + positions % self.block_size)
        dev = self.device
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=to(slots), query_start_loc=to(cu.astype(np.int32)),
            seq_lens=to(ends.astype(np.int32)), block_tables=to(block_table),
            max_query_len=int(n_sched.max()), max_seq_len=int(ends.max()),
            query_lens_cpu=tuple(n_sched.tolist()), seq_lens_cpu=tuple(ends.tolist()))
        sample = np.nonzero(ends == b.num_tokens[rows])[0]
        return StepInputs(to(input_ids), to(positions), meta, req_ids,
                          (cu[sample + 1] - 1).tolist(), [req_ids[i] for i in sample],
                          starts.tolist())

    def _sampling_metadata(self, req_ids: list[str]) -> SamplingMetadata:
        states = [self.requests[r] for r in req_ids]
        ps = [st.params for st in states]
        dev, B, V = self.device, len(ps), self.config.model.vocab_size
        t = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731
        all_greedy = all(p.greedy for p in ps)
        m = SamplingMetadata(temperature=None if all_greedy else
                             t([0.0 if p.greedy else p.temperature for p in ps]),
                             all_greedy=all_greedy)
        if not all_greedy:
            if any(p.top_k > 0 for p in ps):
                m.top_k = t([p.top_k if p.top_k > 0 else V for p in ps], torch.int64)
            if any(p.top_p < 1 for p in ps):
                m.top_p = t([p.top_p for p in ps])
            if any(p.min_p > 0 for p in ps):
                m.min_p = t([p.min_p for p in ps])
            m.generators = {i: st.generator for i, st in enumerate(states)
                            if st.generator is not None}
        if any(p.needs_penalties for p in ps):
            m.presence, m.frequency = t([p.presence_penalty for p in ps]), t([p.frequency_penalty for p in ps])
            m.repetition = t([p.repetition_penalty for p in ps])
            counts = torch.zeros(B, V, device=dev)
            prompt = torch.zeros(B, V, dtype=torch.bool, device=dev)
            for i, st in enumerate(states):
                out = self.batch.tokens(st.row, st.num_prompt_tokens).tolist()
                if out:
                    counts[i].index_add_(0, t(out, torch.int64), torch.ones(len(out), device=dev))
                prompt[i, t(self.batch.tokens(st.row, 0, st.num_prompt_tokens).tolist(),
                            torch.int64)] = True
            m.output_counts, m.prompt_mask = counts, prompt
        eos = list(self.config.model.eos_token_ids)
        for i, (st, p) in enumerate(zip(states, ps)):
            if self.batch.num_tokens[st.row] - st.num_prompt_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos)
                if banned:
                    m.banned.append((i, banned))
        m.max_num_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=-1)
        return m

    @torch.inference_mode()
    def execute(self, s: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(s)
        out = ModelRunnerOutput()
        if s.total_num_scheduled_tokens == 0:
            return out
        inp = self._prepare_inputs(s)
        if (self.graphs is not None and inp.meta.decode_only
                and self.graphs.padded_size(inp.meta.num_seqs) is not None):
            hidden = self.graphs.run(inp.input_ids, inp.positions, inp.meta)
        else:
            hidden = self._forward(inp.input_ids, inp.positions, inp.meta)  # [T, hidden]
        self._prompt_logprobs(inp, hidden, out)
        if not inp.sample_req_ids:
            return out
        rows = torch.tensor(inp.logits_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # [B, V] fp32
        meta = self._sampling_metadata(inp.sample_req_ids)
        so = self.sampler(logits, meta)
        self._collect(inp.sample_req_ids, so, meta, out)
        return out

    def _collect(self, req_ids: list[str], so: SamplerOutput, meta: SamplingMetadata,
                 out: ModelRunnerOutput) -> None:
        # the one host sync of the step: sampled tokens (and logprobs) to Python
        tokens = so.token_ids.tolist()
        if so.sampled_logprob is not None:
            lp, rank = so.sampled_logprob.tolist(), so.sampled_rank.tolist()
            top_lp = so.top_logprobs.tolist() if so.top_logprobs is not None else None
            top_ids = so.top_ids.tolist() if so.top_ids is not None else None
        states = [self.requests[rid] for rid in req_ids]
        self.batch.append_tokens(np.fromiter((st.row for st in states), np.int64, len(states)),
                                 np.asarray(tokens, dtype=np.int32))
        for i, (rid, st) in enumerate(zip(req_ids, states)):
            out.sampled[rid] = [tokens[i]]
            k = st.params.logprobs
            if k is not None:
                d: TokenLogprobs = {tokens[i]: (lp[i], rank[i])}
                for j in range(k):
                    d.setdefault(top_ids[i][j], (top_lp[i][j], j + 1))
                out.logprobs[rid] = [d]

    def _prompt_logprobs(self, inp: StepInputs, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        """For requests asking prompt_logprobs: logprob of each prompt token given its prefix,
        for the prompt positions computed in this chunk (position p predicts token p+1)."""
        if all(self.requests[r].params.prompt_logprobs is None for r in inp.req_ids):
            return
        cu = [0]  # query start offsets from the host copy: no device sync
        for n in inp.meta.query_lens_cpu:
            cu.append(cu[-1] + n)
        for i, rid in enumerate(inp.req_ids):
            st = self.requests[rid]
            k = st.params.prompt_logprobs
            if k is None:
                continue
            start = inp.chunk_starts[i]
            n = cu[i + 1] - cu[i]
            last = min(start + n, st.num_prompt_tokens - 1)  # positions [start, last) predict
            if last <= start:
                continue
            h = hidden[cu[i]:cu[i] + last - start]
            lp = self.model.compute_logits(h).log_softmax(-1)  # [m, V]
            targets = torch.from_numpy(self.batch.tokens(st.row, start + 1, last + 1).astype(np.int64)).to(self.device)
            tgt_lp = lp.gather(1, targets[:, None]).squeeze(1)
            ranks = (lp > tgt_lp[:, None]).sum(-1) + 1
            top = lp.topk(k, dim=-1) if k > 0 else None
            rows = []
            tl, rk = tgt_lp.tolist(), ranks.tolist()
            tv, ti = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
            for j, tok in enumerate(targets.tolist()):
                d: TokenLogprobs = {tok: (tl[j], rk[j])}
                for r in range(k):
                    d.setdefault(ti[j][r], (tv[j][r], r + 1))
                rows.append(d)
            out.prompt_logprobs[rid] = rows
