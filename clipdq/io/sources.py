"""Where a catalog's image references may lead, and bounded reads of the bytes they name.

A reference is judged by where it resolves (after ``..`` and symlinks), not by how it is
written: inside the catalog's own folder or ``s3://`` prefix is allowed; other folders and
prefixes only when listed in ``roots`` (the spec's ``image_roots`` and ``--image-root``);
``http(s)`` URLs only when enabled, and only to global addresses. Every read has a byte cap and a
whole-read deadline; a local reference must be a regular file.

Vocabulary: ``ref`` a catalog cell (path, ``s3://`` URI, URL, or the image bytes themselves),
``access`` the ``ImageAccess`` a run allows.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import posixpath
import re
import socket
import ssl
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import polars as pl
from botocore.exceptions import BotoCoreError, ClientError

from clipdq.core.spec import Spec
from clipdq.io import storage

T = TypeVar("T")
R = TypeVar("R")

MAX_IMAGE_BYTES = 50 * 2**20
READ_DEADLINE_S = 30.0  # for the whole read of one image, not per socket operation
MAX_REDIRECTS = 3
URL_CONTENT_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class ImageAccess:
    """Where the image references of one catalog may lead.

    ``base`` is the catalog's folder or ``s3://`` prefix: relative references start there and
    anything under it is allowed. ``roots`` are the other folders and prefixes a user allowed.
    ``private_networks`` lets URLs reach non-global addresses: for tests against a local server only.
    """

    base: str
    roots: tuple[str, ...] = ()
    urls: bool = False
    private_networks: tuple[str, ...] = ()

    def allowed(self) -> tuple[str, ...]:
        return (self.base, *self.roots)


@dataclass(frozen=True)
class Fetched:
    """One catalog cell's image bytes, or why there are none (``transient``: an outage, not the data)."""

    data: bytes | None = None
    error: str | None = None
    transient: bool = False


class ImageError(ValueError):
    """An image reference that cannot be read; ``transient`` when a retry later could succeed."""

    def __init__(self, detail: str, *, transient: bool = False):
        super().__init__(detail)
        self.transient = transient


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def locate(ref: str, access: ImageAccess) -> str:
    """The URI ``ref`` resolves to, where ``access`` allows it; raises ImageError saying how to allow it."""
    if "\x00" in ref:
        raise ImageError("image reference holds a NUL character")
    if ref.startswith(("http://", "https://")):
        if not access.urls:
            raise ImageError("image URLs are not enabled: set allow_image_urls: true in the spec to fetch them")
        return ref
    scheme = re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", ref)
    if scheme and not storage.is_s3(ref):
        raise ImageError(f"unsupported image reference scheme: {scheme.group(0)}")
    if _on_s3(ref, access):
        return _locate_s3(ref if storage.is_s3(ref) else storage.join(access.base, ref), access)
    return _locate_local(ref if os.path.isabs(ref) else os.path.join(access.base, ref), access)


def _on_s3(ref: str, access: ImageAccess) -> bool:
    """Whether ``ref`` names an S3 object: an s3:// URI, or a relative path under an S3 catalog."""
    return storage.is_s3(ref) or (storage.is_s3(access.base) and not ref.startswith("/"))


def _locate_s3(uri: str, access: ImageAccess) -> str:
    bucket, key = storage.split_s3(uri)
    if any(part in ("..", ".") for part in key.split("/")):
        raise ImageError("image reference leaves its prefix through '.' or '..'")
    uri = f"s3://{bucket}/{posixpath.normpath(key)}"
    if not any(storage.is_s3(root) and _inside(uri, root.rstrip("/")) for root in access.allowed()):
        raise ImageError(
            f"image {uri} is outside the catalog's prefix: add its prefix to image_roots "
            "(spec) or --image-root to allow it"
        )
    return uri


def _locate_local(path: str, access: ImageAccess) -> str:
    """``path`` with ``..`` and symlinks resolved, where that lies in an allowed folder."""
    path = os.path.realpath(path)
    if not any(not storage.is_s3(root) and _inside(path, os.path.realpath(root)) for root in access.allowed()):
        raise ImageError(
            "image path resolves outside the catalog's folder: add its folder to image_roots "
            "(spec) or --image-root to allow it"
        )
    return path


