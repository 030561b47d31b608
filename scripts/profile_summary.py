"""Summarises a py-spy profile written with `--format raw` (collapsed stacks: "frame;frame;... COUNT" per line):
samples per process and per thread, then per process the functions with the most inclusive samples.

    python3 scripts/profile_summary.py PROFILE.raw [--top 30]

py-spy names the process in the first frame ("process PID:\"command\""; with --subprocesses a child's frame
follows its parents') and, with --threads (which scripts/gpu_serving.sh passes), the thread in the next; a function counts once per sample
however often it recurs in the stack. Frames look like "name (file.py:line)": the line is dropped, so a
function's samples add up over its lines.
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

Counter = collections.Counter


def parse(path: Path) -> list[tuple[list[str], int]]:
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((_joined(stack.split(";")), int(count)))
    return samples


def _joined(frames: list[str]) -> list[str]:
    """A process frame's command line may hold ';' (python -c "...; ..."): its pieces joined again."""
    out: list[str] = []
    for frame in frames:
        if out and out[-1].startswith("process ") and not out[-1].endswith('"'):
            out[-1] += ";" + frame
        else:
            out.append(frame)
    return out


def _function(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)'."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    return frame if match is None else f"{match.group(1)} ({Path(match.group(2)).name})"


def summarise(samples: list[tuple[list[str], int]], top: int) -> str:
    total = sum(count for _, count in samples)
    per_process: dict[str, Counter] = collections.defaultdict(Counter)
    per_thread: Counter = Counter()
    for frames, count in samples:
        depth = 0  # with --subprocesses a child's samples sit under its parents' process frames: the last names it
        while depth + 1 < len(frames) and frames[depth + 1].startswith("process "):
            depth += 1
        process = frames[depth][:90]
        thread = frames[depth + 1][:60] if len(frames) > depth + 1 and frames[depth + 1].startswith("thread") else "-"
        per_thread[(process, thread)] += count
        seen: set[str] = set()
        for frame in frames[depth + 1:]:
            name = _function(frame)
            if name not in seen:
                seen.add(name)
                per_process[process][name] += count
    lines = [f"{total} samples"]
    for process, functions in sorted(per_process.items(), key=lambda item: -sum(
            c for (p, _), c in per_thread.items() if p == item[0])):
        process_total = sum(c for (p, _), c in per_thread.items() if p == process)
        lines.append(f"\n== {process}: {process_total} samples ({100 * process_total / total:.0f} %)")
        for (p, thread), count in per_thread.most_common():
            if p == process:
                lines.append(f"   {count:7d} {100 * count / process_total:5.1f} %  {thread}")
        ranked = [(n, c) for n, c in functions.most_common() if not n.endswith("(threading.py)")]
        for name, count in ranked[:top]:
            if not name.startswith("thread"):
                lines.append(f"   {count:7d} {100 * count / process_total:5.1f} %  {name[:110]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(summarise(parse(args.profile), args.top))


if __name__ == "__main__":
    main()
