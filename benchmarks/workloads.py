"""What each engine is asked to do. Prompts are token ids, so every engine sees exactly the
same input whatever its tokenizer wrapper does; generation is greedy with EOS ignored, so
every engine produces exactly `max_tokens` tokens."""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    prompt_len: int
    max_tokens: int
    what: str

    def to_dict(self) -> dict:
        return asdict(self)


WORKLOADS = {
    "latency": Workload("latency", 1, 32, 128,
                        "one 32-token prompt, 128 new tokens: time to first token, decode "
                        "tokens/s, inter-token latency"),
    "throughput": Workload("throughput", 64, 128, 128,
                           "64 distinct 128-token prompts submitted at once, 128 new tokens "
                           "each: output and total tokens/s"),
    "startup": Workload("startup", 1, 32, 1,
                        "a new process: start -> ready -> first token, compile cache cold "
                        "and warm"),
    "memory": Workload("memory", 64, 128, 128,
                       "peak resident memory (and GPU memory) over the throughput run; KV "
                       "cache blocks"),
}


def synthetic_prompts(num: int, length: int, vocab_size: int, seed: int = 0,
                      reserved: int = 32) -> list[list[int]]:
    """`num` distinct prompts of exactly `length` token ids drawn from a seeded generator,
    skipping the first `reserved` ids (where special tokens usually live)."""
    if length < 1 or num < 1:
        raise ValueError(f"need at least one prompt of at least one token, got {num} x {length}")
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary tokens above {reserved}")
    rng = random.Random(seed)
    return [[rng.randrange(reserved, vocab_size) for _ in range(length)] for _ in range(num)]


def jsonl_prompts(path: str | Path, encode, num: int) -> list[list[int]]:
    """Prompts from a JSONL file (one {"prompt": "..."} per line), tokenized by `encode`;
    the first `num`, cycling through the file if it is shorter."""
    texts = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: expected a JSON object with a 'prompt' string: "
                             f"{e}") from None
    if not texts:
        raise ValueError(f"{path} holds no prompts")
    return [encode(texts[i % len(texts)]) for i in range(num)]
