"""Stage 3 (``retrieve``) end to end: every source against real data or a real local server on 127.0.0.1 (the web
engine and the kNN service are local stand-ins), the manifest schema, reporting of unknown names, resume after
``kill -9`` through the CLI, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pyarrow.parquet as pq
import pytest
from servers.image_server import ImageServer

from neighborlt.data.base import ShardMember
from neighborlt.errors import ConfigError, DataError
from neighborlt.retrieve import WEB_ENGINES, RetrieveConfig, run_retrieve
from neighborlt.rundir import RunDir, read_json

NAMES = [{"name": "wolf", "parents": ["dog"]}, {"name": "lynx", "parents": ["cat"]},
         {"name": "fox", "parents": ["dog", "cat"]}]


def _run_dir(tmp_path: Path, names: list[dict[str, Any]] = NAMES) -> RunDir:
    rd = RunDir(tmp_path / "run")
    (rd.root / "neighbors.json").write_text(json.dumps({"schema": 1, "auxiliary": names, "targets": []}))
    return rd


def _manifest(rd: RunDir) -> list[dict[str, Any]]:
    return pq.read_table(rd.path("retrieve", "manifest.parquet")).to_pylist()


@pytest.fixture(scope="module")
def server() -> ImageServer:
    with ImageServer() as srv:
        yield srv


def _write_urls(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "url", "caption"])
        w.writerows(rows)
    return path


@pytest.mark.network
def test_urls_source_cli_downloads_into_shards_and_reports_unknown_names(server: ImageServer, tmp_path: Path) -> None:
    rd = _run_dir(tmp_path)
    urls = _write_urls(tmp_path / "urls.csv", [
        ("wolf", server.url("/img/1.jpg"), "a grey wolf"), ("Wolves", server.url("/img/2.jpg"), "wolves at night"),
        ("lynx", server.url("/html"), "a lynx"), ("fox", server.url("/nope"), "red fox"),
        ("unicorn", server.url("/img/3.jpg"), "a unicorn"), ("fox", "ftp://example.invalid/x.jpg", "bad scheme")])
    exe = Path(sys.executable).with_name("neighborlt")
    proc = subprocess.run([str(exe), "retrieve", str(rd.root), "--source", "urls", "--urls-file", str(urls),
                           "--allow-host", "127.0.0.1"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["url"].rsplit("/", 1)[-1]: r for r in _manifest(rd)}
    assert set(rows) == {"1.jpg", "2.jpg", "html", "nope"}  # the unknown name and the ftp URL are not candidates
    ok = rows["1.jpg"]
    assert ok["status"] == "ok" and ok["location"] == "shard" and ok["name"] == "wolf" and ok["parents"] == ["dog"]
    assert rows["2.jpg"]["name"] == "wolf"  # "Wolves" is normalised to the auxiliary name
    import io

    from PIL import Image

    data = ShardMember(rd.root / ok["path"], ok["offset"], ok["size"]).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (ok["width"], ok["height"]) == (64, 48)
    assert rows["html"]["status"] == "not_image" and rows["html"]["error"]
    assert rows["nope"]["status"] == "http_404"
    stats = read_json(rd.path("retrieve", "stats.json"))
    assert stats["source"]["unknown_names"] == {"unicorn": 1} and stats["source"]["bad_urls"] == 1
    assert stats["per_name"]["wolf"] == {"ok": 2} and stats["names_with_images"] == 1
    assert (rd.path("retrieve", "candidates.parquet")).is_file()
    # a re-run with the same inputs is skipped, and fetches nothing
    before = server.snapshot()
    res = run_retrieve(RetrieveConfig(source="urls", urls_file=str(urls), download={"allow_hosts": ["127.0.0.1"]}),
                       rd)
    assert res.skipped and server.snapshot() == before


@pytest.mark.network
def test_urls_source_is_refused_without_allow_host(server: ImageServer, tmp_path: Path) -> None:
    """Loopback is a blocked address unless allowed explicitly: the rows fail, nothing is fetched."""
    rd = _run_dir(tmp_path)
    urls = _write_urls(tmp_path / "urls.csv", [("wolf", server.url("/img/77.jpg"), "wolf")])
    before = server.snapshot()
    run_retrieve(RetrieveConfig(source="urls", urls_file=str(urls)), rd)
    (row,) = _manifest(rd)
    assert row["status"] == "blocked_address" and "127.0.0.1" in row["error"]
    assert server.snapshot() == before


_KILL_SCRIPT = """
import sys
from neighborlt.retrieve import RetrieveConfig, run_retrieve
run_retrieve(RetrieveConfig(source="urls", urls_file=sys.argv[2],
                            download={"allow_hosts": ["127.0.0.1"], "shard_size": 20, "threads": 4}), sys.argv[1])
