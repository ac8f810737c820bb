"""The compiled path: same greedy tokens as eager and transformers in every bucket and
scheduling path, no compiles after warm-up, shared artifacts, and a trustworthy cache."""

import copy
import functools
import json
import os
import platform

import pytest
import torch
from conftest import (
    assert_all_blocks_free,
    hf_greedy,
    make_tiny_model,
    random_prompts,
    scheduling_workload,
    tiny_llm,
    token_prompts,
)

from kiln import LLM, SamplingParams
from kiln.compiler.cache import CompileCache, UnsafeCacheDirError
from kiln.compiler.inductor import _HEADER_PROBE
from kiln.models import attention_context
from kiln.models.cpu_attention import RecordedAttend
from kiln.models.cpu_linear import RecordedRow

SIZES = [1, 2, 4, 8, 16, 32]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One compile cache for the run: the first compiled engine fills it."""
    return str(tmp_path_factory.mktemp("compile-cache"))


def compiled_llm(folder, cache_dir, **kwargs):
    kwargs.setdefault("kv_cache_memory", 16 << 20)
    kwargs.setdefault("max_num_seqs", 32)
    kwargs.setdefault("max_num_batched_tokens", 32)
    compilation = {"sizes": SIZES, "cache_dir": cache_dir, **kwargs.pop("compilation", {})}
    return LLM(str(folder), skip_tokenizer_init=True, compilation_config=compilation, **kwargs)


def counters(llm):
    return llm.engine.runner.graph_runner.backend.counters


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return scheduling_workload(tiny_llama[1], seed=30, max_new_tokens=MAX_TOKENS, max_len=50)


@pytest.fixture(scope="module")
def llm(tiny_llama, compile_cache):
    return compiled_llm(tiny_llama[0], compile_cache)


def test_compiled_matches_transformers_and_never_compiles_after_warmup(llm, reference):
    prompts, expected = reference
    before = (counters(llm).num_traces, counters(llm).num_compiles)
    # Batches of 1..24 requests: decode steps pad to every size; the 32-token budget chunks
    # prompts and mixes prefill with decode.
    for n in (1, 3, 7, 24):
        outs = llm.generate(token_prompts(prompts[:n]), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected[:n]
        assert_all_blocks_free(llm)
    after = (counters(llm).num_traces, counters(llm).num_compiles)
    assert after == before
    # Dynamic artifacts (the CPU default) run steps of 3, 7, ... tokens without padding.
    assert {size for _, size in llm.engine.runner.graph_runner.steps} - set(SIZES)


def test_compiled_logits_projection_equals_eager(llm):
    runner = llm.engine.runner
    hidden = torch.randn(1, 64)
    with torch.inference_mode():
        compiled = runner.graph_runner.logits(hidden)
        eager = runner.model.compute_logits(hidden)
        batched = runner.graph_runner.logits(hidden.repeat(3, 1))  # more rows: BLAS
    # Layers and projection run without Dynamo, each with its own inputs bound once (at
    # their first call after the one through Dynamo).
    llm.generate(token_prompts([[5, 6, 7]]), GREEDY, use_tqdm=False)
    assert runner.graph_runner.bound.keys() == runner.graph_runner.direct.keys()
    assert len(runner.graph_runner.bound) == len(runner.model.model.layers) + 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, eager.repeat(3, 1), rtol=1e-5, atol=1e-5)


def test_compiled_equals_eager_under_preemption_and_prefix_caching(tiny_llama, compile_cache,
                                                                   reference):
    prompts, expected = reference
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    llm = compiled_llm(tiny_llama[0], compile_cache, block_size=4,
                       kv_cache_memory=64 * per_block, max_model_len=128)
    for _ in range(2):  # the second pass reuses cached prefixes
        outs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert_all_blocks_free(llm)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_prefix_hits > 0


def test_other_architecture_compiled(tiny_models, compile_cache):
    folder, hf = tiny_models["qwen3"]
    prompts = random_prompts(6, seed=33)
    llm = compiled_llm(folder, compile_cache)
    outs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, MAX_TOKENS)
                                                     for p in prompts]


@pytest.mark.parametrize("dynamic", [True, False])
def test_compiled_pieces_do_not_grow_with_depth(tmp_path, dynamic):
    """Every layer shares one trace and one artifact, whatever the depth: per size, or
    (dynamic) for size 1 and for the sizes 2-32, which the same pass applies to. On CPU the
    attention's kernel is called from the compiled layer, so a layer is one piece (elsewhere
    two, split at the attention). The logits projection adds one trace and one artifact (for
    one row)."""
    for layers in (2, 4):
        make_tiny_model(tmp_path / f"m{layers}", num_hidden_layers=layers)
        llm = compiled_llm(tmp_path / f"m{layers}", str(tmp_path / f"cache{layers}"),
                           compilation={"dynamic": dynamic})
        assert llm.engine.runner.graph_runner.backend.split_at == ("kiln.encoder_attention",)
        c = counters(llm)
        assert c.num_compiles == (2 if dynamic else len(SIZES)) + 1
        assert c.num_traces == 2  # one symbolic trace serves every size, 1 included


def test_warm_cache_loads_instead_of_compiling(tiny_llama, tmp_path, reference):
    prompts, expected = reference
    cache = str(tmp_path / "cache")
    cold = compiled_llm(tiny_llama[0], cache)
    assert counters(cold).num_compiles > 0
    warm = compiled_llm(tiny_llama[0], cache)
    c = counters(warm)
    assert c.num_compiles == 0
    # No Dynamo trace either: the layer and logits graphs were rebuilt from the cache's record.
    assert c.num_traces == 0 and c.num_traces_restored == 2
    # The traced sizes are loaded at warm-up; the others are verified and loaded on first use.
    # On CPU each runs its generated code directly, without Inductor (test below).
    assert c.num_direct_loads + c.num_deferred == counters(cold).num_compiles
    assert c.num_deferred > 0 and c.num_cache_loads == 0
    loads = c.num_direct_loads
    outs = warm.generate(token_prompts(prompts[:4]), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:4]
    assert c.num_compiles == 0 and c.num_direct_loads > loads and c.num_cache_loads == 0


_WARM_START = """
import json, sys
from kiln import LLM, SamplingParams
llm = LLM(sys.argv[1], skip_tokenizer_init=True, kv_cache_memory=16 << 20, max_num_seqs=32,
          max_num_batched_tokens=32,
          compilation_config={"sizes": [1, 2, 4, 8, 16, 32], "cache_dir": sys.argv[2]})
prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[3])]
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=int(sys.argv[4]),
                                            ignore_eos=True), use_tqdm=False)
c = llm.engine.runner.graph_runner.backend.counters
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                  "imported": sorted(m for m in ("torch._dynamo", "torch._inductor.compile_fx",
                                                 "torch._inductor.codecache") if m in sys.modules),
                  "direct": c.num_direct_loads, "loads": c.num_cache_loads,
                  "compiles": c.num_compiles}))
"""


def _warm_start(folder, cache, prompts: list[list[int]], env: dict | None = None) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WARM_START, str(folder), str(cache),
                           json.dumps(prompts), str(MAX_TOKENS)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_warm_start_runs_the_generated_code_without_inductor(tiny_llama, tmp_path, reference):
    """A new process with a warm cache imports neither Dynamo nor Inductor's compiler: it runs
    each artifact's generated code with its recorded kernel libraries, to the same tokens.
    A description that no longer matches its library falls back to Inductor's loader."""
    prompts, expected = reference
    cache = tmp_path / "cache"
    compiled_llm(tiny_llama[0], str(cache))
    warm = _warm_start(tiny_llama[0], cache, prompts[:6])
    assert warm["tokens"] == expected[:6]
    assert warm["imported"] == [] and warm["direct"] > 0
    assert warm["loads"] == 0 and warm["compiles"] == 0
    # The libraries are kept in kiln's cache: another (here empty) Inductor build directory,
    # as in a test run's temporary one, changes nothing.
    elsewhere = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "other-builds")}
    moved = _warm_start(tiny_llama[0], cache, prompts[:6], env=elsewhere)
    assert moved == warm
    # A library changed after its description was saved: that artifact loads through
    # Inductor, and its description is made again.
    form = next(p for p in cache.glob("*-code.bin"))
    digest = next(iter(json.loads(form.read_text())["kernels"].values()))
    path = cache / "kernels" / f"{digest}.so"
    original = path.read_bytes()
    # Replaced, never written in place: this process has the library loaded.
    path.with_suffix(".new").write_bytes(original + b"\0")
    os.replace(path.with_suffix(".new"), path)
    try:
        changed = _warm_start(tiny_llama[0], cache, prompts[:6])
    finally:
        path.with_suffix(".new").write_bytes(original)
        os.replace(path.with_suffix(".new"), path)
    assert changed["tokens"] == expected[:6] and changed["compiles"] == 0
    assert changed["loads"] > 0 and "torch._inductor.codecache" in changed["imported"]


