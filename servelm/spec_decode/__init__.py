"""Speculative decoding: proposers of draft tokens, verified by the target in one pass."""
from servelm.spec_decode.proposer import Proposer, ProposerInput

__all__ = ["Proposer", "ProposerInput"]