"""


@pytest.mark.network
def test_kill_9_mid_download_then_rerun_gives_the_same_manifest(tmp_path: Path) -> None:
    """``neighborlt retrieve`` killed with SIGKILL mid-download; the re-run fetches none of the images stored in the
    shards that were complete at the kill, and ends with the manifest of an uninterrupted run."""
    n = 160
    opts = {"allow_hosts": ["127.0.0.1"], "shard_size": 20}
    with ImageServer(latency=0.02) as srv:
        urls = _write_urls(tmp_path / "urls.csv", [("wolf" if i % 2 else "lynx", srv.url(f"/img/{i}.jpg"),
                                                    f"photo {i}") for i in range(n)])
        killed = _run_dir(tmp_path / "killed")
        script = tmp_path / "dl.py"
        script.write_text(_KILL_SCRIPT)
        proc = subprocess.Popen([sys.executable, str(script), str(killed.root), str(urls)])
        shard_dir = killed.path("retrieve", "shards")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(shard_dir.glob("*_stats.json"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the download finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not killed.path("retrieve", "manifest.parquet").exists()
        complete = [s.name[: -len("_stats.json")] for s in shard_dir.glob("*_stats.json")]
        stored = {r["url"] for c in complete for r in pq.read_table(shard_dir / f"{c}.parquet").to_pylist()
                  if r["status"] == "ok"}
        assert 2 * 20 <= len(stored) < n
        at_kill = srv.snapshot()
        run_retrieve(RetrieveConfig(source="urls", urls_file=str(urls), download=opts), killed)
        after = srv.snapshot()
        clean = _run_dir(tmp_path / "clean")
        run_retrieve(RetrieveConfig(source="urls", urls_file=str(urls), download=opts), clean)
    for url in stored:
        path = "/" + url.split("/", 3)[3]
        assert at_kill[path] == after[path] == 1, f"{path} was fetched again after the kill"
    a = sorted((r["uid"], r["status"], r["sha256"], r["width"], r["name"]) for r in _manifest(killed))
    b = sorted((r["uid"], r["status"], r["sha256"], r["width"], r["name"]) for r in _manifest(clean))
    assert a == b and len(a) == n and all(r[1] == "ok" for r in a)


@pytest.mark.network
def test_web_source_with_a_local_engine_backs_off_and_reports_empty_names(server: ImageServer, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A ddgs-shaped stand-in engine served from 127.0.0.1: 429 once (back-off and retry), results with title as
    caption, a name with no results reported."""
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            from urllib.parse import parse_qs, urlsplit

            q = parse_qs(urlsplit(self.path).query)["q"][0]
            calls.append(q)
            if q == "wolf" and calls.count("wolf") == 1:
                self.send_response(429)
                self.end_headers()
                return
            body = [] if q == "lynx" else [{"image": server.url(f"/img/{100 + 10 * len(q) + i}.jpg"), "title": f"{q} photo {i}",
                                           "url": "http://page.invalid/", "thumbnail": "", "source": "Stand-in"}
                                          for i in range(3)]
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=httpd.serve_forever, daemon=True).start()

    def engine(cfg: Any):
        import urllib.error
        import urllib.parse
        import urllib.request

        from neighborlt.retrieve.sources import SearchRefused

        def search(query: str, n: int) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{httpd.server_port}/i?" + urllib.parse.urlencode({"q": query, "n": n})
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code == 429:
                    raise SearchRefused("rate limited") from None
                raise

        return search

    WEB_ENGINES.register("local-test")(engine)
    try:
        rd = _run_dir(tmp_path)
        res = run_retrieve(RetrieveConfig(source="web", web_engine="local-test", per_name=2, search_backoff_s=0.01,
                                          search_delay_s=0, download={"allow_hosts": ["127.0.0.1"]}), rd)
    finally:
        httpd.shutdown()
        WEB_ENGINES._items.pop("local-test", None)
    assert calls.count("wolf") == 2  # refused once, retried
    rows = _manifest(rd)
    assert {r["name"] for r in rows} == {"wolf", "fox"} and len(rows) == 4
    assert all(r["status"] == "ok" and r["source"] == "web" and r["caption"].endswith(("photo 0", "photo 1"))
               for r in rows)
    stats = read_json(rd.path("retrieve", "stats.json"))
    assert stats["source"]["names_without_results"] == ["lynx"] and res.names_with_images == 2
    assert any("no results for 1 of 3 names" in m for m in caplog.messages)
    # other download rules: the stage runs again, but neither asks the engine (gone now) nor fetches an ok image
    before = server.snapshot()
    again = run_retrieve(RetrieveConfig(source="web", web_engine="local-test", per_name=2, search_backoff_s=0.01,
                                        search_delay_s=0, download={"allow_hosts": ["127.0.0.1"], "max_side": 100}),
                         rd)
    assert not again.skipped and again.status == {"ok": 4} and server.snapshot() == before
    assert read_json(rd.path("retrieve", "stats.json"))["source"]["names_without_results"] == ["lynx"]


