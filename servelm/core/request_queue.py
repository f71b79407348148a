"""The waiting queue, by scheduling policy: ``fcfs`` (arrival order; preempted requests go back
to the front) and ``priority`` (lower ``priority`` value first, ties by arrival, as vLLM; a
preempted request returns to its place by that order). Chosen from a registry."""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from types import MappingProxyType
from typing import Iterator, Optional

from servelm.core.request import Request


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
    """A heap of (priority, arrival time, insertion count, request)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._count = itertools.count()

    def append(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._count), req))

    appendleft = append  # a preempted request keeps its priority and arrival: its place

    def peek(self) -> Request:
        return self._heap[0][3]

    def popleft(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[3] is not req]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[3] for e in sorted(self._heap))


REQUEST_QUEUES = MappingProxyType({"fcfs": FCFSQueue, "priority": PriorityQueue})


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
