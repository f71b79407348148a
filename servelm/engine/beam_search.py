"""Beam search on the engine (vLLM's ``LLM.beam_search`` / ``BeamSearchParams`` names), with the
hypotheses scored, finished and stopped exactly as transformers' beam search
(``generate(num_beams=k, do_sample=False, length_penalty=..., early_stopping=...)``, that is
``GenerationMixin._beam_search`` and its helpers in transformers 5); and best_of's ranking.

How it runs (as vLLM v1): the engine knows nothing of beams. Each step, every live beam of every
prompt becomes one request of prompt + beam tokens with max_tokens=1 and the top K logprobs of
the raw model distribution, all submitted together so they share the engine's batches. Beams of
one prompt differ only in their last tokens, and the request of a beam's parent in the previous
step computed (and, with enable_prefix_caching, on by default, cached) every full KV block of
the beam's sequence but the newest token: so the prefix cache hands each request all its full
blocks, and the parent's last partial block copy-on-write (core/kv_cache.py: cached when the
parent's request left, copied into a fresh block of each child): each beam computes its newest
token only. Without the prefix cache every step recomputes every beam's whole sequence
(correct, slow).

Why each beam's top K suffice: transformers keeps the K best (beam score + token logprob) over
all beams and tokens (K = its ``beams_to_keep``: 2 * beam_width with one EOS id). A candidate
among those has fewer than K candidates above it, so fewer than K of its own beam: it is among
its beam's top K.

transformers' rules, per prompt (k = beam_width; L = generated tokens incl. the new one):
1. candidates: the K best of beam cum_logprob + token logprob over the live beams;
2. a candidate finishes if its token is an EOS id or L == max_tokens;
3. the next live beams: the k best unfinished candidates, by raw cum_logprob (no penalty);
4. only candidates ranked < k among the K can become finished hypotheses, scored
   cum_logprob / L ** length_penalty (EOS counted in L, the prompt not); the k best are kept;
   none is added once early_stopping is True and k are kept;
5. the search stops when early_stopping is True and k are kept; or k are kept and the best live
   beam cannot beat the worst kept one: cum / L' ** length_penalty <= worst, with L' =
   max_tokens if early_stopping == "never" and length_penalty > 0, else L (this is sticky: once
   true, nothing is added again); or every candidate finished (L == max_tokens).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Sequence, Union

from servelm.outputs import PositionLogprobs, RequestOutput
from servelm.sampling_params import RequestOutputKind, SamplingParams

MAX_BEAM_WIDTH = 64


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams plus transformers' early_stopping.

    beam_width: beams kept per prompt (transformers' num_beams) and sequences returned.
    max_tokens: new tokens per sequence at most (max_new_tokens).
    ignore_eos: no beam finishes at an EOS id; every sequence runs max_tokens.
    temperature: 0.0 only; vLLM's field, kept for its signature. Beams are scored with the
        model's raw log-probabilities (as transformers with do_sample=False and vLLM v1, whose
        logprobs are raw), so a temperature would change nothing.
    length_penalty: a finished sequence's score is cum_logprob / L ** length_penalty, L its
        generated tokens (EOS included): > 0 favours longer sequences, < 0 shorter ones.
    early_stopping: True: stop once beam_width sequences have finished. False: also stop once
        the best live beam, scored at its current length, cannot beat the worst finished one.
        "never": as False, but scored at max_tokens when length_penalty > 0 (canonical beam
        search, with length_penalty 0).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False

    def __post_init__(self) -> None:
        w = self.beam_width
        if not _is_int(w) or not 1 <= w <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {w!r}.")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}.")
        if not _is_num(self.temperature) or self.temperature != 0:
            raise ValueError(f"temperature must be 0.0 for beam search, got {self.temperature!r}: "
                             "beams are scored with the model's raw log-probabilities.")
        if not _is_num(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got "
                             f"{self.length_penalty!r}.")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got "
                             f"{self.early_stopping!r}.")


@dataclass(frozen=True)
class BeamSearchSequence:
    """One hypothesis (vLLM's names). ``tokens`` include the prompt, as in vLLM."""

    tokens: list[int]
    logprobs: list[PositionLogprobs]  # per generated token: that step's top-K logprobs
    cum_logprob: float = 0.0
    # cum_logprob / num generated tokens ** length_penalty (transformers' sequences_scores);
    # set when the hypothesis finishes
    score: Optional[float] = None
    text: Optional[str] = None  # the generated text (no prompt, no EOS), set on output
    finish_reason: Optional[str] = None  # "stop" (an EOS id) | "length" (max_tokens)
    stop_reason: Optional[int] = None  # always None: EOS is not a stop_token_ids hit


@dataclass(frozen=True)
class BeamSearchOutput:
    """One prompt's result: ``beam_width`` sequences, best score first."""

    sequences: list[BeamSearchSequence]


class BeamSearchInstance:
    """One prompt's search state: live beams (best raw cum_logprob first) and the best finished
    hypotheses (best score first), advanced one token per ``step``."""

    def __init__(self, prompt_token_ids: Sequence[int], params: BeamSearchParams,
                 eos_token_ids: Iterable[int]) -> None:
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        # transformers' beams_to_keep: enough that k unfinished ones remain if EOS ids are top
        self.num_candidates = max(2, 1 + len(self.eos)) * params.beam_width
        # transformers starts k copies of the prompt, all but one scored -1e9: the same as one
        self.beams = [BeamSearchSequence(list(prompt_token_ids), [])]
        self.finished: list[BeamSearchSequence] = []
        self.num_generated = 0
        self.can_improve = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False

    def step(self, next_logprobs: Sequence[PositionLogprobs]) -> None:
        """next_logprobs[i]: the next-token logprobs after beams[i], at least its top K."""
        p, k = self.params, self.params.beam_width
        length = self.num_generated + 1
        scored = [(b.cum_logprob + lp.logprob, i, t)
                  for i, (b, row) in enumerate(zip(self.beams, next_logprobs))
                  for t, lp in row.items()]
        scored.sort(key=lambda c: -c[0])  # stable: ties keep beam, then logprob-rank order
        cands = scored[:self.num_candidates]
        hits = [t in self.eos or length >= p.max_tokens for _, _, t in cands]

        def extend(c: tuple[float, int, int]) -> BeamSearchSequence:
            cum, i, t = c
            b = self.beams[i]
            return BeamSearchSequence(b.tokens + [t], b.logprobs + [next_logprobs[i]], cum)

        full = len(self.finished) == k
        if self.can_improve and not (full and p.early_stopping is True):
            # only the top k of the K may finish; the rest only back up the live beams
            new = [replace(s, score=_normalized(s.cum_logprob, length, p.length_penalty),
                           finish_reason="stop" if s.tokens[-1] in self.eos else "length")
                   for s in (extend(c) for c, h in zip(cands[:k], hits) if h)]
            if new:
                self.finished = sorted(self.finished + new, key=lambda s: -s.score)[:k]
        self.beams = [extend(c) for c, h in zip(cands, hits) if not h][:k]
        self.num_generated = length
        full = len(self.finished) == k
        if full and self.beams:
            best_len = (p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0
                        else length)
            best = _normalized(self.beams[0].cum_logprob, best_len, p.length_penalty)
            self.can_improve = self.can_improve and best > self.finished[-1].score
        self.done = (not self.can_improve or (full and p.early_stopping is True)
                     or all(hits) or not self.beams)

    def output(self, tokenizer: Any = None, skip_special_tokens: bool = True) -> BeamSearchOutput:
        seqs = []
        for s in self.finished:
            gen = s.tokens[self.num_prompt_tokens:]
            if s.finish_reason == "stop":
                gen = gen[:-1]  # the EOS token is not shown as text
            text = (tokenizer.decode(gen, skip_special_tokens=skip_special_tokens)
                    if tokenizer is not None else "")
            seqs.append(replace(s, text=text))
        return BeamSearchOutput(seqs)


def _normalized(cum_logprob: float, length: int, length_penalty: float) -> float:
    """cum_logprob / length ** length_penalty; an extreme penalty gives what transformers'
    float tensors give (a power past float range is inf, or 0: -inf for a negative sum), not
    Python's OverflowError or ZeroDivisionError."""
    try:
        d = float(length) ** length_penalty
    except OverflowError:
        d = math.inf
    return cum_logprob / d if d else -math.inf


# ---- drivers: each step's beams as one-token engine requests --------------------------------
def check_beam_search(params: BeamSearchParams, config: Any, prompts: Sequence[Sequence[int]],
                      num_logprobs: int = 0) -> int:
    """Checks the search fits the engine (``config``: its EngineConfig); returns K', the
    logprobs each step request asks for (K, or more to report num_logprobs per token)."""
    num_eos = 0 if params.ignore_eos else len(config.model.eos_token_ids)
    k = max(max(2, 1 + num_eos) * params.beam_width, num_logprobs)
    if k > config.max_logprobs:
        raise ValueError(f"beam search with beam_width={params.beam_width} asks for the top {k} "
                         f"logprobs per step, more than max_logprobs ({config.max_logprobs}): "
                         f"use a smaller beam_width or start the engine with max_logprobs >= {k}.")
    if k > config.model.vocab_size:
        raise ValueError(f"beam search with beam_width={params.beam_width} keeps {k} candidates "
                         f"per step, more than the vocabulary ({config.model.vocab_size}).")
    if params.beam_width > config.scheduler.max_num_seqs:
        raise ValueError(f"beam_width ({params.beam_width}) must be <= max_num_seqs "
                         f"({config.scheduler.max_num_seqs}), so a prompt's beams share a step.")
    for ids in prompts:
        if len(ids) + params.max_tokens > config.model.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens and max_tokens is "
                             f"{params.max_tokens}: more than max_model_len "
                             f"({config.model.max_model_len}); shorten either.")
    return k


