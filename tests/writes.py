"""Faults in writing files for the tests: a folder without write permission, a full disk.

The tests may run as root, for whom chmod does not stop writes; so the refusal is simulated
where Python creates files and folders.
"""

import errno
import os
from pathlib import Path


def deny_writes_under(monkeypatch, folder) -> None:
    """Creating a file or folder under ``folder`` raises PermissionError, as in a read-only folder."""
    folder = Path(folder).resolve()
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(folder)

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
