"""Side-by-side serving table from the JSON files that scripts/gpu_serving.sh leaves (bench/http_load.py's, one
pair per server and shape): bench/results/serving_vs_vllm.json and a markdown table.

    .venv/bin/python bench/serving_table.py RESULTS_DIR --card "NVIDIA H200" --commit abc1234 [--api-processes 2]

RESULTS_DIR holds pie_SHAPE_apN_{lo,hi}.json and vllm_SHAPE_{lo,hi}.json; the `pie` column of the summary is
--api-processes N, the other N found appear in the markdown table as well.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SHAPES = ("llama-3.1-8b", "smollm2-135m")


def levels(results_dir: Path, stem: str) -> dict[int, dict[str, float]]:
    by_concurrency = {}
    for part in ("lo", "hi"):
        path = results_dir / f"{stem}_{part}.json"
        if path.is_file():
            for level in json.loads(path.read_text())["levels"]:
                by_concurrency[level["concurrency"]] = {
                    "out_tok_s": round(level["output_tokens_per_s"], 1), "tpot_ms": round(level["tpot_median_ms"], 2),
                    "ttft_p90_ms": round(level["ttft_p90_ms"], 1)}
    return by_concurrency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--card", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serving_vs_vllm.json")
    args = parser.parse_args()
    found = sorted({int(m.group(1)) for p in args.results_dir.glob("pie_*_ap*_lo.json")
                    if (m := re.search(r"_ap(\d+)_lo", p.name))})
    rows, table = [], []
    for shape in SHAPES:
        vllm = levels(args.results_dir, f"vllm_{shape}")
        pies = {n: levels(args.results_dir, f"pie_{shape}_ap{n}") for n in found}
        for concurrency in sorted(vllm):
            pie = pies[args.api_processes].get(concurrency)
            if pie is None:
                continue
            rows.append({"shape": shape, "concurrency": concurrency, "pie": pie, "vllm": vllm[concurrency]})
            ratios = " | ".join(f"{pies[n][concurrency]['out_tok_s'] / vllm[concurrency]['out_tok_s']:.2f}"
                                for n in found if concurrency in pies[n])
            table.append(f"| {shape} | {concurrency} | {pie['out_tok_s']:,.0f} | {vllm[concurrency]['out_tok_s']:,.0f} | "
                         f"{ratios} | {pie['tpot_ms']:.1f} / {vllm[concurrency]['tpot_ms']:.1f} | "
                         f"{pie['ttft_p90_ms']:,.0f} / {vllm[concurrency]['ttft_p90_ms']:,.0f} |")
    args.json.write_text(json.dumps({"card": args.card, "commit": args.commit, "pie_api_processes": args.api_processes,
                                     "rows": rows}, indent=1) + "\n")
    print(f"| shape | c | pie out tok/s (api-processes {args.api_processes}) | vLLM out tok/s | "
          f"ratio at api-processes {', '.join(map(str, found))} | TPOT ms pie / vLLM | TTFT p90 ms pie / vLLM |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
