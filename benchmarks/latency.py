"""Latency of captioning and meme analysis through ``gradio_client``: p50/p95, warm and cold, per stage.

    python benchmarks/latency.py                 # starts the app in-process (like `python app.py`)
    python benchmarks/latency.py --url http://127.0.0.1:7860/   # or measures a running server
    python benchmarks/latency.py -n 40 --json

* cold  = an image the server has never seen (a fresh variant of a test photo each request), so
  the image tower and OCR run; also "first request" = the very first request after start-up.
* warm  = the same image again: embeddings and the OCR reading come from the content-addressed cache.
* meme re-analysis = the same meme with edited text (text tower + fusion only), as in the page.
Stages come from the result's ``stage_ms`` (decode, encode_image, ocr, encode_text, fusion, rank,
db); ``round_trip`` is what the client waits for (upload + queue + handler + response).
In-process mode stores its predictions in a temporary database, not the app's own.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PHOTOS = REPO / "mmapp" / "assets" / "photos"
MEME_TEXTS = [("when the build is green", "on a friday"), ("me explaining the bug", "to the rubber duck"),
              ("nobody:", "the cat at 3 am"), ("finally some peace", "said no parent ever")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def photo_paths() -> list[Path]:
    return sorted(p for p in PHOTOS.glob("*.jpg"))


RUN_NONCE = secrets.randbelow(10**6)  # the embedding cache outlives a run: make every run's images new


def unique_variant(source: Path, n: int, out_dir: Path) -> Path:
    """The photo with a few pixels nudged: new bytes, new content hash, so no cache can answer.
    The first row's first 44 pixels spell ``n`` (24 bits) and the run's nonce (20 bits) in black and
    white, which JPEG keeps apart. (An earlier colour formula repeated every 256 variants, every 768
    with 24 photos, and near colours can compress to the same file: a load test of a few thousand
    photos then served about two thirds of them from the embedding cache.)"""
    from PIL import Image

    if not 0 <= n < 2**24:
        raise ValueError(f"variant number must be in [0, 2**24), got {n}")
    bits = [(n >> b) & 1 for b in range(24)] + [(RUN_NONCE >> b) & 1 for b in range(20)]
    with Image.open(source) as im:
        im = im.convert("RGB")
        for k, bit in enumerate(bits):
            im.putpixel((k, 0), (255, 255, 255) if bit else (0, 0, 0))
        path = out_dir / f"{source.stem}-{n}.jpg"
        im.save(path, quality=92)
    return path


def unique_meme(source: Path, n: int, out_dir: Path) -> Path:
    from PIL import Image

    from mmapp.data.memes import render_meme

    top, bottom = MEME_TEXTS[n % len(MEME_TEXTS)]
    with Image.open(source) as im:
        meme = render_meme(im, f"{top} {RUN_NONCE}", f"{bottom} {n}", size=384)
    path = out_dir / f"meme-{n}.png"
    meme.save(path)
    return path


def timed(fn, *args) -> tuple[float, dict]:
    started = time.perf_counter()
    details = fn(*args)
    return (time.perf_counter() - started) * 1e3, details


def raw_http_caption(url: str, path: Path) -> dict:
    """/caption over plain HTTP (upload, then the REST call API): the server without gradio_client's polling."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as http, open(path, "rb") as fh:
        [server_path] = http.post("gradio_api/upload", files={"files": (path.name, fh)}).json()
        file_data = {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        event_id = http.post("gradio_api/call/caption", json={"data": [file_data, ""]}).json()["event_id"]
        with http.stream("GET", f"gradio_api/call/caption/{event_id}") as response:
            event = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line[5:])
                    if event == "error":
                        raise RuntimeError(f"caption failed: {data}")
                    return data[4]
    raise RuntimeError("no result from /caption")


