"""Serving: an engine process behind a ZeroMQ + msgpack wire (``protocol``, docs/wire.md), the
frontend that routes clients to it (``frontend``), the clients (``client``) and an
OpenAI-compatible HTTP endpoint on top of them (``http``). Start one with ``paradec serve``."""

from paradec.serve.client import Accepted, AsyncClient, Client, EngineDead, Progress, ServedResult, ServeError

__all__ = ["Accepted", "AsyncClient", "Client", "EngineDead", "Progress", "ServeError", "ServedResult"]
