"""The benchmark harness: workloads, statistics, roofline arithmetic and reports, and one real
run of the harness on a tiny model with the engines every machine has."""

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.benchmarks.harness import ENGINES, bench, bench_prompts, model_name
from kiln.benchmarks.harness import main as bench_main
from kiln.benchmarks.report import render_markdown, summarize_report, update_readme
from kiln.benchmarks.roofline import (
    decode_fraction,
    matmul_ceiling,
    model_numbers,
    throughput_fraction,
)
from kiln.benchmarks.stats import percentile, summarize, token_timing
from kiln.benchmarks.workloads import jsonl_prompts, synthetic_prompts


def test_synthetic_prompts_are_seeded_distinct_and_exact():
    a = synthetic_prompts(64, 128, 49152, seed=1)
    assert a == synthetic_prompts(64, 128, 49152, seed=1)
    assert a != synthetic_prompts(64, 128, 49152, seed=2)
    assert len({tuple(p) for p in a}) == 64
    assert all(len(p) == 128 and min(p) >= 32 and max(p) < 49152 for p in a)
    with pytest.raises(ValueError, match="no ordinary tokens"):
        synthetic_prompts(1, 4, 16)


def test_every_repetition_has_prompts_of_its_own():
    prompts = bench_prompts(None, 49152, 3, None)
    assert prompts == bench_prompts(None, 49152, 3, None)  # every engine gets the same
    latency, throughput = prompts["latency"], prompts["throughput"]
    assert len(latency) == 3 and len({tuple(p) for p in latency}) == 3
    assert [len(batch) for batch in throughput] == [64, 64, 64]
    first_blocks = {tuple(p[:16]) for batch in throughput for p in batch}
    assert len(first_blocks) == 3 * 64  # no prompt shares even its first block with another


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab"}\n\n{"prompt": "abc"}\n')
    assert jsonl_prompts(path, lambda t: [len(t)] * len(t), 3) == [[2, 2], [3, 3, 3], [2, 2]]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        jsonl_prompts(path, list, 1)


