"""The retrieve stage's download engine against a hostile local server (127.0.0.1 only, no DNS of real names).

Covers the address guard (IP literals, injected resolvers, redirects, pinning), the per-URL limits, the image
rules (in one process and in worker processes), the shard layout, de-duplication, the same shards whatever the
process count, resuming with/without ``retry_failed`` and a ``kill -9`` of the download or of one worker mid-run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from servers.image_server import ImageServer

from neighborlt.cores import available_cores
from neighborlt.errors import DataError, NeighborLTError
from neighborlt.retrieve.download import DownloadOptions, _Lock, download
from neighborlt.retrieve.fetch import fetch, robots_disallowed
from neighborlt.retrieve.guard import Refused, check_url
from neighborlt.retrieve.images import ImageRefused, process_image
from neighborlt.retrieve.shards import SHARD_SCHEMA, load_shard_index, read_image_bytes

ALLOW = ["127.0.0.1"]
RULES: dict[str, tuple[str, str]] = {  # uid -> (path, expected status)
    "jpeg": ("/img/1.jpg", "ok"),
    "png": ("/png", "ok"),
    "large": ("/large.jpg", "ok"),
    "slow": ("/slow", "timeout"),
    "slow_headers": ("/slow-headers", "timeout"),
    "huge": ("/huge", "too_large"),
    "stream_big": ("/stream-big", "too_large"),
    "html": ("/html", "not_image"),
    "svg": ("/svg", "not_image"),
    "empty": ("/empty", "not_image"),
    "truncated": ("/truncated.jpg", "decode_error"),
    "bomb": ("/bomb/100000x100000.png", "bomb"),
    "bomb_cap": ("/bomb/3000x3000.png", "bomb"),
    "tiny": ("/tiny.png", "too_small"),
    "aspect": ("/aspect.png", "aspect"),
    "loop": ("/loop/a", "redirects"),
    "chain_ok": ("/chain/2", "ok"),
    "chain_long": ("/chain/9", "redirects"),
    "blocked": ("/redirect?to=http://10.0.0.1/x.jpg", "blocked_address"),
    "noai": ("/noai.jpg", "robots"),
    "noimageai": ("/noimageai.jpg", "robots"),
    "otherbot": ("/otherbot.jpg", "ok"),
    "dup_a": ("/dup/a.jpg", "ok|duplicate"),
    "dup_b": ("/dup/b.jpg", "ok|duplicate"),
    "missing": ("/nope.jpg", "http_404"),
}


def make_opts(**kw: Any) -> DownloadOptions:
    base: dict[str, Any] = {
        "threads": 8, "connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 1.5, "max_bytes": 1_000_000,
        "max_redirects": 5, "min_side": 16, "max_aspect": 5.0, "max_side": 256, "max_pixels": 4_000_000,
        "jpeg_quality": 90, "allow_hosts": ALLOW, "shard_size": 1000,
    }
    base.update(kw)
    return DownloadOptions(**base)


def rows_for(srv: ImageServer, items: dict[str, str]) -> list[dict[str, str]]:
    return [{"uid": uid, "url": srv.url(path), "name": "thing", "caption": f"a photo of {uid}"}
            for uid, path in items.items()]


@pytest.fixture(scope="module")
def server() -> ImageServer:
    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="module", params=[1, 3], ids=["1proc", "3procs"])
def rules_run(server: ImageServer, tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> dict[str, Any]:
    """One download of every rule's URL (the slow ones in parallel), in this process (threads) or in 3 worker
    processes: every guard must hold in both; tests look at their own row."""
    shard_dir = tmp_path_factory.mktemp("rules")
    t0 = time.monotonic()
    table = download(rows_for(server, {u: p for u, (p, _) in RULES.items()}), shard_dir,
                     make_opts(processes=request.param))
    wall = time.monotonic() - t0
    return {"dir": shard_dir, "table": table, "rows": {r["uid"]: r for r in table.to_pylist()}, "wall": wall}


def block_connects(monkeypatch: pytest.MonkeyPatch, allowed: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """Record every socket.create_connection; fail the test on one to an address not in ``allowed``."""
    seen: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address: tuple[str, int], *a: Any, **kw: Any) -> socket.socket:
        seen.append((str(address[0]), int(address[1])))
        if str(address[0]) not in allowed:
            pytest.fail(f"connection attempted to {address}")
        return real(address, *a, **kw)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


# --------------------------------------------------------------------------------------------------- guard


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.8.9.10", "[::1]", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "[fc00::1]",
    "[fd12:3456::1]", "169.254.1.1", "[fe80::1]", "169.254.169.254", "[fd00:ec2::254]", "100.100.100.200",
    "0.0.0.0", "[::]", "224.0.0.1", "[ff02::1]", "240.0.0.1", "255.255.255.255", "[::ffff:10.0.0.1]",
    "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[2002:a00:1::]", "[64:ff9b::a00:1]", "2130706433",
    "0x7f.1", "192.0.2.1",
])
def test_guard_refuses_non_public_ip_literals(host: str) -> None:
    def resolver(h: str, p: int) -> list[str]:
        raise AssertionError("an IP literal must not be resolved")

    with pytest.raises(Refused) as e:
        check_url(f"http://{host}/a.jpg", resolve=resolver)
    assert e.value.code == "blocked_address"


@pytest.mark.parametrize("name", ["metadata.google.internal", "metadata", "METADATA.google.internal."])
def test_guard_refuses_metadata_names_without_resolving(name: str) -> None:
    def resolver(h: str, p: int) -> list[str]:
        raise AssertionError("metadata names are refused before resolution")

    with pytest.raises(Refused, match="metadata") as e:
        check_url(f"http://{name}/computeMetadata/v1/", resolve=resolver)
    assert e.value.code == "blocked_address"


@pytest.mark.parametrize("answers", [["10.1.2.3"], ["93.184.216.34", "192.168.0.9"], ["::ffff:172.16.0.1"],
                                     ["169.254.169.254"], ["fd00:ec2::254"], ["100.100.100.200"], ["::1"]])
def test_guard_checks_every_resolved_address(answers: list[str]) -> None:
    with pytest.raises(Refused) as e:
        check_url("https://images.example.test/cat.jpg", resolve=lambda h, p: answers)
    assert e.value.code == "blocked_address" and "images.example.test" in e.value.reason


def test_guard_passes_public_and_refuses_schemes() -> None:
    calls: list[tuple[str, int]] = []

    def resolver(h: str, p: int) -> list[str]:
        calls.append((h, p))
        return ["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]

    ips = check_url("https://Images.Example.TEST./cat.jpg", resolve=resolver)
    assert [str(i) for i in ips] == ["93.184.216.34", "2606:2800:220:1::1"]
    assert calls == [("images.example.test", 443)]
    for url, code in [("file:///etc/passwd", "bad_scheme"), ("ftp://93.184.216.34/a", "bad_scheme"),
                      ("gopher://x/", "bad_scheme"), ("http:///nohost", "bad_url"),
                      ("http://user:pw@93.184.216.34/", "bad_url"), ("http://[::1/", "bad_url")]:
        with pytest.raises(Refused) as e:
            check_url(url, resolve=resolver)
        assert e.value.code == code, url
    with pytest.raises(Refused) as e:
        check_url("http://nx.test/", resolve=lambda h, p: (_ for _ in ()).throw(socket.gaierror("no such name")))
    assert e.value.code == "dns_error"


def test_guard_allow_hosts_lifts_refusal() -> None:
    assert [str(i) for i in check_url("http://127.0.0.1:8080/", ["127.0.0.1"])] == ["127.0.0.1"]
    assert check_url("http://localhost/", ["localhost"], resolve=lambda h, p: ["127.0.0.1", "::1"])
    assert check_url("http://10.2.3.4/", ["10.0.0.0/8"])
    assert check_url("http://mirror.lan/", ["10.0.0.0/8"], resolve=lambda h, p: ["10.9.9.9"])
    with pytest.raises(Refused):  # allowing one address does not allow its neighbours
        check_url("http://127.0.0.2/", ["127.0.0.1"])
    with pytest.raises(Refused):
        check_url("http://localhost/", ["127.0.0.1"], resolve=lambda h, p: ["127.0.0.1", "10.0.0.1"])


def test_fetch_resolves_then_refuses_before_any_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    block_connects(monkeypatch)
    resolved: list[str] = []

    def resolver(h: str, p: int) -> list[str]:
        resolved.append(h)
        return ["93.184.216.34", "10.0.0.7"]

    res = fetch("http://evil.example.test/x.jpg", resolve=resolver)
    assert res.status == "blocked_address" and resolved == ["evil.example.test"]
    res = fetch("http://[::ffff:169.254.169.254]/latest/meta-data/")
    assert res.status == "blocked_address"


@pytest.mark.network
def test_redirect_to_blocked_address_refused_before_connect(server: ImageServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen = block_connects(monkeypatch, allowed=("127.0.0.1",))
    for target in ("http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/", "http://[::1]:1/"):
        res = fetch(server.url(f"/redirect?to={target}"), allow_hosts=ALLOW)
        assert res.status == "blocked_address", (target, res)
    assert {a for a, _ in seen} == {"127.0.0.1"}


@pytest.mark.network
def test_connection_pinned_to_checked_address(server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the resolver answers 127.0.0.1 once and a private address afterwards; the request goes
    to the checked address only, with the URL's host in the Host header."""
    seen = block_connects(monkeypatch, allowed=("127.0.0.1",))
    answers = iter([["127.0.0.1"]] + [["10.6.6.6"]] * 10)
    calls: list[str] = []

    def rebinding(h: str, p: int) -> list[str]:
        calls.append(h)
        return next(answers)

    res = fetch(f"http://images.rebind.test:{server.port}/png", allow_hosts=ALLOW, resolve=rebinding)
    assert res.status == "ok", res.error
    assert calls == ["images.rebind.test"] and seen == [("127.0.0.1", server.port)]
    assert f"images.rebind.test:{server.port}" in server.hosts


