"""`python -m broker [--config PATH]`: run the broker until SIGINT/SIGTERM (then drain, exit 0).
Exit 2 on a configuration error, 1 if an endpoint cannot be bound."""
from __future__ import annotations

import argparse
import logging
import sys

import zmq

from common.config import add_config_argument, load_or_exit
from common.logs import configure_logging
from common.malloc import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description="the job broker (ZeroMQ)")
    add_config_argument(parser)
    parser.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long accepted jobs may take to finish (default 10)")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.config)
    configure_logging("broker", cfg.log_level)
    keep_freed_memory()
    from broker.server import run   # after the config is known good: keeps `--help` light
    try:
        return run(cfg, grace_s=args.grace)
    except zmq.ZMQError as exc:
        logging.getLogger("broker").error("cannot start: %s (endpoints %s, %s)", exc,
                                          cfg.broker.client_endpoint, cfg.broker.worker_endpoint)
        return 1


if __name__ == "__main__":
    sys.exit(main())
