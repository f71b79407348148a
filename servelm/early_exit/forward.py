"""A decode step with early exit, over a Llama-family model's own layers (CALM's per-token
exit with state propagation).

After each candidate layer n, the tokens still running get the final norm and the lm_head on
their residual stream h_n; a token whose confidence reaches the threshold exits there: its
logits are that layer's, and its state h_n is *propagated*: every later layer computes that
token's K and V from h_n (its input norm of h_n, its k/v projections and rotary), so later
tokens attend to KV of every layer as if the token had run them on its exit state.

Why per-token decisions with propagation, not SkipDecode's batch-uniform exit points: a token's
output then depends on itself only, never on the batch it shares a step with (continuous
batching changes batches every step), and the KV every layer needs exists. Exited tokens ride
along in the batch (their rows' inputs reset to their exit state each layer, their outputs
discarded) until every token of the step has exited; then the remaining layers only write KV
(input norm, k/v projections, rotary: no attention, no MLP), which is where the time is saved.
Deciding needs the confidences on the host at each candidate layer: on GPUs the step runs as
piecewise CUDA graphs cut at the candidates (pieces.py, graphs.py); this eager loop serves the
CPU, enforce_eager and batches larger than the largest graph."""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import torch

from servelm.early_exit.config import EarlyExitConfig


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """[T, V] -> [T]: the most likely token's probability."""
    return torch.softmax(logits.float(), dim=-1).max(dim=-1).values


def margin(logits: torch.Tensor) -> torch.Tensor:
    """[T, V] -> [T]: the gap between the two most likely tokens' probabilities."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


CRITERIA: "MappingProxyType[str, Callable[[torch.Tensor], torch.Tensor]]" = MappingProxyType({
    "max_prob": max_prob,
    "margin": margin,
})


@torch.inference_mode()
def early_exit_forward(model, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv_caches, meta, cfg: EarlyExitConfig
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, positions: [T] (one token per sequence) -> (hidden [T, H] after the final
    norm, each token's exit layer's or the last layer's; exit_layer [T] int64: the number of
    layers each token ran, num_layers for those that did not exit)."""
    layers = list(model.layers[model.start:model.end])
    L = len(layers)
    cands = set(cfg.candidates(L))
    score = CRITERIA.get(cfg.criterion)
    x, residual = model.embed_tokens(input_ids), None
    if model.embed_scale:
        x = x * model.embed_scale
    T = x.shape[0]
    exit_layer = torch.full((T,), L, dtype=torch.int64, device=x.device)
    exited = torch.zeros(T, dtype=torch.bool, device=x.device)
    any_exited = all_exited = False
    state = out = None  # exited rows: residual stream at exit, its normed hidden
    saturation = cfg.criterion == "state"
    for n, (layer, kv) in enumerate(zip(layers, kv_caches), start=1):
        if saturation and n in cands:  # the stream entering layer n
            before = x if residual is None else x + residual
        if any_exited:
            if all_exited:  # every token exited: the rest only need their KV
                for rest, rest_kv in zip(layers[n - 1:], kv_caches[n - 1:]):
                    rest.propagate_kv(positions, state, rest_kv, meta)
                return out, exit_layer
            # exited rows enter each layer with their exit state (x + residual = state)
            keep = exited[:, None]
            x = torch.where(keep, torch.zeros_like(x), x)
            residual = torch.where(keep, state, residual)
        x, residual = layer(positions, x, residual, kv, meta)
        if n in cands:
            normed, h = model.norm(x, residual)  # the stream after layer n, and its norm
            if saturation:  # how little layer n changed the stream's direction
                conf = torch.nn.functional.cosine_similarity(h.float(), before.float(), dim=-1)
            else:
                conf = score(model.compute_logits(normed))
            new = (conf >= cfg.threshold) & ~exited
            if bool(new.any()):
                rows = new[:, None]
                state = h if state is None else torch.where(rows, h, state)
                out = normed if out is None else torch.where(rows, normed, out)
                exit_layer = torch.where(new, n, exit_layer)
                exited |= new
                any_exited, all_exited = True, bool(exited.all())  # (changes only here)
    final, _ = model.norm(x, residual)
    if any_exited:
        final = torch.where(exited[:, None], out, final)
    return final, exit_layer
