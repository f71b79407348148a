"""LoRAConfig: the engine's adapter limits (vLLM's --max-loras, --max-lora-rank,
--max-cpu-loras)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LoRAConfig:
    """max_loras: adapters on the device at once (slots; also the most distinct adapters one
    step may run); max_lora_rank: the largest rank an adapter may have (slots are this wide);
    max_cpu_loras: adapters kept in host memory (least recently used ones are dropped and read
    from disk again when asked for)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1

    @staticmethod
    def create(max_loras: int = 1, max_lora_rank: int = 16,
               max_cpu_loras: Optional[int] = None) -> "LoRAConfig":
        for name, v in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
        if max_lora_rank > 512:
            raise ValueError(f"max_lora_rank must be <= 512, got {max_lora_rank}.")
        cpu = max_loras if max_cpu_loras is None else max_cpu_loras
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < max_loras:
            raise ValueError(f"max_cpu_loras must be an integer >= max_loras ({max_loras}), "
                             f"got {cpu!r}.")
        return LoRAConfig(max_loras, max_lora_rank, cpu)
