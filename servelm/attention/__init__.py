"""Attention backends, chosen by name from a registry."""
from __future__ import annotations

from servelm.attention.backend import AttentionBackend, AttentionMetadata


def get_attention_backend(name: str, device: str, max_model_len: int | None = None) -> AttentionBackend:
    """name: "auto" (triton on CUDA when available, else torch), "torch" or "triton"."""
    if name == "auto":
        name = "torch"
        if device.startswith("cuda"):
            try:
                import servelm.attention.triton_backend  # noqa: F401
                name = "triton"
            except ImportError:
                pass
    if name == "torch":
        from servelm.attention.torch_ref import TorchReferenceBackend
        return TorchReferenceBackend()
    if name == "triton":
        from servelm.attention.triton_backend import TritonAttentionBackend
        # sized for max_model_len so one CUDA graph per batch size serves every context length
        return TritonAttentionBackend(max_model_len)
    raise ValueError(f"attention_backend must be one of 'auto', 'torch', 'triton'; got {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
