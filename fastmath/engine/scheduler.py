"""Host-side scheduling: the admission queue, prefix-pool entries, slot assignment and compaction.

No tensors and no model: the engine asks what to prefill and which samples go to which slots, runs the model,
and applies the slot moves that `compact` returns to its own per-slot arrays and KV cache. Requests are any
objects with `prompt` (token ids), `per_prompt` (samples), and the fields `entry`, `next_sample` and
`outstanding` that the scheduler keeps.

Invariants: the live sequences are always slots 0..B-1 (a decode step runs on exactly B rows, no padding);
a request holds one prefix-pool entry from its prefill until its last sample ends; requests are admitted
first come, first served, and one that cannot get an entry waits.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class Scheduler:
    """Admission and slot bookkeeping for `n_slots` slots and `n_prefixes` prefix-pool entries.

    Args:
        prefill_tokens: most prompt tokens prefilled together (one request longer than this goes alone).
    """

    def __init__(self, n_slots: int, n_prefixes: int, prefill_tokens: int = 8192):
        self.n_slots, self.n_prefixes, self.prefill_tokens = n_slots, n_prefixes, prefill_tokens
        self.waiting: deque = deque()  # not yet prefilled, first come first served
        self.open: list = []  # prefilled, with samples still to start or running, in admission order
        self.free_entries = list(range(n_prefixes))[::-1]  # pop() gives the lowest entry
        self.B = 0  # live slots are 0..B-1
        self.slot_req: list = [None] * n_slots
        self.slot_sample = np.zeros(n_slots, dtype=np.int64)
        self.slot_entry = np.zeros(n_slots, dtype=np.int64)

    # -- queries --------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.waiting and not self.open and self.B == 0

    @property
    def n_free(self) -> int:
        return self.n_slots - self.B

    # -- admission ------------------------------------------------------------------------------------------

    def add(self, req) -> None:
        req.entry, req.next_sample, req.outstanding = -1, 0, 0
        self.waiting.append(req)

    def next_prefill(self, n_free: int) -> list:
        """Waiting requests to prefill now, each given a pool entry: enough samples for `n_free` slots, within
        the prefill token budget and the free entries."""
        batch, total, samples = [], 0, 0
        while self.waiting and self.free_entries and samples < n_free:
            req = self.waiting[0]
            if batch and total + len(req.prompt) > self.prefill_tokens:
                break
            self.waiting.popleft()
            req.entry = self.free_entries.pop()
            batch.append(req)
            total += len(req.prompt)
            samples += req.per_prompt
        return batch

    def opened(self, batch: list) -> None:
        """`batch` (from next_prefill) is prefilled: its samples may start."""
        for req in batch:
            req.outstanding = req.per_prompt
        self.open.extend(batch)

    def take(self, n_free: int) -> list[tuple[object, int]]:
        """Up to n_free (request, sample index) pairs not yet started, oldest request first."""
        take = []
        for req in self.open:
            while req.next_sample < req.per_prompt and len(take) < n_free:
                take.append((req, req.next_sample))
                req.next_sample += 1
            if len(take) == n_free:
                break
        return take

    def place(self, take: list[tuple[object, int]], holes: list[int]) -> np.ndarray:
        """Slots for `take`: the lowest holes first (`holes` sorted descending, consumed), then B, B+1, ..."""
        slots = []
        for req, j in take:
            if holes:
                slot = holes.pop()
            else:
                slot = self.B
                self.B += 1
            slots.append(slot)
            self.slot_req[slot] = req
            self.slot_sample[slot] = j
            self.slot_entry[slot] = req.entry
        return np.array(slots, dtype=np.int64)

    # -- release --------------------------------------------------------------------------------------------

    def finish(self, slot: int) -> bool:
        """The sample in `slot` ended (the slot becomes a hole). True when its request has no samples left."""
        req = self.slot_req[slot]
        self.slot_req[slot] = None
        req.outstanding -= 1
        if req.outstanding == 0 and req.next_sample >= req.per_prompt:
            self.open.remove(req)
            self.free_entries.append(req.entry)
            return True
        return False

    def remove(self, req) -> list[int]:
        """Drop a request wherever it is (abort); returns the slots it held (now holes)."""
        if req in self.waiting:
            self.waiting.remove(req)
            return []
        if req not in self.open:
            return []
        holes = [s for s in range(self.B) if self.slot_req[s] is req]
        for s in holes:
            self.slot_req[s] = None
        self.open.remove(req)
        self.free_entries.append(req.entry)
        return holes

    def compact(self, holes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Move the last live slots into the holes so that slots 0..B-1 stay the live ones.

        Returns (src, dst) int64 arrays of the moves (host slot state here is already moved; the caller
        moves its own per-slot arrays and cache rows the same way).
        """
        holes = set(h for h in holes if h < self.B)
        empty = np.zeros(0, dtype=np.int64)
        if not holes:
            return empty, empty
        new_B = self.B - len(holes)
        dst = np.array(sorted(h for h in holes if h < new_B), dtype=np.int64)
        src = np.array([i for i in range(new_B, self.B) if i not in holes], dtype=np.int64)  # live beyond the end
        for a, b in zip(src.tolist(), dst.tolist()):
            self.slot_req[b], self.slot_req[a] = self.slot_req[a], None
        if len(src):
            for arr in (self.slot_sample, self.slot_entry):
                arr[dst] = arr[src]
        self.B = new_B
        return src, dst
