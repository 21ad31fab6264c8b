"""The retrieve stage's img2dataset interchange: ``--export-img2dataset`` writes the list img2dataset reads, and
``--import-img2dataset`` reads back a folder that the real img2dataset 1.47.0 wrote (``tests/data/img2dataset_output``,
see the README.txt there: 6 images, one HTTP 404, one HTML page; names "red fox", "grey wolf", "barn owl")."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from neighborlt.data import manifest as mf
from neighborlt.data.base import ShardMember
from neighborlt.errors import DataError
from neighborlt.retrieve import IMG2DATASET_COMMAND, RetrieveConfig, run_retrieve

FIXTURE = Path(__file__).resolve().parent / "data" / "img2dataset_output"
PARENTS = {"red fox": ["kit fox"], "grey wolf": ["coyote"], "barn owl": ["great grey owl"]}


def _run_dir(tmp_path: Path, names: dict[str, list[str]]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    doc = {"schema": 1, "auxiliary": [{"name": n, "parents": p} for n, p in names.items()], "targets": []}
    (run / "neighbors.json").write_text(json.dumps(doc))
    return run


def _fixture_rows() -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(FIXTURE / "00000.parquet").to_pylist()}


def test_fixture_is_img2dataset_output() -> None:
    stats = json.loads((FIXTURE / "00000_stats.json").read_text())
    assert stats["count"] == 8 and stats["successes"] == 6
    assert (FIXTURE / "00000.tar").is_file()
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 200_000


def _import(tmp_path: Path) -> tuple[Path, object, list[dict], dict[str, dict]]:
    run = _run_dir(tmp_path, PARENTS)
    res = run_retrieve(RetrieveConfig(source="urls", import_img2dataset=str(FIXTURE)), run)
    table = mf.read_table(run / "retrieve" / "manifest.parquet")
    assert table.schema.equals(mf.SCHEMA)
    return run, res, table.to_pylist(), _fixture_rows()


def test_import_img2dataset_manifest(tmp_path: Path) -> None:
    run, res, rows, src = _import(tmp_path)
    assert res.candidates == 8 and res.names == 3 and res.names_with_images == 3 and res.status["ok"] == 6
    assert {r["uid"] for r in rows} == set(src)  # the uids of the exported list come back
    tar = (FIXTURE / "00000.tar").resolve()
    for r in rows:
        s = src[r["uid"]]
        assert r["name"] == s["name"] and r["parents"] == PARENTS[s["name"]]
        assert r["url"] == s["url"] and r["caption"] == s["caption"] and r["source"] == "img2dataset"
        if s["status"] != "success":
            assert r["status"] != "ok" and r["offset"] == -1
            continue
        assert r["status"] == "ok" and r["error"] == ""
        assert r["location"] == "shard" and Path(r["path"]) == tar
        assert mf.image_ref(r, run) == ShardMember(tar, r["offset"], r["size"])
        data = ShardMember(Path(r["path"]), r["offset"], r["size"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()  # of the stored bytes, as our own downloads
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "JPEG" and im.size == (r["width"], r["height"]) == (s["width"], s["height"])
    by_url = {Path(r["url"]).name: r for r in rows}
    assert by_url["owl1.jpg"]["width"] == by_url["owl1.jpg"]["height"] == 48  # shrunk by img2dataset from 60x60
    again = run_retrieve(RetrieveConfig(source="urls", import_img2dataset=str(FIXTURE)), run)
    assert again.skipped and again.status == res.status


def test_import_img2dataset_keeps_failures(tmp_path: Path) -> None:
    run, res, rows, src = _import(tmp_path)
    assert res.status == {"ok": 6, "failed": 2}
    for r in rows:
        s = src[r["uid"]]
        if s["status"] != "success":
            assert r["status"] == "failed" and r["location"] == "url" and r["offset"] == -1
            assert r["error"] == s["error_message"], r  # img2dataset's own reason, not a re-download's
    by_url = {Path(r["url"]).name: r for r in rows}
    assert by_url["missing.jpg"]["error"] == "HTTP Error 404: File not found"
    assert by_url["page.jpg"]["error"] == "Image decoding error"
    assert not (run / "retrieve" / "shards").exists()  # nothing was fetched again
    stats = json.loads((run / "retrieve" / "stats.json").read_text())
    assert stats["per_name"] == {"red fox": {"ok": 2}, "grey wolf": {"ok": 2, "failed": 1},
                                 "barn owl": {"ok": 2, "failed": 1}}


def test_import_img2dataset_maps_names(tmp_path: Path) -> None:
    """Names match through the project's name key (case, underscores, plurals); unknown names are skipped."""
    run = _run_dir(tmp_path, {"Red_Foxes": ["kit fox"], "Grey Wolf": ["coyote"]})
    res = run_retrieve(RetrieveConfig(source="urls", import_img2dataset=str(FIXTURE)), run)
    rows = mf.read_table(run / "retrieve" / "manifest.parquet").to_pylist()
    assert sorted({r["name"] for r in rows}) == ["Grey Wolf", "Red_Foxes"]  # neighbors.json spelling
    assert res.candidates == 5 and res.names == 2
    stats = json.loads((run / "retrieve" / "stats.json").read_text())
    assert stats["source"]["unknown_names"] == {"barn owl": 3}