@pytest.mark.network
def test_next_checked_address_tried_when_one_refuses(server: ImageServer) -> None:
    res = fetch(f"http://two.addrs.test:{server.port}/png", allow_hosts=["127.0.0.0/8"],
                resolve=lambda h, p: ["127.0.0.2", "127.0.0.1"])  # nothing listens on 127.0.0.2
    assert res.status == "ok", res.error


@pytest.mark.network
def test_https_pinned_with_sni_and_certificate_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=img.tls.test",
                    "-addext", "subjectAltName=DNS:img.tls.test"], check=True, capture_output=True)
    srv = ImageServer()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    sctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    srv._httpd.socket = sctx.wrap_socket(srv._httpd.socket, server_side=True)
    cctx = ssl.create_default_context(cafile=str(cert))
    block_connects(monkeypatch, allowed=("127.0.0.1",))
    with srv:
        ok = fetch(f"https://img.tls.test:{srv.port}/png", allow_hosts=ALLOW, resolve=lambda h, p: ["127.0.0.1"],
                   ssl_context=cctx)
        assert ok.status == "ok", ok.error
        assert sni == ["img.tls.test"] and srv.hosts == [f"img.tls.test:{srv.port}"]
        bad = fetch(f"https://other.tls.test:{srv.port}/png", allow_hosts=ALLOW, resolve=lambda h, p: ["127.0.0.1"],
                    ssl_context=cctx)
        assert bad.status == "tls_error" and "other.tls.test" in bad.error