def step_params(num_logprobs: int) -> SamplingParams:
    """One step of one beam: the next token's top logprobs (raw distribution); the sampled
    token itself is unused (greedy, so it is the top-1 and adds no entry)."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=num_logprobs, ignore_eos=True,
                          detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)


def _step_batch(instances: list[BeamSearchInstance]) -> tuple[list[BeamSearchInstance],
                                                               list[list[int]]]:
    live = [s for s in instances if not s.done]
    return live, [b.tokens for s in live for b in s.beams]


def _advance(live: list[BeamSearchInstance], outs: Sequence[RequestOutput]) -> None:
    rows = [_next_logprobs(o) for o in outs]
    pos = 0
    for s in live:
        n = len(s.beams)  # before the step replaces them
        s.step(rows[pos:pos + n])
        pos += n


def _next_logprobs(ro: RequestOutput) -> PositionLogprobs:
    c = ro.outputs[0]
    if not c.logprobs:
        raise RuntimeError(f"a beam search step request ended without a token "
                           f"(finish_reason {c.finish_reason!r}).")
    return c.logprobs[0]


def beam_search(llm: Any, prompts: Sequence[Any], params: BeamSearchParams,
                lora_request: Any = None) -> list[BeamSearchOutput]:
    """Offline (``llm``: an ``LLM``): prompts as ``LLM.generate`` takes them; lora_request
    one adapter for all, or one per prompt (as LLM.generate's)."""
    engine = llm.engine
    loras = (list(lora_request) if isinstance(lora_request, (list, tuple))
             else [lora_request] * len(prompts))
    if len(loras) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(loras)} lora requests.")
    ids = [engine.inputs.process(p, SamplingParams(max_tokens=1))[1] for p in prompts]
    sp = step_params(check_beam_search(params, engine.config, ids))
    eos = engine.config.model.eos_token_ids
    instances = [BeamSearchInstance(t, params, eos) for t in ids]
    lora_of = {id(s): lo for s, lo in zip(instances, loras)}
    while True:
        live, batch = _step_batch(instances)
        if not live:
            break
        step_loras = [lora_of[id(s)] for s in live for _ in s.beams]  # (batch order)
        _advance(live, llm.generate(batch, sp, use_tqdm=False, lora_request=step_loras))
    return [s.output(engine.tokenizer) for s in instances]


