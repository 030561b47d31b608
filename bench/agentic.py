"""Agents as inferlets vs. agents as OpenAI clients (issue 13): a ReAct-style workload run (a) as the react-agent
inferlet (inferlets/contrib/react-agent: one run per task, the tool calls made from inside the server, the KV cache
kept between steps) and (b) as an OpenAI-client loop against the same server (chat.completions with a JSON-schema
response format, the conversation sent again each step, the server's prefix cache on).

    .venv/bin/python -m bench.agentic --quick          # a small CPU run with the default model (< 3 minutes)
    .venv/bin/python -m bench.agentic [--model PATH] [--device cuda] [--concurrency 1 2 4 8 16 32 64 128]
        [--tasks-per-level 0] [--tasks-per-agent 1] [--calls 8] [--tool-latency-ms 100]
        [--modes inferlet inferlet-json client]
        [--json bench/results/agentic.json]

Per task: a distinct question, then `--calls` tool calls (the grammar offers `finish` only after them, then forces
it). Each action is one JSON object {"tool", "input"} (and "thought" with --thought-chars) whose values are exactly
that many lowercase letters and spaces, so a step's work hardly depends on what the model writes: the client's
server decodes about 16 tokens per action with the defaults. Each tool call is a POST to a tool server in this
process that answers after --tool-latency-ms with an observation of --observation-words words.

Modes: `inferlet` is the react-agent as written for the server (it writes the action's fixed JSON text itself and
decodes only the values); `inferlet-json` decodes the whole action under the same JSON schema as the client's server
does (the client's decode work in the inferlet: a control for what the template saves); `client` is
the OpenAI-client loop. The modes run in turn at each concurrency level (never at the same time), each on distinct
questions (so that only the system prompt is in the prefix cache for both). Latency = a task's wall time; throughput
= tasks / the level's wall time. The last line is `speedup: X.XX`, the throughput ratio inferlet / client at the
highest concurrency run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import openai

from bench.http_load import LocalServer
from pie_server.app.inferlet_build import build_inferlet
from pie_server.inferlets import CONTRIB_DIR

TOOLS = {"search": "looks a fact up on the web", "calculate": "evaluates an arithmetic expression"}
CITIES = ["Lyon", "Porto", "Kyoto", "Quito", "Oslo", "Cairo", "Perth", "Lima", "Turin", "Dakar", "Hanoi", "Basel"]
INFERLET_NAME = "react-agent"
# Uploaded under a name of its own (compiled before timing) and deleted at the end: an upload named react-agent
# would shadow the preinstalled one in the user's store after the bench.
UPLOAD_NAME = "bench-react-agent"
WARM_UP_TASK = 1_000_000


@dataclass(frozen=True)
class Workload:
    calls: int  # tool calls per task
    thought_chars: int
    input_chars: int
    tool_latency_s: float
    observation_words: int

    @property
    def system(self) -> str:
        fields = '{"thought": ..., "tool": ..., "input": ...}' if self.thought_chars else '{"tool": ..., "input": ...}'
        return (f"You answer the user's question by calling tools. At each step reply with one JSON object {fields}; "
                'the result comes back as "Observation: ...". Tools:\n' +
                "".join(f"- {name}: {text}\n" for name, text in TOOLS.items()) + "- finish: gives the final answer.")

    def question(self, task: int) -> str:
        city = CITIES[task % len(CITIES)]
        return f"Task {task}: how many people live in {city}, and what is that number divided by {task % 7 + 2}?"

    def schema(self, names: list[str]) -> dict[str, Any]:
        """The action grammar; the same as the react-agent inferlet's with --uniform-values (actions.py there):
        values of fixed lengths of letters and spaces keep the work per step about the same whatever the model
        writes (the two modes' conversations may part: the client's scaffolding tokens are decoded, the
        inferlet's written)."""
        properties: dict[str, Any] = {}
        if self.thought_chars:
            properties["thought"] = {"type": "string", "pattern": f"^[a-z ]{{{self.thought_chars}}}$"}
        properties["tool"] = {"enum": names}
        properties["input"] = {"type": "string", "pattern": f"^[a-z ]{{{self.input_chars}}}$"}
        return {"type": "object", "properties": properties, "required": list(properties),
                "additionalProperties": False}

    @property
    def max_tokens(self) -> int:
        return 32 + self.thought_chars + self.input_chars  # as the inferlet's MAX_ACTION_TOKENS_FLOOR + fields


@dataclass
class TaskResult:
    latency_s: float
    actions: list[tuple[str, str]]  # (tool, input) per step, finish included
    num_generated_tokens: int
    num_prompt_tokens: int  # (b) prompt tokens sent over all requests; (a) tokens the inferlet prefilled
    num_cached_tokens: int  # (b) of those, served by the prefix cache; (a) the cached prefix
    counts_cached_in_prompt: bool = True  # (b) yes; (a) no: num_prompt_tokens are the prefilled ones only
    # (a) per tool call, the react-agent's own times (its "step" events): writing the action, the HTTP call with
    # the prefill made while it ran, appending the observation; (b) none
    step_ms: tuple[tuple[float, float, float], ...] = ()

    @property
    def num_processed_tokens(self) -> int:
        """Input tokens the engine computed (not cached) plus the tokens it generated."""
        cached = self.num_cached_tokens if self.counts_cached_in_prompt else 0
        return self.num_prompt_tokens - cached + self.num_generated_tokens


# -- the tool server ----------------------------------------------------------------------------------------------

class ToolServer:
    """A minimal HTTP/1.1 server on loopback, in a thread of its own: POST /NAME -> after the latency, a
    deterministic observation of about observation_words words. Counts the calls."""

    def __init__(self, latency_s: float, observation_words: int) -> None:
        self.latency_s, self.observation_words = latency_s, observation_words
        self.num_calls = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next((int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")), 0)
        body = (await reader.readexactly(length)).decode("utf-8", "replace")
        tool = head[0].split(" ")[1].strip("/")
        await asyncio.sleep(self.latency_s)
        self.num_calls += 1
        data = self.observation(tool, body).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        writer.close()

    def observation(self, tool: str, tool_input: str) -> str:
        words = ["alpha", "river", "census", "north", "value", "record", "city", "about", "estimate", "year"]
        seed = sum(tool_input.encode()) + len(tool)
        filler = " ".join(words[(seed + 3 * i) % len(words)] for i in range(self.observation_words))
        return f"{tool} found {seed % 997 * 1000 + 421}: {filler}"


async def _post(url: str, body: bytes, content_type: str = "application/json") -> bytes:
    """One POST over a fresh connection (stdlib asyncio); the response body (raises on a non-2xx status)."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    writer.write(f"POST {path} HTTP/1.1\r\nhost: {parts.hostname}\r\ncontent-type: {content_type}\r\n"
                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
    data = await reader.read()
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        payload = _unchunk(payload)
    if not 200 <= status < 300:
        raise RuntimeError(f"POST {url}: {status} {payload[:300]!r}")
    return payload


def _unchunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


# -- the two agents ------------------------------------------------------------------------------------------------

def inferlet_args(workload: Workload, task: int, tool_url: str, action_format: str) -> list[str]:
    return ["--question", workload.question(task), "--tool-url", tool_url, "--system", workload.system,
            *[a for name, text in TOOLS.items() for a in ("--tool", f"{name}: {text}")],
            "--min-calls", str(workload.calls), "--max-calls", str(workload.calls), "--action-format", action_format,
            "--uniform-values", "--thought-chars", str(workload.thought_chars),
            "--input-chars", str(workload.input_chars)]


async def inferlet_task(server_url: str, workload: Workload, task: int, tool_url: str,
                        action_format: str) -> TaskResult:
    """(a): one run of the react-agent inferlet; the server does the whole loop, tool calls included."""
    started = time.perf_counter()
    body = json.dumps({"args": inferlet_args(workload, task, tool_url, action_format), "stream": False}).encode()
    run = json.loads(await _post(f"{server_url}/v1/inferlets/{UPLOAD_NAME}/runs", body))
    latency = time.perf_counter() - started
    if run["status"] != "finished":
        raise RuntimeError(f"task {task}: the run {run['status']}: {run.get('error')}")
    events = [json.loads(m) for m in run["messages"]]
    answer = events[-1]
    if answer.get("num_calls") != workload.calls:
        raise RuntimeError(f"task {task}: {answer.get('num_calls')} tool calls, wanted {workload.calls}")
    actions = [(e["tool"], e["input"]) for e in events[:-1]] + [("finish", answer["answer"])]
    step_ms = tuple((e["action_ms"], e["tool_ms"], e["append_ms"]) for e in events[:-1])
    return TaskResult(latency, actions, answer["num_generated_tokens"], answer["num_prefilled_tokens"],
                      answer["num_cached_tokens"], counts_cached_in_prompt=False, step_ms=step_ms)


async def client_task(client: openai.AsyncOpenAI, workload: Workload, task: int, tool_url: str) -> TaskResult:
    """(b): the same agent as an OpenAI client: one chat completion per step, the tool called by the client."""
    started = time.perf_counter()
    messages = [{"role": "system", "content": workload.system}, {"role": "user", "content": workload.question(task)}]
    actions: list[tuple[str, str]] = []
    num_generated = num_prompt = num_cached = 0
    for step in range(workload.calls + 1):
        names = list(TOOLS) if step < workload.calls else ["finish"]
        response = await client.chat.completions.create(
            model="default", messages=messages, temperature=0, max_tokens=workload.max_tokens,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "action", "schema": workload.schema(names)}})
        text = response.choices[0].message.content or ""
        usage = response.usage
        num_generated += usage.completion_tokens
        num_prompt += usage.prompt_tokens
        details = usage.prompt_tokens_details
        num_cached += (details.cached_tokens or 0) if details else 0
        action = json.loads(text)
        actions.append((action["tool"], action["input"]))
        messages.append({"role": "assistant", "content": text})
        if step == workload.calls:
            break
        observation = (await _post(f"{tool_url}/{action['tool']}", action["input"].encode(), "text/plain")).decode()
        messages.append({"role": "user", "content": f"Observation: {' '.join(observation.split())}"})
    return TaskResult(time.perf_counter() - started, actions, num_generated, num_prompt, num_cached)


# -- levels ----------------------------------------------------------------------------------------------------------

async def run_level(concurrency: int, num_tasks: int, first_task: int,
                    one: Callable[[int], Awaitable[TaskResult]]) -> tuple[float, list[TaskResult]]:
    """num_tasks tasks, `concurrency` in flight; (wall seconds, results in task order)."""
    queue = list(range(first_task, first_task + num_tasks))
    results: dict[int, TaskResult] = {}

    async def worker() -> None:
        while queue:
            task = queue.pop(0)
            results[task] = await one(task)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, [results[t] for t in sorted(results)]


def summary(wall_s: float, results: list[TaskResult], workload: Workload) -> dict[str, float]:
    latencies = sorted(r.latency_s for r in results)
    num_steps = len(results) * (workload.calls + 1)
    num_tasks = len(results)
    num_generated = sum(r.num_generated_tokens for r in results)
    return {"tasks_per_s": num_tasks / wall_s, "wall_s": wall_s,
            "latency_median_s": statistics.median(latencies),
            "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "generated_tokens_per_step": num_generated / num_steps,
            # one forward pass per generated token: the passes a task waits on, one after the other
            "generated_tokens_per_task": num_generated / num_tasks,
            "prompt_tokens_per_task": sum(r.num_prompt_tokens for r in results) / num_tasks,
            "cached_tokens_per_task": sum(r.num_cached_tokens for r in results) / num_tasks,
            # tokens whose KV the engine computed (prefilled or generated): the model's work per task
            "processed_tokens_per_task": sum(r.num_processed_tokens for r in results) / num_tasks,
            **_step_times(results)}


def _step_times(results: list[TaskResult]) -> dict[str, float]:
    """(a) only: the medians of the inferlet's own per-call times (where a task's time goes inside the server)."""
    steps = [times for r in results for times in r.step_ms]
    if not steps:
        return {}
    return {f"{name}_ms_median": statistics.median(times[i] for times in steps)
            for i, name in enumerate(("action", "tool", "append"))}


async def measure(args: argparse.Namespace, server_url: str, workload: Workload,
                  on_level: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    tools = ToolServer(workload.tool_latency_s, args.observation_words)
    client = openai.AsyncOpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0, timeout=3600)
    every_mode: dict[str, Callable[[int], Awaitable[TaskResult]]] = {
        "inferlet": lambda task: inferlet_task(server_url, workload, task, tools.url, "template"),
        "inferlet-json": lambda task: inferlet_task(server_url, workload, task, tools.url, "json"),
        "client": lambda task: client_task(client, workload, task, tools.url)}
    modes = {mode: every_mode[mode] for mode in args.modes}
    # Warm-up (compiles, grammar set-up, the system prompt in the prefix cache), one task in every mode: the same
    # question, so the actions show whether the modes run the same conversation.
    warm = {mode: (await one(WARM_UP_TASK)).actions for mode, one in modes.items()}
    print(f"warm-up task, actions equal in every mode: {len({json.dumps(a) for a in warm.values()}) == 1}", flush=True)
    rows, next_task = [], 0
    for level, concurrency in enumerate(args.concurrency):
        num_tasks = max(concurrency * args.tasks_per_agent, args.tasks_per_level)
        row: dict[str, Any] = {"concurrency": concurrency, "num_tasks": num_tasks}
        # Distinct questions per mode: only the system prompt is in the prefix cache for both. The order of the
        # modes alternates from level to level, so that load drifting on the machine does not always favour one.
        order = list(modes.items()) if level % 2 == 0 else list(modes.items())[::-1]
        for mode, one in order:
            calls_before = tools.num_calls
            window_start = time.monotonic()
            wall_s, results = await run_level(concurrency, num_tasks, next_task, one)
            next_task += num_tasks
            if tools.num_calls - calls_before != num_tasks * workload.calls:
                raise RuntimeError(f"{mode}: the tool server saw {tools.num_calls - calls_before} calls")
            # The mode's span on time.monotonic() (one clock for every process of the machine): the server's
            # step log (PIE_STEP_LOG) of this mode alone is `scripts/step_log_summary.py LOG --between START END`.
            row[mode] = {**summary(wall_s, results, workload), "window_s": [window_start, time.monotonic()]}
        row["speedup"] = row["inferlet"]["tasks_per_s"] / row["client"]["tasks_per_s"]
        rows.append(row)
        print(_line(row), flush=True)
        on_level(rows)
    return rows


def _line(row: dict[str, Any]) -> str:
    parts = [f"c={row['concurrency']:>3} tasks={row['num_tasks']:>3}"]
    for mode in ("inferlet", "inferlet-json", "client"):
        if mode in row:
            r = row[mode]
            parts.append(f"{mode} {r['tasks_per_s']:.3f} tasks/s, latency {r['latency_median_s']:.2f} s, "
                         f"{r['generated_tokens_per_task']:.0f} gen + {r['processed_tokens_per_task']:.0f} processed "
                         "tok/task" + (f" (per call: action {r['action_ms_median']:.0f}, tool {r['tool_ms_median']:.0f},"
                                       f" append {r['append_ms_median']:.0f} ms)" if "action_ms_median" in r else ""))
    return "  |  ".join(parts) + f"  |  x{row['speedup']:.2f}"


def _delete_upload(server_url: str) -> None:
    """Best effort: under `timeout` the server gets the signal too and may already answer 503."""
    delete = urllib.request.Request(f"{server_url}/v1/inferlets/{UPLOAD_NAME}", method="DELETE")
    try:
        urllib.request.urlopen(delete, timeout=60).close()
    except OSError as error:
        print(f"could not delete the upload {UPLOAD_NAME}: {error}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small CPU run: concurrency 1 and 4, each agent running 2 tasks (as the GPU runs do)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--tasks-per-level", type=int, default=0, help="tasks per level (at least its concurrency)")
    parser.add_argument("--tasks-per-agent", type=int, default=1,
                        help="a level runs at least concurrency x this many tasks (2: each agent runs twice, so "
                             "the level's wall time is not one task's tail)")
    parser.add_argument("--modes", nargs="+", default=["inferlet", "client"],
                        choices=["inferlet", "inferlet-json", "client"],
                        help="inferlet: the react-agent writing each action's fixed JSON itself (its default); "
                             "inferlet-json: the react-agent decoding the whole action under the schema, as the "
                             "server does for the client; client: the OpenAI-client loop")
    parser.add_argument("--calls", type=int, default=8, help="tool calls per task")
    parser.add_argument("--thought-chars", type=int, default=0, help="0: actions without a thought")
    parser.add_argument("--input-chars", type=int, default=16)
    parser.add_argument("--observation-words", type=int, default=12)
    parser.add_argument("--tool-latency-ms", type=float, default=100.0)
    parser.add_argument("--num-pages", type=int, default=None, help="default: 48 per agent at the top level")
    parser.add_argument("--serve-args", default="", help="more options for `pie serve`")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.concurrency = [1, 4]
        args.tasks_per_agent = max(args.tasks_per_agent, 2)
    if not {"inferlet", "client"} <= set(args.modes):
        parser.error("--modes needs inferlet and client (the speedup is their ratio)")
    workload = Workload(args.calls, args.thought_chars, args.input_chars, args.tool_latency_ms / 1000,
                        args.observation_words)
    load_before = os.getloadavg()[0]  # the machine may be shared: the 1-minute load before the run

    def save(rows: list[dict[str, Any]]) -> None:
        """The JSON after every level: a run cut short (a time limit on the GPU machine) keeps its levels."""
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "command": " ".join(["python -m bench.agentic", *sys.argv[1:]]), "workload": asdict(workload),
                "device": args.device, "model": args.model or "SmolLM2-135M-Instruct", "cpu_count": os.cpu_count(),
                "load_average_before": load_before, "server_ready_s": round(server.ready_s, 1),
                "levels": rows}, indent=1) + "\n")

    # SIGTERM (`timeout`) unwinds like an exception, so the finally below stops the server subprocess.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wasm = build_inferlet(CONTRIB_DIR / INFERLET_NAME, Path("/tmp/pie-bench-react-agent.wasm"), progress=False)
    serve_args = ["--device", args.device, "--http-allow", "127.0.0.1", *args.serve_args.split()]
    server = LocalServer(args.model, args.num_pages or max(1024, 48 * max(args.concurrency)), serve_args)
    print(f"server ready in {server.ready_s:.1f} s", flush=True)
    try:
        request = urllib.request.Request(f"{server.url}/v1/inferlets?name={UPLOAD_NAME}", data=wasm.read_bytes(),
                                         headers={"content-type": "application/wasm"}, method="POST")
        urllib.request.urlopen(request, timeout=900).close()  # the server compiles it (cached on disk)
        try:
            rows = asyncio.run(measure(args, server.url, workload, save))
        finally:
            _delete_upload(server.url)
    finally:
        server.close()
    print(f"speedup: {rows[-1]['speedup']:.2f}", file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
