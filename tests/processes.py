"""Running a command in a test with a time limit that also reaches the processes it starts."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from shared import distributed


def run_process_tree(command: Sequence[str], timeout: float, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``command`` (in folder ``cwd``, with environment ``env``); its stdout and stderr
    together come back in ``.stdout``.

    After ``timeout`` seconds (or an interrupt) the command and every process it started are
    killed before TimeoutError is raised, so a hung script never outlives its test. It is the
    runner ``shared.distributed.launch_torchrun`` uses, for commands that are not torchrun.
    """
    return distributed._run_process_group(command, timeout=timeout, cwd=cwd, env=env)
