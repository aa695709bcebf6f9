"""Where image references may lead, and bounded reads: local confinement, S3 prefixes, URLs
against a local HTTP server (with the test-only allowance for loopback), caps and deadlines."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from clipdq.io import sources, storage
from clipdq.io.sources import ImageAccess, access_for, fetch_one

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the bytes' signature is all fetching looks at


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A catalog folder with an image and a symlink out; a private folder beside it; a shared one."""
    catalog, private, shared = tmp_path / "catalog", tmp_path / "other", tmp_path / "shared"
    for folder in (catalog / "img", private, shared):
        folder.mkdir(parents=True)
    (catalog / "img" / "ok.png").write_bytes(PNG)
    (private / "secret.png").write_bytes(PNG)
    (shared / "common.png").write_bytes(PNG)
    (catalog / "img" / "link.png").symlink_to(private / "secret.png")
    (catalog / "img" / "inner-link.png").symlink_to(catalog / "img" / "ok.png")
    return {"catalog": catalog, "private": private, "shared": shared}


@pytest.mark.parametrize("ref", ["../other/secret.png", "img/../../other/secret.png", "img/link.png", "ABSOLUTE"])
def test_references_that_resolve_outside_the_catalog_folder_are_refused(layout, ref):
    ref = str(layout["private"] / "secret.png") if ref == "ABSOLUTE" else ref

    fetched = fetch_one(ref, access_for(str(layout["catalog"])))

    assert fetched.data is None and not fetched.transient
    assert fetched.error.startswith("image path resolves outside the catalog's folder")
    assert "image_roots" in fetched.error and "--image-root" in fetched.error


def test_references_inside_the_folder_or_an_allowed_root_are_read(layout):
    inside = access_for(str(layout["catalog"]))
    widened = access_for(str(layout["catalog"]), [str(layout["shared"])])

    assert fetch_one("img/ok.png", inside).data == PNG
    assert fetch_one("img/inner-link.png", inside).data == PNG  # a symlink that stays inside
    assert fetch_one("img/../img/ok.png", inside).data == PNG
    assert fetch_one(str(layout["shared"] / "common.png"), widened).data == PNG
    assert fetch_one(str(layout["shared"] / "common.png"), inside).data is None
    assert fetch_one("../other/secret.png", widened).data is None  # one root does not open its neighbours


def test_a_root_is_a_folder_not_a_name_prefix(layout, tmp_path):
    (tmp_path / "catalog-private").mkdir()
    (tmp_path / "catalog-private" / "x.png").write_bytes(PNG)

    assert fetch_one("../catalog-private/x.png", access_for(str(layout["catalog"]))).data is None


def test_only_regular_files_are_read_and_nothing_blocks(layout):
    fifo = layout["catalog"] / "img" / "pipe.png"
    os.mkfifo(fifo)
    access = access_for("/")  # the whole file system allowed: the file checks still hold

    results = {}
    fetching = threading.Thread(
        target=lambda: results.update(
            {ref: fetch_one(ref, access) for ref in ("/dev/zero", str(fifo), str(layout["catalog"] / "img"))}
        ),
        daemon=True,
    )
    fetching.start()
    fetching.join(timeout=60)  # opening a FIFO without a writer would block for good, reading /dev/zero for long

    assert not fetching.is_alive(), "a fetch blocked"
    assert {r.error for r in results.values()} == {"image path is not a regular file"}


def test_byte_cap_on_files_and_inline_bytes(layout, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 16)
    access = access_for(str(layout["catalog"]))

    assert "larger than 16 bytes" in fetch_one("img/ok.png", access).error
    assert "larger than 16 bytes" in fetch_one(PNG, access).error


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux's /proc")
def test_a_file_read_whole_where_its_size_on_stat_is_short(monkeypatch):
    # /proc files (and some network filesystems) stat at 0 bytes: the read goes on past the stat's size
    data = sources._read_local("/proc/self/status")
    assert os.stat("/proc/self/status").st_size == 0 and b"VmRSS" in data

    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 16)
    with pytest.raises(sources.ImageError, match="larger than 16 bytes"):
        sources._read_local("/proc/self/status")


def test_other_schemes_and_nul_characters_are_refused(layout):
    access = access_for(str(layout["catalog"]))

    assert "unsupported image reference scheme: file://" in fetch_one("file:///etc/passwd", access).error
    assert "NUL" in fetch_one("img/ok.png\x00.jpg", access).error


def test_s3_references_stay_in_the_catalog_prefix_or_an_allowed_one(s3_bucket):
    for key in ("catalog/img/a.png", "private/b.png", "shared/c.png"):
        storage.write_bytes(f"{s3_bucket}/{key}", PNG)
    storage.write_bytes(f"{s3_bucket}/catalog/empty.png", b"")
    access = access_for(f"{s3_bucket}/catalog", [f"{s3_bucket}/shared"])

    assert fetch_one("img/a.png", access).data == PNG
    assert fetch_one(f"{s3_bucket}/shared/c.png", access).data == PNG
    assert "outside the catalog's prefix" in fetch_one(f"{s3_bucket}/private/b.png", access).error
    assert "outside the catalog's prefix" in fetch_one(f"{s3_bucket}/catalog-x/a.png", access).error
    assert "'..'" in fetch_one("img/../../private/b.png", access).error
    assert fetch_one("img/missing.png", access).error == "image object not found"
    assert fetch_one("empty.png", access).error == "image is empty (0 bytes)"


