"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts, and a prefix
cache that maps chained hashes of full blocks to the block holding their KV.

A request's last, partial block is cached too when the request leaves (``cache_partial``),
under the hash of its n < block_size tokens (never a full block's: those hash block_size
tokens). A later request whose tokens continue past it (a beam one token longer, a resumed
request, a chat turn that repeats the last one's text) takes it copy-on-write: a fresh block,
filled from the cached one before the step's forward (the scheduler's ``blocks_to_copy``), so
it computes only the tokens after the n instead of the whole partial block again.

Freed blocks keep their hash while they sit in the free queue, so a later request with the same
prefix can take them back (a cache hit); they are evicted in LRU order only when a fresh block is
needed. Nothing here touches tensors: the model runner owns the KV memory, this owns block ids.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

from servelm.core.request import Request

BlockHash = bytes


def hash_block(parent: Optional[BlockHash], tokens: Sequence[int],
               extra_keys: Optional[tuple[Hashable, ...]] = None) -> BlockHash:
    """Chained SHA-256 of a full block: its identity includes every token before it (through
    ``parent``) and ``extra_keys``, anything besides the tokens that changes their KV (a LoRA
    adapter's id, say). Collision-resistant, unlike Python's ``hash``: two different prefixes
    sharing a cached block would silently serve one request the other's KV."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", tokens).tobytes())  # token ids as int64: one fixed-width encoding
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


@dataclass
class SwappedKV:
    """Where a swapped-out request's KV lives, by position in its block table."""

    kept: dict[int, int]  # position -> GPU block shared with other requests (still referenced)
    host: dict[int, int]  # position -> host block holding the copy of a private block
    num_blocks: int  # blocks that held its computed tokens


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache


# the block released table entries point at under a sliding window (reserved, never handed out)
NULL_BLOCK = 0


