"""Model runner: owns the model, the KV cache tensors and the persistent batch; turns a
SchedulerOutput into one flat ragged batch, runs the forward pass, samples (verifying drafts
where the step has them) and reports a ModelRunnerOutput.

``execute_async`` launches a step without waiting for the device: the sampled ids go into a
device buffer from which the next step's inputs are taken, so step N+1 can be launched before
step N's tokens reach the host (asynchronous scheduling); ``PendingOutput.result()`` waits for
them. Steps with drafts to verify, prompt logprobs or a proposer need host values and wait
inside the launch instead."""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from servelm.attention import AttentionMetadata, get_attention_backend
from servelm.config import EngineConfig
from servelm.core.step import KVEviction, ModelRunnerOutput, SchedulerOutput
from servelm.distributed import ParallelGroup, without_communication
from servelm.kv_eviction.compact import CompactionOp, compact
from servelm.kv_eviction.policy import POLICIES
from servelm.models.registry import build_model
from servelm.sampling import ProcessorContext, SamplerOutput, build_sampling_pipeline
from servelm.spec_decode import Proposer, ProposerInput
from servelm.spec_decode.gate import SpeculationGate
from servelm.worker.cuda_graphs import DecodeGraphs
from servelm.worker.input_batch import InputBatch
from servelm.worker.logprobs import chunk_prompt_logprobs, wants_prompt_logprobs
from servelm.worker.memory import profile_lens
from servelm.worker.pending_output import PendingOutput, to_host
from servelm.worker.spec_verify import collect_verified, compact_tree_kv, tree_step_inputs
from servelm.worker.step_meta import ragged_positions, slots_of, step_meta
from servelm.worker.tree_graphs import TreeGraphs
from servelm.worker.swap import SwapSpace, copy_blocks
from servelm.worker.step_profiler import step_profiler_from_env, step_range

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """The flat batch of one step: T tokens of S sequences, L logits rows."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    req_ids: list[str]  # [S], batch order
    rows: np.ndarray  # [S] batch rows
    starts: np.ndarray  # [S] num_computed_tokens of each sequence before this step
    logits_idx: np.ndarray  # [L] rows of the hidden states to compute logits for
    logits_rows: np.ndarray  # [L] batch row of each logits row
    logits_rows_t: torch.Tensor  # [L] the same on the device
    sample_req_ids: list[str]  # the requests that sample, in logits order
    num_logits: np.ndarray  # [len(sample_req_ids)]: 1 + their number of drafts
    drafts: list[tuple[int, list[int]]]  # (logits row, drafts before it), speculative rows only
    # a verification step without prompt work, one sequence per token (worker/step_meta.py):
    # decode kernels and CUDA graphs serve it. None otherwise
    token_meta: Optional[AttentionMetadata] = None
    sample_pos: Optional[np.ndarray] = None  # [L] the position each logits row's token takes
    # token trees: the KV slot position of each logits row's token (its rotary position is
    # its depth's): where the taken path's KV is moved from
    logits_slot_pos: Optional[np.ndarray] = None


class _ExitCounts:
    """Early exit's tokens per exit layer, copied to the host behind the step; called with
    the step's ModelRunnerOutput once it has landed."""

    def __init__(self, exit_layer: torch.Tensor, num_layers: int) -> None:
        self.exit_layer, self.num_layers = to_host(exit_layer), num_layers  # [T] int64

    def __call__(self, out: ModelRunnerOutput) -> None:
        L = self.num_layers
        counts = np.bincount(self.exit_layer.numpy(), minlength=L + 1)[:L].tolist()
        out.early_exit_tokens = {n: c for n, c in enumerate(counts) if c}


class _Arrival:
    """Tokens an earlier pipeline stage receives from the last one (an async broadcast):
    ``__call__`` waits for them once and puts them into the device rows the next steps read;
    called by the step's landing, or earlier by a step that reads those rows."""

    def __init__(self, work, sampled: torch.Tensor, rows: torch.Tensor,
                 ids: torch.Tensor) -> None:
        self.work, self.sampled, self.rows, self.ids = work, sampled, rows, ids
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.work.wait()
            self.sampled[self.rows] = self.ids
            self.done = True