def test_one_token_steps_replay_each_layers_recorded_call(tiny_llama, tmp_path, reference):
    """Batch-1 decode steps on CPU record each layer's call of its generated code once and
    then replay its kernels and ops on the same tensors, every layer's back to back, to
    transformers' tokens (the first layer's input, made anew each step, is copied in)."""
    prompts, expected = reference
    llm = compiled_llm(tiny_llama[0], str(tmp_path / "cache"))
    runner = llm.engine.runner.graph_runner
    for prompt, tokens in zip(prompts[:3], expected[:3]):  # one at a time: batch-1 decode
        out = llm.generate(token_prompts([prompt]), GREEDY, use_tqdm=False)
        assert out[0].outputs[0].token_ids == tokens
    num_layers = len(llm.engine.runner.model.model.layers)
    assert len(runner.replays) == num_layers and None not in runner.replays.values()
    # Their attention runs the op's kernel on the recorded tensors, not the dispatcher.
    replayed = [fn for bound in runner.replays.values() for fn, *_ in
                bound.__globals__["run"].steps]
    assert torch.ops.kiln.paged_attention.default not in replayed
    assert sum(isinstance(fn, RecordedAttend) for fn in replayed) == num_layers
    # Every layer's call, chained: the first layer's call ran them all in every step after
    # the one that recorded them (graphs/chain.py), the later layers' kernels from one C loop.
    decode_steps = sum(len(tokens) - 1 for tokens in expected[:3])
    assert runner.chain.layers == list(llm.engine.runner.model.model.layers)
    assert runner.chain.num_runs == decode_steps - 1
    assert runner.chain.loop is not None
    # Outside a step the attention kernel declines its recorded call: the loop stops there
    # and that step runs from Python, through the dispatcher, whose torch path then fails
    # for want of a step's metadata.
    with pytest.raises(RuntimeError, match="kiln::paged_attention_torch"):
        runner.chain.loop.run()
    # Batches decode as compiled, beside the replays.
    outs = llm.generate(token_prompts(prompts[:6]), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:6]


def test_only_allocations_kernels_and_ops_are_replayed():
    """A recorded call stands for later ones only where the generated code does nothing a
    replay would not repeat."""
    import ast
    import textwrap

    from kiln.compiler.inductor import _replayable

    body = ("a, b = args\nargs.clear()\nassert_size_stride(a, (1, 4), (4, 1), 'input')\n"
            "buf0 = empty_strided_cpu((1, 4), (4, 1), torch.float32)\nk(a, buf0)\n"
            "buf1 = torch.ops.kiln.paged_attention.default(buf0, "
            "reinterpret_tensor(b, (1, 4), (4, 1), 0), 0.5, 0)\nbuf2 = buf1\ndel a\n"
            "return (buf2, )")

    def replayable(code: str) -> bool:
        fn = ast.parse("def call(args):\n" + textwrap.indent(code, "    ")).body[0]
        return _replayable(fn, {"k"})

    assert replayable(body)
    for other in ("buf0.zero_()", "c = a + b", "for i in range(2):\n    k(a, b)",
                  "aten.mm(a, b)", "k(a, out=b)", "f(a)", "buf3 = a.size(0)"):
        assert not replayable(body.replace("del a", other)), other


