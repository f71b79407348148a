"""Multi-LoRA linear layers (Punica / S-LoRA segmented GEMMs): every token of a step may use
its own adapter, and all adapters run in two launches per layer.

    y [T, N] += ((x [T, K] @ A[slot(t)].T) [T, R]  --per part p-->  @ B[slot(t), part p].T)

Each token's adapter sits in a device slot 0..S-1 (-1: none). Per layer the adapters are
stacked: A [S, R, K] (shrink: K -> the rank), B [S, N, r] (expand: rank r -> N, the scaling
folded in). A merged projection (q|k|v, gate|up) has P parts: y's columns [off[p], off[p+1])
take rank columns [p*r, (p+1)*r) of the shrink output, so R = P*r.

``lora_segments`` sorts the token indices by slot (device ops, no host sync). The token axis
of either kernel's grid then counts blocks of BLOCK_M sorted positions, each slot's run padded
to a whole number of blocks (as moe_align pads experts, but worked out in the kernel: each
program scans the S + 1 segment starts to find its slot and rows). Its size is the most blocks
T tokens in S slots can need, (T + min(T, S) * (BLOCK_M - 1)) // BLOCK_M, a function of the
shapes alone, so a step stays capturable in a CUDA graph; programs past the last block return
at once. A program gathers its block's rows by index and reads its slot's weight tile once for
the whole block:

* shrink: grid (split-K x rank blocks, token blocks). Without split-K one more segment, the
  tokens without a slot, gets blocks whose rows are written 0. A decode step has few token
  blocks, so K is split too: each split writes its fp32 partial to a [SPLIT_K, T, R] scratch
  and a second kernel sums them in a fixed order (deterministic: no atomics) and writes every
  row of the output.
* expand: grid (column blocks of a part, token blocks, part). Each part's columns are blocked
  from its own offset, so a tile never mixes two parts of unequal or unaligned sizes. The
  rank dot accumulates in fp32 (B widened to fp32: exact for fp16/bf16 weights, TF32 on the
  tensor cores, which leaves this launch, bound by y's read and write, as fast), is added to
  y's value in fp32 and rounded once.

The plain PyTorch references (one matmul per slot present, also the CPU path) are
``lora_shrink_ref`` and ``lora_expand_ref``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---- segments ----------------------------------------------------------------------------


def lora_segments(token_lora: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_lora [T] int (each token's slot, -1 none) -> (sorted_tokens [T] int32: the token
    indices grouped by slot in slot order (stable), the tokens without a slot after them all;
    slot_start [num_slots + 1] int32: slot s's tokens are sorted_tokens[slot_start[s]:
    slot_start[s+1]], and slot_start[num_slots] is the number of tokens with a slot). Device ops
    only (no host sync: capturable in a CUDA graph). A slot outside [-1, num_slots) counts as
    none (a garbage id must not index the weights out of bounds)."""
    dev = token_lora.device
    lora = token_lora.reshape(-1).to(torch.int64)
    # [T]: none (and out of range) -> num_slots, which sorts after every slot
    key = torch.where((lora >= 0) & (lora < num_slots), lora, torch.full_like(lora, num_slots))
    # [S + 1] (scatter_add, not bincount: bincount's output size needs a host sync on CUDA)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, key, torch.ones_like(key))
    slot_start = torch.zeros(num_slots + 1, dtype=torch.int32, device=dev)
    slot_start[1:] = torch.cumsum(counts[:num_slots], 0)
    sorted_tokens = torch.argsort(key, stable=True).to(torch.int32)
    return sorted_tokens, slot_start


# ---- references (also the CPU path) --------------------------------------------------------


def _slot_groups(token_lora: torch.Tensor, num_slots: int):
    """(slot, token indices [n] int64) for each slot in [0, num_slots) that some token uses:
    one sort and one host sync."""
    lora = token_lora.reshape(-1).to(torch.int64)
    order = torch.argsort(lora, stable=True)
    slots, counts = torch.unique_consecutive(lora[order], return_counts=True)
    for s, idx in zip(slots.tolist(), order.split(counts.tolist())):
        if 0 <= s < num_slots:
            yield s, idx


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, token_lora: torch.Tensor) -> torch.Tensor:
    """x [T, K], a [S, R, K], token_lora [T] -> [T, R] float32: x[t] @ a[slot(t)].T in fp32,
    0 for the tokens without a slot."""
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for s, idx in _slot_groups(token_lora, a.shape[0]):
        out.index_copy_(0, idx, x.index_select(0, idx).float() @ a[s].float().T)
    return out


