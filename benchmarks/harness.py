"""`kiln bench`: run each engine in its own process on the same prompts, never two at once,
then summarise, compare with the machine's ceilings and write the reports.

The engines take turns: each loads in a process of its own (one after another), then every
repetition of a workload runs on each engine in turn before the next repetition starts, so
a machine whose speed drifts during the run (a shared one does, by tens of per cent over
half an hour here) moves every engine's samples alike and the ratios between engines stay
fair. An engine that waited for its turn first serves an untimed two-token request: while
it waited, the kernel may have paged out its file-backed memory (this machine's DAMON
pages out file pages left untouched for a minute), and llama.cpp's weights are a mapped
file (its first token took 1.1 s instead of 0.1 s after such a wait).

Order: kiln compiled's start with an empty compile cache; the turns of the latency and
throughput workloads; then, in turns again, new processes for the warm start. Peers that
are not installed are listed with the reason; `make bench-peers` installs vLLM's CPU build
and llama-cpp-python into virtual environments of their own."""

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .roofline import measure_bandwidth, measure_matmul_peak, model_numbers
from .workloads import WORKLOADS, jsonl_prompts, synthetic_prompts

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass
class EngineSpec:
    name: str
    family: str  # which adapter in worker.py
    precision: str  # float32, bfloat16, f16, q4_1
    options: dict = field(default_factory=dict)
    venv: str | None = None  # a separate virtual environment under the repository root
    module: str | None = None  # what must be importable there

    @property
    def python(self) -> str:
        return sys.executable if self.venv is None else str(ROOT / self.venv / "bin" / "python")

    def env(self) -> dict:
        """Environment for the engine's process. vLLM's CPU build wants its OpenMP threads
        bound to cores, its KV cache size in GiB, and its Intel OpenMP runtime preloaded.
        2 GiB, like kiln's default here, holds the throughput workload's 64 sequences 2.7
        times over in float32; with 4, every engine of a full run loaded at once (they take
        turns) outgrew this machine's 23.5 GiB and the kernel killed vLLM's worker."""
        if self.family != "vllm":
            return {}
        libs = sorted((ROOT / self.venv).glob("lib/python*/site-packages/**/libiomp5.so"))
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
               "VLLM_CPU_KVCACHE_SPACE": "2"}
        if libs:
            env["LD_PRELOAD"] = str(libs[0])
        return env

    def missing(self) -> str | None:
        """Why this engine cannot run here, or None."""
        if self.venv is not None and not Path(self.python).is_file():
            return f"{self.venv} does not exist; `make bench-peers` installs {self.module}"
        if self.module is not None:
            probe = subprocess.run(
                [self.python, "-c", f"import importlib.util, sys; "
                 f"sys.exit(importlib.util.find_spec({self.module!r}) is None)"],
                capture_output=True)
            if probe.returncode:
                return f"{self.module} is not importable with {self.python}"
        return None


ENGINES = {spec.name: spec for spec in [
    EngineSpec("kiln", "kiln", "float32"),
    EngineSpec("kiln-bf16", "kiln", "bfloat16"),
    EngineSpec("kiln-eager", "kiln", "float32", {"eager": True}),
    EngineSpec("transformers", "transformers", "float32"),
    EngineSpec("transformers-compile", "transformers", "float32", {"compile": True}),
    EngineSpec("vllm", "vllm", "float32", venv=".venv-vllm", module="vllm"),
    EngineSpec("vllm-bf16", "vllm", "bfloat16", venv=".venv-vllm", module="vllm"),
    EngineSpec("llama.cpp-f32", "llama.cpp", "f32", venv=".venv-llamacpp", module="llama_cpp"),
    EngineSpec("llama.cpp-f16", "llama.cpp", "f16", venv=".venv-llamacpp", module="llama_cpp"),
    EngineSpec("llama.cpp-q4_1", "llama.cpp", "q4_1", venv=".venv-llamacpp",
               module="llama_cpp"),
]}