# (request id, prompt token ids, params) -> the request's RequestOutputs; the server passes
# AsyncEngineClient.generate with its priority bound
AsyncGenerate = Callable[[str, list[int], SamplingParams], AsyncIterator[RequestOutput]]


async def beam_search_async(generate: AsyncGenerate, prompts: Sequence[Sequence[int]],
                            params: BeamSearchParams, config: Any, request_id: str,
                            tokenizer: Any = None, num_logprobs: int = 0,
                            skip_special_tokens: bool = True) -> list[BeamSearchOutput]:
    """The same search over an async engine client; each step's requests run concurrently.
    ``num_logprobs``: top logprobs wanted per output token (kept in the sequences' logprobs).
    Cancelling it aborts the step's requests."""
    sp = step_params(check_beam_search(params, config, prompts, num_logprobs))
    instances = [BeamSearchInstance(t, params, config.model.eos_token_ids) for t in prompts]
    step = 0
    while True:
        live, batch = _step_batch(instances)
        if not live:
            break
        outs = await _gather([final_output(generate(f"{request_id}-beam{step}.{j}", toks, sp))
                              for j, toks in enumerate(batch)])
        _advance(live, outs)
        step += 1
    return [s.output(tokenizer, skip_special_tokens) for s in instances]


async def final_output(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with contextlib.aclosing(gen) as g:
        async for ro in g:
            last = ro
    if last is None or not last.finished:
        raise RuntimeError("a beam search step request ended without output.")
    return last


async def _gather(coros: list[Awaitable[RequestOutput]]) -> list[RequestOutput]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:  # on an error or cancellation: abort the step's other requests
            t.cancel()


# ---- best_of ------------------------------------------------------------------------------
def rank_best_of(ro: RequestOutput) -> RequestOutput:
    """OpenAI's legacy best_of: the samples by cumulative logprob (raw model distribution),
    highest first, re-indexed 0.. so the caller shows index < n. Needs logprobs requested."""
    outs = sorted(ro.outputs, key=lambda o: -_cum(o))
    return replace(ro, outputs=[replace(o, index=i) for i, o in enumerate(outs)])


def _cum(o: Any) -> float:
    if o.cumulative_logprob is None:
        raise ValueError("best_of ranks by cumulative logprob: request logprobs (0 or more).")
    return o.cumulative_logprob


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
            and abs(x) != float("inf"))
