"""Cascade inference (Tabi, LLM cascades): each request is answered by a small model first and
escalated to a large one only when the small one's answer is unsure. See config.py (the
threshold and the confidence criterion) and offline.py (``CascadeLLM``)."""
from servelm.cascade.config import CASCADE_CRITERIA, CascadeConfig, confidence
from servelm.cascade.offline import CascadeLLM

__all__ = ["CASCADE_CRITERIA", "CascadeConfig", "CascadeLLM", "confidence"]