def test_corrupt_cache_entry_is_rebuilt_not_loaded(tiny_llama, tmp_path, reference):
    prompts, expected = reference
    cache = tmp_path / "cache"
    first = compiled_llm(tiny_llama[0], str(cache), compilation={"sizes": [1, 32]})
    record = first.engine.runner.graph_runner.record_key
    victim = sorted(p for p in cache.glob("*.bin")
                    if p.stem != record and not p.stem.endswith("-code"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    llm = compiled_llm(tiny_llama[0], str(cache), compilation={"sizes": [1, 32]})
    # The record names an artifact that is gone, so kiln traces again and rebuilds it.
    assert counters(llm).num_compiles == 1 and counters(llm).num_traces == 2
    outs = llm.generate(token_prompts(prompts[:2]), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:2]
    assert all(e.is_valid for e in CompileCache(cache).entries(verify=True))


def test_corrupt_record_is_traced_again(tiny_llama, tmp_path, reference):
    prompts, expected = reference
    cache = tmp_path / "cache"
    first = compiled_llm(tiny_llama[0], str(cache), compilation={"sizes": [1, 32]})
    record = cache / f"{first.engine.runner.graph_runner.record_key}.bin"
    record.write_bytes(record.read_bytes()[:-10])
    llm = compiled_llm(tiny_llama[0], str(cache), compilation={"sizes": [1, 32]})
    assert counters(llm).num_traces == 2 and counters(llm).num_compiles == 0
    outs = llm.generate(token_prompts(prompts[:2]), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:2]
    again = compiled_llm(tiny_llama[0], str(cache), compilation={"sizes": [1, 32]})
    assert counters(again).num_traces == 0 and counters(again).num_traces_restored == 2


def test_cache_refuses_a_directory_others_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeCacheDirError, match="writable by other users"):
        CompileCache(shared)


def test_llm_refuses_an_unsafe_cache_before_anything_uses_it(tmp_path):
    # Before the model is even looked for: Inductor's start thread keeps its builds there.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeCacheDirError, match="writable by other users"):
        LLM(model=str(tmp_path / "no-such-model"), compilation_config={"cache_dir": str(shared)})


def test_cache_directory_is_created_private(tmp_path):
    CompileCache(tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_bad_compilation_config(tiny_llama):
    with pytest.raises(ValueError, match="did you mean 'sizes'"):
        LLM(str(tiny_llama[0]), skip_tokenizer_init=True, compilation_config={"size": [1]})
    with pytest.raises(ValueError, match="compilation mode"):
        LLM(str(tiny_llama[0]), skip_tokenizer_init=True, compilation_config={"mode": "fast"})


def _run_pass_on_layer(folder, rewrite_pass, num_tokens: int, inspect) -> list:
    """Trace a tiny Llama layer for `num_tokens` tokens, apply `rewrite_pass` to the graph,
    and check that the rewritten graph computes the same layer. Returns, per trace, the
    linears before, those the pass rewrote, the linears after, and `inspect(graph)`."""
    from kiln.compiler.passes import count_linears

    llm = tiny_llm(folder)
    layer = llm.engine.runner.model.model.layers[0]
    seen = []

    def backend(gm, example_inputs):
        before = count_linears(gm)
        rewritten = rewrite_pass(gm)
        seen.append((before, rewritten, count_linears(gm), inspect(gm.graph)))
        return gm.forward

    positions = torch.arange(num_tokens) + 3
    hidden, residual = torch.randn(num_tokens, 64), torch.randn(num_tokens, 64)
    with torch.no_grad(), attention_context(llm.engine.runner.dummy_metadata(num_tokens)):
        expected = layer(positions, hidden, residual)
        got = torch.compile(lambda *a: layer(*a), backend=backend, fullgraph=True)(
            positions, hidden, residual)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return seen


def test_inductor_options_reach_inductor(tiny_llama, tmp_path, reference):
    prompts, expected = reference
    with pytest.raises(ValueError, match="unknown inductor_options.*no_such_setting"):
        compiled_llm(tiny_llama[0], str(tmp_path / "a"),
                     compilation={"inductor_options": {"no_such_setting": 1}})
    llm = compiled_llm(tiny_llama[0], str(tmp_path / "b"),
                       compilation={"sizes": [1, 32], "inductor_options": {"size_asserts": False}})
    outs = llm.generate(token_prompts(prompts[:2]), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:2]


def test_single_token_pieces_get_the_pass_inductor_settings():
    """Pieces compiled for one token get the single-token pass's Inductor settings (in their
    cache keys too); larger ones do not; the user's inductor_options win over them."""
    from kiln.compiler.backend import KilnBackend
    from kiln.compiler.config import CompilationConfig
    from kiln.compiler.passes import SINGLE_TOKEN_INDUCTOR_OPTIONS

    def options(user: dict, size: int) -> dict:
        config = CompilationConfig(
            inductor_options=user,
            passes=["single_token_linear_as_reduction", "linear_as_weight_times_input"],
        ).for_device("cpu")
        return KilnBackend(config, None, [1, 32], "salt")._inductor_options(size, [torch.ones(1)])

    name, value = next(iter(SINGLE_TOKEN_INDUCTOR_OPTIONS.items()))
    assert options({}, 1)[name] == value
    assert name not in options({}, 32)
    assert options({name: value + 3}, 1)[name] == value + 3
    assert options({"size_asserts": False}, 32) == {"size_asserts": False}


def test_single_token_pass_replaces_every_linear_with_a_reduction(tiny_llama):
    """On a one-token layer graph the pass leaves no BLAS call, only reductions."""
    from kiln.compiler.passes import single_token_linear_as_reduction

    def sums(graph):
        return sum(1 for n in graph.nodes if n.op == "call_method" and n.target == "sum")

    seen = _run_pass_on_layer(tiny_llama[0], single_token_linear_as_reduction, 1, sums)
    assert seen == [(4, 4, 0, 4)]  # qkv, o, gate_up and down projections


def test_single_token_pass_calls_the_row_kernel_for_every_linear(tiny_llama, tmp_path):
    """The CPU default for one-token pieces: every linear becomes kiln::linear_row."""
    from kiln.compiler.passes import single_token_linear_as_row_kernel
    from kiln.models.cpu_linear import load_linear_kernel

    assert load_linear_kernel(tmp_path)

    def row_calls(graph):
        return sum(1 for n in graph.nodes if n.target is torch.ops.kiln.linear_row.default)

    seen = _run_pass_on_layer(tiny_llama[0], single_token_linear_as_row_kernel, 1, row_calls)
    assert seen == [(4, 4, 0, 4)]


def test_one_token_pieces_replay_the_row_kernel_from_the_step_loop(tiny_llama, tmp_path,
                                                                   reference):
    """With the row kernel's pass, a one-token step's recorded `kiln::linear_row` calls are
    made again by the kernel on the recorded tensors (not the dispatcher), so every later
    layer's steps run from one C loop; the tokens follow transformers, and the next process
    runs the saved pieces without Inductor. The pass is named: it is not the float32
    default on every CPU (`cpu_passes`)."""
    prompts, expected = reference
    cache = tmp_path / "cache"
    compilation = {"sizes": [1, 32], "passes": ["single_token_linear_as_row_kernel"]}
    for run in range(2):
        llm = compiled_llm(tiny_llama[0], str(cache), compilation=compilation)
        for prompt, tokens in zip(prompts[:2], expected[:2]):  # batch-1 decode
            out = llm.generate(token_prompts([prompt]), GREEDY, use_tqdm=False)
            assert out[0].outputs[0].token_ids == tokens
        runner = llm.engine.runner.graph_runner
        replayed = [fn for bound in runner.replays.values() for fn, *_ in
                    bound.__globals__["run"].steps]
        assert torch.ops.kiln.linear_row.default not in replayed
        num_layers = len(llm.engine.runner.model.model.layers)
        assert sum(isinstance(fn, RecordedRow) for fn in replayed) == 4 * num_layers
        assert runner.chain.loop is not None and runner.chain.num_runs > 0
        if run == 1:
            c = counters(llm)
            assert c.num_compiles == 0 and c.num_direct_loads > 0


def test_few_rows_pass_puts_the_weight_first_in_every_linear(tiny_llama):
    """On an 8-token layer graph every linear becomes W @ x^T (transposed back)."""
    from kiln.compiler.passes import linear_as_weight_times_input

    def weight_first_products(graph):
        products = [n for n in graph.nodes if n.target is torch.matmul]
        return len(products), all(n.args[0].op == "placeholder" for n in products)

    seen = _run_pass_on_layer(tiny_llama[0], linear_as_weight_times_input, 8,
                              weight_first_products)
    assert seen == [(4, 4, 0, (4, True))]


def test_packed_weights_pass_turns_every_linear_of_several_rows_into_the_op(tiny_llama):
    from kiln.compiler.passes import linear_with_packed_weights
    from kiln.models.cpu_packed_linear import can_pack

    if not can_pack(torch.device("cpu"), torch.float32):
        pytest.skip("torch built without oneDNN")

    def packed_calls(graph):
        return sum(1 for n in graph.nodes if n.target is torch.ops.kiln.linear_packed.default)

    seen = _run_pass_on_layer(tiny_llama[0], linear_with_packed_weights, 8, packed_calls)
    assert seen == [(4, 4, 0, 4)]


def _without_build_dirs() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}


def test_each_cache_keeps_its_own_kernel_builds(tiny_llama, tmp_path):
    """Two compile caches in one process: the second one's artifacts get their kernel builds
    beside them too, not in the first one's (Inductor takes its build directory from the
    environment, which the first cache set). In a fresh process, as a user's would be."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from kiln import LLM\n"
        "for cache in sys.argv[2:]:\n"
        "    LLM(sys.argv[1], skip_tokenizer_init=True, kv_cache_memory=16 << 20,"
        " max_num_seqs=4, max_num_batched_tokens=4,"
        " compilation_config={'sizes': [4], 'cache_dir': cache})\n"
        "from kiln.compiler import inductor\n"
        "print(inductor._header_verdict, inductor._unverified_isa)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tiny_llama[0]),
                             str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                            text=True, env=_without_build_dirs(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    if platform.machine() in ("x86_64", "AMD64"):
        # The cold check left the widest set to the header's probe kernel, which ran it.
        assert result.stdout.split("\n")[-2] == "[True] []"
        assert any(p.name.startswith("vec-isa-ok") for p in (tmp_path / "a").iterdir())

    def builds(root):  # kernels, but the probe that precompiles their header, once a process
        return sorted(p.name for p in (root / "inductor").rglob("*.main.so")
                      if _HEADER_PROBE not in p.with_suffix(".cpp").read_text())

    assert builds(tmp_path / "b") and builds(tmp_path / "b") == builds(tmp_path / "a")
    # The first compile's header was precompiled beside it (`start_kernel_header`).
    assert sum(_HEADER_PROBE in p.read_text()
               for p in (tmp_path / "a" / "inductor").rglob("*.main.cpp")) == 1


def test_kernel_builds_are_kept_in_the_kiln_cache(tiny_llama, tmp_path):
    """Inductor's C++/Triton builds go under the compile cache, not the temp directory, so a
    filled cache starts warm after /tmp is wiped. Checked in a fresh process: the setting must
    be made before anything imports Inductor."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from kiln import LLM\n"
        "LLM(sys.argv[1], skip_tokenizer_init=True, kv_cache_memory=16 << 20, max_num_seqs=2,"
        " max_num_batched_tokens=2, compilation_config={'sizes': [2], 'cache_dir': sys.argv[2]})\n"
        "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])\n")
    result = subprocess.run([sys.executable, "-c", script, str(tiny_llama[0]),
                             str(tmp_path / "cache")], capture_output=True, text=True,
                            env=_without_build_dirs(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "cache" / "inductor")
    assert any((tmp_path / "cache" / "inductor").rglob("*"))


def _follows_greedy_up_to_a_tie(model, prompt: list[int], tokens: list[int]) -> bool:
    """Whether `tokens` are `model`'s greedy tokens after `prompt`, or depart from them only
    where the token taken has a logit within one bfloat16 step of the largest (a tie at
    bfloat16's resolution, which other rounding may break either way); the contexts differ
    from there on, so nothing after it is compared."""
    ids = list(prompt)
    for token in tokens:
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = float(logits.max())
        if token != int(logits.argmax()):
            return top - float(logits[token]) <= torch.finfo(torch.bfloat16).eps * abs(top)
        ids.append(token)
    return True


def test_bfloat16_compiled_and_eager_follow_transformers(tiny_llama, compile_cache):
    """bfloat16 on CPU: the compiled path (kiln's row kernel for one-token projections, the
    attention kernel) and the eager path both give transformers' greedy tokens in bfloat16,
    but where transformers' own two best logits tie at bfloat16's resolution. (On this
    model, one of six sequences departs so on the eager path at its last token: logits
    0.4746 and 0.4727, one bfloat16 step apart.)"""
    folder, hf = tiny_llama
    prompts = random_prompts(6, seed=31)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    for llm in (tiny_llm(folder, dtype="bfloat16"),
                compiled_llm(folder, compile_cache, dtype="bfloat16")):
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        with torch.no_grad():
            for prompt, out in zip(prompts, outputs):
                assert len(out.outputs[0].token_ids) == MAX_TOKENS
                assert _follows_greedy_up_to_a_tie(hf16, prompt, out.outputs[0].token_ids)


def test_the_vector_isa_verdict_is_kept_only_for_the_widest_set(tmp_path, monkeypatch):
    """A warm start trusts a kept verdict and then uses the widest set the CPU lists, so the
    verdict is kept only when Inductor's check chose that set."""
    import torch._inductor.config as inductor_config
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    from kiln.compiler.inductor import remember_vec_isa

    listed = [cpu_vec_isa.VecAVX512(), cpu_vec_isa.VecAVX2()]
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: listed)
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: listed[1])
        remember_vec_isa(tmp_path)
        assert not list(tmp_path.iterdir())
        monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: listed[0])
        remember_vec_isa(tmp_path)
    assert [p.name.startswith("vec-isa-ok") for p in tmp_path.iterdir()] == [True]


