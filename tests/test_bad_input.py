"""Every bad input gets an error naming the problem, and the same LLM serves the next
request afterwards with all KV blocks free."""

import json
import shutil

import pytest
from conftest import assert_all_blocks_free, make_tiny_model, tiny_llm

from kiln import LLM, SamplingParams

OK = {"prompt_token_ids": [1, 2, 3]}
GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return tiny_llm(tiny_llama[0], max_model_len=64)


@pytest.fixture(scope="module")
def expected(llm):
    return llm.generate(OK, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must be at least 1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias keys"),
    ({"logit_bias": {3: float("inf")}}, "logit_bias values"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": ["ok", " "]}, "bad_words"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
])
def test_impossible_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompts, error, message", [
    (42, TypeError, "prompts must be"),
    ([42], TypeError, "a prompt must be a string"),
    ([None], TypeError, "a prompt must be a string"),
    ([{"text": "hi"}], ValueError, "needs 'prompt' or 'prompt_token_ids'"),
    ([{"prompt_token_ids": "1 2 3"}], TypeError, "prompt_token_ids must be a list"),
    ([{"prompt_token_ids": []}], ValueError, "prompt is empty"),
    ([OK, {"prompt_token_ids": [1, 256]}], ValueError, r"outside the vocabulary \[0, 256\)"),
    ([{"prompt_token_ids": [1, -1]}], ValueError, "outside the vocabulary"),
    ([{"prompt_token_ids": [1] * 65}], ValueError, "65 tokens, longer than max_model_len=64"),
    (["text needs a tokenizer"], ValueError, "need a tokenizer"),
])
def test_bad_prompts_leave_the_engine_serving(llm, expected, prompts, error, message):
    with pytest.raises(error, match=message):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_all_blocks_free(llm)
    assert not llm.engine.has_unfinished
    assert llm.generate(OK, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("params, error, message", [
    ([GREEDY, GREEDY], ValueError, "got 2 sampling params for 1 prompts"),
    ({"temperature": 0}, TypeError, "sampling_params must be SamplingParams"),
    ([None], TypeError, "every entry of sampling_params"),
    (SamplingParams(logit_bias={256: 1.0}), ValueError, r"logit_bias has token ids \[256\]"),
    (SamplingParams(allowed_token_ids=[3, 999]), ValueError, "allowed_token_ids has token"),
    (SamplingParams(bad_words=["no"]), ValueError, "bad_words need a tokenizer"),
])
def test_bad_sampling_params_argument(llm, expected, params, error, message):
    with pytest.raises(error, match=message):
        llm.generate([OK], params, use_tqdm=False)
    assert llm.generate(OK, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_unknown_argument_suggests_the_closest_name(tiny_llama):
    with pytest.raises(TypeError, match="did you mean 'max_model_len'"):
        LLM(str(tiny_llama[0]), max_modle_len=32)


def test_later_features_are_refused_by_name(tiny_llama):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is not supported yet"):
        LLM(str(tiny_llama[0]), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="quantization='fp8' is not supported yet"):
        LLM(str(tiny_llama[0]), quantization="fp8")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_model_len": 1000}, "max_model_len=1000 is above what the model supports "
                              r"\(max_position_embeddings=512\)"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"tokenizer_mode": "mistral"}, "tokenizer_mode"),
    ({"block_size": 0}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"kv_cache_memory": 1000}, "cannot hold one request"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
])
def test_bad_engine_arguments(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_llama[0]), skip_tokenizer_init=True, **kwargs)


def test_missing_model_path(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match="no config.json"):
        LLM(str(tmp_path))


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_config(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama[0], tmp_path / "m")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        LLM(str(folder), skip_tokenizer_init=True)


def test_a_rejected_model_leaves_no_import_running(tiny_llama, tmp_path):
    """The compiled path imports Inductor in a thread beside the model load; when the load
    fails, the error must not leave that thread running: its imports add loggers, and code
    walking logging's registry meanwhile raised "dictionary changed size during iteration".
    In a fresh process, where the thread is still importing when the config is rejected."""
    import subprocess
    import sys

    folder = copy_model(tiny_llama[0], tmp_path / "m")
    (folder / "config.json").write_text("{")
    script = (
        "import sys, threading\n"
        "from kiln import LLM\n"
        "try:\n"
        "    LLM(sys.argv[1], skip_tokenizer_init=True)\n"
        "except ValueError as e:\n"
        "    print('rejected:', e)\n"
        "print('running:', [t.name for t in threading.enumerate() if t.name.startswith('kiln')])\n")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rejected: cannot read" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "running: []"


def test_unsupported_architecture_lists_the_supported_ones(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*not supported.*LlamaForCausalLM"):
        LLM(str(folder), skip_tokenizer_init=True)


def test_truncated_safetensors(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama[0], tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(OSError, match="cannot read weights file .*model.safetensors"):
        LLM(str(folder), skip_tokenizer_init=True)


def test_garbage_safetensors(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama[0], tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(OSError, match="cannot read weights file"):
        LLM(str(folder), skip_tokenizer_init=True)


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama[0], tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.self_attn.k_proj.weight"):
        LLM(str(folder), skip_tokenizer_init=True)


def test_unexpected_tensor_is_named(tiny_llama, tmp_path):
    import torch

    folder = copy_model(tiny_llama[0], tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="does not use: model.extra.weight"):
        LLM(str(folder), skip_tokenizer_init=True)


def test_wrong_shape_is_named(tmp_path):
    make_tiny_model(tmp_path / "a", intermediate_size=96)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight: "
                                         r"checkpoint tensor has shape \((96, 64|64, 96)\), "
                                         r"the model expects \((128, 64|64, 128)\)"):
        LLM(str(tmp_path / "a"), skip_tokenizer_init=True)


def test_sharded_checkpoint_loads_and_missing_shard_is_named(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama[0]))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    reference = tiny_llm(tiny_llama[0]).generate(OK, GREEDY, use_tqdm=False)
    sharded = tiny_llm(tmp_path / "sharded").generate(OK, GREEDY, use_tqdm=False)
    assert sharded[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
    shards[0].unlink()
    with pytest.raises(OSError, match=f"missing: {shards[0].name}"):
        tiny_llm(tmp_path / "sharded")


def test_weights_header_pointing_past_the_data_is_named(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama[0], tmp_path / "m")
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    name = next(n for n in header if n != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + len(raw), end + len(raw)]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    with pytest.raises(OSError, match="cannot read weights file .*model.safetensors"):
        LLM(str(folder), skip_tokenizer_init=True)
