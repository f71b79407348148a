"""Offline API, shaped like vLLM's ``LLM``."""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Optional, Sequence, Union

from servelm.config import EngineArgs
from servelm.engine.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from servelm.engine.engine import Engine, PromptType
from servelm.lora.request import LoRARequest
from servelm.outputs import RequestOutput
from servelm.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """``LLM(model=None, **engine_args)``: with no model, the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: Optional[str] = None, **engine_args: Any) -> None:
        self.engine = Engine.from_engine_args(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def spec_decode_stats(self) -> dict[str, Any]:
        """Speculative decoding since the engine started: verifications (``num_drafts``), draft
        tokens, accepted tokens (also by draft position), the acceptance rate and the mean
        acceptance length (tokens a verification step yields: 1 + accepted / drafts)."""
        s = self.engine.stats()
        n, k, acc = s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens
        return {"num_drafts": n, "num_draft_tokens": k, "num_accepted_tokens": acc,
                "accepted_per_position": list(s.spec_accepted_per_pos),
                "acceptance_rate": acc / k if k else None,
                "mean_acceptance_length": 1 + acc / n if n else None}

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True,
                 priority: Optional[Sequence[int]] = None,
                 lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, a list of token-id lists,
        or dicts with 'prompt' / 'prompt_token_ids'. Outputs come back in input order.
        priority: one per prompt (lower first), with scheduling_policy='priority'.
        lora_request: the adapter every prompt runs with, or one per prompt (None: the base
        model); needs enable_lora=True."""
        return self._run(_as_prompt_list(prompts), sampling_params, use_tqdm, True, priority,
                         lora_request)

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict] = None,
             lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None
             ) -> list[RequestOutput]:
        """messages: one conversation (a list of {'role', 'content'}) or a list of them."""
        tok = self.engine.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise ValueError("this model has no chat template; use generate().")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **(chat_template_kwargs or {})) for c in convs]
        # the template already holds the special tokens it wants
        return self._run(prompts, sampling_params, use_tqdm, False, None, lora_request)

    def beam_search(self, prompts: Union[PromptType, Sequence[PromptType]],
                    params: BeamSearchParams,
                    lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None
                    ) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: per prompt the ``params.beam_width`` best sequences,
        scored and stopped as transformers' beam search (see engine/beam_search.py)."""
        return beam_search(self, _as_prompt_list(prompts), params, lora_request)

    def _run(self, prompts: list[PromptType], sampling_params, use_tqdm: bool,
             add_special_tokens: bool,
             priority: Optional[Sequence[int]] = None,
             lora_request: Any = None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        # offline: only finished outputs are wanted, so none are built per step
        params = [replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params.")
        prios = [0] * len(prompts) if priority is None else list(priority)
        if len(prios) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(prios)} priorities.")
        loras = (list(lora_request) if isinstance(lora_request, (list, tuple))
                 else [lora_request] * len(prompts))
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} lora requests.")
        ids = []
        try:
            for p, sp, prio, lora in zip(prompts, params, prios, loras):
                rid = str(next(self._ids))
                self.engine.add_request(rid, p, sp, priority=prio,
                                        add_special_tokens=add_special_tokens,
                                        lora_request=lora)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._drain(ids, use_tqdm)

    def _drain(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts
