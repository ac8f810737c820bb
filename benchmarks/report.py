"""From raw samples to figures: per-engine summaries, ratios, roofline shares, and the
markdown table, PNG chart and README section built from them."""

from pathlib import Path

from .roofline import decode_fraction, matmul_ceiling, throughput_fraction
from .stats import summarize, token_timing

BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "f32": 4, "f16": 2}
README_START, README_END = "<!-- kiln-bench:start -->", "<!-- kiln-bench:end -->"


def _start_times(runs: list[dict]) -> dict:
    ready = [r["ready"] - r["spawned"] for r in runs]
    first = [r["startup"][0]["first_token"] - r["spawned"] for r in runs]
    return {"ready_s": summarize(ready).to_dict(), "first_token_s": summarize(first).to_dict()}


def _per_repetition(raw: dict, workload: str) -> list[float]:
    """Decode tokens/s (latency) or output tokens/s (throughput) of each repetition."""
    samples = raw.get("main", {}).get(workload) or []
    if workload == "latency":
        return [token_timing(s["start"], s["token_times"])["decode_tok_s"] for s in samples]
    return [s["output_tokens"] / s["seconds"] for s in samples]


def summarize_engine(raw: dict) -> dict:
    out = {}
    main = raw.get("main", {})
    if main.get("latency"):
        per_rep = [token_timing(s["start"], s["token_times"]) for s in main["latency"]]
        out["latency"] = {k: summarize([r[k] for r in per_rep]).to_dict() for k in per_rep[0]}
    if main.get("throughput"):
        samples = main["throughput"]
        out["throughput"] = {
            "output_tok_s": summarize(_per_repetition(raw, "throughput")).to_dict(),
            "total_tok_s": summarize([(s["output_tokens"] + s["prompt_tokens"]) / s["seconds"]
                                      for s in samples]).to_dict()}
    if main.get("unsupported"):
        out["unsupported"] = main["unsupported"]
    if raw.get("startup_warm"):
        out["startup"] = _start_times(raw["startup_warm"])
    if raw.get("startup_cold"):
        cold = raw["startup_cold"]
        out["startup_cold"] = {**_start_times([cold]),
                               "compile_seconds_by_size": cold.get("compile_seconds", {})}
    if main:
        out["memory"] = {"peak_rss_mib": main["peak_rss_bytes"] / 2**20,
                         "peak_gpu_mib": main.get("peak_gpu_bytes", 0) / 2**20 or None,
                         "kv_blocks": main.get("kv_blocks")}
    return out


def vllm_reference(precision: str) -> str:
    return "vllm" if precision in ("float32", "f32") else "vllm-bf16"


def _sequences(raw: dict, workload: str) -> list[list[int]] | None:
    tokens = raw.get("main", {}).get("tokens", {}).get(workload)
    if tokens is None:
        return None
    return [tokens] if workload == "latency" else tokens


def token_agreement(report: dict) -> dict:
    """Per engine, how its greedy tokens of each workload's first repetition compare with
    those of a reference at the same precision: transformers eager where it ran, else the
    first such engine. Float rounding differs between engines, so a near-tie between two
    tokens can go either way; the share of tokens before the first difference says how
    early."""
    groups = {}
    for name, engine in report["engines"].items():
        precision = {"f32": "float32"}.get(engine["precision"], engine["precision"])
        groups.setdefault(precision, []).append(name)
    out = {}
    for names in groups.values():
        reference = "transformers" if "transformers" in names else names[0]
        ref_raw = report["engines"][reference]["raw"]
        for name in names:
            if name == reference:
                continue
            agreement = {"reference": reference}
            for workload in ("latency", "throughput"):
                ours = _sequences(report["engines"][name]["raw"], workload)
                theirs = _sequences(ref_raw, workload)
                if ours is None or theirs is None or len(ours) != len(theirs):
                    continue
                common = 0
                for a, b in zip(ours, theirs):
                    common += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                   min(len(a), len(b)))
                agreement[workload] = {
                    "identical": sum(a == b for a, b in zip(ours, theirs)),
                    "sequences": len(ours),
                    "common_prefix_share": common / max(1, sum(map(len, theirs)))}
            if len(agreement) > 1:
                out[name] = agreement
    return out


def _paired_ratios(engines: dict, name: str, reference: str, workload: str) -> list[float]:
    """The engine's speed over the reference's, repetition by repetition: the harness runs
    repetition r of every engine in one turn, close in time, so each ratio compares the two
    under the same conditions of this drifting machine. Empty when either is missing."""
    if reference not in engines:
        return []
    ours = _per_repetition(engines[name]["raw"], workload)
    theirs = _per_repetition(engines[reference]["raw"], workload)
    if not ours or len(ours) != len(theirs):
        return []
    return [a / b for a, b in zip(ours, theirs)]


