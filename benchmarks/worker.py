"""One engine, in a process of its own: load it, then run the repetitions the harness asks
for, one at a time, and report raw samples.

The harness runs this file by path with the engine's own Python (vLLM and llama.cpp may live
in virtual environments of their own), so it imports nothing from kiln at the top and each
engine's library only inside its adapter. Commands come as JSON lines on stdin; each reply
is one JSON line on the file descriptor the job names (engines print to stdout and stderr
themselves). It reports raw timestamps; the harness does the statistics. Progress goes to
stderr, one line per repetition."""

import json
import os
import sys
import time


class Unsupported(Exception):
    """The engine has no way to run this workload (the report says why)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class KilnEngine:
    def __init__(self, job: dict):
        from kiln import LLM, SamplingParams

        # Token ids in, token ids out, like every engine here (no detokenizing).
        self.params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                               detokenize=False)
        self.llm = LLM(job["model"], dtype=job["dtype"], enforce_eager=job.get("eager", False),
                       max_model_len=job["max_model_len"], skip_tokenizer_init=True,
                       compilation_config={"cache_dir": job.get("compile_cache")})
        self.backend = self.llm.engine.runner.graph_runner.backend
        self.compile_seconds = dict(self.backend.counters.seconds_by_size) \
            if self.backend else {}
        self.counters_at_ready = self.counters()

    def counters(self) -> dict | None:
        """kiln's compile counters (traces, compiles, cache loads, deferred loads)."""
        return None if self.backend is None else dict(vars(self.backend.counters))

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[float], list[int]]:
        engine = self.llm.engine
        (req,) = engine.add_request(None, prompt, self.params(max_tokens))
        times = []
        while engine.has_unfinished:
            engine.step()
            times += [time.perf_counter()] * (req.num_output_tokens - len(times))
        return times, list(req.output_token_ids)

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 self.params(max_tokens), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def kv_blocks(self) -> int:
        return self.llm.engine.block_manager.num_blocks


class TransformersEngine:
    def __init__(self, job: dict):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        dtype = getattr(torch, job["dtype"])
        self.model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).eval()
        # EOS ignored, as every engine here does: no EOS stops a sequence, and none is
        # forbidden either (min_new_tokens would mask its logit and change greedy tokens).
        self.model.generation_config.eos_token_id = None
        self.compiled = job.get("compile", False)
        if self.compiled:  # transformers' documented recipe: static cache + compiled forward
            self.model.generation_config.cache_implementation = "static"
            self.model.forward = torch.compile(self.model.forward)
        self.compile_seconds = {}

    def _generate(self, ids, max_tokens: int, streamer=None):
        with self.torch.inference_mode():
            return self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, streamer=streamer,
                pad_token_id=0)

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[float], list[int]]:
        times = []

        class Clock:  # transformers' streamer interface: put() gets the prompt, then tokens
            def __init__(self):
                self.seen_prompt = False

            def put(self, value):
                if self.seen_prompt:
                    times.append(time.perf_counter())
                self.seen_prompt = True

            def end(self):
                pass

        out = self._generate(self.torch.tensor([prompt]), max_tokens, Clock())
        return times, out[0, len(prompt):].tolist()

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        out = self._generate(self.torch.tensor(prompts), max_tokens)
        return out[:, len(prompts[0]):].tolist()

    def kv_blocks(self) -> None:
        return None


class VllmEngine:
    def __init__(self, job: dict):
        from vllm import LLM, SamplingParams

        self.params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                               detokenize=False)
        self.llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                       seed=0)
        self.compile_seconds = {}

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[float], list[int]]:
        engine = self.llm.llm_engine
        engine.add_request("stream", {"prompt_token_ids": prompt}, self.params(max_tokens))
        times, tokens = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = list(out.outputs[0].token_ids)
                times += [time.perf_counter()] * (len(tokens) - len(times))
        return times, tokens

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 self.params(max_tokens), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def kv_blocks(self) -> int | None:
        return getattr(self.llm.llm_engine.vllm_config.cache_config, "num_gpu_blocks", None)


