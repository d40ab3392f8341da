"""The data directory, the course's file table and the dataset loaders."""

import json
import zipfile

import pytest

from shared import data
from shared.download import DownloadError


def test_data_dir_follows_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path / "data"))
    assert data.data_dir() == tmp_path / "data"
    assert (tmp_path / "data").is_dir()


def test_data_dir_pointing_at_a_file_says_so(monkeypatch, tmp_path):
    (tmp_path / "data").write_text("not a folder")
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(NotADirectoryError, match=r"LLMS_DATA_DIR=.*data is a file, not a folder"):
        data.data_dir()


def test_fetch_failure_says_how_to_provide_the_file_by_hand(monkeypatch, tmp_path, closed_port_url):
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LLMS_GITHUB_BASE_URL", closed_port_url)
    with pytest.raises(DownloadError) as caught:
        data.fetch("the-verdict.txt", retries=1, progress=False)
    message = str(caught.value)
    assert "Could not download the-verdict.txt" in message
    assert str(tmp_path / "the-verdict.txt") in message and "LLMS_DATA_DIR" in message


def test_the_verdict_has_20479_characters():
    text = data.load_the_verdict()
    assert len(text) == 20479
    assert text.startswith("I HAD always thought Jack Gisburn")


def test_sms_spam_loader_keeps_all_5574_messages():
    frame = data.load_sms_spam()
    assert list(frame.columns) == ["Label", "Text"]
    assert len(frame) == 5574
    assert frame["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    # A message that begins with a double quote comes through whole, quote included.
    quoted = frame[frame["Text"].str.startswith('"')]
    assert len(quoted) > 0
    assert quoted["Text"].iloc[0].startswith('"Wen u miss someone, the person is definitely')
    assert not quoted["Text"].str.contains("\n").any()  # no line was merged into another


def _sms_zip(path, table=b"ham\tSee you at 5\nspam\tWIN a prize now\n"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SMSSpamCollection", table)
        zf.writestr("readme", b"a two-message stand-in for the SMS Spam Collection")
    return path


@pytest.fixture
def sms_mirror(tmp_path, monkeypatch, serve_folder):
    """An empty data directory and a local mirror for the SMS zip (no fallback URL)."""
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path / "data"))
    mirror = tmp_path / "mirror"
    (mirror / "sms").mkdir(parents=True)
    monkeypatch.setenv("LLMS_UCI_BASE_URL", serve_folder(mirror))
    monkeypatch.setitem(data.REMOTE_FILES, "sms+spam+collection.zip", data.RemoteFile("uci", "sms/spam.zip"))
    monkeypatch.setattr(data, "SMS_SPAM_COUNTS", {"ham": 1, "spam": 1})
    return mirror / "sms" / "spam.zip"


@pytest.mark.parametrize(
    "bad_bytes",
    [b"<html><body>Please log in to the hotel Wi-Fi</body></html>", "truncated"],
    ids=["captive-portal-page", "truncated-zip"],
)
def test_damaged_sms_zip_is_deleted_and_fetched_again(sms_mirror, tmp_path, bad_bytes):
    good = _sms_zip(sms_mirror).read_bytes()
    saved = tmp_path / "data" / "sms+spam+collection.zip"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(good[: len(good) // 2] if bad_bytes == "truncated" else bad_bytes)
    frame = data.load_sms_spam()
    assert frame["Label"].tolist() == ["ham", "spam"]
    assert saved.read_bytes() == good


def test_sms_zip_that_stays_damaged_says_which_file_to_replace_and_where(sms_mirror, tmp_path):
    sms_mirror.write_bytes(b"<html>still the login page</html>")
    saved = tmp_path / "data" / "sms+spam+collection.zip"
    with pytest.raises(data.DataValidationError, match="not a valid zip archive") as caught:
        data.load_sms_spam()
    message = str(caught.value)
    assert f"save it as {saved}" in message and "sms/spam.zip" in message
    assert not saved.exists()  # the next call fetches again instead of failing on the same file


def test_instruction_loader_returns_1100_valid_entries():
    entries = data.load_instruction_data()
    assert len(entries) == 1100
    assert all(isinstance(entry[key], str) for entry in entries for key in ("instruction", "input", "output"))


def _write_entries(path, entries):
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_instruction_entry_with_missing_key_is_named(tmp_path):
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    path = _write_entries(tmp_path / "bad.json", [good, good, {"instruction": "x", "input": ""}])
    with pytest.raises(data.DataValidationError, match=r"entry 2 has no key 'output'"):
        data.load_instruction_data(path)


def test_instruction_entry_with_non_string_value_is_named(tmp_path):
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    path = _write_entries(tmp_path / "bad.json", [good, {"instruction": "x", "input": 3, "output": "y"}])
    with pytest.raises(data.DataValidationError, match=r"entry 1, key 'input' must be a string, got int"):
        data.load_instruction_data(path)


def test_malformed_instruction_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x",', encoding="utf-8")
    with pytest.raises(data.DataValidationError, match="broken.json is not valid JSON"):
        data.load_instruction_data(path)


def test_empty_sms_table_says_which_file_to_delete(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path))
    table = tmp_path / "sms_spam_collection" / "SMSSpamCollection"
    table.parent.mkdir()
    table.write_text("")
    with pytest.raises(data.DataValidationError, match=f"{table} does not look like .*Delete {table.parent}"):
        data.load_sms_spam()
