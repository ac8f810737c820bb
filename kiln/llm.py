"""The LLM class: vLLM's offline API over kiln's engine."""

import difflib
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .compiler.cache import CompileCache
from .compiler.config import CompilationConfig
from .compiler.inductor import joined_on_error
from .models import POOLING_ARCHITECTURES
from .resolve import cache_dir, resolve_model
from .runtime.beam_search import (
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    beam_score,
)
from .runtime.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    resolve_dtype,
    resolve_max_model_len,
)
from .runtime.engine import Engine
from .runtime.outputs import RequestOutput
from .runtime.pooling import (
    EmbeddingOutput,
    Pooler,
    PoolingParams,
    PoolingRequestOutput,
    ScoringOutput,
)
from .runtime.sampling_params import SamplingParams

logger = logging.getLogger("kiln")

# vLLM arguments whose feature comes in a later kiln release: accepted at their default only.
_NOT_YET = {
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "data_parallel_size": 1,
    "quantization": None,
    "enable_expert_parallel": False,
}


def _reject_unknown(kwargs: dict, known: Sequence[str]) -> None:
    for name, value in kwargs.items():
        if name in _NOT_YET:
            if value != _NOT_YET[name]:
                raise ValueError(f"{name}={value!r} is not supported yet")
            continue
        close = difflib.get_close_matches(name, list(known) + list(_NOT_YET), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"LLM() got an unknown argument {name!r}{hint}")


