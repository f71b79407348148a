"""QuantConfig: the one quantization decision of a model, resolved once from the ``quantization``
engine argument, the checkpoint's ``quantization_config`` (config.json) and its format.

| method | weights in memory | where they come from |
|---|---|---|
| ``none`` | as stored (bf16/fp16/fp32; GGUF dequantized at load) | any checkpoint |
| ``fp8`` | e4m3, a scale per output channel; activations quantized per token | converted at load, or a pre-quantized fp8 checkpoint (``quant_method: fp8`` or compressed-tensors' float-quantized layout) as stored |
| ``int8`` | int8 weight-only, symmetric, ``group_size`` along K | converted at load |
| ``int4`` | int4 weight-only, asymmetric, ``group_size`` along K | converted at load |
| ``gptq`` | int4 GPTQ layout (act-order handled) | the checkpoint as stored |
| ``awq`` | AWQ's int4 layout, repacked to GPTQ's at load | the checkpoint as stored |
| ``gguf`` | llama.cpp blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) | a .gguf file as stored |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional

from servelm.registry import check_name

DEFAULT_GROUP_SIZE = 128
# methods that turn a dense checkpoint into their layout as it loads
CONVERTING = ("fp8", "int8", "int4")
# a checkpoint's quant_method -> the method that loads it as stored
CHECKPOINT_METHODS = MappingProxyType({"gptq": "gptq", "awq": "awq", "fp8": "fp8",
                                       "compressed-tensors": "fp8"})


@dataclass(frozen=True)
class QuantConfig:
    method: str  # a name in QUANTIZATION_METHODS
    group_size: int = DEFAULT_GROUP_SIZE  # int4/int8/gptq/awq: columns per scale; -1: whole row
    lm_head: bool = False  # the head is quantized too (a tied head gets its own quantized copy)
    prequantized: bool = False  # the checkpoint holds this method's tensors (fp8/gptq/awq)
    # gptq: v1 checkpoints store each zero point minus one ("gptq"), v2 as is ("gptq_v2")
    zero_offset: int = 0
    desc_act: bool = False  # gptq act-order: g_idx permutes the input columns
    # module names (prefix match on the layer's name) kept dense, from the checkpoint's config
    ignore: tuple[str, ...] = field(default_factory=tuple)
    # gguf on the CPU: the ggml types in which a tied head keeps its own copy of the
    # embedding's blocks, those the C GEMV of cpu/ reads (SmolLM2's Q8_0 head is 30 MB a token
    # against 57 MB in bf16); a tied head of another type gets a dense copy
    tied_head_blocks: tuple[int, ...] = ()

    def group_for(self, k: int, prefix: str, shard_start: int = 0) -> int:
        """The group size of a layer with ``k`` input columns on this rank (its shard starting
        at column ``shard_start`` of the full layer). The last group may be shorter (SmolLM2's
        576 columns at G = 128 end in a group of 64, as GPTQ and llama.cpp allow); a shard must
        start on a group boundary."""
        g = k if self.group_size == -1 else self.group_size
        if g % 8 and g != k:
            raise ValueError(f"quantization {self.method!r}: group size {g} is not a multiple of "
                             "8; use 32, 64, 128 or -1 (one group per row).")
        if shard_start % g:
            raise ValueError(f"quantization {self.method!r}: group size {g} does not divide the "
                             f"tensor-parallel shard of layer {prefix!r} (it starts at input "
                             f"column {shard_start}); pick a group size that divides {shard_start}.")
        return g

    def quantized_head(self, tied: bool) -> bool:
        """Whether the lm_head is a quantized layer: a GGUF's untied head keeps its blocks
        (a tied one is the embedding, dequantized); a converting method quantizes the head, a
        tied one as a copy of the embedding, when asked (lm_head)."""
        if self.method == "gguf":
            return not tied or bool(self.tied_head_blocks)
        return self.lm_head and (not tied or self.method in CONVERTING)

    def keeps_dense(self, prefix: str) -> bool:
        return any(prefix == p or prefix.startswith(p + ".") for p in self.ignore)


def _checkpoint_quant(hf_config: Any) -> Optional[dict]:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def _from_checkpoint(qc: dict) -> QuantConfig:
    """QuantConfig of a pre-quantized checkpoint's quantization_config; ValueError for the
    layouts servelm cannot load."""
    method = str(qc.get("quant_method", "")).lower()
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"the checkpoint's quantization_config has quant_method={method!r}; "
                         f"servelm loads {sorted(CHECKPOINT_METHODS)} checkpoints.")
    ignore = tuple(str(m).removeprefix("model.") for m in
                   (qc.get("modules_to_not_convert") or qc.get("ignore") or []))
    if method == "gptq":
        bits = int(qc.get("bits", 4))
        if bits != 4:
            raise ValueError(f"GPTQ checkpoint with bits={bits}: servelm loads 4-bit GPTQ only.")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format={fmt!r}: servelm loads 'gptq' and 'gptq_v2'.")
        return QuantConfig("gptq", int(qc.get("group_size", 128)), bool(qc.get("lm_head", False)),
                           True, 1 if fmt == "gptq" else 0, bool(qc.get("desc_act", False)), ignore)
    if method == "awq":
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
            raise ValueError(f"AWQ checkpoint (bits={bits}, version={version!r}, zero_point="
                             f"{qc.get('zero_point', True)}): servelm loads 4-bit GEMM-layout AWQ "
                             "with zero points.")
        return QuantConfig("awq", int(qc.get("group_size", qc.get("q_group_size", 128))),
                           False, True, 0, False, ignore)
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError("block-wise fp8 checkpoints (weight_block_size) are not supported; "
                             "per-tensor and per-channel fp8 checkpoints are.")
        return QuantConfig("fp8", prequantized=True, ignore=ignore)
    # compressed-tensors: only its fp8 float-quantized layout
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    ok = fmt in ("float-quantized", "naive-quantized") and groups and all(
        (g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 8
        and (g.get("weights") or {}).get("strategy") in ("tensor", "channel") for g in groups)
    if not ok:
        raise ValueError(f"compressed-tensors checkpoint in format {fmt!r}: servelm loads its fp8 "
                         "layout (float 8-bit weights, per-tensor or per-channel scales) only.")
    return QuantConfig("fp8", prequantized=True, ignore=ignore)


def gguf_cpu_fast(path: str, native_kernels: bool) -> bool:
    """Whether every linear weight of the .gguf at ``path`` is in a format the CPU runs fast from
    its blocks: with the C kernels of cpu/ (``native_kernels``) Q4_0, Q4_1, Q8_0 or a plain float
    type; with only the packed int4 kernel of quantization/cpu_int4.py, Q4_0, Q4_1 or float."""
    from servelm.loader.gguf_file import GGUFFile
    from servelm.loader.weights import _LINEAR_WEIGHT_RE, gguf_to_hf_name
    fast = {0, 1, 2, 3, 30}  # F32, F16, Q4_0, Q4_1, BF16
    if native_kernels:
        fast.add(8)  # Q8_0
    for t in GGUFFile(path).tensors:
        name = gguf_to_hf_name(t.name)
        if name is not None and _LINEAR_WEIGHT_RE.fullmatch(name) and t.tensor_type not in fast:
            return False
    return True


def resolve_quant_config(requested: Optional[str], hf_config: Any, load_format: str,
                         device: str, group_size: Optional[int] = None,
                         quantize_lm_head: bool = False, dtype: Any = None,
                         model_path: Optional[str] = None) -> Optional[QuantConfig]:
    """The model's QuantConfig, or None for dense weights as stored.

    A .gguf file defaults to ``gguf`` (its blocks kept) on CUDA, and on the CPU where a fast
    kernel reads them: the C kernels of cpu/ (Q4_0/Q4_1/Q8_0 linear weights, as the embedded
    SmolLM2; fp32 activations inside, so any model dtype), or without them PyTorch's packed int4
    kernel (Q4_0/Q4_1, bf16/fp16 activations). Elsewhere on the CPU (K-quants) it is dequantized
    at load (``none``), since the reference path would dequantize every weight at every step;
    ``quantization="gguf"`` keeps the blocks anyway. A checkpoint with a quantization_config loads as stored; a
    ``quantization`` that contradicts it is an error."""
    from servelm.quantization import QUANTIZATION_METHODS
    if requested is not None:
        check_name(QUANTIZATION_METHODS, requested, "quantization")
    if requested == "unquantized":
        requested = "none"
    ckpt = _checkpoint_quant(hf_config) if load_format != "gguf" else None
    if group_size is not None and (group_size == 0 or group_size < -1):
        raise ValueError(f"quantization_group_size must be -1 (one group per row) or > 0, got "
                         f"{group_size}.")
    if ckpt is not None:
        qc = _from_checkpoint(ckpt)
        if requested not in (None, qc.method):
            raise ValueError(f"quantization={requested!r} contradicts the checkpoint's "
                             f"quantization_config (quant_method={ckpt.get('quant_method')!r}, "
                             f"loaded as {qc.method!r}): drop --quantization or pass "
                             f"{qc.method!r}.")
        if quantize_lm_head:
            raise ValueError("quantize_lm_head quantizes the head while a dense checkpoint is "
                             "converted (fp8, int8, int4); a pre-quantized checkpoint's "
                             "quantization_config decides its head: drop quantize_lm_head.")
        if group_size is not None and group_size != qc.group_size:
            raise ValueError(f"quantization_group_size={group_size} contradicts the checkpoint's "
                             f"group size {qc.group_size}.")
        return qc
    if requested in ("gptq", "awq"):
        raise ValueError(f"quantization={requested!r} loads {requested.upper()} checkpoints as "
                         "stored, and this checkpoint has no quantization_config. To quantize a "
                         "dense checkpoint at load use 'int4' (or 'int8', 'fp8').")
    if load_format == "gguf":
        if requested is None:
            import torch

            from servelm.quantization import cpu_int4
            from servelm.cpu import native
            cpu_fast = False
            if model_path is not None and native.load() is not None:
                cpu_fast = gguf_cpu_fast(model_path, native_kernels=True)
            elif model_path is not None and cpu_int4.available() \
                    and dtype in (torch.bfloat16, torch.float16):
                cpu_fast = gguf_cpu_fast(model_path, native_kernels=False)
            requested = "gguf" if device.startswith("cuda") or cpu_fast else "none"
    elif requested == "gguf":
        raise ValueError("quantization='gguf' keeps a .gguf file's blocks; this checkpoint is "
                         f"{load_format}. Use 'int4', 'int8' or 'fp8' to quantize it at load.")
    if requested in (None, "none"):
        if group_size is not None or quantize_lm_head:
            raise ValueError("quantization_group_size / quantize_lm_head need a quantization "
                             "method (int4, int8, fp8).")
        return None
    if requested == "fp8" and device.startswith("cuda"):
        import torch
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ValueError(f"quantization='fp8' needs fp8 tensor cores (compute capability "
                             f"8.9+: Ada, Hopper); this GPU is {cap[0]}.{cap[1]}. Use 'int8' or "
                             "'int4' (weight-only), or device='cpu'.")
    if quantize_lm_head and requested not in CONVERTING:
        raise ValueError(f"quantize_lm_head applies to fp8, int8 and int4; with {requested!r} "
                         "the file decides the head (a GGUF's output.weight keeps its blocks).")
    if group_size is not None and requested not in ("int4", "int8"):
        raise ValueError(f"quantization_group_size applies to int4/int8, not {requested!r}.")
    # a GGUF head (untied output.weight) stays in the file's blocks like every other linear
    tied_blocks: tuple[int, ...] = ()
    if requested == "gguf" and device == "cpu":
        from servelm.cpu import native
        from servelm.cpu.blocks import BLOCK_FORMATS
        tied_blocks = tuple(BLOCK_FORMATS) if native.load() is not None else ()
    return QuantConfig(requested, DEFAULT_GROUP_SIZE if group_size is None else group_size,
                       quantize_lm_head or requested == "gguf",  # gguf: the file's head
                       tied_head_blocks=tied_blocks)