# ------------------------------------------------------------------------------------------ fetch limits


@pytest.mark.network
@pytest.mark.parametrize("path", ["/slow", "/slow-headers"])
def test_total_timeout_bounds_a_trickling_server(server: ImageServer, path: str) -> None:
    """The server sends one byte a second (1,000 of them, or headers at one byte per 0.5 s), each byte well inside
    the 5 s read time-out: only the 1.2 s total deadline can end the fetch, and it must, long before the trickle."""
    t0 = time.monotonic()
    res = fetch(server.url(path), allow_hosts=ALLOW, read_timeout=5.0, total_timeout=1.2)
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and res.data is None
    assert elapsed >= 1.2 and elapsed < 60, elapsed  # not the read time-out (5 s) and nowhere near the trickle


@pytest.mark.network
def test_read_timeout(server: ImageServer) -> None:
    res = fetch(server.url("/slow"), allow_hosts=ALLOW, read_timeout=0.3, total_timeout=10)
    assert res.status == "timeout" and res.elapsed < 2.0 and "read" in res.error


@pytest.mark.network
def test_connect_error(server: ImageServer) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    res = fetch(f"http://127.0.0.1:{port}/x.jpg", allow_hosts=ALLOW)
    assert res.status == "connect_error"


@pytest.mark.network
def test_content_length_over_cap_refused_before_reading(server: ImageServer, rules_run: dict[str, Any]) -> None:
    res = fetch(server.url("/huge"), allow_hosts=ALLOW, max_bytes=1_000_000, total_timeout=5)
    assert res.status == "too_large" and "2000000000" in res.error and res.elapsed < 1.0
    assert rules_run["rows"]["huge"]["status"] == "too_large"


