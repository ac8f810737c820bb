"""get_metrics(): vLLM-shaped metrics that move by exactly what the engine did, and the same
values in prometheus_client's registry."""

from conftest import random_prompts, tiny_llm, token_prompts

from kiln import SamplingParams
from kiln.runtime.metrics import Counter, Gauge, Histogram


def values(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        key = m.name + "".join(f"[{k}={v}]" for k, v in sorted(m.labels.items()))
        out[key] = m
    return out


def test_metrics_move_by_exactly_what_was_generated(tiny_llama):
    llm = tiny_llm(tiny_llama[0])
    prompts = random_prompts(3, seed=50)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    before = values(llm)
    assert isinstance(before["kiln:generation_tokens"], Counter)
    assert isinstance(before["kiln:num_requests_running"], Gauge)
    assert isinstance(before["kiln:time_to_first_token_seconds"], Histogram)
    llm.generate(token_prompts(prompts), params, use_tqdm=False)
    after = values(llm)

    def moved(name):
        return after[name].value - before[name].value

    assert moved("kiln:generation_tokens") == 15
    assert moved("kiln:prompt_tokens") == sum(len(p) for p in prompts)
    assert after["kiln:request_success[finished_reason=length]"].value == 3
    ttft, itl, e2e = (after[f"kiln:{n}"] for n in (
        "time_to_first_token_seconds", "inter_token_latency_seconds",
        "e2e_request_latency_seconds"))
    assert (ttft.count, itl.count, e2e.count) == (3, 12, 3)
    assert list(ttft.buckets)[-1] == "+Inf" and ttft.buckets["+Inf"] == 3
    assert all(a <= b for a, b in zip(list(itl.buckets.values()), list(itl.buckets.values())[1:]))
    assert e2e.sum >= ttft.sum > 0
    assert after["kiln:num_requests_running"].value == 0
    assert after["kiln:num_requests_waiting"].value == 0
    # The prefix cache is asked once per admitted request, for its whole prompt.
    assert moved("kiln:prefix_cache_queries") == sum(len(p) for p in prompts)
    llm.generate(token_prompts(prompts), params, use_tqdm=False)
    again = values(llm)
    assert again["kiln:prefix_cache_hits"].value > after["kiln:prefix_cache_hits"].value
    assert again["kiln:generation_tokens"].value - after["kiln:generation_tokens"].value == 15


def test_metrics_reach_prometheus(tiny_llama):
    from prometheus_client import REGISTRY, generate_latest

    llm = tiny_llm(tiny_llama[0])
    llm.generate(token_prompts(random_prompts(2, seed=51)),
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    text = generate_latest(REGISTRY).decode()
    lines = [line for line in text.splitlines()
             if line.startswith("kiln:generation_tokens_total{")]
    assert any(line.endswith(" 8.0") for line in lines)
    assert "kiln:time_to_first_token_seconds_bucket{" in text
