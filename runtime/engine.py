"""The engine loop: admit requests, schedule a step, run it, turn tokens into outputs."""

import itertools
import json
import logging
import random
import time
from pathlib import Path

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, find_stop_string
from .metrics import EngineStats, expose
from .model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestOutput
from .request import Request
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .structured_output import GrammarCompiler
from .tokenizer import Tokenizer

logger = logging.getLogger("kiln")


def _eos_token_ids(config: EngineConfig, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and from generation_config.json, as vLLM stops on both."""
    def as_set(eos) -> set[int]:  # configs give one id, a list of ids, or none
        return set(eos) if isinstance(eos, list) else set() if eos is None else {eos}

    ids = as_set(tokenizer.eos_token_id if tokenizer is not None else None)
    path = Path(config.model.path) / "generation_config.json"
    if path.is_file():
        ids |= as_set(json.loads(path.read_text()).get("eos_token_id"))
    return ids or as_set(config.model.arch_config.eos_token_id)


class Engine:
    def __init__(self, config: EngineConfig, pooling: bool = False):
        self.config = config
        self.pooling = pooling  # requests end after their prompt with its last hidden state
        mc = config.model
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer(mc.tokenizer,
                                                                       mc.tokenizer_mode)
        self.eos_token_ids = _eos_token_ids(config, self.tokenizer)
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens)
        self.rng = random.Random(config.model.seed)
        self.request_counter = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.stats = EngineStats()
        self.grammar_compiler: GrammarCompiler | None = None
        expose(self)

    def truncate(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt after `truncate_prompt_tokens` (its last k tokens; -1: max_model_len)."""
        keep = params.truncate_prompt_tokens
        if keep is None:
            return prompt_token_ids
        if keep == -1:
            keep = self.config.model.max_model_len
        return prompt_token_ids[-keep:]

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never be served; admits nothing."""
        max_len = self.config.model.max_model_len
        if not prompt_token_ids:
            raise ValueError("the prompt is empty (it has no tokens)")
        vocab = self.config.model.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("allowed_token_ids", params.allowed_token_ids or [])):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise ValueError(f"{name} has token ids {outside[:5]} outside the vocabulary "
                                 f"[0, {vocab})")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer (skip_tokenizer_init=True was given)")
        if params.structured_outputs is not None:
            self._grammars().matcher(params.structured_outputs)  # raises if invalid
        prompt_token_ids = self.truncate(prompt_token_ids, params)
        bad = [t for t in prompt_token_ids
               if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {vocab})")
        if len(prompt_token_ids) > max_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, longer than "
                             f"max_model_len={max_len}")
        if params.detokenize and self.tokenizer is None and (params.stop_strings):
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True)")

    def add_request(self, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> list[Request]:
        """Queue the prompt's `params.n` completions; return them in index order."""
        self.check_request(prompt_token_ids, params)
        prompt_token_ids = self.truncate(prompt_token_ids, params)
        bad_words = self._bad_words_token_ids(params.bad_words or [])
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        request_id = str(next(self.request_counter))
        children: list[Request] = []
        for index in range(params.n):
            seed = (params.seed + index if params.seed is not None
                    else self.rng.getrandbits(63))
            req = Request(request_id, prompt, prompt_token_ids, params, seed, stop_ids, index,
                          children[0] if children else None)
            req.bad_words_token_ids = bad_words
            if params.structured_outputs is not None:
                req.matcher = self._grammars().matcher(params.structured_outputs)
            if params.detokenize and self.tokenizer is not None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                         params.skip_special_tokens)
            self.scheduler.add(req)
            children.append(req)
        self.num_prompt_tokens += len(prompt_token_ids)
        return children

    def _grammars(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise ValueError("structured output needs a tokenizer (skip_tokenizer_init=True "
                             "was given)")
        if self.grammar_compiler is None:
            self.grammar_compiler = GrammarCompiler(self.tokenizer, self.config.model.vocab_size,
                                                    self.eos_token_ids)
        return self.grammar_compiler

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as tokens, on its own and after a space (as it reads mid-text),
        as vLLM bans them."""
        out = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[Request]:
        """Run one scheduled batch; return the requests that finished in it."""
        batch = self.scheduler.schedule()
        if not batch.requests:
            raise RuntimeError("the scheduler could not fit any request in the KV cache")
        if self.pooling:
            rows, pooled = self.runner.execute_pooling(batch)
            out, prompt_logprobs = None, {}
        else:
            rows, out, prompt_logprobs = self.runner.execute(batch)
        for req, entries in prompt_logprobs.items():
            req.prompt_logprobs += [self._logprob_entry(*entry) for entry in entries]
        for req, n in zip(batch.requests, batch.num_scheduled_tokens):
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req)
        if self.pooling:
            return [self._finish_pooled(batch.requests[row], pooled[i].cpu())
                    for i, row in enumerate(rows)]
        if out is None:
            return []
        tokens = out.token_ids.tolist()
        logprobs = [t.tolist() for t in out.logprobs] if out.logprobs is not None else None
        finished = []
        for i, row in enumerate(rows):
            req = batch.requests[row]
            self._append_token(req, tokens[i], logprobs and [lp[i] for lp in logprobs])
            if req.finish_reason is not None:
                self.scheduler.finish(req)
                finished.append(req)
                self.stats.e2e.observe(req.last_token_time - req.arrival_time)
                reason = req.finish_reason
                self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        return finished

    def _finish_pooled(self, req: Request, hidden: torch.Tensor) -> Request:
        req.pooled = hidden
        req.finish_reason = "stop"
        req.last_token_time = time.perf_counter()
        self.scheduler.finish(req)
        self.stats.e2e.observe(req.last_token_time - req.arrival_time)
        return req

    def embed_last_tokens(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """The final hidden state of each prompt's last token, computed by the same scheduler,
        KV cache and compiled model as generation (prefix caching included)."""
        params = SamplingParams(max_tokens=1, detokenize=False)
        for ids in prompts:
            self.check_request(ids, params)
        requests = [self.add_request(None, ids, params)[0] for ids in prompts]
        try:
            while self.has_unfinished:
                self.step()
        finally:
            if self.has_unfinished:  # an exception interrupted the loop
                self.abort_all()
        return [req.pooled for req in requests]

    def _append_token(self, req: Request, token: int, logprobs: list | None) -> None:
        req.token_ids.append(token)
        self.num_generation_tokens += 1
        now = time.perf_counter()
        if req.num_output_tokens == 1:
            self.stats.ttft.observe(now - req.arrival_time)
        else:
            self.stats.itl.observe(now - req.last_token_time)
        req.last_token_time = now
        params = req.params
        if logprobs is not None and params.logprobs is not None:
            top_ids, top_values, chosen, rank = logprobs
            req.logprobs.append(self._logprob_entry(token, chosen, rank,
                                                    top_ids[:params.logprobs], top_values))
            req.cumulative_logprob += chosen
        if req.matcher is not None:
            req.matcher.consume_token(token)
        num_new_chars = 0
        if req.detokenizer is not None:
            new_text = req.detokenizer.add(token)
            req.text += new_text
            num_new_chars = len(new_text)
        can_stop = req.num_output_tokens >= params.min_tokens
        if can_stop and token in req.stop_token_ids:
            req.finish_reason = "stop"
            req.stop_reason = token if token in params.stop_token_ids else None
            return
        stop = find_stop_string(req, num_new_chars) if can_stop else None
        if stop is not None:
            req.stop_reason, end = stop
            req.text = req.text[:end]
            req.finish_reason = "stop"
        elif (params.max_tokens is not None and req.num_output_tokens >= params.max_tokens) \
                or req.num_tokens >= self.config.model.max_model_len:
            req.finish_reason = "length"
        elif req.matcher is not None and req.matcher.is_stopped():
            req.finish_reason = "stop"  # the grammar is complete and admits nothing more

    def _logprob_entry(self, token: int, logprob: float, rank: int, top_ids: list[int],
                       top_values: list[float]) -> dict[int, Logprob]:
        """vLLM's per-position logprobs: the chosen token first, then the top ones."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token))}
        for r, (t, v) in enumerate(zip(top_ids, top_values)):
            entry.setdefault(t, Logprob(v, r + 1, self._decode_one(t)))
        return entry

    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def abort_all(self) -> None:
        self.scheduler.abort_all()

    def to_output(self, children: list[Request]) -> RequestOutput:
        """One RequestOutput for a prompt's completions (given in index order)."""
        wants_logprobs = children[0].params.logprobs is not None
        completions = [CompletionOutput(
            index=req.index,
            text=req.text,
            token_ids=req.output_token_ids,
            cumulative_logprob=req.cumulative_logprob if wants_logprobs else None,
            logprobs=req.logprobs if wants_logprobs else None,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
        ) for req in children]
        first = children[0]
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                             completions, all(r.is_finished for r in children),
                             first.prompt_logprobs if first.params.prompt_logprobs is not None
                             else None)
