"""How the model writes one action, {"thought": ..., "tool": ..., "input": ...}, in two ways that give the same
JSON text (keys in this order, ", " and ": " as separators, as the host's JSON grammar writes them):

- `json`: one generation under the action's JSON schema (what an OpenAI client gets with response_format
  json_schema): the model decodes every token, the grammar's fixed keys and punctuation included.
- `template`: the agent writes the fixed part itself and the model decodes only the values, each under a small
  regex (a string without quotes, backslashes or control characters; a tool name from the list). The fixed
  text is prefilled together with the next value's first step instead of decoded token by token; so is a
  closing quote wherever the grammar, not the model, decides where the value ends (a tool name, a value of
  fixed length); a tool name that is the only choice is written, not decoded.
"""
import argparse
import json

from pie_sdk import JsonSchema, PieError, Regex

from transcript import Transcript

MAX_ACTION_TOKENS_FLOOR = 32  # JSON punctuation and keys, beyond what the string fields may take
# --uniform-values: exactly N of these, so the tokens a value takes hardly depend on what the model writes
# (a string of digits would take a token per character, words about one per four).
UNIFORM_CHARS = "[a-z ]"


def action_schema(names: list[str], opts: argparse.Namespace) -> dict:
    properties: dict = {}
    if opts.thought_chars:
        properties["thought"] = _string_schema(opts.thought_chars, opts.uniform_values)
    properties["tool"] = {"enum": names}
    properties["input"] = _string_schema(opts.input_chars, opts.uniform_values)
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def json_action(transcript: Transcript, names: list[str], opts: argparse.Namespace) -> dict:
    max_tokens = MAX_ACTION_TOKENS_FLOOR + opts.thought_chars + opts.input_chars  # a char is at least a token
    gen = transcript.generate(max_tokens, constraint=JsonSchema(action_schema(names, opts)))
    try:
        action = json.loads(gen.text)
    except ValueError:
        raise PieError(f"the action is not complete JSON ({gen.finish_reason}): {gen.text!r}") from None
    transcript.end_turn(gen.text)
    return action


def template_action(transcript: Transcript, names: list[str], opts: argparse.Namespace) -> dict:
    fields = [("thought", opts.thought_chars)] if opts.thought_chars else []
    fields += [("tool", 0), ("input", opts.input_chars)]
    start = len(transcript.text)
    action = {}
    for i, (key, num_chars) in enumerate(fields):
        transcript.write(("{" if i == 0 else ", ") + f'"{key}": "')
        if key != "tool":
            action[key] = _string_value(transcript, num_chars, opts.uniform_values)
        elif len(names) == 1:
            transcript.write(names[0] + '"')
            action[key] = names[0]
        else:
            action[key] = _tool_value(transcript, names)
    transcript.write("}")
    transcript.end_turn(transcript.text[start:])
    return action


def _string_value(transcript: Transcript, num_chars: int, uniform: bool) -> str:
    """A string with nothing that needs escaping. Uniform: exactly num_chars letters and spaces, the grammar
    ends it; otherwise at most num_chars characters, the model closes it."""
    if uniform:
        return _value(transcript, f"{UNIFORM_CHARS}{{{num_chars}}}", num_chars, closes=False)
    return _value(transcript, r'[^"\\\x00-\x1f]{0,%d}"' % num_chars, num_chars + 1, closes=True)


def _tool_value(transcript: Transcript, names: list[str]) -> str:
    """One of the names (letters, digits, '_' or '-'). When none is a prefix of another, the grammar knows where
    a name ends; otherwise the model closes the string."""
    closes = any(a != b and b.startswith(a) for a in names for b in names)
    pattern = "(" + "|".join(names) + ")" + ('"' if closes else "")
    return _value(transcript, pattern, max(map(len, names)) + 1, closes)


def _value(transcript: Transcript, pattern: str, max_tokens: int, closes: bool) -> str:
    """Decodes a string's value under the regex and leaves the context after its closing quote. When the
    grammar, not the model, ends the value, the agent writes the quote: a decode step saved."""
    text = transcript.generate(max_tokens, constraint=Regex(pattern)).text
    if closes and text.endswith('"'):
        return text[:-1]
    transcript.write('"')  # the grammar ended the value, or the token budget cut it
    return text


def _string_schema(max_chars: int, uniform: bool) -> dict:
    if uniform:
        return {"type": "string", "pattern": f"^{UNIFORM_CHARS}{{{max_chars}}}$"}
    return {"type": "string", "maxLength": max_chars}
