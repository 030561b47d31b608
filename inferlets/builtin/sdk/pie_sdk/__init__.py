"""pie_sdk: write Pie inferlets in Python.

An inferlet is a module with `def main(args: list[str]) -> None`; `pie build` turns it into a Wasm
component. Everything here runs inside the sandbox and talks to the engine through the inferlet API
(pie:inferlet@0.1.0); see docs/sdk.md.
"""
from .batch import decode_step_all, generate_all, next_distribution_all
from .constraints import AllowedTokens, JsonSchema, Regex
from .context import Context
from .entry import export
from .errors import HostError, PieError, UsageError
from .generation import Generation, TokenLogprobs
from .messaging import Broadcast, broadcast, receive, receive_broadcast, send, send_event, subscribe, unsubscribe
from .model import ModelInfo, list_models, model_info
from .pages import PageUsage, page_usage
from .runtime import ArgumentParser, api_version, args, instance_id
from .sampling import Greedy, Sampler
from .services import (PendingFetch, Response, fetch, fetch_start, monotonic_ns, now_ns, sleep_ms, store_delete,
                       store_get, store_keys, store_set)
from .sharing import export_context, fill_cached, import_context, publish_prefix, unexport_context
from .stop import StopCondition, StopTracker
from .tokenizer import Decoder, apply_chat_template, decode, encode, vocabulary

__all__ = [
    "decode_step_all", "generate_all", "next_distribution_all", "AllowedTokens", "JsonSchema", "Regex", "Context",
    "export", "HostError", "PieError", "UsageError", "Generation", "TokenLogprobs",
    "Broadcast", "broadcast", "receive", "receive_broadcast", "send", "send_event", "subscribe", "unsubscribe",
    "ModelInfo", "list_models", "model_info", "PageUsage", "page_usage", "ArgumentParser", "api_version", "args",
    "instance_id",
    "Greedy", "Sampler", "PendingFetch", "Response", "fetch", "fetch_start", "monotonic_ns", "now_ns", "sleep_ms",
    "store_delete", "store_get", "store_keys", "store_set", "export_context", "fill_cached", "import_context",
    "publish_prefix", "unexport_context", "StopCondition", "StopTracker", "Decoder", "apply_chat_template",
    "decode", "encode", "vocabulary",
]