@pytest.mark.network
def test_body_over_cap_stops_reading(server: ImageServer, rules_run: dict[str, Any]) -> None:
    res = fetch(server.url("/stream-big"), allow_hosts=ALLOW, max_bytes=300_000)
    assert res.status == "too_large" and res.data is None
    assert rules_run["rows"]["stream_big"]["status"] == "too_large"


@pytest.mark.network
def test_redirects_followed_capped_and_loops_refused(rules_run: dict[str, Any], server: ImageServer) -> None:
    rows = rules_run["rows"]
    assert rows["chain_ok"]["status"] == "ok"
    assert rows["chain_long"]["status"] == "redirects" and "more than 5" in rows["chain_long"]["error"]
    assert rows["loop"]["status"] == "redirects" and "loop" in rows["loop"]["error"]
    assert fetch(server.url("/chain/2"), allow_hosts=ALLOW, max_redirects=1).status == "redirects"


@pytest.mark.network
def test_x_robots_tag(rules_run: dict[str, Any], server: ImageServer) -> None:
    rows = rules_run["rows"]
    assert rows["noai"]["status"] == "robots" and rows["noimageai"]["status"] == "robots"
    assert rows["otherbot"]["status"] == "ok"  # "otherbot: noai" speaks to another crawler
    assert fetch(server.url("/noai.jpg"), allow_hosts=ALLOW, honor_robots=False).status == "ok"
    assert robots_disallowed(["neighborlt: noimageai"], "neighborlt")
    assert not robots_disallowed(["noindex, nofollow", "none"], "neighborlt")


@pytest.mark.network
def test_http_errors(rules_run: dict[str, Any]) -> None:
    row = rules_run["rows"]["missing"]
    assert row["status"] == "http_404" and "404" in row["error"]


@pytest.mark.network
def test_slow_rows_do_not_hold_the_run(rules_run: dict[str, Any]) -> None:
    assert rules_run["rows"]["slow"]["status"] == "timeout"
    assert rules_run["rows"]["slow_headers"]["status"] == "timeout"
    assert rules_run["wall"] < 6.0, rules_run["wall"]


# ------------------------------------------------------------------------------------------ image rules


@pytest.mark.network
@pytest.mark.parametrize("uid", ["html", "svg", "empty"])
def test_non_images_refused_whatever_the_content_type(rules_run: dict[str, Any], uid: str) -> None:
    row = rules_run["rows"][uid]
    assert row["status"] == "not_image" and row["offset"] is None and row["key"] is None


@pytest.mark.network
def test_truncated_jpeg_refused(rules_run: dict[str, Any]) -> None:
    row = rules_run["rows"]["truncated"]
    assert row["status"] == "decode_error" and "truncated" in row["error"]


@pytest.mark.network
def test_decompression_bomb_refused_from_header(rules_run: dict[str, Any]) -> None:
    rows = rules_run["rows"]
    assert rows["bomb"]["status"] == "bomb"  # beyond Pillow's own limit
    assert rows["bomb_cap"]["status"] == "bomb" and "max_pixels=4000000" in rows["bomb_cap"]["error"]


@pytest.mark.network
def test_min_side_and_aspect(rules_run: dict[str, Any]) -> None:
    rows = rules_run["rows"]
    assert rows["tiny"]["status"] == "too_small"
    assert rows["aspect"]["status"] == "aspect" and "20.00" in rows["aspect"]["error"]


@pytest.mark.network
def test_resize_rgb_and_no_upscale(rules_run: dict[str, Any]) -> None:
    rows, d = rules_run["rows"], rules_run["dir"]
    large = rows["large"]
    assert (large["width"], large["height"], large["orig_width"], large["orig_height"]) == (256, 192, 1200, 900)
    png = rows["png"]
    assert (png["width"], png["height"]) == (80, 60) == (png["orig_width"], png["orig_height"])
    im = Image.open(io.BytesIO(read_image_bytes(d / png["shard"], png["offset"], png["size"])))
    assert im.format == "JPEG" and im.mode == "RGB"
    assert all(c > 240 for c in im.getpixel((5, 30)))  # transparent half composited on white
    assert im.getpixel((70, 30))[0] > 150


