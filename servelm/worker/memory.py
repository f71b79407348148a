"""How many KV blocks fit: a fixed budget on the CPU, on a GPU what a profiling run leaves."""
from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

import torch

from servelm.core.step import NewRequestData, SchedulerOutput
from servelm.sampling import SamplingMetadata
from servelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from servelm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 2 * 1024**3  # default KV budget on the CPU


def profile_lens(runner: "ModelRunner") -> list[int]:
    """The profiling batch: max_num_batched_tokens split into sequences of <= 512 tokens."""
    n_tok = runner.config.scheduler.max_num_batched_tokens
    seq = min(512, n_tok, runner.config.model.max_model_len - 1)
    return [seq] * (n_tok // seq) + ([n_tok % seq] if n_tok % seq else [])


def determine_num_blocks(runner: "ModelRunner") -> int:
    cc = runner.config.cache
    if cc.num_gpu_blocks_override is not None:
        return cc.num_gpu_blocks_override
    per_block = runner.config.kv_bytes_per_block()
    if runner.proposer is not None:  # a draft model's KV: as many blocks, same block ids
        per_block += runner.proposer.kv_bytes_per_block()
    if runner.device.type == "cpu":
        budget = cc.kv_cache_memory or CPU_KV_CACHE_BYTES
    else:  # kv_cache_memory caps the GPU's share too (vLLM's kv_cache_memory_bytes)
        budget = profile_free_memory(runner)
        if cc.kv_cache_memory is not None:
            budget = min(budget, cc.kv_cache_memory)
    n = int(budget // per_block)
    if n < 1:
        raise ValueError(f"no memory left for the KV cache (one block needs {per_block} bytes);"
                         " raise gpu_memory_utilization / kv_cache_memory or lower "
                         "max_num_batched_tokens.")
    return n


def device_share(total: int, others: int, util: float) -> float:
    """Bytes this engine may use of a device of ``total`` bytes of which ``others`` (other
    processes, other engines in this one) use some. vLLM's meaning: gpu_memory_utilization is
    this engine's share, whatever others use of the rest (two engines at 0.45 each share one
    GPU); a share larger than what others leave is cut to that, with a warning."""
    share = total * util
    if share > total - others:
        logger.warning("gpu_memory_utilization=%.2f asks for %.1f GiB, but other processes or "
                       "engines use %.1f GiB of the device's %.1f GiB: this engine takes the "
                       "%.1f GiB they leave", util, share / 2**30, others / 2**30, total / 2**30,
                       (total - others) / 2**30)
        share = total - others
    return share


@torch.inference_mode()
def profile_free_memory(runner: "ModelRunner") -> int:
    """Run the largest batch once with a throwaway cache. The KV cache gets what is left of
    this engine's share, gpu_memory_utilization * total (at most what other processes and
    engines leave free), after its own peak (weights + activations, graph outputs)."""
    dev = runner.device
    gc.collect()
    torch.cuda.empty_cache()
    free0, total = torch.cuda.mem_get_info(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    sc, mc = runner.config.scheduler, runner.config.model
    lens = profile_lens(runner)
    runner.allocate_kv(sum(-(-n // runner.block_size) for n in lens))
    g = torch.Generator().manual_seed(0)
    new, b = [], 0
    for i, n in enumerate(lens):
        k = -(-n // runner.block_size)
        ids = torch.randint(0, mc.vocab_size, (n,), generator=g).tolist()
        new.append(NewRequestData(f"profile-{i}", ids, n, n, SamplingParams(max_tokens=1),
                                  list(range(b, b + k)), 0))
        b += k
    runner.execute(SchedulerOutput(new, [], {r.req_id: r.num_tokens for r in new},
                                   sc.max_num_batched_tokens, set()))
    # a full decode batch through the sampler (logits of max_num_seqs rows)
    B = sc.max_num_seqs
    logits = torch.randn(B, mc.vocab_size, device=dev)
    runner.sampling.sampler(logits, SamplingMetadata(
        temperature=torch.ones(B, device=dev), all_greedy=False,
        top_p=torch.full((B,), 0.9, device=dev), max_num_logprobs=runner.config.max_logprobs))
    runner.execute(SchedulerOutput([], [], {}, 0, {r.req_id for r in new}))
    torch.cuda.synchronize(dev)
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    # own = weights (allocated before the profile) + the profile's activation peak
    own = max(runner.mem_weights,
              torch.cuda.max_memory_allocated(dev) - runner.mem_at_init - kv_bytes)
    runner.kv_caches = []
    torch.cuda.empty_cache()
    # in use by anyone else (other processes, other engines here): all used memory after
    # empty_cache() but this engine's weights, which `own` counts
    others = total - free0 - runner.mem_weights
    if runner.will_capture_graphs():  # their outputs stay allocated once captured
        from servelm.worker.cuda_graphs import graph_output_bytes
        own += graph_output_bytes(runner.graph_max_bs(), mc.vocab_size)
        if runner.tree is not None:  # token-tree verification graphs
            from servelm.worker.tree_graphs import tree_graph_output_bytes
            own += tree_graph_output_bytes(1 + runner.tree.num_nodes, mc.vocab_size)
    if runner.will_capture_exit_graphs():
        from servelm.early_exit.graphs import exit_graph_output_bytes
        own += exit_graph_output_bytes(runner.config.early_exit, runner.model.num_stage_layers,
                                       runner.graph_max_bs(), mc.vocab_size)
    budget = device_share(total, others, runner.config.cache.gpu_memory_utilization) - own
    logger.info("memory: total %.1f GiB, this engine %.2f GiB, others %.2f GiB -> KV cache "
                "%.2f GiB", total / 2**30, own / 2**30, others / 2**30, budget / 2**30)
    return max(0, int(budget))
