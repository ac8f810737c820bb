"""Read a Hugging Face checkpoint folder: its config, and its safetensors weights streamed
one tensor at a time into a model built without initialisation."""

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import model_class
from .huge_pages import gather_weights


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Construct the model with uninitialised parameters on `device` (no init pass); on the
    CPU they are then laid out in one buffer on huge pages before anything is written to
    them (models/huge_pages.py)."""
    cls = model_class(config.architectures[0])
    with torch.device(device), _default_dtype(dtype):
        model = cls(config).eval()
    gather_weights(model)
    return model


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights for speed measurements without checkpoint files (vLLM's
    load_format="dummy"): small values, so activations stay finite in any dtype."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for param in model.parameters():
        param.uniform_(-0.02, 0.02, generator=generator)


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read {index}: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise OSError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise OSError(f"no *.safetensors weights in model folder {folder}")
    return files


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """Checkpoint tensor name -> (kiln parameter name, shard id or None)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules:
            fused, shard = model.packed_modules[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


def _expected_tensors(model: nn.Module, params: dict) -> set[tuple[str, object]]:
    shards_of: dict[str, list] = {}
    for fused, shard in model.packed_modules.values():
        shards_of.setdefault(fused, []).append(shard)
    expected = set()
    for name in params:
        module = name.split(".")[-2] if "." in name else ""
        for shard in shards_of.get(module, [None]):
            expected.add((name, shard))
    return expected


def _checkpoint_name(model: nn.Module, name: str, shard) -> str:
    if shard is None:
        return name
    for ckpt, (fused, s) in model.packed_modules.items():
        if s == shard and f".{fused}." in f".{name}":
            return name.replace(fused, ckpt)
    return name


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy every checkpoint tensor into its parameter. Missing, unexpected and misshapen
    tensors are errors that name them; corrupt files are errors that name the file."""
    params = dict(model.named_parameters())
    expected = _expected_tensors(model, params)
    loaded, unexpected = set(), []
    tied = getattr(model, "tie_word_embeddings", False)
    skipped = ("rotary_emb.inv_freq", *getattr(model, "skipped_tensors", ()))
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(skipped) or (tied and name == "lm_head.weight"):
                        continue
                    target, shard = _target(model, name)
                    if target not in params:
                        unexpected.append(name)
                        continue
                    param = params[target]
                    try:
                        param.weight_loader(param, f.get_tensor(name), shard)
                    except ValueError as e:
                        raise ValueError(f"{path.name}: tensor {name}: {e}") from None
                    loaded.add((target, shard))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise OSError(f"cannot read weights file {path}: {e}") from e
    if unexpected:
        raise ValueError(f"checkpoint in {folder} has tensors kiln's "
                         f"{type(model).__name__} does not use: {', '.join(unexpected[:20])}")
    missing = sorted(_checkpoint_name(model, n, s) for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {folder} is missing tensors: {', '.join(missing[:20])}"
                         + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
