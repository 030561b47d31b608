"""swarm: several agents (one instance each) working on one task, talking through broadcast/subscribe.

    pie run swarm.wasm -- --topic team-42 --size 3 --name alice --task "Plan a picnic."   (and bob, carol)

Every agent subscribes to --topic and waits until it has met the other size - 1 agents (a handshake over
the topic, below). Then, for --rounds rounds, each agent writes one line (its own model context, greedy by
default), broadcasts it, waits for the others' lines of that round and appends them to its context, so its
next line builds on what the others said. Each keeps its KV cache between rounds: only the others' lines
are prefilled.

Handshake: a broadcast reaches only the instances subscribed at that moment, so an agent repeats
`hello` (with the names it has heard and whether it is ready) until it has heard all the others and each of
them has heard it; an agent answers the hello of one that is not ready yet, whatever it is doing. An
agent's lines of a round are kept until it gets there (a fast agent may be a round ahead).

Agents of one swarm must run in the same server process (broadcasts do not cross `--api-processes` front
ends) and share a topic that no other swarm uses at the same time.
"""
import argparse
import json

from pie_sdk import (ArgumentParser, Context, PieError, Regex, Sampler, apply_chat_template, broadcast,
                     instance_id, monotonic_ns, receive_broadcast, send_event, subscribe, unsubscribe)

HELLO_EVERY_MS = 20
LINE = Regex(r"[^\n]*\S[^\n]*\n")  # one line, not blank: the generation ends at its newline


def main(args: list[str]) -> None:
    opts = _parse(args)
    me = opts.name or instance_id()
    subscribe(opts.topic)
    try:
        mailbox = Mailbox(opts.topic, me, opts.size, int(opts.timeout_s * 1000))
        mailbox.join()
        ctx = Context()
        ctx.fill(apply_chat_template([{"role": "system", "content": _system_prompt(me, opts.size)},
                                      {"role": "user", "content": opts.task}]))
        sampler = Sampler(temperature=opts.temperature, seed=opts.seed)
        rounds, num_heard_tokens = [], 0
        for round_index in range(opts.rounds):
            text = _speak(ctx, me, opts.max_tokens, sampler)
            mailbox.post(round_index, text)
            heard = mailbox.collect(round_index)  # the others' lines, by name
            num_heard_tokens += len(ctx.fill("".join(f"{name}: {heard[name]}\n" for name in sorted(heard))))
            lines = sorted([(me, text), *heard.items()])
            rounds.append([{"from": name, "text": line} for name, line in lines])
            send_event({"type": "round", "round": round_index, "lines": rounds[-1]})
        send_event({"type": "swarm", "name": me, "peers": sorted(mailbox.known), "rounds": rounds,
                    "kv_len": ctx.kv_len, "num_heard_tokens": num_heard_tokens})
    finally:
        unsubscribe(opts.topic)


def _parse(args: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="swarm", description="One agent of a swarm that talks over broadcasts.")
    parser.add_argument("--topic", required=True, help="the swarm's broadcast topic (unique per swarm)")
    parser.add_argument("--size", type=int, required=True, help="agents in the swarm, this one included")
    parser.add_argument("--task", required=True)
    parser.add_argument("--name", default=None, help="this agent's name (default: its instance id)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32, help="per line")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="how long to wait for the others, each time")
    opts = parser.parse_args(args)
    if opts.size < 2 or opts.rounds < 1 or opts.max_tokens < 1 or opts.timeout_s <= 0:
        parser.error("need --size >= 2, --rounds >= 1, --max-tokens >= 1 and --timeout-s > 0")
    return opts


def _system_prompt(me: str, size: int) -> str:
    return (f"You are {me}, one of {size} agents who solve a task together. Each round every agent writes one "
            "short line, then reads the others' lines. Build on what they said.")


def _speak(ctx: Context, me: str, max_tokens: int, sampler: Sampler) -> str:
    """This agent's next line (decoded under a one-line grammar); the context ends with a newline after it."""
    ctx.fill(f"{me}:")
    text = ctx.generate(max_tokens, sampler=sampler, constraint=LINE, stream=False)
    if not text.endswith("\n"):  # cut by max_tokens
        ctx.fill("\n")
    return text.strip()


class Mailbox:
    """This agent's view of the topic: whom it has met, who has met it, and the lines posted so far."""

    def __init__(self, topic: str, me: str, size: int, timeout_ms: int) -> None:
        self.topic, self.me, self.size, self.timeout_ms = topic, me, size, timeout_ms
        self.known: set[str] = set()  # agents heard from
        self.acked: set[str] = set()  # agents that have heard this one (their hello names it, or they posted)
        self.lines: dict[tuple[int, str], str] = {}  # (round, name) -> text
        self._answer_hello = False

    @property
    def ready(self) -> bool:
        return len(self.known) == self.size - 1 and self.acked >= self.known

    def join(self) -> None:
        deadline = self._deadline()
        while not self.ready:
            self._hello()
            self._drain(HELLO_EVERY_MS)
            self._check(deadline, "to meet the others")
        self._hello()  # the last agents met learn that this one has heard them

    def post(self, round_index: int, text: str) -> None:
        self._send({"kind": "line", "round": round_index, "text": text})

    def collect(self, round_index: int) -> dict[str, str]:
        deadline = self._deadline()
        while True:
            heard = {name: text for (r, name), text in self.lines.items() if r == round_index}
            if len(heard) == self.size - 1:
                return heard
            self._drain(HELLO_EVERY_MS * 5)
            self._check(deadline, f"for round {round_index}, from {sorted(self.known - set(heard)) or 'the others'}")

    def _drain(self, timeout_ms: int) -> None:
        """Handles every broadcast that arrives within timeout_ms (then what is already queued)."""
        message = receive_broadcast(timeout_ms)
        while message is not None:
            if message.topic == self.topic:
                self._handle(json.loads(message.message))
            message = receive_broadcast(0)
        if self._answer_hello:
            self._hello()

    def _handle(self, message: dict) -> None:
        sender = message["from"]
        if sender == self.me:
            raise PieError(f"another agent on topic {self.topic!r} is also named {sender!r}")
        self.known.add(sender)
        if len(self.known) > self.size - 1:
            raise PieError(f"more than {self.size} agents on topic {self.topic!r}: {sorted(self.known)}")
        if message["kind"] == "hello":
            if self.me in message["known"]:
                self.acked.add(sender)
            self._answer_hello = self._answer_hello or not message["ready"]
        elif message["kind"] == "line":
            self.acked.add(sender)  # it posts only once it is ready, having heard this agent
            self.lines[(message["round"], sender)] = message["text"]

    def _hello(self) -> None:
        self._answer_hello = False
        self._send({"kind": "hello", "known": sorted(self.known), "ready": self.ready})

    def _send(self, message: dict) -> None:
        broadcast(self.topic, json.dumps({"from": self.me, **message}))

    def _deadline(self) -> int:
        return monotonic_ns() + self.timeout_ms * 1_000_000

    def _check(self, deadline: int, waiting_for: str) -> None:
        if monotonic_ns() > deadline:
            raise PieError(f"{self.me} waited {self.timeout_ms / 1000:g} s {waiting_for} on topic {self.topic!r}")
