"""`kiln bench`: run each engine in its own process, one at a time, on the same prompts, then
summarise, compare with the machine's ceilings and write the reports.

Order per engine: (kiln compiled only) a start with an empty compile cache; the main process
running the latency and throughput workloads; then new processes for the warm start. Peers
that are not installed are listed with the reason; `make bench-peers` installs vLLM's CPU
build and llama-cpp-python into virtual environments of their own."""

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
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
        bound to cores, its KV cache size in GiB, and its Intel OpenMP runtime preloaded."""
        if self.family != "vllm":
            return {}
        libs = sorted((ROOT / self.venv).glob("lib/python*/site-packages/**/libiomp5.so"))
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
               "VLLM_CPU_KVCACHE_SPACE": "4"}
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

def unusable_precision(spec: EngineSpec, matmul_flops: dict) -> str | None:
    """Why kiln at this precision is not worth running here: torch's CPU matmul in bfloat16
    can be a hundred times slower than in float32 (1 against 115 GFLOP/s on a machine
    without native bfloat16 BLAS), and a run would take hours."""
    if spec.family != "kiln" or spec.precision != "bfloat16":
        return None
    bf16, fp32 = matmul_flops["bfloat16"], matmul_flops["float32"]
    if bf16 >= fp32 / 10:
        return None
    return (f"torch's bfloat16 matmul measured {bf16 / 1e9:.1f} GFLOP/s here against "
            f"{fp32 / 1e9:.0f} in float32")


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


def run_worker(spec: EngineSpec, job: dict, label: str, log) -> dict:
    """One process of `spec`'s Python running worker.py on `job`; returns its result with
    `spawned`, the wall-clock time just before the process started."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "family": spec.family, **spec.options,
               "result_path": str(Path(tmp) / "result.json")}
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        env = {**os.environ, **spec.env()}
        spawned = time.time()
        # A session of its own: engines that start helper processes (vLLM's engine core)
        # leave them behind when the worker exits; they are killed with the group.
        proc = subprocess.Popen([spec.python, str(WORKER), str(job_path)], env=env,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        tail: list[str] = []

        def follow():
            for line in proc.stderr:
                tail[:] = (tail + [line.rstrip()])[-30:]
                if line.startswith(("latency ", "throughput ", "startup ")):
                    log(f"{label}: {line.strip()}")

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
        result_path = Path(job["result_path"])
        if proc.returncode or not result_path.is_file():
            raise RuntimeError(f"{spec.name} failed (exit {proc.returncode}):\n" +
                               "\n".join(tail))
        result = json.loads(result_path.read_text())
    result["spawned"] = spawned
    return result


def model_files(model: str | None) -> tuple[Path, Path]:
    """The checkpoint folder every torch engine loads, and the GGUF llama.cpp loads."""
    from kiln.resolve import embedded_gguf, resolve_model

    folder = resolve_model(model)
    gguf = embedded_gguf() if model is None else None
    return folder, gguf


def gguf_for(spec: EngineSpec, gguf: Path | None, work: Path) -> Path | None:
    from .gguf_variants import write_unquantized

    if gguf is None or spec.family != "llama.cpp":
        return None
    if spec.precision == "q4_1":
        return gguf
    return write_unquantized(gguf, work / f"{gguf.stem}-{spec.precision}.gguf", spec.precision)


def bench_prompts(folder: Path, vocab: int, repeats: int, prompts_file: str | None) -> dict:
    """{"latency": one prompt per repetition, "throughput": one batch per repetition}, the
    same for every engine. Each repetition has prompts of its own: a repeated prompt would
    be served from the prefix cache of the engines that have one."""
    batch = WORKLOADS["throughput"].num_prompts
    if prompts_file:
        from kiln.runtime.tokenizer import Tokenizer

        encode = Tokenizer(str(folder)).encode
        # One read of the file: the latency prompts are its first lines, as a read of
        # `repeats` prompts would give.
        every = jsonl_prompts(prompts_file, encode, batch * repeats)
        return {"latency": every[:repeats],
                "throughput": [every[r * batch:(r + 1) * batch] for r in range(repeats)]}
    return {"latency": synthetic_prompts(repeats, WORKLOADS["latency"].prompt_len, vocab,
                                         seed=0),
            "throughput": [synthetic_prompts(batch, WORKLOADS["throughput"].prompt_len, vocab,
                                             seed=1 + r) for r in range(repeats)]}


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
    for i, name in enumerate(engine_names, 1):
        spec = ENGINES[name]
        why = spec.missing()
        if why is None and spec.family == "llama.cpp" and gguf is None:
            why = "llama.cpp needs a GGUF file; only the embedded default model has one"
        if why is None:
            why = unusable_precision(spec, report["roofline"]["matmul_flops"])
        if why is not None:
            report["skipped"][name] = why
            log(f"[{i}/{len(engine_names)}] {name}: skipped ({why})")
            continue
        label = f"[{i}/{len(engine_names)}] {name}"
        log(f"{label}: starting")
        try:
            report["engines"][name] = run_engine(spec, workloads, folder,
                                                 gguf_for(spec, gguf, work), prompts, max_len,
                                                 repeats, startup_repeats or repeats, work,
                                                 label, log)
        except RuntimeError as e:
            report["skipped"][name] = f"failed: {str(e)[-1500:]}"
            log(f"{label}: FAILED\n{e}")
    shutil.rmtree(work, ignore_errors=True)
    write_reports(report, out_dir)
    return report


def _torch_dtype(kind: str):
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16}[kind]


def run_engine(spec: EngineSpec, workloads: list[str], folder: Path, gguf: Path | None,
               prompts: dict, max_len: int, repeats: int, startup_repeats: int, work: Path,
               label: str, log) -> dict:
    dtype = spec.precision if spec.precision in ("float32", "bfloat16") else "float32"
    base = {"model": str(folder), "gguf": str(gguf) if gguf else None, "dtype": dtype,
            "max_model_len": max_len, "prompts": prompts,
            "compile_cache": str(work / f"compile-{spec.name}")}
    out = {"precision": spec.precision, "version": peer_version(spec), "raw": {},
           "weight_bytes": gguf.stat().st_size if gguf else None}
    compiled_kiln = spec.family == "kiln" and not spec.options.get("eager")
    if "startup" in workloads and compiled_kiln:
        log(f"{label}: startup with an empty compile cache")
        cold = run_worker(spec, {**base, "workloads": {"startup": {"repeats": 1}}},
                          label + " (cold)", log)
        out["raw"]["startup_cold"] = cold
    main = [w for w in ("latency", "throughput") if w in workloads or
            (w == "throughput" and "memory" in workloads)]
    if main:
        job = {**base, "workloads": {w: {"repeats": repeats,
                                         "max_tokens": WORKLOADS[w].max_tokens} for w in main}}
        out["raw"]["main"] = run_worker(spec, job, label, log)
    if "startup" in workloads:
        out["raw"]["startup_warm"] = [
            run_worker(spec, {**base, "workloads": {"startup": {"repeats": 1}}},
                       f"{label} (start {r + 1}/{startup_repeats})", log)
            for r in range(startup_repeats)]
    return out


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
