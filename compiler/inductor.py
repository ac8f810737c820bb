"""The one place kiln touches torch's private compiler APIs.

kiln compiles graph pieces itself (so identical decoder layers share one compiled artifact and
artifacts can be saved under kiln's own cache keys); torch offers that through
`torch._inductor.standalone_compile` and `CompiledArtifact`, which have no public alias yet."""

import os
from pathlib import Path

import torch


def compile_piece(gm: torch.fx.GraphModule, example_inputs: list, options: dict):
    """Compile one graph piece with Inductor for the exact shapes of `example_inputs`."""
    return torch._inductor.standalone_compile(
        gm, example_inputs, dynamic_shapes="from_example_inputs", options=dict(options))


def save_artifact(artifact, path: Path) -> None:
    artifact.save(path=str(path), format="binary")


def load_artifact(path: Path):
    return torch._inductor.CompiledArtifact.load(path=str(path), format="binary")


def configure_dynamo(limit: int) -> None:
    """Settings for tracing one decoder layer with symbolic sizes.

    Duck sizing would give the token count the same symbol as any weight dimension of equal
    value (64 tokens and a head_dim of 64), guarding on that equality and forcing a new
    trace for every other count. Dynamo also gives up on a function after a few distinct
    guards; several engines may live in one process (tests)."""
    torch.fx.experimental._config.use_duck_shape = False
    config = torch._dynamo.config
    if getattr(config, "recompile_limit", limit) < limit:
        config.recompile_limit = limit
    if getattr(config, "cache_size_limit", limit) < limit:
        config.cache_size_limit = limit


def keep_builds_in(path: Path) -> None:
    """Keep Inductor's and Triton's build caches (compiled C++ and GPU kernels) under kiln's
    cache instead of the temporary directory: a saved artifact holds generated source, and
    loading it without those builds compiles every kernel again (65 s instead of 15 s for
    SmolLM2 here). A cache directory the user chose is left alone."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
