"""The agent's conversation: chat messages, and the one context that holds their tokens.

Invariant: `text` is exactly what the context holds: the rendered prompt, then everything written or
generated after it, in order. Appending a turn fills only what the chat template renders after `text`, so the
tokens of every earlier turn keep their KV (nothing is prefilled twice). Each appended turn renders the whole
conversation once (a host call that grows with it): the observation turn's head and tail come from the
rendering that open_user_turn does while the tool works.
"""
from pie_sdk import Context, Generation, apply_chat_template, fill_cached

CONTENT_MARK = "\x00"  # where a turn's content goes on in a rendering: a character no template writes itself


class Transcript:
    def __init__(self, messages: list[dict]) -> None:
        self.messages = messages
        self.text = apply_chat_template(messages)
        self.ctx = Context()
        self.num_cached = fill_cached(self.ctx, self.text)  # a prefix other runs computed is not prefilled again
        self.templated = True  # False once the chat template turned out to rewrite earlier turns
        self.num_prefilled_tokens = 0  # sent to the engine as input: filled, or the last token of a generation
        self.num_generated_tokens = 0
        self.num_generate_calls = 0
        # (content_start, tail): what open_user_turn's rendering put after the turn's content (the turn's end,
        # the assistant's opening), so that add_user_turn writes the rest without rendering again.
        self._open_turn: tuple[str, str] | None = None
        # Whether writing a turn's content between that head and tail gives what the template renders: checked
        # against a full rendering at the first turn (a template may rewrite a turn's content), then trusted.
        self._splices: bool | None = None

    def write(self, text: str) -> None:
        """Text the agent writes itself (its KV is computed with the next generation)."""
        self.ctx.fill(text)
        self.text += text

    def flush(self) -> None:
        """Computes the KV of the pending tokens now (but the last, kept to predict from), not with the next
        generation: worth it while the agent waits anyway, for a tool."""
        self.num_prefilled_tokens += max(0, len(self.ctx.pending_ids) - 1)
        self.ctx.flush()

    def generate(self, max_tokens: int, **options: object) -> Generation:
        """Continues the context (pie_sdk's generate_detailed options, never streamed) and keeps the counts."""
        self.num_prefilled_tokens += len(self.ctx.pending_ids)
        gen = self.ctx.generate_detailed(max_tokens, stream=False, **options)
        self.num_generated_tokens += len(gen.token_ids)
        self.num_generate_calls += 1
        self.text += gen.text
        return gen

    def end_turn(self, content: str) -> None:
        """The assistant's turn so far (already in the context) is `content`."""
        self.messages.append({"role": "assistant", "content": content})

    def open_user_turn(self, content_start: str) -> None:
        """Writes what the chat template renders before a user turn whose content starts with content_start,
        that start included, and flushes it: add_user_turn(content) then writes only the rest, and what this
        rendering put after the content (one rendering per turn: each renders the whole conversation)."""
        self._open_turn = None
        if not self.templated:
            return
        turn = {"role": "user", "content": content_start + CONTENT_MARK}
        rendered = apply_chat_template([*self.messages, turn])
        mark = rendered.find(CONTENT_MARK)
        head = rendered[:mark]
        if mark >= 0 and head.startswith(self.text):
            self.write(head[len(self.text):])
            self.flush()
            if rendered.count(CONTENT_MARK) == 1:  # the content appears once: the tail follows it
                self._open_turn = (content_start, rendered[mark + len(CONTENT_MARK):])

    def add_user_turn(self, content: str) -> None:
        """A user turn (and the assistant's turn opened after it), filled as the chat template renders it.
        After open_user_turn, the rest of the content and the tail it rendered are written without rendering
        the conversation again, once the first turn showed that this gives the template's own rendering."""
        opened, self._open_turn = self._open_turn, None
        self.messages.append({"role": "user", "content": content})
        spliced = None
        if opened is not None and content.startswith(opened[0]):
            spliced = content[len(opened[0]):] + opened[1]
            if self._splices:
                self.write(spliced)
                return
        rendered = apply_chat_template(self.messages) if self.templated else ""
        if self.templated and rendered.startswith(self.text):
            rest = rendered[len(self.text):]
            if spliced is not None:
                self._splices = rest == spliced
            self.write(rest)
        else:  # the template rewrites earlier turns: plain ReAct framing from here on, never a re-prefill
            self.templated = False
            self.write(f"\n{content}\n")

    def counts(self) -> dict:
        ctx = self.ctx
        return {"num_cached_tokens": self.num_cached, "num_prefilled_tokens": self.num_prefilled_tokens,
                "num_generated_tokens": self.num_generated_tokens, "num_generate_calls": self.num_generate_calls,
                "kv_len": ctx.kv_len, "num_pages": len(ctx.page_ids), "page_size": ctx.page_size}
