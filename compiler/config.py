"""CompilationConfig: how kiln compiles a model, checked once when built."""

import difflib
from dataclasses import dataclass, field, fields, replace

MODES = ("default", "max-autotune-no-cudagraphs")
KNOWN_PASSES = ("single_token_linear_as_row_kernel", "single_token_linear_as_reduction",
                "linear_as_weight_times_input", "linear_with_packed_weights",
                "few_rows_linear_with_packed_weights")


@dataclass
class CompilationConfig:
    mode: str = "default"  # Inductor mode; cudagraphs are kiln's own, see `cudagraphs`
    sizes: list[int] | None = None  # token counts compiled; None: planned from scheduler limits
    cudagraphs: bool = True  # capture decode sizes as CUDA graphs (CUDA only)
    inductor_options: dict = field(default_factory=dict)
    cache_dir: str | None = None  # None: $KILN_CACHE_DIR/compile or ~/.cache/kiln/compile
    # kiln's FX passes; None: the device's defaults (see `for_device`)
    passes: list[str] | None = None
    # One artifact, with a symbolic token count, for every run of sizes above 1 that the
    # same passes apply to, instead of one per size; None: the device's default
    dynamic: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"compilation mode must be one of {', '.join(MODES)}; "
                             f"got {self.mode!r}")
        if self.sizes is not None:
            if not self.sizes or not all(isinstance(s, int) and s > 0 for s in self.sizes):
                raise ValueError(f"compilation sizes must be positive ints, got {self.sizes!r}")
            self.sizes = sorted(set(self.sizes))
        if not isinstance(self.inductor_options, dict):
            raise TypeError("inductor_options must be a dict of Inductor config names")
        if self.inductor_options:
            from .inductor import unknown_inductor_options

            unknown = unknown_inductor_options(self.inductor_options)
            if unknown:
                raise ValueError(f"unknown inductor_options {unknown}: not settings of "
                                 f"torch._inductor.config")
        unknown = [p for p in self.passes or () if p not in KNOWN_PASSES]
        if unknown:
            raise ValueError(f"unknown compiler passes {unknown}; known: "
                             f"{', '.join(KNOWN_PASSES)}")

    @classmethod
    def from_user(cls, value) -> "CompilationConfig":
        """Accept a CompilationConfig, a dict of its fields, or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"compilation_config must be a dict or CompilationConfig, got "
                            f"{type(value).__name__}")
        names = [f.name for f in fields(cls)]
        for key in value:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown compilation_config key {key!r}{hint}")
        return cls(**value)

    def for_device(self, device_type: str, dtype=None) -> "CompilationConfig":
        """This config with its defaults settled for the device and the model's dtype (a
        torch.dtype; None: not known). On CPU: `cpu_passes(dtype)`, and
        dynamic artifacts (3 compiles instead of 12 for the default sizes, and kernels as
        fast as per-size ones here). On CUDA: no passes (cuBLAS runs one or a few rows well
        as it is) and one artifact per size, the path measured there."""
        cpu = device_type == "cpu"
        passes = self.passes if self.passes is not None else cpu_passes(dtype) if cpu else []
        return replace(self, passes=passes,
                       dynamic=self.dynamic if self.dynamic is not None else cpu)

    def inductor_config(self) -> dict:
        options = {"max_autotune": True} if self.mode.startswith("max-autotune") else {}
        return {**options, **self.inductor_options}


def cpu_passes(dtype=None) -> list[str]:
    """kiln's passes on this CPU for a model in `dtype`. One-token pieces: kiln's row kernel
    where it was measured faster, Inductor's reduction elsewhere. The row kernel: on AVX-512
    (the Xeon and Zen 4 EPYC of earlier notes), and in bfloat16 on AVX2 (the Zen 3 EPYC
    here, batch-1 decode in one process, 8 alternating rounds: 63.5 tok/s median against
    57.2, faster in every round, same tokens; in float32 38.9 against 41.1, and once the
    kernel read each row in address order 35.3-38.7 against 35.5-39.9 in three alternating
    pairs of processes, same tokens, so not there).
    Several rows in float32: oneDNN with packed weights (models/cpu_packed_linear.py) on
    AVX-512 (the Zen 4 EPYC); on AVX2 for up to 256 rows only (the Zen 3 EPYC: 64 prompts
    x 128 new tokens ran at 189-211 tok/s against 177-189 with W·xᵀ, 3 alternating rounds
    in one process, same tokens; at 512-2048 rows MKL's x·Wᵀ ran SmolLM2's projections
    5-8 % faster than the packed product, and 64 prompts of 128 tokens prefilled in 13.3 s
    median against 14.6 with packed weights at every size, 3 alternating pairs of
    processes, two runs each). Several rows in bfloat16 on a CPU without bfloat16
    instructions: the float32 packed copy at every size, since torch's own bfloat16 product
    is the slow one there (models/cpu_packed_linear.py). In bfloat16 on CPUs with those
    instructions and on other CPUs: W·xᵀ, except in float32 on AVX-512, where MKL ran x·Wᵀ
    faster (64 prompts x 64 new tokens on the Xeon of these notes, in one process,
    alternating: 338-351 tok/s without the pass against 275-329 with it, same tokens; in
    bfloat16 oneDNN ran W·xᵀ faster, 680-893 against 627-755)."""
    import torch

    from ..models.cpu_packed_linear import can_pack

    capability = torch.backends.cpu.get_cpu_capability()
    avx512 = capability.startswith("AVX512")
    row_kernel = avx512 or (capability == "AVX2" and dtype == torch.bfloat16)
    passes = ["single_token_linear_as_row_kernel" if row_kernel
              else "single_token_linear_as_reduction"]
    packable = can_pack(torch.device("cpu"), dtype)
    if packable and (avx512 or dtype == torch.bfloat16):
        passes.append("linear_with_packed_weights")
    elif capability == "AVX2" and packable:
        passes.append("few_rows_linear_with_packed_weights")
    elif not (avx512 and dtype == torch.float32):
        passes.append("linear_as_weight_times_input")
    return passes
