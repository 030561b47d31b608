"""Side-by-side serving table from the JSON files that scripts/gpu_serving.sh leaves (bench/http_load.py's, one
pair per server and shape): bench/results/serving_vs_vllm.json and a markdown table.

    .venv/bin/python bench/serving_table.py RUN_DIR [RUN_DIR ...] --card "NVIDIA H200" --commit abc1234 \
        [--api-processes 4]

Each RUN_DIR holds one run of both servers from one sitting: pie_SHAPE_apN_{lo,hi}.json and
vllm_SHAPE_{lo,hi}.json. With several runs, a row's `pie` and `vllm` are the mean over the runs (single runs
spread by up to 30 % at concurrency 256) and `pie_runs` / `vllm_runs` keep each run's figures; the markdown
table also gives each run's throughput ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SHAPES = ("llama-3.1-8b", "smollm2-135m")
METRICS = ("out_tok_s", "tpot_ms", "ttft_p90_ms")
Levels = dict[int, dict[str, float]]


def levels(results_dir: Path, stem: str) -> Levels:
    by_concurrency = {}
    for part in ("lo", "hi"):
        path = results_dir / f"{stem}_{part}.json"
        if path.is_file():
            for level in json.loads(path.read_text())["levels"]:
                by_concurrency[level["concurrency"]] = {
                    "out_tok_s": round(level["output_tokens_per_s"], 1), "tpot_ms": round(level["tpot_median_ms"], 2),
                    "ttft_p90_ms": round(level["ttft_p90_ms"], 1)}
    return by_concurrency


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {metric: round(statistics.fmean(run[metric] for run in runs), 2) for metric in METRICS}


def shape_rows(run_dirs: list[Path], shape: str, api_processes: int) -> list[dict]:
    pie_runs = [levels(d, f"pie_{shape}_ap{api_processes}") for d in run_dirs]
    vllm_runs = [levels(d, f"vllm_{shape}") for d in run_dirs]
    rows = []
    for concurrency in sorted(set.intersection(*(set(r) for r in pie_runs + vllm_runs))):
        pies = [run[concurrency] for run in pie_runs]
        vllms = [run[concurrency] for run in vllm_runs]
        rows.append({"shape": shape, "concurrency": concurrency, "pie": mean_of(pies), "vllm": mean_of(vllms),
                     "pie_runs": pies, "vllm_runs": vllms})
    return rows


def markdown_row(row: dict) -> str:
    pie, vllm = row["pie"], row["vllm"]
    per_run = ", ".join(f"{p['out_tok_s'] / v['out_tok_s']:.2f}" for p, v in zip(row["pie_runs"], row["vllm_runs"]))
    return (f"| {row['shape']} | {row['concurrency']} | {pie['out_tok_s']:,.0f} | {vllm['out_tok_s']:,.0f} | "
            f"{pie['out_tok_s'] / vllm['out_tok_s']:.2f} ({per_run}) | {pie['tpot_ms']:.1f} / {vllm['tpot_ms']:.1f} | "
            f"{pie['ttft_p90_ms']:,.0f} / {vllm['ttft_p90_ms']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--card", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--api-processes", type=int, default=4)
    parser.add_argument("--date", default="")
    parser.add_argument("--note", default="")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serving_vs_vllm.json")
    args = parser.parse_args()
    rows = [row for shape in SHAPES for row in shape_rows(args.run_dirs, shape, args.api_processes)]
    summary = {"card": args.card, "commit": args.commit, "date": args.date, "pie_api_processes": args.api_processes,
               "num_runs": len(args.run_dirs), "note": args.note, "rows": rows}
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"| shape | c | pie out tok/s (api-processes {args.api_processes}) | vLLM out tok/s | "
          "ratio (per run) | TPOT ms pie / vLLM | TTFT p90 ms pie / vLLM |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(markdown_row(row) for row in rows))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
