"""What the benchmark found, as rows: latency medians and spreads per case and configuration,
speedups against 1 rank, the bandwidth floor, logits errors against float32, float32 token
identity. Printed as Markdown tables, written as JSON and as a PNG bar chart (speedups against 1
rank, or next token over the floor where no 1-rank configuration ran)."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

BASELINE = "transformers"  # the unsharded model on 1 rank with every core


def case_name(case: dict) -> str:
    return f"{'greedy' if case['beams'] == 1 else 'beam ' + str(case['beams'])}, in {case['input']}"


def _merged(results: list[dict], index: int) -> dict[str, list[float]]:
    return {k: [x for r in results for x in r["cases"][index][k]] for k in ("first", "next")}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3, "max_ms": max(values) * 1e3}


def latency_rows(model: str, timed: dict[str, list[dict]], labels: dict[str, str]) -> list[dict]:
    rows = []
    base = timed.get(BASELINE) or []
    for key, results in timed.items():
        if not results:
            continue
        floors = [r["floor_s"] for r in results if r.get("floor_s")]
        for i, case in enumerate(results[0]["cases"]):
            got = _merged(results, i)
            row = {"model": model, "case": case_name(case), "beams": case["beams"], "input": case["input"],
                   "config": key, "label": labels[key], "next": _spread(got["next"]), "first": _spread(got["first"]),
                   "runs": len(got["next"]), "collectives_per_token": results[0]["collectives_per_token"],
                   "backend": results[0]["backend"], "packed_layers": results[0]["packed_layers"],
                   "int8_layers": results[0].get("int8_layers", 0),
                   "bytes_per_rank": results[0]["bytes_per_rank"],
                   "warmup_s": statistics.median(r.get("warmup_s", float("nan")) for r in results),
                   "compiled": results[0].get("compiled", False),
                   "floor_ms": statistics.median(floors) * 1e3 if floors else None}
            row["next_over_floor"] = row["next"]["median_ms"] / row["floor_ms"] if floors else None
            paired = [(n, f) for r in results for n, f in zip(r["cases"][i]["next"], r["cases"][i].get("floors") or [])]
            if paired and len(paired) == row["runs"]:  # each run over the floor sampled right before it
                row["floor_ms"] = statistics.median(f for _, f in paired) * 1e3
                row["next_over_floor"] = statistics.median(n / f for n, f in paired)
            cache = case.get("cache_bytes")  # (results written before runs carried it have none)
            row["cache_mb"] = cache / 1e6 if cache is not None else None
            if cache is not None and row["next_over_floor"] is not None:  # the floor with the cache read too
                row["next_over_floor_with_cache"] = row["next_over_floor"] / (1 + cache / row["bytes_per_rank"])
            if base:
                ref = _merged(base, i)
                row["speedup_next"] = statistics.median(ref["next"]) * 1e3 / row["next"]["median_ms"]
                row["speedup_first"] = statistics.median(ref["first"]) * 1e3 / row["first"]["median_ms"]
            rows.append(row)
    return rows


def accuracy_rows(model: str, raw: dict[str, Any], labels: dict[str, str]) -> list[dict]:
    """Per configuration: its timed-dtype logits error against the float32 unsharded model,
    the unsharded timed-dtype model's own, and whether its float32 tokens equal the unsharded
    model's on every case."""
    check, timed = raw.get("check", {}), raw.get("time", {})
    ref_runs = check.get(BASELINE) or []
    ref = torch.load(ref_runs[0]["logits_path"]) if ref_runs else None
    own = None
    if ref is not None and timed.get(BASELINE):
        own = (torch.load(timed[BASELINE][0]["logits_path"]) - ref).abs().max().item()
    rows = []
    for key, results in timed.items():
        row: dict[str, Any] = {"model": model, "config": key, "label": labels[key]}
        if ref is not None and results:
            err = (torch.load(results[0]["logits_path"]) - ref).abs().max().item()
            row.update(logits_err=err, ref_logits_absmax=ref.abs().max().item(), baseline_err=own,
                       err_over_baseline=err / own if own else None)
        if ref_runs and check.get(key):
            row["fp32_tokens"] = token_verdict(ref_runs[0]["cases"], check[key][0]["cases"])
        rows.append(row)
    return rows


def token_verdict(ref_cases: list[dict], cases: list[dict]) -> str:
    for ref, got in zip(ref_cases, cases):
        for b, (a_row, b_row) in enumerate(zip(ref["tokens"], got["tokens"])):
            if a_row != b_row:
                step = next(i for i, (x, y) in enumerate(zip(a_row, b_row)) if x != y)
                return f"differ: {case_name(ref)}, sequence {b}, step {step}"
    return "identical"


def int8_ratios(rows: list[dict], twins: dict[str, str]) -> None:
    """For each INT8 row: its bf16 twin's (same ranks and options) median over its own."""
    by_key = {(r["model"], r["case"], r["config"]): r for r in rows}
    for r in rows:
        twin = by_key.get((r["model"], r["case"], twins.get(r["config"], "")))
        if twin:
            r["bf16_over_int8_next"] = twin["next"]["median_ms"] / r["next"]["median_ms"]
            r["bf16_over_int8_first"] = twin["first"]["median_ms"] / r["first"]["median_ms"]
            r["bf16_twin"] = twin["label"]


