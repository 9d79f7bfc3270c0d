"""Context parallelism: attention over sequences sharded across the ranks of a torch.distributed group.

``from attnkit import distributed as akd`` (docs/api.md §5)::

    q_local = akd.shard(q, dim=1, group=g, sharding="zigzag")
    out_local = akd.context_parallel_attention(q_local, k_local, v_local, group=g, causal=True)
    full = akd.unshard(out_local, dim=1, group=g, sharding="zigzag")

Inside PyTorch's ``context_parallel``, ``use_with_torch_context_parallel()`` makes SDPA calls run attnkit's
ring, and ``attnkit.attention`` takes DTensor shards. See ``docs/distributed.md`` for the methods (ring,
all-gather) and what was run.
"""

from attnkit.distributed._cp import context_parallel_attention
from attnkit.distributed._sharding import position_ids, shard, unshard
from attnkit.distributed._torch_cp import use_with_torch_context_parallel

__all__ = [
    "context_parallel_attention",
    "position_ids",
    "shard",
    "unshard",
    "use_with_torch_context_parallel",
]
