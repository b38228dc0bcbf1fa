"""The request queue of a BatchedService, with the counters batch formation reads.

Requests wait in priority levels (higher first, FIFO within a level). The queue knows, without
walking it, how many requests and rows are waiting, how many of them are not plain blocking calls,
which deadline comes first, and how many known callers have a request waiting: the numbers the
worker needs to decide whether a batch may go.

Not thread-safe on its own: the service holds its lock around every call. Nothing here starts a
thread or blocks, so every rule below is tested without threads (tests/test_batching_queue.py).

Invariants, after every method (`check()` verifies them):
- `pending` is the number of queued requests and `pending_rows` the sum of their rows;
- `special` is the number of queued requests that are not plain (see `request.is_special`);
- every queued request with a deadline has an entry in the deadline heap (entries of requests no
  longer queued are dropped when they reach the top), except the rest of a split request that has
  started running, whose deadline no longer applies (see SplitRequest.abandon);
- for every caller c, `c.outstanding` is the number of c's requests queued;
- `active_callers` is the number of active callers (registered, or known implicitly, and not
  paused), and `waiting_callers` the number of active callers with a request queued; so
  `all_callers_waiting` says that nothing more can come from the known callers until a batch runs.
Taking a request off the queue (into a batch, expired, drained) always goes through `_dequeued`'s
accounting, so no counter can be left behind.
"""
from __future__ import annotations

import collections
import heapq
import itertools

from rlbatch.batching.request import PENDING, TAKEN, Request, is_special

__all__ = ["RequestQueue"]


