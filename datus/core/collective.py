"""The one way datus talks across processes: a single process, or every rank of ``torch.distributed``.

Under Lightning's DDP the process group is ``torch.distributed``'s, so the same calls serve the
end of ``datus predict`` (every rank), ``datus cluster`` (one process) and the torch k-means
engine. Tensors live on ``device`` because NCCL moves only CUDA tensors (gloo, CPU ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Collective:
    """The ranks taking part; every method is a no-op (or the identity) for a single process."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls, device: torch.device | None = None) -> Collective:
        device = device or torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(0, 1, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return gathered

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor``, on every rank."""
        if self.world_size > 1:
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=0)
        return tensor

    def sum_counts(self, counts: list[int]) -> list[int]:
        """Element-wise sum of small integer counts over ranks."""
        if self.world_size == 1:
            return list(counts)
        tensor = torch.tensor(counts, dtype=torch.int64, device=self.device)
        return [int(value) for value in self.all_reduce(tensor).tolist()]

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (small picklable objects), in rank order, on rank 0; None elsewhere."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def agree(self, failed: bool) -> bool:
        """True when any rank failed, on every rank: lets all ranks stop together instead of hanging."""
        return bool(self.sum_counts([int(failed)])[0])