def _read_local(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise ImageError("image file not found") from None
    except OSError as error:
        raise ImageError(f"image file cannot be opened: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageError("image path is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"image file larger than {MAX_IMAGE_BYTES} bytes")
        data = handle.read(info.st_size + 1)  # a buffer of the file's size, not of MAX_IMAGE_BYTES
        if len(data) > info.st_size:  # grown since its stat
            data += handle.read(MAX_IMAGE_BYTES + 1 - len(data))
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image file larger than {MAX_IMAGE_BYTES} bytes")
    return data


def _read_s3(uri: str, deadline: float) -> bytes:
    bucket, key = storage.split_s3(uri)
    try:
        body = storage.s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_IMAGE_BYTES}")["Body"]
        data = _bounded(body.iter_chunks(1 << 16), deadline)
    except ClientError as error:
        code = error.response["Error"]["Code"]
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ImageError("image object not found") from None
        if code == "InvalidRange":  # a range of an empty object
            return b""
        raise ImageError(f"image fetch failed: S3 {code}", transient=storage.is_transient(error)) from None
    except BotoCoreError as error:  # connection refused, timeouts, ...
        raise ImageError(f"image fetch failed: {type(error).__name__}", transient=True) from None
    return data


def _bounded(chunks, deadline: float) -> bytes:
    """The chunks joined, refusing more than MAX_IMAGE_BYTES and reads past ``deadline``."""
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"image larger than {MAX_IMAGE_BYTES} bytes")
        if time.monotonic() > deadline:
            raise ImageError(f"image read took longer than {READ_DEADLINE_S:.0f} s", transient=True)
        out.append(chunk)
    return b"".join(out)


def _public_address(host: str, access: ImageAccess) -> str:
    """The one address ``host`` resolves to that the fetch will connect to; every address it
    resolves to must be global (or in ``access.private_networks``)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        raise ImageError(f"image URL host {host!r} does not resolve: {error.strerror}", transient=True) from None
    allowed = [ipaddress.ip_network(n) for n in access.private_networks]
    addresses = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global and not any(ip in network for network in allowed):
            raise ImageError(f"image URL host {host!r} resolves to non-public address {ip}")
        addresses.append(str(ip))
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address already checked, with the certificate checked against the URL's host."""

    def __init__(self, address: str, host: str, port: int, timeout: float):
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _open_url(url: str, access: ImageAccess, deadline: float) -> http.client.HTTPResponse:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError("image URL must be http(s) with a host")
    if parts.username is not None or parts.password is not None:
        raise ImageError("image URL carries user info (user@host): refused")
    address = _public_address(parts.hostname, access)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = max(0.1, deadline - time.monotonic())
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = _PinnedHTTPS(address, parts.hostname, port, timeout)
    else:
        connection = http.client.HTTPConnection(address, port, timeout=timeout)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connection.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "clipdq"})
    return connection.getresponse()


def _read_url(url: str, access: ImageAccess, deadline: float) -> bytes:
    """GET ``url``, following up to MAX_REDIRECTS redirects, each hop's host checked again."""
    try:
        for _ in range(MAX_REDIRECTS + 1):
            response = _open_url(url, access, deadline)
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                response.close()
                continue
            if response.status >= 400:
                raise ImageError(f"image URL answered HTTP {response.status}", transient=response.status >= 500)
            kind = (response.getheader("Content-Type") or "").lower()
            if not kind.startswith(URL_CONTENT_TYPES):
                raise ImageError(f"image URL sent content type {kind or 'none'!r}, not an image")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > MAX_IMAGE_BYTES:
                raise ImageError(f"image larger than {MAX_IMAGE_BYTES} bytes")
            return _bounded(iter(functools.partial(response.read1, 1 << 16), b""), deadline)
        raise ImageError(f"image URL redirected more than {MAX_REDIRECTS} times")
    except TimeoutError:
        raise ImageError(f"image read took longer than {READ_DEADLINE_S:.0f} s", transient=True) from None
    except (OSError, http.client.HTTPException) as error:
        raise ImageError(f"image fetch failed: {type(error).__name__}: {error}"[:300], transient=True) from None


