"""Regenerate tests/data/img2dataset_output/ with the REAL img2dataset (see README.txt there).

    .venv/bin/python tests/data/img2dataset_output/make_fixture.py --img2dataset runs/bench_i2d_venv/bin/img2dataset

Serves 8 URLs from a local http.server on 127.0.0.1 (6 small images, one 404, one HTML page named .jpg), writes
the URL list with the retrieve stage's own `--export-img2dataset` (run_retrieve(..., export_img2dataset=...)),
runs img2dataset on it and copies its output folder here (the tar, parquet and stats json; its _tmp dir, if
any, is left out).
"""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image, ImageDraw

from neighborlt.retrieve import RetrieveConfig, run_retrieve

HERE = Path(__file__).resolve().parent
NAMES = {"red fox": ["kit fox"], "grey wolf": ["coyote"], "barn owl": ["great grey owl"]}
IMAGES = {  # file -> (name, size, colour); two are bigger than --image_size 48, so img2dataset shrinks them
    "fox1.jpg": ("red fox", (40, 32), (200, 80, 20)),
    "fox2.png": ("red fox", (64, 48), (220, 120, 40)),
    "wolf1.jpg": ("grey wolf", (36, 36), (120, 120, 120)),
    "wolf2.jpg": ("grey wolf", (32, 44), (90, 90, 100)),
    "owl1.jpg": ("barn owl", (60, 60), (230, 210, 170)),
    "owl2.webp": ("barn owl", (44, 40), (200, 180, 140)),
}
BROKEN = {"missing.jpg": "grey wolf", "page.jpg": "barn owl"}  # 404 / an HTML page


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--img2dataset", required=True, help="the img2dataset executable")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="i2d-fixture-"))
    www = work / "www"
    www.mkdir()
    for fname, (name, size, colour) in IMAGES.items():
        im = Image.new("RGB", size, colour)
        ImageDraw.Draw(im).ellipse([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=(20, 20, 20))
        im.save(www / fname, quality=80)
    (www / "page.jpg").write_text("<!doctype html><html><body>not an image</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run = work / "run"
        run.mkdir()
        doc = {"schema": 1, "auxiliary": [{"name": n, "parents": p} for n, p in NAMES.items()], "targets": []}
        (run / "neighbors.json").write_text(json.dumps(doc))
        with open(work / "urls.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "url", "caption"])
            for fname, (name, _, _) in IMAGES.items():
                w.writerow([name, f"{base}/{fname}", f"a photo of a {name} ({fname})"])
            for fname, name in BROKEN.items():
                w.writerow([name, f"{base}/{fname}", f"a broken link for {name} ({fname})"])
        export = work / "urls.parquet"
        run_retrieve(RetrieveConfig(source="urls", urls_file=str(work / "urls.csv"), export_img2dataset=str(export)),
                     run)
        out = work / "i2d_out"
        cmd = [args.img2dataset, "--url_list", str(export), "--input_format", "parquet", "--url_col", "url",
               "--caption_col", "caption", "--save_additional_columns", '["name","uid"]', "--output_format",
               "webdataset", "--output_folder", str(out), "--image_size", "48", "--resize_mode", "keep_ratio",
               "--resize_only_if_bigger", "True", "--processes_count", "1", "--thread_count", "4",
               "--number_sample_per_shard", "100", "--enable_wandb", "False", "--retries", "0"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    finally:
        server.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    for p in sorted(out.iterdir()):
        if p.is_file():
            shutil.copy2(p, args.out / p.name)
            print(f"{p.name}: {p.stat().st_size} bytes")
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
