"""Mixture-of-experts feed-forward in two grouped GEMM launches (all experts in one each):

    x [T, H] --(each token's top-k experts' w13)--> [T*k, 2I] --silu*up--> [T*k, I]
             --(w2, times the routing weight)--> [T*k, H] --sum over k--> [T, H]

The (token, choice) pairs are sorted by expert and each expert's run padded to BLOCK_M rows
(``moe_align``, on the device with no host sync, so a decode step stays capturable in a CUDA
graph); a program then multiplies one BLOCK_M x BLOCK_N tile of one expert, gathering its rows
of the activations by index and reading that expert's weight tile. Padding rows carry the
index T*k and are neither read nor written. The plain PyTorch reference (a loop over experts,
also the CPU path) is ``servelm.layers.fused_moe.fused_experts_ref``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from servelm.kernels.activation import silu_mul_rounded


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [P], block_experts [P // block_m]) with P the most rows
    padding can need (T*k + E*(block_m - 1), rounded up to block_m): the (token, choice) pair
    indices grouped by expert, each expert's group padded with T*k to a multiple of block_m,
    then T*k to the end; block_experts[b] is the expert of rows b*block_m.., -1 past the last
    group. Device ops only (no host sync)."""
    dev = topk_ids.device
    n = topk_ids.numel()
    P = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    # (clamped: the kernel warm-up's dry run skips the routing kernel, leaving ids
    # uninitialised, and an id outside [0, E) is an out-of-bounds index below: a device assert)
    flat = topk_ids.reshape(-1).to(torch.int64).clamp(0, num_experts - 1)
    # [E] (scatter_add, not bincount: bincount's output size needs a host sync on CUDA)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # [E]: each expert's first row
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert
    e_sorted = flat[order]
    first_of_e = torch.cumsum(counts, 0) - counts  # [E]: each expert's first slot in `order`
    rank = torch.arange(n, device=dev) - first_of_e[e_sorted]  # place within its expert
    sorted_ids = torch.full((P,), n, dtype=torch.int64, device=dev)
    sorted_ids[starts[e_sorted] + rank] = order
    # expert of each block: the last expert whose start is <= the block's first row (blocks
    # past the total of padded groups: -1)
    block_start = torch.arange(0, P, block_m, device=dev)
    total = padded.sum()
    be = torch.searchsorted(starts, block_start, right=True) - 1
    # experts with no rows share their start with the next one: searchsorted(right) picks the
    # last of them, which is the one whose rows begin there
    block_experts = torch.where(block_start < total, be, torch.full_like(be, -1))
    return sorted_ids, block_experts


# at most this many (token, choice) pairs: one block per pair, no sort (fused_experts)
DECODE_PAIRS = 32