# ------------------------------------------------------------------------------------------ shards


@pytest.mark.network
def test_shard_layout_index_and_random_access(rules_run: dict[str, Any]) -> None:
    d: Path = rules_run["dir"]
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [
        "00000.parquet", "00000.tar", "00000_stats.json"]
    index = load_shard_index(d)
    assert index.schema.equals(SHARD_SCHEMA) and index.num_rows == len(RULES)  # failures included
    for uid, (_, expected) in RULES.items():
        assert rules_run["rows"][uid]["status"] in expected.split("|"), uid
    stats = json.loads((d / "00000_stats.json").read_text())
    assert stats["count"] == len(RULES) and sum(stats["status_dict"].values()) == len(RULES)
    assert stats["successes"] == sum(r["status"] == "ok" for r in rules_run["rows"].values())
    with tarfile.open(d / "00000.tar") as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        data = {m.name: tf.extractfile(m).read() for m in members}  # type: ignore[union-attr]
        offsets = {m.name: (m.offset_data, m.size) for m in members}
    ok = [r for r in rules_run["rows"].values() if r["status"] == "ok"]
    assert len(names) == 3 * len(ok)
    for i in range(0, len(names), 3):  # webdataset: one sample's files are adjacent
        stem = names[i].rsplit(".", 1)[0]
        assert names[i: i + 3] == [f"{stem}.jpg", f"{stem}.txt", f"{stem}.json"]
    for r in ok:
        blob = read_image_bytes(d / r["shard"], r["offset"], r["size"])
        assert blob == data[f"{r['key']}.jpg"] and offsets[f"{r['key']}.jpg"] == (r["offset"], r["size"])
        assert hashlib.sha256(blob).hexdigest() == r["sha256"]
        meta = json.loads(data[f"{r['key']}.json"])
        assert meta["uid"] == r["uid"] and meta["sha256"] == r["sha256"] and meta["url"] == r["url"]
        assert (meta["width"], meta["height"]) == (r["width"], r["height"])
        assert data[f"{r['key']}.txt"].decode() == f"a photo of {r['uid']}"


@pytest.mark.network
def test_duplicates_stored_once_within_and_across_runs(rules_run: dict[str, Any], server: ImageServer,
                                                       tmp_path: Path) -> None:
    a, b = rules_run["rows"]["dup_a"], rules_run["rows"]["dup_b"]
    first, second = (a, b) if a["status"] == "ok" else (b, a)
    assert first["status"] == "ok" and second["status"] == "duplicate"
    assert second["duplicate_of"] == first["uid"] and first["uid"] in second["error"]
    for f in ("shard", "key", "offset", "size", "sha256"):
        assert second[f] == first[f]
    # across runs: a new uid with the same bytes points at the copy stored by the earlier run
    d = tmp_path / "dups"
    download(rows_for(server, {"x1": "/dup/x1.jpg"}), d, make_opts())
    table = download(rows_for(server, {"x1": "/dup/x1.jpg", "x2": "/dup/x2.jpg"}), d, make_opts())
    rows = {r["uid"]: r for r in table.to_pylist()}
    assert rows["x1"]["status"] == "ok" and rows["x2"]["status"] == "duplicate"
    assert rows["x2"]["shard"] == "00000.tar" and rows["x2"]["offset"] == rows["x1"]["offset"]
    with tarfile.open(d / "00001.tar") as tf:
        assert tf.getnames() == []  # nothing stored twice


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.network
def test_resume_skips_done_rows_and_retry_failed(server: ImageServer, tmp_path: Path) -> None:
    items = {f"r{i}": f"/img/{100 + i}.jpg" for i in range(6)} | {"flaky": "/flaky/1.jpg", "gone": "/gone.jpg"}
    rows = rows_for(server, items)
    opts = make_opts(threads=3, shard_size=4)
    before = server.snapshot()
    t1 = {r["uid"]: r for r in download(rows, tmp_path, opts).to_pylist()}
    assert t1["flaky"]["status"] == "http_503" and t1["gone"]["status"] == "http_404"
    assert sum(r["status"] == "ok" for r in t1.values()) == 6
    assert len(list(tmp_path.glob("*_stats.json"))) == 2
    mid = server.snapshot()
    assert all(mid[p] - before[p] == 1 for p in items.values())
    t2 = download(rows, tmp_path, opts).to_pylist()  # idempotent: nothing fetched, nothing written
    assert server.snapshot() == mid and len(list(tmp_path.glob("*_stats.json"))) == 2
    assert {r["uid"]: r for r in t2} == t1
    t3 = {r["uid"]: r for r in download(rows, tmp_path, opts, retry_failed=True).to_pylist()}
    after = server.snapshot()
    assert {p for p in items.values() if after[p] != mid[p]} == {"/flaky/1.jpg", "/gone.jpg"}
    assert t3["flaky"]["status"] == "ok" and t3["flaky"]["shard"] == "00002.tar"  # the newest result wins
    assert t3["gone"]["status"] == "http_404"
    assert load_shard_index(tmp_path).num_rows == len(items) + 2  # the old attempts stay in the old shard


