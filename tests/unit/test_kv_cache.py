"""BlockPool and KVCacheManager: reference counts, the LRU free queue, chained block hashes and
prefix-cache hits. Pure bookkeeping: no tensors, no model."""
from __future__ import annotations

import random

import pytest

from servelm.core.kv_cache import BlockPool, KVCacheManager, hash_block
from servelm.core.request import Request
from servelm.sampling_params import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int], **kw) -> Request:
    return Request(rid, tokens, SamplingParams(**kw), arrival_time=0.0)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30_000) for _ in range(n)]


def _check_pool(pool: BlockPool) -> None:
    """The pool's own invariants: free queue = blocks with no reference; hash table consistent."""
    assert set(pool.free_queue) == {b for b in range(pool.num_blocks) if pool.ref_cnt[b] == 0}
    assert all(c >= 0 for c in pool.ref_cnt)
    for h, b in pool.cached.items():
        assert pool.block_hash[b] == h
    for b, h in enumerate(pool.block_hash):
        if h is not None:
            assert pool.cached[h] == b


# ---- BlockPool --------------------------------------------------------------------------------
def test_pool_allocate_and_free_ref_counts():
    pool = BlockPool(8, enable_caching=True)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and all(pool.ref_cnt[b] == 1 for b in a)
    assert pool.num_free_blocks == 5
    b = pool.allocate(5)
    assert not set(a) & set(b) and pool.num_free_blocks == 0
    pool.touch(a)  # a second owner
    assert all(pool.ref_cnt[x] == 2 for x in a)
    pool.free(a)
    assert pool.num_free_blocks == 0  # still referenced once
    pool.free(a)
    assert pool.num_free_blocks == 3
    pool.free(b)
    assert pool.num_free_blocks == 8
    _check_pool(pool)
    with pytest.raises(AssertionError):
        pool.free([a[0]])  # freed twice


def test_pool_allocate_more_than_free_asserts():
    pool = BlockPool(4, enable_caching=True)
    pool.allocate(3)
    with pytest.raises(AssertionError):
        pool.allocate(2)


def test_pool_lru_eviction_of_cached_free_blocks():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    hashes = [hash_block(None, (i, i + 1)) for i in range(4)]
    for b, h in zip(blocks, hashes):
        pool.cache_block(b, h)
    # free in a known order: that is the eviction order
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    pool.free(order)
    assert list(pool.free_queue) == order
    for b, h in zip(blocks, hashes):
        assert pool.lookup(h) == b  # free blocks keep their hash
    # a hit on a free cached block takes it out of the free queue
    pool.touch([blocks[0]])
    assert blocks[0] not in pool.free_queue and pool.ref_cnt[blocks[0]] == 1
    # allocating evicts the least recently freed first, dropping their hashes
    got = pool.allocate(2)
    assert got == [blocks[2], blocks[3]]
    assert pool.lookup(hashes[2]) is None and pool.lookup(hashes[3]) is None
    assert pool.block_hash[blocks[2]] is None
    assert pool.lookup(hashes[1]) == blocks[1] and pool.lookup(hashes[0]) == blocks[0]
    _check_pool(pool)


def test_pool_refree_moves_block_to_back_of_lru():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    pool.free([a, b, c])
    pool.touch([a])
    pool.free([a])  # a was used most recently: evicted last
    assert list(pool.free_queue) == [b, c, a]
    assert pool.allocate(1) == [b]


def test_pool_cache_block_first_writer_wins_and_caching_off():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    h = hash_block(None, (1, 2, 3, 4))
    pool.cache_block(a, h)
    pool.cache_block(b, h)  # same content computed twice: the first block stays the cached one
    assert pool.lookup(h) == a and pool.block_hash[b] is None
    _check_pool(pool)

    off = BlockPool(4, enable_caching=False)
    x = off.allocate(1)[0]
    off.cache_block(x, h)
    assert off.lookup(h) is None and off.block_hash[x] is None


def test_pool_reset_prefix_cache():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_block(a, 11)
    pool.cache_block(b, 22)
    pool.free([b])
    assert pool.reset_prefix_cache() is False  # a is still referenced
    assert pool.lookup(11) == a and pool.lookup(22) == b
    pool.free([a])
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(11) is None and pool.lookup(22) is None
    assert all(h is None for h in pool.block_hash) and pool.num_free_blocks == 4
    _check_pool(pool)


