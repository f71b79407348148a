"""Linear layers through the LinearMethod seam: merged parts, tensor-parallel shards sliced by the
method from whole checkpoint tensors (rank and world size from a ParallelGroup, no process group
needed to check the slicing), process_after_loading, and the quantization registry."""
from __future__ import annotations

import pytest
import torch

from servelm.distributed import ParallelGroup
from servelm.layers.linear import Linear, process_weights_after_loading
from servelm.quantization import QUANTIZATION_METHODS, check_quantization, get_linear_method
from servelm.quantization.unquantized import UnquantizedLinearMethod


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_merged_parts_load_and_apply():
    lin = Linear(8, [6, 4, 4], bias=True, prefix="qkv")
    parts = [_w(n, 8, seed=i) for i, n in enumerate([6, 4, 4])]
    biases = [_w(n, seed=10 + i) for i, n in enumerate([6, 4, 4])]
    for i, (w, b) in enumerate(zip(parts, biases)):
        lin.load_weight("weight", w, i)
        lin.load_weight("bias", b, i)
    x = _w(3, 8, seed=99)
    torch.testing.assert_close(lin(x), x @ torch.cat(parts).T + torch.cat(biases))
    assert isinstance(lin.method, UnquantizedLinearMethod)


@pytest.mark.parametrize("world", [2, 4])
def test_column_parallel_shards_are_each_parts_rows(world):
    parts = [_w(8, 6, seed=1), _w(4, 6, seed=2)]
    outs = []
    for rank in range(world):
        lin = Linear(6, [8, 4], parallel="column", tp=ParallelGroup(rank, world), prefix="gate_up")
        for i, w in enumerate(parts):
            lin.load_weight("weight", w, i)
        assert lin.weight.shape == (12 // world, 6)
        outs.append(lin.weight.data)
    # rank r holds rows [r*n/ws, (r+1)*n/ws) of every part, parts stacked in order
    for rank, w in enumerate(outs):
        want = torch.cat([p[rank * p.shape[0] // world:(rank + 1) * p.shape[0] // world]
                          for p in parts])
        torch.testing.assert_close(w, want)


def test_row_parallel_shards_sum_to_the_full_product():
    w, x = _w(5, 8, seed=3), _w(2, 8, seed=4)
    total = torch.zeros(2, 5)
    for rank in range(2):
        lin = Linear(8, 5, parallel="row", tp=ParallelGroup(rank, 2), prefix="down")
        lin.load_weight("weight", w)
        assert lin.weight.shape == (5, 4)
        total += lin.method.apply(lin, x[:, rank * 4:(rank + 1) * 4])  # the all-reduce, by hand
    torch.testing.assert_close(total, x @ w.T)


def test_bad_shapes_and_splits_are_errors():
    lin = Linear(8, [6, 4], prefix="qkv")
    with pytest.raises(ValueError, match="has 5 rows, expected 6"):
        lin.load_weight("weight", _w(5, 8), 0)
    with pytest.raises(ValueError, match="part 2 does not exist"):
        lin.load_weight("weight", _w(4, 8), 2)
    with pytest.raises(ValueError, match="a bias this layer was built without"):
        lin.load_weight("bias", _w(6), 0)
    with pytest.raises(ValueError, match="no place"):
        lin.load_weight("qweight", _w(6, 8), 0)
    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        Linear(8, [6, 4], parallel="column", tp=ParallelGroup(0, 4), prefix="qkv")
    with pytest.raises(ValueError, match="outside a group"):
        ParallelGroup(2, 2)


def test_process_after_loading_reaches_every_linear():
    seen = []

    class Recording(UnquantizedLinearMethod):
        def process_after_loading(self, layer):
            seen.append(layer.prefix)

    model = torch.nn.Sequential(Linear(4, 4, prefix="a"), Linear(4, 4, prefix="b"))
    for m in model:
        m.method = Recording()
    process_weights_after_loading(model)
    assert seen == ["a", "b"]


def test_quantization_registry():
    assert "unquantized" in QUANTIZATION_METHODS
    assert check_quantization(None) is None
    assert isinstance(get_linear_method(None, "layers.0.mlp.down_proj"), UnquantizedLinearMethod)
    with pytest.raises(ValueError, match="quantization must be one of 'none', 'unquantized', 'fp8'.*; got 'awq9'"):
        check_quantization("awq9")
