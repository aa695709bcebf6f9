"""The one place that knows local paths from ``s3://`` URIs; atomic publishing of run folders.

S3 goes through boto3, which honours the usual AWS variables (``AWS_ENDPOINT_URL`` for an
S3-compatible server, credentials, region).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MANIFEST = "manifest.json"
PERMANENT_S3_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "NoSuchKey",
    "403",
    "404",
}  # retrying cannot help
TRANSIENT_S3_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "500",
    "502",
    "503",
    "504",
}  # a later try may succeed


class StorageError(OSError):
    """A storage location that cannot be used as asked (no such bucket, no permission)."""


def is_permanent(error: BaseException) -> bool:
    """Whether an S3 error will fail the same way when retried."""
    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in PERMANENT_S3_CODES


def is_transient(error: ClientError) -> bool:
    """Whether an S3 error is the service's momentary trouble (throttling, 5xx), not the request's."""
    return error.response.get("Error", {}).get("Code") in TRANSIENT_S3_CODES


def check_writable(prefix: str) -> None:
    """Write and delete a small object under ``prefix``, so a missing bucket or a read-only role
    fails a run before its work, not after; raises StorageError in one line."""
    if not is_s3(prefix):  # the nearest folder that exists must take new entries; nothing is created
        folder = Path(prefix).absolute()
        while not folder.exists():
            folder = folder.parent
        if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise StorageError(f"cannot write to {prefix}: {folder} is not a writable folder")
        return
    probe = join(prefix, "_clipdq", f"write-check-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except ClientError as error:
        raise StorageError(f"cannot write to {prefix}: S3 {error.response['Error']['Code']}") from None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"not an s3 URI: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local folder or an s3:// prefix."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def parent(uri: str) -> str:
    """The folder (or prefix) holding a file."""
    if is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).resolve().parent)


@functools.cache
def s3_client():
    return boto3.client(
        "s3", config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=30)
    )  # a stalled read cannot hold a run for long


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            _raise_readable(error, uri)
    return Path(uri).read_bytes()


def _not_found(error) -> bool:
    return error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")


class _S3Reader(io.RawIOBase):
    """A seekable binary file over an S3 object: each read is a ranged GET, so a reader that wants
    one part of a large object (a Parquet footer, one row group) fetches only that part."""

    def __init__(self, uri: str, head: dict):
        self._uri, (self._bucket, self._key) = uri, split_s3(uri)
        self._size, self._etag = head["ContentLength"], head["ETag"]  # every read is pinned to this version
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, start + offset)
        return self._position

    def readinto(self, buffer) -> int:
        end = min(self._position + len(buffer), self._size)
        if end <= self._position:
            return 0
        try:
            reply = s3_client().get_object(
                Bucket=self._bucket, Key=self._key, IfMatch=self._etag, Range=f"bytes={self._position}-{end - 1}"
            )
        except ClientError as error:
            if error.response["Error"]["Code"] in ("PreconditionFailed", "412"):
                raise StorageError(f"{self._uri} changed while being read: run again on a stable copy") from None
            raise
        data = reply["Body"].read()
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _head(uri: str) -> dict:
    bucket, key = split_s3(uri)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        _raise_readable(error, uri)


def _raise_readable(error: ClientError, uri: str) -> NoReturn:
    """A missing object as FileNotFoundError, a refusal as StorageError in one line, else ``error``."""
    if _not_found(error):
        raise FileNotFoundError(f"no such object: {uri}") from error
    if is_permanent(error):
        raise StorageError(f"cannot read {uri}: S3 {error.response['Error']['Code']}") from None
    raise error


def stat_version(info: os.stat_result) -> str:
    return f"{info.st_size}:{info.st_mtime_ns}"


def version(uri: str) -> str:
    """Changes whenever the file or object is rewritten: size and modification time, or the ETag."""
    return _head(uri)["ETag"] if is_s3(uri) else stat_version(os.stat(uri))


def open_read(uri: str, *, expected: str | None = None) -> tuple[io.BufferedIOBase, str]:
    """(a seekable binary file to read a local file or an s3:// object part by part, its version).

    Every read of an S3 object is pinned to the version it had when opened; with ``expected``,
    a file or object that is no longer that version raises StorageError at once.
    """
    if is_s3(uri):
        head = _head(uri)
        stream: io.BufferedReader = io.BufferedReader(_S3Reader(uri, head), buffer_size=1 << 20)
        found = head["ETag"]
    else:
        stream = open(uri, "rb")
        found = stat_version(os.fstat(stream.fileno()))
    if expected is not None and found != expected:
        stream.close()
        raise StorageError(f"{uri} changed since the run began: run again on a stable copy")
    return stream, found


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except s3_client().exceptions.ClientError as error:
            if _not_found(error):
                return False
            raise
        return True
    return Path(uri).exists()


def write_bytes(uri: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
    """Write a whole object; a local file is renamed into place, so readers never see half.
    ``create_only`` refuses to replace what is there (StorageError), on S3 and locally alike.
    ``data`` may be a memoryview (of a numpy array of bytes: written locally without a copy)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(
                Bucket=bucket, Key=key, Body=bytes(data), **({"IfNoneMatch": "*"} if create_only else {})
            )
        except ClientError as error:
            if create_only and error.response["Error"]["Code"] in ("PreconditionFailed", "412"):
                raise StorageError(f"{uri} already exists: runs are written once") from None
            raise
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            tmp.write(data)
            tmp.close()
            os.chmod(tmp.name, 0o644)  # temporary files are private; published files are not
            if create_only:
                os.link(tmp.name, path)  # fails where the name exists, so nothing is replaced
                os.unlink(tmp.name)
            else:
                os.replace(tmp.name, path)
        except FileExistsError:
            os.unlink(tmp.name)
            raise StorageError(f"{uri} already exists: runs are written once") from None
        except BaseException:
            os.unlink(tmp.name)
            raise


def list_files(prefix: str, *, start: str = "") -> list[str]:
    """Relative names of all files under a folder or s3:// prefix, or of those whose names begin with ``start``."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix.rstrip("/") + "/")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + start)
        return sorted(obj["Key"][len(key) :] for page in pages for obj in page.get("Contents", []))
    root = Path(prefix)
    tops = list(root.glob(glob.escape(start) + "*")) if root.is_dir() else []
    files = [p for top in tops for p in (top.rglob("*") if top.is_dir() else [top]) if p.is_file()]
    return sorted(str(p.relative_to(root)) for p in files)


def list_etags(bucket: str, keys: list[str], *, min_share: float) -> dict[str, str | None]:
    """ETag, or None where there is no such object, of the sorted ``keys`` (all in one folder) that
    a listing of their range reaches: 1,000 a request, from the first key on, stopping once a page
    holds fewer than ``min_share`` wanted keys (the rest are cheaper asked one by one)."""
    folder = posixpath.dirname(keys[0]) + "/" if "/" in keys[0] else ""
    wanted, found = set(keys), dict[str, str | None]()
    pages = (
        s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=folder, Delimiter="/", StartAfter=keys[0][:-1])
    )
    for page in pages:
        listed = page.get("Contents", [])
        found |= {obj["Key"]: obj["ETag"] for obj in listed if obj["Key"] in wanted}
        last = listed[-1]["Key"] if listed and page.get("IsTruncated") else keys[-1]  # listed up to here
        hits = sum(obj["Key"] in wanted for obj in listed)
        if last >= keys[-1] or hits < min_share * len(listed):
            return found | {key: found.get(key) for key in keys if key <= last}
    return found


def listing_digest(prefix: str) -> str:
    """Changes whenever a file under the folder or prefix is added, removed or rewritten."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix.rstrip("/") + "/")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        entries = sorted((o["Key"], o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", []))
    else:
        entries = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(prefix).rglob("*"))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def download_folder(prefix: str, dest: Path) -> Path:
    """Copy every file under an s3:// prefix into a local folder; a key that would land outside
    it (``..``, an absolute path) fails the whole copy before anything is written."""
    root = dest.resolve()
    names = [name for name in list_files(prefix) if name and not name.endswith("/")]  # "/" ends folder markers
    for name in names:
        if name.startswith("/") or not (root / name).resolve().is_relative_to(root):
            raise ValueError(f"refusing {join(prefix, name)}: its key leads outside the folder it is copied to")
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(prefix, name)))
    return dest


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def delete_tree(prefix: str) -> None:
    """Delete every file under a folder or s3:// prefix."""
    if is_s3(prefix):
        for name in list_files(prefix):
            delete(join(prefix, name))
    else:
        shutil.rmtree(prefix, ignore_errors=True)


def upload_folder(folder: Path, prefix: str, *, last: str | None = None) -> None:
    """Make an s3:// prefix hold exactly a local folder's files; ``last`` goes last (a completion marker).

    Files left from an earlier upload are deleted first, so they cannot mix with the new ones.
    """
    names = list_files(str(folder))
    for stale in set(list_files(prefix)) - set(names) | (set(list_files(prefix)) & {last}):
        delete(join(prefix, stale))
    for name in sorted(names, key=lambda name: name == last):
        write_bytes(join(prefix, name), (folder / name).read_bytes())


def publish(folder: str, files: dict[str, bytes], *, meta: dict | None = None) -> str:
    """Write a run's files, then ``manifest.json`` last: its presence marks the run complete.

    A crash before the manifest leaves files but no manifest, which readers treat as incomplete.
    Returns the manifest's URI.
    """
    listing = {}
    for name, data in files.items():
        write_bytes(join(folder, name), data, create_only=True)
        listing[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = json.dumps({**(meta or {}), "files": listing}, indent=2).encode()
    write_bytes(join(folder, MANIFEST), manifest, create_only=True)
    return join(folder, MANIFEST)
