"""The one small module that talks to torch.distributed.

World size 1 is the same code path with every collective skipped (house rule 2, CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op at world size 1).

    NCCL reduces device tensors only, so a CPU tensor (histograms, per-tensor norms) makes a
    round trip through this rank's GPU there; gloo reduces it where it is.
    """
    if world_size() == 1:
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        on_device = tensor.to(default_device(), copy=True)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank scalar over ranks: one all-reduce of one float64 (a no-op at
    world size 1). Collective: every rank must call it at the same point."""
    if world_size() == 1:
        return value
    return float(all_reduce_sum_(torch.tensor([value], dtype=torch.float64))[0]) / world_size()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order (a one-item list at world size 1). Small objects only."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def env_world_size() -> int:
    """World size as set by the launcher (torchrun, deepspeed, Slurm via srun), before init."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """This rank's accelerator if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_from_env() -> None:
    """Join the process group the launcher described (gloo on CPU, nccl on GPU); idempotent."""
    if is_distributed() or env_world_size() == 1:
        return
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = _restart_store()
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(
            backend=backend, store=store, rank=rank_from_env(), world_size=env_world_size()
        )


def rank_from_env() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _restart_store():
    """After a torchrun restart, a store namespace of this attempt's own, where one is needed.

    Under torchrun's shared agent store (its default) the store outlives an attempt, and a
    restarted gloo group could read the killed attempt's peer addresses from it and fail with
    "connectFullMesh ... Connection refused": keys are prefixed with the restart count, which
    every agent shares when they all restart. On several nodes launch/torchrun.sh turns the
    sharing off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): each rendezvous round then gets a fresh store on a
    fresh port, hosted by rank 0, with nothing stale in it, and a brand-new agent (a lost host's
    replacement, restart count 0) meets restarted ones (count 1) there. None in that case, on a
    first attempt and outside torchelastic: the default env:// rendezvous is used.
    """
    import os
    from datetime import timedelta

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    if restart in (None, "0") or not agent_store:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env_world_size(),
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"ctscale/attempt_{restart}", store)


# What gloo and NCCL say when the other end of a collective is gone (killed, host lost).
_LOST_PEER = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "communicator was aborted",
)


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank (or its host) died."""
    return is_distributed() and isinstance(err, RuntimeError) and any(m in str(err) for m in _LOST_PEER)


# Whether this process destroyed a process group (see exit_process).
_left_group = False


def shutdown() -> None:
    """Leave the process group cleanly, every rank together."""
    global _left_group
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        _left_group = True


def exit_process(code: int) -> None:
    """End a process that joined a process group with ``code``, once its exit handlers have run,
    without the interpreter's teardown; a process that joined none returns and exits as usual.

    destroy_process_group does not stop gloo's threads (pt_gloo_runloop, gloo_tcp_loop) while
    something else holds the group, and FSDP2 does: on torch 2.13 they are still running after
    destroy_process_group and a garbage collection. A job that had finished was seen to abort in
    that teardown ("terminate called without an active exception", SIGABRT), which torchrun
    counts as a failed worker (and restarts). multiprocessing's children end the same way: exit
    handlers (logging, trackers' atexit), flushed streams, then os._exit.
    """
    import atexit
    import os
    import sys

    if not (_left_group or is_distributed()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``t`` (the shard of a DTensor; ``t`` itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t
