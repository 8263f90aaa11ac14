"""``paradec serve``: the frontend and its engine in one command, optionally with HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging

from paradec.errors import ConfigError
from paradec.serve.frontend import EngineTarget, Frontend
from paradec.serve.protocol import Limits


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("nproc", "max_pending", "max_batch"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.http_port is not None and args.http_host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        raise ConfigError(f"--http-host {args.http_host} (not loopback) needs --token; HTTP clients then send "
                          f"'Authorization: Bearer <token>'")
    target = EngineTarget(args.model, args.max_batch, args.device, Limits(), nproc=args.nproc)
    frontend = Frontend(args.address, target, token=args.token, max_pending=args.max_pending)
    asyncio.run(_main(frontend, args))
    return 0


async def _main(frontend: Frontend, args: argparse.Namespace) -> None:
    await frontend.start()
    try:
        if args.http_port is None:
            await asyncio.gather(*frontend.tasks)
            return
        import uvicorn

        from paradec.serve.http import create_app

        app = create_app(frontend.address, token=frontend.token)
        server = uvicorn.Server(uvicorn.Config(app, host=args.http_host, port=args.http_port, log_level="info"))
        await asyncio.gather(server.serve(), *frontend.tasks)
    finally:
        await frontend.stop()