# ---- hashes -----------------------------------------------------------------------------------
def test_hash_block_is_chained():
    t = (5, 6, 7, 8)
    h1 = hash_block(None, (1, 2, 3, 4))
    h2 = hash_block(None, (9, 2, 3, 4))
    assert hash_block(h1, t) != hash_block(h2, t)  # same block, different prefix
    assert hash_block(h1, t) == hash_block(h1, t)
    assert hash_block(None, t) != hash_block(h1, t)


def test_block_hashes_follow_token_ids():
    kv = KVCacheManager(32, BS, enable_caching=True)
    toks = _tokens(4 * BS + 3, seed=1)
    r = _req("a", toks)
    assert kv.allocate_slots(r, len(toks)) is not None
    assert len(r.block_hashes) == 4  # full blocks only
    parent = None
    for i, h in enumerate(r.block_hashes):
        parent = hash_block(parent, tuple(toks[i * BS:(i + 1) * BS]))
        assert h == parent


# ---- KVCacheManager ---------------------------------------------------------------------------
def test_allocate_slots_counts_blocks():
    kv = KVCacheManager(16, BS, enable_caching=True)
    r = _req("a", _tokens(10, seed=2))
    new = kv.allocate_slots(r, 6)  # chunk 1: tokens 0..5
    assert len(new) == 2 and r.block_ids == new
    r.num_computed_tokens = 6
    new2 = kv.allocate_slots(r, 4)  # tokens 6..9 -> 3 blocks total
    assert len(new2) == 1 and r.block_ids == new + new2
    r.num_computed_tokens = 10
    r.append_token(123)
    assert kv.allocate_slots(r, 1) == []  # token 10 still fits in block 2
    r.num_computed_tokens = 11
    r.append_token(124)
    assert kv.allocate_slots(r, 1) == []
    r.num_computed_tokens = 12
    r.append_token(125)
    assert len(kv.allocate_slots(r, 1)) == 1  # token 12 opens block 3
    assert kv.pool.num_free_blocks == 16 - 4
    assert kv.usage == pytest.approx(4 / 16)
    kv.free(r)
    assert r.block_ids == [] and kv.pool.num_free_blocks == 16 and kv.usage == 0.0
    _check_pool(kv.pool)


def test_allocate_slots_out_of_blocks_has_no_side_effects():
    kv = KVCacheManager(6, BS, enable_caching=True)
    a = _req("a", _tokens(16, seed=3))
    assert kv.allocate_slots(a, 16) is not None
    a.num_computed_tokens = 16
    a_blocks = list(a.block_ids)
    kv.free(a)  # 4 cached free blocks
    b = _req("b", _tokens(9, seed=4))  # unrelated: needs 3 blocks
    assert kv.allocate_slots(b, 9) is not None
    # c shares a's first 3 blocks (one of them must be revived out of the free queue) but needs
    # 4 further fresh blocks for its 13 new tokens: 3 + 4 > 3 free -> refused
    c = _req("c", a.all_token_ids[:12] + _tokens(13, seed=5))
    hits = kv.get_computed_blocks(c)
    assert hits == a_blocks[:3]  # b's allocation evicted only a's tail block
    before = (list(kv.pool.ref_cnt), list(kv.pool.free_queue), dict(kv.pool.cached),
              list(c.block_ids), c.num_computed_tokens)
    assert kv.allocate_slots(c, 13, hits) is None
    after = (list(kv.pool.ref_cnt), list(kv.pool.free_queue), dict(kv.pool.cached),
             list(c.block_ids), c.num_computed_tokens)
    assert before == after
    # with fewer new tokens it fits, reviving the hits
    assert kv.allocate_slots(c, 0, hits) is not None
    assert all(kv.pool.ref_cnt[h] == 1 for h in hits)
    _check_pool(kv.pool)


