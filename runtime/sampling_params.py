"""SamplingParams with vLLM's names, defaults and meaning, checked when constructed."""

import enum
import math
from dataclasses import dataclass, field

from .structured_output import StructuredOutputsParams


class RequestOutputKind(enum.Enum):
    """vLLM's streaming granularity. The offline API returns finished outputs whatever the
    kind, as vLLM's offline LLM does."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # added to the token's logit before sampling
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] | None = None  # words that may not be generated
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max)
    structured_outputs: StructuredOutputsParams | dict | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:  # JSON gives string keys
            self.logit_bias = {_token_id(k): v for k, v in dict(self.logit_bias).items()}
        self._verify()

    def _verify(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool),
                  f"{name} must be a number, got {value!r}")
        for name in ("n", "top_k", "min_tokens"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool),
                  f"{name} must be an int, got {value!r}")
        check(self.n >= 1, f"n must be at least 1, got {self.n}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k >= -1, f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int)
                                          and self.max_tokens >= 1),
              f"max_tokens must be at least 1, got {self.max_tokens}")
        check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
              f"logprobs must be None or a non-negative int, got {self.logprobs}")
        check(self.prompt_logprobs is None or (
            isinstance(self.prompt_logprobs, int) and not isinstance(self.prompt_logprobs, bool)
            and self.prompt_logprobs >= 0),
              f"prompt_logprobs must be None or a non-negative int, got {self.prompt_logprobs}")
        check(self.seed is None or isinstance(self.seed, int),
              f"seed must be an int or None, got {self.seed!r}")
        check(all(isinstance(s, str) and s for s in self.stop_strings),
              f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        check(self.logit_bias is None or all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in self.logit_bias.values()),
              f"logit_bias values must be finite numbers, got {self.logit_bias!r}")
        check(self.allowed_token_ids is None or (
            isinstance(self.allowed_token_ids, (list, tuple)) and self.allowed_token_ids and
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                for t in self.allowed_token_ids)),
              f"allowed_token_ids must be a non-empty list of token ids, got "
              f"{self.allowed_token_ids!r}")
        check(self.bad_words is None or (isinstance(self.bad_words, (list, tuple)) and all(
            isinstance(w, str) and w.strip() for w in self.bad_words)),
              f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        check(self.structured_outputs is None or
              isinstance(self.structured_outputs, StructuredOutputsParams),
              f"structured_outputs must be StructuredOutputsParams or a dict, got "
              f"{self.structured_outputs!r}")
        check(isinstance(self.output_kind, RequestOutputKind),
              f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        check(self.truncate_prompt_tokens is None or (
            isinstance(self.truncate_prompt_tokens, int) and
            (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)),
              f"truncate_prompt_tokens must be a positive int or -1, got "
              f"{self.truncate_prompt_tokens!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _token_id(key) -> int:
    try:
        token = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
    if token < 0:
        raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
    return token