def unusable_precision(spec: EngineSpec, matmul_flops: dict, packs_bfloat16: bool) -> str | None:
    """Why kiln at this precision is not worth running here: torch's CPU matmul in bfloat16
    can be a hundred times slower than in float32 (1 against 115 GFLOP/s on a machine
    without native bfloat16 BLAS), and a run would take hours, unless kiln multiplies
    bfloat16 rows through float32 packed copies here (`packs_bfloat16`,
    models/cpu_packed_linear.py)."""
    if spec.family != "kiln" or spec.precision != "bfloat16" or packs_bfloat16:
        return None
    bf16, fp32 = matmul_flops["bfloat16"], matmul_flops["float32"]
    if bf16 >= fp32 / 10:
        return None
    return (f"torch's bfloat16 matmul measured {bf16 / 1e9:.1f} GFLOP/s here against "
            f"{fp32 / 1e9:.0f} in float32, and torch has no oneDNN for kiln's packed copies")


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cores": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and "cpu" not in info:
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and "flags" not in info:
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(kib / 2**20, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    out = {}
    for dist in ("kiln", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def peer_version(spec: EngineSpec) -> str | None:
    if spec.venv is None:
        return None
    dist = {"vllm": "vllm-cpu", "llama_cpp": "llama-cpp-python"}[spec.module]
    probe = subprocess.run([spec.python, "-c", f"import importlib.metadata as m; "
                            f"print(m.version({dist!r}))"], capture_output=True, text=True)
    return probe.stdout.strip() or None


class Worker:
    """A process of `spec`'s Python running worker.py on `job`, loaded and waiting for
    commands. `started` holds its start times, `spawned` the wall-clock time just before the
    process started."""

    def __init__(self, spec: EngineSpec, job: dict):
        self.name = spec.name
        self.tmp = tempfile.TemporaryDirectory()
        reply_read, reply_write = os.pipe()
        job = {**job, "family": spec.family, **spec.options, "reply_fd": reply_write}
        job_path = Path(self.tmp.name) / "job.json"
        job_path.write_text(json.dumps(job))
        self.spawned = time.time()
        # A session of its own: engines that start helper processes (vLLM's engine core)
        # leave them behind when the worker exits; they are killed with the group.
        self.proc = subprocess.Popen(
            [spec.python, str(WORKER), str(job_path)], env={**os.environ, **spec.env()},
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=True, pass_fds=(reply_write,))
        os.close(reply_write)
        self.replies = os.fdopen(reply_read)
        self.tail: list[str] = []

        def follow():  # the last lines, to show if the process dies
            for line in self.proc.stderr:
                self.tail[:] = (self.tail + [line.rstrip()])[-30:]

        self.reader = threading.Thread(target=follow, daemon=True)
        self.reader.start()
        self.started = self._receive()

    def _receive(self) -> dict:
        # Waiting for the pipe to close is not enough to notice a death: a helper the worker
        # forked (vLLM's engine core) keeps its end open. So wait until a reply starts to
        # arrive (one is pending at most) or the worker has exited.
        while not select.select([self.replies], [], [], 1.0)[0] and self.proc.poll() is None:
            pass
        readable = select.select([self.replies], [], [], 0)[0]
        line = self.replies.readline() if readable else ""
        if not line:  # the process died
            self.close()
            raise RuntimeError(f"{self.name} failed ({exit_text(self.proc.returncode)}):\n" +
                               "\n".join(self.tail))
        return json.loads(line)

    def ask(self, command: dict) -> dict:
        with contextlib.suppress(BrokenPipeError):  # a dead process: _receive says so
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        return self._receive()

    def finish(self) -> dict:
        """What the process used over its life; it exits."""
        end = self.ask({"finish": True})
        self.close()
        return end

    def close(self) -> None:
        """End the process (a finished one exits by itself; one interrupted in the middle of
        a repetition is killed after a grace period) and its helpers. Once only: the
        process id may belong to another process after that."""
        if self.replies.closed:
            return
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)
        self.replies.close()
        self.tmp.cleanup()


def start_once(spec: EngineSpec, job: dict, label: str, log) -> dict:
    """A new process of the engine, timed to ready and to its first token."""
    log(label)
    worker = Worker(spec, job)
    try:
        first = worker.ask({"workload": "startup", "rep": 0, "repeats": 1, "max_tokens": 1})
        end = worker.finish()
    finally:
        worker.close()
    return {**worker.started, "startup": [first["sample"]], **end, "spawned": worker.spawned}


def model_files(model: str | None) -> tuple[Path, Path]:
    """The checkpoint folder every torch engine loads, and the GGUF llama.cpp loads."""
    from kiln.resolve import embedded_gguf, resolve_model

    folder = resolve_model(model)
    gguf = embedded_gguf() if model is None else None
    return folder, gguf


def model_name(model: str | None, gguf: Path | None) -> str:
    """The model as a reader knows it: the name given, or the embedded default's hub id and
    the file it was converted from."""
    from kiln.resolve import DEFAULT_MODEL

    if model is not None:
        return model
    return f"{DEFAULT_MODEL} (the embedded {gguf.name}, dequantized to float32)"


def gguf_for(spec: EngineSpec, gguf: Path | None, work: Path) -> Path | None:
    from .gguf_variants import write_unquantized

    if gguf is None or spec.family != "llama.cpp":
        return None
    if spec.precision == "q4_1":
        return gguf
    return write_unquantized(gguf, work / f"{gguf.stem}-{spec.precision}.gguf", spec.precision)


def bench_prompts(folder: Path, vocab: int, repeats: int, prompts_file: str | None) -> dict:
    """{"latency": one prompt per repetition, "throughput": one batch per repetition,
    "warmup": the untimed request before each repetition}, the same for every engine. Each
    repetition has prompts of its own: a repeated prompt would be served from the prefix
    cache of the engines that have one."""
    batch = WORKLOADS["throughput"].num_prompts
    # Shorter than a KV block, and its own tokens: it leaves nothing in a prefix cache that
    # a timed prompt could use.
    warmup = synthetic_prompts(1, 8, vocab, seed=1000)[0]
    if prompts_file:
        from kiln.runtime.tokenizer import Tokenizer

        encode = Tokenizer(str(folder)).encode
        # One read of the file: the latency prompts are its first lines, as a read of
        # `repeats` prompts would give.
        every = jsonl_prompts(prompts_file, encode, batch * repeats)
        return {"latency": every[:repeats], "warmup": warmup,
                "throughput": [every[r * batch:(r + 1) * batch] for r in range(repeats)]}
    return {"latency": synthetic_prompts(repeats, WORKLOADS["latency"].prompt_len, vocab,
                                         seed=0),
            "throughput": [synthetic_prompts(batch, WORKLOADS["throughput"].prompt_len, vocab,
                                             seed=1 + r) for r in range(repeats)],
            "warmup": warmup}


def bench(workloads: list[str], engine_names: list[str], model: str | None, repeats: int,
          prompts_file: str | None, out_dir: Path, command: str | None = None,
          log=print, startup_repeats: int | None = None) -> dict:
    folder, gguf = model_files(model)
    config = json.loads((folder / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    vocab = config["vocab_size"]
    prompts = bench_prompts(folder, vocab, repeats, prompts_file)
    latency = prompts["latency"]
    throughput = [p for batch in prompts["throughput"] for p in batch]
    max_len = max(len(p) for p in latency + throughput) + 128 + 16
    log("measuring the machine: memory bandwidth and matmul peak")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": command,
        "machine": machine_info(), "versions": versions(), "model": str(folder),
        "model_name": model_name(model, gguf),
        "model_numbers": model_numbers(config),
        "roofline": {"bandwidth_bytes_s": measure_bandwidth(),
                     "matmul_flops": {"float32": measure_matmul_peak(_torch_dtype("f32")),
                                      "bfloat16": measure_matmul_peak(_torch_dtype("bf16"))}},
        "workloads": {w: WORKLOADS[w].to_dict() for w in workloads},
        "prompts": {"source": prompts_file or "synthetic (seeded)",
                    "latency_len": len(latency[0]),
                    "throughput_lens": sorted({len(p) for p in throughput})},
        "engines": {}, "skipped": {},
    }
    import torch

    from kiln.models.cpu_packed_linear import can_pack

    packs_bfloat16 = can_pack(torch.device("cpu"), torch.bfloat16)
    runs = []
    for i, name in enumerate(engine_names, 1):
        spec = ENGINES[name]
        why = spec.missing()
        if why is None and spec.family == "llama.cpp" and gguf is None:
            why = "llama.cpp needs a GGUF file; only the embedded default model has one"
        if why is None:
            why = unusable_precision(spec, report["roofline"]["matmul_flops"],
                                     packs_bfloat16)
        label = f"[{i}/{len(engine_names)}] {name}"
        if why is not None:
            report["skipped"][name] = why
            log(f"{label}: skipped ({why})")
            continue
        engine_gguf = gguf_for(spec, gguf, work)
        runs.append(EngineRun(spec, label, engine_job(spec, folder, engine_gguf, prompts,
                                                      max_len, work)))
        report["engines"][name] = {"precision": spec.precision, "version": peer_version(spec),
                                   "raw": {}, "weight_bytes": engine_gguf.stat().st_size
                                   if engine_gguf else None}
    run_in_turns(runs, workloads, repeats, startup_repeats or repeats, report, log)
    shutil.rmtree(work, ignore_errors=True)
    write_reports(report, out_dir)
    return report


def _torch_dtype(kind: str):
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16}[kind]


@dataclass
class EngineRun:
    spec: EngineSpec
    label: str
    job: dict


def engine_job(spec: EngineSpec, folder: Path, gguf: Path | None, prompts: dict, max_len: int,
               work: Path) -> dict:
    dtype = spec.precision if spec.precision in ("float32", "bfloat16") else "float32"
    return {"model": str(folder), "gguf": str(gguf) if gguf else None, "dtype": dtype,
            "max_model_len": max_len, "prompts": prompts,
            "compile_cache": str(work / f"compile-{spec.name}")}


def turn_order(runs: list, rep: int) -> list:
    """The engines in the order they take repetition `rep`: rotated by one per repetition,
    so no engine always runs right after the same one."""
    shift = rep % len(runs) if runs else 0
    return runs[shift:] + runs[:shift]


def exit_text(returncode: int | None) -> str:
    """How a worker ended, in words: a process killed by a signal has a negative return code,
    which says little to a reader (llama.cpp's AMX code dies with SIGILL on some virtual
    machines that list AMX)."""
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}: {signal.strsignal(-returncode)}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def run_in_turns(runs: list[EngineRun], workloads: list[str], repeats: int,
                 startup_repeats: int, report: dict, log) -> None:
    """Fill report["engines"][name]["raw"] for every run; an engine that fails moves to
    report["skipped"] with its error."""
    def drop(run: EngineRun, error: RuntimeError) -> None:
        runs.remove(run)
        report["engines"].pop(run.spec.name)
        report["skipped"][run.spec.name] = f"failed: {str(error)[-1500:]}"
        log(f"{run.label}: FAILED\n{error}")

    def raw(run: EngineRun) -> dict:
        return report["engines"][run.spec.name]["raw"]

    if "startup" in workloads:
        for run in list(runs):
            if run.spec.family == "kiln" and not run.spec.options.get("eager"):
                try:
                    raw(run)["startup_cold"] = start_once(
                        run.spec, run.job, f"{run.label}: start with an empty compile cache",
                        log)
                except RuntimeError as e:
                    drop(run, e)
    main = [w for w in ("latency", "throughput") if w in workloads or
            (w == "throughput" and "memory" in workloads)]
    if main:
        workers = {}
        try:
            for run in list(runs):
                log(f"{run.label}: loading")
                try:
                    workers[run.spec.name] = Worker(run.spec, run.job)
                except RuntimeError as e:
                    drop(run, e)
            results = {run.spec.name: {} for run in runs}
            for rep in range(repeats):
                for workload in main:
                    for run in turn_order(runs, rep):
                        result = results[run.spec.name]
                        if workload in result.get("unsupported", {}):
                            continue
                        log(f"{run.label}: {workload} {rep + 1}/{repeats}")
                        try:
                            answer = workers[run.spec.name].ask(
                                {"workload": workload, "rep": rep, "repeats": repeats,
                                 "max_tokens": WORKLOADS[workload].max_tokens})
                        except RuntimeError as e:
                            workers.pop(run.spec.name)
                            drop(run, e)
                            continue
                        if "unsupported" in answer:
                            result.setdefault("unsupported", {})[workload] = \
                                answer["unsupported"]
                            continue
                        result.setdefault(workload, []).append(answer["sample"])
                        if rep == 0:  # greedy tokens, compared across engines
                            result.setdefault("tokens", {})[workload] = answer["tokens"]
            for run in list(runs):
                worker = workers.pop(run.spec.name)
                try:
                    raw(run)["main"] = {**worker.started, **results[run.spec.name],
                                        **worker.finish(), "spawned": worker.spawned}
                except RuntimeError as e:
                    drop(run, e)
        finally:  # interrupted or failed: no engine process outlives the harness
            for worker in workers.values():
                worker.close()
    if "startup" in workloads:
        for r in range(startup_repeats):
            for run in list(runs):
                try:
                    raw(run).setdefault("startup_warm", []).append(start_once(
                        run.spec, run.job, f"{run.label}: start {r + 1}/{startup_repeats}",
                        log))
                except RuntimeError as e:
                    drop(run, e)


