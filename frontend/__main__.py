"""`python -m frontend [--config PATH]`: the OpenAI-compatible HTTP frontend.

Serves on server.host:server.port with server.workers Sanic processes (one broker connection
each). SIGINT/SIGTERM shut down gracefully; a config error exits 2 with one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

from sanic import Sanic
from sanic.worker.loader import AppLoader

from common.config import add_config_argument, load_or_exit
from common.logs import configure_logging
from frontend.app import process_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frontend", description=__doc__.splitlines()[0])
    add_config_argument(parser)
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.config)
    configure_logging("frontend", cfg.log_level)
    s = cfg.server
    # The loader re-creates the app inside each spawned worker process (the cfg is picklable).
    loader = AppLoader(factory=partial(process_app, cfg))
    app = loader.load()
    single = s.workers == 1
    app.prepare(host=s.host, port=s.port, workers=s.workers, single_process=single,
                access_log=s.access_log, motd=False)
    if single:
        Sanic.serve_single(primary=app)
    else:
        Sanic.serve(primary=app, app_loader=loader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
