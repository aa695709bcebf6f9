"""Local paths and s3:// URIs behind one small API, and publishing a run folder atomically."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from clipdq.io import storage

FILES = {"findings.parquet": b"PAR1 not really", "summary.json": b'{"rows": 3}', "report.html": b"<html></html>"}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A folder to write under: a local path or a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_exists_and_list(root):
    nested = storage.join(root, "a", "b", "file.bin")
    storage.write_bytes(nested, b"\x00payload\xff")
    storage.write_bytes(storage.join(root, "top.txt"), b"top")

    assert storage.read_bytes(nested) == b"\x00payload\xff"
    assert storage.exists(nested)
    assert not storage.exists(storage.join(root, "a", "b", "other.bin"))
    assert storage.list_files(root) == ["a/b/file.bin", "top.txt"]
    assert storage.list_files(storage.join(root, "a")) == ["b/file.bin"]


def test_write_replaces_existing_content(root):
    uri = storage.join(root, "x.json")
    storage.write_bytes(uri, b"old content, longer")
    storage.write_bytes(uri, b"new")

    assert storage.read_bytes(uri) == b"new"


def test_reading_a_missing_local_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))


def test_exists_is_false_in_an_empty_or_unknown_bucket(s3_bucket):
    assert not storage.exists(f"{s3_bucket}/nothing/here")
    assert not storage.exists("s3://clipdq-no-such-bucket-for-tests/key")


def test_join_and_parent():
    assert storage.join("s3://bucket/prefix/", "/run/", "file.json") == "s3://bucket/prefix/run/file.json"
    assert storage.parent("s3://bucket/prefix/catalog.parquet") == "s3://bucket/prefix"
    assert storage.join("/data", "run", "file.json") == "/data/run/file.json"
    assert storage.parent("/data/catalogs/catalog.parquet") == "/data/catalogs"
    with pytest.raises(ValueError):
        storage.split_s3("s3:///key")


def test_upload_and_download_folder(s3_bucket, tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_bytes(b"a")
    (source / "sub" / "b.txt").write_bytes(b"b")

    storage.upload_folder(source, f"{s3_bucket}/folder")
    copy = storage.download_folder(f"{s3_bucket}/folder", tmp_path / "copy")

    assert storage.list_files(str(copy)) == ["a.txt", "sub/b.txt"]
    assert (copy / "sub" / "b.txt").read_bytes() == b"b"


@pytest.mark.parametrize("key", ["v1/../../../escaped.txt", "/absolute.txt", "a/../../escaped.txt"])
def test_a_key_that_leads_outside_the_download_folder_fails_the_copy(s3_bucket, tmp_path, key):
    bucket = s3_bucket.removeprefix("s3://")
    storage.write_bytes(f"{s3_bucket}/model/config.json", b"{}")
    storage.s3_client().put_object(Bucket=bucket, Key=f"model/{key}", Body=b"overwritten")

    with pytest.raises(ValueError, match="leads outside the folder"):
        storage.download_folder(f"{s3_bucket}/model", tmp_path / "deep" / "copy")

    assert not (tmp_path / "deep" / "copy").exists()
    assert [p.name for p in tmp_path.rglob("*.txt")] == []


def record_writes(monkeypatch) -> list[str]:
    """Wrap storage.write_bytes to record the order of writes; the real write still happens."""
    written, real = [], storage.write_bytes

    def recording(uri: str, data: bytes, **options) -> None:
        written.append(uri)
        real(uri, data, **options)

    monkeypatch.setattr(storage, "write_bytes", recording)
    return written


def test_publish_writes_every_file_then_the_manifest_last(root, monkeypatch):
    folder = storage.join(root, "run_date=2024-01-02", "run_id=r1")
    written = record_writes(monkeypatch)

    manifest_uri = storage.publish(folder, FILES, meta={"run_id": "r1"})

    assert manifest_uri == storage.join(folder, storage.MANIFEST)
    assert written[-1] == manifest_uri
    assert sorted(written[:-1]) == sorted(storage.join(folder, name) for name in FILES)
    manifest = json.loads(storage.read_bytes(manifest_uri))
    assert manifest["run_id"] == "r1"
    assert manifest["files"] == {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in FILES.items()
    }
    for name, data in FILES.items():
        assert storage.read_bytes(storage.join(folder, name)) == data


def test_a_crash_while_publishing_leaves_no_manifest(root, monkeypatch):
    folder = storage.join(root, "run")
    real, calls = storage.write_bytes, []

    def crash_on_second_file(uri: str, data: bytes, **options) -> None:
        calls.append(uri)
        if len(calls) == 2:
            raise OSError("disk full")
        real(uri, data, **options)

    monkeypatch.setattr(storage, "write_bytes", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        storage.publish(folder, FILES)

    assert not storage.exists(storage.join(folder, storage.MANIFEST))
    assert storage.exists(calls[0])  # the first file was written: the run is there but incomplete
    assert storage.list_files(folder) == [calls[0].rsplit("/", 1)[-1]]


def test_local_write_leaves_no_temporary_files(tmp_path):
    for i in range(3):
        storage.write_bytes(str(tmp_path / "out" / "data.bin"), b"x" * (i + 1))

    assert [p.name for p in (tmp_path / "out").iterdir()] == ["data.bin"]


def test_failed_local_write_leaves_no_temporary_files(tmp_path):
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails

    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "taken"), b"data")

    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_local_write_gives_published_files_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "report.html"), b"<html>")
        (tmp_path / "plain.html").write_bytes(b"<html>")
    finally:
        os.umask(previous)

    mode = stat.S_IMODE(os.stat(tmp_path / "report.html").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.html").st_mode) == 0o644  # not a temp file's 0600


def test_upload_folder_replaces_what_the_prefix_held(s3_bucket, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, names in ((first, ["a.bin", "old.bin", "done.json"]), (second, ["a.bin", "done.json"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(f"{folder.name}:{name}".encode())
    prefix = f"{s3_bucket}/model"

    storage.upload_folder(first, prefix, last="done.json")
    storage.upload_folder(second, prefix, last="done.json")

    assert storage.list_files(prefix) == ["a.bin", "done.json"]
    assert storage.read_bytes(f"{prefix}/a.bin") == b"second:a.bin"


def test_check_writable_refuses_a_missing_bucket_and_leaves_nothing_behind(s3_bucket):
    storage.check_writable(f"{s3_bucket}/reports")  # a bucket that exists

    with pytest.raises(storage.StorageError, match="cannot write to s3://no-such-bucket-here/reports: S3 NoSuchBucket"):
        storage.check_writable("s3://no-such-bucket-here/reports")
    assert storage.list_files(s3_bucket) == []


def test_check_writable_refuses_a_place_no_folder_can_be_made_without_creating_anything(tmp_path):
    (tmp_path / "a-file").write_bytes(b"x")

    storage.check_writable(str(tmp_path / "new" / "reports"))  # missing folders are made when writing
    with pytest.raises(storage.StorageError, match="a-file is not a writable folder"):
        storage.check_writable(str(tmp_path / "a-file" / "reports"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_refusals_from_s3_are_permanent_and_throttling_is_not(s3_bucket):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as missing:
        storage.s3_client().get_object(Bucket="no-such-bucket-here", Key="x")
    throttled = ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your request rate"}}, "GetObject")

    assert storage.is_permanent(missing.value) and not storage.is_permanent(throttled)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_folder_is_written_once(where, tmp_path, request):
    folder = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run"
    storage.publish(folder, FILES, meta={"run_id": "first"})

    with pytest.raises(storage.StorageError, match="already exists"):
        storage.publish(folder, {"findings.parquet": b"other"}, meta={"run_id": "second"})

    assert json.loads(storage.read_bytes(storage.join(folder, storage.MANIFEST)))["run_id"] == "first"
    assert storage.read_bytes(storage.join(folder, "findings.parquet")) == FILES["findings.parquet"]
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([*FILES, storage.MANIFEST])