@pytest.mark.network
def test_knn_source_against_a_clip_retrieval_stand_in(server: ImageServer, tmp_path: Path) -> None:
    asked: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body)
            assert self.path == "/knn-service"
            out = [{"url": server.url(f"/img/{200 + i}.jpg"), "caption": f"a {body['text']}", "similarity": 0.3 - i / 10,
                    "id": i} for i in range(body["num_images"])]
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        rd = _run_dir(tmp_path, NAMES[:1])
        run_retrieve(RetrieveConfig(source="knn", knn_url=f"http://127.0.0.1:{httpd.server_port}", per_name=2,
                                    knn_index="my-index", download={"allow_hosts": ["127.0.0.1"]}), rd)
    finally:
        httpd.shutdown()
    assert asked[0]["text"] == "wolf" and asked[0]["indice_name"] == "my-index" and asked[0]["modality"] == "image"
    rows = _manifest(rd)
    assert [r["similarity"] for r in rows] == pytest.approx([0.3, 0.2])
    assert all(r["status"] == "ok" and r["caption"] == "a wolf" for r in rows)


def test_local_folder_and_table_pools(tmp_path: Path) -> None:
    from PIL import Image

    pool = tmp_path / "pool"
    for cls, n in (("Wolves", 2), ("lynx", 1), ("zebra", 1)):
        (pool / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 50, 10, 10)).save(pool / cls / f"{i}.jpg")
    (pool / "lynx" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    rd = _run_dir(tmp_path)
    run_retrieve(RetrieveConfig(source="local", pool=str(pool)), rd)
    rows = _manifest(rd)
    assert sorted((r["name"], r["status"]) for r in rows) == [("lynx", "not_image"), ("lynx", "ok"), ("wolf", "ok"),
                                                              ("wolf", "ok")]
    assert all(r["location"] == "file" and Path(r["path"]).is_file() for r in rows)  # referenced, not copied
    assert read_json(rd.path("retrieve", "stats.json"))["source"]["unmatched_names"] == ["fox"]
    # pool_per_class: at most N candidates per auxiliary class, the first in pool order; a new key reruns the stage
    run_retrieve(RetrieveConfig(source="local", pool=str(pool), pool_per_class=1), rd)
    capped = _manifest(rd)
    assert sorted(r["name"] for r in capped) == ["lynx", "wolf"]
    assert [r["path"] for r in capped if r["name"] == "wolf"] == [next(r["path"] for r in rows if r["name"] == "wolf")]

    table = tmp_path / "pool.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerow(["pool/Wolves/0.jpg", "two grey wolves and a fox"])
        w.writerow(["pool/zebra/0.jpg", "a zebra"])
    rd2 = _run_dir(tmp_path / "t")
    run_retrieve(RetrieveConfig(source="local", pool=str(table)), rd2)
    assert sorted(r["name"] for r in _manifest(rd2)) == ["fox", "wolf"]  # one image, a candidate of both names


def test_unchanged_local_files_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A second retrieval from the same pool (another run, an ablation's next setting) takes the files' checks from
    the cache; a file rewritten since, and one that was not an image, are read again; an unusable cache is a
    warning naming it, and the files are read."""
    import hashlib
    import logging

    from PIL import Image

    from neighborlt.retrieve.filecheck import CACHE_FILE, RACY_S

    cache = tmp_path / "cache"
    monkeypatch.setenv("NEIGHBORLT_CACHE", str(cache))
    pool = tmp_path / "pool"
    for cls, n in (("wolf", 2), ("lynx", 1)):
        (pool / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 50, 10, 10)).save(pool / cls / f"{i}.jpg")
    (pool / "lynx" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    time.sleep(RACY_S + 0.1)  # files changed just before they are read are not remembered (racy: the next test)

    def retrieve(name: str) -> dict[str, dict[str, Any]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="neighborlt.retrieve"):
            run_retrieve(RetrieveConfig(source="local", pool=str(pool)), _run_dir(tmp_path / name))
        return {Path(r["path"]).relative_to(pool).as_posix(): {k: r[k] for k in ("status", "sha256", "width",
                                                                                    "height")}
                for r in _manifest(RunDir(tmp_path / name / "run"))}

    first = retrieve("a")
    assert [first[k]["status"] for k in sorted(first)] == ["ok", "not_image", "ok", "ok"]  # lynx/0, lynx/broken, wolf/0, wolf/1
    assert "unchanged since their last check" not in caplog.text
    assert retrieve("b") == first
    assert "3 of 4 referenced files unchanged since their last check" in caplog.text  # the broken one is read
    # rewritten since (same name, another image), and the broken file replaced by an image: both are read again
    Image.new("RGB", (40, 30), (0, 200, 0)).save(pool / "wolf" / "0.jpg")
    Image.new("RGB", (20, 20), (0, 0, 200)).save(pool / "lynx" / "broken.jpg")
    third = retrieve("c")
    assert "2 of 4 referenced files unchanged" in caplog.text
    assert retrieve("c2") == third and "2 of 4 referenced files unchanged" in caplog.text  # racy: not remembered yet
    assert third["wolf/0.jpg"] == {"status": "ok", "sha256": hashlib.sha256((pool / "wolf" / "0.jpg").read_bytes())
                                   .hexdigest(), "width": 40, "height": 30} != first["wolf/0.jpg"]
    assert third["lynx/broken.jpg"]["status"] == "ok" and third["wolf/1.jpg"] == first["wolf/1.jpg"]
    # an unusable cache: one warning naming it, every file read, the same rows
    (cache / CACHE_FILE).write_bytes(b"not a database" * 100)
    assert retrieve("d") == third
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(cache / CACHE_FILE) in warned[0] and "delete the file" in warned[0]
    assert "unchanged since their last check" not in caplog.text


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    rd = _run_dir(tmp_path)
    with pytest.raises(ConfigError, match="unknown retrieve source 'nope'; choose one of: knn, local, urls, web"):
        run_retrieve(RetrieveConfig(source="nope"), rd)
    with pytest.raises(ConfigError, match="--urls-file"):
        run_retrieve(RetrieveConfig(source="urls"), rd)
    bad = tmp_path / "bad.csv"
    bad.write_text("label,link\nwolf,http://x/\n")
    with pytest.raises(DataError, match="needs the columns name, url; missing name, url"):
        run_retrieve(RetrieveConfig(source="urls", urls_file=str(bad)), rd)
    with pytest.raises(ConfigError, match="neighbors.json: not found; run `neighborlt neighbors"):
        run_retrieve(RetrieveConfig(), RunDir(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="split.json: not found"):
        run_retrieve(RetrieveConfig(source="local"), rd)
    with pytest.raises(ConfigError, match="--knn-url"):
        run_retrieve(RetrieveConfig(source="knn"), rd)


def _image_folder(root: Path, classes: dict[str, int], test: int = 2) -> Path:
    """A tiny ImageFolder dataset (train/<class>/*.png with the given counts, ``test`` test images per class)."""
    from PIL import Image

    for split, counts in (("train", classes), ("test", dict.fromkeys(classes, test))):
        for c, (name, n) in enumerate(counts.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (40 * c, 7 * i, 90)).save(root / split / name / f"{i}.png")
    return root


def test_a_pool_captioned_with_a_wordnet_synonym_reaches_the_auxiliary_manifest(tmp_path: Path) -> None:
    """WordNet proposes *gym shoe* for the target *sandal*; the pool's captions say *sneakers* (a lemma of the same
    synset). Retrieval matches them through the synonym (and records it), and the caption rule keeps them."""
    from neighborlt.classes import ClassesConfig, run_classes
    from neighborlt.filter import FilterConfig, run_filter
    from neighborlt.neighbors import NeighborsConfig, run_neighbors

    data = _image_folder(tmp_path / "shoes", {"sandal": 6, "teapot": 3})
    rd = RunDir(tmp_path / "run")
    run_classes(ClassesConfig(dataset=str(data)), rd)
    run_neighbors(NeighborsConfig(backend="wordnet", per_class=3, split_ratio="1:1:1"), rd)
    gym = next(a for a in read_json(rd.path("neighbors.json"))["auxiliary"] if a["name"] == "gym shoe")
    assert gym["parents"] == ["sandal"] and gym["synset"] == "n03472535"
    assert gym["synonyms"] == ["sneaker", "tennis shoe"]  # the synset's other lemmas, kept in neighbors.json

    from PIL import Image

    (tmp_path / "pool").mkdir()
    captions = ["white sneakers on a shelf", "a muddy Sneaker", "tennis shoes, size 42", "a gym shoe", "a red bicycle"]
    with open(tmp_path / "pool" / "pool.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i, cap in enumerate(captions):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / "pool" / f"{i}.png")
            w.writerow([f"{i}.png", cap])
    run_retrieve(RetrieveConfig(source="local", pool=str(tmp_path / "pool" / "pool.csv")), rd)
    rows = {Path(r["path"]).name: r for r in _manifest(rd)}
    assert sorted(rows) == ["0.png", "1.png", "2.png", "3.png"]  # the bicycle is nobody's
    assert {n: (r["name"], r["matched"]) for n, r in rows.items()} == {
        "0.png": ("gym shoe", "sneaker"), "1.png": ("gym shoe", "sneaker"), "2.png": ("gym shoe", "tennis shoe"),
        "3.png": ("gym shoe", "gym shoe")}
    assert all(r["status"] == "ok" and r["parents"] == ["sandal"] for r in rows.values())

    run_filter(FilterConfig(caption=True, band=False, leak=False, dedup=False, sheets=0), rd)
    kept = pq.read_table(rd.path("filter", "aux_manifest.parquet")).to_pylist()
    assert sorted(Path(r["path"]).name for r in kept) == ["0.png", "1.png", "2.png", "3.png"]  # the synonym counts


def test_name_matcher_matches_whole_words_plurals_and_prefers_the_name() -> None:
    from neighborlt.retrieve.sources import NameMatcher, caption_mentions

    m = NameMatcher([("gym shoe", ["gym shoe", "sneaker"]), ("wolf", ["wolf"]), ("golden retriever",
                                                                                 ["golden retriever"])])
    assert m.match("Two golden retrievers and three wolves") == {"golden retriever": "golden retriever",
                                                                 "wolf": "wolf"}
    assert m.match("a sneaker next to a gym-shoe") == {"gym shoe": "gym shoe"}  # the name wins over a synonym
    assert m.match("sneakerhead's shelf") == {} and m.match("") == {}  # whole words only
    assert caption_mentions("a grey wolf", {"wolf"}) and not caption_mentions("a werewolf", {"wolf"})
