"""The shared vocabulary of the engine: ids and small value types used across layers.

Ids are plain ints on the wire (batches, WIT calls); the aliases document roles.
"""
from __future__ import annotations

from typing import NewType

TokenId = int
"""A token of the model's vocabulary, 0 <= id < vocab_size."""

Position = int
"""A RoPE position of a token. Independent of where its KV sits in the pages."""

PageId = int
"""A physical KV page in the executor's pool, 0 <= id < num_pages."""

VirtualPageId = int
"""A page id as an inferlet instance sees it; the control layer maps it to a PageId."""

InstanceId = NewType("InstanceId", str)
"""One running inferlet instance."""

SlotId = int
"""A flat KV slot: page_id * page_size + offset within the page."""
