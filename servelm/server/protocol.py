"""Request schemas of the OpenAI-compatible API (pydantic, strict types) and the error shape.

Field names follow OpenAI's API plus vLLM's extensions (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, ...). Unknown fields are ignored, as in vLLM; known
fields with the wrong type are a 400 (strict: "1" is not a number, 1.0 is not an integer).
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error the API reports as ``{"error": {message, type, param, code}}`` with a status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.headers = headers  # extra response headers (Retry-After of a 503)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def validation_error(errs: list) -> APIError:
    """A 400 from pydantic's error list (wrong types, missing fields): names the first field."""
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errs[:3]]
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    param = str(errs[0]["loc"][0]) if errs and errs[0]["loc"] else None
    return bad_request("invalid request: " + "; ".join(parts) + more, param)


_TOKEN_ID_KEY = re.compile(r"\s*-?[0-9]{1,20}\s*", re.ASCII)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class JsonSchemaFormat(_Strict):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Union[dict[str, Any], bool]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsRequest(_Strict):
    """vLLM's ``structured_outputs`` request field: exactly one constraint."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: Optional[bool] = None


class SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions. None means the default."""

    model: Optional[str] = None
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    # OpenAI's {"token id as a string": bias}; ints and floats both pass strict float
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: Optional[bool] = False
    # vLLM's: logprobs of each prompt token and its N most likely alternatives
    prompt_logprobs: Optional[int] = None
    min_tokens: Optional[int] = 0
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    priority: Optional[int] = None  # vLLM's: lower first, with --scheduling-policy priority
    # this request's KV budget under --kv-eviction (tokens; default: --kv-eviction-budget)
    kv_eviction_budget: Optional[int] = None
    # latency objectives in ms (default: --default-ttft-slo-ms / --default-tpot-slo-ms); with
    # --scheduling-policy slo a request that can no longer meet its TTFT gets a 503
    ttft_slo_ms: Optional[float] = None
    tpot_slo_ms: Optional[float] = None
    # structured outputs (server/structured.py): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* fields; at most one of them per request
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, bias: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        # SamplingParams converts the keys and checks ids and values; refused here are keys
        # that str.isdigit passes but int() does not take (e.g. "²") or takes slowly (huge)
        for k in bias or ():
            if not _TOKEN_ID_KEY.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), "
                                 f"got {k[:32]!r}.")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's stream_options.continuous_usage_stats: usage in every chunk (with
        include_usage, which the check in serving.py makes sure of)."""
        return bool(self.include_usage and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingRequest):
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    add_special_tokens: Optional[bool] = True
    # OpenAI's best_of: best_of samples, the n with the highest cumulative logprob returned
    best_of: Optional[int] = None
    # vLLM's: the n best of best_of (or n) beams, scored as transformers' beam search
    use_beam_search: Optional[bool] = None
    length_penalty: Optional[float] = None  # with use_beam_search; default 1.0
    early_stopping: Optional[bool] = None  # with use_beam_search; default False


class ContentPart(_Strict):
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    # extra fields (name, tool_calls, ...) go through to the chat template untouched
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: Optional[Union[str, list[ContentPart]]] = None


class FunctionDefinition(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; None: no arguments
    strict: Optional[bool] = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    # tool calling (server/tools.py)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    max_tokens: Optional[int] = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: Optional[bool] = False  # the template already has its special tokens
    # vLLM's: the n best beams of the rendered conversation (server/completion_search.py)
    use_beam_search: Optional[bool] = None
    length_penalty: Optional[float] = None
    early_stopping: Optional[bool] = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: either ``prompt`` or chat ``messages``."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None  # default: True for prompt, False for messages
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: Optional[bool] = False


class LoadLoRAAdapterRequest(_Strict):
    """vLLM's /v1/load_lora_adapter."""

    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Strict):
    """vLLM's /v1/unload_lora_adapter (the adapter by name; lora_int_id, if given, must be
    its id)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_int_id: Optional[int] = None


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]
