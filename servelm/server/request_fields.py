"""Request fields of OpenAI's API and of vLLM's extensions that servelm does not implement and
that would change what a request means: each is a 400 naming the field, never silently
dropped. Fields that change nothing about the output (user, metadata, store, service_tier,
...) pass, and names that neither API has are ignored, as vLLM ignores them.

A rule steps aside once the request model declares its field: whoever implements one of these
declares it in protocol.py, and the refusal ends there. docs/openai_fields.md lists every
field with its status.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from servelm.server.protocol import ChatCompletionRequest, CompletionRequest, bad_request

COMPLETIONS, CHAT = "completions", "chat"


def _none(v: Any) -> bool:
    return v is None


def _falsy(v: Any) -> bool:
    """None, false, an empty string, list or object: the field asks for nothing."""
    return v is None or v is False or v in ("", [], {})


@dataclass(frozen=True)
class Unsupported:
    name: str
    endpoints: tuple[str, ...]
    unused: Callable[[Any], bool]  # the values that ask for nothing (then the field passes)
    instead: str  # what to do instead: the second half of the message


_BOTH = (COMPLETIONS, CHAT)
RULES: tuple[Unsupported, ...] = (
    # OpenAI's
    Unsupported("suffix", (COMPLETIONS,), _falsy, "insertion (fill-in-the-middle) is not "
                "implemented; send the text before the gap as the prompt"),
    Unsupported("functions", (CHAT,), _falsy, "legacy function calling is not implemented; "
                "send 'tools' (and 'tool_choice') instead"),
    Unsupported("function_call", (CHAT,), lambda v: v is None or v == "none",
                "legacy function calling is not implemented; send 'tool_choice' instead"),
    Unsupported("audio", (CHAT,), _none, "audio output is not implemented"),
    Unsupported("modalities", (CHAT,), lambda v: v is None or v == ["text"],
                "only text output is implemented; send [\"text\"] or leave it out"),
    Unsupported("prediction", (CHAT,), _none, "predicted outputs are not implemented"),
    Unsupported("web_search_options", (CHAT,), _none, "web search is not implemented"),
    # vLLM's
    Unsupported("echo", (CHAT,), _falsy, "chat echo (prepending the last message) is not "
                "implemented; /v1/completions has echo"),
    Unsupported("chat_template", (CHAT,), _none, "a request may not bring its own chat "
                "template (vLLM refuses it too unless --trust-request-chat-template); start "
                "the server with --chat-template"),
    Unsupported("documents", (CHAT,), _falsy, "documents for retrieval templates are not "
                "implemented; put them in the messages or chat_template_kwargs"),
    Unsupported("truncate_prompt_tokens", _BOTH, _none, "prompts are never truncated; "
                "shorten the prompt"),
    Unsupported("allowed_token_ids", _BOTH, _falsy, "not implemented; logit_bias can "
                "favour tokens"),
    Unsupported("bad_words", _BOTH, _falsy, "not implemented; logit_bias -100 bans tokens"),
    Unsupported("logprob_token_ids", _BOTH, _falsy, "not implemented; use logprobs"),
    Unsupported("logits_processors", _BOTH, _falsy, "custom logits processors are not "
                "implemented"),
    Unsupported("return_tokens_as_token_ids", _BOTH, _falsy, "not implemented"),
    Unsupported("return_token_ids", _BOTH, _falsy, "not implemented; POST /tokenize gives "
                "token ids"),
    Unsupported("spaces_between_special_tokens", _BOTH, lambda v: v is None or v is True,
                "special tokens are always joined with spaces"),
    Unsupported("watermarking", _BOTH, _falsy, "not implemented"),
    Unsupported("prompt_embeds", _BOTH, _none, "prompts are text or token ids"),
    Unsupported("cache_salt", _BOTH, _none, "the prefix cache has no per-tenant salt, so "
                "this request would not be isolated"),
    Unsupported("kv_transfer_params", _BOTH, _none, "disaggregated prefill is not "
                "implemented"),
    Unsupported("ec_transfer_params", _BOTH, _none, "disaggregated encoding is not "
                "implemented"),
    Unsupported("vllm_xargs", _BOTH, _falsy, "there are no custom extensions to take them"),
    Unsupported("repetition_detection", _BOTH, _none, "not implemented"),
    Unsupported("thinking_token_budget", _BOTH, lambda v: v is None or v == -1,
                "not implemented"),
)

_ENDPOINT_OF = ((ChatCompletionRequest, CHAT), (CompletionRequest, COMPLETIONS))


def refuse_unsupported(model: type, body: dict) -> None:
    """A 400 naming the first field of ``body`` (a request's JSON object, before parsing)
    that ``model``'s endpoint does not implement and the request actually uses."""
    endpoint = next((e for cls, e in _ENDPOINT_OF if issubclass(model, cls)), None)
    if endpoint is None:
        return
    for rule in RULES:
        if endpoint not in rule.endpoints:
            continue
        head, _, sub = rule.name.partition(".")
        if not sub and head in model.model_fields:
            continue  # implemented now: the model validates it
        value = body.get(head)
        if sub:
            value = value.get(sub) if isinstance(value, dict) else None
        if not rule.unused(value):
            raise bad_request(f"'{rule.name}' is not supported by this server: {rule.instead}.",
                              rule.name)