def test_get_computed_blocks_hits_leave_one_token():
    kv = KVCacheManager(64, BS, enable_caching=True)
    prompt = _tokens(3 * BS, seed=6)  # exactly 3 full blocks
    a = _req("a", prompt)
    assert kv.get_computed_blocks(a) == []
    kv.allocate_slots(a, len(prompt))
    a.num_computed_tokens = len(prompt)

    # identical prompt: the last block can't be a hit (its last token must be computed)
    b = _req("b", list(prompt))
    hits = kv.get_computed_blocks(b)
    assert hits == a.block_ids[:2]

    # one more token: all three full blocks hit
    c = _req("c", prompt + [7])
    assert kv.get_computed_blocks(c) == a.block_ids[:3]

    # same tokens in a different first block: chained hashes -> no hit at all
    d = _req("d", [prompt[0] + 1] + prompt[1:] + [7])
    assert kv.get_computed_blocks(d) == []

    # diverging in block 1: only block 0 hits
    e = _req("e", prompt[:BS] + [prompt[BS] + 1] + prompt[BS + 1:] + [7])
    assert kv.get_computed_blocks(e) == a.block_ids[:1]

    # a prompt shorter than one block never hits
    f = _req("f", prompt[:BS])
    assert kv.get_computed_blocks(f) == []

    # prompt_logprobs needs logits of every prompt token: no hits
    g = _req("g", prompt + [7], prompt_logprobs=0)
    assert kv.get_computed_blocks(g) == []
    # lookups are counted by the scheduler once a request is scheduled, not per attempt
    assert (kv.stats.queries, kv.stats.hits) == (0, 0)
    kv.record_lookup(3 * BS + 1, 3 * BS)
    assert (kv.stats.queries, kv.stats.hits) == (3 * BS + 1, 3 * BS)


def test_prefix_hit_shares_blocks_and_ref_counts():
    kv = KVCacheManager(32, BS, enable_caching=True)
    prompt = _tokens(5 * BS + 2, seed=7)
    a = _req("a", prompt)
    kv.allocate_slots(a, len(prompt))
    a.num_computed_tokens = len(prompt)
    a_blocks = list(a.block_ids)

    b = _req("b", prompt[:5 * BS] + _tokens(6, seed=8))
    hits = kv.get_computed_blocks(b)
    assert hits == a.block_ids[:5]
    new = kv.allocate_slots(b, b.num_tokens - 5 * BS, hits)
    assert len(new) == 2 and not set(new) & set(a.block_ids)
    assert b.block_ids == hits + new
    assert all(kv.pool.ref_cnt[x] == 2 for x in hits)
    # free a: shared blocks survive with b
    kv.free(a)
    assert all(kv.pool.ref_cnt[x] == 1 for x in hits)
    assert kv.pool.ref_cnt[a_blocks[5]] == 0 and a_blocks[5] in kv.pool.free_queue
    kv.free(b)
    assert kv.pool.num_free_blocks == 32
    _check_pool(kv.pool)


def test_hit_on_freed_blocks_revives_them():
    kv = KVCacheManager(8, BS, enable_caching=True)
    prompt = _tokens(3 * BS + 1, seed=9)
    a = _req("a", prompt)
    kv.allocate_slots(a, len(prompt))
    a.num_computed_tokens = len(prompt)
    a_blocks = list(a.block_ids)
    kv.free(a)
    assert kv.pool.num_free_blocks == 8
    b = _req("b", list(prompt))
    hits = kv.get_computed_blocks(b)
    assert hits == a_blocks[:3]
    kv.allocate_slots(b, 1, hits)
    assert b.block_ids[:3] == a_blocks[:3]
    assert kv.pool.num_free_blocks == 8 - 4
    _check_pool(kv.pool)


def test_free_order_tail_blocks_evicted_first():
    kv = KVCacheManager(8, BS, enable_caching=True)
    prompt = _tokens(4 * BS + 1, seed=10)
    a = _req("a", prompt)
    kv.allocate_slots(a, len(prompt))
    a.num_computed_tokens = len(prompt)
    blocks = list(a.block_ids)
    hashes = list(a.block_hashes)
    kv.free(a)
    # the free queue ends with a's blocks, last block first
    assert list(kv.pool.free_queue)[-5:] == blocks[::-1]
    # use the never-touched blocks, then evict: the tail goes first, the head survives
    other = _req("o", _tokens(3 * BS, seed=11))
    kv.allocate_slots(other, 3 * BS)
    assert kv.pool.lookup(hashes[0]) == blocks[0]
    other2 = _req("o2", _tokens(2 * BS, seed=12))
    kv.allocate_slots(other2, 2 * BS)  # evicts blocks[4] (no hash) and blocks[3]
    assert kv.pool.lookup(hashes[3]) is None
    assert [kv.pool.lookup(h) for h in hashes[:3]] == blocks[:3]
    b = _req("b", list(prompt))
    assert kv.get_computed_blocks(b) == blocks[:3]  # the longest prefix survived
    _check_pool(kv.pool)


