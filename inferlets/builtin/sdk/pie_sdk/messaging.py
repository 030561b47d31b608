"""Talking to the client (text chunks, JSON events, incoming messages) and to other instances."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from wit_world.imports import messaging

from .errors import call

MAIN_CHANNEL = 0


def send(text: str, channel: int = MAIN_CHANNEL) -> None:
    """A text chunk to the client (channel 0 is the main output stream)."""
    if channel == MAIN_CHANNEL:
        messaging.send(text)
    else:
        messaging.send_on(channel, text)


def send_event(value: Any) -> None:
    """A structured event: any JSON-serialisable value."""
    call(messaging.send_event, json.dumps(value))


def receive(timeout_ms: int | None = None) -> str | None:
    """The client's next message; None when timeout_ms passed (None: wait for one)."""
    return messaging.receive(timeout_ms)


@dataclass(frozen=True)
class Broadcast:
    topic: str
    message: str


def broadcast(topic: str, message: str) -> None:
    """To every other instance subscribed to topic."""
    call(messaging.broadcast, topic, message)


def subscribe(topic: str) -> None:
    call(messaging.subscribe, topic)


def unsubscribe(topic: str) -> None:
    messaging.unsubscribe(topic)


def receive_broadcast(timeout_ms: int | None = None) -> Broadcast | None:
    raw = messaging.receive_broadcast(timeout_ms)
    return None if raw is None else Broadcast(raw.topic, raw.message)