@pytest.mark.network
def test_leftovers_of_a_killed_run_are_ignored_and_removed(server: ImageServer, tmp_path: Path) -> None:
    download(rows_for(server, {"a": "/img/200.jpg"}), tmp_path, make_opts())
    (tmp_path / ".00001.tar.tmp").write_bytes(b"half a tar")
    (tmp_path / ".00001_stats.json.abc.tmp").write_text("{")
    shutil.copy(tmp_path / "00000.tar", tmp_path / "00002.tar")  # renamed but no index/stats yet
    shutil.copy(tmp_path / "00000.parquet", tmp_path / "00002.parquet")
    assert load_shard_index(tmp_path).num_rows == 1
    download(rows_for(server, {"b": "/img/201.jpg"}), tmp_path, make_opts())
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json"]


def test_one_writer_per_shard_dir(tmp_path: Path) -> None:
    lock = _Lock(tmp_path)
    try:
        with pytest.raises(NeighborLTError, match="another download"):
            download([], tmp_path, make_opts())
    finally:
        lock.release()
    assert download([], tmp_path, make_opts()).num_rows == 0
    with pytest.raises(DataError, match="row 0"):
        download([{"url": "http://127.0.0.1/x.jpg"}], tmp_path, make_opts())


def test_options_forbid_unknown_fields() -> None:
    with pytest.raises(ValueError, match="thread"):
        DownloadOptions(thread=4)
    assert DownloadOptions().threads == 32 and DownloadOptions().honor_robots is True


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    from neighborlt.errors import NeighborLTError
    from neighborlt.retrieve.download import DownloadOptions, download
    port, out, n, processes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rows = [{"uid": f"u{i:03d}", "url": f"http://127.0.0.1:{port}/img/{i}.jpg", "name": "c", "caption": f"c{i}"}
            for i in range(n)]
    try:
        download(rows, out, DownloadOptions(processes=processes, threads=3, shard_size=20, allow_hosts=["127.0.0.1"],
                                            min_side=16))
    except NeighborLTError as e:
        sys.exit(f"error: {e}")
""")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server with 20 ms of latency per image, its 200 rows and their uninterrupted download."""
    with ImageServer(latency=0.02) as srv:
        rows = [{"uid": f"u{i:03d}", "url": srv.url(f"/img/{i}.jpg"), "name": "c", "caption": f"c{i}"}
                for i in range(200)]
        opts = DownloadOptions(processes=2, threads=3, shard_size=20, allow_hosts=ALLOW, min_side=16)
        reference = download(rows, tmp_path_factory.mktemp("ref"), opts)
        assert reference.num_rows == 200 and set(reference.column("status").to_pylist()) == {"ok"}
        yield srv, rows, reference