def test_eviction_under_pressure_random():
    """Random workload: the pool's invariants hold, and every hit returns a block whose cached
    hash equals the request's own chained hash for that position."""
    rng = random.Random(13)
    kv = KVCacheManager(24, BS, enable_caching=True)
    prefixes = [_tokens(3 * BS, seed=100 + i) for i in range(4)]
    live: list[Request] = []
    for step in range(300):
        if live and (rng.random() < 0.4 or kv.pool.num_free_blocks < 8):
            kv.free(live.pop(rng.randrange(len(live))))
        else:
            pre = rng.choice(prefixes)[:rng.randrange(1, 3 * BS + 1)]
            toks = pre + _tokens(rng.randrange(1, 9), seed=step)
            r = _req(f"r{step}", toks)
            hits = kv.get_computed_blocks(r)
            for i, b in enumerate(hits):
                assert kv.pool.block_hash[b] == r.block_hashes[i]
            n = r.num_tokens - len(hits) * BS
            assert n >= 1
            if kv.allocate_slots(r, n, hits) is None:
                assert r.block_ids == []
                continue
            kv.record_lookup(r.num_tokens, len(hits) * BS)
            r.num_computed_tokens = r.num_tokens
            assert len(r.block_ids) == kv.blocks_needed(r.num_tokens)
            live.append(r)
        _check_pool(kv.pool)
        assert sum(kv.pool.ref_cnt) == sum(len(r.block_ids) for r in live)
    for r in live:
        kv.free(r)
    assert kv.pool.num_free_blocks == 24
    assert kv.stats.hits > 0 and kv.stats.hits <= kv.stats.queries


def test_reset_prefix_cache_manager():
    kv = KVCacheManager(8, BS, enable_caching=True)
    prompt = _tokens(2 * BS + 1, seed=14)
    a = _req("a", prompt)
    kv.allocate_slots(a, len(prompt))
    a.num_computed_tokens = len(prompt)
    assert kv.pool.reset_prefix_cache() is False
    kv.free(a)
    assert kv.get_computed_blocks(_req("b", list(prompt))) != []
    assert kv.pool.reset_prefix_cache() is True
    assert kv.get_computed_blocks(_req("c", list(prompt))) == []


def test_prefix_caching_off_never_shares():
    kv = KVCacheManager(32, BS, enable_caching=False)
    prompt = _tokens(3 * BS + 1, seed=15)
    a = _req("a", prompt)
    kv.allocate_slots(a, len(prompt))
    a.num_computed_tokens = len(prompt)
    b = _req("b", list(prompt))
    assert kv.get_computed_blocks(b) == []
    assert kv.stats.queries == 0 and kv.stats.hits == 0
    kv.allocate_slots(b, b.num_tokens)
    assert not set(a.block_ids) & set(b.block_ids)
    assert all(c <= 1 for c in kv.pool.ref_cnt)
    assert not kv.pool.cached and all(h is None for h in kv.pool.block_hash)
    kv.free(a)
    c = _req("c", list(prompt))
    assert kv.get_computed_blocks(c) == []


def test_can_ever_fit_and_blocks_needed():
    kv = KVCacheManager(5, BS, enable_caching=True)
    assert kv.blocks_needed(0) == 0
    assert kv.blocks_needed(1) == 1
    assert kv.blocks_needed(BS) == 1
    assert kv.blocks_needed(BS + 1) == 2
    assert kv.can_ever_fit(5 * BS) and not kv.can_ever_fit(5 * BS + 1)



