"""Incremental detokenization and stop-string matching.

Decoding token by token breaks multi-byte characters and word-boundary spaces, so each step
decodes a short window twice (with and without the newest tokens) and emits the difference
once it no longer ends in an incomplete character."""

from .request import Request

# Prompt tokens decoded along with the first outputs, so leading spaces come out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


def find_stop_string(req: Request, num_new_chars: int) -> tuple[str, int] | None:
    """The first stop string that the newest text completes, and where the output text
    should end."""
    stops = req.params.stop_strings
    if not stops or num_new_chars == 0:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, len(req.text) - num_new_chars - longest + 1)
    best = None
    for stop in stops:
        i = req.text.find(stop, start)
        if i >= 0 and (best is None or i < best[1]):
            best = (stop, i)
    if best is None:
        return None
    stop, i = best
    return stop, i + len(stop) if req.params.include_stop_str_in_output else i
