"""Block manager bookkeeping on its own: allocation, reference counts, fork, prefix reuse
and eviction order."""

import pytest

from kiln import SamplingParams
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.request import Request


def req(tokens, rid="r"):
    return Request(rid, None, tokens, SamplingParams(), seed=0, stop_token_ids=set())


def compute(bm, r, n):
    """Allocate n new tokens for r as the scheduler would, and mark them computed."""
    bm.append(r, n)
    r.num_computed_tokens += n
    bm.cache_full_blocks(r)


def test_allocate_append_free_restores_every_block():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    r = req(list(range(10)))
    assert bm.can_allocate([], 10)
    bm.allocate(r, [], 10)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 5
    r.num_computed_tokens = 10
    assert bm.can_append(r, 2)
    bm.append(r, 2)  # 12 tokens still fit 3 blocks
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 12
    bm.append(r, 1)
    assert len(r.block_ids) == 4
    bm.free(r)
    assert bm.num_free_blocks == 8 and r.block_ids == []
    bm.check_invariants()


def test_cannot_allocate_beyond_capacity():
    bm = BlockManager(2, 4, enable_prefix_caching=False)
    assert bm.can_allocate([], 8) and not bm.can_allocate([], 9)


def test_prefix_hits_share_blocks_with_ref_counts():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = req(list(range(13)), "a")
    bm.allocate(a, bm.prefix_hits(a), 0)
    compute(bm, a, 13)
    b = req(list(range(12)) + [99], "b")
    hits = bm.prefix_hits(b)
    assert hits == a.block_ids[:3]
    bm.allocate(b, hits, 1)
    assert b.num_computed_tokens == 12
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants()


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = req(list(range(8)), "a")
    bm.allocate(a, [], 0)
    compute(bm, a, 8)
    bm.free(a)
    same = req(list(range(8)), "same")
    assert len(bm.prefix_hits(same)) == 1  # the second block holds the last token


def test_freed_blocks_stay_reusable_until_evicted_lru():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = req([1, 2, 3, 4, 5], "a")
    bm.allocate(a, [], 0)
    compute(bm, a, 5)
    bm.free(a)
    again = req([1, 2, 3, 4, 5], "again")
    assert len(bm.prefix_hits(again)) == 2
    # Taking all four blocks for new content evicts the cached ones.
    other = req(list(range(10, 18)), "other")
    bm.allocate(other, bm.prefix_hits(other), 8)
    assert bm.prefix_hits(req([1, 2, 3, 4, 5])) == []
    bm.check_invariants()


def test_eviction_takes_least_recently_freed_first():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    old, new = req([1, 2, 9], "old"), req([3, 4, 9], "new")
    for r in (old, new):
        bm.allocate(r, [], 0)
        compute(bm, r, 3)
    bm.free(old)
    bm.free(new)
    # Freed in reverse, old's blocks lead the queue; two fresh blocks take both of them.
    filler = req([7, 7, 7], "filler")
    bm.allocate(filler, [], 3)
    assert bm.prefix_hits(req([1, 2, 9])) == []
    assert len(bm.prefix_hits(req([3, 4, 9]))) == 1


def test_fork_shares_full_blocks_only():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    parent = req(list(range(10)), "p")
    bm.allocate(parent, [], 0)
    compute(bm, parent, 10)
    child = req(list(range(10)), "c")
    bm.fork(parent, child)
    assert child.block_ids == parent.block_ids[:2] and child.num_computed_tokens == 8
    assert all(bm.blocks[b].ref_count == 2 for b in child.block_ids)
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_invariant_check_catches_a_leak():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    bm.blocks[0].ref_count = 1  # referenced but still queued as free
    with pytest.raises(AssertionError):
        bm.check_invariants()
