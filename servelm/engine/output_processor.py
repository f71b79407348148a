"""Client-side half of the engine: turns EngineCoreOutputs (token ids) into RequestOutputs
(text, logprobs, finish reasons), detokenizing incrementally, applying stop strings and joining
the n samples of a request."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from servelm.core.step import EngineCoreOutput
from servelm.engine.detokenizer import IncrementalDetokenizer, decoder_of, find_stop
from servelm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from servelm.sampling_params import RequestOutputKind, SamplingParams


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


@dataclass
class _Child:
    out: CompletionOutput
    detok: Optional[IncrementalDetokenizer]
    new_tokens: int = 0


@dataclass
class _ReqState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[str, _Child]
    metrics: RequestMetrics
    prompt_logprobs: Optional[list] = None  # complete: [None, row for token 1, ...]
    num_cached_tokens: int = 0
    unfinished: set[str] = field(default_factory=set)
    # prompt logprob rows as the chunks arrive (from the first sample only: all are equal)
    prompt_lp_rows: Optional[list] = None
    prompt_lp_missing: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._decode = decoder_of(tokenizer) if tokenizer is not None else None
        self.states: dict[str, _ReqState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[str]:
        """Registers a request; returns its child ids (one per sample)."""
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use.")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (pass "
                             "tokenizer=... or use stop_token_ids).")
        st = _ReqState(request_id, prompt, prompt_token_ids, params, {}, RequestMetrics(arrival_time))
        if params.prompt_logprobs is not None:
            st.prompt_lp_rows = [None] * len(prompt_token_ids)
            st.prompt_lp_missing = len(prompt_token_ids) - 1
            if st.prompt_lp_missing == 0:
                st.prompt_logprobs = st.prompt_lp_rows
        for i in range(params.n):
            cid = child_request_id(request_id, i, params.n)
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                            params.skip_special_tokens, self._decode)
                     if self.tokenizer is not None and params.detokenize else None)
            st.children[cid] = _Child(CompletionOutput(i, "", [], 0.0 if params.logprobs is not None
                                                       else None,
                                                       [] if params.logprobs is not None else None),
                                      detok)
            self.child_to_parent[cid] = request_id
            st.unfinished.add(cid)
        self.states[request_id] = st
        return list(st.children)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns its unfinished child ids for the core to abort."""
        st = self.states.pop(request_id, None)
        if st is None:
            return []
        for cid in st.children:
            self.child_to_parent.pop(cid, None)
        return list(st.unfinished)

    def _decode_token(self, tid: int) -> Optional[str]:
        return self.tokenizer.decode([tid]) if self.tokenizer is not None else None

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (RequestOutputs of requests that changed, child ids stopped by a stop string,
        which the core must finish)."""
        now = time.time()
        touched: dict[str, _ReqState] = {}
        stopped: list[str] = []
        for eo in outputs:
            parent = self.child_to_parent.get(eo.req_id)
            if parent is None:
                continue
            st = self.states[parent]
            if eo.req_id not in st.unfinished:
                continue  # stopped by a stop string; the core may not have heard yet
            child = st.children[eo.req_id]
            out, p = child.out, st.params
            if st.metrics.first_token_time is None and eo.new_token_ids:
                st.metrics.first_token_time = now
            if eo.new_token_ids:
                st.metrics.last_token_time = now
            if eo.prompt_logprobs is not None and child.out.index == 0:
                self._add_prompt_logprobs(st, eo.prompt_logprobs_start, eo.prompt_logprobs)
            if not eo.new_token_ids and eo.finish_reason is None:
                continue  # a prompt chunk: nothing for the user yet
            st.num_cached_tokens = eo.num_cached_tokens
            out.token_ids.extend(eo.new_token_ids)
            child.new_tokens = len(eo.new_token_ids)
            if eo.new_logprobs and out.logprobs is not None:
                for d, tid in zip(eo.new_logprobs, eo.new_token_ids):
                    out.logprobs.append(self._to_logprobs(d))
                    out.cumulative_logprob += d[tid][0]
            finish, stop_reason = eo.finish_reason, eo.stop_reason
            if child.detok is not None and eo.new_token_ids:
                new = eo.new_token_ids
                if not (p.stop and finish != "stop"):
                    out.text += child.detok.step(new)
                else:
                    # token by token, as single steps check them: a step of several tokens
                    # (speculative, multi-step) ends at the token that completes a stop string,
                    # and the tokens after it are dropped
                    before = len(out.token_ids) - len(new)
                    for i, tid in enumerate(new):
                        delta = child.detok.step([tid])
                        out.text += delta
                        if before + i + 1 < p.min_tokens:
                            continue
                        hit = find_stop(out.text, len(delta), p.stop, p.include_stop_str_in_output)
                        if hit is not None:
                            out.text = out.text[:hit[1]]
                            if finish is None:
                                stopped.append(eo.req_id)
                            finish, stop_reason = "stop", hit[0]
                            self._drop_after(out, before + i + 1, eo, new)
                            child.new_tokens = i + 1
                            break
            if finish is not None:
                out.finish_reason, out.stop_reason = finish, stop_reason
                st.unfinished.discard(eo.req_id)
            touched[parent] = st
        results = []
        for rid, st in touched.items():
            done = not st.unfinished
            if not done and st.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            if done:
                st.metrics.finished_time = now
                del self.states[rid]
                for cid in st.children:
                    self.child_to_parent.pop(cid, None)
            results.append(RequestOutput(
                request_id=rid, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
                outputs=[c.out for c in st.children.values()], finished=done, metrics=st.metrics,
                prompt_logprobs=st.prompt_logprobs, num_cached_tokens=st.num_cached_tokens,
                new_token_counts=[c.new_tokens for c in st.children.values()]))
            for c in st.children.values():
                c.new_tokens = 0
        return results, stopped

    def _drop_after(self, out, keep: int, eo: EngineCoreOutput, new: list[int]) -> None:
        """Keeps out's first ``keep`` tokens (and their logprobs): a stop string ended the
        sequence inside this step's tokens ``new``."""
        drop = len(out.token_ids) - keep
        if drop <= 0:
            return
        if out.logprobs is not None and eo.new_logprobs:
            for d, tid in zip(eo.new_logprobs[len(new) - drop:], new[len(new) - drop:]):
                out.cumulative_logprob -= d[tid][0]
            del out.logprobs[keep:]
        del out.token_ids[keep:]

    def _add_prompt_logprobs(self, st: _ReqState, start: int, rows: list) -> None:
        """Rows for prompt tokens start+1, start+2, ... (a recomputed chunk overwrites)."""
        dst = st.prompt_lp_rows
        if dst is None:
            return
        for j, d in enumerate(rows):
            if dst[start + 1 + j] is None:
                st.prompt_lp_missing -= 1
            dst[start + 1 + j] = self._to_logprobs(d)
        if st.prompt_lp_missing == 0:
            st.prompt_logprobs = dst

    def _to_logprobs(self, d: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        return {tid: Logprob(lp, rank, self._decode_token(tid)) for tid, (lp, rank) in d.items()}
