"""Runs and the inferlets' key-value store across the front-end processes of one server.

`pie serve --api-processes 2` as a user starts it (a subprocess on a loopback port; tiny random Llama, CPU): a
run started through one front end is listed, read and cancelled through the other (its pages freed), never
for another tenant; an inferlet's store entry set in one front end is read in the other (the prefix-cache
example exports its system prompt through one and imports it through the other). Keep-alive connections stay
with the process that accepted them, and every /v1/runs answer names that process (x-pie-front-end), so each
front end is addressed on purpose. Then the two pieces on their own, in one process: two run registries over one
shared table (as two front ends), a run whose front end died, and two stores over one file.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pie_server.app.inferlet_runs import CANCELLED, RunRegistry
from pie_server.app.routes.inferlets import FRONT_END_HEADER
from pie_server.app.run_table import OWNER_GONE
from pie_server.engine.runtime.host import TenantStore
from pie_server.engine.runtime.messages import Terminated, Text
from tests.app.fake_engine import FakeHandle

pytestmark = pytest.mark.timeout(600)

ALICE = {"authorization": "Bearer key-of-alice", "content-type": "application/json"}
BOB = {"authorization": "Bearer key-of-bob", "content-type": "application/json"}
BARE_REQUEST = json.dumps({  # the default inferlet run bare: its prompt event, then it waits for "go"
    "version": 1, "prompts": [{"token_ids": [1, 2, 3]}], "n": 1, "max_tokens": 4,
    "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None, "presence_penalty": 0.0,
                 "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": [], "num_logprobs": None},
    "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None})
SYSTEM = ("You are the assistant of a small bakery in Lyon. You answer questions about opening hours, bread, "
          "cakes, prices and orders, briefly and politely, in the customer's language.")  # a few pages


class FrontEnd:
    """A keep-alive connection to one front-end process (the one that accepted it); one the server closed
    (idle past its keep-alive timeout) is replaced by another that the same process accepted."""

    def __init__(self, port: int, pid: str, conn: http.client.HTTPConnection) -> None:
        self.port, self.pid, self.conn = port, pid, conn

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] = ALICE,
                expect_pid: bool = True) -> tuple[int, Any]:
        encoded = None if body is None else json.dumps(body)
        try:
            self.conn.request(method, path, body=encoded, headers=headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.conn.close()
            self.conn = _connection_to(self.port, self.pid)
            self.conn.request(method, path, body=encoded, headers=headers)
            response = self.conn.getresponse()
        data = response.read()
        if expect_pid:  # the same process still (a dropped connection would reconnect anywhere)
            assert response.getheader(FRONT_END_HEADER) == self.pid, (method, path, response.status, data)
        return response.status, json.loads(data) if data else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _connection_to(port: int, pid: str, timeout_s: float = 60) -> http.client.HTTPConnection:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/v1/runs", headers=ALICE)
        response = conn.getresponse()
        response.read()
        if response.getheader(FRONT_END_HEADER) == pid:
            return conn
        conn.close()
    raise AssertionError(f"front end {pid} accepted no new connection")


def _pin_front_ends(port: int, log_path: Path, num: int = 2, timeout_s: float = 300) -> list[FrontEnd]:
    """One healthy keep-alive connection to each of num front-end processes: fresh connections until each
    process (told by its x-pie-front-end answer) accepted one."""
    found: dict[str, FrontEnd] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < num:
        assert time.monotonic() < deadline, f"not {num} front ends answered:\n{log_path.read_text()[-3000:]}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("GET", "/v1/runs", headers=ALICE)
            response = conn.getresponse()
            response.read()
            pid = response.getheader(FRONT_END_HEADER)
        except OSError:
            conn.close()
            time.sleep(0.2)
            continue
        if pid is None or pid in found:
            conn.close()
            continue
        front_end = FrontEnd(port, pid, conn)
        while front_end.request("GET", "/health", expect_pid=False)[0] != 200:  # it loads on its own
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        found[pid] = front_end
    return list(found.values())


@pytest.fixture(scope="module")
def front_ends(tiny_llama_dir: Path, default_inferlet_wasm: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FrontEnd]]:
    tmp_path = tmp_path_factory.mktemp("serve-2")
    port = _free_port()
    keys = tmp_path / "keys"
    keys.write_text("key-of-alice alice\nkey-of-bob bob\n")
    pie = Path(sys.executable).with_name("pie")
    command = [str(pie), "serve", "--model", str(tiny_llama_dir), "--port", str(port), "--num-pages", "128",
               "--api-keys-file", str(keys), "--default-inferlet", str(default_inferlet_wasm),
               "--api-processes", "2", "--inferlet-time-budget", "120", "--log-level", "warning"]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        pinned: list[FrontEnd] = []
        try:
            pinned = _pin_front_ends(port, log_path)
            yield pinned
        finally:
            for front_end in pinned:
                front_end.conn.close()
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _read_sse(port: int, path: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    """In a thread: a streamed run on a connection of its own; out gets its headers, then its events."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body), headers=ALICE)
        response = conn.getresponse()
        out["headers"] = {k.lower(): v for k, v in response.getheaders()}
        out["events"] = [line.decode().strip() for line in response if line.startswith(b"event: ")]
    finally:
        conn.close()


