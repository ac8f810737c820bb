"""kiln reads config.json and tokenizer.json itself (transformers' imports cost seconds at
start); these tests hold its reading to what transformers makes of the same files."""

import json
import random

import pytest

from kiln.models.config import parse_config, read_config
from kiln.runtime.tokenizer import Tokenizer


def expected(config, field: str):
    """transformers' value; Qwen2 has no head_dim attribute (its modeling derives it)."""
    value = getattr(config, field, None)
    if field == "head_dim" and value is None:
        return config.hidden_size // config.num_attention_heads
    return value


def expected_rope(config) -> dict:
    """transformers keeps a legacy "type" key next to "rope_type"; kiln reads "rope_type"."""
    return {k: v for k, v in config.rope_parameters.items() if k != "type"}


FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
          "rms_norm_eps", "tie_word_embeddings", "sliding_window", "bos_token_id",
          "eos_token_id"]

MINIMAL = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-gqa-legacy-rope": ("LlamaForCausalLM", {
        "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen2-sliding": ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64,
                                           "max_window_layers": 20}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("name", list(MINIMAL))
def test_defaults_match_transformers(tmp_path, name):
    from transformers import AutoConfig

    arch, extra = MINIMAL[name]
    raw = {"architectures": [arch], "model_type": name.split("-")[0], **extra}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours, theirs = read_config(tmp_path), AutoConfig.from_pretrained(tmp_path)
    for field in FIELDS:
        assert getattr(ours, field) == expected(theirs, field), field
    layer_types = getattr(theirs, "layer_types", None)
    assert ours.layer_types == (list(layer_types) if layer_types is not None else None)
    assert ours.rope_parameters == expected_rope(theirs)


def test_tiny_checkpoints_match_transformers(tiny_models):
    from transformers import AutoConfig

    for folder, _ in tiny_models.values():
        ours, theirs = read_config(folder), AutoConfig.from_pretrained(folder)
        for field in FIELDS:
            assert getattr(ours, field) == expected(theirs, field), (folder, field)
        assert ours.rope_parameters == expected_rope(theirs)


@pytest.mark.parametrize("raw, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "not supported"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "gpt2"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": "big"},
     "hidden_size"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "num_key_value_heads": 5}, "num_key_value_heads"),
])
def test_bad_configs_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


TEXTS = ["Hello, world!", "  leading spaces and trailing  ", "naïve café — 東京 🚀",
         "<|im_start|>user\nHi<|im_end|>", "def f(x):\n\treturn x ** 2\n", "a" * 300]


def test_smollm2_tokenizer_matches_transformers(smollm2_folder):
    ours = Tokenizer(str(smollm2_folder))
    assert ours.fast is not None  # the fast path is the one under test
    theirs = ours.hf
    assert ours.eos_token_id == theirs.eos_token_id
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, special) == theirs.encode(text, add_special_tokens=special)
    rng = random.Random(0)
    samples = [rng.choices(range(theirs.vocab_size), k=rng.randint(1, 40)) for _ in range(50)]
    samples += [theirs.encode(t) for t in TEXTS] + [[0, 1, 2, 3, 4]]
    for ids in samples:
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_tokenizer_overrides_fall_back_to_transformers(smollm2_folder, tmp_path):
    """transformers rewrites the post-processor for add_bos_token; kiln then defers to it."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = (smollm2_folder / name).read_text()
        if name == "tokenizer_config.json":
            data = json.dumps({**json.loads(data), "add_bos_token": True})
        (tmp_path / name).write_text(data)
    tok = Tokenizer(str(tmp_path))
    assert tok.fast is None
    assert tok.encode("Hi") == tok.hf.encode("Hi")
