"""Load test of a running app (issue 13 item 4): raters as Locust users, through the app's real Gradio API.

Each simulated rater is one ``gradio_client`` session (the same queue join + event stream the page
uses, so the latency is what a person at the page waits for: upload + queue + handler + response),
and its session state carries the last prediction to the rating, as in the browser. Plain
``/gradio_api/call/...`` would not: it has no session, so ``/rate_caption`` would have nothing to rate.

User classes (pick them on the command line):
* ``Rater``        realistic: 5-20 s think time; a photo -> caption -> rating (sometimes a correction),
                   or, one time in four, a meme -> label + rating.
* ``StressRater``  no think time: photo -> caption -> rating, back to back (issue 13's 50-client test).
* ``RestStressRater`` the same through the REST API (``POST /api/v1/caption`` then ``POST /api/v1/ratings``,
                   plain HTTP, no Gradio session): what an annotation script or a load-balanced client does.
* ``RetrainTrigger`` one operator (``fixed_count = 1``): logs in with ``POST /auth/login`` and the
                   operator password (``MMAPP_OPERATOR_USER``/``MMAPP_OPERATOR_PASSWORD``), presses
                   "Retrain now" (``/retrain_now``) ``LOCUST_RETRAIN_AFTER_S`` (10) seconds in, then polls
                   ``/retrain_status`` every 5 s. The web process does not train; the retrain worker does.

    locust -f benchmarks/locustfile.py --headless -u 10 -r 2 -t 60s --host http://127.0.0.1:P Rater
    locust -f benchmarks/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:P StressRater
    locust -f benchmarks/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:P RestStressRater
    locust -f benchmarks/locustfile.py --headless -u 51 -r 10 -t 60s --host http://127.0.0.1:P StressRater RetrainTrigger

Every request is a Locust stat (type ``gradio``, name = the API route); a caption+rating pair is also
recorded as ``pair caption+rating`` (and ``pair meme+label``). At the end it prints pairs/s and
p50/p95 per endpoint. Every photo and meme is new to the server (a few pixels nudged, as in
``benchmarks/latency.py``), so the image tower and OCR run on every upload, as for real uploads.

The server's per-client rate limits (docs/security.md) would throttle one load-generating address:
start it with them lifted, e.g. ``MMAPP__APP__UPLOADS_PER_MINUTE=1e6 MMAPP__APP__UPLOAD_BURST=1000000
MMAPP__APP__UPLOADS_PER_DAY=0 MMAPP__APP__EVENTS_PER_MINUTE=1e6 MMAPP__APP__EVENT_BURST=1000000``.
"""
from __future__ import annotations

import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Locust runs users as gevent greenlets and has already monkey-patched the standard library, which
# removes select.epoll; trio (installed here, unused by gradio_client) needs it at import, and httpcore
# imports trio when it can. Hide trio from this process so httpcore falls back to its threading locks.
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
import httpcore  # noqa: E402,F401 - httpx imports it lazily: import it once here, not in two greenlets at once
import httpx  # noqa: E402,F401
from gradio_client import Client, handle_file  # noqa: E402
from locust import FastHttpUser, User, between, constant, events, task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from latency import photo_paths, unique_meme, unique_variant  # noqa: E402

SESSION_COOKIE = "mmapp_session"  # app.SESSION_COOKIE (importing app would load Gradio and the models here)
PAIR_CAPTION = "pair caption+rating"
PAIR_MEME = "pair meme+label"
MEME_LABELS = ("positive", "sarcastic", "dark humor")  # config.data.meme_labels
CORRECTIONS = ("a photo of a cup of coffee on a table", "a cat sitting on a rug", "a city street at night")

_work = Path(tempfile.mkdtemp(prefix="locust-mmapp-"))
_counter = itertools.count()


def new_photo() -> Path:
    """A photo the server has never seen: made on demand (about 10 ms of the load generator's CPU)."""
    n = next(_counter)
    photos = photo_paths()
    return unique_variant(photos[n % len(photos)], n, _work)


def new_meme() -> Path:
    n = next(_counter)
    photos = photo_paths()
    return unique_meme(photos[n % len(photos)], n, _work)


