"""The wing's few ``torch.distributed`` steps: is it running, where do
tensors go for a collective, a summing all-reduce, and failures made
collective (torch only)."""
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ['dist_ready', 'comm_device', 'all_reduce_sum',
           'synchronise_errors']


def dist_ready() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def comm_device(group: Optional[dist.ProcessGroup] = None
                ) -> torch.device:
    """Where a tensor must be for a collective of ``group``'s backend."""
    # NCCL only communicates CUDA tensors; gloo and others take CPU ones.
    if dist.get_backend(group) == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum(tensor: Tensor,
                   group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The sum of ``tensor`` over the processes, on ``tensor``'s device.

    Args:
        tensor (Tensor): This process's part.
        group (ProcessGroup, optional): Process group; default world.
    """
    device = comm_device(group) if dist.get_backend(group) == 'nccl' \
        else tensor.device
    buf = tensor.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(tensor.device)


def synchronise_errors(error: Optional[BaseException], stage: str,
                       distributed: bool = True) -> None:
    """Make a failure on any rank a failure on every rank.

    Call it on every rank, with the exception this rank caught (or None),
    before a collective that a failed rank would never reach: the ranks
    all-reduce one flag each, and if any is set every rank raises a
    RuntimeError naming the failing ranks and their messages, instead of
    the healthy ranks waiting in the next collective until the process-group
    timeout. Without ``torch.distributed`` (or with ``distributed=False``)
    it re-raises ``error`` itself.

    Args:
        error (BaseException, optional): What this rank caught.
        stage (str): What was being done, for the message.
        distributed (bool): Whether to synchronise. Defaults to True.
    """
    if not (distributed and dist_ready()):
        if error is not None:
            raise error
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(world, dtype=torch.int64, device=comm_device())
    flags[rank] = int(error is not None)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    failed = [r for r in range(world) if int(flags[r])]
    if not failed:
        return
    # Everyone knows there was a failure, so everyone enters this one too.
    messages: List[Optional[str]] = [None] * world
    mine = None if error is None else f'{type(error).__name__}: {error}'
    dist.all_gather_object(messages, mine)
    detail = '; '.join(f'rank {r}: {messages[r]}' for r in failed)
    raise RuntimeError(f'whitening failed on rank(s) {failed} while {stage}'
                       f' (every rank stops): {detail}') from error

