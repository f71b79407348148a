"""KV-cache eviction on the paged cache (StreamingLLM's attention sinks, H2O's heavy hitters):
each request keeps at most a budget of tokens' KV, so generation can run past max_model_len
with constant memory. See config.py (the settings), policy.py (which tokens stay),
compact.py (moving the survivors into fewer blocks, re-positioned) and scores.py (the
attention each cached token has received, for H2O)."""
from servelm.kv_eviction.config import KV_EVICTION_POLICIES, KVEvictionConfig, make_eviction_config

__all__ = ["KV_EVICTION_POLICIES", "KVEvictionConfig", "make_eviction_config"]