class GradioUser(User):
    """One rater = one gradio_client session; every call is timed and reported to Locust."""

    abstract = True
    cookie: str | None = None

    def on_start(self) -> None:
        extra = {"httpx_kwargs": {"cookies": {SESSION_COOKIE: self.cookie}}} if self.cookie else {}
        started = time.perf_counter()
        exception = None
        try:
            self.client = Client(self.host.rstrip("/") + "/", verbose=False, download_files=False,
                                 analytics_enabled=False, **extra)
        except Exception as exc:  # noqa: BLE001 - reported to Locust, then the user stops
            exception = exc
        self.environment.events.request.fire(request_type="gradio", name="connect (config + api info)",
                                             response_time=(time.perf_counter() - started) * 1e3,
                                             response_length=0, exception=exception, context={})
        if exception is not None:
            raise exception

    def call(self, api_name: str, *args):
        """``client.predict`` timed as one Locust request; returns None (and records the error) on failure."""
        started = time.perf_counter()
        result, exception = None, None
        try:
            result = self.client.predict(*args, api_name=api_name)
        except Exception as exc:  # noqa: BLE001 - an app error or a transport error: a failed request
            exception = exc
        self.environment.events.request.fire(request_type="gradio", name=api_name,
                                             response_time=(time.perf_counter() - started) * 1e3,
                                             response_length=0, exception=exception, context={})
        return result

    def pair(self, name: str, started: float, ok: bool) -> None:
        self.environment.events.request.fire(request_type="pair", name=name,
                                             response_time=(time.perf_counter() - started) * 1e3,
                                             response_length=0,
                                             exception=None if ok else RuntimeError(f"{name} failed"), context={})

    def caption_and_rate(self) -> None:
        started = time.perf_counter()
        outputs = self.call("/caption", handle_file(str(new_photo())), "")
        if outputs is None:
            return self.pair(PAIR_CAPTION, started, False)
        caption = outputs[4]["caption"]
        correction = random.choice(CORRECTIONS) if random.random() < 0.3 else caption  # unchanged = no correction
        status = self.call("/rate_caption", random.randint(1, 5), random.randint(1, 5), random.randint(1, 5),
                           correction, "", "")
        self.pair(PAIR_CAPTION, started, status is not None)

    def meme_and_label(self) -> None:
        started = time.perf_counter()
        outputs = self.call("/analyze_meme", handle_file(str(new_meme())), True, True, "")
        if outputs is None:
            return self.pair(PAIR_MEME, started, False)
        details = outputs[5]
        status = self.call("/rate_meme", random.randint(1, 5), random.randint(1, 5), random.randint(1, 5),
                           details.get("ocr_text", ""), random.choice(MEME_LABELS), "", "")
        self.pair(PAIR_MEME, started, status is not None)


class Rater(GradioUser):
    """Realistic: looks at the result and decides for 5-20 s between actions."""

    wait_time = between(5, 20)

    @task(3)
    def photo(self) -> None:
        self.caption_and_rate()

    @task(1)
    def meme(self) -> None:
        self.meme_and_label()


class StressRater(GradioUser):
    """No think time: caption + rating back to back, as in issue 13's 50-client measurement."""

    wait_time = constant(0)

    @task
    def photo(self) -> None:
        self.caption_and_rate()


