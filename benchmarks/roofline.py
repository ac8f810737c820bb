"""The machine's ceilings, measured at the start of a run, and where an engine sits under them.

Batch-1 decode reads every weight once per token, so its ceiling is memory bandwidth divided
by the bytes of the weights; batched decode and prefill are matrix products, whose ceiling is
the machine's matmul rate."""

import functools
import statistics
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    """The median time of `repeats` calls, not the shortest: what a run can sustain, where
    one fast call says little. On this virtual machine a fresh buffer's rate also varies
    from one allocation to the next (sums of 1 GiB: 29.5-38 GB/s on ordinary pages, 35.6-67
    on huge pages within an hour; 54.5, 53.9 and 33.9 before the three latency turns of a
    full run in which each engine decoded at about the same speed in all three), so the
    shares against it are indicative."""
    fn()  # first touch: page faults and lazy initialisation are not bandwidth
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5,
                      device: str = "cpu") -> float:
    """Streaming read bandwidth in bytes/s: the sum of an `nbytes` float32 array."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / _median_seconds(lambda: x.sum(), repeats)


def measure_matmul_peak(dtype: torch.dtype = torch.float32, repeats: int = 5,
                        device: str = "cpu", max_n: int = 2048) -> float:
    """FLOP/s of an n x n x n matrix product, n doubled from 256 while one product takes
    under 50 ms (bfloat16 products run at well under 1 GFLOP/s on some CPU builds of torch,
    where a 2048 product would take a minute)."""
    n = 256
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        product = functools.partial(torch.matmul, a, b)
        seconds = _median_seconds(product, 1 if n < max_n else repeats)
        if seconds >= 0.05 or n >= max_n:
            return 2 * n**3 / _median_seconds(product, repeats)
        n *= 2


def model_numbers(config: dict) -> dict:
    """Parameter counts of a Llama-family config.json: all weights, and the weights a token's
    matrix products touch (everything but the embedding lookup; a tied LM head counts once,
    as the product it is)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    embedding = vocab * hidden
    tied = config.get("tie_word_embeddings", False)
    total = layers * per_layer + hidden + embedding + (0 if tied else embedding)
    return {"params": total, "matmul_params": layers * per_layer + embedding}


def decode_fraction(tokens_per_s: float, weight_bytes: float, bandwidth: float) -> float:
    """Share of the bandwidth ceiling a batch-1 decode rate reaches: each token reads all
    weights once."""
    return tokens_per_s * weight_bytes / bandwidth


def throughput_fraction(tokens_per_s: float, matmul_params: int, peak_flops: float) -> float:
    """Share of the matmul ceiling: each processed token costs 2 FLOPs per weight it meets
    (attention's own products are small at these lengths and left out)."""
    return tokens_per_s * 2 * matmul_params / peak_flops


def matmul_ceiling(matmul_flops: dict[str, float], precision: str) -> float:
    """The matmul ceiling of an engine at `precision` (its label: float32, bfloat16, f16,
    ...), from the run's measured products {"float32": FLOP/s, "bfloat16": FLOP/s}. A 16-bit
    engine gets the faster of the two: where torch's bfloat16 product crawls (CPUs without
    bfloat16 instructions), 16-bit weights widened to float32 multiply at float32's rate,
    as kiln's own bfloat16 engine does there."""
    if precision in ("bfloat16", "f16"):
        return max(matmul_flops["bfloat16"], matmul_flops["float32"])
    return matmul_flops["float32"]
