"""Tool-call output parsers, by vLLM's ``--tool-call-parser`` names: each turns a model's raw
text into OpenAI tool calls plus content, whole or streamed (see base.ToolParser)."""
from __future__ import annotations

from types import MappingProxyType

from servelm.registry import load_class
from servelm.server.tool_parsers.base import (DeltaMessage, ExtractedToolCalls, ToolCall,
                                              ToolCallDelta, ToolParser)

# name -> class (imported only when chosen)
TOOL_PARSERS = MappingProxyType({
    "hermes": "servelm.server.tool_parsers.hermes:HermesToolParser",
    "llama3_json": "servelm.server.tool_parsers.llama3_json:Llama3JsonToolParser",
    "mistral": "servelm.server.tool_parsers.mistral:MistralToolParser",
    "pythonic": "servelm.server.tool_parsers.pythonic:PythonicToolParser",
})


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class for ``--tool-call-parser name``; ValueError listing the known names."""
    return load_class(TOOL_PARSERS, name, "tool call parser")


__all__ = ["DeltaMessage", "ExtractedToolCalls", "TOOL_PARSERS", "ToolCall", "ToolCallDelta",
           "ToolParser", "get_tool_parser"]
