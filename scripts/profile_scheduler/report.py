"""Per-task figures of the scheduler thread from sitecustomize.py's dumps, between the first instance start and
the last dump with at most MAX_STARTS starts (the bench's first mode: e.g. 66 for 64 react-agent tasks plus the
warm-ups; bench/agentic.py runs the inferlet mode first).

    python3 scripts/profile_scheduler/report.py PREFIX MAX_STARTS [--all]
"""
import glob
import json
import sys


def main() -> None:
    prefix, max_starts, show_all = sys.argv[1], int(sys.argv[2]), "--all" in sys.argv
    for path in sorted(p for p in glob.glob(prefix + ".*") if p.rsplit(".", 1)[-1].isdigit()):
        rows = [row for row in map(json.loads, open(path)) if row.get("add", [0])[0] >= 1]
        if not rows:
            continue
        first, last = rows[0], [row for row in rows if row["add"][0] <= max_starts][-1]
        delta = {key: [last[key][0] - first.get(key, [0, 0])[0], last[key][1] - first.get(key, [0, 0])[1]]
                 for key in last if key != "wall"}
        tasks = max(1, delta["add"][0])
        lean = sum(s for key, (_, s) in delta.items() if key.startswith("lean_run") or key == "finish_call")
        guest = delta["step_total"][1] - delta["step_callbacks"][1] - lean
        print(f"{path}: {tasks} instance starts in {last['wall'] - first['wall']:.1f} s")
        print(f"  per task: polls {delta['step_total'][1] / tasks * 1e3:.1f} ms wall, "
              f"{delta['step_cpu'][1] / tasks * 1e3:.1f} ms CPU, {delta['step_faults'][0] / tasks:.0f} page faults; "
              f"callbacks in polls {delta['step_callbacks'][1] / tasks * 1e3:.1f} ms, guest ~{guest / tasks * 1e3:.1f} ms")
        if show_all:
            for key, (n, s) in sorted(delta.items(), key=lambda item: -item[1][1]):
                if n and key.startswith(("cb:", "lean_run:", "guest>")):
                    print(f"  {key:<40} {n / tasks:6.1f} per task  {s / tasks * 1e3:7.2f} ms  {s / n * 1e6:7.1f} us each")


if __name__ == "__main__":
    main()
