"""``paradec serve``: the frontend and its engine in one command, optionally with HTTP.

Stopping: SIGTERM or SIGINT (what systemd, Docker, Kubernetes and Ctrl-C send) answers every
request in flight with ``shutting_down`` (HTTP: 503), gives HTTP connections up to
``HTTP_GRACE_S`` to finish, then ends the engine and every rank (SIGTERM, then SIGKILL to their
process group) and exits 0 — within 10 s even with stuck HTTP clients. The engine and its ranks
die with the frontend if it is killed outright (``paradec.serve.process.die_with_parent``).

The shared secret comes from ``--token-file`` or ``PARADEC_TOKEN``, never from a flag's value
(a command line is visible to every user in ``ps``), and has at least 16 characters.

HTTP serves at most ``http_connections(--max-pending)`` connections at once; uvicorn answers 503
to a request on any connection beyond them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
from pathlib import Path

from paradec.config import GenerationConfig
from paradec.errors import ConfigError
from paradec.serve.frontend import MIN_TOKEN_CHARS, EngineTarget, Frontend, check_token
from paradec.serve.protocol import Limits

log = logging.getLogger("paradec.serve")
HTTP_GRACE_S = 2.0  # HTTP connections still open at a stop get this long, then are cancelled
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def http_connections(max_pending: int) -> int:
    """The HTTP connections served at once: one per request the frontend holds (more are refused
    busy) and as many again for connections idle between requests (keep-alive), probes and refusals."""
    return 2 * max_pending


def served_model_name(args: argparse.Namespace) -> str:
    """The model id the HTTP endpoint lists: ``--served-model-name``, else ``--model`` as given."""
    name = getattr(args, "served_model_name", None)
    if name is None:
        return str(getattr(args, "model", "paradec"))
    if not isinstance(name, str) or not 0 < len(name) <= 256 or name != name.strip():
        raise ConfigError(f"--served-model-name must be 1 to 256 characters without surrounding spaces, got {name!r}")
    return name


def read_token(args: argparse.Namespace) -> str | None:
    """The shared secret: ``--token-file`` (whitespace around it dropped), else PARADEC_TOKEN."""
    if getattr(args, "token", None):
        raise ConfigError("--token puts the secret on the command line, where ps shows it to every user; "
                          "use --token-file PATH or the PARADEC_TOKEN environment variable")
    token = None
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
    elif os.environ.get("PARADEC_TOKEN"):
        token = os.environ["PARADEC_TOKEN"]
    check_token(token)
    return token


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("nproc", "max_pending", "max_batch"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("request_timeout_s", "http_max_body_bytes"):  # inf and nan too: every request would fail
        value = getattr(args, name, None)
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    kv_memory_fraction = args.kv_memory_fraction
    if not 0 < kv_memory_fraction <= 1:
        raise ConfigError(f"--kv-memory-fraction must lie in (0, 1], got {kv_memory_fraction}")
    if getattr(args, "stall_timeout_s", None) is not None and not 0 <= args.stall_timeout_s < math.inf:
        raise ConfigError(f"--stall-timeout-s must be a finite number >= 0 (0: never), got {args.stall_timeout_s}")
    token = read_token(args)
    served_model_name(args)  # a bad name fails before anything starts
    if args.http_port is not None and args.http_host not in LOOPBACK_HOSTS and not token:
        raise ConfigError(f"--http-host {args.http_host} (not loopback) needs a token (--token-file or PARADEC_TOKEN, "
                          f"at least {MIN_TOKEN_CHARS} characters); HTTP clients then send "
                          f"'Authorization: Bearer <token>'")
    for settings in args.warm_up:
        if not isinstance(settings, dict):
            raise ConfigError(f"--warm-up takes a JSON object of request settings, got {settings!r}")
        GenerationConfig.build(None, **settings)  # a bad setting fails here, not in the engine process
    target = EngineTarget(args.model, args.max_batch, args.device, Limits(), nproc=args.nproc,
                          kv_memory_fraction=kv_memory_fraction, warm_up=tuple(args.warm_up))
    frontend = Frontend(args.address, target, token=token, max_pending=args.max_pending,
                        request_timeout_s=getattr(args, "request_timeout_s", None),
                        stall_timeout_s=getattr(args, "stall_timeout_s", None) or None,
                        restart=getattr(args, "restart", True))
    return asyncio.run(_main(frontend, args))


class _Uvicorn:
    """uvicorn's server without its own signal handling: the frontend owns SIGTERM and SIGINT
    and stops everything in order (uvicorn would re-raise the signal after its shutdown, ending
    the process with it instead of exit code 0)."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

            def install_signal_handlers(self) -> None:  # older uvicorn
                pass

        return Server(config)


async def _main(frontend: Frontend, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: %s", sig.name, "stopping" if not stop.is_set() else "already stopping")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    stopping = asyncio.ensure_future(stop.wait())
    web = web_task = None
    code = 0
    try:
        starting = asyncio.ensure_future(frontend.start())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 0
        starting.result()  # an engine that could not start raises here
        waits = set(frontend.tasks)
        if args.http_port is not None:
            import uvicorn

            from paradec.serve.http import create_app

            app = create_app(frontend.address, token=frontend.token, timeout_s=getattr(args, "request_timeout_s", None),
                             max_body_bytes=getattr(args, "http_max_body_bytes", None) or (1 << 20),
                             model_name=served_model_name(args),  # what /v1/models lists
                             max_prompts=frontend.max_pending)
            # uvicorn refuses a request on the connection that reaches limit_concurrency: one past those served
            web = _Uvicorn(uvicorn.Config(app, host=args.http_host, port=args.http_port, log_level="info",
                                          timeout_graceful_shutdown=HTTP_GRACE_S,
                                          limit_concurrency=http_connections(frontend.max_pending) + 1))
            web_task = asyncio.ensure_future(web.serve())
            waits.add(web_task)
        done, _ = await asyncio.wait(waits | {stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopping}:  # not a signal: a loop of the frontend ended, or the HTTP server did
            if not task.cancelled() and task.exception() is not None:
                log.error("stopping: %r", task.exception())
                code = 1
    finally:
        stopping.cancel()
        # 1. every request in flight gets shutting_down (HTTP handlers waiting on one answer 503)
        await frontend.refuse_all("the server is shutting down")
        # 2. HTTP connections get HTTP_GRACE_S to finish, then are cancelled
        if web is not None:
            web.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(web_task), HTTP_GRACE_S + 2)
            except (TimeoutError, asyncio.CancelledError):
                web.force_exit = True
                web_task.cancel()
            except BaseException as e:  # noqa: BLE001 - uvicorn ends with SystemExit when it cannot bind
                log.error("the HTTP server: %r", e)
                code = 1
        # 3. the engine and every rank, then the sockets
        await frontend.stop()
    return code
