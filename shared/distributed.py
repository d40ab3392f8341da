"""Plumbing for data-parallel training with torchrun, built in appendix A.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or several on a
CPU) and tells each who it is through environment variables: ``RANK`` (its number among all
processes), ``LOCAL_RANK`` (its number on this machine, which picks the GPU) and
``WORLD_SIZE`` (how many processes there are). This module turns those into a process group
with the right backend, makes sure the group is always torn down, and gives small helpers that
every data-parallel script needs: print from one process only, average a number over all of
them, reach the model inside its ``DistributedDataParallel`` wrapper, and launch torchrun
from Python without ever leaving processes behind.

Appendix A's ``ddp_train.py`` uses it for a toy network; ch05's multi-GPU pretraining reuses it.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shared.utils import get_device

# What torchrun sets for every process it starts.
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistributedInfo:
    """Who this process is in the group, and where its model lives."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device


def choose_backend(device: torch.device) -> str:
    """``nccl`` for CUDA GPUs (fast GPU-to-GPU transfers), ``gloo`` for everything else.

    gloo works on CPU tensors on Linux, macOS and Windows, so the same script also runs on a
    laptop with no GPU.
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def read_launch_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """Return ``(rank, local_rank, world_size)`` as torchrun set them.

    A script started plainly (``python script.py``) has none of the variables and counts as a
    group of one: ``(0, 0, 1)``.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return 0, 0, 1
    if len(present) != len(LAUNCH_VARIABLES):
        missing = sorted(set(LAUNCH_VARIABLES) - set(present))
        raise ValueError(
            f"Found {', '.join(present)} but not {', '.join(missing)} in the environment. "
            "Start the script with torchrun (python -m torch.distributed.run), which sets all of "
            f"{', '.join(LAUNCH_VARIABLES)}, or with none of them for a single process."
        )
    values = {}
    for name in LAUNCH_VARIABLES:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(
                f"{name}={environ[name]!r} is not a whole number; torchrun sets it to one."
            ) from None
    rank, local_rank, world_size = (values[name] for name in LAUNCH_VARIABLES)
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank <= rank:
        raise ValueError(
            f"Inconsistent launch variables RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}: "
            "need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK <= RANK."
        )
    return rank, local_rank, world_size


def _device_for(local_rank: int, prefer: str | None = None) -> torch.device:
    """One GPU per process (picked by LOCAL_RANK) when CUDA is in use, else the CPU.

    Apple's MPS has no collective-communication backend, so data-parallel runs there use the CPU.
    ``prefer="cpu"`` (or ``LLMS_DEVICE=cpu``) forces the CPU on a GPU machine too (see
    ``shared.utils.get_device``).
    """
    if get_device(prefer).type != "cuda":
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ValueError(
            f"Process with LOCAL_RANK={local_rank} has no GPU: only {visible} visible on this machine. "
            f"Start at most --nproc_per_node={visible} processes per machine."
        )
    return torch.device("cuda", local_rank)


@contextmanager
def distributed_session(
    timeout: timedelta = timedelta(minutes=5), device: str | None = None
) -> Iterator[DistributedInfo]:
    """Join the process group for the body of a ``with`` block, and always leave it.

    Under torchrun every process connects to the others through the address torchrun chose
    (``MASTER_ADDR``/``MASTER_PORT``). Started plainly, the script forms a group of one
    in-process, so the same code (``DistributedDataParallel`` included) runs unchanged.
    ``timeout`` bounds how long a collective waits for a process that crashed or never came.
    ``device`` ("cuda", "cpu", ...; None: the best available) picks the kind of device; under
    torchrun each process takes the GPU of its LOCAL_RANK.
    """
    rank, local_rank, world_size = read_launch_environment()
    device = _device_for(local_rank, device)
    backend = choose_backend(device)
    if device.type == "cuda":
        # Before init: NCCL binds each process to the GPU that is current when it starts.
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    else:
        # A group of one needs no network: an in-memory store is enough.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        yield DistributedInfo(rank, local_rank, world_size, backend, device)
    except BaseException:
        # Leave at once: waiting for the other processes could hang if they are stuck in a
        # collective this one will never join (torchrun stops them when this one fails).
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    # A clean exit, in order: free objects that still hold the group (DDP's reducer sits in
    # reference cycles that only the garbage collector breaks), wait until every process has
    # finished its collectives, then release the group's threads and sockets. Tearing down
    # while a peer is mid-collective, or with the reducer freed after the group at interpreter
    # exit, can abort the process after training has already succeeded.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def current_rank() -> int:
    """This process's rank: from the process group once joined, else from torchrun's ``RANK``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only, so N processes do not print every line N times."""
    if current_rank() == 0:
        print(*args, **kwargs)


def mean_across_processes(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Average a number over all processes (e.g. each one's loss on its share of the data).

    Every process must call it, in the same order, or the others wait until the timeout.
    The sum is reduced and then divided, because gloo has no built-in average.
    """
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone()
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.item()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).item()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` and/or ``torch.compile`` wrapper (or the model itself).

    Save and evaluate the inner model: its ``state_dict`` keys have no ``module.`` or
    ``_orig_mod.`` prefix, and calling it does not trigger the wrapper's cross-process
    synchronisation.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)  # what torch.compile wraps


def _stop_process_tree(process: subprocess.Popen) -> None:
    """Kill torchrun and the workers it started (they share its new session/process group)."""
    if process.poll() is not None:
        return
    if os.name == "posix":
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # everyone exited in the meantime
            pass
    else:
        process.kill()


def run_process_tree(
    command: Sequence[str],
    timeout: float,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``command``, returning its output (stdout and stderr together) in ``.stdout``.

    If it takes longer than ``timeout`` seconds, or the caller is interrupted, the command and
    every process it started are killed before the error is raised. That matters for torchrun:
    killing only the launcher would leave its workers waiting on each other forever.
    """
    # A new session makes the command the leader of a process group that its children join,
    # so one killpg reaches every one of them.
    isolation = {"start_new_session": True} if os.name == "posix" else {}
    process = subprocess.Popen(
        list(map(str, command)),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **isolation,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_process_tree(process)
        output, _ = process.communicate()
        raise TimeoutError(
            f"Stopped after {timeout:g} s without finishing: {' '.join(process.args)}\nOutput so far:\n{output}"
        ) from None
    except BaseException:  # KeyboardInterrupt in a notebook, for instance
        _stop_process_tree(process)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def launch_torchrun(
    script: str | Path,
    script_args: Sequence[str] = (),
    nproc_per_node: int = 2,
    timeout: float = 120.0,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node=N script ...``.

    ``--standalone`` lets torchrun pick a free port on this machine, so several runs (say, two
    test sessions) never collide. The run is bounded by ``timeout`` as in :func:`run_process_tree`.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}.")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        str(script),
        *map(str, script_args),
    ]
    return run_process_tree(command, timeout=timeout, cwd=cwd, env=env)
