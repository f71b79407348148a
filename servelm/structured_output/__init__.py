"""Structured outputs: a request's output constrained to a JSON schema, JSON, a regex, a choice or
an EBNF grammar. Grammars compile off the step loop in the engine core (manager.py, through a
backend from backend.py's registry: xgrammar) and are enforced by a bitmask logits processor
(processor.py). Importing this package loads no backend."""
from servelm.structured_output.params import StructuredOutputsConfig, StructuredOutputsParams

__all__ = ["StructuredOutputsConfig", "StructuredOutputsParams"]
