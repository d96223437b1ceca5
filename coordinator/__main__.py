"""`hvplace-coordinator`: parse the config once, run the Coordinator, handle SIGTERM/SIGINT (here only)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from hvplace.proto.errors import HvplaceError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvplace-coordinator",
        description="hvplace coordinator (config: TOML file < HVPLACE_* env < flags).",
    )
    p.add_argument("--config", type=Path, help="TOML file (default /etc/hvplace/coordinator.toml)")
    p.add_argument("--node-name", dest="node_name", help="this coordinator's name")
    p.add_argument("--etcd", dest="etcd_endpoints", help="comma-separated host:port list")
    p.add_argument("--listen", help="gRPC API host:port ('' for none)")
    p.add_argument("--metrics-listen", dest="metrics_listen", help="host:port, '' to disable")
    p.add_argument("--session-ttl", dest="session_ttl_s", type=float, help="leader lease TTL (s)")
    p.add_argument("--resync", dest="resync_s", type=float, help="full resync period (s)")
    p.add_argument("--auth-file", dest="auth_file", help="principals (tokens, cert names)")
    p.add_argument(
        "--anonymous-role", dest="anonymous_role", help="role of callers without credentials"
    )
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--check-config", action="store_true", help="print the config and exit")
    return p


async def _serve(coordinator: object) -> None:
    from hvplace.coordinator.daemon import Coordinator

    assert isinstance(coordinator, Coordinator)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(coordinator.shutdown()))
    await coordinator.run()


def main(argv: list[str] | None = None) -> int:
    from hvplace.coordinator import config as coordinator_config
    from hvplace.coordinator.config import budget_text

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("config", "check_config") and v is not None
    }
    try:
        cfg = coordinator_config.load(args.config, overrides=overrides)
    except HvplaceError as e:
        print(f"hvplace-coordinator: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(cfg)
        print(budget_text(cfg.cluster()))
        return 0
    logging.basicConfig(
        stream=sys.stdout,
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from hvplace.coordinator.daemon import Coordinator, tune_collector

    tune_collector()
    try:
        asyncio.run(_serve(Coordinator(cfg)))
    except HvplaceError as e:
        logging.getLogger("hvplace.coordinator").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
