"""Whether a ParallelConfig fits the model and the machine, with errors that say what would."""
from __future__ import annotations

from typing import Any


def mlp_widths(hf_config: Any) -> list[int]:
    """The feed-forward widths tensor parallelism splits: the dense MLP's, and a mixture of
    experts' per-expert and shared-expert widths."""
    return [w for w in (hf_config.intermediate_size,
                        getattr(hf_config, "moe_intermediate_size", 0),
                        getattr(hf_config, "shared_expert_intermediate_size", 0)) if w]


def tp_fits(tp: int, hf_config: Any) -> bool:
    """Query heads, MLP widths and vocabulary split evenly; KV heads split evenly or are
    replicated (tp a multiple of them)."""
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    return (heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
            and all(w % tp == 0 for w in mlp_widths(hf_config))
            and hf_config.vocab_size % tp == 0)


def check_parallel(pc: Any, hf_config: Any, device: str) -> None:
    """pc: a ParallelConfig. Raises ValueError naming the argument and what would fit."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        v = getattr(pc, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
    if not pc.cpu_offload_gb >= 0:
        raise ValueError(f"cpu_offload_gb must be >= 0, got {pc.cpu_offload_gb!r}.")
    tp = pc.tensor_parallel_size
    if tp > 1 and not tp_fits(tp, hf_config):
        fits = [t for t in range(1, hf_config.num_attention_heads + 1) if tp_fits(t, hf_config)]
        kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide the model: {hf_config.num_attention_heads}"
            f" attention heads, {kv} KV heads, intermediate sizes "
            f"{mlp_widths(hf_config)}, vocabulary {hf_config.vocab_size}; sizes that fit: "
            f"{fits}.")
    gpus = pc.world_size * pc.data_parallel_size
    pp = pc.pipeline_parallel_size
    if pp > hf_config.num_hidden_layers:
        raise ValueError(f"pipeline_parallel_size={pp} is more than the model's "
                         f"{hf_config.num_hidden_layers} layers; pass at most "
                         f"{hf_config.num_hidden_layers}.")
    if device.startswith("cuda") and gpus > 1:
        import torch
        n = torch.cuda.device_count()
        if gpus > n:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size x "
                             f"data_parallel_size = {gpus} needs as many GPUs; this machine has "
                             f"{n}.")
        if device != "cuda":
            raise ValueError(f"device={device!r} names one GPU; with {gpus} GPUs pass "
                             "device='cuda' (replica d's rank r runs on cuda:d*world_size+r).")
    if pc.world_size > 1 and pc.distributed_executor_backend == "uni":
        raise ValueError("distributed_executor_backend='uni' runs one process; "
                         f"tensor_parallel_size={tp} needs 'mp' (the default then).")
