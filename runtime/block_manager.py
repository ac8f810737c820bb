"""Paged KV-cache bookkeeping: which physical blocks each request holds, reference counts,
and automatic prefix caching.

A full block is identified by a hash chaining its parent block's hash and its own token ids,
so equal prefixes map to equal chains. Blocks whose reference count drops to zero go to the
back of the free queue but keep their contents and hash: a later request with the same prefix
takes them back; a request that needs a fresh block evicts from the front (least recently
freed first)."""

from collections import OrderedDict

from .request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.key: tuple | None = None  # (parent hash, token ids): guards against collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, parent: int | None, tokens: list[int]) -> tuple[tuple, int]:
        key = (parent, tuple(tokens))
        return key, hash(key)

    def prefix_hits(self, req: Request) -> list[int]:
        """Cached blocks holding the longest full-block prefix of the request's tokens. The
        last token is never taken from the cache: its logits must be computed."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt token computed
        hits, parent = [], None
        bs = self.block_size
        for i in range((req.num_tokens - 1) // bs):
            key, h = self._key(parent, req.token_ids[i * bs:(i + 1) * bs])
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].key != key:
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_allocate(self, hits: list[int], num_tokens: int) -> bool:
        """Room for a new request that reuses `hits` and then computes `num_tokens` more."""
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_for(len(hits) * self.block_size + num_tokens) - len(hits)
        return fresh <= self.num_free_blocks - reclaimed

    def allocate(self, req: Request, hits: list[int], num_tokens: int) -> None:
        if self.enable_prefix_caching:  # counted here: a request may be looked up many
            self.num_prefix_queries += req.num_tokens  # times before it is admitted
            self.num_prefix_hits += len(hits) * self.block_size
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            req.block_hashes.append(block.hash)
        req.block_ids = list(hits)
        req.num_computed_tokens = len(hits) * self.block_size
        self.append(req, num_tokens)

    def can_append(self, req: Request, num_tokens: int) -> bool:
        needed = self.blocks_for(req.num_computed_tokens + num_tokens) - len(req.block_ids)
        return needed <= self.num_free_blocks

    def append(self, req: Request, num_tokens: int) -> None:
        needed = self.blocks_for(req.num_computed_tokens + num_tokens) - len(req.block_ids)
        for _ in range(needed):
            req.block_ids.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash = block.key = None
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly filled blocks for reuse by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            key, h = self._key(parent, req.token_ids[i * bs:(i + 1) * bs])
            block = self.blocks[req.block_ids[i]]
            if h not in self.cached:
                self.cached[h] = block.block_id
                block.hash, block.key = h, key
            req.block_hashes.append(h)
            parent = h

    def fork(self, parent: Request, child: Request) -> None:
        """Share the parent's full blocks with a child; the partly filled tail is not shared
        (the child recomputes it) because both would write into it."""
        num_full = parent.num_computed_tokens // self.block_size
        child.block_ids = parent.block_ids[:num_full]
        child.block_hashes = parent.block_hashes[:num_full]
        for block_id in child.block_ids:
            self.blocks[block_id].ref_count += 1
        child.num_computed_tokens = num_full * self.block_size

    def free(self, req: Request) -> None:
        # Reversed, so a sequence's tail blocks are evicted before the prefix others share.
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        req.block_ids = []
        req.block_hashes = []
        req.num_computed_tokens = 0

    def check_invariants(self) -> None:
        """Every block is either referenced or in the free queue, never both."""
        for block in self.blocks:
            in_queue = block.block_id in self.free_queue
            if (block.ref_count == 0) != in_queue or block.ref_count < 0:
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count}, "
                                     f"in free queue: {in_queue}")
        for h, block_id in self.cached.items():
            if self.blocks[block_id].hash != h:
                raise AssertionError(f"cached hash {h} points at block {block_id} without it")
