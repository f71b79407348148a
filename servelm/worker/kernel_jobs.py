"""The Triton kernels a model will compile, found by a dry run of a one-layer shadow of it.

Triton compiles one binary per *specialization* of a kernel (constexprs, launch options, pointer
dtypes and 16-byte alignment, and whether each int argument is 1, a multiple of 16 or neither).
Rather than keep a list of those in step with the model and kernel code, the runner builds the
same model with one decoder layer (every layer specializes alike) and runs, on the real device,
the steps it will run: the memory-profile batch, a first prompt, each decode-graph shape, and
(optional) a few other eager batch shapes. Triton's compile hook (`knobs.runtime.jit_cache_hook`)
is set for the duration: each launch that would compile is recorded and skipped (nothing is
compiled or launched; outputs stay uninitialised, which no later shape depends on).

The shadow's parameters are all views of one buffer the size of the largest (the embedding:
1 GiB for Llama-3-8B), freed before the real weights load; block tables point at block 0 of a
one-block KV cache and slots stay in it, so a kernel that does run (already compiled in this
process, hence not hooked) touches only that block.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from servelm.attention.backend import AttentionMetadata

# (kernel module, kernel name, Triton's serialized specialization, needed before the first step)
Job = tuple[str, str, str, bool]


@dataclass(frozen=True)
class DryRunShapes:
    """The step shapes a runner will run. profile_lens: the memory-profile batch's sequence
    lengths; graph_keys: the decode graphs' (batch size, longest context)."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    max_model_len: int
    max_blocks_per_seq: int
    profile_lens: tuple[int, ...]
    graph_keys: tuple[tuple[int, int], ...]
    max_graph_bs: int
    kv_cache_dtype: str = "auto"  # "fp8": uint8 rows of head_dim e4m3 bytes + a float32 scale


def one_layer_config(hf_config: Any) -> Any:
    if dataclasses.is_dataclass(hf_config):
        return dataclasses.replace(hf_config, num_hidden_layers=1)
    cfg = copy.deepcopy(hf_config)  # a transformers PretrainedConfig
    cfg.num_hidden_layers = 1
    return cfg


def shadow_model(build: Callable[[Any], nn.Module], hf_config: Any,
                 device: torch.device) -> nn.Module:
    """`build(config)` run on the meta device for a one-layer copy of `hf_config`, then given
    storage on `device`: parameters as views of one shared buffer, buffers uninitialised."""
    with torch.device("meta"):
        model = build(one_layer_config(hf_config))
    params = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]
    nbytes = max(p.numel() * p.element_size() for _, _, p in params)
    storage = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for module, name, p in params:
        view = storage[:p.numel() * p.element_size()].view(p.dtype).view(p.shape)
        module._parameters[name] = nn.Parameter(view, requires_grad=False)
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return model


