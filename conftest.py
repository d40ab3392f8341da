"""Test-session set-up shared by the pytest suite and the notebooks run by nbval.

When ``LLMS_DATA_DIR`` is not set and the course's offline data folder sits beside the
repository (``../shared/offline-data``, or the folder named by ``LLMS_OFFLINE_DATA``), a copy
of it in a temporary folder becomes the data directory, so that the suite and every notebook
run with no network. The original folder is never written to.
"""

import os
import shutil
import stat
import tempfile
from pathlib import Path

OFFLINE_DATA = Path(
    os.environ.get("LLMS_OFFLINE_DATA", Path(__file__).resolve().parent.parent / "shared" / "offline-data")
)


def _make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def pytest_configure(config):
    if os.environ.get("LLMS_DATA_DIR") or not OFFLINE_DATA.is_dir():
        return
    copy = Path(tempfile.mkdtemp(prefix="llms-data-"))
    shutil.copytree(OFFLINE_DATA, copy, dirs_exist_ok=True)
    _make_writable(copy)
    # Environment variables reach the notebook kernels nbval starts, too.
    os.environ["LLMS_DATA_DIR"] = str(copy)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(copy / "tiktoken-cache"))
    config._llms_data_copy = copy


def pytest_unconfigure(config):
    copy = getattr(config, "_llms_data_copy", None)
    if copy is not None:
        shutil.rmtree(copy, ignore_errors=True)