class _DeferredStep:
    """A step launched up to its forward, its sampling deferred (a logits processor fills its
    masks in another process): ``flush()`` launches the rest once; ``result()`` flushes and
    waits. A StepFuture, as PendingOutput."""

    def __init__(self, rest: Callable[[], PendingOutput]) -> None:
        self._rest: Optional[Callable[[], PendingOutput]] = rest
        self._pending: Optional[PendingOutput] = None

    def flush(self) -> PendingOutput:
        if self._rest is not None:
            rest, self._rest = self._rest, None
            self._pending = rest()
        return self._pending

    def done(self) -> bool:
        return self.flush().done()

    def result(self) -> ModelRunnerOutput:
        return self.flush().result()


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: ParallelGroup = ParallelGroup(),
                 pp: ParallelGroup = ParallelGroup(),
                 world: Optional[ParallelGroup] = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cpu":  # math threads and CPUs (cpu/threads.py)
            from servelm.cpu.threads import configure_engine
            configure_engine(config.threads)
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
        self.mem_at_init = torch.cuda.memory_allocated(self.device) if cuda else 0
        # tensor-parallel ranks of this pipeline stage, the stages (pp.rank = this one's), and
        # all ranks: every rank runs this runner on the same steps; the last stage's rank 0
        # (world rank 0) samples and broadcasts the tokens
        self.tp, self.pp, self.world = tp, pp, world or tp
        self.streamer = None  # cpu_offload_gb: the layers streamed from host memory
        self.last_stage = pp.rank == pp.world_size - 1
        # (before the model loads: the kernel warm-up and the proposer ask
        # will_capture_graphs, which reads them)
        self.eviction = config.cache.kv_eviction  # KV eviction settings (None: off)
        self.h2o = self.eviction is not None and self.eviction.needs_scores
        self.model = self._load_model(tp)
        # rows: running requests (<= max_num_seqs), or the profiling batch
        max_rows = max(config.scheduler.max_num_seqs, len(profile_lens(self)))
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.proposer: Optional[Proposer] = None  # drafts for speculative decoding
        self.spec_max_batch: Optional[int] = None  # no drafting above this many samplers
        if config.speculative is not None:  # before measuring: a draft model's weights count
            self.proposer = self._build_proposer(max_rows)
            self.spec_max_batch = config.speculative.disable_by_batch_size
        # token-tree verification (draft_model with a "tree"): drafts are a tree's nodes
        self.tree = config.speculative.tree_shape if config.speculative is not None else None
        self.tree_graphs: Optional[TreeGraphs] = None  # CUDA graphs of tree verification
        self.gate: Optional[SpeculationGate] = (
            SpeculationGate() if self.proposer is not None and config.speculative.adaptive
            else None)
        self.drafting_ready = False  # KV caches exist: not the memory profile's throwaway run
        self._unlanded: Optional[PendingOutput] = None  # the latest overlapped step's output
        self._deferred: Optional[_DeferredStep] = None  # a step whose sampling waits
        # an earlier pipeline stage: waits for tokens the last stage is still sampling
        self._arrivals: list = []
        # adapter slots (enable_lora; None: off), allocated now: they count as weights
        self.lora = self._lora_manager(self.model) if config.lora is not None else None
        self.mem_weights = (torch.cuda.memory_allocated(self.device) - self.mem_at_init) if cuda else 0
        self.kv_scores: Optional[torch.Tensor] = None  # h2o: attention received, per KV slot
        self.batch = InputBatch(max_rows, mc.max_model_len, self.max_blocks_per_seq,
                                unbounded=self.eviction is not None)
        self.sampling = build_sampling_pipeline(ProcessorContext(
            max_rows, mc.vocab_size, self.device, tuple(mc.eos_token_ids)))
        # each row's newest sampled token, on the device: the next step's input
        self.sampled = torch.zeros(max_rows, dtype=torch.int64, device=self.device)
        # decode-only steps: CUDA graphs, or on the CPU the C decode step (cpu/decode_step.py)
        self.graphs: Optional[DecodeGraphs] = None
        self.exit_graphs = None  # early exit's piecewise graphs (early_exit/graphs.py)
        self.swap: Optional[SwapSpace] = None  # host blocks for swap preemption
        self.step_profiler = step_profiler_from_env(self.world.rank)  # None unless asked

    # ---- set-up ---------------------------------------------------------------------------
    def _load_model(self, tp: ParallelGroup) -> torch.nn.Module:
        warmup = self._start_kernel_warmup(tp)  # compiles in other processes while weights load
        try:
            model = self._build_and_load(tp)
        except BaseException:
            if warmup is not None:
                warmup.stop()
            raise
        # before the first forward (the memory profile), whose kernels then load from the cache
        self.warmup_report = warmup.wait() if warmup is not None else None
        return model

    def _build_proposer(self, max_rows: int) -> Proposer:
        from servelm.spec_decode.config import build_proposer
        from servelm.spec_decode.proposer import ProposerContext
        return build_proposer(self.config.speculative, ProposerContext(
            self.config, self.device, self.model, lambda: self.kv_caches,
            lambda mc: self._build_and_load(ParallelGroup(), mc), self.will_capture_graphs(),
            max_rows))

    def _lora_manager(self, model: torch.nn.Module):
        """enable_lora: ``model``'s linear layers wrapped, adapter slots allocated."""
        from servelm.lora.manager import LoRAManager
        sc, spec = self.config.scheduler, self.config.speculative
        # a step's tokens, or a decode graph's padded batch (verifying drafts: k + 1 a row)
        width = 1 + (0 if spec is None else spec.tree_shape.num_nodes if spec.tree
                     else spec.num_speculative_tokens)
        max_rows = max(sc.max_num_seqs, len(profile_lens(self)))
        max_tokens = max(sc.max_num_batched_tokens, max_rows * width)
        return LoRAManager(self.config.lora, model, self.config.model.hf_config,
                           self.dtype, self.device, max_tokens, self.use_kernels)

    def _build_and_load(self, tp: ParallelGroup, mc=None) -> torch.nn.Module:
        """The target model (or the ModelConfig `mc`'s: a draft model), weights loaded."""
        from servelm.layers.linear import process_weights_after_loading
        from servelm.loader import initialize_dummy_weights, iter_weights
        pp = self.pp if mc is None else ParallelGroup()  # a draft model is not staged
        # cpu_offload_gb: the target is built and loaded in host memory, then all but the
        # offloaded layers move to the device (so the model never has to fit there whole)
        offload = self.config.parallel.cpu_offload_gb if mc is None else 0.0
        mc = mc or self.config.model
        t0 = time.perf_counter()
        torch.manual_seed(mc.seed)
        with torch.device("cpu" if offload else self.device):
            model = self._build(mc.hf_config, tp, mc.quantization, pp)
        if mc.load_format == "dummy":
            initialize_dummy_weights(model, mc.seed)
        else:
            q = mc.quantization
            model.load_weights(iter_weights(mc.model, mc.load_format,
                                            keep_gguf_blocks=q is not None and q.method == "gguf"))
        process_weights_after_loading(model)
        model.eval()
        if offload:
            from servelm.worker.offload import offload_layers
            self.streamer = offload_layers(model, offload, self.device)
            logger.info("cpu_offload_gb: %d layers in host memory (%.2f GiB), streamed through "
                        "%.2f GiB on the device", len(self.streamer.layers),
                        self.streamer.host_bytes / 2**30, self.streamer.device_bytes / 2**30)
        logger.info("loaded %s in %.1fs", mc.model, time.perf_counter() - t0)
        return model

    def _build(self, hf_config, tp: ParallelGroup, quantization=None,
               pp: ParallelGroup = ParallelGroup()) -> torch.nn.Module:
        """The model of `hf_config` on the current default device, parameters uninitialised
        (this pipeline stage's layers only)."""
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            model = build_model(hf_config, self.backend, self.use_kernels, quantization, tp, pp)
        finally:
            torch.set_default_dtype(prev)
        # rotary cos/sin stay fp32 whatever the model dtype
        for m in model.modules():
            if hasattr(m, "cos_sin_cache"):
                m.cos_sin_cache = m.cos_sin_cache.float()
        return model

    def _start_kernel_warmup(self, tp: ParallelGroup):
        """Records the Triton kernels this runner will compile (a dry run of a one-layer shadow
        model, worker/kernel_jobs.py) and starts compiling the uncached ones in worker
        processes (worker/kernel_warmup.py). CUDA with Triton kernels only;
        SERVELM_KERNEL_WARMUP=0 turns it off (kernels then compile on first use)."""
        if not self.use_kernels:
            return None
        from servelm.layers.linear import process_weights_after_loading
        from servelm.worker.cuda_graphs import graph_keys
        from servelm.worker.kernel_jobs import (DryRunShapes, job_list_path, load_job_list,
                                                record_kernel_jobs, save_job_list, shadow_model)
        from servelm.worker.kernel_warmup import (WarmupWorkers, configure_compile_cache,
                                                  default_num_workers, start_kernel_warmup)
        cache_dir = configure_compile_cache()  # persistent, whether or not the warm-up runs
        if os.environ.get("SERVELM_KERNEL_WARMUP") == "0" or self.pp.world_size > 1:
            return None  # (pipeline stages: kernels compile on first use)
        t0 = time.perf_counter()
        mc = self.config.model
        workers = None
        try:
            keys = (graph_keys(self.graph_max_bs(), mc.max_model_len)
                    if self.will_capture_graphs() or self.will_capture_exit_graphs() else [])
            kv_block, _ = self.config.kv_cache_spec()  # this rank's KV heads
            shapes = DryRunShapes(kv_block[1], mc.head_dim, self.dtype, self.block_size,
                                  mc.max_model_len, self.max_blocks_per_seq,
                                  tuple(profile_lens(self)), tuple(keys), self.graph_max_bs(),
                                  self.config.cache.cache_dtype)
            # a start with the same configuration recorded the list already: the dry run (6-7
            # s on the H100 for Llama-3-8B) is skipped, and only missing binaries compile
            path = job_list_path(cache_dir, shapes, repr(mc.hf_config), str(self.dtype),
                                 mc.quantization, torch.cuda.get_device_capability(self.device),
                                 tp.world_size, self.config.lora)
            jobs = load_job_list(path)
            if jobs is None:
                # no list yet (a first start): the workers import Triton and torch meanwhile
                # (about 3 s of an 8B model's cold start on the H200)
                n = default_num_workers()
                workers = WarmupWorkers(n) if n else None
                # this rank's shard shapes, with collectives that wait for no other rank
                # (each rank may find the list cached, or not)
                local = without_communication(tp)
                shadow = shadow_model(lambda cfg: self._build(cfg, local, mc.quantization),
                                      mc.hf_config, self.device)
                process_weights_after_loading(shadow)
                if self.config.lora is not None:  # its steps run the adapters' kernels too
                    from servelm.lora.manager import with_lora_kernels
                    with_lora_kernels(shadow, self._lora_manager(shadow))
                jobs = record_kernel_jobs(shadow, shapes, self.device)
                del shadow
                torch.cuda.empty_cache()
                save_job_list(path, jobs)
            return start_kernel_warmup(jobs, t0, time.perf_counter() - t0, workers=workers)
        except Exception as e:  # the kernels then compile on first use, as without warm-up
            if workers is not None:
                workers.stop()
            logger.warning("kernel warm-up did not start: %s: %s", type(e).__name__, e)
            return None

    def allocate_kv(self, num_blocks: int) -> None:
        block, dtype = self.config.kv_cache_spec()
        self.kv_caches = [(torch.zeros((num_blocks, *block), dtype=dtype, device=self.device),
                           torch.zeros((num_blocks, *block), dtype=dtype, device=self.device))
                          for _ in range(self.model.num_stage_layers)]
        if self.h2o:
            self.kv_scores = torch.zeros(num_blocks * self.block_size, dtype=torch.float32,
                                         device=self.device)

    def _graphs_allowed(self) -> bool:
        # pipeline stages run eagerly (their sends and receives are not captured yet); h2o's
        # scores buffer is not in the graphs' metadata (not built yet)
        return (self.device.type == "cuda" and self.backend.name == "triton"
                and not self.config.enforce_eager and self.pp.world_size == 1
                and not self.h2o
                and not self.config.parallel.cpu_offload_gb)  # (offload copies from hooks)

    def will_capture_graphs(self) -> bool:
        """Decode graphs (worker/cuda_graphs.py)."""
        return self._graphs_allowed() and self.config.early_exit is None

    def will_capture_exit_graphs(self) -> bool:
        """Early exit's piecewise graphs instead (early_exit/graphs.py)."""
        return self._graphs_allowed() and self.config.early_exit is not None

    def graph_max_bs(self) -> int:
        # larger decode batches run eagerly on one GPU: launch overhead is small against their
        # compute. Tensor-parallel ranks compute 1/tp of it each, and an eager step's launches
        # (with 2 all-reduces a layer) then take longer than its kernels (2 x H200, 600 rows of
        # an 8B model: ~35 ms of host time a step against ~9 ms of device work), so their
        # graphs go up to 1024 rows
        return min(self.config.scheduler.max_num_seqs, 512 if self.tp.world_size == 1 else 1024)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.allocate_kv(num_blocks)
        if self.config.num_swap_blocks:
            self.swap = SwapSpace(self.kv_caches, self.config.num_swap_blocks)
        if self.will_capture_graphs():
            self.graphs = DecodeGraphs(self._decode, self.graph_max_bs(), self.max_blocks_per_seq,
                                       self.device, self.config.model.max_model_len)
            self.graphs.capture()
            if self.tree is not None:  # captured on first use or in idle time
                self.tree_graphs = TreeGraphs(self._decode, 1 + self.tree.num_nodes,
                                              self.max_blocks_per_seq, self.device)
        elif self.will_capture_exit_graphs():
            from servelm.early_exit.graphs import ExitGraphs
            from servelm.early_exit.pieces import ExitPieces
            pieces = ExitPieces(self.model, self.kv_caches, self.config.early_exit,
                                self.graph_max_bs(), self.device, self.dtype)
            self.exit_graphs = ExitGraphs(pieces, self.graph_max_bs(), self.max_blocks_per_seq,
                                          self.device, self.config.model.max_model_len)
            self.exit_graphs.capture()
        elif (self.device.type == "cpu" and not self.config.enforce_eager
              and self.world.world_size == 1 and not self.config.parallel.cpu_offload_gb
              and not self.h2o and self.config.early_exit is None):
            # the C step holds a whole model, in place
            from servelm.cpu.decode_step import build_decode_step  # the C decode step
            self.graphs = build_decode_step(
                self.model, self.kv_caches, self.config.model.max_model_len,
                self.config.threads or torch.get_num_threads(),
                lora_batch=None if self.lora is None else self.lora.batch)
        if self.proposer is not None:
            self.proposer.initialize_kv_cache(num_blocks)
        if self.gate is not None:  # nothing the memory profile measured
            self.gate = SpeculationGate()
        self.drafting_ready = True

    def capture_pending_graph(self) -> bool:
        """One decode graph deferred at start-up (the target's, then the proposer's), captured
        now (idle time); True while more remain."""
        for graphs in (self.graphs, self.exit_graphs):
            if graphs is not None and graphs.capture_next():
                return True
        if self.tree_graphs is not None and self.tree_graphs.capture_next():
            return True
        return self.proposer is not None and self.proposer.capture_pending_graph()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self.lora is not None:  # tokens sorted by adapter (in a decode graph too)
            self.lora.batch.prepare(input_ids.shape[0])
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _decode(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode graph runs: forward, lm_head, greedy argmax."""
        if self.lora is not None:  # captured with the LoRA kernels, whatever this step holds
            self.lora.batch.in_graph = True
        try:
            logits = self.model.compute_logits(self._forward(input_ids, positions, meta))
        finally:
            if self.lora is not None:
                self.lora.batch.in_graph = False
        return logits, logits.argmax(-1)

    # ---- per step -------------------------------------------------------------------------
    def _update_states(self, s: SchedulerOutput) -> None:
        b = self.batch
        for rid in (*s.finished_req_ids, *s.preempted_req_ids):
            b.remove(rid)
            if self.lora is not None:
                self.lora.remove_request(rid)
        for nr in s.new_reqs:
            b.remove(nr.req_id)
            b.add(nr)
            if self.lora is not None:
                self.lora.add_request(nr.req_id, nr.lora_request)
        ops = []
        for cr in s.cached_reqs:
            row = b.row_of[cr.req_id]
            if cr.eviction is not None:
                ops.append(self._compaction(row, cr.eviction))
                b.set_blocks(row, cr.eviction.block_ids)
            b.num_evicted[row] = cr.num_evicted
            if cr.num_null_blocks:
                b.release_blocks(row, cr.num_null_blocks)
            if cr.new_block_ids:
                b.append_blocks(row, cr.new_block_ids)
            b.num_computed_tokens[row] = cr.num_computed_tokens
        for rid, drafts in s.scheduled_spec_decode_tokens.items():
            b.write_drafts(b.row_of[rid], drafts)
        if ops:
            compact(self.kv_caches, self._cos_sin_caches(), ops, self.block_size,
                    self.kv_scores)

    def _compaction(self, row: int, ev: KVEviction) -> CompactionOp:
        """A row's eviction (core.step.KVEviction) as the cache moves it, from its current
        table; which tokens survive by the policy (h2o: from the scores of its slots)."""
        b, bs = self.batch, self.block_size
        old = b.block_table[row, :-(-ev.old_len // bs)].tolist()
        scores = None
        if self.kv_scores is not None:
            idx = torch.arange(ev.old_len, device=self.device)
            table = torch.as_tensor(old, dtype=torch.int64, device=self.device)
            scores = self.kv_scores[table[idx // bs] * bs + idx % bs]
            # each tensor-parallel rank holds its heads' share: every rank keeps the same
            # tokens, by the sum over all heads
            scores = self.world.all_reduce(scores.contiguous())
        kept = POLICIES[self.eviction.policy](self.eviction, ev.old_len, ev.keep, scores,
                                              self.device)
        # the leading blocks of sinks stay in place (possibly shared): not rewritten
        fixed = self.eviction.fixed_blocks(bs) * bs
        return CompactionOp(old, list(ev.block_ids), kept, fixed)

    def _cos_sin_caches(self) -> list[torch.Tensor]:
        """Each of this stage's attention layers' rotary cos/sin cache, in KV-cache order."""
        m = self.model
        return [layer.self_attn.rotary.cos_sin_cache for layer in m.layers[m.start:m.end]]

    def _prepare_inputs(self, s: SchedulerOutput) -> StepInputs:
        b, spec = self.batch, s.scheduled_spec_decode_tokens
        req_ids = list(s.num_scheduled_tokens)
        S = len(req_ids)
        n_sched = np.fromiter(s.num_scheduled_tokens.values(), dtype=np.int64, count=S)
        rows = np.fromiter((b.row_of[r] for r in req_ids), np.int64, S)
        starts = b.num_computed_tokens[rows]
        ends = starts + n_sched
        T = int(n_sched.sum())
        cu = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(n_sched, out=cu[1:])
        seq_of_tok, positions = ragged_positions(starts, ends)  # per token: sequence, position
        input_ids = b.token_ids[rows[seq_of_tok], positions].astype(np.int64)
        if self.lora is not None:  # each token's adapter slot, its adapter made resident
            self.lora.set_step(req_ids, seq_of_tok)
        # KV eviction: a token's cache index (its slot, and its rotary position) is its
        # position less the tokens its sequence evicted; the context ends there too
        evicted = b.num_evicted[rows] if self.eviction is not None else None
        if evicted is not None and evicted.any():
            cache_pos, cache_ends = positions - evicted[seq_of_tok], ends - evicted
        else:
            cache_pos, cache_ends = positions, ends
        # tokens sampled by a step whose output has not landed yet: taken on the device
        pending = b.host_pending[rows]
        from_dev = (np.nonzero(pending[seq_of_tok] & (positions == b.dev_pos[rows][seq_of_tok]))[0]
                    if pending.any() else None)
        width = int(-(-cache_ends.max() // self.block_size))
        block_table = b.block_table[rows, :width]
        slots = slots_of(block_table, seq_of_tok, cache_pos, self.block_size)
        dev = self.device
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=to(slots), query_start_loc=to(cu.astype(np.int32)),
            seq_lens=to(cache_ends.astype(np.int32)), block_tables=to(block_table),
            max_query_len=int(n_sched.max()), max_seq_len=int(cache_ends.max()),
            query_lens_cpu=tuple(n_sched.tolist()), seq_lens_cpu=tuple(cache_ends.tolist()))
        if self.kv_scores is not None:  # h2o: new tokens' slots start with no attention
            self.kv_scores[meta.slot_mapping] = 0.0
            meta = dataclasses.replace(meta, kv_scores=self.kv_scores)
        # a sequence samples once its real tokens and drafts are all computed: at its last
        # 1 + k positions (k drafts)
        k = (np.fromiter((len(spec.get(r, ())) for r in req_ids), np.int64, S) if spec
             else np.zeros(S, dtype=np.int64))
        sample = np.nonzero(ends == b.num_tokens[rows] + k)[0]
        n_logits = k[sample] + 1
        first = np.repeat(cu[sample + 1] - n_logits, n_logits)  # first logits row per token
        ramp = np.arange(int(n_logits.sum())) - np.repeat(np.cumsum(n_logits) - n_logits, n_logits)
        drafts: list[tuple[int, list[int]]] = []
        tree = self.tree if spec else None
        if tree is not None:  # rotary positions by depth, tree masks; slot positions kept
            slot_pos = positions.copy()
            drafts, bits, tree_start = tree_step_inputs(
                tree, [spec.get(req_ids[i], []) for i in sample], sample, cu, starts, positions)
            meta = dataclasses.replace(meta, tree_mask=to(bits), tree_start=to(tree_start))
        elif spec:
            j = 0
            for i, n in zip(sample.tolist(), n_logits.tolist()):
                d = spec.get(req_ids[i], [])
                drafts.extend((j + m, d[:m]) for m in range(1, n))
                j += n
        input_ids_t = to(input_ids)
        if from_dev is not None and len(from_dev):
            for arrive in self._arrivals:  # tokens still on their way from the last stage
                arrive()
            self._arrivals.clear()
            input_ids_t[to(from_dev)] = self.sampled[to(rows[seq_of_tok[from_dev]])]
        logits_rows = np.repeat(rows[sample], n_logits)
        token_meta = None
        if (spec and tree is None and self.graphs is not None and len(sample) == S
                and (n_sched == k + 1).all() and self.graphs.padded_size(T) is not None):
            token_meta = step_meta(block_table, starts, ends, self.block_size, dev,
                                   per_token=True)[2]
        logits_idx = first + ramp
        return StepInputs(input_ids_t, to(cache_pos), meta, req_ids, rows, starts,
                          logits_idx, logits_rows, to(logits_rows),
                          [req_ids[i] for i in sample], n_logits, drafts, token_meta,
                          positions[logits_idx] + 1,
                          slot_pos[logits_idx] if tree is not None else None)

    def execute(self, s: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(s).result()

    @torch.inference_mode()
    def execute_async(self, s: SchedulerOutput) -> PendingOutput:
        """Launch one step; the sampled ids stay on the device until ``result()``."""
        if self._deferred is not None:  # the step before must sample first
            self._deferred.flush()
            self._deferred = None
        if s.blocks_to_swap_out:
            self.swap.swap_out(self.kv_caches, s.blocks_to_swap_out)
        if s.blocks_to_swap_in:
            self.swap.swap_in(self.kv_caches, s.blocks_to_swap_in)
        if s.blocks_to_copy:
            copy_blocks(self.kv_caches, s.blocks_to_copy)
        self._update_states(s)
        if s.lora_prefetch and self.lora is not None:  # read in the background
            self.lora.prefetch(s.lora_prefetch)
        out = ModelRunnerOutput()
        if s.total_num_scheduled_tokens == 0:
            self.sampling.update(self.batch.take_update(np.zeros(0, np.int64), None, []))
            return PendingOutput.ready(out)
        if self.step_profiler is not None:
            self.step_profiler.on_step()
        with step_range(self.step_profiler, "servelm.prepare_inputs"):
            inp = self._prepare_inputs(s)
        # before the forward: processors read the last step's tokens from the device buffers
        # this step's graph replay overwrites
        self.sampling.update(self.batch.take_update(inp.logits_rows, inp.logits_rows_t,
                                                    inp.drafts, inp.sample_pos))
        graph_out, hidden = None, None  # a graph's (logits, argmax); an eager forward's [T, hidden]
        exits = None  # early exit's per-layer counts, once on the host
        gmeta = inp.meta if inp.meta.decode_only else inp.token_meta
        # (decode graphs and the CPU's C decode step include the step's LoRA adapters)
        no_plp = self.graphs is not None and not wants_prompt_logprobs(self.batch, inp.rows,
                                                                       inp.starts)
        # early exit: steps of output tokens only (prompt tokens always run every layer)
        early_exit = (self.config.early_exit is not None and inp.meta.decode_only
                      and bool((inp.starts >= self.batch.num_prompt_tokens[inp.rows]).all()))
        if early_exit:
            if self.exit_graphs is not None and self.exit_graphs.padded_size(
                    inp.meta.num_seqs) is not None:  # piecewise graphs (early_exit/graphs.py)
                *graph_out, exit_layer = self.exit_graphs.run(inp.input_ids, inp.positions,
                                                              inp.meta)
            else:  # [T, hidden]: each token's exit layer's (early_exit/forward.py)
                from servelm.early_exit.forward import early_exit_forward
                hidden, exit_layer = early_exit_forward(self.model, inp.input_ids,
                                                        inp.positions, self.kv_caches, inp.meta,
                                                        self.config.early_exit)
            # counted when the step's tokens land (a count now would wait for the step here)
            exits = _ExitCounts(exit_layer, self.model.num_stage_layers)
        elif no_plp and gmeta is not None and self.graphs.padded_size(gmeta.num_seqs) is not None:
            graph_out = self.graphs.run(inp.input_ids, inp.positions, gmeta)  # logits, argmax
        elif no_plp and self._uniform_tree_step(inp):
            gmeta = inp.meta  # every request: its root and the whole tree
            graph_out = self.tree_graphs.run(inp.input_ids, inp.positions, gmeta)
        else:
            # [T, hidden]; None on a pipeline stage before the last
            hidden = self._forward(inp.input_ids, inp.positions, inp.meta)
            if hidden is not None:
                out.prompt_logprobs_dict = chunk_prompt_logprobs(
                    self.batch, inp.req_ids, inp.rows, inp.starts, inp.meta.query_lens_cpu,
                    hidden, self.model.compute_logits)
        n_samplers = len(inp.sample_req_ids)
        L = len(inp.logits_rows)
        # the gate times decode steps only: prompt work in a step is no arm's cost
        measured = self.gate is not None and L == inp.input_ids.shape[0]
        if self.gate is not None and not measured:
            self.gate.interrupt()
        if not n_samplers:
            if exits is not None:
                exits(out)
            return PendingOutput.ready(out)
        if (s.num_scheduler_steps > 1 and graph_out is not None and L == graph_out[1].shape[0]
                and not s.scheduled_spec_decode_tokens and self.sampling.plain_greedy()):
            return PendingOutput.ready(self._more_passes(inp, graph_out[1],
                                                         s.num_scheduler_steps, out))
        if (self.world.world_size == 1 and not s.scheduled_spec_decode_tokens
                and self.sampling.prepare()):
            # a processor fills this step's masks elsewhere: sample once the engine has
            # landed the step before (its host work overlaps the fill), or on result()
            self._deferred = _DeferredStep(lambda: self._sample(s, inp, graph_out, hidden, out,
                                                                exits, measured, n_samplers))
            return self._deferred
        return self._sample(s, inp, graph_out, hidden, out, exits, measured, n_samplers)

    @torch.inference_mode()  # also when a deferred step's flush() calls it
    def _sample(self, s: SchedulerOutput, inp: StepInputs, graph_out, hidden, out,
                exits, measured: bool, n_samplers: int) -> PendingOutput:
        """The step's sampling (and draft verification) after its forward; its output."""
        L = len(inp.logits_rows)
        if graph_out is not None:  # one logits row per token of the graph's batch
            all_rows = L == graph_out[1].shape[0]
            idx = None if all_rows else torch.from_numpy(inp.logits_idx).to(self.device)
            logits, greedy = (graph_out if all_rows else (graph_out[0][idx], graph_out[1][idx]))
            so = (SamplerOutput(greedy) if self.sampling.plain_greedy()
                  else self.sampling.sample(logits))
        elif hidden is not None:
            idx = torch.from_numpy(inp.logits_idx).to(self.device, non_blocking=True)
            so = self.sampling.sample(self.model.compute_logits(hidden[idx]))  # [L, V] fp32
        else:  # an earlier pipeline stage: the last one's tokens arrive below (zeros, valid
            # ids, until then)
            so = SamplerOutput(torch.zeros(L, dtype=torch.int64, device=self.device))
        arrive = None
        if self.world.world_size > 1 and (self.pp.world_size > 1
                                          or not self.sampling.plain_greedy()):
            # tensor-parallel ranks hold the same logits, but random draws are rank 0's, and
            # earlier pipeline stages have none: rank 0's tokens go into every rank's next
            # inputs (greedy ones without stages are the same everywhere already)
            if hidden is None and not self.last_stage and self.device.type == "cpu":
                # an earlier stage goes on with the next batch (other requests: the scheduler
                # keeps a request with a token in flight out) and takes these tokens when the
                # step lands
                arrive = _Arrival(self.world.broadcast_async(so.token_ids, 0), self.sampled,
                                  inp.logits_rows_t, so.token_ids)
                self._arrivals = [a for a in self._arrivals if not a.done] + [arrive]
            else:
                self.world.broadcast(so.token_ids, src=0)
        if s.scheduled_spec_decode_tokens:  # drafts: verified on the host now
            paths = collect_verified(self.batch, self.sampling.logprobs, inp.sample_req_ids,
                                     inp.logits_rows, inp.num_logits, so,
                                     s.scheduled_spec_decode_tokens, out, self.tree)
            if paths:
                compact_tree_kv(self.kv_caches, self.batch.block_table, self.block_size,
                                inp.logits_rows, inp.logits_slot_pos, paths)
            if measured:
                self.gate.observe(n_samplers, True,
                                  sum(len(t) for t in out.sampled_token_ids.values()))
            return PendingOutput.ready(self._propose(out, self._drafts_now(n_samplers)))
        if measured:
            self.gate.observe(n_samplers, False, n_samplers)
        self.sampled[inp.logits_rows_t] = so.token_ids  # the next step's inputs
        gens, pos = self.batch.append_on_device(inp.logits_rows, so.token_ids)
        rows = inp.logits_rows
        pending = PendingOutput(out, inp.sample_req_ids, self.sampling.logprobs[rows], so,
                                lambda toks: self.batch.land(rows, gens, pos, toks), arrive,
                                landed=exits)
        if self._drafts_now(n_samplers):  # drafting needs the tokens: wait
            return PendingOutput.ready(self._propose(pending.result(), True))
        self._unlanded = pending
        return pending

    def _more_passes(self, inp: StepInputs, greedy: torch.Tensor, steps: int,
                     out: ModelRunnerOutput) -> ModelRunnerOutput:
        """Multi-step scheduling (SchedulerOutput.num_scheduler_steps): this decode batch's
        first pass gave ``greedy`` [S]; steps - 1 more passes through the decode step, each
        fed the tokens of the one before at the next position (KV slots reserved by the
        scheduler). Every request gets its ``steps`` tokens (those past a stop are dropped by
        the scheduler); the host rows take them at once."""
        b, bs = self.batch, self.block_size
        rows = inp.logits_rows  # [S] batch rows, one logits row per sequence
        S = len(rows)
        pos = inp.positions.clone()  # [S] int64
        seq_lens = inp.meta.seq_lens.to(torch.int32)
        width = (int(pos.max()) + steps - 1) // bs + 1  # the last pass's blocks
        table = torch.from_numpy(np.ascontiguousarray(b.block_table[rows, :width]))
        seqs = torch.arange(S)
        toks = [greedy]
        for i in range(1, steps):
            pos = pos + 1
            slots = table[seqs, pos // bs].to(torch.int64) * bs + pos % bs
            meta = dataclasses.replace(
                inp.meta, slot_mapping=slots, seq_lens=seq_lens + i, block_tables=table,
                max_seq_len=inp.meta.max_seq_len + i,
                seq_lens_cpu=tuple(n + i for n in inp.meta.seq_lens_cpu))
            toks.append(self.graphs.run(toks[-1], pos, meta)[1])
        lists = torch.stack(toks, 1).tolist()  # [S, steps]
        out.sampled_token_ids = dict(zip(inp.sample_req_ids, lists))
        b.append_token_lists(rows.tolist(), lists, self.device)
        return out

    def _uniform_tree_step(self, inp: StepInputs) -> bool:
        """Every request of the step verifies a whole token tree (nothing else), few enough
        for a tree graph."""
        tg = self.tree_graphs
        return (tg is not None and inp.meta.tree_mask is not None
                and tg.fits(inp.meta.num_seqs) and len(inp.sample_req_ids) == inp.meta.num_seqs
                and all(n == tg.q for n in inp.meta.query_lens_cpu))

    def _drafts_now(self, num_samplers: int) -> bool:
        """Whether this step's samplers get drafts (asked once per step): a proposer, a batch
        no larger than disable_by_batch_size, and the gate's measurements saying drafting
        pays at this batch size (else the step overlaps with the next, undrafted)."""
        return (self.proposer is not None and self.drafting_ready
                and (self.spec_max_batch is None or num_samplers <= self.spec_max_batch)
                and (self.gate is None or self.gate.choose(num_samplers)))

    def _propose(self, out: ModelRunnerOutput, draft: bool) -> ModelRunnerOutput:
        if draft:
            if self._unlanded is not None:
                # an earlier overlapped step's tokens, still on their way to the host: the
                # proposer reads every token (its work finished before this step's)
                self._unlanded.result()
                self._unlanded = None
            b = self.batch
            live = list(out.sampled_token_ids)
            rows = np.fromiter((b.row_of[r] for r in live), np.int64, len(live))
            out.drafting = True
            out.draft_token_ids = self.proposer.propose(ProposerInput(
                live, [b.tokens(r) for r in rows.tolist()], rows, b.generation[rows].copy(),
                b.block_table[rows]))
        return out
