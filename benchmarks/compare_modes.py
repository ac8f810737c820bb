"""Decode speed of kiln's execution modes side by side, in one process on one machine:
eager, compiled, and (on CUDA) compiled + CUDA graphs.

Decode tokens/s of a batch is measured as B * (N - 1) / (t(N) - t(1)), where t(n) is the
wall time of generating n tokens for the batch: prefill and the first token cancel out."""

import argparse
import gc
import json
import platform
import random
import statistics
import time

import torch

from kiln import LLM, SamplingParams

MODES = {
    "eager": {"enforce_eager": True},
    "compiled": {"compilation_config": {"cudagraphs": False}},
    "compiled+cudagraphs": {"compilation_config": {"cudagraphs": True}},
}


def _timed(llm, prompts, max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: str | None, modes: list[str], batches: list[int], max_tokens: int,
            prompt_len: int, repeats: int, load_format: str, dtype: str,
            max_num_batched_tokens: int, max_model_len: int | None) -> dict:
    vocab = None
    results = {}
    sizes = sorted({*batches, max_num_batched_tokens})
    for mode in modes:
        kwargs = dict(MODES[mode])
        if "compilation_config" in kwargs:
            kwargs["compilation_config"] = {**kwargs["compilation_config"], "sizes": sizes}
        start = time.perf_counter()
        llm = LLM(model, skip_tokenizer_init=True, load_format=load_format, dtype=dtype,
                  max_num_seqs=max(batches), max_num_batched_tokens=max_num_batched_tokens,
                  max_model_len=max_model_len, **kwargs)
        ready = time.perf_counter() - start
        vocab = llm.config.model.vocab_size
        rng = random.Random(0)
        per_batch = {}
        for batch in batches:
            prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_len)]}
                       for _ in range(batch)]
            _timed(llm, prompts, 2)  # first use of each shape
            rates = []
            for _ in range(repeats):
                t1, tn = _timed(llm, prompts, 1), _timed(llm, prompts, max_tokens)
                rates.append(batch * (max_tokens - 1) / (tn - t1))
            per_batch[batch] = {"decode_tok_s": statistics.median(rates), "samples": rates}
            print(f"{mode:>20}  batch {batch:>3}: {statistics.median(rates):9.1f} tok/s "
                  f"(min {min(rates):.1f}, max {max(rates):.1f})", flush=True)
        results[mode] = {"ready_s": ready, "batches": per_batch}
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": model or "embedded SmolLM2-135M-Instruct", "dtype": dtype,
        "load_format": load_format, "max_tokens": max_tokens, "prompt_len": prompt_len,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default=None, help="comma-separated; default: all that apply")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="CUDA graphs gather the whole captured block table: keep it short")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args()
    modes = args.modes.split(",") if args.modes else (
        list(MODES) if torch.cuda.is_available() else ["eager", "compiled"])
    report = measure(args.model, modes, [int(b) for b in args.batches.split(",")],
                     args.max_tokens, args.prompt_len, args.repeats, args.load_format,
                     args.dtype, args.max_num_batched_tokens, args.max_model_len)
    base = report["results"].get("eager")
    if base:
        for mode, result in report["results"].items():
            for batch, r in result["batches"].items():
                r["speedup_vs_eager"] = r["decode_tok_s"] / base["batches"][batch]["decode_tok_s"]
                print(f"{mode:>20}  batch {batch:>3}: {r['speedup_vs_eager']:.2f}x eager")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