def summarize_report(report: dict) -> dict:
    """Per engine: its summaries, ratios to transformers eager and to vLLM at the same
    precision (the median of the per-repetition ratios, and their min-max), and its share
    of the machine's ceilings."""
    roof = report["roofline"]
    numbers = report["model_numbers"]
    summary = {name: summarize_engine(e["raw"]) for name, e in report["engines"].items()}
    for name, agreement in token_agreement(report).items():
        summary[name]["agreement"] = agreement

    def median(name: str, workload: str, metric: str) -> float | None:
        value = summary.get(name, {}).get(workload, {}).get(metric)
        return value["median"] if value else None

    for name, s in summary.items():
        engine = report["engines"][name]
        precision = engine["precision"]
        weight_bytes = engine.get("weight_bytes") or \
            numbers["params"] * BYTES_PER_WEIGHT.get(precision, 4)
        decode = median(name, "latency", "decode_tok_s")
        total = median(name, "throughput", "total_tok_s")
        ratios, ranges = {}, {}
        for ref_name, ref in (("transformers", "transformers"),
                              ("vllm", vllm_reference(precision))):
            for label, workload in (("decode", "latency"), ("output", "throughput")):
                paired = _paired_ratios(report["engines"], name, ref, workload)
                key = f"{label}_vs_{ref_name}"
                spread = summarize(paired) if paired else None
                ratios[key] = spread.median if spread else None
                ranges[key] = [spread.min, spread.max] if spread else None
        s["ratios"], s["ratio_ranges"] = ratios, ranges
        peak = matmul_ceiling(roof["matmul_flops"], precision)
        s["roofline"] = {
            "weight_bytes": weight_bytes,
            "decode_share_of_bandwidth": decode_fraction(decode, weight_bytes,
                                                         roof["bandwidth_bytes_s"])
            if decode else None,
            "throughput_share_of_matmul_peak": throughput_fraction(
                total, numbers["matmul_params"], peak) if total else None,
        }
    return summary