def test_an_unreachable_store_is_a_transient_failure(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.s3_client.cache_clear()
    try:
        fetched = fetch_one("s3://bucket/catalog/a.png", access_for("s3://bucket/catalog"))
    finally:
        storage.s3_client.cache_clear()

    assert fetched.data is None and fetched.transient
    assert fetched.error.startswith("image fetch failed")


# --------------------------------------------------------------------------- URLs


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - the stdlib's name
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if callable(body):
            body(self.wfile)
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    """A local HTTP server; its routes map path -> (status, headers, body or writer)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Handler.routes = {}
    yield f"http://127.0.0.1:{server.server_port}", _Handler.routes
    server.shutdown()


def _loopback_allowed() -> ImageAccess:
    return ImageAccess(base="/nonexistent", urls=True, private_networks=("127.0.0.0/8",))


def test_urls_are_refused_unless_enabled(web):
    url, routes = web
    routes["/a.png"] = (200, {"Content-Type": "image/png"}, PNG)

    refused = fetch_one(f"{url}/a.png", access_for("/nonexistent"))
    enabled_but_private = fetch_one(f"{url}/a.png", ImageAccess(base="/nonexistent", urls=True))

    assert refused.error.startswith("image URLs are not enabled") and "allow_image_urls" in refused.error
    assert "non-public address 127.0.0.1" in enabled_but_private.error
    assert fetch_one(f"{url}/a.png", _loopback_allowed()).data == PNG


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "169.254.169.254",
        "10.0.0.1",
        "100.64.0.1",
        "192.168.1.20",
        "0.0.0.0",
    ],
)
def test_every_form_of_a_non_public_address_is_refused(host):
    fetched = fetch_one(f"http://{host}/latest/meta-data", ImageAccess(base="/nonexistent", urls=True))

    assert "non-public address" in fetched.error


def test_a_host_is_resolved_once_and_the_checked_address_is_the_one_connected(web, monkeypatch):
    """DNS rebinding: a second lookup could answer otherwise; the fetch never makes one."""
    url, routes = web
    routes["/a.png"] = (200, {"Content-Type": "image/png"}, PNG)
    port = url.rsplit(":", 1)[1]
    lookups, real = [], sources.socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host != "images.rebind.test":  # the numeric address connected to resolves as itself
            return real(host, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.1" if len(lookups) == 1 else "8.8.8.8", *args, **kwargs)

    monkeypatch.setattr(sources.socket, "getaddrinfo", rebinding)

    fetched = fetch_one(f"http://images.rebind.test:{port}/a.png", _loopback_allowed())

    assert fetched.data == PNG and lookups == ["images.rebind.test"]


def test_user_info_in_a_url_is_refused():
    fetched = fetch_one("http://images.example.com@127.0.0.1/a.png", ImageAccess(base="/x", urls=True))

    assert "user info" in fetched.error


def test_redirects_are_followed_and_each_hop_checked(web):
    url, routes = web
    routes["/a.png"] = (200, {"Content-Type": "image/png"}, PNG)
    routes["/cdn"] = (302, {"Location": "/a.png"}, b"")
    routes["/to-metadata"] = (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b"")
    routes["/loop"] = (302, {"Location": "/loop"}, b"")

    assert fetch_one(f"{url}/cdn", _loopback_allowed()).data == PNG
    assert "non-public address 169.254.169.254" in fetch_one(f"{url}/to-metadata", _loopback_allowed()).error
    assert "redirected more than" in fetch_one(f"{url}/loop", _loopback_allowed()).error


def test_content_type_status_size_and_deadline(web, monkeypatch):
    url, routes = web

    sent = []

    def trickle(out):  # 30 s of body, a byte every 0.2 s, until the client hangs up
        try:
            for _ in range(150):
                out.write(b"x")
                out.flush()
                sent.append(1)
                time.sleep(0.2)
        except OSError:
            pass

    routes["/page.png"] = (200, {"Content-Type": "text/html"}, b"<html>")
    routes["/big.png"] = (200, {"Content-Type": "image/png", "Content-Length": "999999999"}, b"")
    routes["/slow.png"] = (200, {"Content-Type": "image/png"}, trickle)
    routes["/down.png"] = (503, {}, b"")
    monkeypatch.setattr(sources, "READ_DEADLINE_S", 1.0)
    access = _loopback_allowed()

    assert "content type 'text/html'" in fetch_one(f"{url}/page.png", access).error
    assert "larger than" in fetch_one(f"{url}/big.png", access).error
    assert fetch_one(f"{url}/missing.png", access).error == "image URL answered HTTP 404"
    down = fetch_one(f"{url}/down.png", access)
    assert down.error == "image URL answered HTTP 503" and down.transient
    slow = fetch_one(f"{url}/slow.png", access)
    assert len(sent) < 150  # given up at the deadline, before the body ended
    assert slow.error == "image read took longer than 1 s" and slow.transient


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_work_in_threads_keeps_the_order_of_its_items_and_runs_each_once(workers):
    seen: list[int] = []

    def work(item: int) -> int:
        seen.append(item)
        return item * item

    assert sources.in_threads(work, range(10), workers=workers) == [i * i for i in range(10)]
    assert sorted(seen) == list(range(10))
