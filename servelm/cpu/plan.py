"""Describes a loaded Llama-family model to the C decode step (csrc/decode.c): one ``SlModel``
holding pointers to every weight where its linear method keeps it (no copies but the fp32 norm
weights and biases), and the KV caches.

Which layouts the C step reads is decided here, per linear method: a layer whose method has no
entry in ``_PROJECTIONS`` (or a format it does not read) makes ``build_plan`` return None with
the reason, and the model keeps the PyTorch path. The tensors the structs point at are kept
alive by the plan object."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from servelm.cpu import native
from servelm.cpu.blocks import mat_fields
from servelm.cpu.native import SL_BF16, SL_F32, SL_Q4_0, SL_Q4_1, SL_Q8_0, SlLayer, SlModel, SlProj

_DENSE = {torch.float32: SL_F32, torch.bfloat16: SL_BF16}
_GGUF_TYPES = (SL_Q4_0, SL_Q4_1, SL_Q8_0)


class Unsupported(Exception):
    """The model (or one layer) has something the C step does not read: the PyTorch path runs."""


@dataclass
class NativePlan:
    """The struct the C step reads, and the tensors it points into."""

    model: SlModel
    layers: Any  # the SlLayer array
    keep: list = field(default_factory=list)
    max_rows: int = 0


def _dense_part(w: torch.Tensor, off: int, keep: list) -> tuple:
    if w.dtype not in _DENSE or w.dim() != 2:
        raise Unsupported(f"dense weights of {w.dtype}")
    w = w.contiguous()
    keep.append(w)
    return (_DENSE[w.dtype], w.shape[0], w.shape[1], off, w.shape[1] * w.element_size(),
            w.data_ptr(), None, None, 32, 0)


def _unquantized_parts(layer, method, keep: list) -> list[tuple]:
    return [_dense_part(layer.weight, 0, keep)]


def _gguf_parts(layer, method, keep: list) -> list[tuple]:
    parts = []
    for j, (kind, lo, hi) in enumerate(method.groups):
        if kind is None:
            parts.append(_dense_part(getattr(layer, f"weight_{j}"), lo, keep))
            continue
        blocks = method.split_blocks(layer, j)  # the C kernels' layout (cpu/blocks.py)
        if blocks is None:
            raise Unsupported(f"GGUF type {kind} in {layer.prefix}")
        keep.append(blocks)
        t, rb, data, d, m, group, sdt = mat_fields(blocks)
        parts.append((t, hi - lo, layer.input_size_per_rank, lo, rb, data, d, m, group, sdt))
    return parts


def _int8_parts(layer, method, keep: list) -> list[tuple]:
    """int8 weight-only: qweight int8 [N, K] read as Q8 codes, scales [N, groups]."""
    q, s = layer.qweight, layer.scales
    g = method.group_size
    k = q.shape[1]
    if k % 32 or g % 32 or s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Unsupported(f"{layer.prefix}: int8 with K={k}, group {g}")
    q, s = q.contiguous(), s.contiguous()
    keep += [q, s]
    return [(SL_Q8_0, q.shape[0], k, 0, k, q.data_ptr(), s.data_ptr(), None, g,
             native.SCALE_DTYPES[str(s.dtype).removeprefix("torch.")])]


def _int4_parts(layer, method, keep: list) -> list[tuple]:
    """int4 (and GPTQ/AWQ) weight-only: the kernels' copy made at load (cpu/blocks.py)."""
    blocks = method.cpu_blocks(layer)
    if blocks is None:
        raise Unsupported(f"{layer.prefix}: int4 layout (act-order, or K / group not a multiple "
                          "of 32)")
    keep.append(blocks)
    t, rb, data, d, m, group, sdt = mat_fields(blocks)
    return [(t, layer.output_size_per_rank, layer.input_size_per_rank, 0, rb, data, d, m,
             group, sdt)]


# linear method class name -> its weights as (type, n, k, out_off, row_bytes, data, d, m, group,
# scale dtype) parts
_PROJECTIONS: dict[str, Callable[[Any, Any, list], list[tuple]]] = {
    "UnquantizedLinearMethod": _unquantized_parts,
    "GGUFLinearMethod": _gguf_parts,
    "Int8LinearMethod": _int8_parts,
    "Int4LinearMethod": _int4_parts,
    "GPTQLinearMethod": _int4_parts,
    "AWQLinearMethod": _int4_parts,
}


def projection(layer, keep: list, with_bias: bool = True) -> SlProj:
    """A ``layers.linear.Linear`` as the C struct (its method's own tensors, in place); the
    bias too unless ``with_bias`` is off (a caller that adds it itself). A LoRA-wrapped
    method (lora/layer.py) is its base method's weights plus its adapter slots."""
    method = layer.method
    lora = method if type(method).__name__ == "LoRALinearMethod" else None
    if lora is not None:
        method = lora.base
    fn = _PROJECTIONS.get(type(method).__name__)
    if fn is None:
        raise Unsupported(f"linear method {type(method).__name__} ({layer.prefix})")
    if getattr(layer, "_sums_over_ranks", False) or layer.tp.world_size > 1:
        raise Unsupported("tensor parallelism")
    parts = fn(layer, method, keep)
    if len(parts) > 3:
        raise Unsupported(f"{layer.prefix} has {len(parts)} weight groups")
    p = SlProj()
    p.nparts, p.n = len(parts), layer.output_size_per_rank
    for i, part in enumerate(parts):
        _set_mat(p.part[i], *part)
    p.bias = _f32(layer.bias, keep) if with_bias and layer.bias is not None else None
    if lora is not None:
        _set_lora(p.lora, lora, keep)
    return p


