"""The same checks on a GPU: kiln on CUDA against transformers on the CPU (same weights)."""

import pytest
import torch
from conftest import assert_all_blocks_free, hf_greedy, random_prompts, token_prompts

from kiln import LLM, SamplingParams

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_greedy_on_cuda_matches_transformers(tiny_models, arch):
    folder, hf = tiny_models[arch]
    llm = LLM(str(folder), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              gpu_memory_utilization=0.3)
    assert llm.engine.runner.device.type == "cuda"
    prompts = random_prompts(8, seed=21)
    outs = llm.generate(token_prompts(prompts), SamplingParams(temperature=0, max_tokens=8,
                                                               ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 8)
    assert_all_blocks_free(llm)


def test_kv_cache_sized_from_gpu_memory(tiny_llama):
    llm = LLM(str(tiny_llama[0]), skip_tokenizer_init=True, enforce_eager=True,
              gpu_memory_utilization=0.2)
    runner = llm.engine.runner
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < runner.num_blocks * runner.bytes_per_block <= 0.2 * total


@pytest.mark.parametrize("cudagraphs", [True, False])
def test_compiled_decode_on_cuda_matches_transformers(tiny_llama, tmp_path, cudagraphs):
    folder, hf = tiny_llama
    llm = LLM(str(folder), skip_tokenizer_init=True, dtype="float32",
              gpu_memory_utilization=0.3, max_num_seqs=8, max_num_batched_tokens=64,
              max_model_len=128,
              compilation_config={"sizes": [1, 2, 4, 8, 64], "cache_dir": str(tmp_path),
                                  "cudagraphs": cudagraphs})
    graphs = llm.engine.runner.graph_runner.cuda_graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8] if cudagraphs else graphs is None
    prompts = random_prompts(6, seed=22)
    outs = llm.generate(token_prompts(prompts), SamplingParams(temperature=0, max_tokens=8,
                                                               ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 8)
    # decode steps of 6 sequences ran as the graph, or as the compiled pieces, of size 8
    assert (graphs.num_replays if cudagraphs else llm.engine.runner.graph_runner.steps[
        "compiled", 8]) > 0
    assert_all_blocks_free(llm)
