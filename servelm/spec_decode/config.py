"""``speculative_config``: vLLM's keys, validated once into a frozen SpeculativeConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Optional, Union

from servelm.config_dict import parse_config_dict

# method -> "module:Class" of its Proposer (servelm.registry.load_class)
PROPOSERS = MappingProxyType({
    "ngram": "servelm.spec_decode.ngram:NgramProposer",
    "draft_model": "servelm.spec_decode.draft_model:DraftModelProposer",
    "layer_skip": "servelm.spec_decode.layer_skip:LayerSkipProposer",
})
# proposers that draft with a model over the paged KV cache: their draft passes write KV up to
# k positions past a step's tokens, so the scheduler reserves that many lookahead slots
MODEL_METHODS = ("draft_model", "layer_skip")

# the keys each method reads (besides method and num_speculative_tokens)
_METHOD_KEYS = MappingProxyType({
    "ngram": ("prompt_lookup_min", "prompt_lookup_max"),
    "draft_model": ("model", "tree"),
    "layer_skip": ("draft_layers",),
})
_COMMON = ("method", "num_speculative_tokens", "disable_by_batch_size", "adaptive")
_KEYS = {*_COMMON,
         *(k for keys in _METHOD_KEYS.values() for k in keys)}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int  # k: drafts per request per step (at most)
    prompt_lookup_min: int = 1  # ngram: shortest suffix matched against the earlier tokens
    prompt_lookup_max: int = 4  # ngram: longest (tried first)
    # no drafts while more requests than this sample in a step: large batches are compute-bound,
    # where verifying drafts costs more than it saves (vLLM's speculative_disable_by_batch_size)
    disable_by_batch_size: Optional[int] = None
    model: Optional[str] = None  # draft_model: a HF directory, a .gguf file or a dummy preset
    draft_layers: Optional[int] = None  # layer_skip: the target's first layers that draft
    # draft_model: the draft's resolved config (finalize_speculative_config fills it)
    draft: Any = None
    # measure steps with and without drafts per batch size and draft only where it pays
    # (spec_decode/gate.py); False: draft at every step (up to disable_by_batch_size)
    adaptive: bool = True
    # draft_model: a token tree's branching factor per depth (spec_decode/tree.py); its
    # depth is num_speculative_tokens. None: one chain of drafts
    tree: Optional[tuple[int, ...]] = None

    @property
    def tree_shape(self):
        from servelm.spec_decode.tree import TreeShape
        return TreeShape(self.tree) if self.tree else None

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots past a step's tokens that drafting writes (model-based proposers): k for a
        chain, every node of a tree."""
        if self.method not in MODEL_METHODS:
            return 0
        return self.tree_shape.num_nodes if self.tree else self.num_speculative_tokens


def _int(d: dict, key: str, default: Optional[int], lo: int) -> Optional[int]:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"speculative_config[{key!r}] must be an integer >= {lo}, got {v!r}.")
    return v