def run_benchmark(url: str, n: int, work_dir: Path) -> dict:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    photos = photo_paths()

    def caption(path: Path) -> dict:
        return client.predict(handle_file(str(path)), "", api_name="/caption")[4]

    def analyze(path: Path) -> dict:
        return client.predict(handle_file(str(path)), True, True, "", api_name="/analyze_meme")[5]

    def reanalyze(text: str) -> dict:
        return client.predict(text, True, True, "", api_name="/reanalyze_meme")[5]

    samples: dict[str, list[tuple[float, dict]]] = {}
    first = unique_variant(photos[0], 10_000, work_dir)
    samples["caption first request"] = [timed(caption, first)]
    cold = [unique_variant(photos[i % len(photos)], i, work_dir) for i in range(n)]
    samples["caption cold"] = [timed(caption, path) for path in cold]
    warm_photo = unique_variant(photos[1], 20_000, work_dir)
    caption(warm_photo)
    samples["caption warm"] = [timed(caption, warm_photo) for _ in range(n)]
    samples["caption warm, plain HTTP"] = [timed(raw_http_caption, url, warm_photo) for _ in range(n)]

    samples["meme first request"] = [timed(analyze, unique_meme(photos[2], 10_000, work_dir))]
    memes = [unique_meme(photos[i % len(photos)], i, work_dir) for i in range(n)]
    samples["meme cold"] = [timed(analyze, path) for path in memes]
    warm_meme = unique_meme(photos[3], 20_000, work_dir)
    analyze(warm_meme)
    samples["meme warm"] = [timed(analyze, warm_meme) for _ in range(n)]
    samples["meme re-analysis (edited text)"] = [timed(reanalyze, f"edited caption {RUN_NONCE} number {i}") for i in range(n)]

    floor = []  # a no-op endpoint: what gradio_client itself adds (it polls for messages every 50 ms)
    for _ in range(n):
        started = time.perf_counter()
        client.predict(api_name="/clear_caption")
        floor.append((time.perf_counter() - started) * 1e3)
    report = summarise(samples)
    report["gradio_client floor (no-op endpoint)"] = {"n": n, "p50_ms": statistics.median(floor),
                                                       "p95_ms": percentile(floor, 0.95), "stages_p50_ms": {}}
    return report


def summarise(samples: dict[str, list[tuple[float, dict]]]) -> dict:
    report = {}
    for name, rows in samples.items():
        round_trip = [ms for ms, _ in rows]
        stages: dict[str, list[float]] = {}
        for _, details in rows:
            for stage, ms in details["stage_ms"].items():
                stages.setdefault(stage, []).append(ms)
            stages.setdefault("server_total", []).append(details["latency_ms"] + details["stage_ms"].get("db", 0.0))
        report[name] = {"n": len(rows), "p50_ms": statistics.median(round_trip),
                        "p95_ms": percentile(round_trip, 0.95),
                        "stages_p50_ms": {k: statistics.median(v) for k, v in stages.items()}}
    return report


def print_report(report: dict, device: str) -> None:
    print(f"\nlatency through gradio_client ({device}); stages are server-side medians\n")
    print(f"{'':34s} {'n':>4s} {'p50 ms':>8s} {'p95 ms':>8s}   stages p50 (ms)")
    for name, row in report.items():
        stages = "  ".join(f"{k} {v:.1f}" for k, v in row["stages_p50_ms"].items())
        print(f"{name:34s} {row['n']:4d} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f}   {stages}")
    print("\ntargets (issue 3): caption p50 <= 150 ms, meme analysis p50 <= 1000 ms")


def serve(args) -> None:
    """The app as `python app.py` builds it, with predictions going to a scratch database and store.

    Runs in its own process (``--serve``) so the client does not share the server's interpreter.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import app as webapp
    from feedback_db.blobstore import BlobStore
    from feedback_db.engine import init_db, make_engine
    from mmapp.config import load_config

    scratch = Path(args.scratch)
    # one address sends every request here: lift the per-client limits (docs/security.md), which are not measured
    unlimited = {"uploads_per_minute": 1e6, "upload_burst": 10**6, "uploads_per_day": 0, "events_per_minute": 1e6,
                 "event_burst": 10**6}
    config = load_config(args.profile, app={"port": args.serve, **unlimited})
    app_engine = make_engine(config.storage.resolved_database_url)  # read for the current model version only
    init_db(app_engine)
    started = time.perf_counter()
    from mmapp.towers import Towers

    predictor = webapp.build_predictor(config, app_engine, Towers.from_config(config))
    print(f"predictor ready in {time.perf_counter() - started:.1f} s (model {predictor.version!r})", flush=True)
    engine = make_engine(f"sqlite:///{scratch / 'bench.db'}")
    init_db(engine)
    demo = webapp.build_app(config, predictor, engine, BlobStore(scratch / "uploads"),
                            watcher=webapp.ModelWatcher(predictor, app_engine))
    demo.launch(**{**webapp.launch_options(config), "quiet": True, "prevent_thread_lock": True})
    print(f"READY {demo.local_url}", flush=True)
    demo.block_thread()


def start_server(args, scratch: Path):
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", str(port), "--scratch", str(scratch)]
    if args.profile:
        cmd += ["--profile", args.profile]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        if not args.json:
            print(f"[server] {line.rstrip()}", flush=True)
        if line.startswith("READY "):
            import threading

            threading.Thread(target=server.stdout.read, daemon=True).start()  # keep the pipe drained
            return server, line.split()[1]
    raise RuntimeError(f"the server exited with {server.wait()} before it was ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--profile", help="config profile for the server this script starts")
    parser.add_argument("-n", type=int, default=30, help="requests per measurement (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="mmapp-bench-") as tmp:
        tmp = Path(tmp)
        server, url = (None, args.url) if args.url else start_server(args, tmp)
        try:
            report = run_benchmark(url, args.n, tmp)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    import platform

    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.json:
        print(json.dumps({"device": device, "report": report}))
    else:
        print_report(report, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