def lora_expand_ref(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, token_lora: torch.Tensor,
                    part_offsets: tuple[int, ...]) -> None:
    """In place: y[tok, off[p]:off[p+1]] += t[tok, p*r:(p+1)*r] @ b[slot(tok), off[p]:off[p+1]].T
    for the tokens with a slot (r = b.shape[2]), summed in fp32 and rounded once to y's dtype;
    the other rows untouched. y [T, N], t [T, P*r] fp32, b [S, N, r]."""
    r = b.shape[2]
    for s, idx in _slot_groups(token_lora, b.shape[0]):
        ts = t.index_select(0, idx).float()  # [n, P*r]
        acc = y.index_select(0, idx).float()  # [n, N]
        for p in range(len(part_offsets) - 1):
            lo, hi = part_offsets[p], part_offsets[p + 1]
            acc[:, lo:hi] += ts[:, p * r:(p + 1) * r] @ b[s, lo:hi].float().T
        y.index_copy_(0, idx, acc.to(y.dtype))


# ---- work blocks ---------------------------------------------------------------------------


def _block_m(T: int) -> int:
    # the rows of one slot's token block; 16 is tl.dot's least (decode), larger blocks read
    # each weight tile for more tokens when a prefill gives a slot many
    return 16 if T <= 128 else 32 if T <= 1024 else 64


def _num_blocks(T: int, num_segments: int, block_m: int) -> int:
    """The most token blocks T tokens in num_segments segments can need, each segment's run
    padded to block_m: (T + n * (block_m - 1)) // block_m with n = min(T, num_segments)
    segments holding any. A function of the shapes only: the grid's token axis."""
    return (T + min(T, num_segments) * (block_m - 1)) // block_m


