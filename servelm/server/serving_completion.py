"""POST /v1/completions: prompts as a string, strings, token ids or token-id lists; echo;
logprobs; streaming."""
from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Optional, Union

from fastapi.responses import Response

from servelm.engine.async_client import ProcessedPrompt
from servelm.outputs import RequestOutput
from servelm.server.completion_search import completion_search
from servelm.server.prompt_scoring import drop_generated, scores_prompt_only
from servelm.server.protocol import CompletionRequest, bad_request
from servelm.server.serving import (SSE_DONE, ChoiceCursor, OpenAIServing, completion_logprobs,
                                    cascade_header, cascade_tokens, check_shed, dumps,
                                    first_outputs, merge_generators, new_request_id, now_s,
                                    prompt_logprobs_json, sse, stop_holdback, stream_error,
                                    usage)


def _prompts(prompt: Union[str, list], max_prompts: int) -> list[Any]:
    """The request's prompt field as a list of engine prompts (strings or token-id lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty.", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # one prompt of token ids
    if len(prompt) > max_prompts:
        raise bad_request(f"at most {max_prompts} prompts per request, got {len(prompt)}.",
                          "prompt")
    return list(prompt)


async def create_completion(serving: OpenAIServing,
                            req: CompletionRequest) -> Union[dict, AsyncIterator[str]]:
    """A response body (dict), or an SSE stream when ``req.stream``."""
    lora = serving.check_model(req.model)
    prompts = _prompts(req.prompt, serving.config.max_prompts)
    echo = bool(req.echo)
    score_only = scores_prompt_only(req)  # echo with max_tokens 0: runs with 1, drops it
    # the prompt's logprobs: for echo with logprobs and for vLLM's prompt_logprobs (the most
    # of the two computed once; each takes its own top-N)
    wanted = [n for n in (req.logprobs if echo else None, req.prompt_logprobs) if n is not None]
    params = serving.sampling_params(
        req, 1 if score_only else req.max_tokens, req.logprobs,
        prompt_logprobs=max(wanted) if wanted else None)
    search = completion_search(serving, req, params)  # use_beam_search / best_of, or None
    inputs = await serving.prepare(prompts, params, req.add_special_tokens is not False,
                                   samples_per_prompt=req.best_of)
    rid, created = new_request_id("cmpl"), now_s()
    slo = serving.slo(req)
    generate = search or serving.client.generate
    gens = [generate(f"{rid}-{i}", p, priority=req.priority or 0, lora_request=lora, **slo)
            for i, p in enumerate(inputs)]
    if score_only:
        gens = [drop_generated(g) for g in gens]
    fmt = _Formatter(serving, req, inputs, rid, created)
    if req.stream:
        seen: list = []
        if serving.wait_first(params, slo):
            gens = await first_outputs(gens, seen)
        headers = cascade_header(seen)
        return (_stream(fmt, gens), headers) if headers else _stream(fmt, gens)
    finals: list[Optional[RequestOutput]] = [None] * len(gens)
    async with contextlib.aclosing(merge_generators(gens)) as it:
        async for i, ro in it:
            check_shed(ro)
            finals[i] = ro
    choices = [fmt.choice(i, out, out.text, 0, len(out.token_ids), echo, ro, 0)
               for i, ro in enumerate(finals) for out in ro.outputs
               if out.index < fmt.n]  # best_of: the n best of all (which usage counts)
    body = {"id": rid, "object": "text_completion", "created": created, "model": fmt.model,
            "choices": choices, "usage": fmt.usage(finals)}
    headers = cascade_header(finals)
    return Response(dumps(body), media_type="application/json", headers=headers) if headers \
        else body


class _Formatter:
    def __init__(self, serving: OpenAIServing, req: CompletionRequest,
                 inputs: list[ProcessedPrompt], rid: str, created: int) -> None:
        self.req, self.inputs, self.rid, self.created = req, inputs, rid, created
        self.model = req.model or serving.model_name
        self.n = inputs[0].params.n
        self.tok = serving.client.tokenizer
        self._prompt_texts: dict[int, str] = {}

    def decode(self, tid: int) -> str:
        return self.tok.decode([tid]) if self.tok is not None else ""

    def prompt_text(self, i: int) -> str:
        if i not in self._prompt_texts:
            p = self.inputs[i]
            self._prompt_texts[i] = (p.text if p.text is not None else
                                     self.tok.decode(p.token_ids) if self.tok is not None else "")
        return self._prompt_texts[i]

    def choice(self, i: int, out: Any, text: str, t0: int, t1: int, echo: bool,
               ro: Optional[RequestOutput], offset: int, first: bool = True) -> dict:
        """One choice: ``text`` and tokens [t0, t1) of ``out``, after the prompt if ``echo``;
        ``offset``: where ``text`` starts in the choice's whole text (for text_offset);
        ``first``: the choice's first chunk (it carries prompt_logprobs)."""
        prefix = self.prompt_text(i) if echo else ""
        ids = self.inputs[i].token_ids
        rows = (ro.prompt_logprobs if ro is not None else None) or [None] * len(ids)
        lp = None
        if self.req.logprobs is not None:
            n = self.req.logprobs
            lp = completion_logprobs(out.token_ids[t0:t1], (out.logprobs or [])[t0:t1], n,
                                     offset + len(prefix), self.decode)
            if echo:
                plp = completion_logprobs(ids, rows, n, 0, self.decode)
                lp = {k: plp[k] + lp[k] for k in lp}
        choice = {"index": i * self.n + out.index, "text": prefix + text, "logprobs": lp,
                  "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
        if self.req.prompt_logprobs is not None and first:
            choice["prompt_logprobs"] = prompt_logprobs_json(ids, rows, self.req.prompt_logprobs,
                                                             self.decode)
        return choice

    def usage(self, finals: list[Optional[RequestOutput]]) -> dict:
        done = [ro for ro in finals if ro is not None]
        return usage(sum(len(ro.prompt_token_ids) + cascade_tokens(ro)[0] for ro in done),
                     sum(len(o.token_ids) for ro in done for o in ro.outputs)
                     + sum(cascade_tokens(ro)[1] for ro in done),
                     sum(ro.num_cached_tokens for ro in done))


async def _stream(fmt: _Formatter, gens: list) -> AsyncIterator[str]:
    holdback = stop_holdback(fmt.inputs[0].params)
    include_usage = fmt.req.include_usage
    want_lp = fmt.req.logprobs is not None
    cursors: dict[tuple[int, int], ChoiceCursor] = {}
    finals: list[Optional[RequestOutput]] = [None] * len(gens)
    base = {"id": fmt.rid, "object": "text_completion", "created": fmt.created, "model": fmt.model}
    try:
        async with contextlib.aclosing(merge_generators(gens)) as it:
            async for i, ro in it:
                finals[i] = ro
                for out in ro.outputs:
                    cur = cursors.setdefault((i, out.index), ChoiceCursor())
                    if cur.finished:
                        continue
                    first = not cur.started
                    echo = bool(fmt.req.echo) and first
                    offset = cur.text + (len(fmt.prompt_text(i)) if cur.started and fmt.req.echo
                                         else 0)
                    text, t0, t1 = cur.advance(out, holdback)
                    if not (text or echo or cur.finished or (want_lp and t1 > t0)):
                        continue  # a token that ends mid-character: nothing to show yet
                    cur.started = True
                    chunk = {**base, "choices": [fmt.choice(i, out, text, t0, t1, echo, ro,
                                                            offset, first)]}
                    if include_usage:  # (so far, in every chunk: continuous_usage_stats)
                        chunk["usage"] = fmt.usage(finals) if fmt.req.continuous_usage else None
                    yield sse(chunk)
        if include_usage:
            yield sse({**base, "choices": [], "usage": fmt.usage(finals)})
    except Exception as e:
        yield stream_error(e)
    yield SSE_DONE
