"""The `kiln` command line: quick generation and chat from a terminal."""

import argparse
import logging
import os
import sys
import time


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF folder, .gguf file or hub id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--eager", action="store_true", help="run without torch.compile")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Offline LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    warmup = commands.add_parser("warmup", help="compile every size ahead of time")
    warmup.add_argument("--model", default=None)
    warmup.add_argument("--dtype", default="auto")
    warmup.add_argument("--max-model-len", type=int, default=None)
    warmup.add_argument("--max-num-seqs", type=int, default=256)
    warmup.add_argument("--max-num-batched-tokens", type=int, default=None)
    warmup.add_argument("--buckets", default=None,
                        help="comma-separated token counts to compile (default: planned); "
                             "without --max-num-batched-tokens, steps are limited to the "
                             "largest")
    warmup.add_argument("--no-start-check", action="store_true",
                        help="skip timing a fresh process's start with the filled cache")
    warmup.add_argument("-v", "--verbose", action="store_true")
    cache = commands.add_parser("cache", help="inspect the compile cache")
    cache.add_argument("action", choices=["list", "verify", "clear"])
    cache.add_argument("-v", "--verbose", action="store_true")
    generate = commands.add_parser("generate", help="complete one or more prompts")
    generate.add_argument("prompts", nargs="+")
    _add_common(generate)
    commands.add_parser("bench", add_help=False,
                        help="benchmark kiln against other engines (kiln bench --help)")
    chat = commands.add_parser("chat", help="answer one user message with the chat template")
    chat.add_argument("message")
    chat.add_argument("--system", default=None, help="system message")
    _add_common(chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the harness parses its own arguments
        from .benchmarks.harness import main as bench

        return bench(argv[1:])
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    from . import LLM, SamplingParams

    try:
        if args.command == "warmup":
            return _warmup(args, LLM)
        if args.command == "cache":
            return _cache(args.action)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                seed=args.seed, stop=args.stop)
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  enforce_eager=args.eager)
        if args.command == "generate":
            outputs = llm.generate(args.prompts, params, use_tqdm=False)
            for prompt, out in zip(args.prompts, outputs):
                print(prompt + out.outputs[0].text)
        else:
            messages = [{"role": "user", "content": args.message}]
            if args.system:
                messages.insert(0, {"role": "system", "content": args.system})
            print(llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text)
    except (ValueError, TypeError, OSError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    return 0


def _warmup(args, llm_class) -> int:
    sizes = [int(s) for s in args.buckets.split(",")] if args.buckets else None
    budget = args.max_num_batched_tokens
    if budget is None and sizes:  # steps of up to the largest bucket
        budget = max(sizes)
    start = time.perf_counter()
    options = {"model": args.model, "dtype": args.dtype, "max_model_len": args.max_model_len,
               "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": budget,
               "compilation_config": {"sizes": sizes}}
    llm = llm_class(**options)
    runner = llm.engine.runner if llm.engine is not None else llm.pooler.runner
    backend = runner.graph_runner.backend
    counters = backend.counters
    for size, seconds in sorted(counters.seconds_by_size.items()):
        print(f"  {size:>6} tokens  {seconds:6.1f} s")
    print(f"ready in {time.perf_counter() - start:.1f} s: {len(counters.seconds_by_size)} sizes, "
          f"{counters.num_compiles} pieces compiled, "
          f"{counters.num_direct_loads + counters.num_cache_loads + counters.num_deferred} "
          f"found in the cache, "
          f"{counters.num_shared} reused between traces")
    print(f"cache: {backend.cache.root} ({backend.cache.size_bytes() / 2**20:.1f} MiB)")
    if args.no_start_check:
        return 0
    seconds, compiles = _time_fresh_start(options)
    result = "embedding" if llm.engine is None else "token"
    print(f"a fresh process with this cache: first {result} {seconds:.1f} s after it started, "
          f"{compiles} pieces compiled")
    if compiles:
        print("kiln: warning: the fresh process compiled again; the cache does not serve it",
              file=sys.stderr)
        return 1
    return 0


# A fresh interpreter that builds the engine as `kiln warmup` did, produces one token (or one
# embedding), then reports what it compiled; it skips teardown (see `entry_point`).
_FRESH_START = """
import json, os, sys
from kiln import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
if llm.engine is None:
    llm.embed(["Hello"])
    runner = llm.pooler.runner
else:
    llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), use_tqdm=False)
    runner = llm.engine.runner
print(runner.graph_runner.backend.counters.num_compiles, flush=True)
os._exit(0)
"""


def _time_fresh_start(options: dict) -> tuple[float, int]:
    """Seconds from starting a new Python process to its first result with the cache just
    filled (the warm start a user gets), and how many pieces that process compiled."""
    import json
    import subprocess

    from .compiler.inductor import environment_without_kiln_builds

    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _FRESH_START, json.dumps(options)],
                           capture_output=True, text=True,
                           env=environment_without_kiln_builds())
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"the fresh process failed:\n{child.stderr[-2000:]}")
    return seconds, int(child.stdout.split()[-1])


def _cache(action: str) -> int:
    from .compiler.cache import CompileCache
    from .resolve import cache_dir

    cache = CompileCache(cache_dir() / "compile")
    if action == "clear":
        print(f"removed {cache.clear()} files from {cache.root}")
        return 0
    entries = cache.entries(verify=action == "verify")
    for e in entries:
        status = "" if action == "list" else ("  ok" if e.is_valid else "  CORRUPT")
        print(f"{e.key}  {e.size_bytes / 2**10:8.1f} KiB  "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}{status}")
    bad = sum(not e.is_valid for e in entries)
    print(f"{len(entries)} entries, {cache.size_bytes() / 2**20:.1f} MiB in {cache.root}"
          + (f"; {bad} corrupt (they are rebuilt on next use)" if bad else ""))
    return 1 if bad else 0


def entry_point() -> None:
    """The `kiln` command. It leaves without the interpreter's teardown, which spends 1-2 s
    here taking torch's compiler modules apart after the work is done; kiln's files are
    written atomically and closed by then, so only the streams need flushing."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