@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr,
                  RENORM: tl.constexpr, BLOCK_E: tl.constexpr):
    """One token: softmax over its E router logits (fp32), the TOP_K largest (ties: the lower
    expert id first, as torch.topk), renormalised to sum 1 when RENORM."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=ok, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(ok, p, -1.0)
    total = 0.0
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        # (clamped: NaN scores, as the kernel warm-up's uninitialised weights give, match
        # nothing, and an expert id past E would read outside the weights)
        idx = tl.minimum(tl.min(tl.where(p == best, offs, BLOCK_E), 0), E - 1)
        tl.store(w_ptr + t * TOP_K + j, best)
        tl.store(ids_ptr + t * TOP_K + j, idx.to(tl.int64))
        total += best
        p = tl.where(offs == idx, -1.0, p)
    if RENORM:
        for j in tl.static_range(TOP_K):
            w = tl.load(w_ptr + t * TOP_K + j)
            tl.store(w_ptr + t * TOP_K + j, w / total)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts (layers/fused_moe.py) in one launch: router_logits [T, E] ->
    (weights [T, k] fp32, ids [T, k] int64)."""
    T, E = router_logits.shape
    logits = router_logits.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, w, ids, E, logits.stride(0), TOP_K=top_k, RENORM=renormalize,
                            BLOCK_E=max(16, triton.next_power_of_2(E)), num_warps=4)
    return w, ids


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, weight_ptr, sorted_ptr, expert_ptr, scale_ptr,
                     N, K, num_pairs, stride_am, stride_we, stride_wn, stride_cm, stride_se,
                     TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     SILU_MUL: tl.constexpr, PAIR_BLOCKS: tl.constexpr, HAS_SCALE: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """C[pair, n] = sum_k A[row(pair), k] * W[expert, n, k] (x routing weight of the pair),
    for the pairs of one block and one BLOCK_N slice of N. row(pair) is pair // TOP_K when A
    holds one row per token, else pair. SILU_MUL: W's rows N.. are the up projection, and C
    gets silu(gate) * up (rounded as the activation kernel rounds). PAIR_BLOCKS: block b is
    pair b alone (expert_ptr: each pair's expert), else the rows of sorted_ptr's block b.
    HAS_SCALE: W holds quantized rows (int8 / e4m3), converted to A's dtype for the dot; the
    accumulator's column n is then scaled by scale[expert, n] (n + N for the up rows)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ptr + pid_m)
    if expert >= 0:
        rows = tl.arange(0, BLOCK_M)
        if PAIR_BLOCKS:
            pairs = tl.where(rows == 0, pid_m, num_pairs).to(tl.int64)
        else:
            pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + rows)
        valid = pairs < num_pairs
        a_rows = pairs // TOP_K if A_PER_TOKEN else pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            wmask = n_ok[None, :] & k_ok[:, None]
            w = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                        mask=wmask, other=0.0)  # [BLOCK_K, BLOCK_N]
            if HAS_SCALE:
                w = w.to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if SILU_MUL:
                u = tl.load(w_base + (N + offs_n[None, :]).to(tl.int64) * stride_wn
                            + offs_k[:, None], mask=wmask, other=0.0)
                if HAS_SCALE:
                    u = u.to(a.dtype)
                acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
        if HAS_SCALE:
            s_base = scale_ptr + expert.to(tl.int64) * stride_se
            acc = acc * tl.load(s_base + offs_n, mask=n_ok, other=0.0)[None, :]
            if SILU_MUL:
                acc_up = acc_up * tl.load(s_base + N + offs_n, mask=n_ok, other=0.0)[None, :]
        if SILU_MUL:
            dt = c_ptr.dtype.element_ty
            out = silu_mul_rounded(acc.to(dt), acc_up.to(dt))
        else:
            out = acc
            if MUL_WEIGHT:
                rw = tl.load(weight_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
                out = out * rw[:, None]
        tl.store(c_ptr + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :],
                 out.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, topk_weights: torch.Tensor,
              sorted_ids: torch.Tensor, block_experts: torch.Tensor, top_k: int,
              a_per_token: bool, mul_weight: bool, silu_mul: bool, pair_blocks: bool,
              block_m: int, scale: torch.Tensor | None = None) -> None:
    # a [rows, K] (K contiguous); w [E, N (x2 with silu_mul: gate, then up), K]; out [T*k, N]
    N, K = out.shape[1], w.shape[2]
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_k = min(64, max(16, triton.next_power_of_2(K)))
    grid = (block_experts.numel(), triton.cdiv(N, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, topk_weights, sorted_ids, block_experts,
        scale if scale is not None else topk_weights, N, K, out.shape[0],
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        scale.stride(0) if scale is not None else 0,
        TOP_K=top_k, A_PER_TOKEN=a_per_token, MUL_WEIGHT=mul_weight, SILU_MUL=silu_mul,
        PAIR_BLOCKS=pair_blocks, HAS_SCALE=scale is not None,
        # fp32 models (the reference tests) multiply in fp32, not TF32
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fused_experts_ref's contract (quantized rows with their scales too) in two grouped GEMM
    launches (the first with the activation in its epilogue), then the sum over the k
    choices."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    x = x.contiguous()
    block_m = 16
    pair_blocks = T * k <= DECODE_PAIRS
    if pair_blocks:
        # a decode step's few pairs: one block per pair, in the order routed (no sort, whose
        # ~15 small ops dominate a batch-1 step; an expert two tokens share is read twice,
        # rare at these sizes)
        sorted_ids, block_experts = topk_ids, topk_ids.reshape(-1)
    else:
        # larger batches route many pairs to each expert: small row blocks pad less
        block_m = 16 if T * k <= 64 * E else 64
        sorted_ids, block_experts = moe_align(topk_ids, E, block_m)
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty(T * k, two_i // 2, dtype=x.dtype, device=x.device)  # silu(gate) * up
    _moe_gemm(x, w13, act, weights, sorted_ids, block_experts, k, True, False, True,
              pair_blocks, block_m, w13_scale)
    y = torch.empty(T * k, H, dtype=torch.float32, device=x.device)
    _moe_gemm(act, w2, y, weights, sorted_ids, block_experts, k, False, True, False,
              pair_blocks, block_m, w2_scale)
    return y.view(T, k, H).sum(1).to(x.dtype)