@pytest.mark.network
@pytest.mark.parametrize("kill", ["download", "worker"])
def test_kill_9_mid_run_then_resume_matches_uninterrupted(crash_server: Any, tmp_path: Path, kill: str) -> None:
    """``kill -9`` of a 2-process download (or of one of its worker processes, which stops the download with one
    line) after 3 shards: the re-run fetches exactly the rows of no finished shard, leaves the finished shards
    alone, and ends where an uninterrupted run does."""
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/PID/task/PID/children to find the worker processes")
    srv, rows, reference = crash_server
    n, processes = len(rows), 2
    opts = DownloadOptions(processes=processes, threads=3, shard_size=20, allow_hosts=ALLOW, min_side=16)
    deadline = time.monotonic() + 60
    out = tmp_path / "crash"
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(srv.port), str(out), str(n), str(processes)],
                            stderr=subprocess.PIPE, text=True)
    while len(list(out.glob("*_stats.json"))) < 3:
        assert proc.poll() is None, "the download finished before it could be killed"
        assert time.monotonic() < deadline, "no shard completed in time"
        time.sleep(0.005)
    if kill == "download":
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for w in workers:  # orphaned workers see the pipes close and leave
            while Path(f"/proc/{w}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
    else:
        workers = _children(proc.pid)
        assert len(workers) == processes
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "worker process" in lines[0] and "died" in lines[0], err
    at_kill = srv.snapshot()
    done = load_shard_index(out)
    finished = set(done.column("uid").to_pylist())
    assert 60 <= len(finished) < n  # killed mid-run, with some complete shards
    stats_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}

    final = download(rows, out, opts)
    hits = srv.snapshot()
    refetched = {f"u{i:03d}" for i in range(n) if hits[f"/img/{i}.jpg"] > at_kill[f"/img/{i}.jpg"]}
    assert not refetched & finished  # nothing finished was fetched again
    assert refetched == {f"u{i:03d}" for i in range(n)} - finished
    assert all((out / k).stat().st_mtime_ns == v for k, v in stats_before.items())  # finished shards untouched
    key = ["uid", "status", "sha256", "width", "height"]
    assert final.select(key).to_pylist() == reference.select(key).to_pylist()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


# ------------------------------------------------------------------------------------------ processes


def _shard_dir_contents(d: Path) -> dict[str, Any]:
    """Every shard of ``d``: its index rows and its tar members (name, bytes), in order."""
    out: dict[str, Any] = {}
    for p in sorted(d.iterdir()):
        if p.suffix == ".parquet":
            out[p.name] = pq.read_table(p).to_pylist()
        elif p.suffix == ".tar":
            with tarfile.open(p) as tf:
                out[p.name] = [(m.name, tf.extractfile(m).read()) for m in tf]  # type: ignore[union-attr]
    return out


@pytest.mark.network
def test_same_shards_and_index_whatever_the_process_count(server: ImageServer, tmp_path: Path) -> None:
    """1 process x 4 threads, 2 x 8 and 3 x 2 write the same shards (row order, keys, bytes, duplicates, failures)
    and return the same index; the rows finish in a different order every time."""
    items = {f"n{i:02d}": f"/img/{300 + i}.jpg" for i in range(40)}
    items |= {"d1": "/dup/p.jpg", "png": "/png", "gone": "/nope.jpg", "html": "/html", "large": "/large.jpg",
              "d2": "/dup/q.jpg", "chain": "/chain/2", "blocked": "/redirect?to=http://10.0.0.1/x.jpg"}
    rows = rows_for(server, items)
    rows[5], rows[-1] = rows[-1], rows[5]  # a failure and a duplicate early, in another shard than the original
    results = {}
    for processes, threads in ((1, 4), (2, 8), (3, 2)):
        d = tmp_path / f"p{processes}"
        # nothing here is slow by design: generous time-outs, so a loaded machine cannot turn a row into a time-out
        # in one run and not in another (the time-outs have their own tests)
        index = download(rows, d, make_opts(processes=processes, threads=threads, shard_size=7, total_timeout=30.0,
                                            connect_timeout=30.0, read_timeout=30.0))
        stats = json.loads((d / "00000_stats.json").read_text())
        assert (stats["processes"], stats["threads"]) == (processes, threads)
        results[processes] = (index.to_pylist(), _shard_dir_contents(d))
    index1, shards1 = results[1]
    assert len(shards1) == 2 * 7 and sum(r["status"] == "duplicate" for r in index1) == 1
    assert {r["uid"]: r["status"] for r in index1}["blocked"] == "blocked_address"
    for processes in (2, 3):
        assert results[processes][0] == index1, processes
        assert results[processes][1] == shards1, processes


def test_processes_default_to_the_cores_available() -> None:
    assert DownloadOptions().processes == 0
    assert DownloadOptions().resolved_processes() == available_cores() == len(os.sched_getaffinity(0))
    assert DownloadOptions(processes=3).resolved_processes() == 3
    with pytest.raises(ValueError, match="processes"):
        DownloadOptions(processes=-1)


# ------------------------------------------------------------------------------------------ fitting JPEGs


