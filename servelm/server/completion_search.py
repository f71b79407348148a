"""/v1/completions beyond plain sampling: vLLM's ``use_beam_search`` (the n best of
beam_width = best_of or n beams, scored as transformers' beam search, with ``length_penalty``
and ``early_stopping``; see engine/beam_search.py) and OpenAI's legacy ``best_of`` (best_of
samples; the n with the highest cumulative logprob are returned, all are billed). Neither can
stream (the best are known only at the end), as in vLLM and OpenAI.

Each is a stand-in for ``AsyncEngineClient.generate`` that create_completion calls per prompt:
its generator yields one final RequestOutput.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, AsyncIterator, Callable, Optional

from servelm.engine.async_client import AsyncEngineClient, ProcessedPrompt
from servelm.engine.beam_search import (BeamSearchParams, beam_search_async, check_beam_search,
                                        final_output, rank_best_of)
from servelm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.server.protocol import CompletionRequest, bad_request
from servelm.server.serving import OpenAIServing, check_shed

# (request id, prompt, *, priority, ttft_slo_ms, tpot_slo_ms) -> RequestOutputs, as generate
Generate = Callable[..., AsyncIterator[RequestOutput]]

# request fields that beam search would ignore (it scores the model's raw log-probabilities),
# with the values that mean "unset"
_NOT_WITH_BEAMS = {"temperature": (0,), "top_p": (1,), "top_k": (0, -1), "min_p": (0,),
                   "presence_penalty": (0,), "frequency_penalty": (0,),
                   "repetition_penalty": (1,), "min_tokens": (0,), "stop": ("", []),
                   "stop_token_ids": ([],), "logit_bias": ({},), "structured_outputs": (),
                   "guided_json": (), "guided_regex": (), "guided_choice": (),
                   "guided_grammar": ()}


def _check_beam_fields(req: Any) -> None:
    """length_penalty and early_stopping mean something only to beam search: alone, a 400
    rather than a silently ignored field."""
    if not req.use_beam_search:
        for name in ("length_penalty", "early_stopping"):
            if getattr(req, name) is not None:
                raise bad_request(f"{name} applies to beam search only: set use_beam_search "
                                  "to true, or leave it out.", name)


def completion_search(serving: OpenAIServing, req: CompletionRequest,
                      params: SamplingParams) -> Optional[Generate]:
    """None for plain sampling; else the generate stand-in. ``params``: the request's (n
    resolved). Raises the 400s of what cannot be combined, before anything runs."""
    _check_beam_fields(req)
    n, best_of = params.n, req.best_of
    if best_of is not None:
        if best_of < n:
            raise bad_request(f"best_of must be >= n ({n}), got {best_of}.", "best_of")
        if best_of > serving.config.max_n:
            raise bad_request(f"best_of must be <= {serving.config.max_n}, got {best_of}.",
                              "best_of")
    if req.use_beam_search:
        return _beam_search(serving.client, req, params, best_of or n)
    if best_of is None or best_of == n:
        return None
    if req.stream:
        raise bad_request("best_of > n cannot be streamed (the best are known only at the end): "
                          "set stream to false, or best_of to n.", "best_of")
    return _best_of(serving.client, best_of)


def _best_of(client: AsyncEngineClient, best_of: int) -> Generate:
    async def generate(request_id: str, prompt: ProcessedPrompt,
                       **kw: Any) -> AsyncIterator[RequestOutput]:
        p = prompt.params
        # logprobs rank the samples; the response shows them only if the request asked
        sp = dataclasses.replace(p, n=best_of, logprobs=0 if p.logprobs is None else p.logprobs)
        gen = client.generate(request_id, dataclasses.replace(prompt, params=sp), **kw)
        async with contextlib.aclosing(gen) as g:
            async for ro in g:
                if ro.finished:
                    yield rank_best_of(ro)
    return generate


def chat_beam_search(serving: OpenAIServing, req: Any,
                     params: SamplingParams) -> Optional[Generate]:
    """/v1/chat/completions' use_beam_search (n beams; no best_of in chat), or None."""
    _check_beam_fields(req)
    if not req.use_beam_search:
        return None
    if req.tools and req.tool_choice not in (None, "none"):
        raise bad_request("use_beam_search cannot be combined with tool calls.", "tool_choice")
    return _beam_search(serving.client, req, params, params.n)


def _beam_search(client: AsyncEngineClient, req: Any, params: SamplingParams,
                 width: int) -> Generate:
    if req.stream:
        raise bad_request("use_beam_search cannot stream (beams are ranked only at the end): "
                          "set stream to false.", "use_beam_search")
    if getattr(req, "max_tokens", None) == 0:
        raise bad_request("use_beam_search needs max_tokens >= 1.", "max_tokens")
    fmt = getattr(req, "response_format", None)
    for name, unset in {**_NOT_WITH_BEAMS, "response_format": ()}.items():
        v = getattr(req, name, None)
        if name == "response_format" and getattr(fmt, "type", None) == "text":
            continue
        if v is not None and v not in unset:
            raise bad_request(f"{name} cannot be used with use_beam_search (beams are scored by "
                              "the model's raw log-probabilities): leave it unset.", name)
    try:
        bp = BeamSearchParams(width, params.max_tokens or 1, ignore_eos=params.ignore_eos,
                              length_penalty=(1.0 if req.length_penalty is None
                                              else req.length_penalty),
                              early_stopping=bool(req.early_stopping))
        check_beam_search(bp, client.config, [], params.logprobs or 0)
    except ValueError as e:
        raise bad_request(str(e), "best_of" if getattr(req, "best_of", None) is not None
                          else "n") from None

    async def generate(request_id: str, prompt: ProcessedPrompt, *, priority: int = 0,
                       lora_request: Any = None, **_slo: Any) -> AsyncIterator[RequestOutput]:
        # the step requests carry the priority; latency objectives (per request, not per
        # step) are not applied to them
        p, arrival = prompt.params, time.time()

        async def checked(gen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
            async with contextlib.aclosing(gen) as g:
                async for ro in g:
                    check_shed(ro)  # the slo policy shed a step: a 503
                    yield ro

        def step(rid: str, ids: list[int], sp: SamplingParams) -> AsyncIterator[RequestOutput]:
            return checked(client.generate(rid, ids, sp, priority=priority,
                                           lora_request=lora_request))

        plp = None
        if p.prompt_logprobs is not None:  # echo with logprobs: one pass over the prompt
            sp = SamplingParams(max_tokens=1, temperature=0.0,
                                prompt_logprobs=p.prompt_logprobs, detokenize=False)
            plp = (await final_output(step(f"{request_id}-prompt", prompt.token_ids,
                                           sp))).prompt_logprobs
        [res] = await beam_search_async(
            step, [prompt.token_ids], dataclasses.replace(bp, max_tokens=p.max_tokens),
            client.config, request_id, client.tokenizer, p.logprobs or 0,
            p.skip_special_tokens)
        n_prompt = len(prompt.token_ids)
        outs = [CompletionOutput(i, s.text, s.tokens[n_prompt:], s.cum_logprob,
                                 s.logprobs if p.logprobs is not None else None,
                                 s.finish_reason, s.stop_reason)
                for i, s in enumerate(res.sequences[:p.n])]
        yield RequestOutput(request_id, prompt.text, prompt.token_ids, outs, True,
                            RequestMetrics(arrival, finished_time=time.time()), plp)
    return generate