def test_import_img2dataset_errors(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, PARENTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no finished img2dataset shard"):
        run_retrieve(RetrieveConfig(source="urls", import_img2dataset=str(empty)), run)
    no_names = tmp_path / "no_names"
    no_names.mkdir()
    for f in ("00000.tar", "00000_stats.json"):
        (no_names / f).write_bytes((FIXTURE / f).read_bytes())
    pq.write_table(pq.read_table(FIXTURE / "00000.parquet").drop(["name"]), no_names / "00000.parquet")
    with pytest.raises(DataError, match="save_additional_columns"):
        run_retrieve(RetrieveConfig(source="urls", import_img2dataset=str(no_names)), run)


def test_export_img2dataset(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, PARENTS)
    urls = tmp_path / "urls.csv"
    urls.write_text("name,url,caption\n"
                    "red fox,http://127.0.0.1:9/a.jpg,a red fox\n"
                    "Barn Owls,https://127.0.0.1:9/b.png,\n"
                    "zebra,http://127.0.0.1:9/z.jpg,not an auxiliary name\n")
    out = tmp_path / "export" / "urls.parquet"
    res = run_retrieve(RetrieveConfig(source="urls", urls_file=str(urls), export_img2dataset=str(out)), run)
    assert res.exported == str(out) and res.manifest is None and res.candidates == 2
    table = pq.read_table(out)
    # what img2dataset reads, as IMG2DATASET_COMMAND tells it: --url_col, --caption_col, --save_additional_columns
    argv = shlex.split(IMG2DATASET_COMMAND.format(file=out))
    opt = {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert opt["input_format"] == "parquet" and opt["output_format"] == "webdataset"
    wanted = [opt["url_col"], opt["caption_col"], *json.loads(opt["save_additional_columns"])]
    assert sorted(wanted) == sorted(table.column_names) == ["caption", "name", "uid", "url"]
    assert all(table.schema.field(c).type == pa.string() for c in table.column_names)
    assert all(table.column(c).null_count == 0 for c in table.column_names)
    rows = table.to_pylist()
    assert [(r["name"], r["url"], r["caption"]) for r in rows] == [
        ("red fox", "http://127.0.0.1:9/a.jpg", "a red fox"), ("barn owl", "https://127.0.0.1:9/b.png", "")]
    assert len({r["uid"] for r in rows}) == 2 and all(len(r["uid"]) == 20 for r in rows)
    # the uids are the candidates' (what --import-img2dataset matches the results on)
    cands = mf.read_table(run / "retrieve" / "candidates.parquet").to_pylist()
    assert [r["uid"] for r in rows] == [c["uid"] for c in cands]
    assert not (run / "retrieve" / "manifest.parquet").exists()