def test_a_cold_check_of_the_vector_isa_picks_the_widest_set_unverified(monkeypatch):
    """Inductor picks the widest set that passes its probe, so its list is computed
    trusting the sets and the widest the CPU lists is left to be checked later (by the
    kernel header's probe kernel); a warm start's kept verdict is trusted as it is. The
    trust does not outlive the pick."""
    import torch._inductor.config as inductor_config
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    from kiln.compiler import inductor

    trusted_when_picked = []
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa",
                        lambda: trusted_when_picked.append(inductor_config.cpp.vec_isa_ok))
    monkeypatch.setattr(inductor, "_unverified_isa", [])
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        for widest in (None, "widest"):  # None: not x86, or the user fixed the width
            monkeypatch.setattr(inductor, "_widest_listed_vec_isa", lambda w=widest: w)
            inductor._check_vec_isa(None)
            assert inductor_config.cpp.vec_isa_ok is None
        assert inductor._unverified_isa == ["widest"]
        monkeypatch.setattr(inductor, "_widest_listed_vec_isa", lambda: pytest.fail("looked"))
        inductor._check_vec_isa(True)
        assert inductor_config.cpp.vec_isa_ok is None
    assert trusted_when_picked == [None, True, True]
    assert inductor._unverified_isa == ["widest"]


