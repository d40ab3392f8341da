import pytest
import torch

from shared import utils


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " 1 "])
def test_quick_mode_is_on_for_truthy_values(monkeypatch, value):
    monkeypatch.setenv("LLMS_QUICK", value)
    assert utils.is_quick()
    assert utils.by_mode(full=10, quick=1) == 1


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off"])
def test_quick_mode_is_off_otherwise(monkeypatch, value):
    monkeypatch.setenv("LLMS_QUICK", value)
    assert not utils.is_quick()
    assert utils.by_mode(full=10, quick=1) == 10


def test_quick_mode_is_off_when_unset(monkeypatch):
    monkeypatch.delenv("LLMS_QUICK", raising=False)
    assert not utils.is_quick()


@pytest.mark.parametrize("value", ["maybe", "2", "ture", "quick"])
def test_quick_mode_refuses_an_unknown_spelling_and_lists_the_accepted_ones(monkeypatch, value):
    monkeypatch.setenv("LLMS_QUICK", value)
    with pytest.raises(ValueError, match=f"LLMS_QUICK='{value}' is neither on nor off") as caught:
        utils.is_quick()
    assert "1, true, yes, on" in str(caught.value) and "0, false, no, off" in str(caught.value)


def _fake_accelerators(monkeypatch, cuda: bool, mps: bool):
    monkeypatch.delenv("LLMS_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _fake_accelerators(monkeypatch, cuda, mps)
    assert utils.get_device().type == expected


def test_device_can_be_forced_by_argument_or_environment(monkeypatch):
    _fake_accelerators(monkeypatch, cuda=True, mps=True)
    assert utils.get_device("cpu").type == "cpu"
    monkeypatch.setenv("LLMS_DEVICE", "cpu")
    assert utils.get_device().type == "cpu"


@pytest.mark.parametrize("value", ["cuda", "mps", "banana", "cuda:0"])
def test_device_that_this_machine_lacks_is_refused_naming_the_variable(monkeypatch, value):
    _fake_accelerators(monkeypatch, cuda=False, mps=False)
    monkeypatch.setenv("LLMS_DEVICE", value)
    with pytest.raises(ValueError, match=f"LLMS_DEVICE='{value}'") as caught:
        utils.get_device()
    assert "available: cpu" in str(caught.value)


def test_device_argument_that_this_machine_lacks_is_refused(monkeypatch):
    _fake_accelerators(monkeypatch, cuda=False, mps=True)
    with pytest.raises(ValueError, match=r"get_device\('cuda'\).*available: mps, cpu"):
        utils.get_device("cuda")


def test_set_seed_makes_random_tensors_repeat():
    utils.set_seed(7)
    first = torch.rand(3)
    utils.set_seed(7)
    assert torch.equal(first, torch.rand(3))


def test_banner_prints_versions_device_and_mode(monkeypatch, capsys):
    monkeypatch.setenv("LLMS_QUICK", "1")
    utils.banner()
    line = capsys.readouterr().out
    for fact in ("python:", f"torch: {torch.__version__}", "tiktoken:", "device:", "mode: quick"):
        assert fact in line
    monkeypatch.delenv("LLMS_QUICK")
    utils.banner()
    assert "mode: full" in capsys.readouterr().out


def test_atomic_path_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    from shared.utils import atomic_path

    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # the temporary file is gone
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_path_files_follow_the_umask(tmp_path):
    import os

    from shared.utils import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "shared.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_switches_dropout_off_and_restores_the_mode_even_after_an_error(training):
    from shared.utils import eval_mode

    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not model.training
    assert model.training is training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training is training


def test_run_dir_makes_a_new_folder_per_run_unless_one_is_named(tmp_path):
    from shared.utils import run_dir

    first, second = run_dir(None, tmp_path / "runs"), run_dir(None, tmp_path / "runs")
    assert first != second and first.is_dir() and second.is_dir() and first.parent == tmp_path / "runs"
    named = run_dir(tmp_path / "mine" / "deep", tmp_path / "runs")
    assert named == tmp_path / "mine" / "deep" and named.is_dir()
    assert run_dir(named, tmp_path / "runs") == named  # an existing folder named on purpose is reused


def test_run_dir_names_new_folders_after_the_script_and_refreshes_committed_results_only_when_asked(tmp_path):
    from shared.utils import run_dir

    folder = run_dir(None, tmp_path / "runs", "pretrain")
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("pretrain-") and folder.is_dir()
    later = run_dir(None, tmp_path / "later", "pretrain", create=False)
    assert later.name.startswith("pretrain-") and not (tmp_path / "later").exists()
    committed = tmp_path / "results"
    assert run_dir(None, tmp_path / "runs", "x", committed=committed) != committed  # no flag: a run folder
    assert run_dir(None, tmp_path / "runs", "x", committed=committed, refresh=True) == committed
    with pytest.raises(ValueError, match="no --out-dir"):
        run_dir(tmp_path / "mine", tmp_path / "runs", committed=committed, refresh=True)


def test_out_dir_and_refresh_committed_exclude_each_other(tmp_path, capsys):
    import argparse

    from shared.utils import add_output_args

    parser = argparse.ArgumentParser()
    add_output_args(parser, "demo", committed=tmp_path)
    assert parser.parse_args(["--refresh-committed"]).refresh_committed
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--refresh-committed", "--out-dir", str(tmp_path / "mine")])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_atomic_path_under_a_file_names_the_file(tmp_path):
    from shared.utils import atomic_path, run_dir

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'taken'} is a file, not a folder"):
        with atomic_path(tmp_path / "taken" / "deeper" / "out.txt") as tmp:
            tmp.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        run_dir(tmp_path / "taken", tmp_path / "runs")


def test_atomic_path_in_a_read_only_folder_says_so(tmp_path, monkeypatch):
    from writes import deny_writes_under

    from shared.utils import atomic_path, run_dir

    deny_writes_under(monkeypatch, tmp_path)
    with pytest.raises(PermissionError, match=f"no permission to write in {tmp_path}; choose a folder"):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    with pytest.raises(PermissionError, match="no permission to create the folder"):
        run_dir(None, tmp_path / "runs")


def test_atomic_path_on_a_full_disk_says_so_and_keeps_the_old_file(tmp_path):
    import errno

    from shared.utils import atomic_path

    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError, match=f"the disk holding {tmp_path} is full") as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")  # what a write on a full disk raises
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_exit_on_error_turns_a_bad_file_into_one_error_line_and_status_1():
    def main():
        raise FileNotFoundError("no such file: data.json; pass --data")

    with pytest.raises(SystemExit) as caught:
        utils.exit_on_error(main)
    assert caught.value.code == "error: no such file: data.json; pass --data"  # printed, exit status 1
    utils.exit_on_error(lambda: None)  # a clean run returns normally
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        utils.exit_on_error(lambda: {}["missing"])
