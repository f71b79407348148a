"""The CPU attention backend (attention/cpu_backend.py: csrc/decode.c's paged attention for
prompts and decode rows) against the per-sequence PyTorch reference (paged_attention_ref), on
ragged batches: whole prompts, chunks after a cached prefix, one-token rows beside them,
decode-only steps; GQA and plain heads; fp32 and bf16 caches over shuffled blocks whose unused
entries hold NaN; and the steps it leaves to the reference (window, soft-capping, trees)."""
import pytest
import torch

from servelm.attention.backend import AttentionMetadata
from servelm.attention.cpu_backend import CpuAttentionBackend
from servelm.attention.torch_ref import paged_attention_ref
from servelm.cpu import native
from tests.conftest import shuffled_block_tables

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler: no CPU kernels")


def _case(q_lens, ctx_lens, H, KVH, D, bs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S = len(q_lens)
    nb = sum(-(-n // bs) for n in ctx_lens) + 4
    k_cache = torch.full((nb, bs, KVH, D), float("nan"), dtype=dtype)
    v_cache = torch.full((nb, bs, KVH, D), float("nan"), dtype=dtype)
    tables = shuffled_block_tables(ctx_lens, bs, nb, g,
                                   width=max(-(-n // bs) for n in ctx_lens) + 1)
    for i, n in enumerate(ctx_lens):
        for t in range(n):  # only the sequence's own tokens hold numbers
            blk, off = int(tables[i, t // bs]), t % bs
            k_cache[blk, off] = torch.randn(KVH, D, generator=g).to(dtype)
            v_cache[blk, off] = torch.randn(KVH, D, generator=g).to(dtype)
    T = sum(q_lens)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.zeros(T, dtype=torch.int64), query_start_loc=qsl,
                             seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
                             block_tables=tables, max_query_len=max(q_lens),
                             max_seq_len=max(ctx_lens), query_lens_cpu=tuple(q_lens),
                             seq_lens_cpu=tuple(ctx_lens))
    q = (torch.randn(T, H, D, generator=g) * 2).to(dtype)
    return q, k_cache, v_cache, meta


CASES = [  # (query lens, context lens, H, KVH, D, block size, cache dtype)
    ([7], [7], 4, 4, 16, 4, torch.float32),                       # one whole prompt
    ([300, 1, 40], [300, 90, 140], 9, 3, 64, 16, torch.float32),  # SmolLM2's heads; prefix hits
    ([33, 5], [33, 200], 8, 2, 128, 16, torch.bfloat16),          # Llama-3's heads, bf16 cache
    ([1, 1, 1], [5, 77, 301], 6, 2, 64, 4, torch.float32),        # decode only
    ([12, 3], [50, 3], 6, 1, 40, 8, torch.bfloat16),              # general head sizes
    ([20], [29], 4, 2, 36, 4, torch.float32),                     # scalar tails
]


@pytest.mark.parametrize("q_lens,ctx_lens,H,KVH,D,bs,dtype", CASES)
def test_cpu_backend_matches_reference(q_lens, ctx_lens, H, KVH, D, bs, dtype):
    q, kc, vc, meta = _case(q_lens, ctx_lens, H, KVH, D, bs, dtype, seed=sum(ctx_lens) + D)
    scale = D ** -0.5
    out = CpuAttentionBackend().forward(q, None, None, kc, vc, meta, scale)
    ref = paged_attention_ref(q.float(), kc, vc, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "read a cache entry outside a sequence's context"
    # outputs are convex combinations of V rows (|v| <~ 5): fp32 sums in another order, then the
    # cast to the model dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * 5, err


def test_cpu_backend_leaves_the_rest_to_the_reference(monkeypatch):
    """A sliding window, soft-capping or a token tree: the reference computes the step (the
    C kernels are never called), with the reference's numbers."""
    import servelm.cpu.ops as ops
    q, kc, vc, meta = _case([6, 1], [30, 12], 4, 2, 16, 4, torch.float32, seed=3)
    calls = []
    for name in ("causal_attention", "paged_attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    be = CpuAttentionBackend()
    for window, softcap in ((8, 0.0), (0, 20.0)):
        out = be.forward(q, None, None, kc, vc, meta, 0.25, window=window, softcap=softcap)
        ref = paged_attention_ref(q, kc, vc, meta, 0.25, window=window, softcap=softcap)
        assert torch.allclose(out, ref, atol=1e-6)
    assert not calls
    be.forward(q, None, None, kc, vc, meta, 0.25)
    assert len(calls) == 2  # and the plain step takes the C kernels, once per sequence


def test_auto_backend_on_the_cpu():
    from servelm.attention import resolve_attention_backend
    assert resolve_attention_backend("auto", "cpu") == "cpu"
    assert resolve_attention_backend("torch", "cpu") == "torch"


def test_cpu_cache_dtype_defaults(tiny_model_factory, monkeypatch):
    """dtype "auto" on a CPU without native bf16 computes in fp32 and keeps a bf16 cache (half
    the bytes decode attention reads); with native bf16 both are bf16; an explicit dtype keeps
    its cache (fp32 stays exact against transformers), and an explicit kv_cache_dtype wins."""
    import servelm.config as config
    from servelm.config import EngineArgs
    path, _ = tiny_model_factory("llama")

    def resolved(native_bf16, **kw):
        monkeypatch.setattr(config, "_cpu_has_native_bf16", lambda: native_bf16)
        c = EngineArgs(model=path, device="cpu", skip_tokenizer_init=True, **kw).create_engine_config()
        return c.model.dtype, c.cache.cache_dtype

    assert resolved(False) == (torch.float32, "bfloat16")
    assert resolved(True) == (torch.bfloat16, "auto")
    assert resolved(False, dtype="float32") == (torch.float32, "auto")
    assert resolved(False, kv_cache_dtype="fp8") == (torch.float32, "fp8")