class _Probe:
    """A vector instruction set whose truth value is Inductor's probe of it."""

    def __init__(self, passes: bool):
        self.passes, self.probed = passes, 0

    def __bool__(self) -> bool:
        self.probed += 1
        return self.passes

    def __str__(self) -> str:
        return "probe"


@pytest.mark.parametrize("verdict,probe_passes,rejected", [
    ([True], False, False),  # the header's probe kernel ran: Inductor's probe is not run
    ([False], True, False),  # the header failed for another reason: Inductor's probe decides
    ([], True, False),  # no header built (nothing to compile): Inductor's probe decides
    ([False], False, True),
])
def test_an_unverified_vector_isa_is_settled_once_before_kernels_build(
        monkeypatch, verdict, probe_passes, rejected):
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    from kiln.compiler import inductor

    picked = []
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: picked.append("picked"))
    monkeypatch.setattr(cpu_vec_isa.valid_vec_isa_list, "cache_clear",
                        lambda: picked.append("cleared"))
    isa = _Probe(probe_passes)
    monkeypatch.setattr(inductor, "_unverified_isa", [isa])
    monkeypatch.setattr(inductor, "_header_verdict", verdict)
    monkeypatch.setattr(inductor, "_header_start", [])
    settled = inductor._settled_first(functools.cache(lambda *args: ("header", args)))
    if rejected:
        with pytest.raises(inductor.VecIsaRejected):
            settled("h")
        assert picked == ["cleared", "picked"]  # Inductor's full check, for the next try
    else:
        assert settled("h") == ("header", ("h",))
        assert picked == []
    assert isa.probed == (verdict != [True])
    assert settled("h") == ("header", ("h",))  # settled once: no second check
    assert isa.probed == (verdict != [True])