def _set_lora(lo, method, keep: list) -> None:
    """The adapter slots of a LoRALinearMethod, read in place (slots are filled by copying
    into these tensors, so the pointers stay valid)."""
    a, b = method.a, method.b
    if a.dtype not in _DENSE or b.dtype != a.dtype or len(method.part_offsets) > 4:
        raise Unsupported(f"LoRA slots of {a.dtype} / {len(method.part_offsets) - 1} parts")
    if not (a.is_contiguous() and b.is_contiguous()):
        raise Unsupported("non-contiguous LoRA slots")
    keep += [a, b]
    lo.a, lo.b = a.data_ptr(), b.data_ptr()
    lo.rank, lo.nparts = method.rank, len(method.part_offsets) - 1
    lo.bf16 = int(a.dtype == torch.bfloat16)
    for i, off in enumerate(method.part_offsets):
        lo.off[i] = off


def _set_mat(mat, t, n, k, off, row_bytes, data, d, m, group, scale_dtype) -> None:
    mat.type, mat.n, mat.k, mat.out_off = t, n, k, off
    mat.row_bytes, mat.data, mat.d, mat.m = row_bytes, data, d, m
    mat.group, mat.scale_dtype = group, scale_dtype


def _f32(t: torch.Tensor, keep: list) -> int:
    t = t.detach().float().contiguous()
    keep.append(t)
    return t.data_ptr()


def build_plan(model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_rows: int,
               max_ctx: int) -> NativePlan:
    """The C step's view of ``model`` (a models.llama.LlamaForCausalLM) and its caches, for up
    to ``max_rows`` sequences of up to ``max_ctx`` tokens. Raises Unsupported (with the reason)
    when some part of it is not something the C step reads."""
    a = getattr(model, "args", None)
    if a is None or not hasattr(model, "layers") or not hasattr(model, "embed_tokens"):
        raise Unsupported(f"model class {type(model).__name__}")
    k0 = kv_caches[0][0]
    if k0.dtype not in (torch.float32, torch.bfloat16) or k0.dim() != 4:
        raise Unsupported(f"KV cache of {k0.dtype}")
    keep: list = []
    layers = (SlLayer * a.num_layers)()
    for i, (layer, (kc, vc)) in enumerate(zip(model.layers, kv_caches)):
        att, mlp = layer.self_attn, layer.mlp
        if not hasattr(mlp, "gate_up_proj") or type(mlp).__name__ != "LlamaMLP":
            raise Unsupported(f"layer {i}'s feed-forward block ({type(mlp).__name__})")
        if att.window or att.softcap or type(layer).__name__ != "LlamaDecoderLayer":
            raise Unsupported(f"layer {i}'s attention (a sliding window, soft-capping, or "
                              "another layer layout)")
        L = layers[i]
        L.attn_norm = _f32(layer.input_layernorm.weight, keep)
        L.ffn_norm = _f32(layer.post_attention_layernorm.weight, keep)
        L.q_norm = _f32(att.q_norm.weight, keep) if att.q_norm is not None else None
        L.k_norm = _f32(att.k_norm.weight, keep) if att.k_norm is not None else None
        L.qkv, L.o = projection(att.qkv_proj, keep), projection(att.o_proj, keep)
        L.gate_up, L.down = projection(mlp.gate_up_proj, keep), projection(mlp.down_proj, keep)
        if not (kc.is_contiguous() and vc.is_contiguous()):
            raise Unsupported("non-contiguous KV cache")
        L.k_cache, L.v_cache = kc.data_ptr(), vc.data_ptr()
    m = SlModel()
    m.hidden, m.n_heads, m.n_kv_heads = a.hidden_size, a.num_heads, a.num_kv_heads
    m.head_dim, m.inter, m.n_layers, m.vocab = a.head_dim, a.intermediate_size, a.num_layers, a.vocab_size
    m.block_size, m.kv_bf16 = k0.shape[1], int(k0.dtype == torch.bfloat16)
    m.max_ctx, m.max_rows = max_ctx, max_rows
    lora_layers = [layer.self_attn.qkv_proj.method for layer in model.layers]
    m.lora_rank = max((getattr(x, "rank", 0) for x in lora_layers
                       if type(x).__name__ == "LoRALinearMethod"), default=0)
    m.eps, m.scale = a.rms_norm_eps, a.head_dim ** -0.5
    cos_sin = model.layers[0].self_attn.rotary.cos_sin_cache
    m.cos_sin = _f32(cos_sin, keep)
    if cos_sin.shape[0] < max_ctx:
        raise Unsupported(f"rotary table of {cos_sin.shape[0]} positions < {max_ctx}")
    m.final_norm = _f32(model.norm.weight, keep)
    if model.lm_head is not None:
        m.head = projection(model.lm_head, keep)
    else:  # tied: the embedding matrix is the head
        p = SlProj()
        p.nparts, p.n = 1, a.vocab_size
        _set_mat(p.part[0], *_dense_part(model.embed_tokens.weight, 0, keep))
        m.head = p
    m.layers = ctypes.cast(layers, ctypes.POINTER(SlLayer))
    return NativePlan(m, layers, keep, max_rows)