def dry_run_steps(model: nn.Module, s: DryRunShapes,
                  device: torch.device) -> Iterator[tuple[str, bool, Callable[[], None]]]:
    """(name, required, run) for each step shape: required ones run before the engine's first
    step or in the decode graphs captured at start-up; the others (later eager batches, graphs
    captured later) compile in the background, required ones first."""
    from servelm.worker.cuda_graphs import DecodeGraphs, eager_graph_keys

    kv = [(_cache(s, device), _cache(s, device))]

    def prefill(lens: list[int], width: int) -> Callable[[], None]:
        """Sequences of `lens` new tokens each (their whole context), block tables `width`
        wide, as the runner builds a step; logits of each sequence's last token."""
        def run() -> None:
            T = sum(lens)
            cu = torch.tensor([0] + list(lens), device=device).cumsum(0).to(torch.int32)
            meta = AttentionMetadata(
                slot_mapping=torch.arange(T, device=device) % s.block_size,
                query_start_loc=cu, seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                block_tables=torch.zeros(len(lens), width, dtype=torch.int32, device=device),
                max_query_len=max(lens), max_seq_len=max(lens), query_lens_cpu=tuple(lens),
                seq_lens_cpu=tuple(lens))
            ids = torch.zeros(T, dtype=torch.int64, device=device)
            pos = torch.cat([torch.arange(n, device=device) for n in lens])
            hidden = model(ids, pos, kv, meta)
            model.compute_logits(hidden[cu[1:].long() - 1])
        return run

    def decode(graphs: DecodeGraphs, bs: int, max_len: int) -> Callable[[], None]:
        """What a decode graph of `bs` rows runs (DecodeGraphs' own buffers and metadata)."""
        def run() -> None:
            meta = graphs._meta(bs, max_len)
            hidden = model(graphs.input_ids[:bs], graphs.positions[:bs], kv, meta)
            logits = model.compute_logits(hidden)
            logits.argmax(-1)
        return run

    def blocks(n: int) -> int:
        return min(-(-n // s.block_size), s.max_blocks_per_seq)

    yield "memory profile", True, prefill(list(s.profile_lens), blocks(max(s.profile_lens)))
    first = min(4, s.max_model_len - 1)  # a first prompt of <= block_size tokens: width 1
    yield "first prompt", True, prefill([first], blocks(first))
    if s.graph_keys:
        graphs = DecodeGraphs(lambda *a: None, s.max_graph_bs, s.max_blocks_per_seq, device,
                              s.max_model_len)
        eager = set(eager_graph_keys(s.max_graph_bs, s.max_model_len)) & set(s.graph_keys)
        for key in sorted(s.graph_keys, key=lambda k: k not in eager):
            bs, max_len = key
            yield f"decode graph {bs}x{max_len}", key in eager, decode(graphs, bs, max_len)
    # later eager steps: several sequences (chunked prefill, mixed batches) and wider block
    # tables; the number of sequences and the table width are specialized ints
    for num_seqs in (1, 2, 16):
        for width in (2, 16):
            if width <= s.max_blocks_per_seq and width * s.block_size < s.max_model_len:
                n = (width - 1) * s.block_size + 1  # just needs `width` blocks
                yield f"prefill {num_seqs}x{n}", False, prefill([n] * num_seqs, width)
    for num_seqs in (2, 16):
        yield f"prefill {num_seqs}x{first}", False, prefill([first] * num_seqs, blocks(first))


def _cache(s: DryRunShapes, device: torch.device) -> torch.Tensor:
    """One block of one layer's cache: [1, block_size, KVH, D] (fp8: [.., D + 4] uint8)."""
    if s.kv_cache_dtype == "fp8":
        return torch.zeros(1, s.block_size, s.num_kv_heads, s.head_dim + 4, device=device,
                           dtype=torch.uint8)
    return torch.zeros(1, s.block_size, s.num_kv_heads, s.head_dim, device=device, dtype=s.dtype)


@torch.inference_mode()
def record_kernel_jobs(model: nn.Module, s: DryRunShapes, device: torch.device) -> list[Job]:
    """The compile jobs of every dry-run step, deduplicated, required ones first."""
    from triton import knobs

    jobs: dict[tuple[str, str, str], bool] = {}
    required = True

    def hook(*, fn: Any, compile: dict, **_: Any) -> bool:
        key = (fn.module, fn.name, compile["specialization_data"])
        jobs[key] = jobs.get(key, False) or required
        return True  # skip: no compile, no launch

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        for _, required, run in dry_run_steps(model, s, device):
            run()
    finally:
        knobs.runtime.jit_cache_hook = previous
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sorted(((m, n, spec, req) for (m, n, spec), req in jobs.items()),
                  key=lambda j: not j[3])


# ---- the recorded list, kept beside the compile cache ---------------------------------------
# sources whose change may change which kernels a model launches, or how they specialize
_SOURCE_DIRS = ("kernels", "attention", "layers", "models", "quantization", "lora")


def job_list_path(cache_dir: str, *parts: Any) -> str:
    """Where the job list of this configuration is kept: keyed by ``parts`` (shapes, config,
    dtype, target, ...), the Triton and torch versions and servelm's model and kernel sources,
    so any change that could change the list records it again."""
    import hashlib
    import os

    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(repr((parts, triton.__version__, torch.__version__)).encode())
    for d in _SOURCE_DIRS:
        folder = os.path.join(root, d)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return os.path.join(cache_dir, "servelm-jobs", h.hexdigest()[:32] + ".json")


def load_job_list(path: str) -> Optional[list[Job]]:
    import json
    try:
        with open(path) as f:
            return [tuple(j) for j in json.load(f)]  # type: ignore[misc]
    except (OSError, ValueError):
        return None


def save_job_list(path: str, jobs: list[Job]) -> None:
    import json
    import os
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # tensor-parallel ranks may write it at once
        with open(tmp, "w") as f:
            json.dump(jobs, f)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: record again next time
        pass