def fetch(ref: str | bytes | None, access: ImageAccess, *, location: str | None = None) -> bytes:
    """Image bytes for a catalog cell: raw bytes as they are, else read where ``access`` allows
    (``location``: where ``versions`` found it allowed, so it is not resolved again)."""
    if ref is None or ref == "" or ref == b"":
        raise ImageError("no image given in the catalog")
    if isinstance(ref, bytes):
        if len(ref) > MAX_IMAGE_BYTES:
            raise ImageError(f"image larger than {MAX_IMAGE_BYTES} bytes")
        return ref
    uri = location or locate(ref, access)
    deadline = time.monotonic() + READ_DEADLINE_S
    if uri.startswith(("http://", "https://")):
        data = _read_url(uri, access, deadline)
    elif storage.is_s3(uri):
        data = _read_s3(uri, deadline)
    else:
        data = _read_local(uri)
    if not data:
        raise ImageError("image is empty (0 bytes)")
    return data


def fetch_one(ref: str | bytes | None, access: ImageAccess, location: str | None = None) -> Fetched:
    try:
        return Fetched(data=fetch(ref, access, location=location))
    except ImageError as error:
        return Fetched(error=str(error)[:300], transient=error.transient)


def in_threads(work: Callable[[T], R], items: Sequence[T], *, workers: int) -> list[R]:
    """``work`` of each item, in order: the items cut into ``workers`` interleaved slices, each done
    in a thread of its own (one future per thread, not per item: for small items, handing each to
    a pool cost more than the work); in the calling thread where ``workers`` is 1 or fewer items."""
    workers = max(1, min(workers, len(items)))
    if workers == 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        slices = list(pool.map(lambda start: [work(item) for item in items[start::workers]], range(workers)))
    done: list[R] = [None] * len(items)  # type: ignore[list-item]  # every place is filled below
    for start, results in enumerate(slices):
        done[start::workers] = results
    return done


def fetch_all(
    refs: list, access: ImageAccess, *, locations: list[str | None] | None = None, workers: int = 4
) -> list[Fetched]:
    """One ``Fetched`` per catalog cell (``locations``: ``versions``'s, where known), in ``workers``
    threads where some wait on a network; local files are read in the calling thread (a read is a
    few system calls, and starting threads and sharing the GIL with them cost more than it)."""
    wheres = locations or [None] * len(refs)
    remote = any(_remote(where or ref, access) for ref, where in zip(refs, wheres))
    return in_threads(
        lambda i: fetch_one(refs[i], access, wheres[i]), range(len(refs)), workers=workers if remote else 1
    )


def _remote(target: str | bytes | None, access: ImageAccess) -> bool:
    """Whether reading ``target`` (a reference or its location) waits on a network: S3 or a URL."""
    return isinstance(target, str) and (target.startswith(("http://", "https://")) or _on_s3(target, access))


def _version(ref: str | bytes | None, access: ImageAccess) -> tuple[str, str] | None:
    if not isinstance(ref, str) or not ref or ref.startswith(("http://", "https://")):
        return None
    try:
        location = locate(ref, access)
        return location, storage.version(location)
    except (ImageError, OSError, ClientError, BotoCoreError):  # the read reports why
        return None


LISTED_SHARE = 100  # an S3 listing goes on while it finds at least one wanted key per this many it lists


def versions(refs: list, access: ImageAccess, *, workers: int = 8) -> list[tuple[str, str] | None]:
    """Per catalog cell, (location, version) of a file or S3 object where that can be learnt
    without reading it (size and modification time, or the ETag), else None: URLs, inline bytes,
    and references whose read will fail and say why.

    In bulk: a local file is ``lstat``-ed in the folder its folder resolves to (each folder resolved
    once; a symlinked file is resolved on its own); S3 objects are listed, 1,000 a request, in the
    key range a folder's references span, with a HEAD each for what the listing leaves."""
    found: dict[int, tuple[str, str] | None] = {}
    s3: dict[int, str] = {}
    local: dict[int, str] = {}
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref or ref.startswith(("http://", "https://")) or "\x00" in ref:
            found[i] = None  # (the read says why)
        elif _on_s3(ref, access):
            try:
                s3[i] = locate(ref, access)
            except ImageError:
                found[i] = None
        else:
            local[i] = ref
    found |= _s3_versions(s3, workers=workers)
    found |= dict(zip(local, _local_versions(list(local.values()), access)))
    return [found[i] for i in range(len(refs))]