def test_statistics():
    rng = np.random.default_rng(0)
    samples = rng.random(101).tolist()
    for q in (0, 50, 90, 99, 100):
        assert percentile(samples, q) == pytest.approx(np.percentile(samples, q))
    s = summarize([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    timing = token_timing(10.0, [10.5, 10.6, 10.8, 11.1])
    assert timing["ttft_s"] == pytest.approx(0.5)
    assert timing["decode_tok_s"] == pytest.approx(3 / 0.6)
    assert timing["itl_p50_ms"] == pytest.approx(200)


def test_model_numbers_count_smollm2_exactly(smollm2):
    model = smollm2.engine.runner.model
    config = smollm2.config.model.arch_config.to_dict()
    numbers = model_numbers(config)
    assert numbers["params"] == sum(p.numel() for p in model.parameters())
    embedding = config["vocab_size"] * config["hidden_size"]
    # The tied LM head is a product every token pays; the final norm is not a product.
    assert numbers["matmul_params"] == numbers["params"] - config["hidden_size"]
    assert numbers["params"] > embedding


def test_roofline_arithmetic():
    # 50 tok/s reading 500 MB per token is 25 GB/s: half of a 50 GB/s ceiling.
    assert decode_fraction(50, 500e6, 50e9) == pytest.approx(0.5)
    # 1000 tok/s through 100 M weights is 200 GFLOP/s: 80 % of 250 GFLOP/s.
    assert throughput_fraction(1000, 100_000_000, 250e9) == pytest.approx(0.8)
    # A 16-bit engine is held to the faster product: float32's where bfloat16 crawls.
    crawling = {"float32": 120e9, "bfloat16": 1e9}
    assert matmul_ceiling(crawling, "bfloat16") == matmul_ceiling(crawling, "f16") == 120e9
    assert matmul_ceiling({"float32": 100e9, "bfloat16": 400e9}, "bfloat16") == 400e9
    assert matmul_ceiling(crawling, "float32") == matmul_ceiling(crawling, "q4_1") == 120e9


def _fake_report():
    def worker(decode_gap, batch_seconds, throughput_tokens):
        times = [1.0 + 0.1 + i * decode_gap for i in range(128)]
        return {"ready": 5.0, "spawned": 0.0, "peak_rss_bytes": 2**30, "kv_blocks": 100,
                "latency": [{"start": 1.0, "token_times": times}] * 3,
                "throughput": [{"seconds": s, "output_tokens": 8192, "prompt_tokens": 8192}
                               for s in batch_seconds],
                "tokens": {"latency": list(range(128)), "throughput": throughput_tokens}}

    reference = [[i] * 128 for i in range(64)]
    # Two sequences differ from the reference: one from its 64th token, one from its first.
    differing = [list(s) for s in reference]
    differing[3][64:] = [7] * 64
    differing[5][0] = 9

    def start(first):
        return {"ready": 2.0, "spawned": 0.0, "startup": [{"first_token": first}]}

    return {
        "date": "2026-11-28 10:00", "machine": {"cpu": "Test CPU", "cores": 2,
                                                "memory_gib": 24},
        "versions": {"torch": "2.13", "transformers": "5.2"}, "model": "/m/SmolLM2",
        "model_numbers": {"params": 100_000_000, "matmul_params": 100_000_000},
        "roofline": {"bandwidth_bytes_s": 40e9,
                     "matmul_flops": {"float32": 100e9, "bfloat16": 200e9}},
        "prompts": {"source": "synthetic", "latency_len": 32, "throughput_lens": [128]},
        "engines": {
            "kiln": {"precision": "float32", "raw": {
                "main": worker(0.02, [20.0, 16.0, 18.0], differing),
                "startup_warm": [start(3.0), start(4.0)],
                "startup_cold": {**start(30.0), "compile_seconds": {"1": 10.0}}}},
            "transformers": {"precision": "float32", "raw": {
                "main": worker(0.05, [80.0, 64.0, 81.0], reference), "startup_warm": [start(6.0)]}},
        },
        "skipped": {"vllm": "not installed"}, "command": "kiln bench all",
    }


def test_report_summary_ratios_and_markdown(tmp_path):
    report = _fake_report()
    summary = report["summary"] = summarize_report(report)
    kiln = summary["kiln"]
    assert kiln["latency"]["decode_tok_s"]["median"] == pytest.approx(50)
    assert kiln["throughput"]["output_tok_s"]["median"] == pytest.approx(8192 / 18)
    assert kiln["throughput"]["total_tok_s"]["median"] == pytest.approx(2 * 8192 / 18)
    agreement = kiln["agreement"]
    assert agreement["reference"] == "transformers"
    assert agreement["latency"] == {"identical": 1, "sequences": 1, "common_prefix_share": 1.0}
    assert agreement["throughput"]["identical"] == 62
    assert agreement["throughput"]["common_prefix_share"] == pytest.approx(
        (64 * 128 - 64 - 128) / (64 * 128))
    assert "agreement" not in summary["transformers"]  # the reference itself
    assert kiln["ratios"]["decode_vs_transformers"] == pytest.approx(2.5)
    # Repetition by repetition 80/20, 64/16 and 81/18 times as fast: the median of those,
    # not the ratio of the medians (80/18).
    assert kiln["ratios"]["output_vs_transformers"] == pytest.approx(4.0)
    assert kiln["ratio_ranges"]["output_vs_transformers"] == pytest.approx([4.0, 4.5])
    assert kiln["ratios"]["decode_vs_vllm"] is None  # vLLM was skipped
    assert kiln["startup"]["first_token_s"]["median"] == pytest.approx(3.5)
    assert kiln["startup_cold"]["first_token_s"]["median"] == pytest.approx(30)
    # 50 tok/s x 400 MB (100 M float32 weights) = 20 GB/s of 40.
    assert kiln["roofline"]["decode_share_of_bandwidth"] == pytest.approx(0.5)
    text = render_markdown(report)
    assert "| kiln | float32 | 50.0 |" in text
    assert "2.50×" in text and "50 %" in text and "4.00× (4.00–4.50)" in text
    assert "vllm skipped: not installed" in text
    assert "Command: `kiln bench all`" in text
    assert "- kiln vs transformers: latency 1/1 sequences identical; throughput 62/64 " \
           "sequences identical (98 % of tokens before the first difference)" in text
    readme = tmp_path / "README.md"
    readme.write_text("# kiln\n\nintro\n")
    update_readme(readme, report)
    update_readme(readme, report)  # regenerating replaces the block instead of adding one
    content = readme.read_text()
    assert content.count("## Performance") == 1 and content.count("| kiln | float32") == 1
    assert content.startswith("# kiln\n\nintro\n")


def test_a_share_above_its_ceiling_is_flagged_and_explained():
    report = _fake_report()
    summary = report["summary"] = summarize_report(report)
    # kiln: 2 x 8192 tokens in 18 s x 2 x 100 M FLOP = 182 GFLOP/s, over the 100 measured;
    # transformers: 2 x 8192 in 80 s, 41 GFLOP/s.
    share = summary["kiln"]["roofline"]["throughput_share_of_matmul_peak"]
    assert share == pytest.approx(1.82, abs=0.01)
    rows = {line.split(" | ")[0]: line for line in render_markdown(report).splitlines()
            if line.startswith("| ") and "×" in line}
    assert rows["| kiln"].endswith("| 182 % ↑ |")
    assert rows["| transformers"].endswith("| 41 % |")
    assert "↑ above the ceiling" in render_markdown(report)
    report["engines"].pop("kiln")
    report["summary"] = summarize_report(report)
    assert "↑" not in render_markdown(report)


def test_the_report_names_the_model_as_given_or_the_embedded_one():
    report = _fake_report()
    report["summary"] = summarize_report(report)
    assert "Model: SmolLM2 (100 M parameters)" in render_markdown(report)  # an older run
    report["model_name"] = model_name(None, Path("/w/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert "Model: HuggingFaceTB/SmolLM2-135M-Instruct (the embedded " \
           "SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to float32) (100 M parameters)" \
           in render_markdown(report)
    assert model_name("/models/tiny", None) == "/models/tiny"


def test_compare_two_runs(tmp_path, capsys):
    before = _fake_report()
    before["summary"] = summarize_report(before)
    after = _fake_report()
    after["engines"]["kiln"]["raw"]["main"]["throughput"][2]["seconds"] = 9.0  # median 16 s
    del after["engines"]["transformers"]
    after["summary"] = summarize_report(after)
    paths = []
    for name, report in (("a.json", before), ("b.json", after)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(report))
    assert bench_main(["--compare", *map(str, paths)]) == 0
    text = capsys.readouterr().out
    assert f"| kiln | output tok/s | {8192 / 18:.1f} | {8192 / 16:.1f} | +12.5 % |" in text
    assert "| kiln | decode tok/s | 50.0 | 50.0 | +0.0 % |" in text
    assert "Measured in one run only: transformers." in text
    paths[1].write_text("{}")
    with pytest.raises(SystemExit):
        bench_main(["--compare", *map(str, paths)])
    assert "is not a kiln bench report" in capsys.readouterr().err


def test_png_chart(tmp_path):
    from kiln.benchmarks.report import render_png

    report = _fake_report()
    report["summary"] = summarize_report(report)
    path = render_png(report, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_harness_end_to_end_on_a_tiny_model(tiny_llama, tmp_path):
    """The real harness: kiln eager and transformers each in their own processes on the same
    prompts, taking turns, llama.cpp skipped with its reason."""
    logs = []
    report = bench(["latency", "throughput", "startup", "memory"],
                   ["kiln-eager", "transformers", "llama.cpp-f32"], str(tiny_llama[0]), 1,
                   None, tmp_path, log=logs.append)
    assert set(report["engines"]) == {"kiln-eager", "transformers"}
    # Not installed (a fresh clone) or installed but given a folder, not a GGUF file.
    why = report["skipped"]["llama.cpp-f32"]
    assert "GGUF" in why or "make bench-peers" in why
    for name in ("kiln-eager", "transformers"):
        s = report["summary"][name]
        assert s["latency"]["decode_tok_s"]["median"] > 0
        assert s["throughput"]["output_tok_s"]["median"] > 0
        assert s["startup"]["first_token_s"]["median"] > s["startup"]["ready_s"]["median"] > 0
        assert s["memory"]["peak_rss_mib"] > 0
    raw = report["engines"]["kiln-eager"]["raw"]["main"]
    assert [len(x["token_times"]) for x in raw["latency"]] == [128]
    assert [x["output_tokens"] for x in raw["throughput"]] == [64 * 128]
    # Both run float32 on the same weights: transformers is the reference for kiln's tokens.
    agreement = report["summary"]["kiln-eager"]["agreement"]
    assert agreement["latency"]["identical"] == 1
    assert agreement["throughput"] == {"identical": 64, "sequences": 64,
                                       "common_prefix_share": 1.0}
    turns = [line for line in logs if line.endswith(("latency 1/1", "throughput 1/1"))]
    assert turns == ["[1/3] kiln-eager: latency 1/1", "[2/3] transformers: latency 1/1",
                     "[1/3] kiln-eager: throughput 1/1", "[2/3] transformers: throughput 1/1"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["summary"]["kiln-eager"]["ratios"]["decode_vs_transformers"] > 0
    assert (tmp_path / "bench.md").read_text().count("| kiln-eager |") == 2
    assert (tmp_path / "bench.png").is_file()


def test_a_worker_that_dies_says_why(tmp_path):
    from kiln.benchmarks.harness import Worker

    job = {"model": str(tmp_path / "no-such-model"), "gguf": None, "dtype": "float32",
           "max_model_len": 64, "prompts": {}, "compile_cache": str(tmp_path / "cache")}
    with pytest.raises(RuntimeError, match="kiln-eager failed") as failure:
        Worker(ENGINES["kiln-eager"], job)
    assert "no-such-model" in str(failure.value)  # the worker's last lines of stderr


def test_a_worker_killed_by_a_signal_is_reported_by_the_signal_name():
    from kiln.benchmarks.harness import exit_text

    assert exit_text(-4).startswith("killed by SIGILL: ")
    assert exit_text(-9).startswith("killed by SIGKILL")
    assert exit_text(1) == "exit 1"


def test_engines_take_turns_starting_one_later_each_repetition():
    from kiln.benchmarks.harness import turn_order

    assert [turn_order(["a", "b", "c"], rep) for rep in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert turn_order([], 2) == []


def test_peak_memory_is_the_workers_own(tmp_path):
    """A process spawned from a large one reports its own peak, not its parent's (getrusage
    starts a spawned process from the parent's high-water mark)."""
    import subprocess
    import sys

    from kiln.benchmarks import worker

    ballast = b"x" * (400 << 20)  # written, so resident: the parent's peak is above 400 MiB
    probe = subprocess.run(
        [sys.executable, "-c", "import runpy, sys; "
         f"print(runpy.run_path({worker.__file__!r})['peak_rss_bytes']())"],
        capture_output=True, text=True, check=True, start_new_session=True)
    assert 0 < int(probe.stdout) < 200 << 20
    del ballast


def test_engine_names_are_known():
    assert {"kiln", "kiln-eager", "transformers", "vllm", "llama.cpp-q4_1"} <= set(ENGINES)


def test_kiln_bfloat16_is_skipped_where_torch_bfloat16_matmul_crawls():
    """...unless kiln multiplies bfloat16 rows through float32 packed copies there."""
    from kiln.benchmarks.harness import unusable_precision

    slow = {"float32": 115e9, "bfloat16": 1.2e9}
    fast = {"float32": 115e9, "bfloat16": 230e9}
    assert "1.2 GFLOP/s" in unusable_precision(ENGINES["kiln-bf16"], slow, False)
    assert unusable_precision(ENGINES["kiln-bf16"], slow, True) is None
    assert unusable_precision(ENGINES["kiln-bf16"], fast, False) is None
    assert unusable_precision(ENGINES["kiln"], slow, False) is None
    assert unusable_precision(ENGINES["vllm-bf16"], slow, False) is None  # its own kernels
