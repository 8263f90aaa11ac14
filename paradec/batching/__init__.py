"""Continuous batching: ``BatchEngine`` decodes many requests at once, each with its own
settings, admitting and retiring them between steps; ``AsyncBatchEngine`` streams them to
asyncio code."""

from paradec.batching.engine import BatchEngine, RequestOutput
from paradec.batching.stream import AsyncBatchEngine, RequestAborted

__all__ = ["AsyncBatchEngine", "BatchEngine", "RequestAborted", "RequestOutput"]
