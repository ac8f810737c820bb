"""A request's state: a few stored facts, everything else derived from them."""

import enum
import time

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, stop_token_ids: set[int], index: int = 0,
                 first_sibling: "Request | None" = None):
        self.request_id = request_id
        self.index = index  # which of the prompt's n completions this is
        # Later siblings of an n > 1 request wait until the first has computed the prompt,
        # then take its full blocks from the prefix cache instead of recomputing them.
        self.first_sibling = first_sibling
        self.prompt = prompt
        self.params = params
        self.seed = seed  # the user's seed, or one drawn from the engine's seeded generator
        self.stop_token_ids = stop_token_ids  # EOS (unless ignored) and the user's stop ids
        self.token_ids = list(prompt_token_ids)  # prompt followed by generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the full blocks registered so far
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict] = []
        self.prompt_logprobs: list[dict | None] = [None]  # the first token has no context
        self.cumulative_logprob = 0.0
        self.text = ""
        self.detokenizer = None
        self.bad_words_token_ids: list[list[int]] = []
        self.matcher = None  # structured output: the grammar's state after the output so far
        self.pooled = None  # pooling engines: the last prompt token's final hidden state
        self.arrival_time = time.perf_counter()
        self.last_token_time = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def can_start(self) -> bool:
        """False only while the first sibling runs and has not computed the prompt yet; a
        sibling never waits on one that is itself waiting (after preemption), so no two
        requests can wait on each other."""
        first = self.first_sibling
        return first is None or first.status is not Status.RUNNING or \
            first.num_computed_tokens >= first.num_prompt_tokens
