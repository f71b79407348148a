"""From logits to tokens: the sampler, the logits processors (a registry, applied in its order)
and the per-row state that feeds them."""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional, Sequence

from servelm.registry import check_name, load_class
from servelm.sampling.logits_processor import (AddedRequest, BatchUpdate, LogitsProcessor,
                                               ProcessorContext)
from servelm.sampling.pipeline import SamplingPipeline
from servelm.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata

# name -> class, in the order they apply (vLLM's: logit_bias and min_tokens, then penalties)
LOGITS_PROCESSORS = MappingProxyType({
    "logit_bias": "servelm.sampling.logit_bias:LogitBiasLogitsProcessor",
    "min_tokens": "servelm.sampling.min_tokens:MinTokensLogitsProcessor",
    "penalties": "servelm.sampling.penalties:PenaltiesLogitsProcessor",
    # structured outputs: -inf where the grammar forbids (order-free: -inf stays -inf)
    "grammar": "servelm.structured_output.processor:GrammarLogitsProcessor",
})


def build_sampling_pipeline(ctx: ProcessorContext,
                            names: Optional[Sequence[str]] = None) -> SamplingPipeline:
    """The pipeline with the named processors (default: all, in registry order)."""
    names = list(LOGITS_PROCESSORS) if names is None else list(names)
    for n in names:
        check_name(LOGITS_PROCESSORS, n, "logits processor")
    ordered = [n for n in LOGITS_PROCESSORS if n in names]
    return SamplingPipeline(ctx, [load_class(LOGITS_PROCESSORS, n, "logits processor")(ctx)
                                  for n in ordered])


__all__ = ["AddedRequest", "BatchUpdate", "LOGITS_PROCESSORS", "LogitsProcessor",
           "ProcessorContext", "Sampler", "SamplerOutput", "SamplingMetadata", "SamplingPipeline",
           "build_sampling_pipeline"]
