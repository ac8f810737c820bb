"""Continuous batching with chunked prefill under a token budget.

Each step, running requests are served first (decodes before unfinished prefill chunks), then
waiting requests are admitted while the token budget, `max_num_seqs` and free blocks allow.
A request whose prompt does not fit the remaining budget is prefilled in chunks over several
steps. When blocks run out, the most recently admitted running request is preempted: its blocks
are freed and it returns to the front of the queue to be recomputed later (prompt plus the
tokens it had generated, so its output is unchanged)."""

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]  # decodes first, then prefill chunks
    num_scheduled_tokens: list[int]
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        # Decodes first: each needs one token of the budget and at most one new block.
        for req in sorted(self.running, key=lambda r: r.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(req.num_uncomputed_tokens, budget)
            fits, budget_returned = self._make_room(req, num_tokens, scheduled)
            budget += budget_returned
            if not fits:
                continue
            self.block_manager.append(req, num_tokens)
            scheduled[req] = num_tokens
            budget -= num_tokens

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not req.can_start:
                break
            hits = self.block_manager.prefix_hits(req)
            num_tokens = min(req.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(hits, num_tokens):
                break
            self.waiting.popleft()
            self.block_manager.allocate(req, hits, num_tokens)
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled[req] = num_tokens
            budget -= num_tokens

        # Any one-token chunk attends like a decode, so it joins the decode group.
        requests = sorted(scheduled, key=lambda r: scheduled[r] > 1)
        num_decodes = sum(1 for r in requests if scheduled[r] == 1)
        return ScheduledBatch(requests, [scheduled[r] for r in requests], num_decodes)

    def _make_room(self, req: Request, num_tokens: int, scheduled: dict) -> tuple[bool, int]:
        """Preempt the newest running requests until `req` can grow. Returns whether `req`
        itself survived, and the tokens of already scheduled victims (back to the budget)."""
        returned = 0
        while not self.block_manager.can_append(req, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            returned += scheduled.pop(victim, 0)
            if victim is req:
                return False, returned
        return True, returned

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req)
        req.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req)
        req.status = Status.FINISHED

    def abort_all(self) -> None:
        for req in list(self.running):
            self.finish(req)
        for req in self.waiting:
            req.status = Status.FINISHED
        self.waiting.clear()
