"""Multi-LoRA serving (S-LoRA / Punica): PEFT adapters read and checked against the base model
(peft.py), each linear layer's method wrapped so its output gains the low-rank product of the
adapter each token asks for (layer.py, with the batched kernels of kernels/lora.py), and a pool
of device slots paged from host memory, least recently used out (manager.py). Requests name
their adapter with a ``LoRARequest``; the prefix cache keys their blocks by it."""
from servelm.lora.config import LoRAConfig
from servelm.lora.request import LoRARequest

__all__ = ["LoRAConfig", "LoRARequest"]