def _wait_for(what: str, check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_a_run_is_seen_and_cancelled_through_the_other_front_end(front_ends: list[FrontEnd]) -> None:
    stream: dict[str, Any] = {}
    reader = threading.Thread(target=_read_sse, args=(front_ends[0].port, "/v1/inferlets/default/runs",
                                                      {"args": [BARE_REQUEST], "stream": True}, stream),
                              daemon=True)
    reader.start()
    _wait_for("the run's headers", lambda: "headers" in stream)
    run_id = stream["headers"]["x-run-id"]
    [other] = [f for f in front_ends if f.pid != stream["headers"][FRONT_END_HEADER]]  # not the run's owner
    # The owner writes the run to the shared table within a moment: its prompt event, then it waits for "go".
    seen = _wait_for("the run through the other front end", lambda: (
        (reply := other.request("GET", f"/v1/runs/{run_id}"))[0] == 200 and reply[1]["num_messages"] == 1
        and reply[1]))
    assert seen["status"] == "running" and json.loads(seen["messages"][0])["type"] == "prompt"
    assert run_id in [r["id"] for r in other.request("GET", "/v1/runs")[1]["data"]]
    for method in ("GET", "DELETE"):  # another tenant's run is not there, through either front end
        for front_end in front_ends:
            status, body = front_end.request(method, f"/v1/runs/{run_id}", headers=BOB)
            assert status == 404 and body["error"]["code"] == "run_not_found"
    assert run_id not in [r["id"] for r in other.request("GET", "/v1/runs", headers=BOB)[1]["data"]]
    status, cancelled = other.request("DELETE", f"/v1/runs/{run_id}")
    assert status == 200 and cancelled["status"] == CANCELLED
    reader.join(timeout=30)
    assert stream["events"] == ["event: message", "event: done"]
    for front_end in front_ends:
        assert front_end.request("GET", f"/v1/runs/{run_id}")[1]["status"] == CANCELLED
    _wait_for("the instance's end", lambda: all(
        front_end.request("GET", "/v1/engine/stats", expect_pid=False)[1]["num_instances"] == 0
        for front_end in front_ends))


def test_an_inferlets_store_is_shared_by_the_front_ends(front_ends: list[FrontEnd]) -> None:
    """prefix-cache keeps its export's tokens in the tenant's store; the pages are in the engine core."""
    ask = {"args": ["--name", "bakery", "--system", SYSTEM, "--prompt", "Sunday?", "--max-tokens", "2"]}
    results = []
    for front_end in front_ends:
        status, run = front_end.request("POST", "/v1/inferlets/prefix-cache/runs", ask)
        assert status == 200 and run["status"] == "finished", run
        results.append(json.loads(run["messages"][-1]))
    assert [r["export"] for r in results] == ["exported", "imported"]
    assert results[1]["num_reused_tokens"] > 0 and results[1]["token_ids"] == results[0]["token_ids"]
    status, run = front_ends[1].request("POST", "/v1/inferlets/prefix-cache/runs", ask, headers=BOB)
    assert status == 200 and json.loads(run["messages"][-1])["export"] == "exported"  # bob's store has none


# -- in one process: the shared table and the shared store on their own ------------------------------------

def _exit_at_once() -> None:
    pass


def _gone_pid() -> int:
    """The id of a process that ended (a front end that died)."""
    process = multiprocessing.get_context("spawn").Process(target=_exit_at_once)
    process.start()
    process.join()
    assert process.pid is not None
    return process.pid


def test_two_registries_over_one_table(tmp_path: Path) -> None:
    async def scenario() -> None:
        owner = RunRegistry(tmp_path, front_end=os.getpid())
        other = RunRegistry(tmp_path, front_end=os.getppid())  # another live process's id
        handle = FakeHandle("inst-1")
        run = owner.start("inferlet-id", "alice", handle)
        for text in ("one", "two"):
            handle.outbox.put(Text(text))
        seen = await _eventually(lambda: other.describe(run.id, "alice", with_messages=True),
                                 lambda body: body is not None and body["num_messages"] == 2)
        assert seen["messages"] == ["one", "two"] and seen["status"] == "running"
        assert await other.describe(run.id, "bob") is None and await other.cancel_by_id(run.id, "bob") is None
        assert [r["id"] for r in await other.describe_all("alice")] == [run.id]
        assert await other.describe_all("bob") == []
        assert other.get(run.id, "alice") is None  # not its own: read through the table
        cancelled = await other.cancel_by_id(run.id, "alice")
        assert cancelled is not None and cancelled["status"] == CANCELLED
        assert handle.killed.is_set() and run.status == CANCELLED  # the owner killed its instance
        dead = RunRegistry(tmp_path, front_end=_gone_pid())
        orphan = dead.start("inferlet-id", "alice", FakeHandle("inst-2"))
        await _eventually(lambda: other.describe(orphan.id, "alice"), lambda body: body is not None)
        settled = await other.describe(orphan.id, "alice")
        assert settled is not None and settled["status"] == "failed" and settled["error"] == OWNER_GONE
        finished = owner.start("inferlet-id", "alice", (done := FakeHandle("inst-3")))
        done.outbox.put(Terminated(ok=True))
        await _eventually(lambda: other.describe(finished.id, "alice"),
                          lambda body: body is not None and body["status"] == "finished")
        for registry in (owner, other, dead):
            await registry.close()

    asyncio.run(scenario())


async def _eventually(read: Any, good: Any, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while not good(value := await read()):
        assert time.monotonic() < deadline, value
        await asyncio.sleep(0.02)
    return value


def test_two_stores_over_one_file_are_one_store(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite3")
    first, second = TenantStore(30, path), TenantStore(30, path)  # as in two front ends
    first.set("alice", "k1", "v" * 10)
    assert second.get("alice", "k1") == "v" * 10 and second.get("bob", "k1") is None
    with pytest.raises(ValueError, match="full"):  # the quota counts what both wrote
        second.set("alice", "k2", "w" * 20)
    second.set("alice", "k1", "x")
    second.set("alice", "k2", "w" * 20)
    assert first.keys("alice", "k") == ["k1", "k2"] and first.keys("bob", "") == []
    assert first.delete("alice", "k2") and not second.delete("alice", "k2")
    assert TenantStore(30, None).get("alice", "k1") is None  # without a file: this process's own, in memory


def _open_store(path: str, start: Any) -> None:
    start.wait()
    TenantStore(30, path).set(f"t{os.getpid()}", "k", "v")


def test_front_ends_opening_a_new_store_file_at_once_all_start(tmp_path: Path) -> None:
    """Each of a server's front ends opens the store as it starts: the switch to WAL of one must not make
    another fail with "database is locked" (it did, one start in a few with --api-processes 2)."""
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = str(tmp_path / f"kv{attempt}.sqlite3")
        start = context.Barrier(6)
        processes = [context.Process(target=_open_store, args=(path, start)) for _ in range(6)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert [p.exitcode for p in processes] == [0] * 6
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT COUNT(*) FROM kv").fetchone()[0] == 6  # each one's write landed
