"""Every architecture against transformers on the same random weights."""

import sys

import pytest
import torch
from conftest import (
    ARCHS,
    assert_all_blocks_free,
    hf_greedy,
    random_prompts,
    tiny_llm,
    token_prompts,
)

from kiln import SamplingParams
from kiln.models import attention_context
from kiln.models.cpu_packed_linear import can_pack, linear_with_packed_copy, pack_linear_weights

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_match_transformers(tiny_models, arch):
    folder, hf = tiny_models[arch]
    prompts = random_prompts(8, seed=1, max_len=30)
    llm = tiny_llm(folder)
    outs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
        assert out.outputs[0].finish_reason == "length"
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_prompt_logits_match_transformers(tiny_models, arch):
    """One mixed prefill batch through the engine's scheduler and runner; logits of every
    prompt position compared with transformers."""
    folder, hf = tiny_models[arch]
    prompts = random_prompts(4, seed=2, min_len=5, max_len=40)
    llm = tiny_llm(folder)
    engine = llm.engine
    for p in prompts:
        engine.add_request(None, p, GREEDY)
    batch = engine.scheduler.schedule()
    inputs = engine.runner.prepare_inputs(batch)
    with attention_context(inputs.meta):
        hidden = engine.runner.model(inputs.input_ids, inputs.positions)
    model = engine.runner.model
    logits = model.compute_logits(hidden)
    start = 0
    for req, n in zip(batch.requests, batch.num_scheduled_tokens):
        ref = hf(torch.tensor([req.token_ids])).logits[0]
        assert (logits[start:start + n] - ref).abs().max().item() <= 1e-3
        start += n
    if can_pack(hidden.device, hidden.dtype):  # as a compiled float32 model's are
        assert pack_linear_weights(model) > 0
        assert linear_with_packed_copy(hidden, model.logits_weight) is not None
        torch.testing.assert_close(model.compute_logits(hidden), logits, rtol=1e-4, atol=1e-4)
    engine.abort_all()
    assert_all_blocks_free(llm)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address`."""
    mapping = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            mapping = low <= address < high
        elif mapping and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


@pytest.mark.skipif(sys.platform != "linux", reason="madvise huge pages are Linux's")
def test_large_cpu_buffers_ask_for_huge_pages():
    from kiln.models.huge_pages import advise_huge_pages

    big = torch.empty(8 << 20, dtype=torch.uint8)
    covered = advise_huge_pages(big)
    assert 6 << 20 <= covered <= 8 << 20  # the whole 2 MiB pages inside it
    start = -(-big.data_ptr() // (2 << 20)) * (2 << 20)
    assert "hg" in _vm_flags(start)  # "huge pages advised" on the mapping
    assert advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8)) == 0
    assert advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8, device="meta")) == 0


def _resident(start: int, nbytes: int) -> tuple[int, int]:
    """(pages in memory, pages) of the 4 KiB pages that [start, start + nbytes) touches."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    first = start // 4096 * 4096
    pages = -(-(start + nbytes - first) // 4096)
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(first, start + nbytes - first, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw), pages


@pytest.mark.skipif(sys.platform != "linux", reason="madvise is Linux's")
def test_populate_faults_in_memory_and_keeps_what_it_holds():
    import mmap

    from kiln.models.huge_pages import populate

    region = mmap.mmap(-1, 16 << 20)  # fresh anonymous memory: no page in memory yet
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    start = tensor.data_ptr()
    assert _resident(start, 16 << 20)[0] == 0
    tensor[5 << 20] = 7  # a page written before
    first, nbytes = start + 100, 12 << 20  # not page-aligned: split among torch's threads
    assert populate(first, nbytes) == nbytes
    resident, pages = _resident(first, nbytes)
    assert resident == pages == 3073
    assert _resident(start + (15 << 20), 1 << 20)[0] == 0  # outside the range: untouched
    assert int(tensor[5 << 20]) == 7 and int(tensor.sum()) == 7
    assert populate(start, 0) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="madvise huge pages are Linux's")
def test_weights_and_kv_cache_are_built_on_huge_pages(smollm2):
    model = smollm2.engine.runner.model
    embedding = model.model.embed_tokens.weight  # the largest weight
    assert "hg" in _vm_flags(-(-embedding.data_ptr() // (2 << 20)) * (2 << 20))
    runner = smollm2.engine.runner
    for layer in model.attention_layers():
        cache = layer.kv_cache
        assert "hg" in _vm_flags(-(-cache.data_ptr() // (2 << 20)) * (2 << 20))
        for sink in cache[:, runner.sink_block]:  # 12 KiB each, not a 2 MiB page apiece
            assert "nh" in _vm_flags(sink.data_ptr()) and "hg" not in _vm_flags(sink.data_ptr())


def test_weights_share_one_buffer_in_declaration_order(smollm2):
    params = list(smollm2.engine.runner.model.parameters())
    storage = params[0].untyped_storage().data_ptr()
    assert params[0].data_ptr() % (2 << 20) == 0  # huge pages cover them from the first byte
    ends = params[0].data_ptr()
    for param in params:
        assert param.untyped_storage().data_ptr() == storage
        assert param.data_ptr() % 64 == 0 and param.is_contiguous()
        assert ends <= param.data_ptr() < ends + 64  # next to the one before it
        ends = param.data_ptr() + param.numel() * param.element_size()
