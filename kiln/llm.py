"""The LLM class: vLLM's offline API over kiln's engine."""

import difflib
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .compiler.config import CompilationConfig
from .resolve import cache_dir, resolve_model
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
        **kwargs,
    ):
        _reject_unknown(kwargs, list(inspect.signature(LLM.__init__).parameters)[1:-1])
        from .models.config import read_config

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        compilation = CompilationConfig.from_user(compilation_config)
        compile_cache_dir = Path(compilation.cache_dir or cache_dir() / "compile")
        folder = resolve_model(model, revision)
        arch_config = read_config(folder)
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
        self.config = EngineConfig(
            model=ModelConfig(
                path=str(folder), arch_config=arch_config, tokenizer=str(tokenizer_folder),
                tokenizer_mode=tokenizer_mode, skip_tokenizer_init=skip_tokenizer_init,
                dtype=resolve_dtype(dtype, checkpoint_dtype, device),
                max_model_len=max_len, seed=seed, load_format=load_format,
            ),
            cache=CacheConfig(block_size, kv_cache_memory, gpu_memory_utilization,
                              enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens),
            compilation=compilation,
            device=device,
            enforce_eager=bool(enforce_eager),
            compile_cache_dir=compile_cache_dir,
        )
        self.engine = Engine(self.config)
        if not enforce_eager:
            start = time.perf_counter()
            self.engine.runner.warmup()
            logger.info("compiled in %.1f s", time.perf_counter() - start)

    def get_tokenizer(self):
        """The transformers tokenizer (None with skip_tokenizer_init=True)."""
        return None if self.engine.tokenizer is None else self.engine.tokenizer.hf

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is an empty string")
            if self.engine.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; with skip_tokenizer_init=True "
                                 "pass {'prompt_token_ids': [...]}")
            return prompt, self.engine.tokenizer.encode(prompt)
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
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string, a dict or a list of them, got "
                            f"{type(prompts).__name__}")
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

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a
        list of them, rendered with the model's chat template (or `chat_template`)."""
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

        tokenizer = self.engine.tokenizer
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