def build(args: argparse.Namespace, machine: dict, models: dict, raw: dict, labels: dict[str, str],
          twins: dict[str, str] | None = None) -> dict:
    rows, accuracy = [], []
    for model, phases in raw.items():
        rows += latency_rows(model, phases.get("time", {}), labels)
        accuracy += accuracy_rows(model, phases, labels)
    int8_ratios(rows, twins or {})
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"machine": machine, "settings": settings, "models": models, "latency": rows, "accuracy": accuracy,
            "token_mismatches": [a for a in accuracy if a.get("fp32_tokens", "identical") != "identical"]}


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"{m['cpu']}, {m['physical_cores']} physical cores, ISA {' '.join(m['isa'])}; torch {m['torch']}, "
             f"transformers {m['transformers']}; native kernels: {m['native_kernels']}",
             f"timed dtype {doc['settings']['dtype']}, batch {doc['settings']['batch']}, "
             f"{doc['settings']['new_tokens']} new tokens; latencies are medians over "
             f"{doc['settings']['rounds']} rounds x {doc['settings']['runs']} runs (min-max in brackets)", ""]
    for model, facts in doc["models"].items():
        lines += [f"### {model} ({facts['model_type']}, {facts['parameters'] / 1e9:.2f} B parameters)", "",
                  "| case | configuration | next token ms | floor ms | x floor | cache MB/step | x floor with cache "
                  "| speedup | first token ms | speedup | collectives/token |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in doc["latency"] if r["model"] == model):
            n, f = r["next"], r["first"]
            lines.append(f"| {r['case']} | {r['label']} | {n['median_ms']:.1f} ({n['min_ms']:.1f}-{n['max_ms']:.1f}) "
                         f"| {_fmt(r['floor_ms'])} | {_fmt(r['next_over_floor'], '.2f')} "
                         f"| {_fmt(r.get('cache_mb'))} | {_fmt(r.get('next_over_floor_with_cache'), '.2f')} "
                         f"| {_fmt(r.get('speedup_next'), '.2f', 'x')} | {f['median_ms']:.1f} "
                         f"({f['min_ms']:.1f}-{f['max_ms']:.1f}) | {_fmt(r.get('speedup_first'), '.2f', 'x')} "
                         f"| {r['collectives_per_token']} |")
        int8 = [r for r in doc["latency"] if r["model"] == model and "bf16_over_int8_next" in r]
        if int8:
            lines += ["", "| case | quantized configuration | against | next token: bf16 / quantized "
                      "| next token: quantized / bf16 | first token: bf16 / quantized |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['case']} | {r['label']} | {r['bf16_twin']} | {r['bf16_over_int8_next']:.2f}x "
                      f"| {1 / r['bf16_over_int8_next']:.2f} | {r['bf16_over_int8_first']:.2f}x |" for r in int8]
        warm = {r["label"]: r for r in doc["latency"] if r["model"] == model}
        lines += ["", "| configuration | decoding step | warm-up s (median per process; compiling, if compiled) |",
                  "| --- | --- | --- |"]
        lines += [f"| {label} | {'compiled' if r['compiled'] else 'eager'} | {r['warmup_s']:.1f} |"
                  for label, r in warm.items()]
        lines += ["", f"| configuration | max abs logits error vs float32 | unsharded {doc['settings']['dtype']}'s "
                  "| ratio | float32 tokens vs unsharded |", "| --- | --- | --- | --- | --- |"]
        for a in (a for a in doc["accuracy"] if a["model"] == model):
            lines.append(f"| {a['label']} | {_fmt(a.get('logits_err'), '.4f')} | {_fmt(a.get('baseline_err'), '.4f')} "
                         f"| {_fmt(a.get('err_over_baseline'), '.2f')} | {a.get('fp32_tokens', '-')} |")
        lines.append("")
    return "\n".join(lines)


# What the chart plots, first that the run measured: speedups against 1 rank (a run with a
# 1-rank configuration), else each configuration's next token over the bandwidth floor.
CHART_PANELS = ([("speedup_next", "next token speedup vs 1 rank"), ("speedup_first", "first token speedup vs 1 rank")],
                [("next_over_floor", "next token time / bandwidth floor")])


def chart_panels(doc: dict) -> list[tuple[str, str]]:
    """The (metric, axis title) panels :func:`chart` draws for ``doc``; empty when no row has any."""
    for panels in CHART_PANELS:
        if any(r.get(panels[0][0]) is not None for r in doc["latency"]):
            return panels
    return []


def chart(doc: dict, path: Path) -> str | None:
    """Bar chart, one column per model, of :func:`chart_panels`. Returns why there is none (None: written)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    panels = chart_panels(doc)
    if not panels:
        return "no row has a speedup against 1 rank or a bandwidth floor"
    models = list(doc["models"])
    fig, axes = plt.subplots(len(panels), len(models), figsize=(6 * len(models), 3.5 * len(panels)), squeeze=False)
    for col, model in enumerate(models):
        rows = [r for r in doc["latency"] if r["model"] == model and r.get(panels[0][0]) is not None]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        configs = list(dict.fromkeys(r["label"] for r in rows))
        width = 0.8 / max(1, len(configs))
        for line, (metric, title) in enumerate(panels):
            ax = axes[line][col]
            for j, label in enumerate(configs):
                values = [next((r.get(metric) or 0 for r in rows if r["case"] == c and r["label"] == label), 0)
                          for c in cases]
                ax.bar([i + (j - (len(configs) - 1) / 2) * width for i in range(len(cases))], values, width,
                       label=label)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(cases)), cases, fontsize=8)
            ax.set_ylabel(title)
            ax.set_title(f"{model}: {title}")
        if configs:
            axes[0][col].legend(fontsize=7)
    fig.suptitle(f"autotp, {doc['machine']['cpu']}, {doc['settings']['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(doc: dict, out: Path, log) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(doc)
    print(text)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    png = out.with_suffix(".png")
    why = chart(doc, png)
    if why is None:
        log(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')} and {png}")
    else:
        log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}; no chart: {why}")
