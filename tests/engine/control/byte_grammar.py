"""A grammar compiler over a byte vocabulary for control-layer tests: ids 0-255 are the bytes, EOS is 256."""
from __future__ import annotations

from pie_server.engine.grammar import GrammarCompiler, LazyCompiler

EOS = 256
VOCAB_SIZE = EOS + 1


def _compiler() -> GrammarCompiler:
    return GrammarCompiler([bytes([i]) for i in range(256)] + [b"</s>"], VOCAB_SIZE, [EOS], None,
                           lambda text: list(text.encode()))


# One for every test: llguidance's view of the vocabulary is built once.
GRAMMARS = LazyCompiler(_compiler)
