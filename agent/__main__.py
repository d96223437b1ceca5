"""`hvplace-agent`: parse the config once, run the Agent, handle SIGTERM/SIGINT (here only).

`hvplace-agent build-image` builds the tiny test guest instead (see guest_image.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from hvplace.proto.errors import HvplaceError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvplace-agent",
        description="hvplace node agent (config: TOML file < HVPLACE_AGENT_* env < flags)."
        " `hvplace-agent build-image [--force]` builds the test guest.",
    )
    p.add_argument("--config", type=Path, help="TOML file (default /etc/hvplace/agent.toml)")
    p.add_argument("--host", help="this host's name in the cluster")
    p.add_argument("--etcd", dest="etcd_endpoints", help="comma-separated host:port list")
    p.add_argument("--libvirt-uri", dest="libvirt_uri")
    p.add_argument("--state-dir", dest="state_dir")
    p.add_argument("--domain-type", dest="domain_type", choices=("auto", "kvm", "qemu"))
    p.add_argument("--metrics-listen", dest="metrics_listen", help="host:port, '' to disable")
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--check-config", action="store_true", help="print the config and exit")
    return p


async def _serve(agent: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.shutdown()))
    await agent.run()


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["build-image"]:
        from hvplace.agent import guest_image

        return guest_image.main(args_in[1:])
    from hvplace.agent import config as agent_config

    args = _parser().parse_args(args_in)
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("config", "check_config") and v is not None
    }
    try:
        cfg = agent_config.load(args.config, overrides=overrides)
    except HvplaceError as e:
        print(f"hvplace-agent: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stdout,
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.check_config:
        print(cfg)
        return 0
    from hvplace.agent.service import Agent

    try:
        asyncio.run(_serve(Agent(cfg)))
    except HvplaceError as e:
        logging.getLogger("hvplace.agent").error("refusing to run: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
