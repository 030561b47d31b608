"""react-agent: a ReAct loop (act, observe, act again) whose tools are HTTP endpoints, run inside the server.

    pie run react-agent.wasm -- --question "What is the capital of France?" \
        --tool-url http://127.0.0.1:9000 --tool "search: looks a fact up"

The conversation is a chat: system prompt, the question, then per step the model's action (an assistant turn)
and the tool's result (a user turn "Observation: ..."), rendered by the model's chat template: the very
conversation an OpenAI client builds with chat.completions (bench/agentic.py runs both). Each action is one
JSON object {"thought": ..., "tool": NAME, "input": TEXT} written under a grammar (actions.py), so even a small
or random model writes a well-formed call. The agent POSTs the input to TOOL_URL/NAME (the host must be on the
server's --http-allow list); `finish` ends the loop and its input is the answer.

Invariant: the context is never prefilled again. Its KV stays in the server between steps and each step sends
the engine only what is new: the observation's turn, the action's fixed text, the last sampled token. What does
not depend on the tool's answer (the action's end, the observation turn's head) is prefilled while the tool
works (http fetch-start), which an agent outside the server cannot do. The final event reports the counts that show it: kv_len = tokens whose KV this run computed + the cached prefix.
"""
import argparse
from typing import Callable

from pie_sdk import ArgumentParser, HostError, PieError, fetch_start, monotonic_ns, publish_prefix, send_event

from actions import json_action, template_action
from transcript import Transcript

FINISH = "finish"
OBSERVATION = "Observation: "  # a user turn's start, before the tool's answer
ACTION_FORMATS = {"template": template_action, "json": json_action}


def main(args: list[str]) -> None:
    opts = _parse(args)
    tools = dict(_tool(spec) for spec in opts.tool)
    if FINISH in tools:
        raise PieError(f"'{FINISH}' is reserved: it ends the loop")
    write_action = ACTION_FORMATS[opts.action_format]
    transcript = Transcript([{"role": "system", "content": opts.system or _system_prompt(tools)},
                             {"role": "user", "content": opts.question}])
    num_calls = 0
    while True:
        names = list(tools) if num_calls < opts.min_calls else \
            [FINISH] if num_calls >= opts.max_calls else [*tools, FINISH]
        started = monotonic_ns()
        action = write_action(transcript, names, opts)
        acted = monotonic_ns()
        if num_calls == 0:
            publish_prefix(transcript.ctx)  # the prompt's full pages, for later agents with the same system prompt
        if action["tool"] == FINISH:
            break
        # While the tool works, the context takes the text that does not depend on its answer (the turn's
        # end, the observation turn's head): the next generation has only the answer to prefill.
        observation = _call_tool(opts.tool_url, action["tool"], action["input"], opts.max_observation_chars,
                                 meanwhile=lambda: transcript.open_user_turn(OBSERVATION.rstrip()))
        observed = monotonic_ns()
        transcript.add_user_turn(OBSERVATION + observation)
        num_calls += 1
        send_event({"type": "step", "step": num_calls, "thought": action.get("thought"), "tool": action["tool"],
                    "input": action["input"], "observation": observation, "action_ms": (acted - started) / 1e6,
                    "tool_ms": (observed - acted) / 1e6, "append_ms": (monotonic_ns() - observed) / 1e6})
    send_event({"type": "answer", "answer": action["input"], "num_calls": num_calls, "num_steps": num_calls + 1,
                **transcript.counts()})


def _parse(args: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="react-agent", description="A ReAct agent whose tools are HTTP endpoints.")
    parser.add_argument("--question", required=True, help="the task")
    parser.add_argument("--tool-url", required=True, help="tools are POSTed to TOOL_URL/NAME (allow-listed host)")
    parser.add_argument("--tool", action="append", required=True, metavar="'NAME: DESCRIPTION'",
                        help="a tool the model may call (repeatable)")
    parser.add_argument("--system", default=None, help="replaces the built-in system prompt")
    parser.add_argument("--min-calls", type=int, default=0, help="tool calls before the model may finish")
    parser.add_argument("--max-calls", type=int, default=8, help="after this many calls it must finish")
    parser.add_argument("--thought-chars", type=int, default=48, help="length limit of the thought (0: none)")
    parser.add_argument("--input-chars", type=int, default=48, help="length limit of a tool input or answer")
    parser.add_argument("--uniform-values", action="store_true",
                        help="the thought and the input are exactly --*-chars lowercase letters and spaces: about the "
                             "same work per step whatever the model writes (for benchmarks)")
    parser.add_argument("--action-format", choices=sorted(ACTION_FORMATS), default="template",
                        help="template: the agent writes the JSON's fixed text, the model the values; "
                             "json: the model decodes the whole object under its JSON schema")
    parser.add_argument("--max-observation-chars", type=int, default=2000, help="longer tool results are cut")
    opts = parser.parse_args(args)
    if not 0 <= opts.min_calls <= opts.max_calls:
        parser.error("need 0 <= --min-calls <= --max-calls")
    if opts.thought_chars < 0 or opts.input_chars < 1 or opts.max_observation_chars < 1:
        parser.error("--thought-chars must be >= 0, --input-chars and --max-observation-chars >= 1")
    return opts


def _tool(spec: str) -> tuple[str, str]:
    name, _, description = spec.partition(":")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise PieError(f"a tool name is letters, digits, '_' or '-': {spec!r}")
    return name, description.strip()


def _system_prompt(tools: dict[str, str]) -> str:
    listed = "\n".join(f"- {name}: {description or name}" for name, description in tools.items())
    return ("You answer the user's question by calling tools. At each step reply with one JSON object "
            '{"thought": ..., "tool": ..., "input": ...}; the result comes back as "Observation: ...". '
            f"Tools:\n{listed}\n- {FINISH}: gives the final answer as its input.")


def _call_tool(tool_url: str, name: str, tool_input: str, max_chars: int, meanwhile: Callable[[], None]) -> str:
    """The tool's response text on one line; a failure becomes the observation (the model may react to it).
    meanwhile() runs while the request is in flight."""
    failure: HostError | None = None
    try:
        pending = fetch_start(f"{tool_url.rstrip('/')}/{name}", method="POST", body=tool_input,
                              headers={"content-type": "text/plain; charset=utf-8"})
    except HostError as error:
        failure = error
    meanwhile()
    if failure is None:
        try:
            response = pending.wait()
        except HostError as error:
            failure = error
    if failure is not None:
        return f"error: {failure}"[:max_chars]
    text = response.text if 200 <= response.status < 300 else f"error {response.status}: {response.text}"
    return " ".join(text.split())[:max_chars]
