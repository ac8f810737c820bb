"""Which token counts get a compiled (and, for decode, a captured) variant."""

import bisect


def plan_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Powers of two up to the token budget, plus the budget itself. A decode step of B
    requests runs B tokens, so the sizes up to `max_num_seqs` double as decode buckets.
    Size 1 costs a second Dynamo trace at start (Dynamo specialises it), but padding one
    token to two is no bargain on a CPU: BLAS takes a matrix-vector path for one row that
    runs batch-1 decode about 1.5x faster than the matrix-matrix path for two."""
    sizes, size = [], 1
    while size < max_num_batched_tokens:
        sizes.append(size)
        size *= 2
    sizes.append(max_num_batched_tokens)
    return sizes


def decode_sizes(sizes: list[int], max_num_seqs: int) -> list[int]:
    """Sizes that a decode-only batch can pad to: all up to the first one >= max_num_seqs."""
    i = bisect.bisect_left(sizes, max_num_seqs)
    return sizes[: i + 1]


def padded_size(sizes: list[int], num_tokens: int) -> int:
    i = bisect.bisect_left(sizes, num_tokens)
    if i == len(sizes):
        raise ValueError(f"{num_tokens} tokens exceed the largest compiled size {sizes[-1]}")
    return sizes[i]