# ---- sliding windows ---------------------------------------------------------------------------
def test_window_releases_blocks_before_the_window():
    """Window 10, blocks of 4: once the next query is at position p, blocks holding only keys
    < p - 9 go back to the pool and their table entries point at the null block (0), which is
    never handed out; a prefix-cache sharer keeps its reference."""
    kv = KVCacheManager(12, BS, enable_caching=True, sliding_window=10)
    assert kv.num_blocks == 11 and kv.pool.num_free_blocks == 11
    tokens = _tokens(30, 1)
    a = _req("a", tokens)
    assert kv.allocate_slots(a, 30) is not None  # one prompt of 30 tokens: 8 blocks
    a.num_computed_tokens = 30
    assert 0 not in a.block_ids
    held = list(a.block_ids)
    b = _req("b", tokens[:12] + _tokens(5, 2))  # shares a's first 3 blocks
    hits = kv.get_computed_blocks(b)
    assert hits == held[:3]
    assert kv.allocate_slots(b, 5, hits) is not None
    kv.free_outside_window(a)  # next query at 30 sees keys 21..30: blocks 0..4 (keys < 20) out
    assert a.block_ids[:5] == [0] * 5 and a.block_ids[5:] == held[5:]
    assert a.num_null_blocks == 5 and kv.num_window_freed == 5
    assert all(kv.pool.ref_cnt[h] == 1 for h in held[:3])  # b's references
    assert all(kv.pool.ref_cnt[h] == 0 for h in held[3:5])
    assert kv.pool.num_free_blocks == 11 - 8 - 2 + 2
    kv.free_outside_window(a)  # idempotent
    assert kv.num_window_freed == 5
    new = kv.pool.allocate(kv.pool.num_free_blocks)
    assert 0 not in new  # the null block is never allocated
    kv.pool.free(new)
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 11 and a.num_null_blocks == 0
    assert kv.pool.ref_cnt[0] == 0 and all(c == 0 for c in kv.pool.ref_cnt)


def test_no_window_keeps_every_block():
    kv = KVCacheManager(8, BS, enable_caching=False)
    a = _req("a", _tokens(20, 3))
    kv.allocate_slots(a, 20)
    a.num_computed_tokens = 20
    before = list(a.block_ids)
    kv.free_outside_window(a)
    assert a.block_ids == before and kv.num_blocks == 8


# ---- KV eviction ------------------------------------------------------------------------------
def _running(kv: KVCacheManager, rid: str, tokens: list[int], computed: int) -> Request:
    r = _req(rid, tokens)
    assert kv.allocate_slots(r, computed) is not None
    r.num_computed_tokens = computed
    return r


def test_evict_frees_the_tail_and_uncaches_rewritten_blocks():
    kv = KVCacheManager(16, BS, enable_caching=True)
    r = _running(kv, "a", _tokens(24, 1), 24)  # 6 full blocks, all cached
    table = list(r.block_ids)
    assert kv.evict(r, 10, fixed_blocks=1) == (24, table[:3])
    assert r.block_ids == table[:3] and r.num_evicted == 14 and kv.cache_len(r) == 10
    pool = kv.pool
    assert pool.block_hash[table[0]] is not None  # a whole block of sinks: kept as it is
    assert all(pool.block_hash[b] is None for b in table[1:3])  # rewritten: out of the cache
    assert all(pool.ref_cnt[b] == 0 and pool.block_hash[b] is not None for b in table[3:])
    _check_pool(pool)
    # its later blocks are never registered (evicted KV never enters the prefix cache)
    r.all_token_ids += _tokens(8, 2)
    assert kv.allocate_slots(r, 8) is not None
    assert all(pool.block_hash[b] is None for b in r.block_ids[3:])
    kv.free(r)
    assert r.num_evicted == 0
    _check_pool(pool)


def test_evict_copies_shared_blocks_on_write():
    kv = KVCacheManager(16, BS, enable_caching=True)
    toks = _tokens(24, 3)
    a = _running(kv, "a", toks, 24)
    b = _req("b", toks + [7])
    hit = kv.get_computed_blocks(b)
    assert len(hit) == 6 and kv.allocate_slots(b, 1, hit) is not None
    b.num_computed_tokens = 25
    old = list(b.block_ids)
    old_len, new = kv.evict(b, 12, fixed_blocks=1)
    assert old_len == 25 and len(new) == 3
    assert new[0] == old[0]  # sinks: shared as they are
    assert set(new[1:]).isdisjoint(old)  # fresh copies for the shared blocks it rewrites
    assert a.block_ids == old[:6]  # the other holder keeps its blocks, still cached
    assert all(kv.pool.block_hash[x] is not None for x in a.block_ids)
    assert all(kv.pool.ref_cnt[x] == 1 for x in a.block_ids[1:])
    _check_pool(kv.pool)


def test_evict_without_blocks_for_copies_changes_nothing():
    kv = KVCacheManager(6, BS, enable_caching=True)
    toks = _tokens(24, 4)
    a = _running(kv, "a", toks, 24)  # the whole pool
    b = _req("b", toks)  # holds the same blocks (as a prefix hit would)
    kv.pool.touch(list(a.block_ids))
    b.block_ids, b.num_computed_tokens = list(a.block_ids), 24
    # its tail is shared too, so freeing it frees nothing: no room for the 2 copies
    assert kv.evict(b, 12, fixed_blocks=1) is None
    assert b.block_ids == a.block_ids and b.num_evicted == 0
    _check_pool(kv.pool)
    kv.free(a)  # now b holds them alone: rewritten in place, no copies
    head = b.block_ids[:3]
    assert kv.evict(b, 12, fixed_blocks=1) == (24, head)
    assert len(b.block_ids) == 3 and kv.pool.num_free_blocks == 3
    _check_pool(kv.pool)


