"""LoRARequest: which adapter a request runs with (vLLM's class and field names)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """``lora_name``: what users call it (the API's model name); ``lora_int_id``: a positive
    integer naming these weights (the KV prefix cache and the device slots are keyed by it, so
    new weights under an old name need a new id); ``lora_path``: a PEFT adapter directory
    (adapter_config.json + adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}.")
        if (isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int)
                or self.lora_int_id < 1):
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}.")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must name the adapter's directory (LoRA "
                             f"{self.lora_name!r}).")

    def to_list(self) -> list:
        """For messages that cross a process boundary (msgpack)."""
        return [self.lora_name, self.lora_int_id, self.lora_path]

    @staticmethod
    def from_list(x: list | None) -> "LoRARequest | None":
        return None if x is None else LoRARequest(*x)
