"""`make gpu-check`: the cuda-marked tests, then decode speed of kiln eager, compiled and
compiled + CUDA graphs against transformers' `generate` on a random-initialised Llama shape,
with the logs and a JSON report under $OUT.

Runs from the working tree with the GPU machine's preinstalled packages (no internet)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# A Llama-3.2-1B shape: big enough that kernels, not Python, dominate; small enough that
# three engines compile and run within the check's time budget.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
    "dtype": "bfloat16",
}


def _run(name: str, command: list[str], out: Path, timeout: int) -> dict:
    """Run one step, its output kept whole in `out/<name>.log`; a step past its timeout is
    stopped and reported as such, so the steps after it still run."""
    start = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        try:
            returncode = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    tail = log.read_text()[-4000:]
    print(f"--- {name}: {returncode} in {time.perf_counter() - start:.0f} s\n{tail}", flush=True)
    return {"returncode": returncode, "seconds": time.perf_counter() - start, "tail": tail}


def main() -> int:
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    start = time.perf_counter()
    report["tests"] = _run("cuda-tests", [
        sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "cuda", "tests/",
        f"--junitxml={out / 'cuda-tests.xml'}"], out, timeout=180)
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(LLAMA_1B))
    report["bench"] = _run("bench", [
        sys.executable, "benchmarks/compare_modes.py", "--model", str(folder),
        "--load-format", "dummy", "--dtype", "bfloat16", "--batches", "1,8,64",
        "--modes", "eager,transformers,compiled+cudagraphs,compiled",
        "--max-tokens", "64", "--repeats", "3", "--max-model-len", "512",
        "--out", str(out / "modes.json")], out, timeout=230)
    if (out / "modes.json").is_file():
        report["bench"]["results"] = json.loads((out / "modes.json").read_text())
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return int(report["tests"]["returncode"] != 0 or report["bench"]["returncode"] != 0)


if __name__ == "__main__":
    sys.exit(main())
