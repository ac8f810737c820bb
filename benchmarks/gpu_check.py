"""`make gpu-check`: the cuda-marked tests, then eager vs compiled vs compiled + CUDA graphs
decode speed on a random-initialised Llama shape, with a JSON report under $OUT.

Runs from the working tree with the GPU machine's preinstalled packages (no internet)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A Llama-3.2-1B shape: big enough that kernels, not Python, dominate; small enough that
# three engines compile and run within the check's time budget.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
    "dtype": "bfloat16",
}


def main() -> int:
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    start = time.perf_counter()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/", "-x",
         f"--junitxml={out / 'cuda-tests.xml'}"], capture_output=True, text=True, timeout=300)
    report["tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-3000:],
                       "seconds": time.perf_counter() - start}
    print(tests.stdout[-3000:], tests.stderr[-2000:], flush=True)
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(LLAMA_1B))
    bench = subprocess.run(
        [sys.executable, "benchmarks/compare_modes.py", "--model", str(folder),
         "--load-format", "dummy", "--dtype", "bfloat16", "--batches", "1,8,64",
         "--max-tokens", "64", "--repeats", "3", "--max-model-len", "512",
         "--out", str(out / "modes.json")],
        capture_output=True, text=True, timeout=420)
    print(bench.stdout[-4000:], bench.stderr[-3000:], flush=True)
    report["bench"] = {"returncode": bench.returncode, "tail": bench.stdout[-4000:]}
    if (out / "modes.json").is_file():
        report["bench"]["results"] = json.loads((out / "modes.json").read_text())
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return tests.returncode or bench.returncode


if __name__ == "__main__":
    sys.exit(main())