def write_reports(report: dict, out_dir: Path) -> None:
    from .report import render_markdown, render_png, summarize_report

    out_dir.mkdir(parents=True, exist_ok=True)
    report["summary"] = summarize_report(report)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    (out_dir / "bench.md").write_text(render_markdown(report))
    render_png(report, out_dir / "bench.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", nargs="?", choices=[*WORKLOADS, "all"])
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="show the change between two runs' bench.json files, run nothing")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or hub id (default: the embedded SmolLM2)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, from: {', '.join(ENGINES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-repeats", type=int, default=None,
                        help="new processes per engine for the start workload (default: "
                             "--repeats; vLLM takes minutes per start)")
    parser.add_argument("--prompts", default=None, help='JSONL file of {"prompt": "..."}')
    parser.add_argument("--out", default="bench-results", help="report folder")
    parser.add_argument("--readme", default=None,
                        help="also write the table into this README's Performance section")
    args = parser.parse_args(argv)
    if args.compare:
        if args.workload:
            parser.error("--compare runs nothing: give it two reports and no workload")
        from .report import render_comparison

        try:
            before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        except (OSError, ValueError) as e:
            parser.error(f"cannot read a report: {e}")
        for path, report in zip(args.compare, (before, after)):
            if not isinstance(report, dict) or "summary" not in report:
                parser.error(f"{path} is not a kiln bench report (no summary)")
        print(render_comparison(before, after), end="")
        return 0
    if args.workload is None:
        parser.error("give a workload (or all), or --compare BEFORE AFTER")
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}; known: {', '.join(ENGINES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    argv = sys.argv[2:] if argv is None else argv
    report = bench(workloads, names, args.model, args.repeats, args.prompts, Path(args.out),
                   command="kiln bench " + " ".join(argv),
                   startup_repeats=args.startup_repeats)
    out = Path(args.out)
    print(f"\n{(out / 'bench.md').read_text()}\nreports: {out / 'bench.json'}, "
          f"{out / 'bench.md'}, {out / 'bench.png'}")
    if args.readme:
        from .report import update_readme

        update_readme(Path(args.readme), report)
        print(f"updated the Performance section of {args.readme}")
    return 0
