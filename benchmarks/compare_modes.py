"""Decode speed of kiln's execution modes side by side, in one process on one machine:
eager, compiled, and (on CUDA) compiled + CUDA graphs; with `--modes ...,transformers`, also
transformers' `generate` on a model of the same config and dtype (`--model` a folder).

Decode tokens/s of a batch is measured as B * (N - 1) / (t(N) - t(1)), where t(n) is the
wall time of generating n tokens for the batch: prefill and the first token cancel out."""

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
import traceback

import torch

from kiln import LLM, SamplingParams

MODES = {
    "eager": {"enforce_eager": True},
    "compiled": {"compilation_config": {"cudagraphs": False}},
    "compiled+cudagraphs": {"compilation_config": {"cudagraphs": True}},
}


def _timed(llm, prompts, max_tokens: int) -> float:
    start = time.perf_counter()
    if isinstance(llm, TransformersGenerate):
        llm.generate(prompts, max_tokens)
    else:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class TransformersGenerate:
    """transformers' eager `generate`, timed like kiln: same prompts, greedy, EOS ignored."""

    def __init__(self, folder: str, load_format: str, dtype: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        if load_format == "dummy":  # random weights: speed does not depend on their values
            config = AutoConfig.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        self.model = self.model.to(device).eval()
        self.vocab_size = self.model.config.vocab_size

    @torch.inference_mode()
    def generate(self, prompts: list[dict], max_tokens: int) -> None:
        ids = torch.tensor([p["prompt_token_ids"] for p in prompts], device=self.model.device)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                            pad_token_id=0)


def _measure_mode(mode: str, model: str | None, batches: list[int], max_tokens: int,
                  prompt_len: int, repeats: int, load_format: str, dtype: str,
                  max_num_batched_tokens: int, max_model_len: int | None) -> dict:
    start = time.perf_counter()
    if mode == "transformers":
        if model is None:
            raise ValueError("mode transformers needs --model: a Hugging Face folder")
        llm = TransformersGenerate(model, load_format, dtype)
        vocab = llm.vocab_size
    else:
        kwargs = dict(MODES[mode])
        if "compilation_config" in kwargs:
            sizes = sorted({*batches, max_num_batched_tokens})
            kwargs["compilation_config"] = {**kwargs["compilation_config"], "sizes": sizes}
        llm = LLM(model, skip_tokenizer_init=True, load_format=load_format, dtype=dtype,
                  max_num_seqs=max(batches), max_num_batched_tokens=max_num_batched_tokens,
                  max_model_len=max_model_len, **kwargs)
        vocab = llm.config.model.vocab_size
    ready = time.perf_counter() - start
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
    return {"ready_s": ready, "batches": per_batch}


def _add_ratios(results: dict) -> None:
    for name in ("eager", "transformers"):
        base = results.get(name, {}).get("batches")
        if not base:
            continue
        for mode, result in results.items():
            for batch, r in result.get("batches", {}).items():
                r[f"speedup_vs_{name}"] = r["decode_tok_s"] / base[batch]["decode_tok_s"]
                print(f"{mode:>20}  batch {batch:>3}: {r[f'speedup_vs_{name}']:.2f}x {name}")


def measure(model: str | None, modes: list[str], batches: list[int], max_tokens: int,
            prompt_len: int, repeats: int, load_format: str, dtype: str,
            max_num_batched_tokens: int, max_model_len: int | None,
            out: str | None = None) -> dict:
    """Each mode in turn; a mode that fails is reported with its error and the rest still
    run. With `out`, the report is rewritten after every mode, so a run cut short keeps what
    it measured."""
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": model or "embedded SmolLM2-135M-Instruct", "dtype": dtype,
        "load_format": load_format, "max_tokens": max_tokens, "prompt_len": prompt_len,
        "results": {},
    }
    for mode in modes:
        try:
            result = _measure_mode(mode, model, batches, max_tokens, prompt_len, repeats,
                                   load_format, dtype, max_num_batched_tokens, max_model_len)
        except Exception as e:
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        report["results"][mode] = result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if mode == modes[-1]:
            _add_ratios(report["results"])
        if out:
            with open(out, "w") as f:
                json.dump(report, f, indent=2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated of {', '.join(MODES)}, transformers; default: "
                        f"kiln's modes that apply")
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
                     args.dtype, args.max_num_batched_tokens, args.max_model_len, args.out)
    return 1 if any("error" in r for r in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
