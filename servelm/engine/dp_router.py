"""Which data-parallel replica serves a request: prefix affinity, bounded by load balance (as
SGLang's cache-aware router does). A replica that served a prompt with the same leading KV
blocks likely still holds them in its prefix cache, so it gets the request, unless it is
busier than the least-loaded replica by more than the balance thresholds; otherwise the
least-loaded replica gets it. Load is the sequences a replica has in flight (running or
waiting), as the API process counts them: no round trip to the cores."""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RouterConfig:
    block_size: int = 16  # the engine's KV block: prefixes match in whole blocks
    max_prefix_blocks: int = 32  # how deep a prompt's prefix is tracked
    blocks_per_replica: int = 1 << 16  # remembered prefix blocks per replica (LRU)
    # the affine replica is skipped when its load exceeds the least-loaded one's by more than
    # balance_abs sequences AND by more than a factor balance_rel
    balance_abs: int = 16
    balance_rel: float = 1.5


def prefix_hashes(token_ids: Sequence[int], cfg: RouterConfig, salt: bytes = b"") -> list[bytes]:
    """One chained digest per whole leading block: h[i] names blocks 0..i together (and
    ``salt``: what else keys the prefix cache, a LoRA adapter's id)."""
    out: list[bytes] = []
    h = salt
    n = min(len(token_ids) // cfg.block_size, cfg.max_prefix_blocks)
    for i in range(n):
        block = token_ids[i * cfg.block_size:(i + 1) * cfg.block_size]
        h = hashlib.blake2b(h + b",".join(str(t).encode() for t in block),
                            digest_size=16).digest()
        out.append(h)
    return out


class PrefixRouter:
    def __init__(self, num_replicas: int, cfg: RouterConfig = RouterConfig()) -> None:
        self.cfg = cfg
        # per replica: prefix digests it served recently, least recent first
        self.seen = [collections.OrderedDict() for _ in range(num_replicas)]

    def route(self, token_ids: Sequence[int], loads: Sequence[int],
              available: Sequence[bool], salt: bytes = b"") -> int:
        """The replica for a prompt, among the available ones (at least one must be);
        ``salt`` as prefix_hashes'."""
        cands = [i for i, ok in enumerate(available) if ok]
        if not cands:
            raise ValueError("no replica is available")
        hashes = prefix_hashes(token_ids, self.cfg, salt)
        least = min(cands, key=lambda i: (loads[i], i))

        def depth(i: int) -> int:
            d = 0
            for h in hashes:
                if h not in self.seen[i]:
                    break
                d += 1
            return d

        best = max(cands, key=lambda i: (depth(i), -loads[i], -i))
        lb, ll = loads[best], loads[least]
        busy = lb - ll > self.cfg.balance_abs and lb > self.cfg.balance_rel * ll
        choice = best if depth(best) > 0 and not busy else least
        seen = self.seen[choice]
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.cfg.blocks_per_replica:
            seen.popitem(last=False)
        return choice

    def forget(self, replica: int) -> None:
        """A replica restarted: its prefix cache is empty."""
        self.seen[replica].clear()