class BlockPool:
    """Block ids 0..num_blocks-1 with reference counts, an LRU free queue and the hash table."""

    def __init__(self, num_blocks: int, enable_caching: bool, reserve_null: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Optional[BlockHash]] = [None] * num_blocks
        # reserve_null: block 0 is never handed out; block tables point their released
        # (out-of-window) entries at it (its KV stays zeros: attention masks those keys)
        self.null_block = NULL_BLOCK if reserve_null else None
        self.free_queue: OrderedDict[int, None] = OrderedDict(
            (i, None) for i in range(int(reserve_null), num_blocks))
        self.cached: dict[BlockHash, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref_cnt 1), evicting the least recently freed cached ones."""
        assert n <= len(self.free_queue)
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[bid]
            if h is not None:
                if self.cached.get(h) == bid:
                    del self.cached[h]
                self.block_hash[bid] = None
            self.ref_cnt[bid] = 1
            out.append(bid)
        return out

    def lookup(self, h: BlockHash) -> Optional[int]:
        return self.cached.get(h)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (hits); a free one leaves the free queue."""
        for bid in block_ids:
            if self.ref_cnt[bid] == 0:
                del self.free_queue[bid]
            self.ref_cnt[bid] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each; blocks given in eviction order (first evicted first)."""
        for bid in block_ids:
            if bid == self.null_block:
                continue
            self.ref_cnt[bid] -= 1
            assert self.ref_cnt[bid] >= 0, f"block {bid} freed twice"
            if self.ref_cnt[bid] == 0:
                self.free_queue[bid] = None

    def cache_block(self, bid: int, h: BlockHash) -> None:
        if bid == self.null_block:  # a released entry's stand-in holds no one's tokens
            return
        if self.enable_caching and self.block_hash[bid] is None and h not in self.cached:
            self.block_hash[bid] = h
            self.cached[h] = bid

    def uncache(self, bid: int) -> None:
        """Take a block out of the prefix cache (its KV is about to change)."""
        h = self.block_hash[bid]
        if h is not None:
            if self.cached.get(h) == bid:
                del self.cached[h]
            self.block_hash[bid] = None

    def reset_prefix_cache(self) -> bool:
        if any(self.ref_cnt):
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True


class KVCacheManager:
    """Per-request block tables on top of a BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 num_host_blocks: int = 0, sliding_window: int = 0,
                 cache_partial: bool = True) -> None:
        self.block_size = block_size
        # partial last blocks cached when requests leave (not under a sliding window, whose
        # released entries a copy would not follow)
        self.cache_partial = enable_caching and cache_partial and not sliding_window
        # every layer attends to its last sliding_window keys only (0: all of them): blocks
        # wholly before a request's window are released as it advances
        self.window = sliding_window
        if sliding_window and num_blocks < 2:
            raise ValueError(f"a sliding-window model needs at least 2 KV cache blocks (one is "
                             f"reserved), got {num_blocks}: give the KV cache more memory.")
        self.pool = BlockPool(num_blocks, enable_caching, reserve_null=sliding_window > 0)
        self.num_window_freed = 0  # blocks released that way, since start
        self.enable_caching = enable_caching
        self.stats = PrefixCacheStats()
        # free host blocks for swap preemption, popped lowest id first (a request's blocks tend
        # to be consecutive: fewer, larger copies)
        self.num_host_blocks = num_host_blocks
        self.host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold (the reserved null block is not one)."""
        return self.pool.num_blocks - (self.pool.null_block is not None)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running requests (cached free blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.num_blocks

    def free_outside_window(self, req: Request) -> None:
        """Under a sliding window: release req's blocks that hold only keys before the window
        of its next query (position num_computed_tokens), pointing their table entries at the
        null block. Those keys are never read again (positions only grow; a recompute after
        preemption starts from fresh blocks). Another holder (a prefix-cache hit) keeps its
        reference; a freed block stays in the prefix cache until reused."""
        if not self.window:
            return
        ids = req.block_ids
        first = min(max(0, req.num_computed_tokens - self.window + 1) // self.block_size,
                    len(ids))
        null = self.pool.null_block
        out = [ids[i] for i in range(req.num_null_blocks, first) if ids[i] != null]
        if out:
            for i in range(req.num_null_blocks, first):
                ids[i] = null
            self.pool.free(out)
            self.num_window_freed += len(out)
        req.num_null_blocks = max(req.num_null_blocks, first)

    def evict(self, req: Request, keep: int, fixed_blocks: int = 0
              ) -> Optional[tuple[int, list[int]]]:
        """KV eviction: req's cache (num_computed_tokens - num_evicted tokens) shrinks to
        ``keep`` tokens, which the runner moves into the first blocks of the new table
        (kv_eviction/compact.py). Blocks past those are freed (a freed block keeps its prefix
        -cache entry: its KV is untouched); of the ones kept, a block another request also
        holds is replaced by a fresh copy-on-write block, and the others leave the prefix
        cache (their KV is rewritten), except the first ``fixed_blocks``, which keep their
        tokens in place (sinks) and stay as they are. Returns (old length, new table), or None
        (nothing changed) when the pool lacks blocks for the copies."""
        ids, ref, pool = req.block_ids, self.pool.ref_cnt, self.pool
        old_len = self.cache_len(req)
        n_keep = self.blocks_needed(keep)
        head, tail = ids[:n_keep], ids[n_keep:]
        shared = [i for i, b in enumerate(head) if ref[b] > 1 and i >= fixed_blocks]
        freed = sum(1 for b in tail if ref[b] == 1)
        if len(shared) > pool.num_free_blocks + freed:
            return None
        pool.free(list(reversed(tail)))
        new = list(head)
        fresh = iter(pool.allocate(len(shared)))
        for i in shared:
            pool.free([head[i]])  # the other holders keep it, cached as it is
            new[i] = next(fresh)
        for b in new[fixed_blocks:]:
            pool.uncache(b)
        req.block_ids = new
        req.num_evicted += old_len - keep
        return old_len, list(new)

    def cache_len(self, req: Request) -> int:
        """Tokens req's cache holds (computed ones, less those evicted)."""
        return req.num_computed_tokens - req.num_evicted

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request, upto_tokens: int) -> None:
        """Extend req.block_hashes over the full blocks among its first upto_tokens tokens."""
        bs = self.block_size
        for i in range(len(req.block_hashes), upto_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(hash_block(parent, req.all_token_ids[i * bs:(i + 1) * bs],
                                               req.cache_extra_keys))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Longest cached prefix of req's tokens, in whole blocks. Leaves at least one token to
        compute, since the last token's logits are needed. The caller records the lookup with
        ``record_lookup`` once the request is actually scheduled (so retries count once)."""
        if not self.enable_caching or req.params.prompt_logprobs is not None:
            return []
        max_hit = req.num_tokens - 1
        self._update_hashes(req, max_hit)
        hits = []
        for h in req.block_hashes[:max_hit // self.block_size]:
            bid = self.pool.lookup(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def get_partial_hit(self, req: Request, num_full_hits: int) -> Optional[tuple[int, int]]:
        """After ``num_full_hits`` full blocks, a cached partial block holding req's next n
        tokens (n < block_size, the longest, leaving one token to compute): (block, n), or
        None. Looked up only when every full block up to there was a hit."""
        if not self.cache_partial or req.params.prompt_logprobs is not None:
            return None
        bs = self.block_size
        start = num_full_hits * bs
        max_hit = req.num_tokens - 1
        if max_hit // bs != num_full_hits:
            return None  # a full block past the hits missed: nothing after it can hit
        self._update_hashes(req, start)
        parent = req.block_hashes[num_full_hits - 1] if num_full_hits else None
        toks = req.all_token_ids
        for n in range(min(bs - 1, max_hit - start), 0, -1):
            bid = self.pool.lookup(hash_block(parent, toks[start:start + n],
                                              req.cache_extra_keys))
            if bid is not None:
                return bid, n
        return None

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] = (),
                       num_lookahead_tokens: int = 0,
                       partial: Optional[tuple[int, int]] = None) -> Optional[list[int]]:
        """Make room for num_new_tokens more tokens after req's computed ones (plus
        ``computed_blocks`` taken from the prefix cache, and a ``partial`` hit's n tokens, whose
        block the first new block copies: the caller schedules that copy), and
        num_lookahead_tokens slots past them (a draft model's KV; never hashed). Returns the
        newly allocated block ids, or None (and changes nothing) if the pool lacks free
        blocks."""
        self.free_outside_window(req)
        num_computed = (req.num_computed_tokens + len(computed_blocks) * self.block_size
                        + (partial[1] if partial else 0))
        evicted = req.num_evicted  # (then its blocks are no one's prefix: never hashed)
        need = self.blocks_needed(num_computed - evicted + num_new_tokens + num_lookahead_tokens)
        have = len(req.block_ids) + len(computed_blocks)
        bs = self.block_size
        if (not computed_blocks and need <= have
                and (not self.enable_caching or evicted
                     or (num_computed + num_new_tokens) // bs == num_computed // bs)):
            return []  # the common decode step: room in the last block, no block becomes full
        # cached blocks being revived leave the free queue too
        reviving = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        src = partial[0] if partial else None
        pinned = src is not None and self.pool.ref_cnt[src] == 0 and src not in computed_blocks
        new = max(0, need - have)
        if new + reviving + pinned > self.pool.num_free_blocks:
            return None
        if computed_blocks:
            self.pool.touch(list(computed_blocks))
            req.block_ids.extend(computed_blocks)
        if src is not None:
            self.pool.touch([src])  # not handed out as one of the new blocks
        new_ids = self.pool.allocate(new)
        if src is not None:
            self.pool.free([src])  # cached as before; copied before anything reuses it
        req.block_ids.extend(new_ids)
        if self.enable_caching and not evicted:
            # Register blocks that become full this step. Safe before the forward pass: a request
            # hitting them in the same step reads KV that this step's write_kv stores first.
            upto = min(num_computed + num_new_tokens, req.num_tokens)
            self._update_hashes(req, upto)
            for i in range(num_computed // self.block_size, upto // self.block_size):
                self.pool.cache_block(req.block_ids[i], req.block_hashes[i])
        return new_ids

    def cache_new_full_blocks(self, req: Request, num_new_tokens: int) -> None:
        """Register the full blocks among req's computed tokens that its newest num_new_tokens
        tokens completed. Needed when those tokens' KV was scheduled before the tokens were
        known (an in-flight sample under asynchronous scheduling, accepted drafts), so
        allocate_slots could not hash their blocks then. Idempotent."""
        if not self.enable_caching or req.num_evicted:
            return
        bs = self.block_size
        upto = min(req.num_computed_tokens, req.num_tokens)
        first = max(0, (req.num_tokens - num_new_tokens) // bs)
        if upto // bs <= first:
            return
        self._update_hashes(req, upto)
        for i in range(first, min(upto // bs, len(req.block_ids))):
            self.pool.cache_block(req.block_ids[i], req.block_hashes[i])

    def free(self, req: Request) -> None:
        self._cache_partial_block(req)
        # reverse order: a request's tail blocks are the least likely to be shared, evict first
        self.pool.free(list(reversed(req.block_ids)))
        req.block_ids = []
        req.num_null_blocks = 0
        req.num_evicted = 0  # (a recompute starts from the whole sequence again)
        sw = req.swapped_kv
        if sw is not None:
            self.pool.free(list(sw.kept.values()))
            self.host_free.extend(sorted(sw.host.values(), reverse=True))
            req.swapped_kv = None

    def _cache_partial_block(self, req: Request) -> None:
        """Cache req's last block if its KV holds a partial block of known tokens."""
        if not self.cache_partial or req.num_evicted or not req.block_ids:
            return
        bs = self.block_size
        m = min(req.num_computed_tokens, req.num_tokens)  # KV written, token ids known
        i, n = divmod(m, bs)
        if (n == 0 or i >= len(req.block_ids) or req.block_ids[i] == self.pool.null_block
                or self.pool.ref_cnt[req.block_ids[i]] != 1):  # (only its own: unchanging)
            return
        self._update_hashes(req, i * bs)
        parent = req.block_hashes[i - 1] if i else None
        self.pool.cache_block(req.block_ids[i], hash_block(parent, req.all_token_ids[i * bs:m],
                                                           req.cache_extra_keys))

    # ---- swap preemption -------------------------------------------------------------------
    def swap_out(self, req: Request) -> Optional[list[tuple[int, int]]]:
        """Move the blocks holding req's computed tokens to host memory: (GPU block, host
        block) pairs to copy before the blocks are reused, or None (nothing changed) when the
        host lacks room. Blocks other requests also hold stay on the GPU, referenced; blocks
        past the computed tokens are just freed."""
        ids, ref = req.block_ids, self.pool.ref_cnt
        n = min(self.blocks_needed(self.cache_len(req)), len(ids))
        private = [i for i in range(n) if ref[ids[i]] == 1]
        if len(private) > len(self.host_free):
            return None
        host = {i: self.host_free.pop() for i in private}
        pairs = [(ids[i], host[i]) for i in private]
        kept = {i: ids[i] for i in range(n) if i not in host}
        self.pool.free(list(reversed([ids[i] for i in private] + ids[n:])))
        req.block_ids = []
        req.swapped_kv = SwappedKV(kept, host, n)
        return pairs

    def swap_in(self, req: Request) -> Optional[list[tuple[int, int]]]:
        """Give a swapped-out request GPU blocks again: (host block, GPU block) pairs to copy
        before its next forward, or None (nothing changed) when the GPU lacks free blocks."""
        sw = req.swapped_kv
        assert sw is not None and not req.block_ids
        if len(sw.host) > self.pool.num_free_blocks:
            return None
        fresh = iter(self.pool.allocate(len(sw.host)))
        table = {**sw.kept, **{i: next(fresh) for i in sw.host}}
        req.block_ids = [table[i] for i in range(sw.num_blocks)]
        pairs = [(h, table[i]) for i, h in sw.host.items()]
        self.host_free.extend(sorted(sw.host.values(), reverse=True))
        req.swapped_kv = None
        return pairs

    def swap_in_blocks_needed(self, req: Request, num_new_tokens: int,
                              num_lookahead_tokens: int = 0) -> int:
        """Free GPU blocks a swapped-out request needs to resume with num_new_tokens more."""
        sw = req.swapped_kv
        assert sw is not None
        more = (self.blocks_needed(self.cache_len(req) + num_new_tokens
                                   + num_lookahead_tokens) - sw.num_blocks)
        return len(sw.host) + max(0, more)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_blocks
