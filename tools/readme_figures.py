"""The README's measured figures, so they cannot go stale: `--record NAME` copies what the last run measured into
docs/figures/NAME.json with the library versions it ran under (demo: reports/ after `make demo`; sweep and smollm2:
reports/method_comparison.csv after `python -m stages.sweep [models=smollm2 eval.limit=100]`; bench:
reports/bench.json after `make bench`; bench_ray: reports/bench_ray.json after `merge_bench.py --executor ray`; bench_peer:
reports/bench_peer.json after `merge_bench.py --peer-env V` (both sizes, rows concatenated);
search: reports/search_bench.json after `make bench-search`; spectral: reports/spectral_bench.json after
`benchmarks/spectral_bench.py`; startup: reports/startup_bench.json after `benchmarks/startup_bench.py`;
behaviour and behaviour_b: reports/behaviour[_b].json and .png after `make bench-behaviour`). With no argument
(`make readme-figures`) every figures
block of README.md is re-rendered from those files; `--check` exits 1 when a block differs from its file.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "lm_eval", "optuna", "ray")
TASKS = {"demo_add": "add", "demo_rev": "rev", "demo_ppl": "bits/byte"}
EXPORT_KEYS = ("kl_mean", "kl_max", "top1", "top1_clear", "bytes", "passed")


def _headline(metrics: dict) -> float | None:
    value = metrics.get("exact_match", metrics.get("bits_per_byte"))
    return None if value is None else round(float(value), 3)


def record_demo() -> dict:
    """The demo's scores per model and task, from reports/metrics.json."""
    document = json.loads((REPO / "reports" / "metrics.json").read_text())
    rows = [[label, {t: _headline(m) for t, m in tasks.items()}] for label, tasks in document["parents"].items()]
    rows.append(["merged", {t: _headline(m) for t, m in document["merged"].items()}])
    merge = json.loads((REPO / "outputs" / "merged" / "mergelib_run.json").read_text())["recipe"]
    out = {"rows": rows, "merge": {"method": merge["merge_method"], "parameters": merge.get("parameters", {})}}
    export = REPO / "reports" / "export.json"
    if export.is_file():  # each GGUF in llama.cpp: KL / top-1 against the merge, held-out exact match
        out["export"] = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in check.items()
                                if k in EXPORT_KEYS or k.startswith("exact_match.")}
                         for name, check in json.loads(export.read_text())["export"].items()}
        source = next((c for c in json.loads(export.read_text())["export"].values()
                       if any(k.startswith("source_exact_match.") for k in c)), {})
        out["export"]["merge (transformers)"] = {k.removeprefix("source_"): v for k, v in source.items()
                                                 if k.startswith("source_exact_match.")}
    return out


