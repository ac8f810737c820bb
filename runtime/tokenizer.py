"""Text <-> token ids for the engine.

Encoding and decoding go straight to the `tokenizers` library when the checkpoint ships a
tokenizer.json whose behaviour transformers would not change (no add_bos/add_eos override):
loading it takes a tenth of a second, where importing transformers takes seconds at every
start. The transformers tokenizer is still what `LLM.get_tokenizer()` returns and what
renders chat templates; it is loaded the first time one of those needs it."""

import json
from functools import cached_property
from pathlib import Path


class Tokenizer:
    def __init__(self, folder: str, mode: str = "auto"):
        self.folder = folder
        self.mode = mode
        self.config = self._read_config()
        self.fast = self._load_fast() if mode == "auto" else None
        hf = self.hf if self.fast is None else None  # fails early for a broken folder
        self.eos_token_id = hf.eos_token_id if hf is not None else self._fast_eos_token_id()

    def _read_config(self) -> dict:
        path = Path(self.folder) / "tokenizer_config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read {path}: {e}") from e

    def _load_fast(self):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(self.folder) / "tokenizer.json"
        if not path.is_file() or "add_bos_token" in self.config or \
                "add_eos_token" in self.config:
            return None
        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own exception type
            raise OSError(f"cannot load the tokenizer from {path}: {e}") from e
        # A tokenizer.json may carry padding or truncation settings (sentence-transformers
        # saves them); transformers' encode() applies neither unless asked, and nor does kiln.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    def _fast_eos_token_id(self) -> int | None:
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):  # an AddedToken written out in full
            eos = eos.get("content")
        return None if eos is None else self.fast.token_to_id(eos)

    @cached_property
    def hf(self):
        """The transformers tokenizer for the same folder."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder, use_fast=self.mode != "slow",
                                                 trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot load the tokenizer from {self.folder}: {e}") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.fast is None:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        return self.fast.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.fast is None:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_pair(self, first: str, second: str) -> tuple[list[int], list[int]]:
        """Token ids and segment (token type) ids of a text pair, as a cross-encoder reads
        it."""
        if self.fast is None:
            encoded = self.hf(first, second)
            ids = encoded["input_ids"]
            return ids, encoded.get("token_type_ids") or [0] * len(ids)
        encoded = self.fast.encode(first, second)
        return encoded.ids, encoded.type_ids