def test_a_compile_whose_vector_isa_was_rejected_runs_again_untrusted(monkeypatch):
    import torch._inductor.config as inductor_config

    from kiln.compiler import inductor

    monkeypatch.setattr(inductor, "_wait_for_inductor_start", lambda: None)
    monkeypatch.setattr(inductor, "_keep_headers_in", lambda builds: None)
    monkeypatch.setattr(inductor, "_unverified_isa", ["widest"])
    monkeypatch.setattr(inductor, "_trusted_here", [])
    trusted_when_compiled = []

    def compile_once(*args):
        trusted_when_compiled.append(inductor_config.cpp.vec_isa_ok)
        if len(trusted_when_compiled) == 1:
            inductor._unverified_isa.clear()  # as `_settle_vec_isa` does when it rejects
            raise inductor.VecIsaRejected("probe")
        return "compiled"

    monkeypatch.setattr(inductor, "_standalone_compile", compile_once)
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        assert inductor.compile_piece(None, [], {}) == "compiled"
        assert trusted_when_compiled == [True, None]
        assert inductor_config.cpp.vec_isa_ok is None


@pytest.mark.parametrize("capability,dtype,native_bf16,row_kernel,weight_times_input", [
    ("AVX512", torch.float32, True, True, False),  # MKL ran x·Wᵀ faster there in float32
    ("AVX512", torch.bfloat16, True, True, True),
    ("AVX512", torch.bfloat16, False, True, False),  # float32 packed copies instead
    ("AVX2", torch.float32, False, False, False),  # oneDNN with packed weights instead
    ("AVX2", torch.bfloat16, False, True, False),  # the row kernel's AVX2 path, bfloat16 only
    ("AVX2", None, False, False, True),
    ("AVX512", None, True, True, True),  # dtype not known: as before
])
def test_cpu_default_passes_follow_the_cpu_and_the_dtype(monkeypatch, capability, dtype,
                                                         native_bf16, row_kernel,
                                                         weight_times_input):
    from kiln.compiler.config import CompilationConfig
    from kiln.models import cpu_packed_linear

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_packed_linear, "cpu_has_native_bf16", lambda: native_bf16)
    passes = CompilationConfig().for_device("cpu", dtype).passes
    assert ("single_token_linear_as_row_kernel" in passes) == row_kernel
    assert ("single_token_linear_as_reduction" in passes) != row_kernel
    assert ("linear_as_weight_times_input" in passes) == weight_times_input
    # oneDNN with packed weights for several rows: float32 (on AVX2 up to 256 rows), and
    # bfloat16 without bfloat16 instructions (float32 copies, every row count)
    if dtype == torch.float32 and capability == "AVX2":
        assert "few_rows_linear_with_packed_weights" in passes
    elif dtype == torch.float32 or (dtype == torch.bfloat16 and not native_bf16):
        assert "linear_with_packed_weights" in passes
    else:
        assert not {"linear_with_packed_weights",
                    "few_rows_linear_with_packed_weights"} & set(passes)
    assert CompilationConfig(passes=[]).for_device("cpu", dtype).passes == []  # the user's win
    assert CompilationConfig().for_device("cuda", dtype).passes == []


def test_kernel_templates_compile_when_first_used(tmp_path):
    """After kiln starts Inductor, the kernel templates its compiler defines (in a fresh
    process: none defined before) hold their Jinja source until first used, then render
    as compiled ones do."""
    import subprocess
    import sys

    script = """
import copy, sys, torch
from pathlib import Path
from kiln.compiler.inductor import inductor_ready
inductor_ready(Path(sys.argv[1]), torch.device("cpu"))  # starts Inductor, imports its compiler
from torch._inductor.codegen.common import KernelTemplate
from torch._inductor.select_algorithm import TritonTemplate
from kiln.compiler.inductor import _TemplateOnFirstUse
templates = [t.template for t in TritonTemplate.all_templates.values()]
assert templates and all(isinstance(t, _TemplateOnFirstUse) and t._template is None
                         for t in templates), templates
template = KernelTemplate._template_from_string("{{ a }} + {{ b | indent_except_first(1) }}")
assert template.render(a=1, b="2\\n3") == "1 + 2\\n    3"
unused = KernelTemplate._template_from_string("{{ a }}")
assert copy.deepcopy(unused).render(a=4) == "4" and unused._template is None
print("ok", len(templates))
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