class RequestQueue:
    def __init__(self):
        self._levels: dict[int, collections.deque] = {0: collections.deque()}
        self._order = [0]  # priorities present, highest first
        self.pending = 0
        self.pending_rows = 0
        self.special = 0
        self._deadlines: list = []  # heap of (deadline, seq, request)
        self._seq = itertools.count()
        self.active_callers = 0
        self.waiting_callers = 0

    # ------------------------------------------------------------------ callers

    def set_active(self, caller, active: bool) -> None:
        """Counts `caller` towards early flush (active) or stops counting it."""
        if caller.active == active:
            return
        caller.active = active
        step = 1 if active else -1
        self.active_callers += step
        if caller.outstanding:
            self.waiting_callers += step

    @property
    def all_callers_waiting(self) -> bool:
        """Every active caller has a request queued (and something is queued)."""
        return bool(self.active_callers) and self.waiting_callers >= self.active_callers and self.pending > 0

    # ------------------------------------------------------------------ adding

    def push(self, r: Request, special: bool) -> bool:
        """Queues one request. `special`: not a plain blocking call (the caller knows which).
        Returns True when the request's deadline is now the earliest queued one (a worker waiting
        for a later time must be woken to fail it on time)."""
        level = self._levels.get(r.priority)
        if level is None:
            level = self._new_level(r.priority)
        level.append(r)
        rows = 1 if r.rows is None else r.rows
        self.pending += 1
        self.pending_rows += rows
        c = r.caller
        if c is not None:
            if c.outstanding == 0 and c.active:
                self.waiting_callers += 1
            c.outstanding += 1
        if special:
            self.special += 1
            if r.deadline is not None:
                heap = self._deadlines
                earliest = not heap or r.deadline < heap[0][0]
                heapq.heappush(heap, (r.deadline, next(self._seq), r))
                return earliest
        return False

    def push_many(self, requests) -> bool:
        """Queues requests in order; True when one of them has the earliest deadline (see push)."""
        earliest = False
        for r in requests:
            earliest |= self.push(r, is_special(r))
        return earliest

    def _new_level(self, priority: int) -> collections.deque:
        level = self._levels[priority] = collections.deque()
        self._order = sorted(self._levels, reverse=True)
        return level

    # ------------------------------------------------------------------ reading

    def oldest_t0(self) -> float:
        """Arrival time of the oldest queued request (the max_delay clock); the queue is not empty."""
        if len(self._levels) == 1:
            return self._levels[0][0].t0
        return min(level[0].t0 for level in self._levels.values() if level)

    def next_deadline(self) -> float | None:
        """The earliest deadline in the heap (perhaps of a request no longer queued), or None."""
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------------ taking

    def _dequeued(self, taken) -> None:
        """The accounting for requests just removed from their levels."""
        rows = special = left = 0
        for r in taken:
            rows += 1 if r.rows is None else r.rows
            special += is_special(r)
            c = r.caller
            if c is not None:
                c.outstanding -= 1
                if c.outstanding == 0 and c.active:
                    left += 1
        self.pending -= len(taken)
        self.pending_rows -= rows
        self.special -= special
        self.waiting_callers -= left

    def take(self, max_rows: int, now: float, starvation_timeout: float):
        """The next batch: (requests, rows, plain). Higher priorities first, FIFO within a level;
        a level whose oldest request has waited more than `starvation_timeout` goes first. A
        request of more rows than are left stops its level (its rows stay together).
        `plain`: every request is a blocking call without a deadline, still wanted."""
        if not self.special and len(self._order) == 1:
            return self._take_plain(max_rows)
        capacity = max_rows
        taken = []
        plain = True
        order = self._order
        if len(order) > 1:
            starving = [lv for lv in order[1:]
                        if self._levels[lv] and now - self._levels[lv][0].t0 > starvation_timeout]
            if starving:
                order = sorted(starving, key=lambda lv: self._levels[lv][0].t0) + order
        for lv in order:
            level = self._levels[lv]
            while level:
                r = level[0]
                k = 1 if r.rows is None else r.rows
                if k > capacity:
                    break
                level.popleft()
                capacity -= k
                taken.append(r)
                if r.lock is None or r.deadline is not None or r.state != PENDING:
                    plain = False  # a Future, a deadline, or a blocking caller that left
                if r.state == PENDING:
                    r.state = TAKEN
            if capacity == 0:
                break
        self._dequeued(taken)
        return taken, max_rows - capacity, plain

    def _take_plain(self, max_rows: int):
        """`take` when every queued request is a plain blocking call of one row: the oldest
        `max_rows` of them, without per-request checks. Their state stays PENDING: nothing reads
        the state of a plain call once it is taken."""
        level = self._levels[self._order[0]]
        if len(level) <= max_rows:
            taken = list(level)
            level.clear()
        else:
            popleft = level.popleft
            taken = [popleft() for _ in range(max_rows)]
        left = 0
        for r in taken:
            c = r.caller
            if c is not None:
                c.outstanding -= 1
                if c.outstanding == 0 and c.active:
                    left += 1
        self.waiting_callers -= left
        self.pending -= len(taken)
        self.pending_rows -= len(taken)
        return taken, len(taken), True

    def expire(self, now: float) -> list:
        """Takes the queued requests whose deadline has passed off the queue and returns them (the
        rest of a split request that started running stays: see SplitRequest.abandon)."""
        heap, expired = self._deadlines, []
        while heap and (heap[0][2].state != PENDING or heap[0][0] <= now):
            _, _, r = heapq.heappop(heap)
            if r.state != PENDING:
                continue  # taken, drained or given up by its caller: nothing to do
            if r.parent is not None and not r.parent.abandon():
                continue
            self._levels[r.priority].remove(r)
            r.state = TAKEN
            expired.append(r)
        self._dequeued(expired)
        return expired

    def drain(self, keep_started: bool = False) -> list:
        """Empties the queue and returns what it held; `keep_started` keeps the remaining parts of
        split requests that already started running."""
        drained = []
        for level in self._levels.values():
            if keep_started and any(r.parent is not None for r in level):
                kept = []
                for r in level:
                    (kept if r.parent is not None and not r.parent.abandon() else drained).append(r)
                level.clear()
                level.extend(kept)
            else:
                drained.extend(level)
                level.clear()
        for r in drained:
            if r.state == PENDING:
                r.state = TAKEN
        self._dequeued(drained)
        return drained

    # ------------------------------------------------------------------ checking

    def check(self, callers=()) -> None:
        """Raises AssertionError naming the first invariant that does not hold (for tests).
        `callers`: every caller ever counted here (the queue keeps no list of them)."""
        queued = [r for level in self._levels.values() for r in level]
        _expect("pending", self.pending, len(queued))
        _expect("pending_rows", self.pending_rows, sum(r.num_rows for r in queued))
        _expect("special", self.special, sum(map(is_special, queued)))
        in_heap = {id(entry[2]) for entry in self._deadlines}
        missing = [r for r in queued if r.deadline is not None and id(r) not in in_heap
                   and not (r.parent is not None and r.parent.started)]
        _expect("queued requests with a deadline missing from the heap", len(missing), 0)
        for c in callers:
            _expect(f"outstanding of caller {c!r}", c.outstanding, sum(r.caller is c for r in queued))
        if callers:
            _expect("active_callers", self.active_callers, sum(c.active for c in callers))
            _expect("waiting_callers", self.waiting_callers,
                    sum(1 for c in callers if c.active and c.outstanding))


def _expect(what: str, got, want) -> None:
    if got != want:
        raise AssertionError(f"RequestQueue invariant broken: {what} is {got}, expected {want}")