def _cell(summary: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not summary:
        return "–"
    med, lo, hi = (summary[k] * scale for k in ("median", "min", "max"))
    if summary["n"] == 1 or lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _ratio(s: dict, key: str) -> str:
    value, span = s["ratios"][key], s["ratio_ranges"][key]
    if value is None:
        return "–"
    if span[0] == span[1]:
        return f"{value:.2f}×"
    return f"{value:.2f}× ({span[0]:.2f}–{span[1]:.2f})"


def _share(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.0f} %" + (" ↑" if value > 1 else "")


def render_markdown(report: dict) -> str:
    m, roof, summary = report["machine"], report["roofline"], report["summary"]
    bandwidth = roof["bandwidth_bytes_s"]
    params = report["model_numbers"]["params"]
    model = report.get("model_name") or Path(report["model"]).name  # runs before: no name
    lines = [
        f"Measured {report['date']} on {m.get('cpu', 'an unknown CPU')}, {m['cores']} cores, "
        f"{m.get('memory_gib', '?')} GiB" + (f", {m['gpu']}" if m.get("gpu") else "") +
        f"; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}. Model: {model} "
        f"({params / 1e6:.0f} M parameters). Prompts: {report['prompts']['source']}.",
        "",
        f"Ceilings measured at the start of the run: memory bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, so batch-1 decode cannot exceed "
        f"{bandwidth / (4 * params):.0f} tok/s in float32 or {bandwidth / (2 * params):.0f} "
        f"in 16-bit; matmul {roof['matmul_flops']['float32'] / 1e9:.0f} GFLOP/s in float32, "
        f"{roof['matmul_flops']['bfloat16'] / 1e9:.0f} in bfloat16 (16-bit engines are held "
        f"to the faster of the two: widened to float32, 16-bit weights multiply at float32's "
        f"rate).",
        "",
        "Medians of the repetitions, (min–max) where they differ. latency: one "
        f"{report['prompts']['latency_len']}-token prompt, 128 new tokens; throughput: 64 "
        "prompts of 128 tokens at once, 128 new tokens each; start: new process to ready "
        "and to its first token, compile cache warm (cold: empty). Every repetition has "
        "prompts of its own, so no engine serves one from a prefix cache, and the engines "
        "take turns: repetition r runs on each of them before repetition r + 1 starts.",
        "",
        "| engine | precision | decode tok/s | ITL p50 / p99 ms | TTFT ms | output tok/s | "
        "total tok/s | ready s | first token s | cold first token s | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        lat, thr = s.get("latency", {}), s.get("throughput", {})
        start, cold = s.get("startup", {}), s.get("startup_cold", {})
        itl = (f"{lat['itl_p50_ms']['median']:.1f} / {lat['itl_p99_ms']['median']:.1f}"
               if lat else "–")
        rss = s.get("memory", {}).get("peak_rss_mib")
        lines.append(
            f"| {name} | {report['engines'][name]['precision']} | "
            f"{_cell(lat.get('decode_tok_s'))} | {itl} | "
            f"{_cell(lat.get('ttft_s'), 1000, 0)} | {_cell(thr.get('output_tok_s'))} | "
            f"{_cell(thr.get('total_tok_s'))} | {_cell(start.get('ready_s'))} | "
            f"{_cell(start.get('first_token_s'))} | {_cell(cold.get('first_token_s'))} | "
            f"{'–' if rss is None else f'{rss:.0f}'} |")
    lines += [
        "",
        "Ratios: each repetition runs on every engine in one turn, so each engine's speed is "
        "divided by the reference's of the same turn; the median of those, (min–max) where "
        "they differ.",
        "",
        "| engine | decode × transformers | decode × vLLM | output × transformers | "
        "output × vLLM | decode share of bandwidth ceiling | throughput share of matmul peak |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        roofs = s["roofline"]
        lines.append(
            f"| {name} | {_ratio(s, 'decode_vs_transformers')} | {_ratio(s, 'decode_vs_vllm')} "
            f"| {_ratio(s, 'output_vs_transformers')} | {_ratio(s, 'output_vs_vllm')} | "
            f"{_share(roofs['decode_share_of_bandwidth'])} | "
            f"{_share(roofs['throughput_share_of_matmul_peak'])} |")
    shares = [s["roofline"][key] or 0 for s in summary.values()
              for key in ("decode_share_of_bandwidth", "throughput_share_of_matmul_peak")]
    if max(shares, default=0) > 1:
        lines += ["", "↑ above the ceiling: the ceilings are torch's own sum and matrix "
                  "product, and that engine's kernels ran faster than torch's there, so "
                  "the ceiling measured is not its limit."]
    agreement = [_agreement_line(name, s["agreement"]) for name, s in summary.items()
                 if "agreement" in s]
    if agreement:
        lines += ["", "Greedy tokens of the first repetition against an engine at the same "
                  "precision:", *agreement]
    notes = [f"- {name}: {why}" for name, s in summary.items()
             for why in s.get("unsupported", {}).values()]
    notes += [f"- {name} skipped: {why}" for name, why in report["skipped"].items()]
    if notes:
        lines += ["", "Not measured:", *notes]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def _agreement_line(name: str, agreement: dict) -> str:
    parts = []
    for workload in ("latency", "throughput"):
        a = agreement.get(workload)
        if a is None:
            continue
        part = f"{workload} {a['identical']}/{a['sequences']} sequences identical"
        if a["identical"] < a["sequences"]:
            part += f" ({100 * a['common_prefix_share']:.0f} % of tokens before the first " \
                    f"difference)"
        parts.append(part)
    return f"- {name} vs {agreement['reference']}: " + "; ".join(parts)


# What `kiln bench --compare` sets side by side: (label, workload, metric, scale, digits).
COMPARED = [
    ("decode tok/s", "latency", "decode_tok_s", 1, 1),
    ("TTFT ms", "latency", "ttft_s", 1000, 0),
    ("output tok/s", "throughput", "output_tok_s", 1, 1),
    ("total tok/s", "throughput", "total_tok_s", 1, 1),
    ("ready s", "startup", "ready_s", 1, 2),
    ("first token s", "startup", "first_token_s", 1, 2),
    ("cold first token s", "startup_cold", "first_token_s", 1, 1),
]


def render_comparison(before: dict, after: dict) -> str:
    """Markdown: each engine both runs measured, each metric's medians and the change."""
    lines = [f"Before: {before['date']} ({before.get('command') or 'no command'}); after: "
             f"{after['date']} ({after.get('command') or 'no command'}).", "",
             "| engine | metric | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for name in [n for n in after["summary"] if n in before["summary"]]:
        for label, workload, metric, scale, digits in COMPARED:
            old = before["summary"][name].get(workload, {}).get(metric)
            new = after["summary"][name].get(workload, {}).get(metric)
            if not old or not new:
                continue
            a, b = old["median"] * scale, new["median"] * scale
            change = f"{100 * (b / a - 1):+.1f} %" if a else "–"
            lines.append(f"| {name} | {label} | {a:.{digits}f} | {b:.{digits}f} | {change} |")
    only = sorted(set(before["summary"]) ^ set(after["summary"]))
    if only:
        lines += ["", f"Measured in one run only: {', '.join(only)}."]
    return "\n".join(lines) + "\n"


def render_png(report: dict, path: Path) -> Path | None:
    """Bars of decode and output tokens/s per engine, with min–max whiskers. None if
    matplotlib is missing (the JSON and markdown are written regardless)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = report["summary"]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2), sharey=True)
    for ax, (workload, metric, title) in zip(axes, [
            ("latency", "decode_tok_s", "latency: batch-1 decode tok/s"),
            ("throughput", "output_tok_s", "throughput: output tok/s (64 prompts)")]):
        values = [summary[n].get(workload, {}).get(metric) for n in names]
        med = [v["median"] if v else 0 for v in values]
        err = [[v["median"] - v["min"] if v else 0 for v in values],
               [v["max"] - v["median"] if v else 0 for v in values]]
        colors = ["tab:orange" if n.startswith("kiln") else "tab:gray" for n in names]
        ax.barh(names, med, xerr=err, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
        for y, (v, m) in enumerate(zip(values, med)):
            ax.text(m, y, f" {m:.0f}" if v else " not measured", va="center")
    fig.suptitle(f"kiln bench, {report['date']}, {report['machine'].get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def update_readme(readme: Path, report: dict) -> None:
    """Replace the README's generated Performance block with this run's table."""
    block = f"{README_START}\n{render_markdown(report)}{README_END}"
    text = readme.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text)