# ---- partial blocks, copy-on-write ------------------------------------------------------------
def _run(kv: KVCacheManager, req: Request, partial=None) -> list[int]:
    """Schedule all of req's remaining tokens at once, as the scheduler does for a new one."""
    computed = kv.get_computed_blocks(req)
    if partial is None:
        partial = kv.get_partial_hit(req, len(computed))
    n_hit = len(computed) * BS + (partial[1] if partial else 0)
    assert kv.allocate_slots(req, req.num_tokens - n_hit, computed, 0, partial) is not None
    req.num_computed_tokens = req.num_tokens
    return computed


def test_partial_block_cached_when_its_request_leaves_and_taken_copy_on_write():
    kv = KVCacheManager(16, BS, enable_caching=True)
    parent = _req("p", _tokens(10, 1))  # blocks: 4 + 4 full, 2 tokens in a partial one
    _run(kv, parent)
    p_blocks = list(parent.block_ids)
    kv.free(parent)
    _check_pool(kv.pool)
    child = _req("c", parent.all_token_ids + [7])  # a beam one token longer
    computed = kv.get_computed_blocks(child)
    assert computed == p_blocks[:2]
    assert kv.get_partial_hit(child, 2) == (p_blocks[2], 2)
    _run(kv, child)
    assert child.block_ids[:2] == p_blocks[:2]
    assert child.block_ids[2] != p_blocks[2]  # a fresh block: the copy's destination
    assert kv.pool.ref_cnt[p_blocks[2]] == 0 and kv.pool.lookup(
        kv.pool.block_hash[p_blocks[2]]) == p_blocks[2]  # still cached, free
    _check_pool(kv.pool)
    # a second child of the same parent takes it too (both copies come from the same block)
    other = _req("o", parent.all_token_ids + [8])
    assert kv.get_partial_hit(other, len(kv.get_computed_blocks(other))) == (p_blocks[2], 2)


def test_partial_block_needs_every_token_and_the_same_keys():
    kv = KVCacheManager(16, BS, enable_caching=True)
    parent = _req("p", _tokens(10, 2))
    _run(kv, parent)
    kv.free(parent)
    toks = parent.all_token_ids
    diverged = _req("d", toks[:9] + [toks[9] + 1, 5])  # differs inside the partial block
    assert kv.get_partial_hit(diverged, len(kv.get_computed_blocks(diverged))) is None
    exact = _req("e", list(toks))  # no token after it: the last one must be computed
    assert kv.get_partial_hit(exact, len(kv.get_computed_blocks(exact))) is None
    logprobs = _req("l", toks + [3], prompt_logprobs=1)
    assert kv.get_partial_hit(logprobs, 2) is None
    lora = _req("a", toks + [3])
    lora.cache_extra_keys = ("adapter", 1)
    assert kv.get_partial_hit(lora, 2) is None
    short = _req("s", toks[:2])  # under one block: no hit for a one-block prompt of its own
    _run(kv, short)
    kv.free(short)
    longer = _req("t", toks[:2] + [9, 9])
    assert kv.get_partial_hit(longer, 0) is not None


def test_partial_block_lost_once_reused_and_never_under_a_window():
    kv = KVCacheManager(4, BS, enable_caching=True)
    parent = _req("p", _tokens(6, 3))
    _run(kv, parent)
    kv.free(parent)
    filler = _req("f", _tokens(16, 4))  # takes all 4 blocks: the partial one is reused
    _run(kv, filler)
    kv.free(filler)
    child = _req("c", parent.all_token_ids + [1])
    assert kv.get_partial_hit(child, len(kv.get_computed_blocks(child))) is None
    _check_pool(kv.pool)
    win = KVCacheManager(16, BS, enable_caching=True, sliding_window=8)
    parent = _req("p", _tokens(6, 3))
    _run(win, parent)
    win.free(parent)
    child = _req("c", parent.all_token_ids + [1])
    assert win.get_partial_hit(child, len(win.get_computed_blocks(child))) is None
