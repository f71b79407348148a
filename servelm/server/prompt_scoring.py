"""Prompt scoring on /v1/completions: ``echo=true, max_tokens=0`` (with ``logprobs=k``) returns
the prompt's text and its logprobs and generates nothing, as lm-eval's loglikelihood and
OpenAI's old API use it.

The engine always samples at least one token (its SamplingParams takes max_tokens >= 1, and
the prompt's logprobs come from the same forward pass that samples it), so such a request
runs with max_tokens=1, as vLLM runs it, and the one token is dropped from every output
before the response is built: text, token ids and logprobs, and so from usage too.
"""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from servelm.outputs import RequestOutput
from servelm.server.protocol import CompletionRequest, bad_request


def scores_prompt_only(req: CompletionRequest) -> bool:
    """True for echo with max_tokens 0; max_tokens 0 without echo asks for nothing: a 400."""
    if req.max_tokens != 0:
        return False
    if not req.echo:
        raise bad_request("max_tokens must be >= 1, or 0 with echo=true (to score the prompt "
                          "without generating), got 0.", "max_tokens")
    if req.min_tokens:
        raise bad_request(f"min_tokens must be 0 when max_tokens is 0, got {req.min_tokens}.",
                          "min_tokens")
    return True


def _without_generated(ro: RequestOutput) -> RequestOutput:
    # finished only by max_tokens: the one token, whatever it was, is not part of the answer
    outs = [dataclasses.replace(o, text="", token_ids=[], cumulative_logprob=None,
                                logprobs=None if o.logprobs is None else [],
                                finish_reason=o.finish_reason and "length", stop_reason=None)
            for o in ro.outputs]
    return dataclasses.replace(ro, outputs=outs)


async def drop_generated(gen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """``gen``'s outputs with no generated tokens; closing this closes (aborts) ``gen``."""
    try:
        async for ro in gen:
            yield _without_generated(ro)
    finally:
        await gen.aclose()