@triton.jit
def _find_block(start_ptr, pid, S, T, NSEG, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Block pid of the segments' blocks of BLOCK_M sorted positions, counted segment by segment
    (segment s < S: slot s's tokens; segment S, when NSEG = S + 1: the tokens without a slot)
    -> (segment, its first position, the segment's end). The segment is >= NSEG past the last
    block. Every program rescans the S + 1 starts: O(S), nothing beside the grid to compute."""
    s = tl.arange(0, BLOCK_S)
    lo = tl.load(start_ptr + s, mask=s <= S, other=T)
    hi = tl.load(start_ptr + s + 1, mask=s < S, other=T)
    nb = tl.where(s < NSEG, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)  # [BLOCK_S] blocks
    ends = tl.cumsum(nb, 0)
    seg = tl.sum((ends <= pid).to(tl.int32), 0)  # empty segments are skipped over
    first = tl.sum(tl.where(s == seg, ends - nb, 0), 0)
    seg_lo = tl.sum(tl.where(s == seg, lo, 0), 0)
    seg_hi = tl.sum(tl.where(s == seg, hi, 0), 0)
    return seg, seg_lo + (pid - first) * BLOCK_M, seg_hi


# ---- shrink --------------------------------------------------------------------------------


def _shrink_block_r(R: int) -> int:
    # all of R in one block up to 128 (each x tile read once); above it 128-wide blocks unless
    # 64 pads less (R = 3 * 64 = 192: three blocks of 64, not 256 columns)
    if R <= 128:
        return max(16, triton.next_power_of_2(R))
    return 128 if triton.cdiv(R, 128) * 128 <= triton.cdiv(R, 64) * 64 else 64


# shrink programs a step aims for before it splits K (about two per SM of an H100/H200), the
# least K each split loops over, and the most splits (measured on one H200, bf16, 8 and 64
# slots: decode steps ran fastest at 8 splits of K = 4096 and 16 of K = 14336, more cost more
# in the second launch and the short loops than they gain; 64 slots at T = 256..2048, whose
# adapters' weights are most of the bytes, ran 1.1-1.9x faster at 256 programs than at 128)
_TARGET_PROGRAMS = 256
_MIN_SPLIT_K_CHUNK = 512
_MAX_SPLIT_K = 16
# the fp32 partials written and read back stay under this share of the bytes the shrink reads
# (8 slots at T = 2048, K = 4096: 3 splits ran 9.7 us, 6 splits 12.5 us)
_SCRATCH_SHARE = 1 / 8


def _shrink_config(T: int, K: int, R: int, S: int, dtype: torch.dtype) -> dict:
    """Tiles and the split of K, a function of the shapes only (capturable): K is split until
    the grid's token blocks times rank blocks reach _TARGET_PROGRAMS, each split looping over
    at least _MIN_SPLIT_K_CHUNK of K, at most _MAX_SPLIT_K splits, and the partials' traffic
    within _SCRATCH_SHARE of x's and the adapters' bytes. 128-wide K tiles in 4
    stages ran bf16 prefills (T = 8192) at 3.5-4 TB/s of x and A on one H200, twice as fast as
    64-wide ones in 3 stages; fp32 (the reference tests' models) keeps 32-wide tiles."""
    block_m = _block_m(T)
    block_r = _shrink_block_r(R)
    half = dtype != torch.float32
    block_k = min(128 if half else 32, max(16, triton.next_power_of_2(K)))
    busy = _num_blocks(T, S, block_m) * triton.cdiv(R, block_r)
    elt = torch.finfo(dtype).bits // 8
    read = (T + min(T, S) * R) * K * elt  # bytes of x and of the adapters in use
    by_scratch = int(read * _SCRATCH_SHARE) // (2 * T * R * 4)
    most = max(1, min(_MAX_SPLIT_K, K // max(_MIN_SPLIT_K_CHUNK, block_k), by_scratch))
    split_k = max(1, min(_TARGET_PROGRAMS // busy, most))
    return dict(block_m=block_m, block_r=block_r, block_k=block_k, split_k=split_k,
                num_warps=8 if block_m * block_r >= 64 * 128 else 4, num_stages=4 if half else 3)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, sorted_ptr, start_ptr, T, K, R, S, NSEG, K_CHUNK,
                   R_BLOCKS, stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_os,
                   stride_om, stride_or, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[split, tok, r] = sum over this split's K of x[tok, k] * a[slot, r, k] for one block
    of one slot's tokens and one BLOCK_R slice of R. Segment S (NSEG = S + 1, only without
    split-K): the tokens without a slot, whose rows get 0."""
    pid0 = tl.program_id(0)  # split * R_BLOCKS + rank block (adjacent: they share x's tiles)
    split = pid0 // R_BLOCKS
    rb = pid0 % R_BLOCKS
    slot, row0, seg_end = _find_block(start_ptr, tl.program_id(1), S, T, NSEG, BLOCK_M, BLOCK_S)
    if slot < NSEG:
        pos = row0 + tl.arange(0, BLOCK_M)
        valid = pos < seg_end
        tok = tl.load(sorted_ptr + pos, mask=valid, other=0).to(tl.int64)
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if slot < S:
            a_base = a_ptr + slot.to(tl.int64) * stride_as
            k_lo = split * K_CHUNK
            k_hi = tl.minimum(k_lo + K_CHUNK, K)  # K_CHUNK: a multiple of BLOCK_K
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < k_hi
                xt = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                             mask=valid[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
                at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                             mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
                acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        tl.store(out_ptr + split * stride_os + tok[:, None] * stride_om
                 + offs_r[None, :] * stride_or, acc, mask=valid[:, None] & r_ok[None, :])


@triton.jit
def _shrink_reduce_kernel(part_ptr, out_ptr, sorted_ptr, start_ptr, T, R, S, SPLIT_K,
                          stride_ps, stride_pm, stride_om, stride_or, BLOCK_M: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    """out[tok] = sum over the splits (in order) of part[split, tok] for BLOCK_M positions of
    sorted_tokens; 0 for the tokens without a slot (whose partial rows were never written)."""
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = pos < T
    tok = tl.load(sorted_ptr + pos, mask=valid, other=0).to(tl.int64)
    has = valid & (pos < tl.load(start_ptr + S))
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(part_ptr + s * stride_ps + tok[:, None] * stride_pm + offs_r[None, :],
                           mask=has[:, None] & r_ok[None, :], other=0.0)
        tl.store(out_ptr + tok[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
                 mask=valid[:, None] & r_ok[None, :])


def lora_shrink(x: torch.Tensor, a: torch.Tensor, sorted_tokens: torch.Tensor,
                slot_start: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] (fp32/fp16/bf16; any strides), a [S, R, K] of x's dtype, (sorted_tokens,
    slot_start) from lora_segments -> [T, R] float32: x[t] @ a[slot(t)].T, rows of the tokens
    without a slot 0. out: a [>= T, R] float32 buffer to write (its first T rows, all of them)
    and return a view of. No host sync; the grid depends on T, K, R and S only."""
    T, K = x.shape
    S, R, K_a = a.shape
    if K_a != K or a.dtype != x.dtype:
        raise ValueError(f"lora_shrink: a {tuple(a.shape)} {a.dtype} does not match "
                         f"x {tuple(x.shape)} {x.dtype} (want [S, R, {K}] {x.dtype})")
    if out is None:
        out = torch.empty(T, R, dtype=torch.float32, device=x.device)
    elif out.dtype != torch.float32 or out.shape[0] < T or out.shape[1] != R:
        raise ValueError(f"lora_shrink: out must be float32 [>= {T}, {R}], "
                         f"got {out.dtype} {tuple(out.shape)}")
    out = out[:T]
    if T == 0 or R == 0:
        return out
    if K == 0 or S == 0:
        return out.zero_()
    cfg = _shrink_config(T, K, R, S, x.dtype)
    block_m, block_r, block_k = cfg["block_m"], cfg["block_r"], cfg["block_k"]
    r_blocks = triton.cdiv(R, block_r)
    k_chunk = triton.cdiv(triton.cdiv(K, cfg["split_k"]), block_k) * block_k
    split_k = triton.cdiv(K, k_chunk)  # no split left without K
    # fp32 models (the reference tests) multiply in fp32, not TF32
    meta = dict(PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m,
                BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_S=triton.next_power_of_2(S + 1),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    strides = (x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2))
    if split_k == 1:
        # one more segment, the tokens without a slot: their rows are written 0
        _shrink_kernel[(r_blocks, _num_blocks(T, S + 1, block_m))](
            x, a, out, sorted_tokens, slot_start, T, K, R, S, S + 1, k_chunk, r_blocks,
            *strides, 0, out.stride(0), out.stride(1), **meta)
        return out
    part = torch.empty(split_k, T, R, dtype=torch.float32, device=x.device)  # [SPLIT_K, T, R]
    _shrink_kernel[(split_k * r_blocks, _num_blocks(T, S, block_m))](
        x, a, part, sorted_tokens, slot_start, T, K, R, S, S, k_chunk, r_blocks,
        *strides, part.stride(0), part.stride(1), part.stride(2), **meta)
    red_m = 16
    _shrink_reduce_kernel[(triton.cdiv(T, red_m),)](
        part, out, sorted_tokens, slot_start, T, R, S, split_k, part.stride(0), part.stride(1),
        out.stride(0), out.stride(1), BLOCK_M=red_m,
        BLOCK_R=min(128, max(16, triton.next_power_of_2(R))), num_warps=4)
    return out


# ---- expand --------------------------------------------------------------------------------

# parts one expand launch handles (q|k|v and gate|up take one; more take several)
_MAX_PARTS = 4


def _expand_config(T: int, N: int, r: int, dtype: torch.dtype) -> dict:
    """Tiles, a function of the shapes only (capturable). The launch is bound by y's read and
    write (measured on one H200, bf16: 128-wide column blocks ran prefills at 2.5-2.7 TB/s of
    y and B; 64-wide ones did better only at decode with rank 64, spreading its few rows over
    more programs)."""
    block_n = 64 if T <= 128 and r >= 64 else 128
    return dict(block_m=_block_m(T), block_n=block_n,
                block_rk=min(64, max(16, triton.next_power_of_2(r))), num_warps=4,
                num_stages=2)


@triton.jit
def _expand_kernel(y_ptr, t_ptr, b_ptr, sorted_ptr, start_ptr, T, S, RANK, PART_BASE,
                   OFF0, OFF1, OFF2, OFF3, OFF4, stride_ym, stride_yn, stride_tm, stride_tr,
                   stride_bs, stride_bn, stride_br, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RK: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    """y[tok, n] += sum_k t[tok, (PART_BASE + p) * RANK + k] * b[slot, n, k] for one block of
    one slot's tokens and one BLOCK_N block of part p's columns [OFF_p, OFF_p+1) (blocked from
    OFF_p: no tile spans two parts)."""
    pid_n = tl.program_id(0)
    p = tl.program_id(2)
    col_lo = tl.where(p == 0, OFF0, tl.where(p == 1, OFF1, tl.where(p == 2, OFF2, OFF3)))
    col_hi = tl.where(p == 0, OFF1, tl.where(p == 1, OFF2, tl.where(p == 2, OFF3, OFF4)))
    n0 = col_lo + pid_n * BLOCK_N
    slot, row0, seg_end = _find_block(start_ptr, tl.program_id(1), S, T, S, BLOCK_M, BLOCK_S)
    if (slot < S) & (n0 < col_hi):
        pos = row0 + tl.arange(0, BLOCK_M)
        valid = pos < seg_end
        tok = tl.load(sorted_ptr + pos, mask=valid, other=0).to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < col_hi
        ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = valid[:, None] & n_ok[None, :]
        old = tl.load(ptrs, mask=mask, other=0.0)  # issued first: the launch waits on y
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        rank_lo = (PART_BASE + p) * RANK
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, RANK, BLOCK_RK):
            offs_k = k0 + tl.arange(0, BLOCK_RK)
            k_ok = offs_k < RANK
            tt = tl.load(t_ptr + tok[:, None] * stride_tm + (rank_lo + offs_k)[None, :] * stride_tr,
                         mask=valid[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            bt = tl.load(b_base + offs_n[None, :].to(tl.int64) * stride_bn
                         + offs_k[:, None] * stride_br,
                         mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_RK, BLOCK_N]
            acc = tl.dot(tt, bt.to(tl.float32), acc, input_precision=PRECISION)
        tl.store(ptrs, (old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_expand(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, sorted_tokens: torch.Tensor,
                slot_start: torch.Tensor, part_offsets: tuple[int, ...]) -> None:
    """In place, for each part p: y[tok, off[p]:off[p+1]] += t[tok, p*r:(p+1)*r]
    @ b[slot(tok), off[p]:off[p+1], :].T for the tokens with a slot (r = b.shape[2], off =
    part_offsets: P + 1 ints from 0 to N), accumulated in fp32, added to y's value in fp32 and
    rounded once; the other rows of y untouched. y [T, N] fp32/fp16/bf16 (any strides), t
    [T, P*r] fp32, b [S, N, r] of y's dtype; (sorted_tokens, slot_start) from lora_segments.
    No host sync; the grid depends on the shapes and part_offsets only."""
    T, N = y.shape
    S, N_b, r = b.shape
    offs = tuple(int(o) for o in part_offsets)
    P = len(offs) - 1
    if (P < 1 or offs[0] != 0 or offs[-1] != N or N_b != N
            or any(hi < lo for lo, hi in zip(offs, offs[1:]))):
        raise ValueError(f"lora_expand: part_offsets {offs} must rise from 0 to N = {N} "
                         f"(y {tuple(y.shape)}, b {tuple(b.shape)})")
    if t.shape[0] != T or t.shape[1] < P * r or b.dtype != y.dtype:
        raise ValueError(f"lora_expand: want t [{T}, {P * r}] and b of y's dtype {y.dtype}, "
                         f"got t {tuple(t.shape)}, b {b.dtype}")
    if T == 0 or S == 0 or r == 0:
        return
    cfg = _expand_config(T, N, r, y.dtype)
    block_m, block_n = cfg["block_m"], cfg["block_n"]
    m_blocks = _num_blocks(T, S, block_m)
    for c in range(0, P, _MAX_PARTS):
        chunk = offs[c:c + _MAX_PARTS + 1]
        n_parts = len(chunk) - 1
        chunk = chunk + (chunk[-1],) * (_MAX_PARTS + 1 - len(chunk))
        n_blocks = max(triton.cdiv(hi - lo, block_n) for lo, hi in zip(chunk, chunk[1:]))
        if n_blocks == 0:
            continue
        _expand_kernel[(n_blocks, m_blocks, n_parts)](
            y, t, b, sorted_tokens, slot_start, T, S, r, c, *chunk,
            y.stride(0), y.stride(1), t.stride(0), t.stride(1),
            b.stride(0), b.stride(1), b.stride(2),
            # fp32 models multiply in fp32; fp16/bf16 weights are exact in TF32
            PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_RK=cfg["block_rk"],
            BLOCK_S=triton.next_power_of_2(S + 1), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
