"""Token trees (SpecInfer): several candidate continuations verified in one target pass.

A tree of branching factors (b_1, ..., b_D) has b_1 nodes at depth 1 (the draft's b_1 likeliest
next tokens), b_2 children under each of those (its b_2 likeliest after each), and so on. Nodes
are kept in breadth-first order; every prefix of that order is a subtree (parents come first),
so a scheduler may verify any prefix. In a verification step a request's root (its newest
token, at position n - 1) and its nodes are computed together: node j has the KV slot of
position n + j, the rotary position n - 1 + depth(j), and attends to the positions before n
and to its own ancestors (attention's tree_mask / tree_start). The target samples at the root
and at every node; walking down from the root, a node is taken while it equals the sample at
its parent, and the sample at the last node taken is the bonus token: each kept token is a
target sample given a real prefix, so the output is distributed as without speculation. The
taken path's KV then moves to positions n, n + 1, ... (``compaction_pairs``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_TREE_NODES = 64  # one int64 ancestor bitmask per query


@dataclass(frozen=True)
class TreeShape:
    branching: tuple[int, ...]
    parents: np.ndarray = field(init=False, repr=False)  # [N] parent node, -1: the root
    depths: np.ndarray = field(init=False, repr=False)  # [N] 1..D
    ancestor_bits: np.ndarray = field(init=False, repr=False)  # [N] int64: ancestors + itself

    def __post_init__(self) -> None:
        b = self.branching
        if not b or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in b):
            raise ValueError(f"a token tree is a list of branching factors >= 1, got {list(b)}.")
        parents, depths, level = [], [], [-1]
        for d, fan in enumerate(b, 1):
            nxt = []
            for p in level:
                for _ in range(fan):
                    nxt.append(len(parents))
                    parents.append(p)
                    depths.append(d)
            level = nxt
        if len(parents) > MAX_TREE_NODES:
            raise ValueError(f"the token tree {list(b)} has {len(parents)} nodes; at most "
                             f"{MAX_TREE_NODES}.")
        bits = np.zeros(len(parents), dtype=np.int64)
        for j, p in enumerate(parents):
            bits[j] = (1 << j) | (int(bits[p]) if p >= 0 else 0)
        object.__setattr__(self, "parents", np.asarray(parents, dtype=np.int64))
        object.__setattr__(self, "depths", np.asarray(depths, dtype=np.int64))
        object.__setattr__(self, "ancestor_bits", bits)

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return len(self.branching)

    def children(self, node: int, num_nodes: int | None = None) -> list[int]:
        """Children of `node` (-1: the root) among the first num_nodes nodes."""
        n = self.num_nodes if num_nodes is None else num_nodes
        return [j for j in range(n) if self.parents[j] == node]

    def level(self, depth: int) -> tuple[int, int]:
        """[first, end) node indices of one depth (breadth-first order)."""
        idx = np.nonzero(self.depths == depth)[0]
        return int(idx[0]), int(idx[-1]) + 1

    def path(self, node: int) -> list[int]:
        """The nodes from depth 1 down to `node`."""
        out = []
        while node >= 0:
            out.append(node)
            node = int(self.parents[node])
        return out[::-1]


def accept_tree(sampled: list[int], nodes: list[int], shape: TreeShape) -> tuple[list[int],
                                                                                list[int]]:
    """sampled: the target's samples at the root and at each of the m = len(nodes) nodes (the
    first m of the tree), nodes: their tokens -> (tokens to keep: the taken path's tokens and
    the bonus token, the taken path's node indices)."""
    m = len(nodes)
    cur, path, out = -1, [], []
    while True:
        y = sampled[0 if cur < 0 else 1 + cur]
        nxt = next((c for c in shape.children(cur, m) if nodes[c] == y), None)
        out.append(y)
        if nxt is None:
            return out, path
        path.append(nxt)
        cur = nxt