def parse_speculative_config(raw: Union[None, str, dict, SpeculativeConfig]
                             ) -> Optional[SpeculativeConfig]:
    """A dict (or its JSON text, as the CLI passes it) -> SpeculativeConfig; None: off."""
    if raw is None or isinstance(raw, SpeculativeConfig):
        return raw
    raw = parse_config_dict(raw, "speculative_config", _KEYS)
    method = raw.get("method")
    if method not in PROPOSERS:
        raise ValueError(f"speculative_config['method'] must be one of {sorted(PROPOSERS)}, "
                         f"got {method!r}.")
    foreign = sorted(k for k in raw if k not in _COMMON and k not in _METHOD_KEYS[method])
    if foreign:  # never accepted and silently unused
        raise ValueError(f"speculative_config key(s) {foreign} do not apply to method "
                         f"{method!r} (its keys: {list(_METHOD_KEYS[method])}).")
    k = _int(raw, "num_speculative_tokens", None, 1)
    if k is None:
        raise ValueError("speculative_config needs 'num_speculative_tokens' (an integer >= 1).")
    lo = _int(raw, "prompt_lookup_min", 1, 1)
    hi = _int(raw, "prompt_lookup_max", max(lo, 4), 1)
    if hi < lo:
        raise ValueError(f"speculative_config['prompt_lookup_max'] ({hi}) must be >= "
                         f"prompt_lookup_min ({lo}).")
    model = raw.get("model")
    if method == "draft_model" and (not isinstance(model, str) or not model):
        raise ValueError("speculative_config['model'] is required for method 'draft_model': "
                         "a HF directory, a .gguf file or (with load_format='dummy') a preset.")
    tree = raw.get("tree")
    if tree is not None:
        from servelm.spec_decode.tree import TreeShape
        if not isinstance(tree, (list, tuple)):
            raise ValueError(f"speculative_config['tree'] must be a list of branching factors "
                             f"per depth, e.g. [2, 2, 1, 1]; got {tree!r}.")
        try:
            TreeShape(tuple(tree))
        except ValueError as e:
            raise ValueError(f"speculative_config['tree']: {e}") from None
        if len(tree) != k:
            raise ValueError(f"speculative_config['tree'] has depth {len(tree)}; it must equal "
                             f"num_speculative_tokens ({k}).")
        tree = tuple(tree)
    layers = _int(raw, "draft_layers", None, 1)
    if method == "layer_skip" and layers is None:
        raise ValueError("speculative_config['draft_layers'] is required for method "
                         "'layer_skip': how many of the target's first layers draft (>= 1).")
    adaptive = raw.get("adaptive", True)
    if not isinstance(adaptive, bool):
        raise ValueError(f"speculative_config['adaptive'] must be true or false, got "
                         f"{adaptive!r}.")
    return SpeculativeConfig(method, k, lo, hi, _int(raw, "disable_by_batch_size", None, 1),
                             model, layers, adaptive=adaptive, tree=tree)


def finalize_speculative_config(spec: Optional[SpeculativeConfig], target: Any,
                                load_format: str) -> Optional[SpeculativeConfig]:
    """Checks the config against the target's ModelConfig and resolves a draft model's own:
    same vocabulary, a context at least the target's max_model_len, the target's dtype."""
    if spec is None:
        return None
    if spec.method == "layer_skip" and spec.draft_layers >= target.num_layers:
        raise ValueError(f"speculative_config['draft_layers'] ({spec.draft_layers}) must be "
                         f"smaller than the target's {target.num_layers} layers.")
    if spec.method != "draft_model" or spec.draft is not None:
        return spec
    from servelm.loader import load_hf_config, resolve_model
    try:
        path = spec.model if load_format == "dummy" else resolve_model(spec.model)
        hf = load_hf_config(path, load_format)
    except (ValueError, OSError) as e:
        raise ValueError(f"speculative_config['model'] {spec.model!r}: {e}") from None
    fmt = load_format
    if fmt == "auto":
        fmt = "gguf" if str(path).endswith(".gguf") else "safetensors"
    if hf.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model {spec.model!r} has a vocabulary of {hf.vocab_size} "
                         f"tokens, the target {target.vocab_size}: a draft must share the "
                         "target's tokenizer.")
    ctx = getattr(hf, "max_position_embeddings", None) or 2048
    if ctx < target.max_model_len:
        raise ValueError(f"the draft model {spec.model!r} has a context of {ctx} tokens, "
                         f"shorter than the target's max_model_len ({target.max_model_len}); "
                         f"pass max_model_len <= {ctx}.")
    draft = dataclasses.replace(target, model=str(path), load_format=fmt, hf_config=hf,
                                tokenizer=None, quantization=None)
    return dataclasses.replace(spec, draft=draft)


def build_proposer(cfg: SpeculativeConfig, ctx: Any) -> Any:
    """ctx: a spec_decode.proposer.ProposerContext."""
    from servelm.registry import load_class
    proposer = load_class(PROPOSERS, cfg.method, "speculative_config['method']")(cfg)
    proposer.load(ctx)
    return proposer
