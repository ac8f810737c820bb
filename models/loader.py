"""Read a Hugging Face checkpoint folder: its config, and its safetensors weights streamed
one tensor at a time into a model built without initialisation."""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
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


# safetensors' dtype names (its format's specification) -> torch's.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _header(f, size: int) -> tuple[list, int]:
    """The tensors a safetensors file holds, as (data start, name, dtype, shape, bytes)
    sorted by where they lie, and where its data begins; OSError for anything the format
    does not allow."""
    head = f.read(8)
    if len(head) < 8:
        raise OSError("shorter than a safetensors header")
    length = int.from_bytes(head, "little")
    if length > size - 8:
        raise OSError(f"its header claims {length} bytes, more than the file holds")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError) as e:
        raise OSError(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise OSError("its header is not a JSON object")
    data_start, data_len = 8 + length, size - 8 - length
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise OSError(f"tensor {name}: its header entry is malformed: {entry}") from None
        nbytes = dtype.itemsize * torch.Size(shape).numel() if min(shape, default=0) >= 0 else -1
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise OSError(f"tensor {name}: bytes [{begin}, {end}) do not hold shape "
                          f"{shape} of {entry['dtype']} within the file's {data_len}")
        tensors.append((begin, name, dtype, shape, nbytes))
    return sorted(tensors), data_start


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, in the order they lie in it, read into one reused
    buffer: a tensor is valid until the next one is asked for.

    read() into a buffer already faulted in, rather than copying out of safetensors' memory
    map, whose first touch of each page of the file faults: loading SmolLM2's 538 MB took
    0.71 s of a 3 s warm start that way, 0.38-0.44 s this way (the reads 0.14-0.17 s of
    it; the Zen 3 EPYC here)."""
    with path.open("rb", buffering=0) as f:
        tensors, data_start = _header(f, path.stat().st_size)
        buffer = torch.empty(max((t[4] for t in tensors), default=0), dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        for begin, name, dtype, shape, nbytes in tensors:
            f.seek(data_start + begin)
            done = 0
            while done < nbytes:
                got = f.readinto(view[done:nbytes])
                if not got:
                    raise OSError(f"tensor {name}: the file ends inside its data")
                done += got
            yield name, buffer[:nbytes].view(dtype).view(shape)


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
            for name, tensor in read_tensors(path):
                if name.endswith(skipped) or (tied and name == "lm_head.weight"):
                    continue
                target, shard = _target(model, name)
                if target not in params:
                    unexpected.append(name)
                    continue
                param = params[target]
                try:
                    param.weight_loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"{path.name}: tensor {name}: {e}") from None
                loaded.add((target, shard))
        except OSError as e:
            raise OSError(f"cannot read weights file {path}: {e}") from e
    if unexpected:
        raise ValueError(f"checkpoint in {folder} has tensors kiln's "
                         f"{type(model).__name__} does not use: {', '.join(unexpected[:20])}")
    missing = sorted(_checkpoint_name(model, n, s) for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {folder} is missing tensors: {', '.join(missing[:20])}"
                         + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