def multipart(fields: dict[str, str], file_field: str, path: Path, content_type: str) -> tuple[bytes, str]:
    """A multipart/form-data body (Locust's fast HTTP client has no ``files=``): bytes and Content-Type."""
    boundary = f"mmapp{random.getrandbits(64):016x}"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{path.name}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class RestStressRater(FastHttpUser):
    """No think time, through the REST API: caption + rating back to back (stateless, no Gradio session),
    and in 30 % of pairs a corrected caption as well, as ``StressRater`` sends with its rating."""

    wait_time = constant(0)

    @task
    def photo(self) -> None:
        started = time.perf_counter()
        body, content_type = multipart({}, "image", new_photo(), "image/jpeg")
        ok = False
        with self.client.post("/api/v1/caption", data=body, headers={"Content-Type": content_type},
                              name="/api/v1/caption", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            else:
                item = response.json()
        if response.status_code == 200:
            rating = {"item_id": item["item_id"], "item_key": item["item_key"],
                      **{k: random.randint(1, 5) for k in ("coherence", "relevance", "detail")}}
            with self.client.post("/api/v1/ratings", json=rating, name="/api/v1/ratings",
                                  catch_response=True) as rated:
                ok = rated.status_code == 200
                if not ok:
                    rated.failure(f"{rated.status_code}: {rated.text[:200]}")
            if ok and random.random() < 0.3:
                correction = {"item_id": item["item_id"], "item_key": item["item_key"], "field": "caption",
                              "value": random.choice(CORRECTIONS)}
                with self.client.post("/api/v1/corrections", json=correction, name="/api/v1/corrections",
                                      catch_response=True) as corrected:
                    ok = corrected.status_code == 200
                    if not ok:
                        corrected.failure(f"{corrected.status_code}: {corrected.text[:200]}")
        self.environment.events.request.fire(request_type="pair", name=PAIR_CAPTION,
                                             response_time=(time.perf_counter() - started) * 1e3, response_length=0,
                                             exception=None if ok else RuntimeError("pair failed"), context={})


class RetrainTrigger(GradioUser):
    """The operator who presses "Retrain now" once, then watches the status."""

    fixed_count = 1
    wait_time = constant(5)

    def on_start(self) -> None:
        user, password = os.environ.get("MMAPP_OPERATOR_USER", ""), os.environ.get("MMAPP_OPERATOR_PASSWORD", "")
        if not (user and password):
            raise RuntimeError("RetrainTrigger needs MMAPP_OPERATOR_USER and MMAPP_OPERATOR_PASSWORD")
        response = httpx.post(f"{self.host.rstrip('/')}/auth/login", json={"user": user, "password": password},
                              timeout=60)
        response.raise_for_status()
        self.cookie = response.cookies[SESSION_COOKIE]
        super().on_start()
        self.call("/operator_login", user, "200")  # opens the operator panel in this session, as the page does
        self.started = time.monotonic()
        self.triggered = False

    @task
    def retrain(self) -> None:
        if not self.triggered and time.monotonic() - self.started >= float(os.environ.get("LOCUST_RETRAIN_AFTER_S", 10)):
            outputs = self.call("/retrain_now")
            self.triggered = True
            if outputs is not None:
                print(f"[retrain_now] {outputs[0]}", flush=True)
        elif self.triggered:
            outputs = self.call("/retrain_status")
            if outputs is not None:
                self.environment.retrain_status = outputs[0]


PAIRS_FILE_ENV = "MMAPP_LOCUST_PAIRS"  # benchmarks/replicas.py: every pair appended to this file, to merge processes


@events.request.add_listener
def record_pair(request_type, name, response_time, exception, **_kwargs) -> None:
    """With ``MMAPP_LOCUST_PAIRS`` set, append ``time<TAB>name<TAB>ms<TAB>ok`` for each pair, so several Locust
    processes (one per replica) can be merged into one pairs/s and one p50/p95 (benchmarks/replicas.py)."""
    path = os.environ.get(PAIRS_FILE_ENV)
    if path and request_type == "pair":
        with open(path, "a") as fh:
            fh.write(f"{time.time():.3f}\t{name}\t{response_time:.1f}\t{int(exception is None)}\n")


@events.test_stop.add_listener
def report(environment, **_kwargs) -> None:
    """pairs/s and p50/p95 per endpoint (Locust's own table rounds percentiles to its buckets)."""
    stats = environment.stats
    elapsed = max(time.time() - stats.total.start_time, 1e-9)
    print(f"\n=== mmapp load test: {elapsed:.1f} s, users {getattr(environment.parsed_options, 'num_users', '?')}")
    for entry in sorted(stats.entries.values(), key=lambda e: (e.method, e.name)):
        if not entry.num_requests:
            continue
        print(f"{entry.method:6s} {entry.name:32s} n={entry.num_requests:5d} fail={entry.num_failures:4d} "
              f"p50={entry.get_response_time_percentile(0.5):7.0f} ms p95={entry.get_response_time_percentile(0.95):7.0f} ms "
              f"max={entry.max_response_time:7.0f} ms  {entry.num_requests / elapsed:6.2f}/s")
    for name in (PAIR_CAPTION, PAIR_MEME):
        entry = stats.entries.get((name, "pair"))
        if entry and entry.num_requests:
            ok = entry.num_requests - entry.num_failures
            print(f"{name}: {ok / elapsed:.2f} completed/s ({ok} ok, {entry.num_failures} failed in {elapsed:.1f} s)")
    status = getattr(environment, "retrain_status", None)
    if status:
        print("last /retrain_status:\n" + status[:600])

