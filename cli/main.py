"""The `hvplace` command: global flags, one subcommand group per noun, exit codes.

Errors exit non-zero with the reason word and the message. `hvplace lab ...` is the
lab's own command (`python -m hvplace.lab`), run in place of this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hvplace.cli import admin, cluster, hosts, images, rebalance, rules, simulate, vms
from hvplace.cli.client import DEFAULT_ENDPOINT, TIMEOUT_S, Client, Credentials
from hvplace.proto.errors import HvplaceError

# Exit codes: 1 for an error the server reported (reason word printed), 2 for usage.
EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvplace", description="Operate an hvplace cluster through its coordinator's gRPC API."
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("HVPLACE_ENDPOINT", DEFAULT_ENDPOINT),
        help="coordinator address(es), comma-separated; the leader is found among them"
        " (default: $HVPLACE_ENDPOINT or %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the API's JSON instead of tables"
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per call")
    for flag, env, text in (
        ("--ca", "HVPLACE_CA", "CA certificate (PEM) that signed the coordinators' TLS cert"),
        ("--cert", "HVPLACE_CERT", "client certificate (PEM) for mTLS"),
        ("--key", "HVPLACE_KEY", "the client certificate's key (PEM)"),
        ("--token-file", "HVPLACE_TOKEN_FILE", "file holding a bearer token"),
    ):
        parser.add_argument(flag, default=os.environ.get(env, ""), help=f"{text} (default: ${env})")
    top = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    vms.register(top)
    images.register(top)
    rules.register(top)
    hosts.register(top)
    cluster.register(top)
    rebalance.register(top)
    vms.register_explain(top)
    simulate.register(top)
    admin.register(top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lab"]:
        # `hvplace lab ...` drives the single-machine lab; it talks to no coordinator. The
        # lab is its own program: this process becomes it (same exit code, same signals).
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "hvplace.lab", *argv[1:]])
    parser = build_parser()
    args = parser.parse_args(argv)
    client = None
    endpoints = [e.strip() for e in args.endpoint.split(",") if e.strip()]
    try:
        if not getattr(args, "cluster", None) and not getattr(args, "local", False):
            creds = Credentials.load(args.ca, args.cert, args.key, args.token_file)
            client = Client(endpoints, timeout=args.timeout, credentials=creds)
        args.func(client, args)
    except HvplaceError as e:
        print(f"hvplace: {e.reason.value}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if client is not None:
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
