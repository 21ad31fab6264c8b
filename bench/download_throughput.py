"""Download throughput of the retrieve stage's engine vs img2dataset, end to end, against a local nginx.

Setting: N (default 5000) real Tiny-ImageNet JPEGs (64x64, ~2 KB each; the first N ``train/`` images of
``../shared/data/tiny-imagenet-200.tar.gz``, extracted with tarfile into a temp dir) are served by nginx on
127.0.0.1 (a temporary config: own prefix, pid file, logs and temp paths under the temp dir, a free port,
``access_log off``, ``--nginx-workers`` worker processes). The same URL list (a Parquet written by the
stage's ``export_img2dataset``: url, caption, name, uid) is downloaded by

* **ours**: :func:`neighborlt.retrieve.download.download` with every guard on (address guard with
  ``allow_hosts=["127.0.0.1"]`` only, byte/redirect caps, time-outs, X-Robots-Tag, image rules), ``max_side=64``,
  ``--processes`` worker processes (default 0: one per core available) x ``--threads`` threads, 1000 rows per
  shard, the other options at their defaults (so a JPEG that already fits is kept as downloaded, after a full
  decode); run as a subprocess of the project's Python (``sys.executable``), so its wall time includes interpreter
  start and imports;
* **img2dataset** (from its own virtualenv, ``--img2dataset-venv``, created with ``python3 -m venv`` and
  ``pip install img2dataset`` when missing): ``--output_format webdataset --image_size 64 --resize_mode keep_ratio
  --resize_only_if_bigger True --encode_quality 90 --processes_count 2 --thread_count 32`` (its X-Robots-Tag check
  is on by default), ``--number_sample_per_shard`` = ceil(N / processes) unless ``--i2d-shard-size`` says
  otherwise, so both of its processes stay busy to the end (smaller shards leave one process idle in the last
  round, which would flatter us).

Each engine runs ``--repeat`` times, alternating, into a fresh output folder; the script prints every run's wall
time, images/s (ok images / wall), ok count, CPU seconds of the child process tree, the load average before it,
and then the medians and the ratio ours / img2dataset. It asserts nothing. The machine is usually shared: read the
load averages with the figures.

    .venv/bin/python bench/download_throughput.py [--n 5000] [--processes 0] [--threads 32] [--repeat 3]
        [--img2dataset-venv runs/bench_i2d_venv] [--i2d-processes 2] [--i2d-threads 32] [--i2d-shard-size K]
        [--nginx-workers 1] [--only ours|img2dataset] [--keep DIR]

nginx must be installed (Debian: ``apt-get install -y nginx``); the script says so and stops when it is not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "tiny-imagenet-200.tar.gz"


# ----------------------------------------------------------------------------------------------------------------
# data and server
# ----------------------------------------------------------------------------------------------------------------


def extract_jpegs(archive: Path, n: int, www: Path) -> list[tuple[str, str]]:
    """The first ``n`` train JPEGs of the archive as ``www/img/<wnid>/<file>``; returns (relative path, wnid)."""
    if not archive.is_file():
        sys.exit(f"{archive}: not found; pass --archive PATH to a tiny-imagenet-200.tar.gz")
    out: list[tuple[str, str]] = []
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not (m.isfile() and len(parts) == 5 and parts[1] == "train" and m.name.endswith(".JPEG")):
                continue
            wnid, fname = parts[2], parts[4]
            rel = f"img/{wnid}/{fname[:-5]}.jpg"
            dest = www / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            dest.write_bytes(src.read())
            out.append((rel, wnid))
            if len(out) >= n:
                break
    if len(out) < n:
        sys.exit(f"{archive}: only {len(out)} train JPEGs (asked for {n})")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        location / {{ }}
    }}
}}
"""