def _jpeg(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_fitting_jpeg_kept_as_downloaded_others_reencoded() -> None:
    noise = Image.effect_noise((120, 90), 40).convert("RGB")
    fits = _jpeg(noise, quality=75)
    kept = process_image(fits, max_side=128, keep_fitting_jpeg=True)
    assert kept.jpeg == fits and (kept.width, kept.height) == (120, 90)
    assert kept.sha256 == hashlib.sha256(fits).hexdigest()
    assert process_image(fits, max_side=128).jpeg != fits  # the default re-encodes
    assert process_image(fits, max_side=100, keep_fitting_jpeg=True).width == 100  # too large: resized
    grey = process_image(_jpeg(noise.convert("L")), max_side=128, keep_fitting_jpeg=True)
    assert Image.open(io.BytesIO(grey.jpeg)).mode == "RGB"  # stored images are RGB
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = process_image(_jpeg(noise, exif=exif), max_side=128, keep_fitting_jpeg=True)
    assert (rotated.width, rotated.height) == (90, 120)  # orientation applied, so re-encoded
    padded = fits + b"\0" * (3 * 120 * 90)  # a payload appended after the end marker: not carried along
    assert process_image(padded, max_side=128, keep_fitting_jpeg=True).jpeg != padded
    with pytest.raises(ImageRefused) as e:
        process_image(fits[: len(fits) // 2], max_side=128, keep_fitting_jpeg=True)
    assert e.value.code == "decode_error"


@pytest.mark.network
def test_fitting_jpeg_stored_byte_for_byte(server: ImageServer, tmp_path: Path) -> None:
    from servers.image_server import numbered_jpeg

    rows = rows_for(server, {"a": "/img/7.jpg", "big": "/large.jpg"})
    t = {r["uid"]: r for r in download(rows, tmp_path / "keep", make_opts(processes=1)).to_pylist()}
    assert read_image_bytes(tmp_path / "keep" / t["a"]["shard"], t["a"]["offset"], t["a"]["size"]) == numbered_jpeg(7)
    assert (t["big"]["width"], t["big"]["height"]) == (256, 192)
    t2 = {r["uid"]: r for r in download(rows, tmp_path / "re", make_opts(processes=1, keep_fitting_jpeg=False))
          .to_pylist()}
    stored = read_image_bytes(tmp_path / "re" / t2["a"]["shard"], t2["a"]["offset"], t2["a"]["size"])
    assert stored != numbered_jpeg(7) and Image.open(io.BytesIO(stored)).size == (64, 48)


@pytest.mark.network
def test_processes_from_the_cli_and_not_in_the_stage_key(server: ImageServer, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from neighborlt.cli import main
    from neighborlt.retrieve import RetrieveConfig, run_retrieve

    run = tmp_path / "run"
    run.mkdir()
    doc = {"schema": 1, "auxiliary": [{"name": "wolf", "parents": ["dog"]}], "targets": []}
    (run / "neighbors.json").write_text(json.dumps(doc))
    urls = tmp_path / "urls.csv"
    urls.write_text("name,url,caption\n" + "".join(f"wolf,{server.url(f'/img/{500 + i}.jpg')},w{i}\n"
                                                   for i in range(5)))
    base = ["retrieve", str(run), "--source", "urls", "--urls-file", str(urls), "--allow-host", "127.0.0.1"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--processes", "-1"])
    assert e.value.code != 0 and "--download-processes" in capsys.readouterr().err
    main([*base, "--processes", "2", "--threads", "3"])
    stats = json.loads((run / "retrieve" / "shards" / "00000_stats.json").read_text())
    assert (stats["processes"], stats["threads"], stats["successes"]) == (2, 3, 5)
    before = server.snapshot()  # another process count writes the same shards: the finished stage stands
    cfg = RetrieveConfig(source="urls", urls_file=str(urls), download={"allow_hosts": ["127.0.0.1"], "processes": 1})
    assert run_retrieve(cfg, run).skipped and server.snapshot() == before


@pytest.mark.parametrize(("name", "size", "mtime"), [("000000000.jpg", 2003, 1765000000), ("a.txt", 0, 0),
                                                     ("x" * 100, 8 ** 11 - 1, 8 ** 11 - 1), ("k.json", 512, 7)])
def test_ustar_header_is_what_tarfile_writes(name: str, size: int, mtime: int) -> None:
    from neighborlt.retrieve.shards import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444
    assert ustar_header(name, size, mtime) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
