"""`pie runs [RUN_ID] [--cancel]`: the runs of a running server's inferlets (GET /v1/runs), one run with its
messages, or cancel one (DELETE /v1/runs/RUN_ID)."""
from __future__ import annotations

import argparse
import json
import sys

from pie_server.app.commands.client import ServerError, add_server_arguments, call

SUMMARY = "list, show or cancel a running server's inferlet runs"
DESCRIPTION = """\
Without RUN_ID, lists the runs of the server's inferlets (GET /v1/runs): id, status, messages, inferlet.
With RUN_ID, prints that run with its messages; with --cancel too, cancels it (its KV pages are freed)."""
EXAMPLES = """\
  pie runs
  pie runs run-0f3a9c                                # one run, with its messages
  pie runs run-0f3a9c --cancel --url http://gpu-box:8000 --api-key KEY"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", default=None, help="one run (with its messages)")
    parser.add_argument("--cancel", action="store_true", help="cancel RUN_ID (its pages are freed)")
    add_server_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.cancel and args.run_id is None:
        print("pie runs: error: --cancel needs a RUN_ID", file=sys.stderr)
        return 2
    try:
        if args.run_id is None:
            for run in call(args, "GET", "/v1/runs")["data"]:
                print(f"{run['id']}  {run['status']:<9}  {run['num_messages']:>6} messages  "
                      f"inferlet {run['inferlet_id'][:12]}")
            return 0
        print(json.dumps(call(args, "DELETE" if args.cancel else "GET", f"/v1/runs/{args.run_id}"), indent=2))
    except ServerError as error:
        print(f"pie runs: {error}", file=sys.stderr)
        return 1
    return 0
