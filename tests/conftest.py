"""Shared fixtures: tiny random models saved as Hugging Face folders (the same folder feeds
kiln and the transformers reference), and the real embedded SmolLM2."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the network
# One kernel build directory for the run: tests compile into many small compile caches, and
# building every kernel again for each of them would cost minutes. Tests of kiln's own
# choice of build directory run in subprocesses without this setting.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-test-builds-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest
import torch

from kiln import LLM

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)

ARCHS = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
}


def make_tiny_model(path, arch: str = "llama", seed: int = 0, **overrides):
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, extra = ARCHS[arch]
    config = getattr(transformers, config_class)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (folder, transformers model)"""
    out = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(arch)
        out[arch] = (folder, make_tiny_model(folder, arch))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


def random_prompts(num: int, vocab: int = 256, seed: int = 0, min_len: int = 3,
                   max_len: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (num,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def scheduling_workload(hf, seed: int, max_new_tokens: int, max_len: int = 60):
    """20 prompts of mixed lengths plus 4 that extend one 40-token stem (so prefix caching has
    something to share), and transformers' greedy continuation of each."""
    prompts = random_prompts(20, seed=seed, max_len=max_len)
    stem = random_prompts(1, seed=seed + 1, min_len=40, max_len=40)[0]
    prompts += [stem + tail for tail in random_prompts(4, seed=seed + 2, min_len=1, max_len=9)]
    return prompts, [hf_greedy(hf, p, max_new_tokens) for p in prompts]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding with transformers' forward, with no EOS or other logits processing
    (generate() would apply the checkpoint's generation config)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def tiny_llm(folder, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 16 << 20)
    return LLM(str(folder), skip_tokenizer_init=True, enforce_eager=True, **kwargs)


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="session")
def smollm2_folder():
    """The embedded SmolLM2 converted into a checkpoint folder (once per cache)."""
    from kiln.resolve import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (converted once into the kiln cache)."""
    return LLM(enforce_eager=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
