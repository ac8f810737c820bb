"""Structured output: a grammar (JSON schema, regex, choice list, Lark/EBNF grammar) turned
into a per-step token mask by llguidance, which walks the grammar over the tokenizer's
vocabulary. Each request keeps a matcher that consumes the tokens it generates; the sampler
masks every token the grammar does not allow next, EOS included until the grammar is done."""

import json
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StructuredOutputsParams:
    """Exactly one of the fields, as vLLM's StructuredOutputsParams."""

    json: str | dict | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark or GBNF/EBNF
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, "
                             f"grammar, json_object; got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or
                                        not self.choice or
                                        not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of non-empty strings, got "
                             f"{self.choice!r}")

    def grammar_text(self) -> str:
        """The llguidance grammar for this request (unvalidated)."""
        from llguidance import LLMatcher, grammar_from

        if self.json is not None:
            schema = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return LLMatcher.grammar_from_json_schema(schema)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema('{"type": "object"}')
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return grammar_from("choice", json.dumps(list(self.choice)))
        return grammar_from("grammar", self.grammar)


class GrammarCompiler:
    """Builds matchers for one tokenizer; the llguidance view of the vocabulary is built on
    first use (about a second) and shared."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer = None
        # Grammars already validated: a request is checked before admission and each of its
        # n completions gets a matcher of its own; validating walks the whole grammar.
        self._valid: set[str] = set()

    def _tokenizer(self):
        from llguidance import LLTokenizer

        if self._ll_tokenizer is None:
            if self.tokenizer.fast is None:
                raise ValueError("structured output needs a tokenizer.json (a fast tokenizer)")
            self._ll_tokenizer = LLTokenizer(self.tokenizer.fast.to_str(),
                                             n_vocab=self.vocab_size,
                                             eos_token=self.eos_token_ids or None)
        return self._ll_tokenizer

    def matcher(self, params: StructuredOutputsParams):
        """A fresh matcher; ValueError naming the problem if the grammar is invalid."""
        from llguidance import LLMatcher

        try:
            grammar = params.grammar_text()
        except (ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"invalid structured output request: {e}") from None
        if grammar not in self._valid:
            error = LLMatcher.validate_grammar(grammar, self._tokenizer())
            if error and not error.startswith("WARNING"):
                raise ValueError(f"invalid structured output request: {error}")
            self._valid.add(grammar)
        return LLMatcher(self._tokenizer(), grammar, log_level=0)


def allowed_mask(matcher, vocab_size: int) -> torch.Tensor:
    """[V] bool: the tokens the grammar allows next."""
    bias = np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, bias.shape[0])
    mask[:n] = torch.from_numpy(bias[:n] > 0)
    return mask
