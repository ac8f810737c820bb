"""End to end on the real embedded SmolLM2-135M-Instruct."""

import pytest
import torch

from kiln import SamplingParams
from kiln.models import attention_context
from kiln.resolve import DEFAULT_MODEL, embedded_model, resolve_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "A haiku about autumn:\n",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
]


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(embedded_model()),
                                                dtype=torch.float32).eval()


def test_greedy_batch_matches_transformers(smollm2, hf_smollm2):
    tok = smollm2.get_tokenizer()
    outs = smollm2.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24),
                            use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf_smollm2.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:]
        assert out.outputs[0].token_ids == ref.tolist(), prompt
        assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    assert smollm2.engine.block_manager.num_free_blocks == smollm2.engine.block_manager.num_blocks


def test_prompt_logits_match_transformers(smollm2, hf_smollm2):
    engine = smollm2.engine
    ids = smollm2.get_tokenizer().encode(PROMPTS[2])
    engine.add_request(None, ids, SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    inputs = engine.runner.prepare_inputs(batch)
    with torch.no_grad():
        with attention_context(inputs.meta):
            hidden = engine.runner.model(inputs.input_ids, inputs.positions)
        logits = engine.runner.model.compute_logits(hidden)
        ref = hf_smollm2(torch.tensor([ids])).logits[0]
    engine.abort_all()
    assert (logits - ref).abs().max().item() <= 1e-3


def test_chat_answers_paris(smollm2):
    out = smollm2.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32),
                       use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.stop_reason is None  # stopped at <|im_end|>


def test_batched_chat_in_order_and_bad_roles(smollm2):
    conversations = [QUESTION, [{"role": "user", "content": "What is 2 + 2?"}]]
    outs = smollm2.chat(conversations, SamplingParams(temperature=0, max_tokens=32),
                        use_tqdm=False)
    assert len(outs) == 2 and "Paris" in outs[0].outputs[0].text
    assert "4" in outs[1].outputs[0].text
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        smollm2.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(TypeError, match="a conversation must be a non-empty list"):
        smollm2.chat(["hi"])
    with pytest.raises(TypeError, match="a message must be a dict"):
        smollm2.chat([[{"role": "user", "content": "hi"}, "hi"]])


def test_stop_string_cuts_text_before_it(smollm2):
    free = smollm2.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24),
                            use_tqdm=False)[0].outputs[0].text
    assert "." in free
    out = smollm2.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=["."]),
                           use_tqdm=False)[0].outputs[0]
    assert out.text == free[: free.index(".")]
    assert out.finish_reason == "stop" and out.stop_reason == "."


def test_include_stop_str_and_special_tokens(smollm2):
    params = SamplingParams(temperature=0, max_tokens=24, stop=".",
                            include_stop_str_in_output=True)
    out = smollm2.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert out.text.endswith(".") and out.text.count(".") == 1
    raw = smollm2.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32,
                                                skip_special_tokens=False),
                       use_tqdm=False)[0].outputs[0]
    assert raw.text.endswith("<|im_end|>")


def test_seeded_sampling_is_reproducible(smollm2):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=0)
    a = smollm2.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0].text
    b = smollm2.generate(PROMPTS[:3], params, use_tqdm=False)[2].outputs[0].text
    assert a == b


def test_hub_id_resolves_to_embedded_copy_offline():
    assert resolve_model(DEFAULT_MODEL) == embedded_model()


def test_unknown_hub_id_offline_names_it():
    with pytest.raises(OSError, match="cannot fetch model 'nobody/no-such-model'"):
        resolve_model("nobody/no-such-model")


def test_compiled_greedy_equals_eager(smollm2):
    """The compiled path (three buckets; one-token steps use the single-token pass) gives
    the eager path's tokens, which the test above ties to transformers."""
    from kiln import LLM

    compiled = LLM(compilation_config={"sizes": [1, 8, 64]}, max_num_seqs=8,
                   max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=24)
    eager_outs = smollm2.generate(PROMPTS, params, use_tqdm=False)
    single = compiled.generate(PROMPTS[0], params, use_tqdm=False)
    batched = compiled.generate(PROMPTS, params, use_tqdm=False)
    assert single[0].outputs[0].token_ids == eager_outs[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in batched] == \
        [o.outputs[0].token_ids for o in eager_outs]


@pytest.mark.slow
def test_bad_words_are_never_generated(smollm2):
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0, max_tokens=12)
    assert "Paris" in smollm2.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].text
    banned = SamplingParams(temperature=0, max_tokens=12, bad_words=["Paris"])
    out = smollm2.generate(prompt, banned, use_tqdm=False)[0].outputs[0]
    assert "Paris" not in out.text and out.text.strip()


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


@pytest.mark.slow
def test_structured_output_json_schema_regex_and_choice(smollm2):
    import json
    import re

    from kiln import StructuredOutputsParams

    prompt = "Describe a person as JSON with a name and an age:"
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=PERSON))
              for s in range(20)]
    outs = smollm2.generate([prompt] * 20, params, use_tqdm=False)
    for out in outs:
        value = json.loads(out.outputs[0].text)
        assert set(value) == {"name", "age"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    phone = SamplingParams(temperature=0.8, seed=1, max_tokens=20,
                           structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"))
    text = smollm2.generate("My phone number is", phone, use_tqdm=False)[0].outputs[0].text
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)
    choice = SamplingParams(temperature=0, max_tokens=10,
                            structured_outputs={"choice": ["Paris", "London", "Rome"]})
    text = smollm2.generate("The capital of France is", choice, use_tqdm=False)[0].outputs[0].text
    assert text == "Paris"


@pytest.mark.slow
def test_invalid_schema_is_named_and_the_engine_keeps_serving(smollm2):
    from kiln import StructuredOutputsParams

    bad = SamplingParams(structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}))
    with pytest.raises(ValueError, match="invalid structured output"):
        smollm2.generate("Hi", bad, use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    out = smollm2.generate("The capital of France is", SamplingParams(temperature=0,
                                                                     max_tokens=4),
                           use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
