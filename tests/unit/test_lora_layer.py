"""LoRALinearMethod wraps any layer method: dense, int8 and int4 alike, output = the base
method's + each token's adapter product, part by part of a merged layer; the torch path (one
adapter, several, none) and the Triton kernels (CPU interpreter) against the plain formula;
the down projection's fused-activation entry; paging through the manager's slots."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from servelm.layers.activation import silu_and_mul
from servelm.layers.linear import Linear, process_weights_after_loading
from servelm.lora.layer import LoRABatch, LoRALinearMethod
from servelm.quantization import QuantConfig
from tests.unit.kernel_env import INTERPRET, ON_CUDA


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _linear(method, k, parts):
    q = None if method is None else QuantConfig(method, group_size=32)
    lin = Linear(k, parts, quantization=q, prefix="t")
    for i, n in enumerate(parts):
        lin.load_weight("weight", _rand(n, k, seed=i + 1) * 0.1, i)
    process_weights_after_loading(lin)
    return lin


def _adapters(k, parts, rank):
    """slot -> per part (A [r, k], B [n, r]) or None: slot 0 rank `rank` on every part, slot 1
    rank 4 on the first part only; slot 2 stays empty."""
    s0 = [(_rand(rank, k, seed=10 + i) * 0.3, _rand(n, rank, seed=20 + i) * 0.3)
          for i, n in enumerate(parts)]
    s1 = [(_rand(4, k, seed=30) * 0.3, _rand(parts[0], 4, seed=31) * 0.3)] + [None] * (len(parts) - 1)
    return {0: s0, 1: s1}


def _expected(base_y, x, slots, adapters, parts):
    ref = base_y.clone()
    off = np.cumsum([0] + parts)
    for t, s in enumerate(slots):
        if s < 0 or s not in adapters:
            continue
        for p, ab in enumerate(adapters[s]):
            if ab is not None:
                a, b = ab
                ref[t, off[p]:off[p + 1]] += (x[t] @ a.T) @ b.T
    return ref


MODES = ["torch"] + (["kernels"] if (INTERPRET or ON_CUDA) else [])


@pytest.mark.parametrize("method", [None, "int8", "int4"])
@pytest.mark.parametrize("parts", [[48], [40, 24, 24]])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("slots", [[-1, 0, 1, 0, 1, -1, 0], [0, 0, 0], [1, -1], [-1, -1, -1]],
                         ids=["mixed", "one", "partial", "none"])
def test_lora_adds_each_tokens_adapter(method, parts, mode, slots):
    k, rank = 64, 8
    lin = _linear(method, k, parts)
    x = _rand(len(slots), k, seed=99)
    base_y = lin(x)
    batch = LoRABatch(3, 16, torch.device("cpu"), use_kernels=mode == "kernels")
    lin.method = LoRALinearMethod(lin.method, lin, batch, 16, torch.float32, torch.device("cpu"))
    adapters = _adapters(k, parts, rank)
    for s, ab in adapters.items():
        lin.method.set_slot(s, ab)
    batch.set_tokens(np.array(slots))
    batch.prepare(len(slots))
    y = lin(x)
    ref = _expected(base_y, x, slots, adapters, parts)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if all(s < 0 for s in slots):
        assert torch.equal(y, base_y)
    else:
        assert not torch.allclose(y, base_y)  # (the adapters move the output)


@pytest.mark.parametrize("mode", MODES)
def test_down_projection_fused_activation(mode):
    inter, hidden = 64, 32
    lin = _linear(None, inter, [hidden])
    gate_up = _rand(5, 2 * inter, seed=7)
    act = silu_and_mul(gate_up, False)
    base_y = F.linear(act, lin.weight)
    batch = LoRABatch(2, 16, torch.device("cpu"), use_kernels=mode == "kernels")
    lin.method = LoRALinearMethod(lin.method, lin, batch, 8, torch.float32, torch.device("cpu"))
    a, b = _rand(8, inter, seed=1) * 0.3, _rand(hidden, 8, seed=2) * 0.3
    lin.method.set_slot(1, [(a, b)])
    slots = [1, -1, 1, 1, -1]
    batch.set_tokens(np.array(slots))
    batch.prepare(5)
    y = lin.forward_silu_mul(gate_up)
    ref = _expected(base_y, act, slots, {1: [(a, b)]}, [hidden])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_manager_pages_through_slots(tmp_path, tiny_model_factory):
    """Two slots, three adapters: the least recently used one not in the step goes; a
    step never evicts its own; the host cache is bounded."""
    from servelm.lora import LoRAConfig, LoRARequest
    from servelm.lora.manager import LoRAManager
    from tests.lora_utils import write_adapter
    from servelm.models.registry import build_model
    from servelm.attention import get_attention_backend
    d, hf = tiny_model_factory("llama")
    model = build_model(hf.config, get_attention_backend("torch", "cpu", 512), False)
    mgr = LoRAManager(LoRAConfig(2, 8, 2), model, hf.config, torch.float32,
                      torch.device("cpu"), 64, False)
    assert len(mgr.layers) == 4 * hf.config.num_hidden_layers
    loras = [LoRARequest(f"a{i}", i + 1, write_adapter(str(tmp_path / f"a{i}"), hf, rank=4,
                                                       seed=i)) for i in range(3)]
    assert mgr.activate([loras[0], None, loras[1]]).tolist() == [0, -1, 1]
    assert mgr.activate([loras[2], loras[1]]).tolist() == [0, 1]  # a0 (LRU, not needed) out
    # a2 and a1 ran in that step, in this order: a2 is the least recently used
    assert mgr.activate([loras[0]]).tolist() == [0]
    assert mgr.slot_ids == [1, 2]
    assert mgr.num_slot_loads == 4 and mgr.num_disk_reads == 4  # a0 read again (host: 2)
    assert len(mgr.host) == 2
    with pytest.raises(RuntimeError, match="max_loras"):
        mgr.activate(loras)


def test_manager_prefetches_in_the_background(tmp_path, tiny_model_factory):
    """Adapters of waiting requests are read by a background thread; the step that first runs
    one takes the read from there (one disk read in all)."""
    from servelm.lora import LoRAConfig, LoRARequest
    from servelm.lora.manager import LoRAManager
    from tests.lora_utils import write_adapter
    from servelm.models.registry import build_model
    from servelm.attention import get_attention_backend
    d, hf = tiny_model_factory("llama")
    model = build_model(hf.config, get_attention_backend("torch", "cpu", 512), False)
    mgr = LoRAManager(LoRAConfig(2, 8, 4), model, hf.config, torch.float32,
                      torch.device("cpu"), 64, False)
    lo = LoRARequest("p", 7, write_adapter(str(tmp_path / "p"), hf, rank=4, seed=3))
    mgr.prefetch([lo])
    assert 7 in mgr._reading
    mgr._reading[7].result(timeout=30)
    assert mgr.num_disk_reads == 1 and 7 not in mgr.host
    assert mgr.activate([lo]).tolist() == [0]
    assert mgr.num_disk_reads == 1 and 7 in mgr.host and not mgr._reading
    mgr.prefetch([lo])  # held already: nothing to read
    assert not mgr._reading
    # a finished read no step consumed joins the host cache at the next prefetch (bounded
    # there by max_cpu_loras, not left outstanding)
    lo2 = LoRARequest("q", 8, write_adapter(str(tmp_path / "q"), hf, rank=4, seed=4))
    mgr.prefetch([lo2])
    mgr._reading[8].result(timeout=30)
    mgr.prefetch([])
    assert 8 in mgr.host and not mgr._reading
