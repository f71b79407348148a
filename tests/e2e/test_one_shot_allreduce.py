"""The one-shot peer-memory all-reduce (distributed/one_shot.py) on 2 GPUs: every rank's sum of
random tensors of many shapes and dtypes equals the plain PyTorch sum of all ranks' inputs,
eagerly and replayed in a CUDA graph with new inputs each time; tensors over its size limit go
to NCCL with the same result. Skipped without 2 GPUs (CI has none)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

WS = 2
# numels: odd, a warp's worth, one decode row of 4096, 64 rows of 4096 bf16 (512 KiB: the limit)
NUMELS = [1, 7, 33, 1000, 4096, 3 * 4096 + 5, 64 * 4096]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _inputs(numel: int, dtype: torch.dtype, step: int, device) -> list[torch.Tensor]:
    """Every rank's input of this case (each rank draws all of them: the reference sum)."""
    out = []
    for r in range(WS):
        g = torch.Generator(device="cpu").manual_seed(numel * 1000 + step * 10 + r)
        out.append(torch.randn(numel, generator=g).to(dtype).to(device))
    return out


def _rank(rank: int, port: int, errors) -> None:
    from servelm.config import ParallelConfig
    from servelm.distributed.init import close_group, make_groups, make_store
    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        store = make_store("127.0.0.1", port, WS, rank)
        g = make_groups(store, rank, ParallelConfig(tensor_parallel_size=WS), "cuda:%d" % rank)
        tp = g.tp
        assert tp.one_shot is not None, "the one-shot all-reduce was not set up"
        assert torch.bfloat16 in tp.one_shot.dtypes  # (fp16 goes to NCCL in PyTorch 2.11)
        for dtype in DTYPES:
            for numel in NUMELS:
                xs = _inputs(numel, dtype, 0, device)
                want = (xs[0].float() + xs[1].float()).to(dtype)  # two terms: exact either order
                x = xs[rank].clone()
                n = numel * x.element_size()
                assert tp.one_shot.fits(x) == (dtype in tp.one_shot.dtypes and n % 4 == 0
                                               and n <= tp.one_shot.max_bytes)
                got = tp.all_reduce(x)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        # captured in a graph, replayed with new inputs copied into the static one
        static = torch.empty(4096 * 8, dtype=torch.bfloat16, device=device)
        static.copy_(_inputs(static.numel(), torch.bfloat16, 0, device)[rank])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            tp.all_reduce(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tp.all_reduce(static) * 1  # (a later op reads the sum inside the graph)
        for step in range(1, 6):
            xs = _inputs(static.numel(), torch.bfloat16, step, device)
            static.copy_(xs[rank])
            graph.replay()
            torch.testing.assert_close(out, (xs[0].float() + xs[1].float()).bfloat16(),
                                       rtol=0, atol=0)
        # over the limit: NCCL, in place, the same sum
        big = _inputs(tp.one_shot.max_bytes // 2 + 64, torch.bfloat16, 9, device)
        x = big[rank].clone()
        assert not tp.one_shot.fits(x)
        torch.testing.assert_close(tp.all_reduce(x), (big[0].float() + big[1].float()).bfloat16(),
                                   rtol=0, atol=0)
        torch.cuda.synchronize()
        del graph
        for group in g.distinct():
            close_group(group)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback
        errors.put(f"rank {rank}: {e!r}\n{traceback.format_exc()}")


def test_one_shot_all_reduce_matches_the_sum():
    import torch.multiprocessing as mp

    from servelm.distributed.init import free_port
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, errors)) for r in range(WS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert not alive, "a rank hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