def _local_versions(refs: list[str], access: ImageAccess) -> list[tuple[str, str] | None]:
    """(location, version) of local references: the paths split in bulk, each folder resolved
    once, one ``lstat`` a file; a file that is a symlink is resolved on its own."""
    column = pl.col("ref")
    base = access.base.rstrip("/") + "/" if access.base else ""  # as os.path.join joins them
    parts = (
        pl.DataFrame({"ref": refs}, schema={"ref": pl.String})
        .select(
            pl.when(column.str.starts_with("/"))
            .then(column)
            .otherwise(base + column)
            .str.extract_groups(r"^(?:(.*)/)?([^/]*)$")  # (folder, name)
        )
        .to_series()
    )
    folders = {folder: _resolved(folder, access) for folder in parts.struct.field("1").unique().to_list()}
    found: list[tuple[str, str] | None] = []
    for ref, folder, name in zip(refs, parts.struct.field("1").to_list(), parts.struct.field("2").to_list()):
        resolved = folders[folder]
        if resolved is None or name in ("", ".", ".."):
            found.append(_version(ref, access))
            continue
        location = resolved + "/" + name
        try:
            info = os.lstat(location)
        except OSError:
            found.append(None)  # the read reports why
            continue
        # a symlink is judged by where it leads
        found.append((location, storage.stat_version(info)) if stat.S_ISREG(info.st_mode) else _version(ref, access))
    return found


def _resolved(folder: str | None, access: ImageAccess) -> str | None:
    """``folder`` (None: the working folder, "": the root) resolved where that is allowed, else None."""
    try:
        return _locate_local("." if folder is None else folder or "/", access).rstrip("/")
    except ImageError:
        return None


def _s3_versions(uris: dict[int, str], *, workers: int) -> dict[int, tuple[str, str] | None]:
    """(location, ETag) of S3 objects: each folder's keys listed in the range they span, while the
    listing pays (``LISTED_SHARE``); a HEAD for each key it did not reach."""
    by_folder: dict[tuple[str, str], list[str]] = {}
    distinct = set(uris.values())
    for uri in distinct:
        bucket, key = storage.split_s3(uri)
        by_folder.setdefault((bucket, posixpath.dirname(key)), []).append(key)
    listed: dict[str, str | None] = {}
    for (bucket, _), keys in by_folder.items():
        try:
            covered = storage.list_etags(bucket, sorted(keys), min_share=1 / LISTED_SHARE)
        except (ClientError, BotoCoreError):  # asked one by one: each read then says what failed
            continue
        listed |= {f"s3://{bucket}/{key}": etag for key, etag in covered.items()}
    rest = [uri for uri in distinct if uri not in listed]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        listed |= dict(zip(rest, pool.map(_etag, rest)))
    return {i: (uri, etag) if (etag := listed[uri]) else None for i, uri in uris.items()}


def _etag(uri: str) -> str | None:
    try:
        return storage.version(uri)
    except (OSError, ClientError, BotoCoreError):  # the read reports why
        return None


def access_for(base: str, roots: Iterable[str] = (), *, urls: bool = False) -> ImageAccess:
    """The access of a catalog in ``base`` (its folder or prefix), local roots made absolute."""
    return ImageAccess(
        base=base, roots=tuple(r if storage.is_s3(r) else str(Path(r).resolve()) for r in roots), urls=urls
    )


def catalog_access(catalog_uri: str, spec: Spec, roots: Iterable[str] = ()) -> ImageAccess:
    """What the images of the catalog at ``catalog_uri`` may reach: its own folder, the spec's
    ``image_roots`` and ``roots`` (``--image-root``), URLs where the spec allows them."""
    return access_for(storage.parent(catalog_uri), [*spec.image_roots, *roots], urls=spec.allow_image_urls)
