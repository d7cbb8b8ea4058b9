"""Which rank runs which transformer blocks: an even split to start, a balanced one from measured times."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["balance", "even_split", "owners"]


def even_split(num_layers: int, world: int) -> list[range]:
    """Contiguous ranges of ``num_layers`` blocks over ``world`` ranks, the first ranks one block longer when it
    does not divide evenly."""
    if world < 1 or num_layers < world:
        raise ValueError(f"cannot split {num_layers} transformer blocks over {world} ranks: at most one rank per block")
    base, extra = divmod(num_layers, world)
    ranges, start = [], 0
    for rank in range(world):
        stop = start + base + (1 if rank < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def owners(ranges: Sequence[range]) -> list[int]:
    """The rank of every block."""
    return [rank for rank, layers in enumerate(ranges) for _ in layers]


def balance(block_ms: Sequence[float], fixed_ms: Sequence[float], num_layers: int) -> list[range]:
    """The contiguous split whose slowest rank is fastest.

    ``block_ms[r]``: rank ``r``'s measured time per block (its devices differ: a slower GPU, a shared one);
    ``fixed_ms[r]``: its time outside the blocks per forward (rank 0: embedding and the VAE; the last: the head).
    Every rank keeps at least one block. Dynamic programming over (ranks, blocks): O(ranks · blocks²).
    """
    world = len(block_ms)
    if world != len(fixed_ms):
        raise ValueError("block_ms and fixed_ms need one entry per rank")
    if world < 1 or num_layers < world:
        raise ValueError(f"cannot split {num_layers} blocks over {world} ranks")
    inf = float("inf")
    # best[r][k]: the least possible slowest stage when ranks 0..r-1 hold the first k blocks; cut[r][k]: where rank
    # r-1's range starts in that split.
    best = [[inf] * (num_layers + 1) for _ in range(world + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(world + 1)]
    best[0][0] = 0.0
    for r in range(1, world + 1):
        for k in range(r, num_layers - (world - r) + 1):
            for start in range(r - 1, k):
                cost = max(best[r - 1][start], fixed_ms[r - 1] + (k - start) * block_ms[r - 1])
                if cost < best[r][k] - 1e-12:
                    best[r][k], cut[r][k] = cost, start
    ranges: list[range] = []
    k = num_layers
    for r in range(world, 0, -1):
        start = cut[r][k]
        ranges.append(range(start, k))
        k = start
    return ranges[::-1]
