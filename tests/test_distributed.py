"""shared.distributed: backend choice, the launch environment, rank-0 printing, and the
process-tree runner that torchrun launches go through (the 2-process run is in test_ddp_train.py)."""

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import run_process_tree

from shared import distributed


def test_backend_is_nccl_on_cuda_and_gloo_otherwise():
    assert distributed.choose_backend(torch.device("cuda", 0)) == "nccl"
    assert distributed.choose_backend(torch.device("cpu")) == "gloo"
    assert distributed.choose_backend(torch.device("mps")) == "gloo"


def test_launch_environment_defaults_to_a_group_of_one():
    assert distributed.read_launch_environment({}) == (0, 0, 1)
    assert distributed.read_launch_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == (
        3,
        1,
        4,
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "but not LOCAL_RANK, WORLD_SIZE"),
        ({"RANK": "one", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK='one' is not a whole number"),
        ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK=2, LOCAL_RANK=0, WORLD_SIZE=2"),
    ],
)
def test_launch_environment_rejects_partial_or_inconsistent_variables(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.read_launch_environment(environ)


def test_session_rejects_more_processes_per_machine_than_gpus(monkeypatch):
    monkeypatch.setattr(distributed, "get_device", lambda prefer=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=1 has no GPU: only 1 visible.*--nproc_per_node=1"):
        with distributed.distributed_session():
            pass
    assert not torch.distributed.is_initialized()


def test_print_main_prints_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    distributed.print_main("from rank 1")
    monkeypatch.setenv("RANK", "0")
    distributed.print_main("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"


def test_helpers_work_outside_a_process_group():
    assert distributed.mean_across_processes(torch.tensor(2.5)) == 2.5
    model = torch.nn.Linear(2, 2)
    assert distributed.unwrap(model) is model


def test_unwrap_reaches_the_model_inside_torch_compile():
    model = torch.nn.Linear(2, 2)
    assert distributed.unwrap(torch.compile(model)) is model  # compiling is lazy: nothing is built here


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited and only waits to be reaped


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc (Linux)")
@pytest.mark.slow
def test_timeout_kills_the_command_and_the_processes_it_started():
    spawn_and_hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(TimeoutError, match="Stopped after 2 s") as caught:
        run_process_tree([sys.executable, "-c", spawn_and_hang], timeout=2)
    child_pid = int(re.search(r"child (\d+)", str(caught.value)).group(1))
    deadline = time.monotonic() + 10
    while _is_running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _is_running(child_pid)
