"""POST /v1/chat/completions: the model's chat template via the tokenizer, logprobs /
top_logprobs, max_completion_tokens, streaming."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, AsyncIterator, Optional, Union

from fastapi.responses import Response

from servelm.outputs import RequestOutput
from servelm.server.completion_search import chat_beam_search
from servelm.server.protocol import APIError, ChatCompletionRequest, ChatMessage, bad_request
from servelm.server.tool_parsers import get_tool_parser
from servelm.server.tools import (ToolOutput, ToolPlan, plan_tools, template_inputs,
                                  template_supports_tools)
from servelm.server.serving import (SSE_DONE, ChoiceCursor, OpenAIServing, chat_logprobs,
                                    cascade_header, cascade_tokens, check_shed, dumps,
                                    first_outputs, merge_generators, new_request_id, now_s,
                                    prompt_logprobs_json, sse, stop_holdback, stream_error,
                                    usage)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template sees them: text parts joined, other parts refused."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump()
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}]: content parts of type {part.type!r} are not "
                                      "supported; this server takes text only.", "messages")
                texts.append(part.text)
            content = "\n".join(texts)
        d["content"] = content if content is not None else ""
        out.append(d)
    return out


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                continue_final_message: bool, template_kwargs: Optional[dict],
                tools: Optional[ToolPlan] = None) -> str:
    """The prompt text; template errors (e.g. roles that must alternate) are 400s. Tools go
    to the template, or into the system message where the template has no place for them."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("this model has no chat template; use /v1/completions.")
    if not messages:
        raise bad_request("messages must not be empty.", "messages")
    if add_generation_prompt and continue_final_message:
        raise bad_request("add_generation_prompt and continue_final_message cannot both be true.",
                          "continue_final_message")
    # keys that are apply_chat_template's own parameters (tokenize, return_dict, ...) would
    # change what it returns: only template variables pass
    reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters)
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in reserved}
    msgs, tool_list = template_inputs(template_messages(messages), tools,
                                      template_supports_tools(tokenizer))
    if tool_list is not None:
        kwargs["tools"] = tool_list
    try:
        text = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **kwargs)
    except APIError:
        raise
    except Exception as e:  # jinja errors, raise_exception() in templates, bad message shapes
        raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None
    if not isinstance(text, str):
        raise bad_request("the chat template did not produce text.", "messages")
    return text


async def create_chat_completion(serving: OpenAIServing,
                                 req: ChatCompletionRequest) -> Union[dict, AsyncIterator[str]]:
    lora = serving.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true.", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                  else req.max_tokens)
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs are returned with the whole response in chat: set "
                          "stream to false (/v1/completions streams them in each choice's "
                          "first chunk).", "prompt_logprobs")
    params = serving.sampling_params(req, max_tokens, logprobs,
                                     prompt_logprobs=req.prompt_logprobs)
    cfg = serving.config
    plan = plan_tools(req, cfg.enable_auto_tool_choice, cfg.tool_call_parser)
    if plan is not None and plan.structured is not None:  # required / named: a grammar
        if params.structured_outputs is not None:
            raise bad_request("tool_choice 'required' or a named function cannot be combined "
                              "with response_format or other output constraints.", "tool_choice")
        params = dataclasses.replace(params, structured_outputs=plan.structured)
    calls = plan is not None and plan.mode != "none"
    if calls and plan.mode == "auto" and not get_tool_parser(plan.parser).skip_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)  # markers are special
    client = serving.client
    prompt = await client.run_in_tokenizer_thread(
        render_chat, client.tokenizer, req.messages, req.add_generation_prompt is not False,
        bool(req.continue_final_message), req.chat_template_kwargs, plan)
    search = chat_beam_search(serving, req, params)  # use_beam_search: 400s before any work
    (inp,) = await serving.prepare([prompt], params, bool(req.add_special_tokens))
    rid, created = new_request_id("chatcmpl"), now_s()
    slo = serving.slo(req)
    gen = (search or client.generate)(rid, inp, priority=req.priority or 0, lora_request=lora,
                                      **slo)
    model = req.model or serving.model_name
    decode = (lambda t: client.tokenizer.decode([t])) if client.tokenizer is not None else str
    top_n = req.top_logprobs or 0

    def lps(out: Any, t0: int, t1: int) -> Optional[dict]:
        if not req.logprobs:
            return None
        return {"content": chat_logprobs(out.token_ids[t0:t1], (out.logprobs or [])[t0:t1],
                                         top_n, decode)}

    if req.stream:
        seen: list = []
        if serving.wait_first(inp.params, slo):
            (gen,) = await first_outputs([gen], seen)
        tool_outs = ([ToolOutput(plan, client.tokenizer) for _ in range(inp.params.n)]
                     if calls else None)
        stream = _stream(req, gen, rid, created, model, inp.params, lps, tool_outs,
                         len(inp.token_ids))
        headers = cascade_header(seen)
        return (stream, headers) if headers else stream
    final: Optional[RequestOutput] = None
    async with contextlib.aclosing(merge_generators([gen])) as it:
        async for _, ro in it:
            check_shed(ro)
            final = ro
    choices = []
    for o in final.outputs:
        message: dict[str, Any] = {"role": "assistant", "content": o.text}
        finish = o.finish_reason
        if calls:
            content, tool_calls = ToolOutput(plan, client.tokenizer).final(o.text)
            message["content"] = content
            if tool_calls:
                message["tool_calls"] = tool_calls
                finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": o.index, "message": message,
                        "logprobs": lps(o, 0, len(o.token_ids)), "finish_reason": finish,
                        "stop_reason": o.stop_reason})
    body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(final)}
    if req.prompt_logprobs is not None:  # vLLM's place for them: beside the choices
        body["prompt_logprobs"] = prompt_logprobs_json(
            inp.token_ids, final.prompt_logprobs or [None] * len(inp.token_ids),
            req.prompt_logprobs, decode)
    headers = cascade_header([final])
    return Response(dumps(body), media_type="application/json", headers=headers) if headers \
        else body


