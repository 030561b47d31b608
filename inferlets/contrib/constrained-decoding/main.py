"""constrained-decoding: output that always parses. The model may only sample tokens that keep the text inside
a JSON schema, a regular expression or an EBNF grammar; the mask is computed for every step by the host's
grammar engine (llguidance), so an unconstrained model still writes valid output.

    pie run constrained-decoding.wasm -- --prompt "A user record" --json-schema '{"type": "object", ...}'
    pie run constrained-decoding.wasm -- --prompt "A US phone number" --regex '\\([0-9]{3}\\) [0-9]{3}-[0-9]{4}'
    pie run constrained-decoding.wasm -- --prompt "2 + 3 * 4" --ebnf 'root ::= [0-9]+ (("+"|"*") [0-9]+)*'

Exactly one of --json-schema, --regex, --ebnf. EBNF (GBNF syntax, see ebnf.py) is compiled here to a regex,
recursion unrolled to --max-depth, because the host's constraints are JSON schema and regex. The text is
streamed on channel 0; a final event reports it, whether it parses, and (for a schema) the parsed value.
"""
import json
import re

from pie_sdk import (ArgumentParser, Context, Greedy, JsonSchema, Regex, Sampler, apply_chat_template, model_info,
                     send_event)

import ebnf


def main(args: list[str]) -> None:
    opts = _parse(args)
    constraint, pattern = _constraint(opts)
    ctx = Context()
    ctx.fill(apply_chat_template([{"role": "user", "content": opts.prompt}]) if opts.chat else opts.prompt)
    sampler = Greedy() if opts.temperature == 0 else Sampler(temperature=opts.temperature, seed=opts.seed)
    gen = ctx.generate_detailed(opts.max_tokens, sampler=sampler, constraint=constraint,
                                stop_token_ids=model_info().stop_token_ids, stream=True)
    report = {"text": gen.text, "finish_reason": gen.finish_reason, "num_tokens": len(gen.token_ids),
              "valid": _parses(gen.text, opts, pattern)}
    if opts.json_schema is not None and report["valid"]:
        report["value"] = json.loads(gen.text)
    if pattern is not None:
        report["regex"] = pattern
    send_event(report)


def _constraint(opts):
    """The host constraint, and the regex the output must match in full (None for a JSON schema)."""
    if opts.json_schema is not None:
        try:
            schema = json.loads(opts.json_schema)
        except ValueError as error:
            raise ValueError(f"--json-schema is not JSON: {error}") from None
        return JsonSchema(schema), None
    if opts.regex is not None:
        return Regex(opts.regex), opts.regex
    pattern = ebnf.compile_grammar(opts.ebnf, opts.start, opts.max_depth)
    return Regex(pattern), pattern


def _parses(text: str, opts, pattern: str | None) -> bool:
    """The check a client would make: the JSON decodes, or the whole text matches the pattern."""
    if pattern is None:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True
    return re.fullmatch(pattern, text) is not None


def _parse(args: list[str]):
    parser = ArgumentParser(prog="constrained-decoding", description="Generate text that always parses: a JSON "
                            "schema, a regex or an EBNF grammar masks every step.")
    parser.add_argument("--prompt", required=True, help="what to write about")
    grammar = parser.add_mutually_exclusive_group(required=True)
    grammar.add_argument("--json-schema", help="a JSON schema (JSON text); {\"type\": \"object\"}: any object")
    grammar.add_argument("--regex", help="a regular expression the whole output matches (Rust regex syntax)")
    grammar.add_argument("--ebnf", help="a GBNF-style grammar (rules NAME ::= ...)")
    parser.add_argument("--start", default="root", help="the EBNF start rule")
    parser.add_argument("--max-depth", type=int, default=3, help="how deep an EBNF rule may nest in itself")
    parser.add_argument("--raw", dest="chat", action="store_false",
                        help="use the prompt as is (default: wrap it in the model's chat template)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    opts = parser.parse_args(args)
    if opts.max_tokens < 1 or opts.max_depth < 0:
        parser.error("--max-tokens must be at least 1 and --max-depth not negative")
    return opts
