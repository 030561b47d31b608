"""Host functions of the small interfaces: runtime, model, clocks, messaging, store."""
from __future__ import annotations

import json
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any

from pie_server.engine.runtime.config import API_VERSION
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import HostFunction, expect
from pie_server.engine.runtime.instance import HostTaskGen, InstanceState
from pie_server.engine.runtime.messages import Event, Mailbox, Message, Text

U32_MAX = (1 << 32) - 1
MODEL_INFO = ("record", ("name", "string"), ("vocab-size", "u32"), ("page-size", "u32"),
              ("max-context-len", "u32"), ("chat-template", "string"), ("bos-token-id", ("option", "u32")),
              ("eos-token-ids", ("list", "u32")), ("stop-token-ids", ("list", "u32")))
UNIT_RESULT = ("result", None, "string")
BROADCAST = ("record", ("topic", "string"), ("message", "string"))


def resolve(future: Future, value: Any = None) -> None:
    """Complete a future unless something else already did."""
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def sleep_future(host: Host, delay_s: float) -> Future:
    future: Future = Future()
    host.call_later(delay_s, lambda: resolve(future))
    return future


def functions(host: Host) -> list[HostFunction]:
    model = host.model
    info = {"name": model.name, "vocab-size": model.vocab_size, "page-size": model.page_size,
            "max-context-len": model.max_context_len, "chat-template": model.chat_template,
            "bos-token-id": model.bos_token_id, "eos-token-ids": list(model.eos_token_ids),
            "stop-token-ids": list(model.stop_token_ids)}
    max_message = host.config.max_message_bytes

    def check_message(text: str, what: str) -> None:
        expect(len(text.encode()) <= max_message, f"{what} is larger than {max_message} bytes")

    max_outbox = host.config.max_outbox_bytes

    def deliver(inst: InstanceState, message: Message, value: Any) -> Any:
        """Puts the message in the outbox now, or (a generator) once the client has read it below its bound."""
        if inst.outbox.num_bytes < max_outbox:
            inst.outbox.put(message)
            return value
        return deliver_later(inst, message, value)

    def deliver_later(inst: InstanceState, message: Message, value: Any) -> HostTaskGen:
        room: Future = Future()
        if inst.outbox.notify_when_below(max_outbox, lambda: resolve(room)):
            yield room
        inst.outbox.put(message)
        return value

    def clipped(text: str) -> str:
        """At most max_message bytes: send has no error channel, so a longer text is cut (at a character)."""
        data = text.encode()
        return text if len(data) <= max_message else data[:max_message].decode(errors="ignore")

    def send(inst: InstanceState, text: str) -> Any:
        return deliver(inst, Text(clipped(text)), None)

    def send_on(inst: InstanceState, channel: int, text: str) -> Any:
        return deliver(inst, Text(clipped(text), channel), None)

    def send_event(inst: InstanceState, payload: str) -> Any:
        check_message(payload, "the event")
        try:
            json.loads(payload)
        except ValueError as error:
            raise ValueError(f"send-event needs a JSON value: {error}") from None
        return deliver(inst, Event(payload), ("ok", None))

    def wait_mailbox(mailbox: Mailbox, timeout_ms: int | None) -> HostTaskGen:
        item = mailbox.try_get()
        if item is not None or timeout_ms == 0:
            return item
        arrived: Future = Future()
        listener = lambda: resolve(arrived)  # noqa: E731
        if mailbox.notify_once(listener):
            if timeout_ms is not None:
                host.call_later(timeout_ms / 1000.0, lambda: resolve(arrived))
            yield arrived
            mailbox.cancel_listener(listener)
        return mailbox.try_get()

    def receive(inst: InstanceState, timeout_ms: int | None) -> HostTaskGen:
        return (yield from wait_mailbox(inst.inbox, timeout_ms))

    def receive_broadcast(inst: InstanceState, timeout_ms: int | None) -> HostTaskGen:
        item = yield from wait_mailbox(inst.broadcasts, timeout_ms)
        return None if item is None else {"topic": item[0], "message": item[1]}

    def check_topic(topic: str) -> None:
        expect(0 < len(topic.encode()) <= 256, "a topic is 1 to 256 bytes")

    def broadcast(inst: InstanceState, topic: str, message: str) -> tuple[str, None]:
        check_topic(topic)
        check_message(message, "the broadcast")
        for receiver in host.bus.receivers(inst, topic):
            expect(len(receiver.broadcasts) < host.config.mailbox_capacity,
                   f"a subscriber of {topic!r} has {host.config.mailbox_capacity} undelivered broadcasts")
        host.bus.publish(inst, topic, message)
        return ("ok", None)

    def subscribe(inst: InstanceState, topic: str) -> tuple[str, None]:
        check_topic(topic)
        expect(len(inst.topics) < 256, "at most 256 subscriptions per instance")
        host.bus.subscribe(inst, topic)
        return ("ok", None)

    def store_key(key: str) -> None:
        expect(0 < len(key.encode()) <= host.config.max_store_key_bytes,
               f"a store key is 1 to {host.config.max_store_key_bytes} bytes")

    def store_set(inst: InstanceState, key: str, value: str) -> tuple[str, None]:
        store_key(key)
        expect(len(value.encode()) <= host.config.max_store_value_bytes,
               f"a store value is at most {host.config.max_store_value_bytes} bytes")
        host.store.set(inst.tenant, key, value)
        return ("ok", None)

    def arguments(inst: InstanceState) -> list[str] | HostTaskGen:
        if inst.launched is None or inst.launched.done():
            return list(inst.arguments)
        return wait_for_launch(inst)

    def wait_for_launch(inst: InstanceState) -> HostTaskGen:
        inst.parked = True  # a warm instance: its launch sets the arguments
        yield inst.launched
        return list(inst.arguments)

    def sleep(inst: InstanceState, duration_ms: int) -> HostTaskGen:
        yield sleep_future(host, duration_ms / 1000.0)

    return [
        HostFunction("runtime", "version", lambda inst: API_VERSION, "string"),
        HostFunction("runtime", "instance-id", lambda inst: str(inst.id), "string"),
        HostFunction("runtime", "arguments", arguments, ("list", "string")),
        HostFunction("runtime", "started-ahead", lambda inst: inst.launched is not None, "bool"),
        HostFunction("model", "list-models", lambda inst: [model.name], ("list", "string")),
        HostFunction("model", "info", lambda inst: info, MODEL_INFO),
        HostFunction("clocks", "now", lambda inst: time.time_ns(), "u64"),
        HostFunction("clocks", "monotonic", lambda inst: time.monotonic_ns(), "u64"),
        HostFunction("clocks", "sleep", sleep, None),
        HostFunction("messaging", "send", send, None),
        HostFunction("messaging", "send-on", send_on, None),
        HostFunction("messaging", "send-event", send_event, UNIT_RESULT),
        HostFunction("messaging", "receive", receive, ("option", "string")),
        HostFunction("messaging", "broadcast", broadcast, UNIT_RESULT),
        HostFunction("messaging", "subscribe", subscribe, UNIT_RESULT),
        HostFunction("messaging", "unsubscribe", lambda inst, topic: host.bus.unsubscribe(inst, topic), None),
        HostFunction("messaging", "receive-broadcast", receive_broadcast, ("option", BROADCAST)),
        HostFunction("store", "get", lambda inst, key: host.store.get(inst.tenant, key), ("option", "string")),
        HostFunction("store", "set", store_set, UNIT_RESULT),
        HostFunction("store", "delete", lambda inst, key: host.store.delete(inst.tenant, key), "bool"),
        HostFunction("store", "list-keys", lambda inst, prefix: host.store.keys(inst.tenant, prefix),
                     ("list", "string")),
    ]
