"""Drafting with a causal LM (a small draft model, or the target's own first layers) over a
paged KV cache that uses the target's block ids: for each request, catch up on the tokens whose
draft KV is missing, then k - 1 greedy single-token passes.

The draft's KV of position j lives in the slot the target's block table gives j, in the
draft's own cache (draft_model) or in the target's first layers (layer_skip). The k draft
passes write positions up to k - 1 past a request's newest token: the scheduler reserves those
lookahead slots (SchedulerConfig.num_lookahead_tokens). Drafts are greedy, so each is a point
mass: verification by matching against the target's own samples keeps the target's
distribution exactly (sampling.rejection).
"""
from __future__ import annotations

import dataclasses
from abc import abstractmethod
import numpy as np
import torch

from servelm.spec_decode.config import SpeculativeConfig
from servelm.spec_decode.proposer import Proposer, ProposerContext, ProposerInput
from servelm.worker.step_meta import step_meta

# catch-up passes of at most this many tokens per request are run one-token-per-sequence
# (decode kernels, CUDA graphs); longer ones (a prompt the draft has not seen) as ragged chunks
SHORT_CATCH_UP = 8


class ModelProposer(Proposer):
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.k = cfg.num_speculative_tokens
        self.tree = cfg.tree_shape  # a token tree (draft_model), or None: one chain
        # candidates taken after the newest token: the tree's first branching, else 1
        self.width = self.tree.branching[0] if self.tree else 1
        self.graphs = None  # DecodeGraphs of the draft's single-token passes (CUDA)
        self.level_graphs: dict = {}  # token trees: depth -> TreeGraphs of that level's pass

    # ---- what a drafting model provides ---------------------------------------------------
    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """[T] ids and positions -> hidden states [T, hidden] (writing the draft's KV)."""

    @abstractmethod
    def _compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab]."""

    @abstractmethod
    def _valid(self, batch: ProposerInput, num_tokens: np.ndarray) -> np.ndarray:
        """[S] how many leading positions of each request hold valid draft KV (< num_tokens)."""

    def _drafted(self, batch: ProposerInput, num_tokens: np.ndarray, kr: np.ndarray,
                 drafts: np.ndarray) -> None:
        """Told after drafting: request s got kr[s] drafts (drafts[s, :kr[s]])."""

    # ---- set-up ---------------------------------------------------------------------------
    def load(self, ctx: ProposerContext) -> None:
        self.ctx = ctx
        self.device = ctx.device
        self.block_size = ctx.config.cache.block_size
        self.max_model_len = ctx.config.model.max_model_len
        self.chunk = ctx.config.scheduler.max_num_batched_tokens  # tokens per catch-up pass

    def _greedy(self, input_ids: torch.Tensor, positions: torch.Tensor, meta):
        """-> (the `width` likeliest ids [T, width], the likeliest [T]): DecodeGraphs'
        (logits, greedy) pair, of which the draft needs only ids."""
        logits = self._compute_logits(self._forward(input_ids, positions, meta))
        top = (logits.topk(self.width, dim=-1).indices if self.width > 1
               else logits.argmax(-1, keepdim=True))
        return top, top[:, 0]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if self.ctx.use_cuda_graphs:
            from servelm.worker.cuda_graphs import DecodeGraphs
            sc = self.ctx.config.scheduler
            # catch-up passes (SHORT_CATCH_UP tokens per request) share the graphs
            max_bs = min(sc.max_num_seqs * 2, 512)
            # captured on first use or in idle time (none at start-up)
            max_blocks = -(-self.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self._greedy, max_bs, max_blocks, self.device,
                                       self.max_model_len)
            if self.tree is not None:  # each tree level's pass: a graph per request count
                from servelm.worker.tree_graphs import TreeGraphs
                t = self.tree
                for d in range(1, t.depth):
                    f0, f1 = t.level(d)
                    fan = t.branching[d]
                    self.level_graphs[d] = TreeGraphs(
                        lambda i, p, m, fan=fan: self._topk(i, p, m, fan), f1 - f0,
                        max_blocks, self.device)

    def capture_pending_graph(self) -> bool:
        if self.graphs is not None and self.graphs.capture_next():
            return True
        return any(tg.capture_next() for tg in self.level_graphs.values())

    def _topk(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, fan: int):
        """One tree level: -> (the `fan` likeliest ids after each node [T, fan], the
        likeliest [T])."""
        top = self._compute_logits(self._forward(input_ids, positions, meta)).topk(fan, dim=-1)
        return top.indices, top.indices[:, 0]

    # ---- drafting -------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        n = np.fromiter((len(t) for t in batch.token_ids), np.int64, len(batch.req_ids))
        # draft i (1-based) lands at position n - 1 + i, which must stay < max_model_len
        kr = np.clip(self.max_model_len - n, 0, self.k)
        cur = np.nonzero(kr > 0)[0]  # requests still drafting, in the order of `last`
        if not len(cur):
            return {}
        valid = np.minimum(self._valid(batch, n), n - 1)
        if self.tree is not None:
            return self._propose_tree(batch, n, valid)
        last = self._catch_up(batch, cur, valid[cur], n[cur])[:, 0]  # [len(cur)] first drafts
        passes = [(cur, last)]  # device ids, read back once at the end (no sync per pass)
        for i in range(1, self.k):  # draft i + 1 from draft i, which sits at n - 1 + i
            live = kr[cur] > i
            if not live.any():
                break
            if not live.all():
                last = last[torch.from_numpy(np.nonzero(live)[0]).to(self.device)]
                cur = cur[live]
            pos = n[cur] - 1 + i
            _, p, meta = step_meta(batch.block_tables[cur], pos, pos + 1, self.block_size,
                                   self.device)
            last = self._run(last, torch.from_numpy(p).to(self.device), meta)[:, 0]
            passes.append((cur, last))
        drafts = np.zeros((len(n), self.k), dtype=np.int64)
        host = torch.cat([t for _, t in passes]).cpu().numpy()
        j = 0
        for i, (rows, _) in enumerate(passes):
            drafts[rows, i] = host[j:j + len(rows)]
            j += len(rows)
        self._drafted(batch, n, kr, drafts)
        return {batch.req_ids[s]: drafts[s, :kr[s]].tolist() for s in range(len(n)) if kr[s] > 0}

    def _propose_tree(self, batch: ProposerInput, n: np.ndarray,
                      valid: np.ndarray) -> dict[str, list[int]]:
        """A token tree per request (its whole tree must fit before max_model_len): the
        catch-up's `width` likeliest tokens are depth 1; each depth's nodes then run in one
        tree-masked pass (node j at the KV slot of position n + j, rotary position
        n - 1 + depth) and their likeliest tokens become the next depth's."""
        t = self.tree
        N = t.num_nodes
        sel = np.nonzero(n + N <= self.max_model_len)[0]
        if not len(sel):
            return {}
        S, dev = len(sel), self.device
        nodes = torch.zeros(S, N, dtype=torch.int64, device=dev)
        nodes[:, :self.width] = self._catch_up(batch, sel, valid[sel], n[sel])
        tables, ns = batch.block_tables[sel], n[sel]
        for d in range(1, t.depth):  # the nodes of depth d propose depth d + 1
            f0, f1 = t.level(d)
            c, fan = f1 - f0, t.branching[d]
            seq, _, meta = step_meta(tables, ns + f0, ns + f1, self.block_size, dev)
            meta = dataclasses.replace(
                meta, tree_start=torch.from_numpy(ns.astype(np.int32)).to(dev),
                tree_mask=torch.from_numpy(np.tile(t.ancestor_bits[f0:f1], S)).to(dev))
            rot = torch.from_numpy(ns[seq] - 1 + d).to(dev)
            ids = nodes[:, f0:f1].reshape(-1)
            tg = self.level_graphs[d] if self.level_graphs else None
            if tg is not None and tg.fits(S):  # [S * c, fan]
                top = tg.run(ids, rot, meta)[0].clone()
            else:
                top = self._topk(ids, rot, meta, fan)[0]
            g0, g1 = t.level(d + 1)  # children of a level's i-th node: g0 + i * fan ...
            nodes[:, g0:g1] = top.view(S, c * fan)
        host = nodes.cpu().numpy()
        kr = np.zeros(len(n), dtype=np.int64)
        kr[sel] = N
        full = np.zeros((len(n), N), dtype=np.int64)
        full[sel] = host
        self._drafted(batch, n, kr, full)
        return {batch.req_ids[s]: host[i].tolist() for i, s in enumerate(sel.tolist())}

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """One decode-shaped pass -> the `width` likeliest ids [T, width], through a CUDA
        graph where one fits (its output buffer is the graph's, overwritten by the next
        replay: copied out)."""
        g = self.graphs
        if g is not None and meta.decode_only and g.padded_size(meta.num_seqs) is not None:
            return g.run(input_ids, positions, meta)[0].clone()
        return self._greedy(input_ids, positions, meta)[0]

    def _catch_up(self, batch: ProposerInput, sel: np.ndarray, valid: np.ndarray,
                  n: np.ndarray) -> torch.Tensor:
        """Compute the draft KV of positions valid..n-1 of requests sel (in passes of at most
        `chunk` tokens) -> the `width` likeliest drafts after each one's newest token,
        [len(sel), width] on the device."""
        tables = batch.block_tables[sel]
        tokens = [batch.token_ids[s] for s in sel]
        out = torch.zeros(len(sel), self.width, dtype=torch.int64, device=self.device)
        start = valid.copy()
        while True:
            todo = np.nonzero(start < n)[0]
            if not len(todo):
                return out
            # this pass: requests in order, each a chunk of what it lacks, `chunk` tokens in all
            left = np.minimum(n[todo] - start[todo], self.chunk)
            take = np.minimum(left, np.maximum(0, self.chunk - (np.cumsum(left) - left)))
            todo, take = todo[take > 0], take[take > 0]
            s0, s1 = start[todo], start[todo] + take
            short = int(take.max()) <= SHORT_CATCH_UP
            _, pos, meta = step_meta(tables[todo], s0, s1, self.block_size, self.device,
                                     per_token=short)
            ids_np = np.concatenate([tokens[j][a:b] for j, a, b in zip(todo, s0, s1)])
            ids = torch.from_numpy(ids_np.astype(np.int64)).to(self.device)
            p = torch.from_numpy(pos).to(self.device)
            done = s1 == n[todo]  # chunks that end at the request's newest token
            last_rows = torch.from_numpy((np.cumsum(take) - 1)[done]).to(self.device)
            if short:
                picked = self._run(ids, p, meta)[last_rows]
            else:
                hidden = self._forward(ids, p, meta)
                logits = self._compute_logits(hidden[last_rows])
                picked = (logits.topk(self.width, dim=-1).indices if self.width > 1
                          else logits.argmax(-1, keepdim=True))
            out[torch.from_numpy(todo[done]).to(self.device)] = picked
            start[todo] = s1