def record_sweep() -> dict:
    """Every merge of the method sweep, from reports/method_comparison.csv."""
    rows: dict[str, dict[str, float]] = {}  # parents first, then the merges in sweep order (the file's order)
    with open(REPO / "reports" / "method_comparison.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["metric"] in ("exact_match", "bits_per_byte"):
                rows.setdefault(row["model"], {})[row["task"]] = round(float(row["value"]), 3)
    return {"rows": [[label, scores] for label, scores in rows.items()]}


def record_bench() -> dict:
    """Merge time and memory against the IO floor, from reports/bench.json (`make bench`)."""
    return {"rows": json.loads((REPO / "reports" / "bench.json").read_text())}


def record_search() -> dict:
    """Search throughput and the 3-seed demo goal, from reports/search_bench.json (benchmarks/search_bench.py)."""
    return json.loads((REPO / "reports" / "search_bench.json").read_text())


def _search_tables(data: dict) -> str:
    lines = ["| executor | workers | trials | search s | trial loop s | trials / min | setup + merge | scoring | "
             "other |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["throughput"]:
        lines.append(f"| {r['executor']} | {r['workers']} | {r['trials']} | {r['wall_s']} | {r['loop_s']} | "
                     f"{r['trials_per_min']} | "
                     f"{r['setup_merge_share']:.0%} | {r['eval_share']:.0%} | {r['other_share']:.0%} |")
    lines += ["", "| space | seed | trials | best | add kept | rev kept | default: add kept | rev kept |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in data["goal"]:
        share, default = r["heldout_share"], r["default_share"]
        lines.append(f"| {r['space']} | {r['seed']} | {r['trials']} | trial {r['best_trial']} ({r['method']}) | "
                     f"{share['demo_add']:.1%} | {share['demo_rev']:.1%} | {default['demo_add']:.1%} | "
                     f"{default['demo_rev']:.1%} |")
    return "\n".join(lines)


def record_bench_ray() -> dict:
    """A Ray merge against the local one, from reports/bench_ray.json (merge_bench.py --executor ray)."""
    return {"rows": json.loads((REPO / "reports" / "bench_ray.json").read_text())}


def record_bench_peer() -> dict:
    """mergelib against mergekit in the same run, from reports/bench_peer.json (merge_bench.py --peer-env)."""
    return {"rows": json.loads((REPO / "reports" / "bench_peer.json").read_text())}


def _bench_peer_table(rows: list[dict]) -> str:
    lines = ["| family | case | mergelib s | mergekit s (flags) | time ratio | mergelib / mergekit peak RSS MB | RSS ratio "
             "| IO floor s | mergelib / floor | mergekit / floor |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['case']} | {r['merge_s']} | {r['mergekit_s']} ({r['mergekit_flags']}) | "
                     f"{r['time_vs_mergekit']}x | {r['merge_peak_rss_mb']} / {r['mergekit_peak_rss_mb']} | "
                     f"{r['rss_vs_mergekit']}x | {r['floor_s']} | {r['ratio']}x | {r['mergekit_vs_floor']}x |")
    return "\n".join(lines)


def _bench_ray_table(rows: list[dict]) -> str:
    lines = ["| family | case | shards | local s | Ray s | Ray / local | local peak RSS MB | worker peak RSS MB | "
             "same bytes | inputs GB | read GB/s cold / warm |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        bandwidth = f"{r['read_gbps_cold']} / {r['read_gbps_warm']}" if "read_gbps_cold" in r else "-"
        lines.append(f"| {r['size']} | {r['case']} | {r['shards']} | {r['local_s']} | {r['ray_s']} | {r['ratio']}x | "
                     f"{r['local_peak_rss_mb']} | {r['worker_peak_rss_mb']} | {'yes' if r['identical'] else 'NO'} | "
                     f"{r.get('input_gb', '-')} | {bandwidth} |")
    return "\n".join(lines)


def _bench_table(rows: list[dict]) -> str:
    lines = ["| family | case | merge s | IO floor s | merge / floor | merge peak RSS MB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['case']} | {r['merge_s']} | {r['floor_s']} | {r['ratio']}x | "
                     f"{r['merge_peak_rss_mb']} |")
    return "\n".join(lines)


def record_spectral() -> dict:
    """Seconds per weight matrix of the spectral methods, from reports/spectral_bench.json (spectral_bench.py)."""
    return json.loads((REPO / "reports" / "spectral_bench.json").read_text())


def record_startup() -> dict:
    """Start-up against the floor of importing torch, from reports/startup_bench.json (startup_bench.py)."""
    return json.loads((REPO / "reports" / "startup_bench.json").read_text())


def _startup_table(d: dict) -> str:
    rows = [("`python -c pass`", "python_pass"), ('`python -c "import torch"` (the floor)', "import_torch"),
            ("`mergelib --help`", "help"), ("`mergelib merge --dry-run` (tiny family)", "dry_run"),
            (f"`mergelib merge` (tiny family, {d['method']})", "merge")]
    lines = ["| command | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {label} | {d[key + '_s']} | {d[key + '_cpu_s']} |" for label, key in rows]
    lines += ["", f"Work of that merge (its second run in one process): {d['work_s']} s wall, {d['work_cpu_s']} s CPU; "
              f"the first run in a process, "
              f"which loads the kernels from numba's cache: {d['first_merge_in_process_s']} s; kernels compiled "
              f"during the merges: {d['kernels_compiled']}. Merge / (import torch + work): {d['ratio']}x wall, "
              f"{d['cpu_ratio']}x CPU (target <= {d['target_ratio']}x). Fastest of {d['repeat']} runs each."]
    return "\n".join(lines)


def _spectral_table(data: dict) -> str:
    size, tasks = data["size"], data["tasks"]
    difference = data.get("relative_difference_to_exact", {})
    lines = [f"| method | s per {size}x{size} matrix ({tasks} task vectors, {data['threads']} thread) | "
             "/ task_arithmetic | merged task vector: relative difference to exact SVDs |", "|---|---:|---:|---:|"]
    for method, seconds in data["seconds"].items():
        lines.append(f"| {method} | {seconds} | {data['ratio_to_task_arithmetic'][method]}x | "
                     f"{difference.get(method, '-')} |")
    return "\n".join(lines)


def _record_behaviour(name: str) -> dict:
    """The behavioural benchmark's summary, from reports/NAME.json (benchmarks/behaviour/run.py), its plot copied
    beside it as docs/figures/NAME.png."""
    import shutil

    data = json.loads((REPO / "reports" / f"{name}.json").read_text())
    shutil.copyfile(REPO / "reports" / f"{name}.png", FIGURES / f"{name}.png")
    keep = ("tier", "tasks", "seeds", "settings", "left_out", "summary", "wall_s", "family")
    out = {k: data[k] for k in keep if k in data}
    if data.get("per_seed") and "ties_cut" in data["per_seed"][0]:
        out["ties_cut"] = data["per_seed"][0]["ties_cut"]
    return out


def _parameters(setting: dict) -> str:
    values = {**setting["parameters"], **setting["per_model"]}
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "defaults"


def _behaviour_tables(name: str, data: dict) -> str:
    seeds, summary = len(data["seeds"]), data["summary"]
    rows = sorted((k for k in summary if not k.startswith("_")), key=lambda k: -summary[k]["normalised"]["mean"])
    tasks = data["tasks"]
    lines = [f"![normalised accuracy per method](docs/figures/{name}.png)", "",
             f"| method | parameters | normalised accuracy, mean [min, max] over {seeds} seeds | "
             + " | ".join(tasks) + " |", "|---|---|---:|" + "---:|" * len(tasks)]
    for label in rows:
        n = summary[label]["normalised"]
        setting = data["settings"].get(label)
        params = _parameters(setting) if setting else "-"
        cells = " | ".join(f"{summary[label]['accuracy'][t]:.2f}" for t in tasks)
        lines.append(f"| {label} | {params} | {n['mean']:.3f} [{n['min']:.3f}, {n['max']:.3f}] | {cells} |")
    notes = []
    if "_init" in summary:
        init = summary["_init"]
        notes.append(f"Averaging two fine-tunes (heads included): of one pre-trained model "
                     f"{init['same_init']['mean']:.3f}, of two independently initialised ones "
                     f"{init['independent_init']['mean']:.3f} normalised accuracy (mean over seeds).")
    if "ties_cut" in data:
        shares = ", ".join(f"`{k}` {v:.1%}" for k, v in data["ties_cut"].items())
        notes.append(f"Share of each tensor `ties_paper` keeps at density 0.2 (seed {data['seeds'][0]}, mean over the "
                     f"fine-tunes; `ties` keeps 20% of every tensor): {shares}.")
    if data.get("left_out"):
        notes.append("Left out: " + "; ".join(f"`{k}` ({v})" for k, v in data["left_out"].items()) + ".")
    notes.append(f"Per-task columns: mean accuracy over seeds. Whole run: {data.get('wall_s', '-')} s on a shared "
                 "2-core machine under load.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def _table(rows: list[list], bold: str | None = None) -> str:
    """A markdown table of [label, {task: value}] rows, one column per known task present."""
    tasks = [t for t in TASKS if any(t in scores for _, scores in rows)]
    lines = ["| model | " + " | ".join(TASKS[t] for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, scores in rows:
        cells = [f"{scores[t]:.3f}" if scores.get(t) is not None else "-" for t in tasks]
        if label == bold:
            label, cells = f"**{label}**", [f"**{c}**" for c in cells]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _export_table(checks: dict) -> str:
    """The export stage's GGUF files: read by llama.cpp, against the merge in transformers, and their answers."""
    lines = ["The export stage's files, loaded by llama.cpp and compared with the merge in transformers on fixed "
             "prompts (KL(merge ‖ file) per position, top-1 agreement where the merge has a clear winner), then "
             "answering the same held-out prompts greedily in llama.cpp (last row: the merge itself, greedy in "
             "transformers).", "",
             "| file | MB | KL mean | KL max | top-1 | add | rev |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in checks.items():
        if not name.startswith(("gguf-", "merge ")):
            continue
        size = f"{c['bytes'] / 1e6:.2f}" if "bytes" in c else "-"
        kl = [f"{c[k]:.4f}" if k in c else "-" for k in ("kl_mean", "kl_max")]
        top1 = f"{c['top1_clear']:.3f}" if "top1_clear" in c else "-"
        em = [f"{c[f'exact_match.{t}']:.3f}" if f"exact_match.{t}" in c else "-" for t in ("add", "rev")]
        lines.append(f"| {name} | {size} | {kl[0]} | {kl[1]} | {top1} | {em[0]} | {em[1]} |")
    return "\n".join(lines)


def render(name: str, data: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in data["libraries"].items())
    if name == "demo":
        params = " ".join(f"{k}={v}" for k, v in sorted(data["merge"]["parameters"].items()))
        text = (f"Default merge: {data['merge']['method']} {params}; exact match on 200 held-out prompts per skill, "
                "bits per byte on held-out text (lower is better).\n\n" + _table(data["rows"], bold="merged"))
        if data.get("export"):
            text += "\n\n" + _export_table(data["export"])
    elif name in ("sweep", "smollm2"):
        text = _table(data["rows"])
    elif name == "bench_ray":
        text = _bench_ray_table(data["rows"])
    elif name == "bench_peer":
        text = _bench_peer_table(data["rows"])
    elif name.startswith("bench"):
        text = _bench_table(data["rows"])
    elif name == "search":
        text = _search_tables(data)
    elif name == "spectral":
        text = _spectral_table(data)
    elif name == "startup":
        text = _startup_table(data)
    elif name.startswith("behaviour"):
        text = _behaviour_tables(name, data)
    else:
        raise SystemExit(f"docs/figures/{name}.json: no renderer for '{name}'")
    return f"{text}\n\n<sub>Measured with {versions} (`python tools/readme_figures.py --record {name}`).</sub>\n"


def rendered_readme() -> str:
    text = (REPO / "README.md").read_text()

    def fill(match: re.Match) -> str:
        path = FIGURES / f"{match['name']}.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run `python tools/readme_figures.py --record {match['name']}`")
        return match.group(1) + render(match["name"], json.loads(path.read_text())) + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    if "--record" in argv:
        name = argv[argv.index("--record") + 1]
        recorders = {"demo": record_demo, "sweep": record_sweep, "smollm2": record_sweep, "bench": record_bench,
                     "search": record_search, "bench_ray": record_bench_ray,
                     "spectral": record_spectral, "startup": record_startup, "bench_peer": record_bench_peer,
                     "behaviour": lambda: _record_behaviour("behaviour"),
                     "behaviour_b": lambda: _record_behaviour("behaviour_b")}
        if name not in recorders:
            print(f"--record: one of {', '.join(recorders)}, not '{name}'", file=sys.stderr)
            return 2
        FIGURES.mkdir(parents=True, exist_ok=True)
        from mergelib.merging.versions import package_versions

        data = {**recorders[name](), "libraries": package_versions(LIBRARIES)}
        (FIGURES / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    new = rendered_readme()
    if "--check" in argv:
        if new != (REPO / "README.md").read_text():
            print("README.md: a figures block differs from docs/figures/; run `make readme-figures`", file=sys.stderr)
            return 1
        return 0
    (REPO / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