def start_nginx(prefix: Path, workers: int) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                         if os.access(p, os.X_OK)), None)
    if exe is None:
        sys.exit("nginx is not installed; install it (Debian/Ubuntu: `apt-get install -y nginx`, as root) and re-run")
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    # as root nginx switches its workers to `nobody`, which cannot read a 0700 temp dir: keep them as this user
    user = f"user {os.environ.get('USER') or 'root'};\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, workers=workers, prefix=prefix, port=port))
    proc = subprocess.Popen([exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            sys.exit(f"nginx exited at start (rc {proc.returncode}): {err.strip()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("nginx did not listen within 15 s")


def stop_nginx(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)  # graceful shutdown of the master and its workers
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# the engines
# ----------------------------------------------------------------------------------------------------------------


def ensure_img2dataset(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print(f"creating {venv} with img2dataset (python3 -m venv + pip install img2dataset) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    if not exe.exists():
        sys.exit(f"{exe}: missing after pip install img2dataset")
    return exe


def img2dataset_version(venv: Path) -> str:
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('img2dataset'))"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_child(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, CPU seconds of it and its waited-for children, stdout)."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    with open(log or os.devnull, "w") as err:
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if r.returncode != 0:
        tail = log.read_text()[-2000:] if log else ""
        sys.exit(f"{cmd[0]} failed (rc {r.returncode}):\n{tail}")
    return wall, cpu, r.stdout


def run_ours(urls: Path, out: Path, processes: int, threads: int, log: Path) -> dict[str, Any]:
    wall, cpu, stdout = run_child([sys.executable, str(Path(__file__).resolve()), "--worker-ours", str(urls),
                                   str(out), str(processes), str(threads)], log=log)
    inner = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "cpu": cpu, "ok": inner["ok"], "status": inner["status"], "inner": inner["seconds"],
            "processes": inner["processes"]}


def worker_ours(urls: str, out: str, processes: int, threads: int) -> None:
    """The timed subprocess of ``ours`` (prints one JSON line)."""
    import pyarrow.parquet as pq

    from neighborlt.retrieve.download import DownloadOptions, download

    rows = pq.read_table(urls).to_pylist()
    opts = DownloadOptions(processes=processes, threads=threads, max_side=64, allow_hosts=["127.0.0.1"])
    t0 = time.perf_counter()
    index = download(rows, out, opts)
    dt = time.perf_counter() - t0
    status: dict[str, int] = {}
    for s in index.column("status").to_pylist():
        status[s] = status.get(s, 0) + 1
    print(json.dumps({"ok": status.get("ok", 0) + status.get("duplicate", 0), "status": status, "seconds": dt,
                      "processes": opts.resolved_processes()}))


def run_img2dataset(exe: Path, urls: Path, out: Path, processes: int, threads: int, shard_size: int,
                    log: Path) -> dict[str, Any]:
    cmd = [str(exe), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url", "--caption_col",
           "caption", "--save_additional_columns", '["name","uid"]', "--output_format", "webdataset",
           "--output_folder", str(out), "--image_size", "64", "--resize_mode", "keep_ratio",
           "--resize_only_if_bigger", "True", "--encode_quality", "90", "--processes_count", str(processes),
           "--thread_count", str(threads), "--number_sample_per_shard", str(shard_size), "--enable_wandb", "False",
           "--timeout", "10", "--retries", "0"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    wall, cpu, _ = run_child(cmd, env=env, log=log)
    ok, status = 0, {}
    for st in sorted(out.glob("*_stats.json")):
        s = json.loads(st.read_text())
        ok += int(s.get("successes", 0))
        for k, v in (s.get("status_dict") or {}).items():
            status[k] = status.get(k, 0) + int(v)
    return {"wall": wall, "cpu": cpu, "ok": ok, "status": status, "cmd": cmd}


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="images served and downloaded")
    ap.add_argument("--processes", type=int, default=0, help="our worker processes (0: one per core available)")
    ap.add_argument("--threads", type=int, default=32, help="our download threads per process")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each engine (alternating); medians reported")
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--img2dataset-venv", type=Path, default=ROOT / "runs" / "bench_i2d_venv")
    ap.add_argument("--i2d-processes", type=int, default=2)
    ap.add_argument("--i2d-threads", type=int, default=32)
    ap.add_argument("--i2d-shard-size", type=int, default=None, help="default ceil(N / processes)")
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--only", choices=("ours", "img2dataset"), default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    ap.add_argument("--worker-ours", nargs=4, metavar=("URLS", "OUT", "PROCESSES", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_ours:
        worker_ours(args.worker_ours[0], args.worker_ours[1], int(args.worker_ours[2]), int(args.worker_ours[3]))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from neighborlt.retrieve.stage import export_img2dataset

    i2d = None if args.only == "ours" else ensure_img2dataset(args.img2dataset_venv.resolve())
    tmp = None if args.keep else tempfile.mkdtemp(prefix="neighborlt-dlbench-")
    work = (args.keep or Path(tmp)).resolve()  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        files = extract_jpegs(args.archive, args.n, work / "www")
        print(f"extracted {len(files)} Tiny-ImageNet JPEGs in {time.perf_counter() - t:.1f} s "
              f"({sum((work / 'www' / f).stat().st_size for f, _ in files) / len(files):.0f} bytes each on average)")
        nginx, port = start_nginx(work, args.nginx_workers)
        try:
            rows = [{"uid": f"u{i:06d}", "url": f"http://127.0.0.1:{port}/{rel}", "name": wnid,
                     "caption": f"a photo of {wnid}", "location": "url"} for i, (rel, wnid) in enumerate(files)]
            urls = export_img2dataset(rows, work / "urls.parquet")
            (work / "urls.txt").write_text("".join(r["url"] + "\n" for r in rows))
            with urllib.request.urlopen(rows[0]["url"], timeout=5) as r:
                assert r.status == 200 and r.read()[:2] == b"\xff\xd8", "nginx does not serve the JPEGs"
            shard = args.i2d_shard_size or math.ceil(args.n / args.i2d_processes)
            print(f"nginx {args.nginx_workers} worker(s) on 127.0.0.1:{port}; {args.n} URLs in {urls}; "
                  f"cpus {os.cpu_count()}; python {sys.version.split()[0]}"
                  + (f"; img2dataset {img2dataset_version(args.img2dataset_venv.resolve())}" if i2d else ""))
            res: dict[str, list[dict[str, Any]]] = {"ours": [], "img2dataset": []}
            for k in range(args.repeat):
                for engine in ("ours", "img2dataset"):
                    if args.only and engine != args.only:
                        continue
                    out = work / f"out_{engine}_{k}"
                    shutil.rmtree(out, ignore_errors=True)
                    load = os.getloadavg()
                    if engine == "ours":
                        r = run_ours(urls, out, args.processes, args.threads, work / f"log_{engine}_{k}.txt")
                        extra = f"download() {r['inner']:.2f} s, processes {r['processes']} x threads {args.threads}"
                    else:
                        assert i2d is not None
                        r = run_img2dataset(i2d, urls, out, args.i2d_processes, args.i2d_threads, shard,
                                            work / f"log_{engine}_{k}.txt")
                        extra = f"processes {args.i2d_processes} x threads {args.i2d_threads}, shard {shard}"
                    r["load"] = load
                    res[engine].append(r)
                    print(f"{engine:11s} run {k}: {r['wall']:6.2f} s wall  {r['ok'] / r['wall']:7.1f} images/s  "
                          f"ok {r['ok']}/{args.n}  cpu {r['cpu']:6.2f} s ({1000 * r['cpu'] / max(1, r['ok']):.2f} "
                          f"ms/image)  load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  [{extra}]  "
                          f"status {r['status']}", flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
        finally:
            stop_nginx(nginx)
        med = {e: statistics.median(x["ok"] / x["wall"] for x in v) for e, v in res.items() if v}
        for e, v in med.items():
            print(f"median {e:11s}: {v:7.1f} images/s over {len(res[e])} run(s)")
        if len(med) == 2:
            print(f"ratio ours / img2dataset: {med['ours'] / med['img2dataset']:.2f} (target >= 2)")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