def _prompt_list(prompts) -> list:
    """One prompt (a string or a dict) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a dict or a list of them, got "
                        f"{type(prompts).__name__}")
    return list(prompts)


_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class LLM:
    """Generate text from a model, the way vLLM's offline `LLM` does.

    `LLM()` loads the embedded SmolLM2-135M-Instruct; `model` also takes a Hugging Face folder,
    a .gguf file or a hub id."""

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        dtype: str | torch.dtype = "auto",
        seed: int = 0,
        revision: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: int | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        compilation_config: dict | CompilationConfig | None = None,
        load_format: str = "auto",
        runner: str = "auto",
        **kwargs,
    ):
        _reject_unknown(kwargs, list(inspect.signature(LLM.__init__).parameters)[1:-1])
        from .models.config import read_config

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        compilation = CompilationConfig.from_user(compilation_config)
        compile_cache_dir = Path(compilation.cache_dir or cache_dir() / "compile")
        with joined_on_error():  # a failed start leaves no import running
            if not enforce_eager:
                CompileCache(compile_cache_dir)  # refuses an unsafe directory before any work
            folder = resolve_model(model, revision)
            arch_config = read_config(folder)
            is_encoder = arch_config.architectures[0] in POOLING_ARCHITECTURES
            if runner not in ("auto", "generate", "pooling"):
                raise ValueError(f"runner must be 'auto', 'generate' or 'pooling', got {runner!r}")
            if runner == "generate" and is_encoder:
                raise ValueError(f"{arch_config.architectures[0]} is an encoder and cannot "
                                 f"generate; use runner='pooling' (or 'auto')")
            tokenizer_folder = folder if tokenizer is None else resolve_model(tokenizer, revision)
            if trust_remote_code:
                logger.info("trust_remote_code=True: kiln never runs a repository's code; "
                            "it builds only the architectures it implements")
            max_len = resolve_max_model_len(max_model_len, arch_config)
            if max_num_batched_tokens is None:
                max_num_batched_tokens = max(8192 if device.type == "cuda" else 2048, max_num_seqs)
            checkpoint_dtype = arch_config.dtype or torch.float32
            if isinstance(checkpoint_dtype, str):
                checkpoint_dtype = getattr(torch, checkpoint_dtype)
            model_dtype = resolve_dtype(dtype, checkpoint_dtype, device)
            compilation = compilation.for_device(device.type, model_dtype)
            self.config = EngineConfig(
                model=ModelConfig(
                    path=str(folder), arch_config=arch_config, tokenizer=str(tokenizer_folder),
                    tokenizer_mode=tokenizer_mode, skip_tokenizer_init=skip_tokenizer_init,
                    dtype=model_dtype,
                    max_model_len=max_len, seed=seed, load_format=load_format,
                ),
                cache=CacheConfig(block_size, kv_cache_memory, gpu_memory_utilization,
                                  enable_prefix_caching),
                scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens),
                compilation=compilation,
                device=device,
                enforce_eager=bool(enforce_eager),
                compile_cache_dir=compile_cache_dir,
                kernel_dir=cache_dir() / "kernels",
            )
            self.engine = self.pooler = None
            if is_encoder:  # encoders keep no KV cache and need no scheduler
                self.pooler = Pooler(self.config)
                if not enforce_eager:
                    self.pooler.runner.warmup()
                return
            self.engine = Engine(self.config, pooling=runner == "pooling")
            if runner == "pooling":  # a decoder as an embedding model: last-token pooling
                self.pooler = Pooler(self.config, self.engine)
            if not enforce_eager:
                start = time.perf_counter()
                self.engine.runner.warmup()
                logger.info("compiled in %.1f s", time.perf_counter() - start)

    def _generator(self) -> Engine:
        if self.pooler is not None:
            raise ValueError(f"{self.config.model.arch_config.architectures[0]} runs as a "
                             f"pooling model here: use encode(), embed() or score()")
        return self.engine

    def _pooling(self) -> Pooler:
        if self.pooler is None:
            raise ValueError(f"{self.config.model.arch_config.architectures[0]} is a generation "
                             f"model and no pooling applies to it; encode/embed/score need an "
                             f"encoder such as sentence-transformers/all-MiniLM-L6-v2, or "
                             f"LLM(..., runner='pooling') to pool a decoder's last token")
        return self.pooler

    @property
    def _tokenizer(self):
        return (self.pooler or self.engine).tokenizer

    def get_metrics(self) -> list:
        """The engine's metrics now, in vLLM's shapes (Counter, Gauge, Histogram), named
        kiln:…; the same values are in prometheus_client's registry when it is installed."""
        from .runtime.metrics import collect

        if self.engine is None:
            raise ValueError("get_metrics reports the generation engine; this encoder has none")
        return collect(self.engine)

    def get_tokenizer(self):
        """The transformers tokenizer (None with skip_tokenizer_init=True)."""
        return None if self._tokenizer is None else self._tokenizer.hf

    def encode(self, prompts, pooling_params: PoolingParams | None = None,
               use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """One pooled vector per prompt (`.outputs.embedding`, `.outputs.data`), pooled and
        normalised as the checkpoint's sentence-transformers config says unless
        `pooling_params` overrides it."""
        pooler = self._pooling()
        if pooler.is_cross_encoder:
            raise ValueError("this is a cross-encoder: it scores text pairs with score(), "
                             "it has no embeddings")
        params = pooling_params or PoolingParams()
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got "
                            f"{type(params).__name__}")
        ids = [self._tokenize(p)[1] for p in _prompt_list(prompts)]
        vectors = pooler.embed(ids, params)
        return [PoolingRequestOutput(str(i), p, EmbeddingOutput(v.tolist()))
                for i, (p, v) in enumerate(zip(ids, vectors))]

    def embed(self, prompts, pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        return self.encode(prompts, pooling_params, use_tqdm)

    def score(self, text_1, text_2, pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """Similarity of text pairs, as vLLM pairs them: one text_1 with each text_2, or the
        two lists element by element. Embedding models give the cosine of the two
        embeddings; cross-encoders their (sigmoid) score of the pair."""
        pooler = self._pooling()
        params = pooling_params or PoolingParams()
        if pooler.tokenizer is None:
            raise ValueError("score needs a tokenizer (skip_tokenizer_init=True was given)")
        first = [text_1] if isinstance(text_1, str) else list(text_1)
        second = [text_2] if isinstance(text_2, str) else list(text_2)
        if not all(isinstance(t, str) and t for t in first + second):
            raise TypeError("score takes non-empty strings or lists of them")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise ValueError(f"score pairs one text_1 with many text_2, or two lists of "
                             f"equal length; got {len(first)} and {len(second)} texts")
        pairs = list(zip(first, second))
        return [PoolingRequestOutput(str(i), [], ScoringOutput(s))
                for i, s in enumerate(pooler.score(pairs, params))]

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is an empty string")
            if self._tokenizer is None:
                raise ValueError("text prompts need a tokenizer; with skip_tokenizer_init=True "
                                 "pass {'prompt_token_ids': [...]}")
            return prompt, self._tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise TypeError(f"prompt_token_ids must be a list of ints, got "
                                    f"{type(ids).__name__}")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys "
                             f"{sorted(prompt)}")
        raise TypeError(f"a prompt must be a string, or a dict with 'prompt' or "
                        f"'prompt_token_ids'; got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        self._generator()
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for "
                                 f"{len(prompts)} prompts; pass one or one per prompt")
            params = list(sampling_params)
        else:
            raise TypeError(f"sampling_params must be SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        if any(not isinstance(p, SamplingParams) for p in params):
            raise TypeError("every entry of sampling_params must be a SamplingParams")
        # Check every request before admitting any, so a bad one leaves the engine idle.
        tokenized = [self._tokenize(p) for p in prompts]
        for (_, ids), p in zip(tokenized, params):
            self.engine.check_request(ids, p)
        groups = [self.engine.add_request(text, ids, p) for (text, ids), p in
                  zip(tokenized, params)]
        try:
            self._run(sum(len(g) for g in groups), use_tqdm)
        finally:
            if self.engine.has_unfinished:  # an exception interrupted the loop
                self.engine.abort_all()
        return [self.engine.to_output(g) for g in groups]

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False
                    ) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: for each prompt, the `beam_width` best sequences by
        length-penalised cumulative logprob, best first (see runtime/beam_search.py)."""
        self._generator()
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        tokenized = [self._tokenize(p)[1] for p in _prompt_list(prompts)]
        eos = set() if params.ignore_eos else self.engine.eos_token_ids
        step = SamplingParams(max_tokens=1, temperature=params.temperature,
                              logprobs=2 * params.beam_width, ignore_eos=True,
                              detokenize=False)
        for ids in tokenized:
            self.engine.check_request(ids, step)

        def score(seq):
            return beam_score(seq, eos, params.length_penalty)

        live = [[BeamSearchSequence(list(ids))] for ids in tokenized]
        done: list[list[BeamSearchSequence]] = [[] for _ in tokenized]
        max_len = self.config.model.max_model_len
        for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
            beams = [b for group in live for b in group if len(b.tokens) < max_len]
            if not beams:
                break
            outs = iter(self.generate([{"prompt_token_ids": b.tokens} for b in beams], step,
                                      use_tqdm=False))
            for i, group in enumerate(live):
                candidates = []
                for beam in group:
                    if len(beam.tokens) >= max_len:
                        done[i].append(BeamSearchSequence(beam.tokens, beam.logprobs,
                                                          beam.cum_logprob,
                                                          finish_reason="length"))
                        continue
                    entry = next(outs).outputs[0].logprobs[0]
                    for token, logprob in entry.items():
                        seq = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry],
                                                 beam.cum_logprob + logprob.logprob)
                        if token in eos:
                            seq.finish_reason = "stop"
                            done[i].append(seq)
                        else:
                            candidates.append(seq)
                live[i] = sorted(candidates, key=score, reverse=True)[:params.beam_width]
        results = []
        for group, finished in zip(live, done):
            for seq in group:
                seq.finish_reason = seq.finish_reason or "length"
            best = sorted(finished + group, key=score, reverse=True)[:params.beam_width]
            if self._tokenizer is not None:
                for seq in best:
                    keep_eos = params.include_stop_str_in_output or seq.finish_reason != "stop"
                    seq.text = self._tokenizer.decode(
                        seq.tokens if keep_eos else seq.tokens[:-1])
            results.append(BeamSearchOutput(best))
        return results

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a
        list of them, rendered with the model's chat template (or `chat_template`)."""
        self._generator()
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self._render_chat(c, chat_template, add_generation_prompt,
                                     continue_final_message, chat_template_kwargs or {})
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _render_chat(self, conversation, chat_template, add_generation_prompt,
                     continue_final_message, kwargs) -> dict:
        from jinja2 import TemplateError

        tokenizer = self._tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given)")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise TypeError("a conversation must be a non-empty list of messages")
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message:
                raise TypeError(f"a message must be a dict with 'role' and 'content', got "
                                f"{message!r}")
            if message["role"] not in _CHAT_ROLES:
                raise ValueError(f"unknown role {message['role']!r} in a chat message; "
                                 f"known roles: {', '.join(_CHAT_ROLES)}")
        try:
            text = tokenizer.hf.apply_chat_template(
                list(conversation), chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **kwargs)
        except (TemplateError, ValueError) as e:
            raise ValueError(f"the chat template rejected the conversation: {e}") from e
        # The template already wrote any BOS token; tokenizing must not add another.
        return {"prompt": text,
                "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def _run(self, num_requests: int, use_tqdm: bool) -> None:
        bar = tqdm(total=num_requests, desc="Processed requests", dynamic_ncols=True,
                   disable=not use_tqdm)
        start = time.perf_counter()
        num_input = num_output = 0
        with bar:
            while self.engine.has_unfinished:
                finished = self.engine.step()
                if finished and use_tqdm:
                    elapsed = time.perf_counter() - start
                    num_input += sum(r.num_prompt_tokens for r in finished)
                    num_output += sum(r.num_output_tokens for r in finished)
                    bar.set_postfix_str(f"est. speed input: {num_input / elapsed:.2f} toks/s, "
                                        f"output: {num_output / elapsed:.2f} toks/s",
                                        refresh=False)
                    bar.update(len(finished))