class LlamaCppEngine:
    def __init__(self, job: dict):
        from llama_cpp import Llama

        self.llm = Llama(model_path=job["gguf"], n_ctx=job["max_model_len"],
                         n_threads=os.cpu_count(), n_batch=512, seed=0, verbose=False)
        self.compile_seconds = {}

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[float], list[int]]:
        times, tokens = [], []
        # generate() yields tokens with no EOS check of its own; top_k=1 is greedy.
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0,
                                       repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(times) == max_tokens:
                break
        return times, tokens

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        raise Unsupported("llama-cpp-python's API generates one sequence at a time")

    def kv_blocks(self) -> None:
        return None


ENGINES = {"kiln": KilnEngine, "transformers": TransformersEngine, "vllm": VllmEngine,
           "llama.cpp": LlamaCppEngine}


def measure(engine, name: str, rep: int, max_tokens: int, prompts: dict) -> tuple[dict, list]:
    """One repetition of workload `name`: its sample and the greedy tokens it produced. Each
    repetition has prompts of its own: a repeated prompt would be served from the prefix
    cache of the engines that have one. The timed work follows an untimed request that
    brings back what the process lost while it waited (see harness.py)."""
    if name != "startup":
        engine.stream(prompts["warmup"], 2)
    if name == "latency":
        start = time.perf_counter()
        times, tokens = engine.stream(prompts["latency"][rep], max_tokens)
        return {"start": start, "token_times": times}, tokens
    if name == "startup":  # one token, timed from process start by the harness
        engine.stream(prompts["latency"][0], 1)
        return {"first_token": time.time()}, []
    batch = prompts["throughput"][rep]
    start = time.perf_counter()
    tokens = engine.batch(batch, max_tokens)
    return {"seconds": time.perf_counter() - start, "output_tokens": sum(map(len, tokens)),
            "prompt_tokens": sum(map(len, batch))}, tokens


def peak_rss_bytes() -> int:
    """Peak resident memory of this process and the helpers it started (vLLM runs its model
    in an engine-core process), summed: every process of this session (the harness starts
    each worker in a session of its own). Each process's own high-water mark (VmHWM), not
    getrusage's: that one starts from the high-water mark of the process this one was
    spawned from (the harness's, 1.2 GiB after its bandwidth measurement)."""
    if not os.path.isdir("/proc"):  # not Linux: this process alone, as getrusage has it
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    session = os.getsid(0)
    total = 0
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            stat = open(f"/proc/{proc}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[3]) != session:
                continue
            status = open(f"/proc/{proc}/status").read()
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines()
                       if line.startswith("VmHWM:")), 0)
    return total


def serve(job: dict, commands, reply) -> None:
    """Load the engine, reply with its start times, then answer each command
    ({"workload", "rep", "max_tokens"}) with {"sample", "tokens"} or {"unsupported"}, until
    {"finish": true}, answered with what the whole process used."""
    imported = time.time()
    engine = ENGINES[job["family"]](job)
    reply({"imported": imported, "ready": time.time(),
           "compile_seconds": engine.compile_seconds})
    for line in commands:
        command = json.loads(line)
        if command.get("finish"):
            break
        name, rep = command["workload"], command["rep"]
        log(f"{name} {rep + 1}/{command['repeats']}")
        try:
            sample, tokens = measure(engine, name, rep, command["max_tokens"], job["prompts"])
        except Unsupported as e:
            reply({"unsupported": str(e)})
            continue
        reply({"sample": sample, "tokens": tokens})
    end = {"peak_rss_bytes": peak_rss_bytes(), "kv_blocks": engine.kv_blocks()}
    if isinstance(engine, KilnEngine):
        end["compile_counters"] = {"ready": engine.counters_at_ready, "end": engine.counters()}
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        end["peak_gpu_bytes"] = sys.modules["torch"].cuda.max_memory_allocated()
    reply(end)


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    replies = os.fdopen(job["reply_fd"], "w")

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    serve(job, sys.stdin, reply)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (seconds with torch's compiler loaded)


if __name__ == "__main__":
    sys.exit(main())
