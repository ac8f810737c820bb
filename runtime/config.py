"""The engine's configuration tree: one dataclass per concern, each checked when built."""

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compiler.config import CompilationConfig
from ..graphs.buckets import plan_sizes
from ..models.cpu_packed_linear import cpu_has_native_bf16

logger = logging.getLogger("kiln")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype,
                  device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in _DTYPES):
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        chosen, why = checkpoint_dtype, "the checkpoint's dtype"
    elif checkpoint_dtype == torch.bfloat16 and cpu_has_native_bf16():
        chosen, why = torch.bfloat16, "the checkpoint's dtype, native on this CPU"
    elif checkpoint_dtype == torch.float32:
        chosen, why = torch.float32, "the checkpoint's dtype"
    else:
        chosen, why = torch.float32, f"this CPU has no native {checkpoint_dtype} arithmetic"
    logger.info("dtype=auto: using %s (%s)", chosen, why)
    return chosen


@dataclass
class ModelConfig:
    path: str  # a local folder holding config.json and safetensors weights
    arch_config: object
    tokenizer: str
    tokenizer_mode: str
    skip_tokenizer_init: bool
    dtype: torch.dtype
    max_model_len: int
    seed: int
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', "
                             f"got {self.load_format!r}")
        if self.tokenizer_mode not in ("auto", "slow"):
            raise ValueError(
                f"tokenizer_mode must be 'auto' or 'slow', got {self.tokenizer_mode!r}")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def vocab_size(self) -> int:
        return self.arch_config.vocab_size


def resolve_max_model_len(requested: int | None, arch_config) -> int:
    supported = arch_config.max_position_embeddings
    if requested is None:
        return supported
    if not isinstance(requested, int) or requested < 1:
        raise ValueError(f"max_model_len must be a positive int, got {requested!r}")
    if requested > supported:
        raise ValueError(f"max_model_len={requested} is above what the model supports "
                         f"(max_position_embeddings={supported})")
    return requested


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; CPU default below, CUDA sizes from free memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.kv_cache_memory is not None and (
                not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory <= 0):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, "
                             f"got {self.kv_cache_memory!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    compilation: CompilationConfig
    device: torch.device
    enforce_eager: bool
    compile_cache_dir: Path | None  # None: compile without a persistent cache
    kernel_dir: Path  # where kiln's own C++ kernels are built (models/cpu_attention.py)

    def __post_init__(self) -> None:
        sizes, budget = self.compilation.sizes, self.scheduler.max_num_batched_tokens
        if sizes and not self.enforce_eager and sizes[-1] < budget:
            raise ValueError(f"compilation sizes {sizes} stop below max_num_batched_tokens="
                             f"{budget}: a step of that many tokens would have no compiled "
                             f"size; add {budget} or lower max_num_batched_tokens")

    def compile_sizes(self) -> list[int]:
        sched = self.scheduler
        return self.compilation.sizes or plan_sizes(sched.max_num_seqs,
                                                     sched.max_num_batched_tokens)

    def compile_cache_salt(self) -> str:
        """Everything besides a piece's own graph and shapes that changes generated code."""
        try:
            version = importlib.metadata.version("kiln")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        model = self.model.arch_config.to_dict()
        return (f"{sorted(model.items())}|{self.model.dtype}|{self.device.type}|tp=1|"
                f"torch {torch.__version__}|kiln {version}")