async def _stream(req: ChatCompletionRequest, gen: Any, rid: str, created: int, model: str,
                  params: Any, lps: Any, tool_outs: Optional[list[ToolOutput]] = None,
                  prompt_tokens: int = 0) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if req.include_usage else {}
    holdback = stop_holdback(params)
    cursors = [ChoiceCursor() for _ in range(params.n)]
    final: Optional[RequestOutput] = None
    try:
        continuous = req.continuous_usage  # usage so far in every chunk
        for k in range(params.n):
            role = {"role": "assistant", "content": ""}
            yield sse({**base, "choices": [{"index": k, "delta": role, "logprobs": None,
                                            "finish_reason": None}],
                       **({"usage": usage(prompt_tokens, 0, 0)} if continuous else extra)})
        async with contextlib.aclosing(merge_generators([gen])) as it:
            async for _, ro in it:
                final = ro
                for out in ro.outputs:
                    cur = cursors[out.index]
                    if cur.finished:
                        continue
                    text, t0, t1 = cur.advance(out, holdback)
                    finish = out.finish_reason
                    if tool_outs is not None:  # content and calls, from the text so far
                        tool = tool_outs[out.index]
                        text, tool_deltas = tool.delta(out.text[:cur.text], cur.finished)
                        text = text or ""
                        if tool.called and finish == "stop":
                            finish = "tool_calls"
                    if not (text or cur.finished or (req.logprobs and t1 > t0)
                            or (tool_outs is not None and tool_deltas)):
                        continue  # a token that ends mid-character: nothing to show yet
                    delta: dict[str, Any] = {"content": text} if text or not cur.finished else {}
                    if tool_outs is not None and tool_deltas:
                        delta = {**({"content": text} if text else {}),
                                 "tool_calls": tool_deltas}
                    yield sse({**base, "choices": [{
                        "index": out.index, "delta": delta, "logprobs": lps(out, t0, t1),
                        "finish_reason": finish, "stop_reason": out.stop_reason}],
                        **({"usage": _usage(ro)} if continuous else extra)})
        if req.include_usage and final is not None:
            yield sse({**base, "choices": [], "usage": _usage(final)})
    except Exception as e:
        yield stream_error(e)
    yield SSE_DONE


def _usage(ro: RequestOutput) -> dict:
    extra_prompt, extra_out = cascade_tokens(ro)  # a cascade's small model's, if escalated
    return usage(len(ro.prompt_token_ids) + extra_prompt,
                 sum(len(o.token_ids) for o in ro.outputs) + extra_out,
                 ro.num_cached_tokens)
