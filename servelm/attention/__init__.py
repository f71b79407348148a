"""Attention backends, chosen by name from a registry."""
from __future__ import annotations

from types import MappingProxyType

from servelm.attention.backend import AttentionBackend, AttentionMetadata
from servelm.registry import check_name, load_class

ATTENTION_BACKENDS = MappingProxyType({
    "torch": "servelm.attention.torch_ref:TorchReferenceBackend",
    "triton": "servelm.attention.triton_backend:TritonAttentionBackend",
    "cpu": "servelm.attention.cpu_backend:CpuAttentionBackend",
})


def check_attention_backend(name: str) -> str:
    return check_name(ATTENTION_BACKENDS, name, "attention_backend", extra=("auto",))


def resolve_attention_backend(name: str, device: str) -> str:
    """"auto": triton on CUDA when it imports; on the CPU the C kernels' backend where they
    build; else the torch reference."""
    if check_attention_backend(name) != "auto":
        return name
    if device.startswith("cuda"):
        try:
            load_class(ATTENTION_BACKENDS, "triton", "attention_backend")
            return "triton"
        except ImportError:
            pass
        return "torch"
    from servelm.cpu import native
    return "cpu" if native.load() is not None else "torch"


def get_attention_backend(name: str, device: str, max_model_len: int | None = None) -> AttentionBackend:
    """An instance of the named backend; ``max_model_len`` sizes backends whose launches must
    serve every context length from one CUDA graph."""
    cls = load_class(ATTENTION_BACKENDS, resolve_attention_backend(name, device), "attention_backend")
    return cls(max_model_len=max_model_len)


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "check_attention_backend",
           "get_attention_backend", "resolve_attention_backend"]
