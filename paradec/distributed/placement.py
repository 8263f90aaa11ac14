"""Which rank decodes which think blocks."""

from __future__ import annotations

from dataclasses import dataclass

SUMMARY_RANK = 0


@dataclass(frozen=True)
class Placement:
    """Think blocks spread over ranks in contiguous, balanced runs (sizes differ by at most
    one); rank 0 owns the summary. With fewer blocks than ranks, the last ranks are idle."""

    world_size: int
    blocks_of_rank: tuple[tuple[int, ...], ...]

    @classmethod
    def plan(cls, num_blocks: int, world_size: int) -> Placement:
        base, extra = divmod(num_blocks, world_size)
        runs, start = [], 0
        for rank in range(world_size):
            size = base + (rank < extra)
            runs.append(tuple(range(start, start + size)))
            start += size
        return cls(world_size, tuple(runs))

    @property
    def idle_ranks(self) -> list[int]:
        return [r for r, blocks in enumerate(self.blocks_of_rank) if not blocks]

    def as_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "blocks_of_rank": [list(b) for b in self.blocks_of_rank],
            "idle_ranks": self.idle_ranks,
            "summary_rank": SUMMARY_RANK,
        }
