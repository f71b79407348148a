"""The waiting queue, by scheduling policy: ``fcfs`` (arrival order; preempted requests go back
to the front), ``priority`` (lower ``priority`` value first, ties by arrival, as vLLM; a
preempted request returns to its place by that order) and ``slo`` (earliest time-to-first-token
deadline first, see core/slo.py). Chosen from a registry."""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from types import MappingProxyType
from typing import Iterator, Optional

from servelm.core.request import Request
from servelm.core.slo import deadline_key


class FCFSQueue:
    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def append(self, req: Request) -> None:
        self._q.append(req)

    def appendleft(self, req: Request) -> None:
        """A preempted request: first in line again."""
        self._q.appendleft(req)

    def peek(self) -> Request:
        return self._q[0]

    def popleft(self) -> Request:
        return self._q.popleft()

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class PriorityQueue:
    """A heap of (key, insertion count, request); the key is (priority, arrival time)."""

    @staticmethod
    def key(req: Request) -> tuple:
        return req.priority, req.arrival_time

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, int, Request]] = []
        self._count = itertools.count()

    def append(self, req: Request) -> None:
        heapq.heappush(self._heap, (self.key(req), next(self._count), req))

    appendleft = append  # a preempted request keeps its priority and arrival: its place

    def peek(self) -> Request:
        return self._heap[0][2]

    def popleft(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[2] is not req]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[2] for e in sorted(self._heap, key=lambda e: e[:2]))


class DeadlineQueue(PriorityQueue):
    """Earliest TTFT deadline first (arrival + ttft_slo_ms; none: after all that have one),
    ties by arrival."""

    key = staticmethod(deadline_key)


REQUEST_QUEUES = MappingProxyType({"fcfs": FCFSQueue, "priority": PriorityQueue,
                                   "slo": DeadlineQueue})


def priority_key(req: Request) -> tuple[int, float]:
    """Smaller is more urgent."""
    return req.priority, req.arrival_time


def worst_running(running: list[Request], than: Optional[Request] = None) -> Optional[Request]:
    """The least urgent running request (if ``than`` is given: only one less urgent than it)."""
    if not running:
        return None
    worst = max(running, key=priority_key)
    if than is not None and priority_key(worst) <= priority_key(than):
        return None
    return worst
