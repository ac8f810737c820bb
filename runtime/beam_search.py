"""Beam search as vLLM's offline API offers it: each step asks the engine for one token with
the top 2 x beam_width logprobs of every live beam (the prefix cache keeps the beams' shared
prefix computed once), keeps the beam_width best candidates, and sets aside beams that end
in EOS. Scores are cumulative logprobs divided by length ** length_penalty."""

from dataclasses import dataclass, field

from .outputs import Logprob


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # the prompt's tokens, then the generated ones
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None  # the whole sequence decoded, prompt included
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(seq: BeamSearchSequence, eos_token_ids: set[int], length_penalty: float) -> float:
    length = len(seq.tokens) - (1 if seq.tokens[-1] in eos_token_ids else 0)
    return seq.cum_logprob / (length ** length_penalty)
