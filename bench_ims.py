#!/usr/bin/env python3
"""Measure IMS, and with --vs the Flask service it replaces, side by side in one run.

Usage:

    python3 bench_ims.py [--vs] [--baseline PATH] [--only SCENARIO ...] [--repeat N] [--json FILE]

It starts the servers itself as subprocesses on free ports, each with a temporary storage folder
holding the same 100 images, runs the scenarios against them in turn, prints one table and stops
them (SIGTERM, then SIGKILL) whatever happens. Scenarios, in the order they run:

    idle-rss    memory once idle after start-up and one GET /, MiB: RSS of the server process alone,
                then of its whole tree (server, forkserver, resource tracker) as RSS summed and as
                PSS summed (/proc/PID/smaps_rollup: a page shared by n processes counts 1/n in each);
                the notes give each process's RSS and PSS
    list        wrk -t2 -c8 -d5s on GET / with 100 names, requests/s
    small-get   wrk on GET of a 20 KB JPEG, requests/s
    big-get     wrk on GET of a 3 MB photo, MB/s
    upload-rss  peak growth of the server's resident memory during one 15 MB upload, MiB
    upload      `curl -F file=@photo.jpeg` as a user types it (Expect: 100-continue), ms each
    upload-4    4 such curl uploads at once, uploads/s, and the server's CPU time per upload (its
                tree's user + system time, /proc/PID/stat), beside curl's own in the notes
    resize      a 12-megapixel photo resized to 300x300 end to end, ms, beside `vipsthumbnail`
                as a command and Pillow's best in-process path, one run of each in turn (wall time);
                with --baseline, the target is at most 1.1x the time before
    resize-8    8 photos resized at once, photos/s, beside 8 best Pillow resizes on all CPUs
    first-resize
                the first resize after a fresh start (GET /, then wait until the tree uses no CPU)
                against a later one on the same server, end to end, ms, and their ratio; median of
                --repeat fresh starts of each server
    rendition-get
                a cached rendition (?width=300&quality=75 of the 12-megapixel photo, ~21 KB, warmed
                first) against the 20 KB JPEG of small-get, wrk -t2 -c8 -d5s on each, --repeat
                runs (at least 5) interleaved, req/s and their ratio (target >= 0.9), and the
                server's CPU time per request (its tree, /proc/PID/stat)
    rendition-cold
                a cold rendition, GET ?width=300&height=300 of a copy of a ../shared/photos/ photo
                uploaded just before (a new version, so nothing is cached), end to end, ms, beside a
                PATCH of another fresh copy to 300x300 then GET /jobs/<id>?wait=, `vipsthumbnail -s
                300x300` of the same photo as a command, and nginx's image_filter resizing it on the
                fly (when the module is installed: libnginx-mod-http-image-filter); photos in turn,
                the order rotated each run, medians and their ratios (targets: <= 1.1x the PATCH,
                <= 0.6x vipsthumbnail)
    rendition-crowd
                50 identical cold GETs at once (a fresh upload each round, 50 connections opened
                first), until the last answer, against one cold GET alone, median of --repeat
                rounds (at least 5) interleaved, and their ratio (target <= 1.3); beside them the
                same 50 GETs again once cached, what answering 50 at once costs with nothing to
                render; renders counted as the resize processes seen in /proc (and the reaped
                children's CPU time against one render's); every answer must be 200 with the same
                bytes
    rendition-burst
                200 different sizes of one fresh upload at once (?width=100 to 299, a connection
                each), --resize-workers = CPUs: the time until the last answer, the answers by
                status (each 200 of the width asked, or 503 with Retry-After), the peak count of
                the server's live descendants (must stay <= --resize-workers), and the CPU time of
                the server's threads and of its resize processes, per request; beside it, in turn
                each round, the same 200 widths asked by CPUs clients one after another, so that
                none waits for a slot; median of --repeat rounds
    page        the page for people (issue 11) over a folder of 1000 made JPEGs (about 640x480) and
                the ../shared/photos/ photos among the first tiles, each round on fresh servers over
                a new folder of hard links to them: the server's time for the HTML GET / sends a
                browser (Chromium's Accept, request to last byte), the first after a fresh start
                (each tile's size read from its image's header) and again, and the same of
                ?limit=1000, ms and bytes; then, in headless Chromium (selenium, a 1280x900 window),
                the time from navigation start until every thumbnail of the first screen (those
                intersecting the viewport) is painted (the Element Timing API; img.decode(), the
                load events, resource and navigation timings beside it), cold (a fresh IMS, nothing
                rendered, a fresh profile) and warm (reloads in the same browser, each thumbnail
                request of which must be answered 304, by the server's log, or come from the
                browser's cache, by the Performance API), with the counts and console errors;
                median of --repeat rounds (at least 3), 3 reloads a round
    soak        20,000 mixed requests from 4 threads (keep-alive and not, successes and errors,
                malformed requests on raw sockets, uploads, deletes, resizes waited for with
                ?wait=): requests/s, and the server's threads, open fds and RSS before (after a
                400-request warm-up) and after (once its threads are back to the count before)
    slow-clients
                GET / latency over a new connection each, p50 and p99, while 200 sockets trickle
                a request head a byte every 0.5 s for 10 s; beside the same without them
    patch-burst 1000 PATCHes as fast as 8 keep-alive clients send them, --resize-workers = CPUs and
                --max-queue 256: each answer's latency (p50, p99), how many are accepted and refused
                (every answer must be 202 or 503), and the peak count of the server's live
                descendant processes, from /proc/*/stat sampled every ~2 ms; medians of --repeat
                bursts, each on a fresh server, and with --baseline the same of the IMS before
    workers     `--workers 2` against `--workers 1`, each on a storage of its own: wrk -t2 -c16 on
                GET / and on the 20 KB JPEG for 3 s, --repeat runs (at least 5) interleaved, req/s
                and their ratio; the notes give the cores the server's tree and wrk kept busy and
                the CPU split over the two workers (SO_REUSEPORT must spread the connections);
                beside them, as a reference, --workers 1 pinned to one CPU (one process's threads
                handing the GIL across two cores can be several times slower than on one)
    nginx       3 instances on one folder behind nginx (round robin, keepalive 32, HTTP/1.1 to
                them, proxy_request_buffering off), against one instance direct and against nginx
                serving the folder itself (GET / as autoindex JSON): wrk -t2 -c16 on GET / and the
                20 KB JPEG for 3 s, --repeat runs (at least 5) interleaved, req/s and ratios
    nginx-resize
                16 photos (../shared/photos/ in turn, uploaded first) PATCHed to 300x300 at once
                through that nginx, against one instance direct: seconds until every job has
                ended, each client waiting with GET /jobs/<id>?wait=60; median of --repeat runs
    gluster     that nginx's 3 instances on one local folder against 3 instances each on its own
                FUSE mount of one GlusterFS volume (as on 3 hosts; one brick, made, mounted, then
                unmounted and deleted by the bench), both seeded with the same 100 names: GET / and
                the 20 KB JPEG as nginx does them, req/s, and 4 curl uploads of a 3 MB photo at once
                (as upload-4), uploads/s, median of 10 rounds, interleaved, with ratios and the CPU
                per request of IMS and of the volume's brick and clients; then, in this process,
                what revalidation costs one request: Store.listing() of 100 and 1000 names on local
                disk with the folder's mtime trusted and re-read (as on a network filesystem), and
                on the volume; Store.open + close (its 12-byte read included) against os.open +
                fstat + close, on local disk and on the volume (timeit, µs). Needs root and /dev/fuse;
                starts glusterd only when none runs, and then stops that one
    health      /healthz and /metrics (issue 12) under load, on a fresh IMS over 100 copies of the 20 KB
                JPEG: while wrk -t2 -c8 asks GET / and the JPEG in turn (a Lua script), one client GETs
                /healthz 2,000 times over 10 s, a new connection each and one kept alive in turn: p50,
                p99 (target < 20 ms) and max of each, ms; then /metrics the same way (1,000 times) and
                its size in bytes; then both again while 8 resize jobs stay queued or running (8 of the
                names replaced by uploads of the 12-megapixel ../shared/photos/ photos, each PATCHed
                to about 12 megapixels again as soon as its job ends), beside how long a job takes
                from its 202 to its end (what a request queued behind them would wait); the notes
                give /healthz with no load, wrk's req/s and the cores the server and other
                processes kept busy in each window, and where the server's own histogram
                (ims_http_request_duration_seconds) puts the same requests; last, the server's CPU per
                /healthz and per /metrics with no load
    metrics-cost
                what counting and JSON logs cost small GETs: three IMS (metrics on, --metrics off,
                --log-format json), each logging to a file, wrk -t2 -c8 -d5s on the 20 KB JPEG, --repeat
                rounds (at least 5), each round the three in turn, unpinned and then (or first) with the
                servers held to CPU 0 and wrk to CPU 1: req/s, the server's CPU time per request, and
                the ratios on / off (target >= 0.97, in req/s and in CPU per request) and json / common;
                then Metrics.count_request timed in this process (timeit), on and disabled, and its
                share of the server's CPU per request (target <= 3 %), which wrk cannot resolve here

rendition-get and rendition-cold measure the IMS servers that render (with --baseline, the IMS
before too when it has renditions; the seed never renders, and a server that answers a rendition
with the original is noted, not measured); rendition-crowd and rendition-burst run on fresh servers
of their own, IMS and with --baseline the IMS before. page measures IMS only, on fresh servers of
its own. soak, slow-clients, patch-burst and the
scaling and issue 12 scenarios after them measure IMS only (patch-burst also the IMS before with --baseline),
each on fresh servers of their own (the other columns say n/a). nginx's config, pid, error log and
temporary files are in the scratch folder; it runs as root's user when the bench runs as root, so
its workers can read the storage.

--repeat N (default 3) is the number of runs of each wrk scenario (median), of 15 MB uploads
(largest growth), of resize-8 rounds (median), of fresh starts for first-resize, of PATCH bursts,
of nginx-resize rounds, of rendition-crowd, rendition-burst, page and metrics-cost rounds (median); upload, upload-4,
resize and rendition-cold have their own series. "IMS vs seed" is a factor where above 1 means IMS
is better, whatever the unit.

--baseline PATH also runs another ims.py (say `git show HEAD~1:ims.py` saved somewhere) as the
column "before", on its own copy of the storage, for idle-rss through the rendition scenarios and
for patch-burst, so a change is measured against the code before it in one run; "IMS vs before" is
a factor like the seed's.

Below the table, a line tells how many cores processes outside the bench kept busy during each
scenario (the machine's busy time in /proc/stat less the bench's own tree): a test suite running
meanwhile moves the wrk figures by 2x, so a figure taken beside one is not to be trusted.

--vs also runs ../shared/peers/flask_seed.py, with a private virtualenv in ~/.cache/ims-bench-venv
(Flask, Flask-RESTful, Pillow) created on first use. Needs wrk, curl, vipsthumbnail, nginx
(Debian: apt-get install -y nginx-light) and for gluster glusterd, gluster and mount.glusterfs
(glusterfs-server, glusterfs-client); a scenario whose tool is missing is skipped with a
message. rendition-cold's nginx image_filter reference needs nginx and its module (Debian:
libnginx-mod-http-image-filter); without them that row says so and the rest is measured. page's
browser rows need selenium (requirements-dev.txt) and Chromium with its driver at
/usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium, chromium-driver); without them a row
says so and the HTML is measured. Photos are read from ../shared/photos/.
Standard library only, plus Pillow imported where images are made or resized, and selenium where
the page is opened in Chromium.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import http.client
import importlib.util
import io
import json
import math
import multiprocessing
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import traceback
import types
import urllib.parse
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMS_SCRIPT = HERE / "ims.py"
SHARED = HERE.parent / "shared"
SEED_SCRIPT = SHARED / "peers" / "flask_seed.py"
BIG_PHOTO = SHARED / "photos" / "IMG_X.jpeg"  # 3.0 MB, 4032x3024, EXIF orientation 6
SEED_VENV = Path.home() / ".cache" / "ims-bench-venv"
SEED_PACKAGES = ["flask", "flask-restful", "pillow"]

STARTUP_LINE = re.compile(r"IMS serving .* on http://(\S+):(\d+)")
STARTUP_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10
# A forkserver and a resource tracker notice their parent is gone within a few milliseconds.
LEFTOVER_GRACE_SECONDS = 2
# A server tree is idle once it has used no CPU (in 10 ms clock ticks) for this long.
IDLE_QUIET_SECONDS = 0.25
# The contract's ?wait= limit is 60 s; 30 s keeps each request well inside the client timeout.
JOB_WAIT_SECONDS = 30
RESIZE_DEADLINE_SECONDS = 120

WRK_ARGUMENTS = ["-t2", "-c8", "-d5s"]
LIST_NAMES = 100
SMALL_IMAGE_BYTES = 20_000
# A 24-bit BMP of 15,000,054 bytes: under the contract's 16,000,000-byte body with the framing.
LARGE_UPLOAD_SIZE = (2500, 2000)
UPLOAD_RUNS = 20
PARALLEL_UPLOADS = 4
PARALLEL_UPLOAD_ROUNDS = 10
RESIZE_RUNS = 10
RESIZE_SIZE = (300, 300)
# Issue 9: writing durable job records may slow one resize end to end by 10 % at most.
RESIZE_MAX_VERSUS_BEFORE = 1.1
PARALLEL_RESIZES = 8
FIRST_RESIZE_LATER = 2  # later resizes on each fresh server, after its first
# Robustness scenarios (issue 5), each on a fresh IMS.
CLIENT_TIMEOUT_SECONDS = 10
SETTLE_SECONDS = 10  # for the server's threads to end once its connections have closed
SOAK_REQUESTS = 20_000
SOAK_CLIENTS = 4
SOAK_WARMUP_REQUESTS = 400
SOAK_SECONDS = 30
SOAK_MAX_FD_GROWTH = 2
SOAK_MAX_RSS_GROWTH_MB = 10
SLOW_SOCKETS = 200
SLOW_BYTE_INTERVAL_SECONDS = 0.5
SLOW_SECONDS = 10
SLOW_PROBES = 200  # GET / on a new connection each, spread over the slow period
SLOW_MAX_P99_MS = 1000
BURST_PATCHES = 1000
BURST_CLIENTS = 8
BURST_IMAGES = 4
BURST_MAX_QUEUE = 256
BURST_SAMPLE_SECONDS = 0.002
BURST_DRAIN_SECONDS = 30
BURST_MAX_P99_MS = 50  # issue 9: durable job records must not slow the answer to a PATCH
# Scaling scenarios (issue 9): enough connections that SO_REUSEPORT and nginx spread them.
SCALE_WRK_ARGUMENTS = ["-t2", "-c16", "-d3s"]
# One process's req/s under -c16 is bimodal on 2 CPUs (about 5,000 or 14,000 small GETs a run, as
# its threads hand the GIL across cores or not): more, shorter runs make the median hold.
SCALE_MIN_RUNS = 5
WORKERS_MIN_FACTOR = 1.6
CLUSTER_INSTANCES = 3
SPREAD_PHOTOS = 16
SPREAD_JOB_WAIT_SECONDS = 60  # the contract's longest ?wait=
# Extra descendants allowed beside the resize workers: multiprocessing's forkserver and resource tracker.
BURST_HELPER_PROCESSES = 2
# Renditions (issue 10): GET /<name>?width=&height=&fit=&format=&quality= renders in a resize
# process once, then serves the cached file by sendfile like an original.
RENDITION_THUMB_QUERY = "width=300&quality=75"  # of BIG_PHOTO: 300x400, ~21 KB, beside the 20 KB JPEG
RENDITION_GET_MIN_RUNS = 5
RENDITION_GET_MIN_FACTOR = 0.9  # a cached rendition served at least 0.9x as often as an original
RENDITION_COLD_QUERY = "width={}&height={}".format(*RESIZE_SIZE)
RENDITION_MAX_VERSUS_PATCH = 1.1
RENDITION_MAX_VERSUS_VIPS = 0.6
RENDITION_CLIENT_TIMEOUT_SECONDS = 120  # a render may wait --resize-timeout (60 s) for a slot, then run
READ_SIZE = 256 * 1024
CROWD_REQUESTS = 50
CROWD_MIN_ROUNDS = 5
CROWD_MAX_VERSUS_ONE = 1.3
SIZES_REQUESTS = 200
SIZES_FIRST_WIDTH = 100
# A render of a 12-megapixel JPEG lives 40 ms or more: sampling every 5 ms sees each one.
RENDITION_SAMPLE_SECONDS = 0.005
IMAGE_FILTER_MODULE = Path("/usr/lib/nginx/modules/ngx_http_image_filter_module.so")
# The page for people (issue 11): a folder of PAGE_IMAGES JPEGs about 640x480, and the shared photos.
PAGE_IMAGES = 1000
PAGE_BASE_SIZE = (1024, 768)  # each JPEG is a window of this noisy gradient
PAGE_IMAGE_SIZES = ((480, 800), (360, 640))  # the range of the windows' widths, and of their heights
PAGE_IMAGE_QUALITY = 80
PAGE_PHOTO_POSITIONS = (1, 5, 9)  # the photos sort right after these names, among the first screen's tiles
PAGE_TILES = 100  # the tiles of GET / without ?limit= (ims.py's PAGE_SIZE)
PAGE_LARGE_LIMIT = 1000
PAGE_HTML_RUNS = 10  # GETs of each page again after its first, on each fresh server
PAGE_MIN_ROUNDS = 3  # cold loads in the browser, each on a fresh IMS and a fresh profile
PAGE_RELOADS = 3  # warm reloads after each cold load, in the same browser
PAGE_DONE_TIMEOUT_SECONDS = 120
PAGE_QUIET_SECONDS = 0.5  # the server's log unchanged this long: the page asks for nothing more
# Chromium's Accept for a navigation.
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
THUMBNAIL_MARK = "&fit=contain&format=webp&v="  # in every thumbnail's URL, 1x and 2x
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_OPTIONS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
PAGE_WINDOW = (1280, 900)
# A request line in the server's log (http.server's format): "GET /path HTTP/1.1" 304 -
LOG_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ')
# The gluster scenario. The mount options the README's "Several hosts" and ims.py's start-up check
# ask for; md-cache (stat-prefetch) and quick-read would cache attributes and small files in each
# client past what those turn off.
GLUSTER_MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0"
GLUSTER_VOLUME_OPTIONS = {"performance.stat-prefetch": "off", "performance.quick-read": "off"}
GLUSTER_COMMAND_TIMEOUT_SECONDS = 60
GLUSTERD_PORT = 24007  # its management port; the bench talks to it through the gluster command
REVALIDATE_NAMES = (100, 1000)  # names in the local folders whose listing is timed in-process
TIMEIT_BATCHES = 11


class BenchError(Exception):
    """A measurement that could not be made; its message goes into the table's notes."""


# ==========================================================================================
# Servers
# ==========================================================================================
# Owns the server processes: starting them on free ports, reading their memory, stopping them.
# It never measures speed itself.


@dataclasses.dataclass
class Server:
    """One running server process and the storage folder it serves."""

    kind: str  # "ims", "before" (--baseline) or "seed"
    process: subprocess.Popen
    host: str
    port: int
    storage: Path
    names_used: int = 0

    def fresh_name(self, prefix: str, extension: str = ".jpeg") -> str:
        """Return an image name never used before on this server."""
        self.names_used += 1
        return f"{prefix}{self.names_used:03d}{extension}"

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=JOB_WAIT_SECONDS + 30)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def check_alive(self) -> None:
        """Raise BenchError when the server process has exited."""
        status = self.process.poll()
        if status is not None:
            raise BenchError(f"{self.kind} exited with status {status}")

    def stop(self) -> list[str]:
        """Stop the server (SIGTERM, then SIGKILL) and whatever it left; return what went wrong."""
        problems = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.kind} still ran {STOP_TIMEOUT_SECONDS} s after SIGTERM; killed")
                self.process.kill()
                self.process.wait()
            else:
                if self.kind != "seed" and self.process.returncode != 0:
                    problems.append(f"{self.kind} exited with status {self.process.returncode} after SIGTERM")
        deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
        leftovers = processes_in_group(self.process.pid)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.05)
            leftovers = processes_in_group(self.process.pid)
        if leftovers and self.kind != "seed":
            problems.append(f"{self.kind} left {len(leftovers)} process(es) running "
                            f"{LEFTOVER_GRACE_SECONDS} s after it stopped")
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return problems


def processes_in_group(group_id: int) -> list[int]:
    """Return the ids of the live processes in a process group (each server starts its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name in field 2 may hold spaces and parentheses: split after its end.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group_id and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ims(storage: Path, scratch: Path, options: list[str] = (), label: str = "ims",
              script: Path = IMS_SCRIPT, kind: str = "ims", cpus: set[int] | None = None,
              log: Path | None = None) -> Server:
    """Run `ims.py --port 0` (plus options) and read the port from its start-up line.

    cpus, when given, pins the server and everything it starts to those CPUs (as taskset does).
    log, when given, is the file its standard error goes to (a line per request); else it is dropped.
    """
    if not script.exists():
        raise BenchError(f"{script} does not exist")
    stdout_path = scratch / f"{label}-stdout.txt"
    with open(stdout_path, "wb") as stdout, \
            (open(log, "wb") if log else contextlib.nullcontext(subprocess.DEVNULL)) as stderr:
        process = subprocess.Popen(
            [sys.executable, str(script), "--port", "0", "--storage", str(storage), *options],
            stdout=stdout, stderr=stderr, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        match = STARTUP_LINE.search(stdout_path.read_text(errors="replace"))
        if match:
            return Server(kind, process, match.group(1), int(match.group(2)), storage)
        if process.poll() is not None:
            raise BenchError(f"ims.py exited with status {process.returncode} before serving; "
                             "run it by hand to see why")
        time.sleep(0.02)
    process.kill()
    raise BenchError(f"ims.py printed no start-up line within {STARTUP_TIMEOUT_SECONDS} s")


def seed_python() -> Path:
    """Return the private virtualenv's python for the seed, creating the virtualenv if needed."""
    python = SEED_VENV / "bin" / "python"
    probe = [str(python), "-c", "import flask, flask_restful, PIL"]
    if python.exists() and subprocess.run(probe, stderr=subprocess.DEVNULL, check=False).returncode == 0:
        return python
    progress(f"creating {SEED_VENV} with {' '.join(SEED_PACKAGES)} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(SEED_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *SEED_PACKAGES], check=True)
    return python


def start_seed(storage: Path) -> Server:
    """Run the Flask seed on a free port and wait until it accepts a connection."""
    port = free_port()
    process = subprocess.Popen(
        [str(seed_python()), str(SEED_SCRIPT), "--port", str(port), "--storage", str(storage)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Server("seed", process, "127.0.0.1", port, storage)
        if process.poll() is not None:
            raise BenchError(f"flask_seed.py exited with status {process.returncode} before serving")
        time.sleep(0.05)
    process.kill()
    raise BenchError(f"flask_seed.py did not accept connections within {STARTUP_TIMEOUT_SECONDS} s")


# The load balancer of the README's "Behind nginx": round robin over the instances, keep-alive
# connections to them, bodies streamed as they come (uploads are not spooled to disk first), the
# contract's upload limit, and time for a ?wait= of 60 s. A second server block serves the storage
# folder itself as static files, the fastest anyone could read it.
NGINX_CONFIG = """\
{user}worker_processes auto;
pid {prefix}/nginx.pid;
events {{
    worker_connections 1024;
}}
http {{
{mime_types}    access_log off;
    client_body_temp_path {prefix}/client-body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream ims {{
{upstream_servers}        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        client_max_body_size 16000000;
        location / {{
            proxy_pass http://ims;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_read_timeout 90s;
        }}
    }}
    server {{
        listen 127.0.0.1:{static_port};
        location / {{
            root {storage};
            autoindex on;
            autoindex_format json;
        }}
    }}
}}
"""
NGINX_KEEPALIVE = 32
NGINX_MIME_TYPES = Path("/etc/nginx/mime.types")


def tool_path(name: str) -> str | None:
    """Return where a command is, looking in the sbin folders too (nginx is in /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


@dataclasses.dataclass
class NginxFront:
    """One nginx: proxy balances over IMS instances, static serves their folder; both share a process."""

    proxy: Server
    static: Server

    def stop(self) -> list[str]:
        return self.proxy.stop()


def start_nginx(prefix: Path, instances: list[Server], storage: Path) -> NginxFront:
    """Write a config under prefix (temp files, pid, error log there too) and run nginx in the foreground.

    Raises BenchError when nginx is missing, exits or does not listen within STARTUP_TIMEOUT_SECONDS.
    """
    nginx = tool_path("nginx")
    if nginx is None:
        raise BenchError("nginx is not installed (apt-get install -y nginx-light)")
    prefix.mkdir()
    proxy_port, static_port = free_port(), free_port()
    while static_port == proxy_port:
        static_port = free_port()
    config = NGINX_CONFIG.format(
        # As root, nginx's workers would run as nobody, who cannot read the private scratch folder.
        user="user root;\n" if os.geteuid() == 0 else "",
        prefix=prefix,
        mime_types=f"    include {NGINX_MIME_TYPES};\n" if NGINX_MIME_TYPES.exists() else "",
        upstream_servers="".join(f"        server {server.host}:{server.port};\n" for server in instances),
        keepalive=NGINX_KEEPALIVE, proxy_port=proxy_port, static_port=static_port, storage=storage)
    process = launch_nginx(nginx, prefix, config, [proxy_port, static_port], storage)
    return NginxFront(Server("nginx", process, "127.0.0.1", proxy_port, storage),
                      Server("nginx", process, "127.0.0.1", static_port, storage))


def launch_nginx(nginx: str, prefix: Path, config: str, ports: list[int], storage: Path) -> subprocess.Popen:
    """Write config as prefix/nginx.conf, run nginx in the foreground and wait until it listens on every port.

    Raises BenchError, with nginx stopped, when it exits or does not listen within STARTUP_TIMEOUT_SECONDS.
    """
    config_path = prefix / "nginx.conf"
    config_path.write_text(config)
    error_log = prefix / "error.log"
    with open(prefix / "output.txt", "wb") as output:
        process = subprocess.Popen(
            [nginx, "-p", str(prefix), "-c", str(config_path), "-e", str(error_log), "-g", "daemon off;"],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("nginx", process, "127.0.0.1", ports[0], storage)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = " ".join(path.read_text(errors="replace") for path in (prefix / "output.txt", error_log)
                            if path.exists()).strip()
            server.stop()
            raise BenchError(f"nginx exited with status {process.returncode}: {said[-300:]}")
        with contextlib.suppress(OSError):
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        time.sleep(0.05)
    server.stop()
    raise BenchError(f"nginx did not listen within {STARTUP_TIMEOUT_SECONDS} s")


# nginx resizing on the fly (ngx_http_image_filter_module, libgd), a reference for a cold rendition:
# GET /<photo>?width=W&height=H scales the photo to fit inside W x H, nothing cached. It decodes
# every pixel (no shrink-on-load) and ignores EXIF orientation.
IMAGE_FILTER_CONFIG = """\
{user}load_module {module};
worker_processes 1;
pid {prefix}/nginx.pid;
events {{
    worker_connections 64;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client-body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {photos};
        location / {{
            image_filter resize $arg_width $arg_height;
            image_filter_buffer 32M;
        }}
    }}
}}
"""


def start_image_filter(prefix: Path, photos: Path) -> Server:
    """Run nginx with the image_filter module on a free port, serving the photos folder resized on the fly.

    Raises BenchError when nginx or its module is missing, or nginx does not start.
    """
    nginx = tool_path("nginx")
    if nginx is None:
        raise BenchError("nginx is not installed (apt-get install -y nginx-light)")
    if not IMAGE_FILTER_MODULE.exists():
        raise BenchError(f"{IMAGE_FILTER_MODULE} is missing (apt-get install -y libnginx-mod-http-image-filter)")
    prefix.mkdir()
    port = free_port()
    config = IMAGE_FILTER_CONFIG.format(user="user root;\n" if os.geteuid() == 0 else "", module=IMAGE_FILTER_MODULE,
                                        prefix=prefix, port=port, photos=photos)
    return Server("nginx", launch_nginx(nginx, prefix, config, [port], photos), "127.0.0.1", port, photos)


def read_status_kib(pid: int, field: str) -> int:
    """Return a kB field of /proc/PID/status, such as VmRSS or VmHWM (or a count, such as Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


@dataclasses.dataclass
class ProcessStats:
    """What a process holds at one moment: threads, open file descriptors, resident memory."""

    threads: int
    fds: int
    rss_kib: int

    @property
    def rss_mb(self) -> float:
        return self.rss_kib * 1024 / 1e6


def process_stats(pid: int) -> ProcessStats:
    return ProcessStats(read_status_kib(pid, "Threads"), len(os.listdir(f"/proc/{pid}/fd")),
                        read_status_kib(pid, "VmRSS"))


def wait_for(predicate: Callable[[], bool], seconds: float, interval: float = 0.05) -> bool:
    """Poll predicate until it holds (True) or seconds have passed (False)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def descendant_depths(root: int) -> tuple[dict[int, int], int]:
    """Walk /proc/*/stat once; return ({pid: depth below root} of live descendants, zombie count).

    A child of root has depth 1, a grandchild depth 2. Zombies (exited, not yet reaped) are
    counted apart, not as descendants.
    """
    parents, zombies = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                data = file.read()
            # The command name in field 2 may hold spaces and parentheses: split after its end.
            fields = data.rsplit(b")", 1)[1].split()
            pid = int(entry)
            parents[pid] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if fields[0] == b"Z":
            zombies.add(pid)
    depths: dict[int, int | None] = {root: 0}
    for pid in parents:
        chain, current = [], pid
        while current not in depths and current in parents and len(chain) < 1000:
            chain.append(current)
            current = parents[current]
        base = depths.get(current)
        for offset, member in enumerate(reversed(chain), 1):
            depths[member] = None if base is None else base + offset
    found = {pid: depth for pid, depth in depths.items() if depth and pid not in zombies}
    return found, sum(1 for pid in zombies if depths.get(pid))


class DescendantSampler:
    """Context manager: a thread counts a process's live descendants every few milliseconds.

    peak is the largest count seen; peak_by_depth how many of those were children and
    grandchildren at that moment; peak_zombies the most exited-but-unreaped ones seen at once;
    seen every live descendant's id seen at all (how many resize processes ran).
    """

    def __init__(self, pid: int, interval: float):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_by_depth: dict[int, int] = {}
        self.peak_zombies = 0
        self.samples = 0
        self.seen: set[int] = set()
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self.sample)

    def __enter__(self):
        self.sampler.start()
        return self

    def sample(self) -> None:
        while not self.done.is_set():
            found, zombies = descendant_depths(self.pid)
            self.samples += 1
            self.seen.update(found)
            self.peak_zombies = max(self.peak_zombies, zombies)
            if len(found) > self.peak:
                self.peak = len(found)
                self.peak_by_depth = dict(collections.Counter(found.values()))
            time.sleep(self.interval)

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.sampler.join()


def descendants(pid: int) -> list[int]:
    """Return the ids of all processes below pid (such as a forkserver and its children)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in children.read_text().split():
                found.append(int(child))
                found.extend(descendants(int(child)))
    return found


def read_rollup_kib(pid: int) -> dict[str, int]:
    """Return the kB fields of /proc/PID/smaps_rollup: Rss, Pss (shared pages split among their users)..."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return {name: int(value.split()[0]) for name, _, value in (line.partition(":") for line in lines[1:])}


def process_role(pid: int) -> str:
    """Name what a server's descendant is from its command line: forkserver, resource tracker or child."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    for role in ("forkserver", "resource_tracker"):
        if role in command:
            return role.replace("_", " ")
    return "child"


def cpu_ticks(pids: list[int]) -> int:
    """Return the CPU time (user + system) that processes have used so far, in clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def tree_cpu_ticks(pid: int) -> int:
    """Return the CPU time a process and its descendants have used, reaped children's included, in ticks.

    A reaped child's time is in its parent's cutime and cstime (fields 16 and 17 of /proc/PID/stat),
    so resize processes that have ended still count.
    """
    total = 0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(field) for field in fields[11:15])
    return total


def children_of(pid: int) -> list[int]:
    """Return the ids of a process's children (the workers of an IMS started with --workers)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in children.read_text().split())
    return found


def own_cpu_seconds() -> float:
    """Return the CPU time (user + system) of this process's reaped children, such as wrk, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_ticks() -> int:
    """Return the CPU time all CPUs have spent on anything but idling and waiting for I/O, in ticks (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(field) for field in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


class OtherLoad:
    """How busy processes outside the bench kept the machine since this was made, in cores.

    The machine's busy time less the bench's own: this process, the servers, wrk, curl and the
    resize processes, live or reaped (tree_cpu_ticks of this process). A shared machine's other
    work (a test suite, another bench) weighs on every figure; this says how much there was.
    """

    def __init__(self):
        self.started = time.monotonic()
        self.machine = machine_busy_ticks()
        self.own = tree_cpu_ticks(os.getpid())

    def cores(self) -> float:
        other_ticks = (machine_busy_ticks() - self.machine) - (tree_cpu_ticks(os.getpid()) - self.own)
        seconds = max(time.monotonic() - self.started, 1e-9)
        return max(other_ticks, 0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_until_idle(pid: int) -> bool:
    """Wait until a process and its descendants use no CPU for IDLE_QUIET_SECONDS; False on time-out.

    A forkserver goes on importing its preloaded modules after the server has printed its start-up line.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    before = cpu_ticks([pid, *descendants(pid)])
    while time.monotonic() < deadline:
        time.sleep(IDLE_QUIET_SECONDS)
        now = cpu_ticks([pid, *descendants(pid)])
        if now == before:
            return True
        before = now
    return False


class PeakRssGrowth:
    """Context manager: how far a process's resident memory rose above its start, in growth_mib.

    A thread samples VmRSS every millisecond; VmHWM catches a peak between two samples when it
    is above every earlier peak of the process.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.growth_mib = 0.0
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self.sample)

    def __enter__(self):
        self.baseline_kib = read_status_kib(self.pid, "VmRSS")
        self.high_water_before_kib = read_status_kib(self.pid, "VmHWM")
        self.peak_kib = self.baseline_kib
        self.sampler.start()
        return self

    def sample(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError, BenchError):
                self.peak_kib = max(self.peak_kib, read_status_kib(self.pid, "VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.sampler.join()
        high_water_after_kib = read_status_kib(self.pid, "VmHWM")
        if high_water_after_kib > self.high_water_before_kib:
            self.peak_kib = max(self.peak_kib, high_water_after_kib)
        self.growth_mib = (self.peak_kib - self.baseline_kib) / 1024


# ==========================================================================================
# Images
# ==========================================================================================
# Makes the images the scenarios need and resizes the reference way; Pillow is imported here
# only, inside the functions, so the rest runs on the standard library.


def make_small_jpeg(path: Path) -> None:
    """Write a 200x200 photo-like JPEG (gradient plus noise) whose quality is tuned to ~20 KB."""
    from PIL import Image

    rng = random.Random(20240501)
    noise = Image.frombytes("RGB", (200, 200), bytes(rng.getrandbits(8) for _ in range(200 * 200 * 3)))
    gradient = Image.merge("RGB", [Image.linear_gradient("L").resize((200, 200)),
                                   Image.linear_gradient("L").rotate(90).resize((200, 200)),
                                   Image.new("L", (200, 200), 96)])
    picture = Image.blend(gradient, noise, 0.15)
    candidates = []
    for quality in range(30, 100, 2):
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=quality)
        candidates.append(buffer.getvalue())
    path.write_bytes(min(candidates, key=lambda data: abs(len(data) - SMALL_IMAGE_BYTES)))


def make_large_bmp(path: Path) -> None:
    """Write a noisy 24-bit BMP of 15 MB, just under the 16,000,000-byte upload limit."""
    from PIL import Image

    width, height = LARGE_UPLOAD_SIZE
    Image.frombytes("RGB", LARGE_UPLOAD_SIZE, os.urandom(width * height * 3)).save(path, "BMP")


def make_tiny_png() -> bytes:
    """Return a 16x16 PNG of a few hundred bytes, for uploads that cost the server little."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((16, 16)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def resize_with_best_pillow(path: Path) -> int:
    """Resize a JPEG to 300x300 Pillow's fastest way, upright, saved to memory; return its size.

    draft() makes the JPEG decoder scale by 1/8 while decoding, and resize's reducing_gap
    averages whole pixel blocks (reduce) before the final Lanczos filter.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.draft("RGB", RESIZE_SIZE)
        upright = ImageOps.exif_transpose(image)
        small = upright.resize(RESIZE_SIZE, Image.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=90)
    return buffer.tell()


def warm_pool_worker(barrier: multiprocessing.synchronize.Barrier) -> None:
    """Resize once (Pillow imported, photo cached), then wait for the other workers to be ready."""
    resize_with_best_pillow(BIG_PHOTO)
    barrier.wait()


def finished_size(path: Path) -> tuple[int, int] | None:
    """Return an image's (width, height) from its header, or None while it is missing or partial.

    An image already of the resize's size is decoded whole too: the seed rewrites its file in
    place, so the new header is there before the pixels.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.size == RESIZE_SIZE:
                image.load()
            return image.size
    except (OSError, SyntaxError, ValueError):
        return None


# ==========================================================================================
# Clients
# ==========================================================================================
# The requests the scenarios make: wrk, curl, and http.client for set-up and resizes.


def run_wrk(url: str, arguments: list[str] = WRK_ARGUMENTS) -> dict[str, float]:
    """Run wrk on one URL; return requests per second, the requests made and the errors it counted."""
    completed = subprocess.run(["wrk", *arguments, url], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, check=False)
    return parse_wrk(completed.returncode, completed.stdout)


def parse_wrk(returncode: int, output: str) -> dict[str, float]:
    """Return requests per second, the requests made and the errors counted from wrk's output."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in ", output)
    if returncode != 0 or not rate or not requests:
        raise BenchError(f"wrk failed: {output.strip()[-200:]}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_success = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = sum(int(count) for count in socket_errors.groups()) if socket_errors else 0
    errors += int(non_success.group(1)) if non_success else 0
    return {"requests_per_second": float(rate.group(1)), "requests": int(requests.group(1)), "errors": errors}


def curl_upload_command(server: Server, photo: Path, name: str) -> list[str]:
    """Return the curl command a user types to upload, plus -w to learn status and curl's time."""
    return ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
            "-F", f"file=@{photo};filename={name}", server.url("/")]


def check_curl_upload(output: str) -> float:
    """Return curl's own time in seconds from its -w output; raise BenchError unless it got 201."""
    status, _, seconds = output.partition(" ")
    if status != "201":
        raise BenchError(f"upload answered {status or 'nothing'}")
    return float(seconds)


def curl_uploads_at_once(server: Server, photo: Path, count: int) -> float:
    """Run count curl uploads of photo at once, each under a fresh name; return uploads/s.

    Raises BenchError unless every upload got 201.
    """
    commands = [curl_upload_command(server, photo, server.fresh_name("p")) for _ in range(count)]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for command in commands]
    outputs = [process.communicate()[0] for process in processes]
    rate = count / (time.perf_counter() - started)
    for output in outputs:
        check_curl_upload(output)
    return rate


def multipart_body(name: str, data: bytes) -> tuple[bytes, str]:
    """Return a form's body with one part `file` carrying data as name, and its Content-Type."""
    boundary = f"bench{random.getrandbits(64):016x}"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def upload_file(server: Server, photo: Path, name: str) -> None:
    """Upload a file with http.client (set-up, not timed); raise BenchError unless 201."""
    body, content_type = multipart_body(name, photo.read_bytes())
    connection = server.connect()
    try:
        connection.request("POST", "/", body, {"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    if response.status != 201:
        raise BenchError(f"set-up upload of {name} answered {response.status}")


def request_json(connection: http.client.HTTPConnection, method: str, path: str, payload=None):
    """Send one request; return (status, headers, decoded JSON body or None)."""
    body = None if payload is None else json.dumps(payload).encode()
    headers = {} if payload is None else {"Content-Type": "application/json"}
    connection.request(method, path, body, headers)
    response = connection.getresponse()
    data = response.read()
    try:
        decoded = json.loads(data) if data else None
    except ValueError:
        decoded = None
    return response.status, response.headers, decoded


def resize_and_wait(server: Server, name: str, wait_seconds: int = JOB_WAIT_SECONDS) -> float:
    """PATCH an image to 300x300 and return once the resized image is stored.

    IMS says when through GET /jobs/<id>?wait=wait_seconds; the seed tells nobody, so its file is
    read until it is a whole 300x300 image. Returns the seconds the PATCH took to be answered
    (connecting included). Raises BenchError when the resize is refused or fails.
    """
    width, height = RESIZE_SIZE
    deadline = time.monotonic() + RESIZE_DEADLINE_SECONDS
    connection = http.client.HTTPConnection(server.host, server.port, timeout=wait_seconds + 30)
    try:
        started = time.perf_counter()
        status, headers, _ = request_json(connection, "PATCH", "/" + name, {"width": width, "height": height})
        answered = time.perf_counter() - started
        if status != 202:
            raise BenchError(f"PATCH answered {status}")
        if server.kind == "seed":
            while finished_size(server.storage / name) != RESIZE_SIZE:
                if time.monotonic() > deadline:
                    raise BenchError(f"seed did not resize {name} within {RESIZE_DEADLINE_SECONDS} s")
                time.sleep(0.002)
            return answered
        location = headers.get("Location")
        if not location:
            raise BenchError("PATCH answered 202 without Location")
        job = {}
        while job.get("state") not in ("done", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise BenchError(f"job {location} not ended within {RESIZE_DEADLINE_SECONDS} s")
            status, _, job = request_json(connection, "GET", f"{location}?wait={wait_seconds}")
            if status != 200 or not isinstance(job, dict):
                raise BenchError(f"GET {location} answered {status}")
        if job["state"] != "done":
            raise BenchError(f"job {job['state']}: {job.get('error')}")
        return answered
    finally:
        connection.close()


def run_threads(threads: list[threading.Thread]) -> float:
    """Start the threads together, wait for all of them, and return the seconds that took."""
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def resize_all_at_once(server: Server, names: list[str], wait_seconds: int = JOB_WAIT_SECONDS) -> float:
    """Resize every image at once, one thread each; return the seconds until all are stored."""
    errors = []

    def resize(name: str) -> None:
        try:
            resize_and_wait(server, name, wait_seconds)
        except BenchError as error:
            errors.append(error)

    elapsed = run_threads([threading.Thread(target=resize, args=(name,)) for name in names])
    if errors:
        raise errors[0]
    return elapsed


def command_seconds(command: list[str]) -> float:
    """Return the wall time of one run of a command, in seconds."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def pool_resize_rate(rounds: int) -> float:
    """Return the median photos/s of 8 best Pillow resizes spread over all CPUs by a Pool."""
    workers = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    photos = [BIG_PHOTO] * PARALLEL_RESIZES
    rates = []
    with context.Pool(workers, initializer=warm_pool_worker, initargs=(context.Barrier(workers),)) as pool:
        for _ in range(rounds):
            started = time.perf_counter()
            pool.map(resize_with_best_pillow, photos, chunksize=1)
            rates.append(PARALLEL_RESIZES / (time.perf_counter() - started))
    return statistics.median(rates)


# ==========================================================================================
# Scenarios
# ==========================================================================================
# Each scenario measures every server the same way, interleaved where it repeats, and returns
# rows for the table. None means "not measured"; the reason goes into the row's note.


@dataclasses.dataclass
class Row:
    """One line of the table: a measure for IMS, for the seed, for --baseline, and the issue's target."""

    scenario: str
    measure: str
    unit: str
    ims: float | None = None
    seed: float | None = None
    before: float | None = None
    higher_is_better: bool = True
    target: str = ""
    min_versus_seed: float | None = None  # a target as a factor over the seed,
    min_versus_before: float | None = None  # or over the --baseline IMS,
    min_ims: float | None = None  # or as limits on IMS's own value
    max_ims: float | None = None
    note: str = ""

    @property
    def versus_seed(self) -> float | None:
        """How many times better IMS is than the seed (above 1 is better), or None."""
        return self.factor(self.seed)

    @property
    def versus_before(self) -> float | None:
        """How many times better IMS is than the --baseline IMS (above 1 is better), or None."""
        return self.factor(self.before)

    def factor(self, other: float | None) -> float | None:
        if not self.ims or not other:
            return None
        return self.ims / other if self.higher_is_better else other / self.ims

    @property
    def met(self) -> bool | None:
        """Whether the target is met, or None when it cannot be told (no target, no value)."""
        checks = []
        if self.min_versus_seed is not None and self.versus_seed is not None:
            checks.append(self.versus_seed >= self.min_versus_seed)
        if self.min_versus_before is not None and self.versus_before is not None:
            checks.append(self.versus_before >= self.min_versus_before)
        if self.min_ims is not None and self.ims is not None:
            checks.append(self.ims >= self.min_ims)
        if self.max_ims is not None and self.ims is not None:
            checks.append(self.ims <= self.max_ims)
        return all(checks) if checks else None


@dataclasses.dataclass
class Bench:
    """What every scenario needs: the running servers, the images and the repeat count."""

    servers: dict[str, Server]
    scratch: Path
    small_image: Path
    large_image: Path
    repeat: int
    problems: list[str] = dataclasses.field(default_factory=list)  # servers that stopped badly
    baseline: Path | None = None  # the ims.py of the "before" column
    # Cores that processes outside the bench kept busy during each scenario, on average.
    other_cores: dict[str, float] = dataclasses.field(default_factory=dict)


def columns(values: dict[str, float]) -> dict[str, float | None]:
    """Return a Row's ims, before and seed values from {kind: value}."""
    return {kind: values.get(kind) for kind in ("ims", "before", "seed")}


def measure_per_server(bench: Bench, measure: Callable[[Server], float]):
    """Run measure() on each server; return ({kind: value}, note), a BenchError giving a note."""
    values, notes = {}, []
    for kind, server in bench.servers.items():
        try:
            values[kind] = measure(server)
        except BenchError as error:
            notes.append(f"{kind}: {error}")
    return values, "; ".join(notes)


def wrk_scenario(bench: Bench, path: str):
    """Run wrk --repeat times per server, interleaved; return ({kind: median req/s}, note)."""
    runs = {kind: [] for kind in bench.servers}
    errors = dict.fromkeys(bench.servers, 0)
    for _ in range(bench.repeat):
        for kind, server in bench.servers.items():
            server.check_alive()
            result = run_wrk(server.url(path))
            runs[kind].append(result["requests_per_second"])
            errors[kind] += result["errors"]
    medians = {kind: statistics.median(values) for kind, values in runs.items()}
    note = "; ".join(f"{kind}: {count} socket errors or non-2xx answers" for kind, count in errors.items() if count)
    return medians, note


def scenario_idle_rss(bench: Bench) -> list[Row]:
    alone, tree_rss, tree_pss, makeup = {}, {}, {}, []
    for kind, server in bench.servers.items():
        connection = server.connect()
        request_json(connection, "GET", "/")
        connection.close()
        if not wait_until_idle(server.process.pid):
            makeup.append(f"{kind} still used CPU after {STARTUP_TIMEOUT_SECONDS} s")
        members = {server.process.pid: "server"}
        members.update((pid, process_role(pid)) for pid in descendants(server.process.pid))
        memory = {pid: read_rollup_kib(pid) for pid in members}
        alone[kind] = memory[server.process.pid]["Rss"] / 1024
        tree_rss[kind] = sum(fields["Rss"] for fields in memory.values()) / 1024
        tree_pss[kind] = sum(fields["Pss"] for fields in memory.values()) / 1024
        makeup.append(f"{kind}: " + ", ".join(f"{role} {memory[pid]['Rss'] / 1024:.1f}/{memory[pid]['Pss'] / 1024:.1f}"
                                              for pid, role in members.items()))
    return [
        Row("idle-rss", "RSS of the server process, idle after start + GET /", "MiB", **columns(alone),
            higher_is_better=False, target="<= 0.7x seed", min_versus_seed=1 / 0.7),
        Row("idle-rss", "RSS of its whole tree, summed", "MiB", **columns(tree_rss), higher_is_better=False,
            note="RSS/PSS in MiB of each process: " + "; ".join(makeup)),
        Row("idle-rss", "PSS of its whole tree, summed", "MiB", **columns(tree_pss), higher_is_better=False,
            target="<= 1.3x seed", min_versus_seed=1 / 1.3),
    ]


def scenario_list(bench: Bench) -> list[Row]:
    medians, note = wrk_scenario(bench, "/")
    return [Row("list", f"GET / ({LIST_NAMES} names), wrk c8", "req/s", **columns(medians),
                target=">= 4x seed", min_versus_seed=4, note=note)]


def scenario_small_get(bench: Bench) -> list[Row]:
    medians, note = wrk_scenario(bench, "/small.jpeg")
    kilobytes = bench.small_image.stat().st_size / 1000
    return [Row("small-get", f"GET {kilobytes:.0f} KB JPEG, wrk c8", "req/s", **columns(medians),
                target=">= 6x seed", min_versus_seed=6, note=note)]


def scenario_big_get(bench: Bench) -> list[Row]:
    medians, note = wrk_scenario(bench, "/big.jpeg")
    megabytes = BIG_PHOTO.stat().st_size / 1e6
    rates = {kind: requests_per_second * megabytes for kind, requests_per_second in medians.items()}
    return [Row("big-get", f"GET {megabytes:.1f} MB photo, wrk c8", "MB/s", **columns(rates),
                target=">= 1.7x seed", min_versus_seed=1.7, note=note)]


def scenario_upload_rss(bench: Bench) -> list[Row]:
    def largest_growth(server: Server) -> float:
        growths = []
        for _ in range(bench.repeat):
            command = curl_upload_command(server, bench.large_image, server.fresh_name("rss", ".bmp"))
            with PeakRssGrowth(server.process.pid) as growth:
                output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False).stdout
            check_curl_upload(output)
            growths.append(growth.growth_mib)
        return max(growths)

    values, note = measure_per_server(bench, largest_growth)
    megabytes = bench.large_image.stat().st_size / 1e6
    return [Row("upload-rss", f"peak RSS growth, {megabytes:.0f} MB upload (max of {bench.repeat})", "MiB",
                **columns(values), higher_is_better=False,
                target="<= 2 MiB", max_ims=2, note=note)]


def scenario_upload(bench: Bench) -> list[Row]:
    walls = {kind: [] for kind in bench.servers}
    curl_times = {kind: [] for kind in bench.servers}
    failures = {}
    for _ in range(UPLOAD_RUNS):
        for kind, server in bench.servers.items():
            if kind in failures:
                continue
            command = curl_upload_command(server, BIG_PHOTO, server.fresh_name("u"))
            started = time.perf_counter()
            output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False).stdout
            walls[kind].append(time.perf_counter() - started)
            try:
                curl_times[kind].append(check_curl_upload(output))
            except BenchError as error:
                failures[kind] = f"{kind}: {error}"
    wall_ms = {kind: statistics.median(times) * 1000 for kind, times in walls.items() if kind not in failures}
    curl_ms = {kind: statistics.median(times) * 1000 for kind, times in curl_times.items()
               if kind not in failures}
    return [
        Row("upload", f"curl -F 3 MB photo, command wall (median of {UPLOAD_RUNS})", "ms",
            **columns(wall_ms), higher_is_better=False, target=">= 2x seed",
            min_versus_seed=2, note="; ".join(failures.values())),
        Row("upload", "same, curl's own time_total (no process start)", "ms", **columns(curl_ms),
            higher_is_better=False, target=">= 2x seed", min_versus_seed=2),
    ]


def scenario_upload_4(bench: Bench) -> list[Row]:
    server_cpu_ms, curl_cpu_ms = {}, {}

    def rate(server: Server) -> float:
        rates = []
        ticks_before = cpu_ticks([server.process.pid, *descendants(server.process.pid)])
        curl_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(PARALLEL_UPLOAD_ROUNDS):
            rates.append(curl_uploads_at_once(server, BIG_PHOTO, PARALLEL_UPLOADS))
        uploads = PARALLEL_UPLOADS * PARALLEL_UPLOAD_ROUNDS
        ticks = cpu_ticks([server.process.pid, *descendants(server.process.pid)]) - ticks_before
        server_cpu_ms[server.kind] = ticks * 1000 / os.sysconf("SC_CLK_TCK") / uploads
        curl_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        curl_seconds = (curl_after.ru_utime + curl_after.ru_stime) - (curl_before.ru_utime + curl_before.ru_stime)
        curl_cpu_ms[server.kind] = curl_seconds * 1000 / uploads
        return statistics.median(rates)

    values, note = measure_per_server(bench, rate)
    curl_note = "curl's own CPU per upload: " + ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in curl_cpu_ms.items())
    return [
        Row("upload-4", f"{PARALLEL_UPLOADS} curl uploads at once (median of {PARALLEL_UPLOAD_ROUNDS})",
            "uploads/s", **columns(values), target=">= 2x seed", min_versus_seed=2, note=note),
        Row("upload-4", "server CPU per upload, whole tree (user + system)", "ms", **columns(server_cpu_ms),
            higher_is_better=False, note=curl_note),
    ]


def scenario_resize(bench: Bench) -> list[Row]:
    answer_times = {kind: [] for kind in bench.servers}  # seconds until the PATCH was answered

    def end_to_end_seconds(server: Server) -> float:
        name = server.fresh_name("r")
        upload_file(server, BIG_PHOTO, name)
        started = time.perf_counter()
        answer_times[server.kind].append(resize_and_wait(server, name))
        elapsed = time.perf_counter() - started
        size = finished_size(server.storage / name)
        if size != RESIZE_SIZE:
            raise BenchError(f"the resized image is {size}, not {RESIZE_SIZE}")
        return elapsed

    # One run of each server and of each reference in turn, so that a busy spell of this shared
    # machine weighs on all of them alike; the references are timed by the wall clock, as the
    # servers are (their CPU time is in the note).
    vips_command = ["vipsthumbnail", str(BIG_PHOTO), "-s", "{}x{}".format(*RESIZE_SIZE),
                    "-o", str(bench.scratch / "vips.jpg")]
    command_seconds(vips_command)
    resize_with_best_pillow(BIG_PHOTO)
    times = {kind: [] for kind in bench.servers}
    failures = {}
    vips, pillow_wall, pillow_cpu = [], [], []
    for _ in range(RESIZE_RUNS):
        for kind, server in bench.servers.items():
            if kind not in failures:
                try:
                    times[kind].append(end_to_end_seconds(server))
                except BenchError as error:
                    failures[kind] = f"{kind}: {error}"
        vips.append(command_seconds(vips_command))
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        resize_with_best_pillow(BIG_PHOTO)
        pillow_wall.append(time.perf_counter() - started_wall)
        pillow_cpu.append(time.process_time() - started_cpu)
    values = {kind: statistics.median(runs) * 1000 for kind, runs in times.items() if kind not in failures}
    note = "; ".join(["of which the PATCH's answer (202), median: "
                      + ", ".join(f"{kind} {statistics.median(answer_times[kind]) * 1000:.1f} ms"
                                  for kind in values), *failures.values()])
    vips_ms = statistics.median(vips) * 1000
    pillow_ms = statistics.median(pillow_wall) * 1000
    by_vips = {kind: value / vips_ms for kind, value in values.items()}
    by_pillow = {kind: value / pillow_ms for kind, value in values.items()}
    reference = "a reference, not a server"
    return [
        Row("resize", f"12 MP photo to 300x300, end to end (median of {RESIZE_RUNS})", "ms",
            **columns(values), higher_is_better=False, target="<= 1.1x before",
            min_versus_before=1 / RESIZE_MAX_VERSUS_BEFORE, note=note),
        Row("resize", f"vipsthumbnail -s 300x300, command wall (median of {RESIZE_RUNS})", "ms",
            vips_ms, note=reference),
        Row("resize", f"best in-process Pillow, wall (median of {RESIZE_RUNS})", "ms", pillow_ms,
            note=f"{reference}; its CPU time {statistics.median(pillow_cpu) * 1000:.1f} ms"),
        Row("resize", "end to end / vipsthumbnail", "x", **columns(by_vips),
            higher_is_better=False, target="<= 0.6", max_ims=0.6),
        Row("resize", "end to end / best Pillow", "x", **columns(by_pillow),
            higher_is_better=False, target="<= 1.5", max_ims=1.5),
    ]


def scenario_resize_8(bench: Bench) -> list[Row]:
    def rate(server: Server) -> float:
        rates = []
        for _ in range(bench.repeat):
            names = [server.fresh_name("m") for _ in range(PARALLEL_RESIZES)]
            for name in names:
                upload_file(server, BIG_PHOTO, name)
            rates.append(PARALLEL_RESIZES / resize_all_at_once(server, names))
        return statistics.median(rates)

    values, note = measure_per_server(bench, rate)
    pool_rate = pool_resize_rate(bench.repeat)
    shares = {kind: value / pool_rate for kind, value in values.items()}
    return [
        Row("resize-8", f"{PARALLEL_RESIZES} photos PATCHed at once (median of {bench.repeat})",
            "photos/s", **columns(values), note=note),
        Row("resize-8", f"{PARALLEL_RESIZES} best Pillow resizes, Pool({os.cpu_count()})", "photos/s",
            pool_rate, note="a reference, not a server"),
        Row("resize-8", "PATCHed / Pool throughput", "x", **columns(shares),
            target=">= 0.8", min_ims=0.8),
    ]


def start_fresh(bench: Bench, kind: str, storage: Path) -> Server:
    """Start another server of a kind (ims, before or seed) on a storage folder the caller filled."""
    if kind == "seed":
        return start_seed(storage)
    script = bench.baseline if kind == "before" else IMS_SCRIPT
    return start_ims(storage, bench.scratch, label=storage.name, script=script, kind=kind)


def scenario_first_resize(bench: Bench) -> list[Row]:
    firsts, laters, ratios = ({kind: [] for kind in bench.servers} for _ in range(3))
    failures = {}
    for start in range(bench.repeat):
        for kind in bench.servers:
            if kind in failures:
                continue
            storage = bench.scratch / f"first-{kind}-{start}"
            storage.mkdir()
            names = [f"photo{index}.jpeg" for index in range(1 + FIRST_RESIZE_LATER)]
            for name in names:
                shutil.copyfile(BIG_PHOTO, storage / name)
            server = start_fresh(bench, kind, storage)
            try:
                connection = server.connect()
                request_json(connection, "GET", "/")
                connection.close()
                wait_until_idle(server.process.pid)
                times = []
                for name in names:
                    started = time.perf_counter()
                    resize_and_wait(server, name)
                    times.append(time.perf_counter() - started)
            except BenchError as error:
                failures[kind] = f"{kind}: {error}"
                continue
            finally:
                bench.problems.extend(f"first-resize {kind}: {problem}" for problem in server.stop())
            later = statistics.median(times[1:])
            firsts[kind].append(times[0] * 1000)
            laters[kind].append(later * 1000)
            ratios[kind].append(times[0] / later)
    medians = [{kind: statistics.median(values) for kind, values in series.items() if kind not in failures}
               for series in (firsts, laters, ratios)]
    notes = [f"{kind}: " + ", ".join(f"{ratio:.2f}" for ratio in values) for kind, values in ratios.items()
             if kind not in failures]
    return [
        Row("first-resize", f"first resize after a fresh start, end to end (median of {bench.repeat} starts)",
            "ms", **columns(medians[0]), higher_is_better=False, note="; ".join(failures.values())),
        Row("first-resize", f"a later resize on the same server (median of the {FIRST_RESIZE_LATER} after it)",
            "ms", **columns(medians[1]), higher_is_better=False),
        Row("first-resize", "first / later (median of the starts' ratios)", "x", **columns(medians[2]),
            higher_is_better=False, target="<= 1.5", max_ims=1.5, note="each start's ratio: " + "; ".join(notes)),
    ]


# ------------------------------------------------------------------------------------------
# Rendition scenarios (issue 10): GET /<name>?width=&height=... renders in a resize process once
# and caches the result in .ims/renditions; a cached one is sent by sendfile like an original.
# ------------------------------------------------------------------------------------------


def image_size(data: bytes) -> tuple[int, int] | None:
    """Return an image's (width, height) from its header, or None when the bytes are no image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):
        return None


def timed_get(server: Server, path: str) -> tuple[float, int, bytes]:
    """GET path on a new connection; return (seconds from connecting to the whole body read, status, body)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=RENDITION_CLIENT_TIMEOUT_SECONDS)
    try:
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        data = response.read()
        return time.perf_counter() - started, response.status, data
    except (OSError, http.client.HTTPException) as error:
        raise BenchError(f"GET {path}: {type(error).__name__}: {error}") from None
    finally:
        connection.close()


def check_rendition(status: int, data: bytes, path: str, width: int | None, height: int | None = None) -> None:
    """Raise BenchError unless a rendition's answer is 200 with an image of the width (and height) asked."""
    if status != 200:
        raise BenchError(f"GET {path} answered {status}: {data[:120]!r}")
    size = image_size(data)
    if size is None or (width and size[0] != width) or (height and size[1] != height):
        raise BenchError(f"GET {path} answered a {size[0]}x{size[1]} image: no renditions" if size else
                         f"GET {path} answered {len(data):,} bytes that are no image")


def rendering_servers(bench: Bench, name: str) -> tuple[dict[str, Server], list[str]]:
    """Return the servers that render the stored image `name` ({kind: server}), and notes on those that do not.

    The probe, ?width=64, is a warm-up too: the server's first render after its start costs more.
    """
    servers, notes = {}, []
    for kind, server in bench.servers.items():
        path = f"/{name}?width=64"
        try:
            _, status, data = timed_get(server, path)
            check_rendition(status, data, path, 64)
        except BenchError as error:
            notes.append(f"{kind} not measured: {error}")
            continue
        servers[kind] = server
    if "ims" not in servers:
        raise BenchError("; ".join(notes))
    return servers, notes


@dataclasses.dataclass
class Answer:
    """One answer of requests sent at once: its status (None when the request failed), Retry-After, body."""

    status: int | None
    retry_after: str | None
    body: bytes
    error: str = ""


def get_at_once(server: Server, paths: list[str]) -> tuple[list[Answer], float]:
    """GET every path at once, each on a connection of its own opened first; return the answers and the seconds.

    One thread sends every request, then reads the answers as they come (a selector), so that the
    client takes little of the CPUs the server needs (a Python thread per request costs about twice
    the CPU). The seconds run from the first request sent to the last answer read whole.
    """
    sockets = []
    answers: list[Answer | None] = [None] * len(paths)
    received = [bytearray() for _ in paths]
    finished = [0.0] * len(paths)
    host = f"{server.host}:{server.port}"
    selector = selectors.DefaultSelector()

    def complete(index: int) -> bool:
        """Record the answer on connection index once its head and Content-Length bytes are in; True then."""
        data = received[index]
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        lines = data[:head_end].decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines[1:])}
        body = bytes(data[head_end + 4:])
        length = headers.get("content-length")
        if length is not None and len(body) < int(length):
            return False
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        answers[index] = Answer(status, headers.get("retry-after"), body,
                                "" if status else f"malformed status line {lines[0][:80]!r}")
        return True

    try:
        for _ in paths:
            sockets.append(socket.create_connection((server.host, server.port), timeout=CLIENT_TIMEOUT_SECONDS))
        started = time.perf_counter()
        for index, (connection, path) in enumerate(zip(sockets, paths)):
            connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ, index)
        deadline = started + RENDITION_CLIENT_TIMEOUT_SECONDS
        pending = len(paths)
        while pending:
            remaining = deadline - time.perf_counter()
            events = selector.select(remaining) if remaining > 0 else []
            if not events:
                break
            for key, _ in events:
                index = key.data
                try:
                    chunk = key.fileobj.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as error:
                    chunk, answers[index] = b"", Answer(None, None, b"", f"{type(error).__name__}: {error}")
                received[index] += chunk
                if answers[index] is not None or complete(index) or not chunk:
                    if answers[index] is None:
                        answers[index] = Answer(None, None, b"", "connection closed before a whole answer")
                    finished[index] = time.perf_counter()
                    selector.unregister(key.fileobj)
                    pending -= 1
    finally:
        selector.close()
        for connection in sockets:
            connection.close()
    for index, answer in enumerate(answers):
        if answer is None:
            answers[index] = Answer(None, None, b"", f"no whole answer within {RENDITION_CLIENT_TIMEOUT_SECONDS} s")
            finished[index] = time.perf_counter()
    return answers, max(finished) - started


def reaped_children_ticks(pid: int) -> int:
    """Return the CPU time of a process's children that it has reaped (cutime + cstime), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14])


def cached_renditions(server: Server, name: str) -> int:
    """Return how many renditions of `name` the server's cache folder holds (its hidden lock and temp files aside)."""
    folder = server.storage / ".ims" / "renditions" / name
    with contextlib.suppress(OSError):
        return sum(1 for entry in os.scandir(folder) if not entry.name.startswith("."))
    return 0


def scenario_rendition_get(bench: Bench) -> list[Row]:
    servers, notes = rendering_servers(bench, "big.jpeg")
    thumbnail = f"/big.jpeg?{RENDITION_THUMB_QUERY}"
    paths = {"original": "/small.jpeg", "rendition": thumbnail}
    sizes = {}
    for kind, server in servers.items():
        # Rendered here, so the runs below are served from the cache.
        _, status, data = timed_get(server, thumbnail)
        check_rendition(status, data, thumbnail, 300)
        sizes[kind] = len(data)
    runs = max(bench.repeat, RENDITION_GET_MIN_RUNS)
    rates = {(what, kind): [] for what in paths for kind in servers}
    cpu = {(what, kind): [] for what in paths for kind in servers}  # the server's µs of CPU per request
    clock_ticks = os.sysconf("SC_CLK_TCK")
    errors = collections.Counter()
    for run in range(runs):
        for kind, server in in_turn(servers, run):
            for what, path in in_turn(paths, run):
                server.check_alive()
                ticks_before = tree_cpu_ticks(server.process.pid)
                result = run_wrk(server.url(path))
                ticks = tree_cpu_ticks(server.process.pid) - ticks_before
                rates[what, kind].append(result["requests_per_second"])
                cpu[what, kind].append(ticks / clock_ticks / max(result["requests"], 1) * 1e6)
                errors[kind, what] += result["errors"]
    medians = {what: {kind: statistics.median(rates[what, kind]) for kind in servers} for what in paths}
    ratios = {kind: medians["rendition"][kind] / medians["original"][kind] for kind in servers}
    pairs = {kind: ", ".join(f"{rendition / original:.2f}" for original, rendition
                             in zip(rates["original", kind], rates["rendition", kind])) for kind in servers}
    notes += [f"{kind} {what}: {count} socket errors or non-2xx answers" for (kind, what), count in errors.items()
              if count]
    command = " ".join(WRK_ARGUMENTS)
    kilobytes = sizes["ims"] / 1000
    return [
        Row("rendition-get", f"GET {bench.small_image.stat().st_size / 1000:.0f} KB JPEG original, wrk {command} "
            f"(median of {runs})", "req/s", **columns(medians["original"]),
            note="runs: " + "; ".join(f"{kind} {', '.join(f'{rate:,.0f}' for rate in rates['original', kind])}"
                                      for kind in servers)),
        Row("rendition-get", f"GET ?{RENDITION_THUMB_QUERY} of the 12 MP photo, cached ({kilobytes:.0f} KB "
            f"300x400 JPEG), same", "req/s", **columns(medians["rendition"]),
            note="runs: " + "; ".join(f"{kind} {', '.join(f'{rate:,.0f}' for rate in rates['rendition', kind])}"
                                      for kind in servers)),
        *(Row("rendition-get", f"server CPU per request, {what}, whole tree (median of {runs})", "µs",
              **columns({kind: statistics.median(cpu[what, kind]) for kind in servers}), higher_is_better=False,
              note="less noisy than req/s, which one process's threads handing the GIL across two cores can halve"
              if what == "original" else "")
          for what in paths),
        Row("rendition-get", "cached rendition / original", "x", **columns(ratios),
            target=f">= {RENDITION_GET_MIN_FACTOR}", min_ims=RENDITION_GET_MIN_FACTOR,
            note="; ".join([f"ratio of each interleaved pair of runs: "
                            + "; ".join(f"{kind} {pairs[kind]}" for kind in servers), *notes])),
    ]


def scenario_rendition_cold(bench: Bench) -> list[Row]:
    photos = sorted((SHARED / "photos").glob("*.jpeg"))
    if not photos:
        raise BenchError(f"no photos in {SHARED / 'photos'}")
    servers, notes = rendering_servers(bench, "big.jpeg")
    width, height = RESIZE_SIZE
    vips_output = bench.scratch / "rendition-vips.jpg"

    def rendition(server: Server, photo: Path) -> float:
        name = server.fresh_name("cold")
        upload_file(server, photo, name)
        path = f"/{name}?{RENDITION_COLD_QUERY}"
        seconds, status, data = timed_get(server, path)
        check_rendition(status, data, path, width, height)
        return seconds

    def patch(server: Server, photo: Path) -> float:
        name = server.fresh_name("patch")
        upload_file(server, photo, name)
        started = time.perf_counter()
        resize_and_wait(server, name)
        seconds = time.perf_counter() - started
        size = finished_size(server.storage / name)
        if size != RESIZE_SIZE:
            raise BenchError(f"the resized image is {size}, not {RESIZE_SIZE}")
        return seconds

    def vips(photo: Path) -> float:
        return command_seconds(["vipsthumbnail", str(photo), "-s", f"{width}x{height}", "-o", str(vips_output)])

    with contextlib.ExitStack() as stack:
        filter_server = None
        try:
            filter_server = start_image_filter(bench.scratch / "image-filter-nginx", SHARED / "photos")
            stop_later(stack, bench, "image_filter nginx", filter_server)
        except BenchError as error:
            filter_note = str(error)

        def image_filter(photo: Path) -> float:
            path = f"/{photo.name}?{RENDITION_COLD_QUERY}"
            seconds, status, data = timed_get(filter_server, path)
            size = image_size(data)
            if status != 200 or size is None or max(size) != max(RESIZE_SIZE):
                raise BenchError(f"GET {path} answered {status}, {size}")
            return seconds

        # What each run measures, by (what, kind); the order turns by one each run, so that no
        # measure always follows the same one on this shared machine.
        measures: dict[tuple[str, str], Callable[[Path], float]] = {}
        for kind, server in servers.items():
            measures["rendition", kind] = lambda photo, server=server: rendition(server, photo)
            measures["patch", kind] = lambda photo, server=server: patch(server, photo)
        measures["vips", "ims"] = vips
        if filter_server is not None:
            measures["image_filter", "ims"] = image_filter
        times = {key: [] for key in measures}
        failures = {}
        for key, measure in measures.items():  # a warm-up of each
            try:
                measure(photos[0])
            except BenchError as error:
                failures[key] = f"{key[1]} {key[0]}: {error}"
        keys = list(measures)
        for run in range(RESIZE_RUNS):
            photo = photos[run % len(photos)]
            turn = run % len(keys)
            for key in keys[turn:] + keys[:turn]:
                if key in failures:
                    continue
                try:
                    times[key].append(measures[key](photo))
                except BenchError as error:
                    failures[key] = f"{key[1]} {key[0]}: {error}"

    def median_ms(what: str) -> dict[str, float]:
        return {kind: statistics.median(times[what, kind]) * 1000 for kind in servers
                if (what, kind) in times and times[what, kind] and (what, kind) not in failures}

    rendered, patched = median_ms("rendition"), median_ms("patch")
    vips_ms = median_ms("vips").get("ims")
    filter_ms = median_ms("image_filter").get("ims")

    def ratio(values: dict[str, float], reference: dict[str, float] | float | None) -> dict[str, float]:
        if isinstance(reference, dict):
            return {kind: value / reference[kind] for kind, value in values.items() if kind in reference}
        return {kind: value / reference for kind, value in values.items()} if reference else {}

    per_run = "; ".join(f"{kind} " + ", ".join(f"{one / other:.2f}" for one, other
                                                in zip(times["rendition", kind], times["patch", kind]))
                        for kind in servers)
    notes += failures.values()
    runs = f"median of {RESIZE_RUNS}"
    reference = "a reference, not a server"
    return [
        Row("rendition-cold", f"cold GET ?{RENDITION_COLD_QUERY} of a fresh 12 MP upload, end to end ({runs})", "ms",
            **columns(rendered), higher_is_better=False,
            note="; ".join([f"photos {', '.join(photo.name for photo in photos)} in turn, each uploaded under a new "
                            "name just before (not timed); a new connection each, the whole body read", *notes])),
        Row("rendition-cold", f"PATCH to {width}x{height} + GET /jobs/<id>?wait=, same photo, end to end ({runs})",
            "ms", **columns(patched), higher_is_better=False),
        Row("rendition-cold", f"vipsthumbnail -s {width}x{height}, same photo, command wall ({runs})", "ms", vips_ms,
            higher_is_better=False, note=reference),
        Row("rendition-cold", f"nginx image_filter resize {width} {height}, same photo, end to end ({runs})", "ms",
            filter_ms, higher_is_better=False,
            note=(f"{reference}: nginx on the fly with libgd, full decode, EXIF orientation ignored, "
                  "quality 75, nothing cached" if filter_server is not None else filter_note)),
        Row("rendition-cold", "cold rendition / PATCH", "x", **columns(ratio(rendered, patched)),
            higher_is_better=False, target=f"<= {RENDITION_MAX_VERSUS_PATCH}", max_ims=RENDITION_MAX_VERSUS_PATCH,
            note=f"ratio within each run: {per_run}"),
        Row("rendition-cold", "cold rendition / vipsthumbnail", "x", **columns(ratio(rendered, vips_ms)),
            higher_is_better=False, target=f"<= {RENDITION_MAX_VERSUS_VIPS}", max_ims=RENDITION_MAX_VERSUS_VIPS),
        Row("rendition-cold", "cold rendition / nginx image_filter", "x", **columns(ratio(rendered, filter_ms)),
            higher_is_better=False),
    ]


def fresh_rendering_servers(stack: contextlib.ExitStack, bench: Bench, label: str,
                            options: list[str] = ()) -> tuple[dict[str, Server], list[str]]:
    """Start a fresh IMS, and with --baseline the IMS before, each on a storage of its own; all stop with the stack.

    Returns those that render (a ?width=64 of an uploaded photo, their first render, answered
    right) and notes on the others; raises BenchError when IMS itself does not render.
    """
    servers, notes = {}, []
    for kind in ["ims", "before"] if bench.baseline else ["ims"]:
        server = stack.enter_context(fresh_ims(bench, f"{label}-{kind}", options, kind=kind))
        name = server.fresh_name("warm")
        try:
            upload_file(server, BIG_PHOTO, name)
            path = f"/{name}?width=64"
            _, status, data = timed_get(server, path)
            check_rendition(status, data, path, 64)
        except BenchError as error:
            if kind == "ims":
                raise
            notes.append(f"{kind} not measured: {error}")
            continue
        servers[kind] = server
    return servers, notes


@dataclasses.dataclass
class CrowdRound:
    """One round of rendition-crowd: one cold GET alone, the crowd of cold GETs, the same crowd once cached."""

    one_seconds: float
    one_child_ticks: int
    crowd_seconds: float
    crowd_child_ticks: int
    cached_seconds: float
    renders_seen: int  # resize processes seen in /proc during the cold crowd
    cached: int  # renditions in the cache folder of the crowd's image afterwards
    statuses: collections.Counter
    bodies: int  # different bodies among the 200 answers
    errors: list[str]
    server_ticks: int  # the server process's own CPU time during the cold crowd (its threads, not its children)
    client_seconds: float  # this process's CPU time during the cold crowd (the clients and the sampler)


def crowd_round(server: Server, photo: Path) -> CrowdRound:
    """Time one cold GET of a fresh upload alone, CROWD_REQUESTS identical cold GETs of another at once,
    then the same crowd again, served from the cache; /proc is sampled during each, alike."""
    pid = server.process.pid
    alone, crowd = server.fresh_name("alone"), server.fresh_name("crowd")
    for name in (alone, crowd):
        upload_file(server, photo, name)
    ticks_before = reaped_children_ticks(pid)
    with DescendantSampler(pid, RENDITION_SAMPLE_SECONDS):
        answers, one_seconds = get_at_once(server, [f"/{alone}?{RENDITION_COLD_QUERY}"])
    one_child_ticks = reaped_children_ticks(pid) - ticks_before
    if answers[0].status != 200:
        raise BenchError(f"one cold GET answered {answers[0].status or answers[0].error}")
    paths = [f"/{crowd}?{RENDITION_COLD_QUERY}"] * CROWD_REQUESTS
    ticks_before, server_before, client_before = reaped_children_ticks(pid), cpu_ticks([pid]), time.process_time()
    with DescendantSampler(pid, RENDITION_SAMPLE_SECONDS) as sampler:
        answers, crowd_seconds = get_at_once(server, paths)
    client_seconds = time.process_time() - client_before
    server_ticks = cpu_ticks([pid]) - server_before
    crowd_child_ticks = reaped_children_ticks(pid) - ticks_before
    with DescendantSampler(pid, RENDITION_SAMPLE_SECONDS):
        cached_answers, cached_seconds = get_at_once(server, paths)
    statuses = collections.Counter(answer.status or answer.error for answer in answers)
    errors = [f"{answer.status} {answer.body[:80]!r}" if answer.status else answer.error
              for answer in answers if answer.status != 200]
    errors += [f"cached: {answer.status} {answer.body[:80]!r}" if answer.status else f"cached: {answer.error}"
               for answer in cached_answers if answer.status != 200]
    bodies = {answer.body for answer in answers if answer.status == 200}
    for body in bodies:
        if image_size(body) != RESIZE_SIZE:
            errors.append(f"a {image_size(body)} image, not {RESIZE_SIZE}")
    if any(answer.body not in bodies for answer in cached_answers if answer.status == 200):
        errors.append("the cached answers differ from the cold ones")
    return CrowdRound(one_seconds, one_child_ticks, crowd_seconds, crowd_child_ticks, cached_seconds,
                      len(sampler.seen), cached_renditions(server, crowd), statuses, len(bodies), errors,
                      server_ticks, client_seconds)


def scenario_rendition_crowd(bench: Bench) -> list[Row]:
    photos = sorted((SHARED / "photos").glob("*.jpeg")) or [BIG_PHOTO]
    rounds = max(bench.repeat, CROWD_MIN_ROUNDS)
    with contextlib.ExitStack() as stack:
        servers, notes = fresh_rendering_servers(stack, bench, "crowd")
        results: dict[str, list[CrowdRound]] = {kind: [] for kind in servers}
        for run in range(rounds):
            for kind, server in in_turn(servers, run):
                server.check_alive()
                results[kind].append(crowd_round(server, photos[run % len(photos)]))

    def median_of(measure: Callable[[CrowdRound], float]) -> dict[str, float]:
        return {kind: statistics.median(measure(each) for each in runs) for kind, runs in results.items()}

    def worst_of(measure: Callable[[CrowdRound], float]) -> dict[str, float | None]:
        return columns({kind: max(measure(each) for each in runs) for kind, runs in results.items()})

    def wrong(each: CrowdRound) -> int:
        # Every answer that is not 200, plus every body beyond the first one.
        return len(each.errors) + max(each.bodies - 1, 0)

    one = median_of(lambda each: each.one_seconds * 1000)
    crowd = median_of(lambda each: each.crowd_seconds * 1000)
    cached = median_of(lambda each: each.cached_seconds * 1000)
    clock_ticks = os.sysconf("SC_CLK_TCK")
    for kind, runs in results.items():
        for number, each in enumerate(runs, 1):
            note = (f"{kind} round {number}: one {each.one_seconds * 1000:.0f} ms, {CROWD_REQUESTS} at once "
                    f"{each.crowd_seconds * 1000:.0f} ms, cached {each.cached_seconds * 1000:.0f} ms; answers "
                    + ", ".join(f"{status} x{count}" for status, count in each.statuses.most_common())
                    + f", {each.bodies} different bod{'y' if each.bodies == 1 else 'ies'}, {each.renders_seen} "
                    f"resize process(es) seen, {each.cached} rendition(s) cached; reaped children's CPU "
                    f"{each.crowd_child_ticks} ticks against {each.one_child_ticks} for the one; CPU during the "
                    f"crowd: server {each.server_ticks * 1000 / clock_ticks:.0f} ms, bench clients "
                    f"{each.client_seconds * 1000:.0f} ms")
            if each.errors:
                note += "; wrong: " + ", ".join(each.errors[:4])
            notes.append(note)
    runs = f"median of {rounds} rounds"
    return [
        Row("rendition-crowd", f"one cold GET ?{RENDITION_COLD_QUERY} of a fresh 12 MP upload ({runs})", "ms",
            **columns(one), higher_is_better=False, note="; ".join(notes)),
        Row("rendition-crowd", f"{CROWD_REQUESTS} identical cold GETs at once, until the last answer ({runs})", "ms",
            **columns(crowd), higher_is_better=False),
        Row("rendition-crowd", f"{CROWD_REQUESTS} at once / one", "x",
            **columns({kind: crowd[kind] / one[kind] for kind in results}), higher_is_better=False,
            target=f"<= {CROWD_MAX_VERSUS_ONE}", max_ims=CROWD_MAX_VERSUS_ONE),
        Row("rendition-crowd", f"the same {CROWD_REQUESTS} GETs at once again, cached ({runs})", "ms",
            **columns(cached), higher_is_better=False,
            note=f"what answering {CROWD_REQUESTS} requests at once costs these clients and the server with "
                 "nothing to render: a floor under the cold crowd"),
        Row("rendition-crowd", "(cold crowd - cached crowd) / one", "x",
            **columns({kind: (crowd[kind] - cached[kind]) / one[kind] for kind in results}),
            higher_is_better=False, note="about 1 when the crowd costs one render plus the answers"),
        Row("rendition-crowd", f"renders per {CROWD_REQUESTS} (resize processes seen, worst round)", "count",
            **worst_of(lambda each: each.renders_seen), higher_is_better=False, target="= 1", max_ims=1,
            note=f"/proc sampled every ~{RENDITION_SAMPLE_SECONDS * 1000:.0f} ms (in all three measures alike); the "
                 "reaped children's CPU time against one render's, in the notes above, tells the same without "
                 "sampling"),
        Row("rendition-crowd", "answers not 200, or bytes not the same (worst round)", "count",
            **worst_of(wrong), higher_is_better=False, target="= 0", max_ims=0),
    ]


@dataclasses.dataclass
class SizesRound:
    """One round of rendition-burst: the time until the last answer, the answers, the processes, the CPU."""

    seconds: float
    statuses: collections.Counter
    wrong: list[str]  # answers other than 200 of the right width or 503 with Retry-After, failed requests
    peak: int
    cached: int
    server_ticks: int  # the server process's own CPU time (its threads, not the resize processes)
    render_ticks: int  # the resize processes' CPU time (reaped children)


def sizes_round(server: Server, photo: Path, clients: int | None = None) -> SizesRound:
    """GET SIZES_REQUESTS different widths of a fresh upload, sampling the server's descendants.

    All at once, a connection each; or, with clients, from that many clients, each asking for the
    next width once it has its answer (as a reference: no request waits for a resize slot).
    """
    name = server.fresh_name("sizes")
    upload_file(server, photo, name)
    widths = list(range(SIZES_FIRST_WIDTH, SIZES_FIRST_WIDTH + SIZES_REQUESTS))
    paths = [f"/{name}?width={width}" for width in widths]
    pid = server.process.pid
    server_before, renders_before = cpu_ticks([pid]), reaped_children_ticks(pid)
    with DescendantSampler(pid, BURST_SAMPLE_SECONDS) as sampler:
        if clients is None:
            answers, seconds = get_at_once(server, paths)
        else:
            answers = [None] * len(paths)

            def ask(first: int) -> None:
                for index in range(first, len(paths), clients):
                    try:
                        _, status, data = timed_get(server, paths[index])
                        answers[index] = Answer(status, None, data)
                    except BenchError as error:
                        answers[index] = Answer(None, None, b"", str(error))

            seconds = run_threads([threading.Thread(target=ask, args=(first,)) for first in range(clients)])
    server_ticks, render_ticks = cpu_ticks([pid]) - server_before, reaped_children_ticks(pid) - renders_before
    statuses = collections.Counter(answer.status or answer.error for answer in answers)
    wrong = []
    for width, answer in zip(widths, answers):
        if answer.status == 200:
            size = image_size(answer.body)
            if size is None or size[0] != width:
                wrong.append(f"width={width}: 200 with a {size} image")
        elif answer.status == 503:
            if not answer.retry_after and clients is None:
                wrong.append(f"width={width}: 503 without Retry-After")
        else:
            wrong.append(f"width={width}: {answer.status} {answer.body[:100]!r}" if answer.status else
                         f"width={width}: {answer.error}")
    return SizesRound(seconds, statuses, wrong, sampler.peak, cached_renditions(server, name), server_ticks,
                      render_ticks)


def scenario_rendition_burst(bench: Bench) -> list[Row]:
    workers = os.cpu_count() or 1
    clock_ticks = os.sysconf("SC_CLK_TCK")
    with contextlib.ExitStack() as stack:
        servers, notes = fresh_rendering_servers(stack, bench, "sizes", ["--resize-workers", str(workers)])
        results: dict[str, list[SizesRound]] = {kind: [] for kind in servers}
        references: dict[str, list[SizesRound]] = {kind: [] for kind in servers}
        for run in range(bench.repeat):
            for kind, server in in_turn(servers, run):
                modes = [(results, None), (references, workers)]
                for series, clients in (modes if run % 2 == 0 else modes[::-1]):
                    server.check_alive()
                    series[kind].append(sizes_round(server, BIG_PHOTO, clients))
                server.check_alive()

    def median_of(measure: Callable[[SizesRound], float], series=results) -> dict[str, float | None]:
        return columns({kind: statistics.median(measure(each) for each in runs) for kind, runs in series.items()})

    def worst_of(measure: Callable[[SizesRound], float]) -> dict[str, float | None]:
        return columns({kind: max(measure(each) for each in runs) for kind, runs in results.items()})

    def server_ms(each: SizesRound) -> float:
        return each.server_ticks * 1000 / clock_ticks / SIZES_REQUESTS

    def render_ms(each: SizesRound) -> float:
        return each.render_ticks * 1000 / clock_ticks / max(each.statuses[200], 1)

    for label, series in (("at once", results), (f"{workers} clients in turn", references)):
        for kind, runs in series.items():
            for number, each in enumerate(runs, 1):
                note = (f"{kind} {label} round {number}: {each.seconds:.2f} s, answers "
                        + ", ".join(f"{status} x{count}" for status, count in each.statuses.most_common())
                        + f", peak {each.peak} descendant(s), {each.cached} rendition(s) cached; CPU: server "
                        f"{each.server_ticks / clock_ticks:.2f} s, "
                        f"resize processes {each.render_ticks / clock_ticks:.2f} s")
                if each.wrong:
                    note += f"; wrong ({len(each.wrong)}): " + ", ".join(each.wrong[:4])
                notes.append(note)
    runs = f"median of {bench.repeat} rounds"
    last = SIZES_FIRST_WIDTH + SIZES_REQUESTS - 1
    in_turn_label = f"the same from {workers} clients in turn (nothing waits for a slot)"
    return [
        Row("rendition-burst", f"{SIZES_REQUESTS} sizes of one fresh 12 MP upload at once (?width={SIZES_FIRST_WIDTH} "
            f"to {last}), until the last answer ({runs})", "s", **median_of(lambda each: each.seconds),
            higher_is_better=False, note="; ".join(notes)),
        Row("rendition-burst", f"{in_turn_label}, until the last answer", "s",
            **median_of(lambda each: each.seconds, references), higher_is_better=False,
            note="a reference, interleaved with the bursts: the resize slots kept busy without a queue"),
        Row("rendition-burst", f"answered 200 ({runs})", "count", **median_of(lambda each: each.statuses[200])),
        Row("rendition-burst", f"answered 503 with Retry-After ({runs})", "count",
            **median_of(lambda each: each.statuses[503])),
        Row("rendition-burst", "other answers, failed requests, wrong sizes (worst round)", "count",
            **worst_of(lambda each: len(each.wrong)), higher_is_better=False, target="= 0 (200 or 503 only)",
            max_ims=0),
        Row("rendition-burst", f"peak descendant processes (--resize-workers {workers}, worst round)", "count",
            **worst_of(lambda each: each.peak), higher_is_better=False, target=f"<= {workers}", max_ims=workers,
            note=f"/proc sampled every ~{BURST_SAMPLE_SECONDS * 1000:.0f} ms"),
        Row("rendition-burst", f"server process CPU per request, its own threads, at once ({runs})", "ms",
            **median_of(server_ms), higher_is_better=False,
            note="parsing, waiting for a resize slot, sending: not the resize processes"),
        Row("rendition-burst", f"same, {in_turn_label}", "ms", **median_of(server_ms, references),
            higher_is_better=False),
        Row("rendition-burst", f"resize processes' CPU per rendition, at once ({runs})", "ms",
            **median_of(render_ms), higher_is_better=False),
        Row("rendition-burst", f"same, {in_turn_label}", "ms", **median_of(render_ms, references),
            higher_is_better=False),
    ]


# ------------------------------------------------------------------------------------------
# The page for people (issue 11): GET / answers a browser with an HTML grid of PAGE_TILES tiles,
# each thumbnail a rendition (?width=240&height=240&fit=contain&format=webp&v=<version>, a 2x one
# in its srcset, loading="lazy"), cached on disk and revalidated by ETag (Cache-Control: no-cache).
# IMS only, each measure on fresh servers of its own over a folder of PAGE_IMAGES made JPEGs.
# ------------------------------------------------------------------------------------------


def make_page_images(folder: Path) -> None:
    """Fill folder with PAGE_IMAGES photo-like JPEGs of varied sizes about 640x480, and the shared photos.

    Each JPEG is a window of its own size and place on one noisy gradient, so that every
    thumbnail is a real decode, resize and encode. The photos take names among the first screen's
    (img-0001-<photo>.jpeg sorts right after img-0001.jpeg).
    """
    from PIL import Image

    folder.mkdir()
    width, height = PAGE_BASE_SIZE
    rng = random.Random(20250611)
    noise = Image.frombytes("RGB", PAGE_BASE_SIZE, rng.randbytes(width * height * 3))
    gradient = Image.merge("RGB", [Image.linear_gradient("L").resize(PAGE_BASE_SIZE),
                                   Image.linear_gradient("L").rotate(90).resize(PAGE_BASE_SIZE),
                                   Image.radial_gradient("L").resize(PAGE_BASE_SIZE)])
    picture = Image.blend(gradient, noise, 0.12)
    (low_width, high_width), (low_height, high_height) = PAGE_IMAGE_SIZES
    for index in range(PAGE_IMAGES):
        window_width, window_height = rng.randint(low_width, high_width), rng.randint(low_height, high_height)
        left, top = rng.randint(0, width - window_width), rng.randint(0, height - window_height)
        picture.crop((left, top, left + window_width, top + window_height)).save(
            folder / f"img-{index:04d}.jpeg", "JPEG", quality=PAGE_IMAGE_QUALITY)
    photos = sorted((SHARED / "photos").glob("*.jpeg"))
    for position, photo in zip(PAGE_PHOTO_POSITIONS, photos):
        shutil.copyfile(photo, folder / f"img-{position:04d}-{photo.name}")


@contextlib.contextmanager
def page_ims(bench: Bench, images: Path, label: str):
    """Start an IMS of its own, its requests logged, on a new storage folder of hard links to images; stop it after.

    A new folder has an empty rendition cache (.ims/renditions), and a fresh start has read no
    image's header yet. Yields (server, path of its log).
    """
    storage = bench.scratch / f"{label}-storage"
    storage.mkdir()
    for source in images.iterdir():
        try:
            os.link(source, storage / source.name)
        except OSError:
            shutil.copyfile(source, storage / source.name)
    log = bench.scratch / f"{label}-log.txt"
    server = start_ims(storage, bench.scratch, label=label, log=log)
    try:
        yield server, log
    finally:
        bench.problems.extend(f"{label}: {problem}" for problem in server.stop())


def timed_page(server: Server, path: str, tiles: int) -> tuple[float, int]:
    """GET path as a browser asks for it (its Accept) on a new connection; return (seconds to the whole body, bytes).

    Raises BenchError unless the answer is 200, HTML, with `tiles` thumbnails.
    """
    connection = http.client.HTTPConnection(server.host, server.port, timeout=RENDITION_CLIENT_TIMEOUT_SECONDS)
    try:
        started = time.perf_counter()
        connection.request("GET", path, headers={"Accept": BROWSER_ACCEPT})
        response = connection.getresponse()
        data = response.read()
        seconds = time.perf_counter() - started
    except (OSError, http.client.HTTPException) as error:
        raise BenchError(f"GET {path}: {type(error).__name__}: {error}") from None
    finally:
        connection.close()
    content_type = response.headers.get("Content-Type", "")
    if response.status != 200 or not content_type.startswith("text/html"):
        raise BenchError(f"GET {path} with a browser's Accept answered {response.status} {content_type}: "
                         f"{data[:120]!r}")
    found = data.count(b'<img class="thumb"')
    if found != tiles:
        raise BenchError(f"GET {path} answered a page of {found} thumbnails, not {tiles}")
    return seconds, len(data)


def log_size(log: Path) -> int:
    with contextlib.suppress(OSError):
        return log.stat().st_size
    return 0


def logged_requests(log: Path, offset: int) -> list[tuple[str, str, int]]:
    """Return the (method, path, status) of each request the server logged after byte offset of its log."""
    with open(log, "rb") as file:
        file.seek(offset)
        text = file.read().decode(errors="replace")
    return [(method, path, int(status)) for method, path, status in LOG_LINE.findall(text)]


def browser_unavailable() -> str | None:
    """Return why the page's browser rows cannot run (selenium, chromium or chromedriver missing), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (python3 -m pip install -r requirements-dev.txt)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing (apt-get install -y {package})"
    return None


def start_chromium(profile: Path):
    """Start headless Chromium through chromedriver on a new profile folder, PAGE_PROBE in every document.

    Returns the selenium WebDriver and the DevTools identifier of the probe; raises BenchError
    when the browser does not start.
    """
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    width, height = PAGE_WINDOW
    for argument in [*CHROMIUM_OPTIONS, f"--window-size={width},{height}", f"--user-data-dir={profile}"]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as error:
        raise BenchError(f"Chromium did not start: {error.msg or error}".strip()[:300]) from None
    try:
        driver.set_page_load_timeout(PAGE_DONE_TIMEOUT_SECONDS)
        probe = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_PROBE})
    except WebDriverException as error:
        driver.quit()
        raise BenchError(f"Chromium: {error.msg or error}".strip()[:300]) from None
    return driver, probe["identifier"]


def reload_without_probe(driver, probe: str, log: Path) -> tuple[float, str]:
    """Reload the page with PAGE_PROBE taken out, then put it back; return its DOMContentLoaded (ms) and the
    probe's new identifier. The check on what the probe costs the page: compare with a probed reload's."""
    from selenium.common.exceptions import WebDriverException

    try:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": probe})
        driver.refresh()
        size, quiet_since = log_size(log), time.monotonic()
        deadline = quiet_since + PAGE_DONE_TIMEOUT_SECONDS
        while time.monotonic() - quiet_since < PAGE_QUIET_SECONDS:
            if time.monotonic() > deadline:
                raise BenchError(f"the page still loaded after {PAGE_DONE_TIMEOUT_SECONDS} s")
            time.sleep(0.05)
            if log_size(log) != size:
                size, quiet_since = log_size(log), time.monotonic()
        loaded = driver.execute_script(
            'return performance.getEntriesByType("navigation")[0].domContentLoadedEventStart')
        probe = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_PROBE})["identifier"]
    except WebDriverException as error:
        raise BenchError(f"browser: {error.msg or error}".strip()[:300]) from None
    return loaded, probe


# Run by the browser in every document before the page's own script (through DevTools, so the
# page's Content-Security-Policy does not apply to it). For every thumbnail it notes when it loads
# (complete, naturalWidth > 0) and, from then, when img.decode() resolves (decoded, ready to
# paint); it marks each with elementtiming as the parser adds it, so that the Element Timing API
# tells when it was first painted (Chromium resolves decode() a frame or so later: on a reload
# that can be after the paint). At DOMContentLoaded it takes the thumbnails that intersect the
# viewport: the first screen (the <img> carry width and height, so that layout is the final one).
# It adds no layout of its own before then. Times are performance.now(): ms since navigation start.
PAGE_PROBE = """
(() => {
  if (window.__imsPage) return;
  performance.setResourceTimingBufferSize(100000);
  const probe = window.__imsPage = {images: new Map(), painted: new Map(), firstScreen: null, domContentLoaded: null,
    elementTiming: PerformanceObserver.supportedEntryTypes.includes("element")};
  const isThumb = (node) => node instanceof HTMLImageElement && node.classList.contains("thumb");
  const record = (img) => {
    if (!probe.images.has(img)) probe.images.set(img, {loaded: null, decoded: null, error: "", src: ""});
    return probe.images.get(img);
  };
  document.addEventListener("load", (event) => {
    const img = event.target;
    if (!isThumb(img)) return;
    const entry = record(img);
    entry.loaded = performance.now();
    entry.src = img.currentSrc;
    if (img.naturalWidth === 0) { entry.error = "loaded with naturalWidth 0"; return; }
    img.decode().then(() => { entry.decoded = performance.now(); }, (error) => { entry.error = "decode(): " + error; });
  }, true);
  document.addEventListener("error", (event) => {
    if (!isThumb(event.target)) return;
    const entry = record(event.target);
    entry.error = "error event";
    entry.src = event.target.currentSrc || event.target.src;
  }, true);
  // The parser adds each element by itself: looking at the added nodes alone is enough, and cheap
  // (a querySelectorAll under each made DOMContentLoaded ~25 ms later).
  new MutationObserver((mutations) => {
    for (const mutation of mutations) {
      for (const node of mutation.addedNodes) if (isThumb(node)) node.setAttribute("elementtiming", "thumb");
    }
  }).observe(document, {childList: true, subtree: true});
  if (probe.elementTiming) {
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        if (entry.element && isThumb(entry.element) && !probe.painted.has(entry.element)) {
          probe.painted.set(entry.element, entry.renderTime || entry.loadTime);
        }
      }
    }).observe({type: "element", buffered: true});
  }
  document.addEventListener("DOMContentLoaded", () => {
    probe.domContentLoaded = performance.now();
    probe.firstScreen = [...document.querySelectorAll("img.thumb")].filter((img) => {
      const box = img.getBoundingClientRect();
      return box.bottom > 0 && box.right > 0 && box.top < innerHeight && box.left < innerWidth;
    });
  });
})();
"""

# What the probe found once every first-screen thumbnail is decoded and painted, or failed (null
# before): those thumbnails with their resource timings, the navigation's, every thumbnail fetched.
PAGE_PROBE_RESULT = """
const probe = window.__imsPage;
if (!probe || probe.firstScreen === null) return null;
const first = probe.firstScreen.map((img) => [img, probe.images.get(img)]);
const settled = ([img, entry]) => entry && (entry.error || (entry.decoded !== null
  && (probe.painted.has(img) || !probe.elementTiming)));
if (!first.every(settled)) return null;
const timings = performance.getEntriesByType("resource");
const byName = new Map(timings.map((timing) => [timing.name, timing]));
const navigation = performance.getEntriesByType("navigation")[0];
const described = (timing) => timing && {name: timing.name, responseEnd: timing.responseEnd,
  transferSize: timing.transferSize, encodedBodySize: timing.encodedBodySize,
  responseStatus: timing.responseStatus ?? null};
return {
  domContentLoaded: probe.domContentLoaded, readyState: document.readyState, elementTiming: probe.elementTiming,
  loadEvent: navigation.loadEventStart,
  viewport: [innerWidth, innerHeight, devicePixelRatio],
  navigation: described(navigation),
  thumbs: document.querySelectorAll("img.thumb").length,
  firstScreen: first.map(([img, entry]) => ({src: entry.src, loaded: entry.loaded, decoded: entry.decoded,
    painted: probe.painted.get(img) ?? null, error: entry.error, naturalWidth: img.naturalWidth,
    timing: described(byName.get(entry.src))})),
  thumbnailTimings: timings.filter((timing) => timing.name.includes(arguments[0])).map(described),
};
"""


@dataclasses.dataclass
class PageLoad:
    """One load of the page in the browser, cold or a reload: its times in ms since navigation start, its requests."""

    loaded: float  # every first-screen thumbnail complete with naturalWidth > 0 (its load event)
    decoded: float  # every first-screen thumbnail decoded (img.decode() begun at its load has resolved)
    painted: float | None  # every first-screen thumbnail painted (Element Timing's renderTime), if supported
    html_end: float  # the HTML's responseEnd (navigation timing)
    dom_content_loaded: float
    load_event: float  # the navigation's loadEventStart
    last_thumbnail_end: float  # the latest responseEnd among the first screen's thumbnails (resource timing)
    last_thumbnail: str  # the image name of that thumbnail
    first_screen: int
    viewport: list
    failures: list[str]  # first-screen thumbnails that did not load or decode
    logged: collections.Counter  # the server's log: (what, status) -> count, what "page", "thumbnail" or a path
    fetched: collections.Counter  # the thumbnails' resource timings: "cache", "revalidated" or "downloaded"
    statuses: collections.Counter  # the thumbnails' responseStatus in their resource timings
    console: list[str]  # the browser's console errors


def fetched_how(timing: dict) -> str:
    """Tell from a resource timing whether the browser took it from its cache, revalidated it (304) or downloaded it.

    transferSize is 0 for a cache hit; Chromium counts a 304 as its 300 bytes of headers and no
    body (encodedBodySize 0: the body came from the cache), and a download as its body plus 300.
    """
    if timing["transferSize"] == 0:
        return "cache"
    if timing["encodedBodySize"] == 0 or timing["transferSize"] < timing["encodedBodySize"]:
        return "revalidated"
    return "downloaded"


def load_page(driver, server: Server, log: Path, path: str = "/", reload: bool = False) -> PageLoad:
    """Open path (or reload the page) in the browser; wait until the first screen is decoded and painted and the
    page asks for nothing more (its server's log unchanged for PAGE_QUIET_SECONDS); return what it took."""
    from selenium.common.exceptions import WebDriverException

    offset = log_size(log)
    try:
        if reload:
            driver.refresh()
        else:
            driver.get(server.url(path))
        found = None
        deadline = time.monotonic() + PAGE_DONE_TIMEOUT_SECONDS
        while found is None:
            if time.monotonic() > deadline:
                raise BenchError(f"the first screen was not decoded within {PAGE_DONE_TIMEOUT_SECONDS} s")
            time.sleep(0.05)
            found = driver.execute_script(PAGE_PROBE_RESULT, THUMBNAIL_MARK)
        size, quiet_since = log_size(log), time.monotonic()
        while time.monotonic() - quiet_since < PAGE_QUIET_SECONDS or found["readyState"] != "complete":
            if time.monotonic() > deadline:
                raise BenchError(f"the page still loaded after {PAGE_DONE_TIMEOUT_SECONDS} s")
            time.sleep(0.05)
            if log_size(log) != size:
                size, quiet_since = log_size(log), time.monotonic()
            found = driver.execute_script(PAGE_PROBE_RESULT, THUMBNAIL_MARK)
        console = [f"{entry.get('level')}: {entry.get('message', '')[:200]}" for entry in driver.get_log("browser")
                   if entry.get("level") == "SEVERE"]
    except WebDriverException as error:
        raise BenchError(f"browser: {error.msg or error}".strip()[:300]) from None
    server.check_alive()
    first = found["firstScreen"]
    if not first:
        raise BenchError(f"no img.thumb intersects the {found['viewport'][0]}x{found['viewport'][1]} viewport")
    failures = [f"{item['src'] or '(no source)'}: {item['error']}" for item in first if item["error"]]
    good = [item for item in first if not item["error"]]
    logged = collections.Counter()
    for _, logged_path, status in logged_requests(log, offset):
        what = "thumbnail" if THUMBNAIL_MARK in logged_path else "page" if logged_path.startswith("/?") or \
            logged_path == "/" else logged_path
        logged[what, status] += 1
    fetched = collections.Counter(fetched_how(timing) for timing in found["thumbnailTimings"])
    statuses = collections.Counter(timing["responseStatus"] for timing in found["thumbnailTimings"])
    ends = sorted((item["timing"]["responseEnd"], item["src"]) for item in good if item["timing"])
    last_end, last_source = ends[-1] if ends else (0, "")
    return PageLoad(
        loaded=max((item["loaded"] for item in good), default=0),
        decoded=max((item["decoded"] for item in good), default=0),
        painted=max((item["painted"] for item in good), default=0) if found["elementTiming"] else None,
        html_end=found["navigation"]["responseEnd"], dom_content_loaded=found["domContentLoaded"],
        load_event=found["loadEvent"],
        last_thumbnail_end=last_end,
        last_thumbnail=urllib.parse.unquote(urllib.parse.urlsplit(last_source).path.lstrip("/")),
        first_screen=len(first), viewport=found["viewport"], failures=failures, logged=logged, fetched=fetched,
        statuses=statuses, console=console)


def describe_load(load: PageLoad) -> str:
    """Return one load's figures for the notes."""
    logged = ", ".join(f"{what} {status} x{count}" for (what, status), count in sorted(load.logged.items()))
    fetched = ", ".join(f"{how} x{count}" for how, count in sorted(load.fetched.items()))
    statuses = ", ".join(f"{status} x{count}" for status, count in sorted(load.statuses.items(), key=str))
    painted = "n/a" if load.painted is None else f"{load.painted:.0f}"
    text = (f"HTML end {load.html_end:.0f} ms, DOMContentLoaded {load.dom_content_loaded:.0f}, load event "
            f"{load.load_event:.0f}, last first-screen thumbnail end {load.last_thumbnail_end:.0f} "
            f"({load.last_thumbnail}), loaded {load.loaded:.0f}, decoded {load.decoded:.0f}, painted {painted}; "
            f"server log: {logged or 'nothing'}; resource timings of thumbnails: {fetched or 'none'} "
            f"(responseStatus {statuses or '-'})")
    if load.failures:
        text += f"; FAILED ({len(load.failures)}): " + ", ".join(load.failures[:3])
    if load.console:
        text += f"; console errors ({len(load.console)}): " + " | ".join(load.console[:3])
    return text


def scenario_page(bench: Bench) -> list[Row]:
    rounds = max(bench.repeat, PAGE_MIN_ROUNDS)
    images = bench.scratch / "page-images"
    started = time.perf_counter()
    make_page_images(images)
    made = time.perf_counter() - started
    count = sum(1 for _ in images.iterdir())
    megabytes = sum(path.stat().st_size for path in images.iterdir()) / 1e6
    large = f"/?limit={PAGE_LARGE_LIMIT}"
    firsts, agains, large_firsts, large_agains, sizes = [], [], [], [], {}
    unavailable = browser_unavailable()
    colds: list[PageLoad] = []
    warms: list[list[PageLoad]] = []
    notes, browser_errors = [], []
    unprobed: list[float] = []  # DOMContentLoaded of reloads without the probe
    bigs: list[PageLoad] = []  # GET /?limit=1000 after the reloads
    for run in range(rounds):
        with page_ims(bench, images, f"page-html-{run}") as (server, _):
            seconds, sizes["/"] = timed_page(server, "/", PAGE_TILES)
            firsts.append(seconds)
            agains.extend(timed_page(server, "/", PAGE_TILES)[0] for _ in range(PAGE_HTML_RUNS))
            seconds, sizes[large] = timed_page(server, large, PAGE_LARGE_LIMIT)
            large_firsts.append(seconds)
            large_agains.extend(timed_page(server, large, PAGE_LARGE_LIMIT)[0] for _ in range(PAGE_HTML_RUNS))
        if unavailable:
            continue
        with page_ims(bench, images, f"page-browser-{run}") as (server, log):
            try:
                driver, probe = start_chromium(bench.scratch / f"page-profile-{run}")
            except BenchError as error:
                unavailable = str(error)
                continue
            try:
                cold = load_page(driver, server, log)
                warm = []
                for _ in range(PAGE_RELOADS):  # interleaved with as many reloads without the probe
                    warm.append(load_page(driver, server, log, reload=True))
                    loaded, probe = reload_without_probe(driver, probe, log)
                    unprobed.append(loaded)
                big = load_page(driver, server, log, large)
            except BenchError as error:
                browser_errors.append(f"round {run + 1}: {error}")
            else:
                colds.append(cold)
                warms.append(warm)
                bigs.append(big)
            finally:
                with contextlib.suppress(Exception):
                    driver.quit()

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    made_note = (f"{count} images ({PAGE_IMAGES} JPEGs of {PAGE_IMAGE_SIZES[0][0]}-{PAGE_IMAGE_SIZES[0][1]} x "
                 f"{PAGE_IMAGE_SIZES[1][0]}-{PAGE_IMAGE_SIZES[1][1]} pixels, quality {PAGE_IMAGE_QUALITY}, and the "
                 f"photos of {SHARED / 'photos'} as img-000N-<photo>.jpeg among the first tiles), {megabytes:.0f} MB, "
                 f"made in {made:.1f} s; each measure on a fresh IMS over a new folder of hard links to them; "
                 f"GET with Chromium's Accept ({BROWSER_ACCEPT}), a new connection each, until the whole body is read")
    rows = [
        Row("page", f"GET / to a browser, the first after a fresh start ({PAGE_TILES} tiles: their sizes read "
            f"from {PAGE_TILES} headers) (median of {rounds} starts)", "ms", ms(firsts), higher_is_better=False,
            note=made_note + "; each start: " + ", ".join(f"{seconds * 1000:.1f}" for seconds in firsts)),
        Row("page", f"GET / again, same server ({PAGE_TILES} tiles, sizes known) (median of "
            f"{len(agains)})", "ms", ms(agains), higher_is_better=False),
        Row("page", f"GET {large} next on that server ({PAGE_LARGE_LIMIT} tiles, {PAGE_LARGE_LIMIT - PAGE_TILES} "
            f"more headers read) (median of {rounds} starts)", "ms", ms(large_firsts), higher_is_better=False,
            note="each start: " + ", ".join(f"{seconds * 1000:.1f}" for seconds in large_firsts)),
        Row("page", f"GET {large} again (median of {len(large_agains)})", "ms", ms(large_agains),
            higher_is_better=False),
        Row("page", f"HTML of GET / ({PAGE_TILES} tiles)", "bytes", sizes["/"], higher_is_better=False),
        Row("page", f"HTML of GET {large}", "bytes", sizes[large], higher_is_better=False),
    ]
    width, height = PAGE_WINDOW
    if unavailable or not colds:
        rows.append(Row("page", "first screen of thumbnails in Chromium, cold and warm", "",
                        note=f"browser rows skipped: {unavailable or '; '.join(browser_errors)}"))
        return rows
    notes += [f"not measured: {error}" for error in browser_errors]
    reloads = [load for each in warms for load in each]
    for number, (cold, warm) in enumerate(zip(colds, warms), 1):
        notes.append(f"round {number} cold: {describe_load(cold)}")
        notes.extend(f"round {number} reload {index}: {describe_load(load)}" for index, load in enumerate(warm, 1))
        notes.append(f"round {number} {large}: {describe_load(bigs[number - 1])}")

    def median_of(loads: list[PageLoad], measure: Callable[[PageLoad], float]) -> float:
        return statistics.median(measure(load) for load in loads)

    def not_revalidated(load: PageLoad) -> int:
        return sum(count for (what, status), count in load.logged.items() if what == "thumbnail" and status != 304)

    def painted(loads: list[PageLoad]) -> float | None:
        return None if any(load.painted is None for load in loads) else median_of(loads, lambda load: load.painted)

    viewport = colds[0].viewport
    first_screens = sorted({load.first_screen for load in colds + reloads})
    cold_label = f"cold: fresh IMS, new folder, fresh profile (median of {len(colds)})"
    warm_label = f"warm: reload in the same browser (median of {len(reloads)}, {PAGE_RELOADS} a round)"
    console = [message for load in colds + reloads + bigs for message in load.console]
    failures = [failure for load in colds + reloads + bigs for failure in load.failures]
    no_painting = "" if painted(colds + reloads) is not None else "this Chromium has no Element Timing API"
    what = (f"headless Chromium ({' '.join(CHROMIUM_OPTIONS)} --window-size={width},{height}: viewport "
            f"{viewport[0]}x{viewport[1]}, devicePixelRatio {viewport[2]}, so the 1x thumbnails); the first screen is "
            "every img.thumb intersecting the viewport at DOMContentLoaded; ms from navigation start "
            "(performance.now()) until the Element Timing API has reported each of them painted (renderTime: "
            "decoded and on screen); a script added through DevTools notes it all (PAGE_PROBE)")
    for loads, label in ((colds, "cold"), (reloads, "warm")):
        rows += [
            Row("page", f"first screen of thumbnails painted, {cold_label if label == 'cold' else warm_label}", "ms",
                painted(loads), higher_is_better=False,
                note="; ".join([what, no_painting, *notes] if no_painting else [what, *notes]) if label == "cold"
                else ""),
            Row("page", f"  img.decode() resolved for each (called at its load event), {label}", "ms",
                median_of(loads, lambda load: load.decoded), higher_is_better=False,
                note="" if label == "cold" else "Chromium resolves decode() a frame or so after it has decoded: "
                                                 "it can come after the paint"),
            Row("page", f"  each loaded (complete, naturalWidth > 0: its load event), {label}", "ms",
                median_of(loads, lambda load: load.loaded), higher_is_better=False),
            Row("page", f"  the last first-screen thumbnail's responseEnd (resource timing), {label}", "ms",
                median_of(loads, lambda load: load.last_thumbnail_end), higher_is_better=False),
            Row("page", f"  DOMContentLoaded, {label}", "ms", median_of(loads, lambda load: load.dom_content_loaded),
                higher_is_better=False),
            Row("page", f"  the HTML's responseEnd (navigation timing), {label}", "ms",
                median_of(loads, lambda load: load.html_end), higher_is_better=False),
        ]
    rows += [
        Row("page", f"  DOMContentLoaded of a reload without the probe (median of {len(unprobed)})", "ms",
            statistics.median(unprobed), higher_is_better=False,
            note="each after a probed reload, in the same browser: against the warm DOMContentLoaded above, "
                 "what the probe costs the page; each: " + ", ".join(f"{loaded:.0f}" for loaded in unprobed)),
        Row("page", f"first screen of thumbnails painted, GET {large} ({PAGE_LARGE_LIMIT} tiles) next in that browser "
            f"(its thumbnails revalidated) (median of {len(bigs)})", "ms", painted(bigs), higher_is_better=False),
        Row("page", f"  DOMContentLoaded, {large}", "ms", median_of(bigs, lambda load: load.dom_content_loaded),
            higher_is_better=False),
        Row("page", f"  load event, {large}", "ms", median_of(bigs, lambda load: load.load_event),
            higher_is_better=False, note=f"against the warm reloads' of GET /: "
                                         f"{median_of(reloads, lambda load: load.load_event):.0f} ms"),
    ]
    rows += [
        Row("page", f"thumbnails on the first screen ({viewport[0]}x{viewport[1]})", "count",
            max(first_screens), note="" if len(first_screens) == 1 else f"varied: {first_screens}"),
        Row("page", "thumbnails asked for by a cold load (server log) (median)", "count",
            median_of(colds, lambda load: sum(count for (what, _), count in load.logged.items()
                                               if what == "thumbnail")),
            higher_is_better=False, note="the first screen and those lazy loading fetches ahead of the scroll"),
        Row("page", "thumbnail requests of a reload answered 304 (server log) (median)", "count",
            median_of(reloads, lambda load: load.logged["thumbnail", 304])),
        Row("page", f"thumbnail requests of a reload, or of {large} after them, answered otherwise (server log) "
            "(worst)", "count", max(not_revalidated(load) for load in reloads + bigs), higher_is_better=False,
            target="= 0", max_ims=0),
        Row("page", "thumbnails of a reload from the browser's cache, no request (resource timing) (median)",
            "count", median_of(reloads, lambda load: load.fetched["cache"]),
            note="resource timings: transferSize 0 is a cache hit; Chromium reports a 304 as transferSize 300, "
                 "encodedBodySize 0 (and responseStatus 200, the cached answer's)"),
        Row("page", f"thumbnails of a reload, or of {large} after them, downloaded whole (resource timing) (worst)",
            "count", max(load.fetched["downloaded"] for load in reloads + bigs), higher_is_better=False, target="= 0",
            max_ims=0),
        Row("page", "first-screen thumbnails that failed to load or decode, all loads", "count", len(failures),
            higher_is_better=False, target="= 0", max_ims=0, note="; ".join(failures[:5])),
        Row("page", "console errors (level SEVERE: CSP violations, failed loads), all loads", "count", len(console),
            higher_is_better=False, target="= 0", max_ims=0, note=" | ".join(console[:5])),
    ]
    return rows


# ------------------------------------------------------------------------------------------
# Robustness scenarios (issue 5): IMS only, each on a fresh server so the shared one is not
# disturbed and the figures do not depend on what ran before.
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_ims(bench: Bench, label: str, options: list[str] = (), kind: str = "ims"):
    """Start an IMS of its own on a storage folder with small.jpeg and 10 more names; stop it after.

    kind "before" runs the --baseline ims.py instead.
    """
    storage = bench.scratch / f"{label}-storage"
    storage.mkdir()
    shutil.copyfile(bench.small_image, storage / "small.jpeg")
    for index in range(10):
        shutil.copyfile(bench.small_image, storage / f"list-{index:03d}.jpeg")
    script = bench.baseline if kind == "before" else IMS_SCRIPT
    server = start_ims(storage, bench.scratch, list(options), label, script=script, kind=kind)
    try:
        yield server
    finally:
        bench.problems.extend(f"{label}: {problem}" for problem in server.stop())


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least fraction of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# Hostile requests sent over a raw socket: (what, bytes, the statuses that are a right answer).
CLIENT_ERRORS = range(400, 500)
MALFORMED_REQUESTS = [
    ("no HTTP version", b"GARBAGE\r\n\r\n", CLIENT_ERRORS),
    ("HTTP/0.9", b"GET /\r\n", CLIENT_ERRORS),
    ("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
     CLIENT_ERRORS),
    ("Transfer-Encoding and Content-Length",
     b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", CLIENT_ERRORS),
    ("header line without colon", b"GET / HTTP/1.1\r\nHost: b\r\nNo colon here\r\n\r\n", CLIENT_ERRORS),
    ("10 KB request line", b"GET /" + b"a" * 10_000 + b".jpeg HTTP/1.1\r\nHost: b\r\n\r\n", {414}),
    ("200 header fields", b"GET / HTTP/1.1\r\n" + b"X-Field: value\r\n" * 200 + b"\r\n", {431}),
    ("absurd Content-Length", b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 99999999999999999999\r\n\r\n",
     CLIENT_ERRORS),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: multipart/form-data; boundary=x\r\n\r\nzz\r\n", CLIENT_ERRORS),
    ("HTTP/1.0, a right request", b"GET / HTTP/1.0\r\n\r\n", {200}),
]


class SoakClient:
    """One client thread of the soak: a seeded mix of requests, each checked against its right status.

    It keeps one keep-alive connection (reopened when the server closes it) and opens new ones
    for the requests meant to arrive on a fresh connection. made counts requests sent; statuses
    the answers; unexpected the wrong answers and failed requests by kind.
    """

    def __init__(self, server: Server, seed: int, upload_data: bytes, etag: str, small_image_bytes: int):
        self.server = server
        self.small_image_bytes = small_image_bytes
        self.seed = seed
        self.rng = random.Random(seed)
        self.upload_data = upload_data
        self.etag = etag
        self.connection: http.client.HTTPConnection | None = None
        self.names: list[str] = []  # uploaded by this client and still stored
        self.uploads = 0
        self.made = 0
        self.statuses: collections.Counter = collections.Counter()
        self.unexpected: collections.Counter = collections.Counter()
        mix = [
            (12, self.list_keep_alive), (8, self.list_new_connection), (3, self.head_list),
            (12, self.get_image), (5, self.get_image_new_connection), (6, self.head_image),
            (4, self.get_not_modified), (3, self.get_range), (8, self.get_missing),
            (3, self.get_not_an_image), (2, self.get_unknown_job), (6, self.wrong_method),
            (7, self.raw_malformed), (5, self.upload), (2, self.upload_not_multipart),
            (6, self.delete), (1, self.resize_and_wait),
        ]
        self.weights = [weight for weight, _ in mix]
        self.operations = [operation for _, operation in mix]

    def run(self, quota: int, deadline: float) -> None:
        try:
            while self.made < quota and time.monotonic() < deadline:
                operation = self.rng.choices(self.operations, self.weights)[0]
                try:
                    operation()
                # An answer the client cannot make sense of (a job body that is not JSON) is counted,
                # not allowed to end this client's share of the soak.
                except Exception as error:  # noqa: BLE001
                    self.unexpected[f"{operation.__name__}: {type(error).__name__}: {error}"] += 1
        finally:
            if self.connection is not None:
                self.connection.close()

    # Sending and checking

    def check(self, what: str, expected, status: int) -> None:
        self.statuses[status] += 1
        if status not in expected:
            self.unexpected[f"{what}: {status}"] += 1

    def request(self, what: str, expected, method: str, path: str, body=None, headers=None,
                new_connection: bool = False, encode_chunked: bool = False):
        """Make one request; return (status, headers, body), or (None, None, b"") when it failed."""
        self.made += 1
        headers = dict(headers or {})
        if new_connection:
            connection = http.client.HTTPConnection(self.server.host, self.server.port,
                                                    timeout=CLIENT_TIMEOUT_SECONDS)
            headers["Connection"] = "close"
        else:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.server.host, self.server.port,
                                                             timeout=JOB_WAIT_SECONDS + 30)
            connection = self.connection
        try:
            connection.request(method, path, body, headers, encode_chunked=encode_chunked)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.unexpected[f"{what}: {type(error).__name__}"] += 1
            connection.close()
            return None, None, b""
        finally:
            if new_connection:
                connection.close()
        self.check(what, expected, response.status)
        return response.status, response.headers, data

    def raw(self, what: str, expected, data: bytes) -> None:
        """Send bytes on a new socket, read the one answer, close."""
        self.made += 1
        try:
            with socket.create_connection((self.server.host, self.server.port),
                                          timeout=CLIENT_TIMEOUT_SECONDS) as raw_socket:
                raw_socket.sendall(data)
                response = http.client.HTTPResponse(raw_socket, method="GET")
                try:
                    response.begin()
                    response.read()
                finally:
                    response.close()
        except (OSError, http.client.HTTPException) as error:
            self.unexpected[f"raw {what}: {type(error).__name__}"] += 1
            return
        self.check(f"raw {what}", expected, response.status)

    # The mix

    def list_keep_alive(self) -> None:
        self.request("GET /", {200}, "GET", "/")

    def list_new_connection(self) -> None:
        self.request("GET / (new connection)", {200}, "GET", "/", new_connection=True)

    def head_list(self) -> None:
        self.request("HEAD /", {200}, "HEAD", "/")

    def get_image(self, new_connection: bool = False) -> None:
        status, _, data = self.request("GET /small.jpeg", {200}, "GET", "/small.jpeg",
                                       new_connection=new_connection)
        if status == 200 and len(data) != self.small_image_bytes:
            self.unexpected[f"GET /small.jpeg: {len(data)} bytes"] += 1

    def get_image_new_connection(self) -> None:
        self.get_image(new_connection=True)

    def head_image(self) -> None:
        self.request("HEAD /small.jpeg", {200}, "HEAD", "/small.jpeg")

    def get_not_modified(self) -> None:
        self.request("GET If-None-Match", {304}, "GET", "/small.jpeg", headers={"If-None-Match": self.etag})

    def get_range(self) -> None:
        self.request("GET Range", {206}, "GET", "/small.jpeg", headers={"Range": "bytes=100-199"})

    def get_missing(self) -> None:
        self.request("GET missing image", {404}, "GET", f"/missing-{self.seed}-{self.made}.jpeg")

    def get_not_an_image(self) -> None:
        self.request("GET non-image path", {404}, "GET", self.rng.choice(["/notes.txt", "/favicon.ico", "/a/b.png"]))

    def get_unknown_job(self) -> None:
        self.request("GET unknown job", {404}, "GET", f"/jobs/{self.rng.getrandbits(64):016x}")

    def wrong_method(self) -> None:
        method, path = self.rng.choice([("PUT", "/"), ("DELETE", "/"), ("PATCH", "/"), ("PUT", "/small.jpeg"),
                                        ("POST", "/small.jpeg"), ("DELETE", "/jobs/0")])
        self.request(f"{method} {path}", {405}, method, path)

    def raw_malformed(self) -> None:
        what, data, expected = self.rng.choice(MALFORMED_REQUESTS)
        self.raw(what, expected, data)

    def upload_name(self) -> str | None:
        """Upload a new tiny PNG (one in four chunked); return its name, or None if refused."""
        self.uploads += 1
        name = f"soak-{self.seed}-{self.uploads:05d}.png"
        body, content_type = multipart_body(name, self.upload_data)
        chunked = self.rng.random() < 0.25
        if chunked:
            body = iter([body[:100], body[100:]])
        status, _, _ = self.request("POST upload" + (" chunked" if chunked else ""), {201}, "POST", "/", body,
                                    {"Content-Type": content_type}, encode_chunked=chunked)
        if status != 201:
            return None
        self.names.append(name)
        return name

    def upload(self) -> None:
        name = self.upload_name()
        if name is not None and self.rng.random() < 0.3:
            body, content_type = multipart_body(name, self.upload_data)
            self.request("POST upload again", {409}, "POST", "/", body, {"Content-Type": content_type})

    def upload_not_multipart(self) -> None:
        self.request("POST text/plain", {415}, "POST", "/", b"not a form", {"Content-Type": "text/plain"})

    def delete(self) -> None:
        if self.names:
            self.request("DELETE", {204}, "DELETE", "/" + self.names.pop(0))
        else:
            self.request("DELETE missing", {404}, "DELETE", f"/gone-{self.seed}-{self.made}.png")

    def resize_and_wait(self) -> None:
        """PATCH an uploaded image (JSON body or query string), then GET its job with ?wait=."""
        name = self.names[-1] if self.names else self.upload_name()
        if name is None:
            return
        size = self.rng.choice([4, 8, 12])
        if self.rng.random() < 0.5:
            status, headers, _ = self.request("PATCH (JSON)", {202}, "PATCH", "/" + name,
                                              json.dumps({"width": size, "height": size}).encode(),
                                              {"Content-Type": "application/json"})
        else:
            status, headers, _ = self.request("PATCH (query)", {202}, "PATCH", f"/{name}?width={size}&height={size}")
        if status != 202:
            return
        status, _, data = self.request("GET job ?wait", {200}, "GET", f"{headers.get('Location')}?wait={JOB_WAIT_SECONDS}")
        if status == 200:
            state = json.loads(data).get("state")
            if state != "done":
                self.unexpected[f"resize job {state}"] += 1


def scenario_soak(bench: Bench) -> list[Row]:
    tiny_png = make_tiny_png()
    small_image_bytes = bench.small_image.stat().st_size
    with fresh_ims(bench, "soak") as server:
        pid = server.process.pid
        at_start = process_stats(pid)
        connection = server.connect()
        connection.request("HEAD", "/small.jpeg")
        response = connection.getresponse()
        response.read()
        connection.close()
        etag = response.headers.get("ETag", "")
        # A warm-up first, so first-use costs (imports, caches, the first resize) are not counted as growth.
        warm_up = SoakClient(server, 0, tiny_png, etag, small_image_bytes)
        warm_up.run(SOAK_WARMUP_REQUESTS, time.monotonic() + SOAK_SECONDS)
        wait_for(lambda: process_stats(pid).threads <= at_start.threads, SETTLE_SECONDS)
        before = process_stats(pid)

        clients = [SoakClient(server, index + 1, tiny_png, etag, small_image_bytes) for index in range(SOAK_CLIENTS)]
        quota = SOAK_REQUESTS // SOAK_CLIENTS
        deadline = time.monotonic() + SOAK_SECONDS
        elapsed = run_threads([threading.Thread(target=client.run, args=(quota, deadline)) for client in clients])
        server.check_alive()
        settle_started = time.monotonic()
        settled = wait_for(lambda: process_stats(pid).threads <= before.threads, SETTLE_SECONDS)
        settle_seconds = time.monotonic() - settle_started
        after = process_stats(pid)

    made = sum(client.made for client in clients)
    statuses = sum((client.statuses for client in clients), collections.Counter())
    unexpected = sum((client.unexpected for client in clients), collections.Counter())
    notes = [f"{made:,} requests in {elapsed:.1f} s after a {warm_up.made}-request warm-up "
             f"(at start: RSS {at_start.rss_mb:.1f} MB, threads {at_start.threads}, fds {at_start.fds}); "
             "answers: " + ", ".join(f"{status} x{count}" for status, count in sorted(statuses.items()))]
    if made < SOAK_REQUESTS:
        notes.append(f"stopped at the {SOAK_SECONDS} s limit")
    if unexpected:
        notes.append("unexpected: " + ", ".join(f"{what} x{count}" for what, count in unexpected.most_common(8)))
    if warm_up.unexpected:
        notes.append("warm-up unexpected: " + ", ".join(f"{what} x{count}" for what, count
                                                        in warm_up.unexpected.most_common(4)))
    settle = (f"threads back to {after.threads} {settle_seconds:.1f} s after the load" if settled else
              f"threads still {after.threads} (before: {before.threads}) {SETTLE_SECONDS} s after the load")
    return [
        Row("soak", f"{made:,} mixed requests, {SOAK_CLIENTS} clients", "req/s", made / elapsed,
            note="; ".join(notes)),
        Row("soak", "unexpected answers (wrong status, 5xx, failed requests)", "count",
            sum(unexpected.values()), target="= 0", max_ims=0),
        Row("soak", "server threads, before", "count", before.threads),
        Row("soak", "server threads, after (settled)", "count", after.threads, higher_is_better=False,
            target="<= before", max_ims=before.threads, note=settle),
        Row("soak", "server open fds, before", "count", before.fds),
        Row("soak", "server open fds, after", "count", after.fds),
        Row("soak", "open fd growth", "fds", after.fds - before.fds, higher_is_better=False,
            target=f"<= {SOAK_MAX_FD_GROWTH}", max_ims=SOAK_MAX_FD_GROWTH),
        Row("soak", "server RSS, before", "MB", before.rss_mb),
        Row("soak", "server RSS, after", "MB", after.rss_mb),
        Row("soak", "RSS growth", "MB", after.rss_mb - before.rss_mb, higher_is_better=False,
            target=f"<= {SOAK_MAX_RSS_GROWTH_MB} MB", max_ims=SOAK_MAX_RSS_GROWTH_MB),
    ]


def timed_list_requests(server: Server, count: int, interval: float) -> tuple[list[float], list[str]]:
    """GET / on a new connection each, started interval apart; return (seconds each, failures).

    A request that fails or is not answered 200 counts as never finished: math.inf seconds.
    """
    times, failures = [], []
    next_start = time.monotonic()
    for _ in range(count):
        pause = next_start - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        next_start += interval
        started = time.perf_counter()
        connection = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT_SECONDS)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                failures.append(f"answered {response.status}")
        except (OSError, http.client.HTTPException) as error:
            failures.append(type(error).__name__)
        finally:
            connection.close()
        times.append(math.inf if len(failures) > len(times) else time.perf_counter() - started)
    return times, failures


def scenario_slow_clients(bench: Bench) -> list[Row]:
    # Longer than SLOW_SECONDS / SLOW_BYTE_INTERVAL_SECONDS bytes, so no head is ever complete.
    head = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-slow-client, a byte at a time\r\n"
            b"Accept: */*\r\n\r\n")
    steps = int(SLOW_SECONDS / SLOW_BYTE_INTERVAL_SECONDS)
    assert steps < len(head)
    with fresh_ims(bench, "slow") as server:
        quiet_times, quiet_failures = timed_list_requests(server, SLOW_PROBES, 0)
        sockets: list[socket.socket] = []
        send_failures = collections.Counter()
        threads_seen = [0]

        def trickle() -> None:
            # Byte k of socket i goes at k * interval + i * interval / SLOW_SOCKETS: evenly spread.
            began = time.monotonic()
            for step in range(steps):
                for index, slow in enumerate(sockets):
                    pause = (began + step * SLOW_BYTE_INTERVAL_SECONDS
                             + index * SLOW_BYTE_INTERVAL_SECONDS / SLOW_SOCKETS - time.monotonic())
                    if pause > 0:
                        time.sleep(pause)
                    try:
                        slow.send(head[step:step + 1])
                    except OSError as error:
                        send_failures[type(error).__name__] += 1
                with contextlib.suppress(OSError, BenchError):
                    threads_seen[0] = max(threads_seen[0], read_status_kib(server.process.pid, "Threads"))

        try:
            for _ in range(SLOW_SOCKETS):
                sockets.append(socket.create_connection((server.host, server.port), timeout=CLIENT_TIMEOUT_SECONDS))
            trickler = threading.Thread(target=trickle)
            trickler.start()
            time.sleep(SLOW_BYTE_INTERVAL_SECONDS)  # every socket has sent its first byte
            interval = (SLOW_SECONDS - 2 * SLOW_BYTE_INTERVAL_SECONDS) / SLOW_PROBES
            slow_times, slow_failures = timed_list_requests(server, SLOW_PROBES, interval)
            trickler.join()
            still_open = 0
            for slow in sockets:
                slow.setblocking(False)
                try:
                    if slow.recv(1) == b"":
                        continue  # closed by the server
                except BlockingIOError:
                    still_open += 1
                except OSError:
                    continue
        finally:
            for slow in sockets:
                slow.close()

    notes = [f"{still_open} of {SLOW_SOCKETS} slow sockets still open after {SLOW_SECONDS} s "
             f"(--timeout is 30 s); server threads peaked at {threads_seen[0]}; "
             f"max {max(slow_times) * 1000:.0f} ms"]
    if send_failures:
        notes.append("trickle sends failed: " + ", ".join(f"{what} x{count}" for what, count in send_failures.items()))
    if slow_failures or quiet_failures:
        notes.append(f"GET / failed {len(slow_failures)} times with slow sockets ({', '.join(slow_failures[:4])}), "
                     f"{len(quiet_failures)} without")
    return [
        Row("slow-clients", f"GET / p50, new connection, no slow sockets ({SLOW_PROBES})", "ms",
            percentile(quiet_times, 0.5) * 1000, higher_is_better=False),
        Row("slow-clients", "same, p99", "ms", percentile(quiet_times, 0.99) * 1000, higher_is_better=False),
        Row("slow-clients", f"GET / p50 while {SLOW_SOCKETS} sockets trickle heads ({SLOW_PROBES})", "ms",
            percentile(slow_times, 0.5) * 1000, higher_is_better=False, note="; ".join(notes)),
        Row("slow-clients", "same, p99", "ms", percentile(slow_times, 0.99) * 1000, higher_is_better=False,
            target=f"<= {SLOW_MAX_P99_MS} ms", max_ims=SLOW_MAX_P99_MS),
    ]


@dataclasses.dataclass
class BurstResult:
    """What one PATCH burst gave: answers by status, each answer's latency, the jobs' ends, the processes."""

    statuses: collections.Counter
    failures: collections.Counter
    latencies: list[float]  # seconds from sending a PATCH to reading its whole answer
    burst_seconds: float
    drain_seconds: float
    states: collections.Counter
    sampler: DescendantSampler


def run_patch_burst(bench: Bench, label: str, kind: str, options: list[str]) -> BurstResult:
    """Send BURST_PATCHES PATCHes from BURST_CLIENTS keep-alive clients to a fresh server, then wait for the jobs."""
    with fresh_ims(bench, label, options, kind=kind) as server:
        names = [server.fresh_name("burst") for _ in range(BURST_IMAGES)]
        for name in names:
            upload_file(server, bench.small_image, name)
        statuses = collections.Counter()
        locations: list[str] = []
        failures = collections.Counter()
        latencies: list[float] = []
        lock = threading.Lock()

        def send(client: int) -> None:
            connection = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT_SECONDS)
            try:
                for number in range(client, BURST_PATCHES, BURST_CLIENTS):
                    side = 100 + 20 * (number % 2)
                    started = time.perf_counter()
                    try:
                        status, headers, _ = request_json(connection, "PATCH", "/" + names[number % BURST_IMAGES],
                                                          {"width": side, "height": side})
                    except (OSError, http.client.HTTPException) as error:
                        connection.close()
                        with lock:
                            failures[type(error).__name__] += 1
                        continue
                    latency = time.perf_counter() - started
                    with lock:
                        latencies.append(latency)
                        statuses[status] += 1
                        if status == 202:
                            locations.append(headers.get("Location"))
                        elif status == 503 and not headers.get("Retry-After"):
                            failures["503 without Retry-After"] += 1
            finally:
                connection.close()

        with DescendantSampler(server.process.pid, BURST_SAMPLE_SECONDS) as sampler:
            time.sleep(0.1)  # a few samples of the idle server
            clients = [threading.Thread(target=send, args=(client,)) for client in range(BURST_CLIENTS)]
            burst_seconds = run_threads(clients)
            # The accepted jobs run on after the burst: keep sampling until every one has ended.
            drain_started = time.perf_counter()
            states = collections.Counter()
            deadline = time.monotonic() + BURST_DRAIN_SECONDS
            connection = server.connect()
            try:
                for location in locations:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        states["not waited for (time limit)"] += 1
                        continue
                    status, _, job = request_json(connection, "GET", f"{location}?wait={remaining:.1f}")
                    states[job.get("state") if status == 200 and isinstance(job, dict) else f"GET {status}"] += 1
            finally:
                connection.close()
            drain_seconds = time.perf_counter() - drain_started
            time.sleep(0.1)
        server.check_alive()
    return BurstResult(statuses, failures, latencies, burst_seconds, drain_seconds, states, sampler)


def scenario_patch_burst(bench: Bench) -> list[Row]:
    workers = os.cpu_count() or 1
    options = ["--resize-workers", str(workers), "--max-queue", str(BURST_MAX_QUEUE)]
    # IMS, and the --baseline IMS when there is one, so that what durable job records cost shows;
    # --repeat bursts of each, interleaved, each on a fresh server.
    kinds = ["ims", "before"] if bench.baseline else ["ims"]
    results: dict[str, list[BurstResult]] = {kind: [] for kind in kinds}
    failed = {}
    for run in range(bench.repeat):
        for kind in kinds:
            if kind in failed:
                continue
            try:
                results[kind].append(run_patch_burst(bench, f"burst-{kind}-{run}", kind, options))
            except BenchError as error:
                if kind == "ims":
                    raise
                failed[kind] = f"{kind}: {error}"
    results = {kind: runs for kind, runs in results.items() if runs and kind not in failed}

    def median_of_runs(measure: Callable[[BurstResult], float]) -> dict[str, float | None]:
        return columns({kind: statistics.median(measure(each) for each in runs) for kind, runs in results.items()})

    def worst_of_runs(measure: Callable[[BurstResult], float]) -> dict[str, float | None]:
        return columns({kind: max(measure(each) for each in runs) for kind, runs in results.items()})

    def wrong_answers(each: BurstResult) -> int:
        return (sum(count for status, count in each.statuses.items() if status not in (202, 503))
                + sum(each.failures.values()))

    def latency_ms(fraction: float) -> Callable[[BurstResult], float]:
        return lambda each: percentile(each.latencies, fraction) * 1000 if each.latencies else math.inf

    limit = workers + BURST_HELPER_PROCESSES
    notes = []
    for kind, runs in results.items():
        for number, each in enumerate(runs, 1):
            note = (f"{kind} run {number}: burst took {each.burst_seconds:.2f} s, answers "
                    + ", ".join(f"{status} x{count}" for status, count in sorted(each.statuses.items()))
                    + f", p99 {latency_ms(0.99)(each):.1f} ms, max {max(each.latencies, default=0) * 1000:.0f} ms"
                    + f"; its jobs ended {each.drain_seconds:.1f} s later: "
                    + ", ".join(f"{state} x{count}" for state, count in each.states.most_common()))
            if each.failures:
                note += "; failed: " + ", ".join(f"{what} x{count}" for what, count in each.failures.items())
            notes.append(note)
    notes.extend(failed.values())
    peak = max(results["ims"], key=lambda each: each.sampler.peak).sampler
    depth_names = {1: "children", 2: "grandchildren"}
    makeup = ", ".join(f"{count} {depth_names.get(depth, f'at depth {depth}')}"
                       for depth, count in sorted(peak.peak_by_depth.items()))
    process_note = (f"{peak.samples:,} samples of /proc every ~{BURST_SAMPLE_SECONDS * 1000:.0f} ms in IMS's "
                    f"run with the highest peak; at that peak: {makeup or 'none'}; "
                    f"at most {peak.peak_zombies} unreaped zombie(s) at once")
    runs = f"median of {bench.repeat} bursts"
    return [
        Row("patch-burst", f"{BURST_PATCHES} PATCHes, {BURST_CLIENTS} keep-alive clients ({runs})", "req/s",
            **median_of_runs(lambda each: sum(each.statuses.values()) / each.burst_seconds), note="; ".join(notes)),
        Row("patch-burst", f"PATCH answer latency, p50 ({runs})", "ms", **median_of_runs(latency_ms(0.5)),
            higher_is_better=False),
        Row("patch-burst", f"PATCH answer latency, p99 ({runs})", "ms", **median_of_runs(latency_ms(0.99)),
            higher_is_better=False, target=f"< {BURST_MAX_P99_MS} ms", max_ims=BURST_MAX_P99_MS),
        Row("patch-burst", f"accepted (202, {runs})", "count", **median_of_runs(lambda each: each.statuses[202])),
        Row("patch-burst", f"refused (503, --max-queue {BURST_MAX_QUEUE}, {runs})", "count",
            **median_of_runs(lambda each: each.statuses[503])),
        Row("patch-burst", "other answers and failed requests (worst burst)", "count",
            **worst_of_runs(wrong_answers), higher_is_better=False, target="= 0 (202 or 503 only)", max_ims=0),
        Row("patch-burst", f"peak descendant processes ({workers} resize workers, worst burst)", "count",
            **worst_of_runs(lambda each: each.sampler.peak), higher_is_better=False,
            target=f"<= {limit} (workers + 2)", max_ims=limit, note=process_note),
    ]


# ------------------------------------------------------------------------------------------
# Scaling scenarios (issue 9): IMS only, on servers of their own: --workers, several instances
# on one folder behind nginx, and resizes spread over them.
# ------------------------------------------------------------------------------------------

SCALE_PATHS = [("/", f"GET / ({LIST_NAMES} names)"), ("/small.jpeg", "GET 20 KB JPEG")]


def stop_later(stack: contextlib.ExitStack, bench: Bench, label: str, server: Server | NginxFront) -> None:
    """Stop a server when the stack closes, noting in bench.problems what went wrong."""
    stack.callback(lambda: bench.problems.extend(f"{label}: {problem}" for problem in server.stop()))


def start_cluster(stack: contextlib.ExitStack, bench: Bench, label: str, storage: Path,
                  instance_storages: list[Path] | None = None) -> tuple[list[Server], NginxFront]:
    """Start CLUSTER_INSTANCES IMS on one folder and nginx in front of them; all stop when the stack closes.

    instance_storages, when given, are each instance's own path to the folder (mounts of one volume,
    as on several hosts); nginx's static server serves storage.
    """
    instances = []
    for index, folder in enumerate(instance_storages or [storage] * CLUSTER_INSTANCES):
        instance = start_ims(folder, bench.scratch, [], f"{label}-{index}")
        stop_later(stack, bench, f"{label} instance {index}", instance)
        instances.append(instance)
    front = start_nginx(bench.scratch / f"{label}-nginx", instances, storage)
    stop_later(stack, bench, f"{label} nginx", front)
    return instances, front


def check_answers(server: Server, paths: list[str]) -> None:
    """GET each path once (a warm-up); raise BenchError unless every answer is 200."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        for path in paths:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise BenchError(f"GET {path} on port {server.port} answered {response.status}")
    finally:
        connection.close()


def in_turn(servers: dict, run: int) -> list:
    """Return the (key, server) pairs in order on even runs and reversed on odd ones (A B, B A, ...).

    Whichever server goes first in a round meets the machine as the last round left it, so the
    order alternates rather than favouring one.
    """
    pairs = list(servers.items())
    return pairs if run % 2 == 0 else pairs[::-1]


def shares(ticks: list[int]) -> str:
    """Return each part's share of the total, as "50/30/20 %"."""
    total = sum(ticks)
    return "/".join(f"{100 * part / total:.0f}" for part in ticks) + " %" if total else "no CPU used"


def scenario_workers(bench: Bench) -> list[Row]:
    clock_ticks = os.sysconf("SC_CLK_TCK")
    # "pinned" is --workers 1 held to one CPU: a reference for what one process can do when its
    # threads do not hand the GIL from one core to the other.
    setups = {"1": (["--workers", "1"], None), "2": (["--workers", "2"], None), "pinned": (["--workers", "1"], {0})}
    rates = {(path, setup): [] for path, _ in SCALE_PATHS for setup in setups}
    busy = {(path, setup): [] for path, _ in SCALE_PATHS for setup in setups}  # cores: server tree, wrk
    worker_ticks = {path: collections.Counter() for path, _ in SCALE_PATHS}
    errors = collections.Counter()
    with contextlib.ExitStack() as stack:
        servers = {}
        for setup, (options, cpus) in setups.items():
            storage = bench.scratch / f"workers-{setup}-storage"
            prepare_storage(storage, bench.small_image)
            servers[setup] = start_ims(storage, bench.scratch, options, f"workers-{setup}", cpus=cpus)
            stop_later(stack, bench, f"workers {setup}", servers[setup])
        for server in servers.values():
            check_answers(server, [path for path, _ in SCALE_PATHS])
        worker_pids = children_of(servers["2"].process.pid)
        for path, _ in SCALE_PATHS:
            for run in range(max(bench.repeat, SCALE_MIN_RUNS)):
                for setup, server in in_turn(servers, run):
                    server.check_alive()
                    workers = children_of(server.process.pid) if setup == "2" else []
                    ticks_before = tree_cpu_ticks(server.process.pid)
                    workers_before = {pid: tree_cpu_ticks(pid) for pid in workers}
                    wrk_before = own_cpu_seconds()
                    started = time.perf_counter()
                    result = run_wrk(server.url(path), SCALE_WRK_ARGUMENTS)
                    elapsed = time.perf_counter() - started
                    rates[path, setup].append(result["requests_per_second"])
                    errors[setup] += result["errors"]
                    server_cores = (tree_cpu_ticks(server.process.pid) - ticks_before) / clock_ticks / elapsed
                    busy[path, setup].append((server_cores, (own_cpu_seconds() - wrk_before) / elapsed))
                    for pid, before in workers_before.items():
                        worker_ticks[path][pid] += tree_cpu_ticks(pid) - before
        later_pids = children_of(servers["2"].process.pid)

    command = " ".join(SCALE_WRK_ARGUMENTS[:2])
    names = {"1": "--workers 1", "2": "--workers 2", "pinned": "--workers 1 pinned to one CPU"}
    rows = []
    for path, label in SCALE_PATHS:
        medians = {setup: statistics.median(rates[path, setup]) for setup in setups}
        notes = {}
        for setup in setups:
            server_cores = statistics.median(cores for cores, _ in busy[path, setup])
            wrk_cores = statistics.median(cores for _, cores in busy[path, setup])
            notes[setup] = (f"runs {', '.join(f'{rate:,.0f}' for rate in rates[path, setup])}; "
                            f"server tree busy {server_cores:.2f} cores, wrk {wrk_cores:.2f} cores (medians)")
        notes["2"] += f"; CPU split over its workers {shares(list(worker_ticks[path].values()))}"
        notes["pinned"] = "a reference (sched_setaffinity to CPU 0, as taskset -c 0 does); " + notes["pinned"]
        pair_ratios = [two / one for one, two in zip(rates[path, "1"], rates[path, "2"])]
        rows += [
            *(Row("workers", f"{label}, {names[setup]}, wrk {command}", "req/s", medians[setup], note=notes[setup])
              for setup in setups),
            Row("workers", f"{label}, --workers 2 / --workers 1", "x", medians["2"] / medians["1"],
                target=f">= {WORKERS_MIN_FACTOR}", min_ims=WORKERS_MIN_FACTOR,
                note="ratio of each interleaved pair of runs: " + ", ".join(f"{ratio:.2f}" for ratio in pair_ratios)),
            Row("workers", f"{label}, --workers 2 / --workers 1 pinned", "x", medians["2"] / medians["pinned"]),
        ]
    problems = [f"{names[setup]}: {count} socket errors or non-2xx answers" for setup, count in errors.items() if count]
    if len(worker_pids) != 2:
        problems.append(f"--workers 2 had {len(worker_pids)} child process(es), not 2: {worker_pids}")
    if set(later_pids) != set(worker_pids):
        problems.append(f"--workers 2's children changed during the runs: {worker_pids} then {later_pids}")
    if problems:
        rows[-1].note = "; ".join(problems)
    return rows


def scenario_nginx(bench: Bench) -> list[Row]:
    storage = bench.scratch / "nginx-storage"
    prepare_storage(storage, bench.small_image)
    direct_storage = bench.scratch / "nginx-direct-storage"
    prepare_storage(direct_storage, bench.small_image)
    kinds = ("proxy", "direct", "static")
    rates = {(path, kind): [] for path, _ in SCALE_PATHS for kind in kinds}
    errors = collections.Counter()
    instance_ticks = {path: [0] * CLUSTER_INSTANCES for path, _ in SCALE_PATHS}
    busy = {(path, kind): [] for path, _ in SCALE_PATHS for kind in kinds}  # cores: IMS, nginx
    clock_ticks = os.sysconf("SC_CLK_TCK")
    with contextlib.ExitStack() as stack:
        direct = start_ims(direct_storage, bench.scratch, [], "nginx-direct")
        stop_later(stack, bench, "nginx direct", direct)
        instances, front = start_cluster(stack, bench, "nginx", storage)
        targets = {"proxy": front.proxy, "direct": direct, "static": front.static}
        for target in targets.values():
            check_answers(target, [path for path, _ in SCALE_PATHS])
        for path, _ in SCALE_PATHS:
            for run in range(max(bench.repeat, SCALE_MIN_RUNS)):
                for kind, target in in_turn(targets, run):
                    for instance in (*instances, direct):
                        instance.check_alive()
                    before = [tree_cpu_ticks(instance.process.pid) for instance in (*instances, direct)]
                    nginx_before = tree_cpu_ticks(front.proxy.process.pid)
                    started = time.perf_counter()
                    result = run_wrk(target.url(path), SCALE_WRK_ARGUMENTS)
                    elapsed = time.perf_counter() - started
                    rates[path, kind].append(result["requests_per_second"])
                    errors[kind] += result["errors"]
                    used = [tree_cpu_ticks(instance.process.pid) - ticks
                            for instance, ticks in zip((*instances, direct), before)]
                    nginx_used = tree_cpu_ticks(front.proxy.process.pid) - nginx_before
                    busy[path, kind].append((sum(used) / clock_ticks / elapsed, nginx_used / clock_ticks / elapsed))
                    if kind == "proxy":
                        for index in range(CLUSTER_INSTANCES):
                            instance_ticks[path][index] += used[index]

    command = " ".join(SCALE_WRK_ARGUMENTS[:2])
    rows = []
    for path, label in SCALE_PATHS:
        medians = {kind: statistics.median(rates[path, kind]) for kind in kinds}
        runs = {kind: "runs " + ", ".join(f"{rate:,.0f}" for rate in rates[path, kind])
                + f"; IMS busy {statistics.median(ims for ims, _ in busy[path, kind]):.2f} cores, "
                f"nginx {statistics.median(nginx for _, nginx in busy[path, kind]):.2f} (medians)"
                for kind in kinds}
        static_what = "autoindex, JSON" if path == "/" else "a file"
        rows += [
            Row("nginx", f"{label} via nginx to {CLUSTER_INSTANCES} instances, wrk {command}", "req/s",
                medians["proxy"], note=f"{runs['proxy']}; CPU split over the instances "
                                       f"{shares(instance_ticks[path])}"),
            Row("nginx", f"{label}, one instance direct", "req/s", medians["direct"], note=runs["direct"]),
            Row("nginx", f"{label}, nginx serving the folder ({static_what})", "req/s", medians["static"],
                note=f"a reference, not IMS; {runs['static']}"),
            Row("nginx", f"{label}: via nginx to {CLUSTER_INSTANCES} / one direct", "x",
                medians["proxy"] / medians["direct"]),
            Row("nginx", f"{label}: via nginx to {CLUSTER_INSTANCES} / nginx static", "x",
                medians["proxy"] / medians["static"]),
        ]
    config = (f"nginx worker_processes auto ({os.cpu_count()} CPUs), upstream round robin, keepalive "
              f"{NGINX_KEEPALIVE}, proxy_http_version 1.1, Connection \"\", proxy_request_buffering off, access_log off")
    problems = [f"{kind}: {count} socket errors or non-2xx answers" for kind, count in errors.items() if count]
    rows[0].note += "; " + "; ".join([config, *problems])
    return rows


def scenario_nginx_resize(bench: Bench) -> list[Row]:
    photos = sorted((SHARED / "photos").glob("*.jpeg"))
    if not photos:
        raise BenchError(f"no photos in {SHARED / 'photos'}")
    storage = bench.scratch / "spread-storage"
    storage.mkdir()
    direct_storage = bench.scratch / "spread-direct-storage"
    direct_storage.mkdir()
    kinds = ("proxy", "direct")
    times = {kind: [] for kind in kinds}
    instance_ticks = [0] * CLUSTER_INSTANCES
    with contextlib.ExitStack() as stack:
        direct = start_ims(direct_storage, bench.scratch, [], "spread-direct")
        stop_later(stack, bench, "nginx-resize direct", direct)
        instances, front = start_cluster(stack, bench, "spread", storage)
        targets = {"proxy": front.proxy, "direct": direct}
        for run in range(bench.repeat):
            for kind, target in in_turn(targets, run):
                for instance in (*instances, direct):
                    instance.check_alive()
                names = [target.fresh_name("spread") for _ in range(SPREAD_PHOTOS)]
                for index, name in enumerate(names):
                    upload_file(target, photos[index % len(photos)], name)
                before = [tree_cpu_ticks(instance.process.pid) for instance in instances]
                times[kind].append(resize_all_at_once(target, names, SPREAD_JOB_WAIT_SECONDS))
                if kind == "proxy":
                    for index, instance in enumerate(instances):
                        instance_ticks[index] += tree_cpu_ticks(instance.process.pid) - before[index]
                for name in names:
                    size = finished_size(target.storage / name)
                    if size != RESIZE_SIZE:
                        raise BenchError(f"{kind}: {name} is {size} once its job ended, not {RESIZE_SIZE}")

    medians = {kind: statistics.median(runs) for kind, runs in times.items()}
    runs = {kind: "runs " + ", ".join(f"{seconds:.2f}" for seconds in times[kind]) for kind in kinds}
    return [
        Row("nginx-resize", f"{SPREAD_PHOTOS} photos PATCHed at once via nginx to {CLUSTER_INSTANCES}, until all ended "
            f"(median of {bench.repeat})", "s", medians["proxy"], higher_is_better=False,
            note=f"{runs['proxy']}; photos {', '.join(photo.name for photo in photos)} in turn, to "
                 f"{RESIZE_SIZE[0]}x{RESIZE_SIZE[1]}; CPU split over the instances (their resizes included) "
                 f"{shares(instance_ticks)}; each client waits with GET /jobs/<id>?wait={SPREAD_JOB_WAIT_SECONDS}; "
                 f"--resize-workers is the default, {os.cpu_count()} on this host however many instances"),
        Row("nginx-resize", "same, one instance direct", "s", medians["direct"], higher_is_better=False,
            note=runs["direct"]),
        Row("nginx-resize", f"via nginx to {CLUSTER_INSTANCES} / one direct", "x",
            medians["proxy"] / medians["direct"], higher_is_better=False),
    ]


# ------------------------------------------------------------------------------------------
# GlusterFS (IMS only): the nginx scenario's three instances, each on its own FUSE mount of one
# volume as on three hosts, against the same on one local folder; and, in this process, what
# ims.py's revalidation on a network filesystem costs one request.
# ------------------------------------------------------------------------------------------


def mounts_under(folder: Path) -> list[str]:
    """Return the mount points at or under folder, from /proc/self/mounts.

    os.path.ismount misses a FUSE mount whose client has died (its lstat fails), which must be
    unmounted all the same before its folder is removed.
    """
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), line.split(" ")[1])
        if point == str(folder) or point.startswith(f"{folder}/"):
            points.append(point)
    return points


def run_checked(command: list[str]) -> None:
    """Run a set-up command; raise BenchError with its output when it fails or takes too long."""
    try:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   timeout=GLUSTER_COMMAND_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(command)} took over {GLUSTER_COMMAND_TIMEOUT_SECONDS} s") from None
    if completed.returncode != 0:
        raise BenchError(f"{' '.join(command)}: {completed.stdout.strip()[-300:]}")


def gluster(*arguments: str) -> None:
    """Run one command of the gluster command line, never asking for confirmation."""
    run_checked([tool_path("gluster"), "--mode=script", *arguments])


def undo_later(stack: contextlib.ExitStack, bench: Bench, label: str, undo: Callable[[], list[str] | None]) -> None:
    """Call undo when the stack closes; the problems it returns, or the error it raises, go into bench.problems.

    A step of a teardown that fails must not keep the later ones (unmount, stop, delete) from running.
    """
    def run() -> None:
        try:
            problems = undo() or []
        except (BenchError, OSError) as error:
            problems = [str(error)]
        bench.problems.extend(f"{label}: {problem}" for problem in problems)

    stack.callback(run)


def is_running(command_name: str) -> bool:
    """Tell whether a process of that command name runs, as `pgrep -x` does."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == command_name:
                    return True
    return False


def processes_mentioning(text: str) -> list[int]:
    """Return the ids of the processes with text in their command line (a brick's or a client's folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def unmount(point: Path) -> list[str]:
    """Unmount point if it is mounted; lazily (umount -l) when busy, which is returned as a problem."""
    if not mounts_under(point):
        return []
    busy = subprocess.run(["umount", str(point)], capture_output=True, text=True,
                          timeout=GLUSTER_COMMAND_TIMEOUT_SECONDS, check=False)
    if busy.returncode == 0:
        return []
    run_checked(["umount", "-l", str(point)])
    return [f"busy ({busy.stderr.strip()}); unmounted lazily"]


def remove_unless_mounted(folder: Path) -> list[str]:
    """Remove folder, unless a mount is left in it: removing it then would delete files on the volume."""
    left = mounts_under(folder)
    if left:
        return [f"{folder} left in place, {', '.join(left)} still mounted"]
    shutil.rmtree(folder)
    return []


def start_glusterd(stack: contextlib.ExitStack, bench: Bench, folder: Path) -> None:
    """Start glusterd when none runs, and stop that one (by its id) when the stack closes.

    A glusterd already running is someone else's: it is used and left alone. This one runs in the
    foreground (-N) so that it is a child of the bench, stopped as the servers are.
    """
    if is_running("glusterd"):
        return
    with open(folder / "glusterd-output.txt", "wb") as output:
        process = subprocess.Popen([tool_path("glusterd"), "-N"], stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    stop_later(stack, bench, "gluster glusterd", Server("glusterd", process, "127.0.0.1", GLUSTERD_PORT, folder))

    # It answers the command line a moment after it starts; one that has exited ends the wait too.
    def answers() -> bool:
        with contextlib.suppress(BenchError):
            gluster("volume", "list")
            return True
        return process.poll() is not None

    if not wait_for(answers, GLUSTER_COMMAND_TIMEOUT_SECONDS, 0.2) or process.poll() is not None:
        raise BenchError(f"glusterd did not answer within {GLUSTER_COMMAND_TIMEOUT_SECONDS} s "
                         f"(exit status {process.poll()})")


def start_gluster(stack: contextlib.ExitStack, bench: Bench) -> tuple[list[Path], list[int]]:
    """Create and start a volume of one brick, and mount it CLUSTER_INSTANCES times, as many hosts would.

    Returns the mount points and the ids of the volume's processes (its brick and FUSE clients).
    When the stack closes, the mounts are unmounted, the volume stopped and deleted, and its
    folder removed. The brick and mount points are in a folder of their own, outside the scratch
    one, which is removed only when nothing is mounted in it.
    """
    folder = Path(tempfile.mkdtemp(prefix="ims-bench-gluster-")).resolve()
    undo_later(stack, bench, "gluster folder", lambda: remove_unless_mounted(folder))
    start_glusterd(stack, bench, folder)
    volume = f"ims-bench-{os.getpid()}"
    host = socket.gethostname()
    brick = folder / "brick"
    brick.mkdir()
    # force: glusterd refuses a brick on the root filesystem otherwise.
    gluster("volume", "create", volume, f"{host}:{brick}", "force")
    undo_later(stack, bench, f"gluster volume {volume}", lambda: gluster("volume", "delete", volume))
    for option, value in GLUSTER_VOLUME_OPTIONS.items():
        gluster("volume", "set", volume, option, value)
    gluster("volume", "start", volume)
    undo_later(stack, bench, f"gluster volume {volume}", lambda: gluster("volume", "stop", volume, "force"))
    mounts = []
    for index in range(CLUSTER_INSTANCES):
        point = folder / f"mount{index}"
        point.mkdir()
        undo_later(stack, bench, f"gluster mount {index}", lambda point=point: unmount(point))
        run_checked(["mount", "-t", "glusterfs", "-o", GLUSTER_MOUNT_OPTIONS, f"{host}:/{volume}", str(point)])
        mounts.append(point)
    return mounts, processes_mentioning(str(folder))


def gluster_unavailable() -> str | None:
    """Return why no GlusterFS volume can be mounted here, or None when one can (its tools are checked apart)."""
    if os.geteuid() != 0:
        return "mounting a GlusterFS volume needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: FUSE mounts cannot be made here"
    return None


def load_ims() -> types.ModuleType:
    """Import the ims.py the bench runs (IMS_SCRIPT), to time its Store in this process."""
    if "ims" in sys.modules:
        return sys.modules["ims"]
    spec = importlib.util.spec_from_file_location("ims", IMS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module of a class up in sys.modules while they make it.
    sys.modules["ims"] = module
    spec.loader.exec_module(module)
    return module


def per_call_microseconds(*functions: Callable[[], object]) -> list[float]:
    """Return one call's time of each function in µs: the median of TIMEIT_BATCHES batches of ~0.2 s each.

    The functions' batches are taken in turn, so that a busy spell of this shared machine (or of
    the volume) weighs on all of them alike and their difference holds.
    """
    timers = [timeit.Timer(function) for function in functions]
    numbers = [timer.autorange()[0] for timer in timers]
    batches = [[] for _ in functions]
    for _ in range(TIMEIT_BATCHES):
        for timer, number, seconds in zip(timers, numbers, batches):
            seconds.append(timer.timeit(number) / number)
    return [statistics.median(each) * 1e6 for each in batches]


def scanned_stores(ims: types.ModuleType, folder: Path, count: int) -> list:
    """Return count ims.Stores on folder, scanned, with the folder's mtime a minute back.

    ims.py reads a folder changed within the last second again whatever it trusts; a folder
    served for a while is older than that.
    """
    stores = [ims.Store(str(folder)) for _ in range(count)]
    past = time.time_ns() - 60 * 1_000_000_000
    os.utime(folder, ns=(past, past))
    for store in stores:
        store.scan()
    return stores


def open_microseconds(ims: types.ModuleType, store, name: str) -> tuple[float, float]:
    """Return the µs of Store.open(name) + close, and of a bare os.open + fstat + close of the same file.

    The second is what a download's open cost before d6d68d8, which read no bytes where the content
    type was cached; a Store on a network filesystem reads the first bytes of every file it opens.
    """
    path = store.path_of(name)

    def open_and_close() -> None:
        store.open(name).close()

    def open_without_reading() -> None:
        descriptor = os.open(path, os.O_RDONLY | ims.OPEN_FLAGS_NO_FOLLOW)
        os.fstat(descriptor)
        os.close(descriptor)

    with_read, without_read = per_call_microseconds(open_and_close, open_without_reading)
    return with_read, without_read


def scenario_gluster(bench: Bench) -> list[Row]:
    unavailable = gluster_unavailable()
    if unavailable:
        progress(f"skipping gluster: {unavailable}")
        return [Row("gluster", "skipped", "", note=unavailable)]
    ims = load_ims()
    # In this process, on local disk: a listing with the folder's mtime trusted (local disk) or not
    # (a network filesystem), by two Stores on one folder, and one download's open.
    listing, opens = {}, {}
    for count in REVALIDATE_NAMES:
        folder = bench.scratch / f"revalidate-{count}"
        folder.mkdir()
        for index in range(count):
            shutil.copyfile(bench.small_image, folder / f"list-{index:04d}.jpeg")
        trusting, rereading = scanned_stores(ims, folder, 2)
        trusting._is_network, rereading._is_network = False, True
        listing[count, True], listing[count, False] = per_call_microseconds(trusting.listing, rereading.listing)
        if count == REVALIDATE_NAMES[0]:
            opens["local"] = open_microseconds(ims, trusting, "list-0000.jpeg")

    kinds = ("local", "gluster")
    megabytes = BIG_PHOTO.stat().st_size / 1e6
    operations = [*SCALE_PATHS, ("upload", f"{PARALLEL_UPLOADS} curl -F {megabytes:.0f} MB photos at once")]
    rates = {(operation, kind): [] for operation, _ in operations for kind in kinds}
    # Totals over the runs, to give CPU per request: requests, and the clock ticks of the IMS
    # instances and of the volume's processes (brick and FUSE clients), which share the CPUs.
    totals = {(operation, kind): [0, 0, 0] for operation, _ in operations for kind in kinds}
    errors = collections.Counter()
    clock_ticks = os.sysconf("SC_CLK_TCK")
    with contextlib.ExitStack() as stack:
        mounts, gluster_pids = start_gluster(stack, bench)
        local_storage = bench.scratch / "gluster-local-storage"
        prepare_storage(local_storage, bench.small_image)
        prepare_storage(mounts[0] / "storage", bench.small_image)
        instances, fronts = {}, {}
        instances["local"], fronts["local"] = start_cluster(stack, bench, "gluster-local", local_storage)
        instances["gluster"], fronts["gluster"] = start_cluster(
            stack, bench, "gluster-volume", mounts[0] / "storage", [mount / "storage" for mount in mounts])
        for front in fronts.values():
            check_answers(front.proxy, [path for path, _ in SCALE_PATHS])
        # The same in-process measures on the volume, before any upload adds names to its folder.
        [gluster_store] = scanned_stores(ims, mounts[0] / "storage", 1)
        [gluster_listing] = per_call_microseconds(gluster_store.listing)
        opens["gluster"] = open_microseconds(ims, gluster_store, "small.jpeg")
        gluster_trusts = not gluster_store._is_network
        for operation, _ in operations:
            is_upload = operation == "upload"
            for run in range(PARALLEL_UPLOAD_ROUNDS if is_upload else max(bench.repeat, SCALE_MIN_RUNS)):
                for kind, front in in_turn(fronts, run):
                    for instance in instances[kind]:
                        instance.check_alive()
                    ims_before = sum(tree_cpu_ticks(instance.process.pid) for instance in instances[kind])
                    gluster_before = cpu_ticks(gluster_pids)
                    if is_upload:
                        rates[operation, kind].append(curl_uploads_at_once(front.proxy, BIG_PHOTO, PARALLEL_UPLOADS))
                        requests = PARALLEL_UPLOADS
                    else:
                        result = run_wrk(front.proxy.url(operation), SCALE_WRK_ARGUMENTS)
                        rates[operation, kind].append(result["requests_per_second"])
                        requests = result["requests"]
                        errors[kind] += result["errors"]
                    total = totals[operation, kind]
                    total[0] += requests
                    total[1] += sum(tree_cpu_ticks(instance.process.pid) for instance in instances[kind]) - ims_before
                    total[2] += cpu_ticks(gluster_pids) - gluster_before

    def cpu_microseconds(operation: str, kind: str) -> tuple[float, float]:
        """Return the µs of CPU per request of the IMS instances and of the volume's processes."""
        requests, ims_ticks, gluster_ticks = totals[operation, kind]
        return (ims_ticks / clock_ticks / requests * 1e6, gluster_ticks / clock_ticks / requests * 1e6)

    command = " ".join(SCALE_WRK_ARGUMENTS[:2])
    names = {"local": "one local folder", "gluster": f"{CLUSTER_INSTANCES} GlusterFS mounts of one volume"}
    rows = []
    for operation, label in operations:
        is_upload = operation == "upload"
        medians = {kind: statistics.median(rates[operation, kind]) for kind in kinds}
        notes = {}
        for kind in kinds:
            ims_cpu, gluster_cpu = cpu_microseconds(operation, kind)
            notes[kind] = (f"runs {', '.join(f'{rate:,.0f}' for rate in rates[operation, kind])}; CPU per request: "
                           f"IMS {ims_cpu:,.0f} µs" + (f", the volume's brick and clients {gluster_cpu:,.0f} µs"
                                                       if kind == "gluster" else ""))
        how = f"median of {PARALLEL_UPLOAD_ROUNDS} rounds" if is_upload else f"wrk {command}"
        unit = "uploads/s" if is_upload else "req/s"
        rows += [
            *(Row("gluster", f"{label} via nginx to {CLUSTER_INSTANCES} on {names[kind]}, {how}", unit, medians[kind],
                  note=notes[kind]) for kind in kinds),
            Row("gluster", f"{label}: GlusterFS / local", "x", medians["gluster"] / medians["local"],
                note="ratio of each interleaved pair of runs: " + ", ".join(
                    f"{gluster_rate / local_rate:.2f}"
                    for local_rate, gluster_rate in zip(rates[operation, "local"], rates[operation, "gluster"]))),
        ]
    list_cpu = {kind: cpu_microseconds("/", kind)[0] for kind in kinds}
    get_cpu = {kind: cpu_microseconds("/small.jpeg", kind)[0] for kind in kinds}
    for count in REVALIDATE_NAMES:
        added = listing[count, False] - listing[count, True]
        beside = (f", against {list_cpu['local']:,.0f} µs of IMS CPU per GET / ({LIST_NAMES} names) via nginx on "
                  "local disk above" if count == LIST_NAMES else "")
        rows += [
            Row("gluster", f"Store.listing(), {count} names, local disk, folder mtime trusted", "µs",
                listing[count, True], higher_is_better=False,
                note=f"in this process, median of {TIMEIT_BATCHES} timeit batches, in turn with the re-reading "
                     "Store's; the folder's os.stat only"),
            Row("gluster", f"Store.listing(), {count} names, local disk, re-read (as on a network filesystem)", "µs",
                listing[count, False], higher_is_better=False,
                note=f"os.scandir every call: {added:,.0f} µs more per GET /{beside}"),
        ]
    rows.append(Row("gluster", f"Store.listing(), {LIST_NAMES} names, GlusterFS mount", "µs", gluster_listing,
                    higher_is_better=False,
                    note=f"the Store's own choice there (folder mtime trusted: {gluster_trusts}); wall time, mostly "
                         f"waiting on the volume; IMS CPU per GET / via nginx on the mounts above: "
                         f"{list_cpu['gluster']:,.0f} µs"))
    for kind, where in (("local", "local disk"), ("gluster", "GlusterFS mount")):
        with_read, without_read = opens[kind]
        what = ("its 12-byte pread and the sniffing of it, paid by every download on a network filesystem"
                if kind == "gluster" else "on a local disk the content type is cached per version: no read")
        rows += [
            Row("gluster", f"Store.open + close of a 20 KB JPEG, {where}", "µs", with_read, higher_is_better=False,
                note=f"{with_read - without_read:,.0f} µs more than a bare open + fstat: {what}; IMS CPU per 20 KB "
                     f"GET via nginx on {where} above: {get_cpu[kind]:,.0f} µs"),
            Row("gluster", f"os.open + fstat + close, same file, {where} (no first-bytes read)", "µs", without_read,
                higher_is_better=False, note="a reference: a download's open before d6d68d8"),
        ]
    config = (f"volume of one brick, {', '.join(f'{option} {value}' for option, value in GLUSTER_VOLUME_OPTIONS.items())}; "
              f"mounted with -o {GLUSTER_MOUNT_OPTIONS}; {LIST_NAMES} names seeded in each folder; "
              f"nginx as in the nginx scenario; runs interleaved")
    problems = [f"{kind}: {count} socket errors or non-2xx answers" for kind, count in errors.items() if count]
    rows[0].note += "; " + "; ".join([config, *problems])
    return rows


# ------------------------------------------------------------------------------------------
# Issue 12: /healthz and /metrics under load, and what counting and JSON logs cost.
# ------------------------------------------------------------------------------------------

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
HEALTH_NAMES = 100  # small.jpeg and list-000 to list-098, all the 20 KB JPEG
HEALTH_LOAD_SECONDS = 10  # each window of probes; wrk runs a second longer on each side
HEALTH_LOAD_ARGUMENTS = ["-t2", "-c8"]
HEALTH_PROBES = 2000  # per window of /healthz: half on a new connection each, half on one kept alive
METRICS_PROBES = 1000  # per window of /metrics, the same way (a scrape costs the server more)
IDLE_PROBES = 400  # /healthz with no load, a reference
HEALTH_MAX_P99_MS = 20
HEALTH_RESIZE_JOBS = 8  # kept queued or running through the resize windows
HEALTH_RESIZE_PHOTOS = ("IMG_2039.jpeg", "IMG_X.jpeg")  # 4032x3024 (12.2 MP), taken in turn
HEALTH_RESIZE_SETTLE_SECONDS = 60
IDLE_COST_REQUESTS = 500  # /metrics GETs (and 4 times as many /healthz) timed by the server's CPU clock
# wrk's Lua: each connection asks GET / and GET /small.jpeg in turn.
MIXED_LOAD_SCRIPT = """\
-- GET / and GET /small.jpeg in turn on each connection (bench_ims.py, scenario health).
local paths = {"/", "/small.jpeg"}
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[counter % 2 + 1])
end
"""
METRICS_COST_MIN_ROUNDS = 5
METRICS_COST_SETUPS = {"on": [], "off": ["--metrics", "off"], "json": ["--log-format", "json"]}
METRICS_COST_MIN_FACTOR = 0.97  # counting may cost small GETs 3 % of their rate at most
METRICS_FAMILIES = ("ims_http_requests_total", "ims_http_request_duration_seconds_bucket", "ims_resize_queue_jobs",
                    "process_cpu_seconds_total")


def prepare_small_storage(folder: Path, small_image: Path, count: int = HEALTH_NAMES) -> None:
    """Fill a storage folder with count copies of the 20 KB JPEG: small.jpeg, list-000, list-001..."""
    folder.mkdir()
    shutil.copyfile(small_image, folder / "small.jpeg")
    for index in range(count - 1):
        shutil.copyfile(small_image, folder / f"list-{index:03d}.jpeg")


@dataclasses.dataclass
class Probe:
    """One probe's answer: seconds from connecting (or sending, kept alive) to the last byte, status, body."""

    seconds: float
    status: int | None
    body: bytes
    error: str = ""


def probe_once(server: Server, path: str, connection: http.client.HTTPConnection | None) -> Probe:
    """GET path on connection (kept alive), or on a new connection closed after it when connection is None."""
    fresh = connection is None
    started = time.perf_counter()
    try:
        if fresh:
            connection = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT_SECONDS)
            connection.request("GET", path, headers={"Connection": "close"})
        else:
            connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return Probe(time.perf_counter() - started, response.status, body)
    except (OSError, http.client.HTTPException) as error:
        if not fresh:
            connection.close()  # http.client connects again on the next request
        return Probe(math.inf, None, b"", f"{type(error).__name__}: {error}")
    finally:
        if fresh:
            connection.close()


def probe_series(server: Server, path: str, count: int, seconds: float,
                 overrun: float = math.inf) -> dict[str, list[Probe]]:
    """GET path count times, evenly spread over seconds, new connections and a kept-alive one in turn.

    A probe late on its schedule (the one before it took long) goes at once; none starts once
    seconds + overrun have passed (the load may be over). Returns {"fresh": [...], "kept": [...]}.
    One thread, so that the client takes little of the CPUs.
    """
    probes = {"fresh": [], "kept": []}
    kept = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT_SECONDS)
    interval = seconds / count
    next_start = time.monotonic()
    deadline = next_start + seconds + overrun
    try:
        for index in range(count):
            if time.monotonic() > deadline:
                break
            pause = next_start - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            next_start += interval
            if index % 2:
                probes["kept"].append(probe_once(server, path, kept))
            else:
                probes["fresh"].append(probe_once(server, path, None))
    finally:
        kept.close()
    return probes


def check_probes(probes: list[Probe], path: str) -> list[str]:
    """Mark every probe that is not a 200 as never answered (math.inf); return what went wrong, counted."""
    failures = collections.Counter()
    for index, probe in enumerate(probes):
        if probe.status != 200:
            failures[probe.error or f"answered {probe.status}"] += 1
            probes[index] = Probe(math.inf, probe.status, probe.body, probe.error)
    return [f"GET {path}: {what} x{count}" for what, count in failures.items()]


def milliseconds(value: float) -> float:
    return value * 1000


class Load:
    """Context manager: wrk -t2 -c8 with MIXED_LOAD_SCRIPT on a server for `seconds`; result once it ends."""

    def __init__(self, server: Server, script: Path, seconds: float):
        self.command = ["wrk", *HEALTH_LOAD_ARGUMENTS, f"-d{math.ceil(seconds)}s", "-s", str(script), server.url("/")]
        self.result: dict[str, float] = {}

    def __enter__(self):
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def __exit__(self, *exc_info) -> None:
        output, _ = self.process.communicate()
        if exc_info[0] is None:
            self.result = parse_wrk(self.process.returncode, output)


class ResizeFeeder:
    """Context manager: keeps `jobs` resize jobs queued or running, a thread per photo name.

    Each thread PATCHes its photo to one of two sizes of about 12 megapixels (its upright aspect kept,
    the two in turn, so that every job decodes, resizes and encodes 11 to 12 megapixels), waits with GET
    /jobs/<id>?wait= for the job to end, and PATCHes again, until the context ends. A sampler counts
    the jobs between their 202 and their end every 20 ms.
    """

    def __init__(self, server: Server, photos: dict[str, tuple[int, int]]):
        self.server = server
        self.photos = photos  # name: upright (width, height)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.ended = collections.Counter()
        self.failures = collections.Counter()
        self.durations: list[float] = []  # seconds from a PATCH's 202 to its job's end
        self.samples: list[int] = []
        self.sampling = False
        self.threads = [threading.Thread(target=self.feed, args=(name, size)) for name, size in photos.items()]
        self.threads.append(threading.Thread(target=self.sample))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def feed(self, name: str, upright: tuple[int, int]) -> None:
        width, height = upright
        # A little smaller first: the photo's own size could be taken for nothing to do.
        sizes = [(width - width // 64 * 2, height - height // 64 * 2), (width, height)]
        connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=JOB_WAIT_SECONDS + 30)
        turn = 0
        try:
            while not self.stop.is_set():
                target = sizes[turn % 2]
                turn += 1
                try:
                    status, headers, _ = request_json(connection, "PATCH", "/" + name,
                                                      {"width": target[0], "height": target[1]})
                    if status != 202 or not headers.get("Location"):
                        self.failures[f"PATCH answered {status}"] += 1
                        time.sleep(0.1)
                        continue
                    with self.lock:
                        self.in_flight += 1
                    accepted = time.perf_counter()
                    try:
                        job = {}
                        while job.get("state") not in ("done", "failed", "cancelled"):
                            status, _, job = request_json(connection, "GET", f"{headers['Location']}?wait={JOB_WAIT_SECONDS}")
                            if status != 200 or not isinstance(job, dict):
                                raise BenchError(f"GET {headers['Location']} answered {status}")
                    finally:
                        with self.lock:
                            self.in_flight -= 1
                    self.ended[job["state"]] += 1
                    self.durations.append(time.perf_counter() - accepted)
                except (OSError, http.client.HTTPException, BenchError) as error:
                    self.failures[type(error).__name__] += 1
                    connection.close()
                    time.sleep(0.1)
        finally:
            connection.close()

    def sample(self) -> None:
        while not self.stop.is_set():
            if self.sampling:
                self.samples.append(self.in_flight)
            time.sleep(0.02)

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(HEALTH_RESIZE_SETTLE_SECONDS)


def health_window(server: Server, script: Path, path: str, count: int, feeder: ResizeFeeder | None = None):
    """Probe path count times over HEALTH_LOAD_SECONDS while wrk loads the server; return (probes, load, notes).

    wrk starts a second before the probes and ends two seconds or so after them.
    """
    others = OtherLoad()
    histogram_before = route_histogram(server, path)
    ticks_before = tree_cpu_ticks(server.process.pid)
    with Load(server, script, HEALTH_LOAD_SECONDS + 3) as load:
        time.sleep(1)
        if feeder:
            feeder.sampling = True
        started = time.monotonic()
        probes = probe_series(server, path, count, HEALTH_LOAD_SECONDS, overrun=1)
        probing = time.monotonic() - started
        if feeder:
            feeder.sampling = False
    server.check_alive()
    cores = (tree_cpu_ticks(server.process.pid) - ticks_before) / os.sysconf("SC_CLK_TCK") / (HEALTH_LOAD_SECONDS + 3)
    notes = check_probes(probes["fresh"], path) + check_probes(probes["kept"], path)
    sent = len(probes["fresh"]) + len(probes["kept"])
    if sent < count:
        notes.append(f"only {sent} of {count} probes sent in {probing:.1f} s (each waits for the one before): "
                     f"the rest would have gone after the load")
    notes.append(describe_histogram(histogram_before, route_histogram(server, path), path))
    notes.append(f"background: wrk {' '.join(HEALTH_LOAD_ARGUMENTS)} GET / and /small.jpeg in turn, "
                 f"{load.result['requests_per_second']:,.0f} req/s, {load.result['errors']} errors; server tree busy "
                 f"{cores:.2f} cores; other processes {others.cores():.2f} cores")
    return probes, load.result, notes


HISTOGRAM_BUCKET = re.compile(r'^ims_http_request_duration_seconds_bucket\{route="([^"]*)",le="([^"]+)"\} (\S+)$',
                              re.MULTILINE)


def route_histogram(server: Server, route: str) -> dict[float, float]:
    """Return the server's own histogram of a route's request durations, {upper bound in s: cumulative count}."""
    probe = probe_once(server, METRICS_PATH, None)
    if probe.status != 200:
        return {}
    return {float(bound): float(count) for name, bound, count in HISTOGRAM_BUCKET.findall(probe.body.decode())
            if name == route}


def describe_histogram(before: dict[float, float], after: dict[float, float], route: str) -> str:
    """Say where the p50 and p99 of the requests counted between two histograms fall, by the server's clock."""
    counts = {bound: after[bound] - before.get(bound, 0) for bound in sorted(after)}
    total = counts.get(math.inf, 0)
    if not total:
        return f"the server's ims_http_request_duration_seconds{{route=\"{route}\"}}: nothing counted"

    def bound_of(fraction: float) -> str:
        bound = next(bound for bound, count in counts.items() if count >= fraction * total)
        return "over 60 s" if bound == math.inf else f"<= {bound * 1000:g} ms"

    over = {limit: total - counts.get(limit, total) for limit in (0.005, 0.025)}
    return (f"the same {total:,.0f} requests by the server's own clock (ims_http_request_duration_seconds, head read "
            f"to answer sent): p50 {bound_of(0.5)}, p99 {bound_of(0.99)}, {over[0.005]:,.0f} over 5 ms, "
            f"{over[0.025]:,.0f} over 25 ms; the rest of the client's time is before the head is read (connecting, "
            f"a thread, the GIL, the CPUs) or after the answer is sent")


def latency_rows(label: str, probes: dict[str, list[Probe]], notes: list[str], target: bool) -> list[Row]:
    """Rows p50, p99 and max (ms) of each kind of connection; the p99 rows carry the target when asked."""
    rows = []
    names = {"fresh": "new connection each", "kept": "one kept-alive connection"}
    for kind in ("fresh", "kept"):
        times = [probe.seconds for probe in probes[kind]]
        rows += [
            Row("health", f"{label}, {names[kind]} ({len(times)}), p50", "ms", milliseconds(percentile(times, 0.5)),
                higher_is_better=False),
            Row("health", "same, p99", "ms", milliseconds(percentile(times, 0.99)), higher_is_better=False,
                **({"target": f"< {HEALTH_MAX_P99_MS} ms", "max_ims": HEALTH_MAX_P99_MS} if target else {})),
            Row("health", "same, max", "ms", milliseconds(max(times)), higher_is_better=False),
        ]
    rows[0].note = "; ".join(notes)
    return rows


def check_health_answer(server: Server) -> None:
    """Raise BenchError unless GET /healthz answers 200 {"status": "ok"} and GET /metrics 200 text."""
    probe = probe_once(server, HEALTH_PATH, None)
    if probe.status != 200:
        raise BenchError(f"GET {HEALTH_PATH} answered {probe.status or probe.error}: ims.py without issue 12?")
    if json.loads(probe.body) != {"status": "ok"}:
        raise BenchError(f"GET {HEALTH_PATH} answered {probe.body[:100]!r}")
    probe = probe_once(server, METRICS_PATH, None)
    if probe.status != 200:
        raise BenchError(f"GET {METRICS_PATH} answered {probe.status or probe.error}")


def metrics_sample(body: bytes, name: str) -> float | None:
    """Return the value of the first sample of a metric without labels (or the sum of its labelled ones)."""
    total, found = 0.0, False
    for line in body.decode(errors="replace").splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def scenario_health(bench: Bench) -> list[Row]:
    script = bench.scratch / "mixed-load.lua"
    script.write_text(MIXED_LOAD_SCRIPT)
    storage = bench.scratch / "health-storage"
    prepare_small_storage(storage, bench.small_image)
    rows = []
    with contextlib.ExitStack() as stack:
        server = start_ims(storage, bench.scratch, [], "health")
        stop_later(stack, bench, "health", server)
        check_answers(server, ["/", "/small.jpeg"])
        check_health_answer(server)

        idle = probe_series(server, HEALTH_PATH, IDLE_PROBES, IDLE_PROBES * 0.005)
        idle_notes = check_probes(idle["fresh"], HEALTH_PATH) + check_probes(idle["kept"], HEALTH_PATH)
        idle_notes.append("no load: "
                          + "; ".join(f"{kind} p50 {milliseconds(percentile([p.seconds for p in idle[kind]], 0.5)):.2f} "
                                      f"p99 {milliseconds(percentile([p.seconds for p in idle[kind]], 0.99)):.2f} "
                                      f"max {milliseconds(max(p.seconds for p in idle[kind])):.2f} ms"
                                      for kind in ("fresh", "kept")))

        probes, load, notes = health_window(server, script, HEALTH_PATH, HEALTH_PROBES)
        rows += latency_rows(f"GET {HEALTH_PATH} under load", probes, idle_notes + notes, target=True)
        loads = {"no resizes": load["requests_per_second"]}

        probes, load, notes = health_window(server, script, METRICS_PATH, METRICS_PROBES)
        sizes = sorted(len(probe.body) for probe in probes["kept"] + probes["fresh"] if probe.status == 200)
        rows += latency_rows(f"GET {METRICS_PATH} under load", probes, notes, target=False)

        # Eight of the small names become 12-megapixel photos (uploaded, so that the name count stays).
        connection = server.connect()
        photos = {}
        try:
            for index in range(HEALTH_RESIZE_JOBS):
                status, _, _ = request_json(connection, "DELETE", f"/list-{HEALTH_NAMES - 2 - index:03d}.jpeg")
                if status != 204:
                    raise BenchError(f"DELETE answered {status}")
        finally:
            connection.close()
        from PIL import Image
        for index in range(HEALTH_RESIZE_JOBS):
            photo = SHARED / "photos" / HEALTH_RESIZE_PHOTOS[index % len(HEALTH_RESIZE_PHOTOS)]
            name = server.fresh_name("photo-")
            upload_file(server, photo, name)
            with Image.open(photo) as image:  # upright: EXIF orientations 5 to 8 swap the sides
                photos[name] = image.size[::-1] if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else image.size
        with ResizeFeeder(server, photos) as feeder:
            if not wait_for(lambda: feeder.in_flight >= HEALTH_RESIZE_JOBS, 10):
                raise BenchError(f"only {feeder.in_flight} resize jobs in flight after 10 s: {dict(feeder.failures)}")
            ended_before = len(feeder.durations)
            resize_ticks = reaped_children_ticks(server.process.pid)
            probes, load, notes = health_window(server, script, HEALTH_PATH, HEALTH_PROBES, feeder)
            health_samples = list(feeder.samples)
            feeder.samples.clear()
            loads["resizes"] = load["requests_per_second"]
            resize_notes = [(f"{HEALTH_RESIZE_JOBS} PATCHes of 12-megapixel photos ({', '.join(HEALTH_RESIZE_PHOTOS)} "
                            f"uploaded) kept in flight (--resize-workers default: 2 run, the rest queue): jobs between "
                            f"their 202 and their end, sampled every 20 ms: min {min(health_samples)}, mean "
                            f"{statistics.mean(health_samples):.1f}; {len(feeder.durations) - ended_before} jobs "
                            f"ended during the window, each {statistics.median(feeder.durations[ended_before:]):.2f} s "
                            f"from its 202 to its end (median; a request queued behind the resizes would wait as "
                            f"long), their processes' CPU "
                            f"{(reaped_children_ticks(server.process.pid) - resize_ticks) / os.sysconf('SC_CLK_TCK'):.1f} s")]
            rows += latency_rows(f"GET {HEALTH_PATH} under load + {HEALTH_RESIZE_JOBS} resize jobs", probes,
                                 resize_notes + notes, target=True)
            probes, load, notes = health_window(server, script, METRICS_PATH, METRICS_PROBES, feeder)
            queue_gauges = sorted({metrics_sample(probe.body, "ims_resize_queue_jobs") for probe in probes["kept"]
                                   if probe.status == 200} - {None})
            notes.insert(0, f"jobs in flight: min {min(feeder.samples)}, mean {statistics.mean(feeder.samples):.1f}; "
                            f"ims_resize_queue_jobs seen: {', '.join(f'{value:g}' for value in queue_gauges) or 'none'}")
            rows += latency_rows(f"GET {METRICS_PATH} under load + {HEALTH_RESIZE_JOBS} resize jobs", probes, notes,
                                 target=False)
        if feeder.failures:
            rows[-6].note += "; resize feeder: " + ", ".join(f"{what} x{count}" for what, count in feeder.failures.items())
        if set(feeder.ended) - {"done"}:
            rows[-6].note += f"; jobs ended: {dict(feeder.ended)}"
        # What one answer costs the server's own process when nothing else runs, by its CPU clock.
        scrape_costs = {}
        for path, count in ((HEALTH_PATH, IDLE_COST_REQUESTS * 4), (METRICS_PATH, IDLE_COST_REQUESTS)):
            connection = server.connect()
            try:
                ticks_before = cpu_ticks([server.process.pid])
                for _ in range(count):
                    connection.request("GET", path)
                    connection.getresponse().read()
                ticks = cpu_ticks([server.process.pid]) - ticks_before
            finally:
                connection.close()
            scrape_costs[path] = ticks / os.sysconf("SC_CLK_TCK") / count * 1e6
    missing = [family for family in METRICS_FAMILIES if metrics_sample(probes["kept"][-1].body, family) is None]
    rows += [
        *(Row("health", f"server CPU per GET {path}, no load, one kept-alive connection", "µs", cost,
              higher_is_better=False,
              note=(f"{IDLE_COST_REQUESTS * 4 if path == HEALTH_PATH else IDLE_COST_REQUESTS:,} GETs one after "
                    f"another, the server process's CPU clock (10 ms ticks); {HEALTH_NAMES} names in the folder")
              if path == HEALTH_PATH else "")
          for path, cost in scrape_costs.items()),
        Row("health", f"GET {METRICS_PATH} body size", "bytes", statistics.median(sizes) if sizes else None,
            higher_is_better=False,
            note=(f"min {sizes[0]:,}, max {sizes[-1]:,} bytes over the answers" if sizes else "no 200 answers")
                 + (f"; families missing: {', '.join(missing)}" if missing else "")),
        Row("health", "background load, wrk req/s, with resizes / without", "x", loads["resizes"] / loads["no resizes"],
            note=f"{loads['no resizes']:,.0f} req/s without, {loads['resizes']:,.0f} with (the /healthz windows)"),
    ]
    return rows


def set_tree_affinity(pid: int, cpus: set[int]) -> None:
    """Hold every thread of a process and of its descendants to cpus (threads they start later inherit it)."""
    for member in [pid, *descendants(pid)]:
        for task in Path(f"/proc/{member}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)


def scenario_metrics_cost(bench: Bench) -> list[Row]:
    clock_ticks = os.sysconf("SC_CLK_TCK")
    setups = METRICS_COST_SETUPS
    names = {"on": "metrics on, common log", "off": "--metrics off, common log", "json": "metrics on, --log-format json"}
    every_cpu = os.sched_getaffinity(0)
    # "pinned": the server's threads held to one CPU and wrk to the other, so that one process's threads
    # do not hand the GIL across two cores (which halves or doubles its rate from one run to the next).
    modes = {"free": None, "pinned": ({0}, {1})} if len(every_cpu) >= 2 else {"free": None}
    runs = max(bench.repeat, METRICS_COST_MIN_ROUNDS)
    rates = {(mode, setup): [] for mode in modes for setup in setups}
    cpu = {(mode, setup): [] for mode in modes for setup in setups}
    others = []
    errors = collections.Counter()
    logs = {setup: bench.scratch / f"metrics-cost-{setup}.log" for setup in setups}
    with contextlib.ExitStack() as stack:
        servers = {}
        for setup, options in setups.items():
            storage = bench.scratch / f"metrics-cost-{setup}-storage"
            prepare_small_storage(storage, bench.small_image)
            servers[setup] = start_ims(storage, bench.scratch, options, f"metrics-cost-{setup}", log=logs[setup])
            stop_later(stack, bench, f"metrics-cost {setup}", servers[setup])
        for server in servers.values():
            check_answers(server, ["/small.jpeg"])
        metrics_status = probe_once(servers["off"], METRICS_PATH, None).status
        order = list(setups)
        for run in range(runs):
            round_others = OtherLoad()
            for mode, cpus in in_turn(modes, run):
                for server in servers.values():
                    set_tree_affinity(server.process.pid, cpus[0] if cpus else every_cpu)
                wrk_arguments = (["taskset", "-c", ",".join(map(str, cpus[1]))] if cpus else []) + ["wrk"]
                # Each round starts with the next setup: each goes first, second and last in turn.
                for setup in order[run % 3:] + order[:run % 3]:
                    server = servers[setup]
                    server.check_alive()
                    ticks_before = tree_cpu_ticks(server.process.pid)
                    completed = subprocess.run([*wrk_arguments, *WRK_ARGUMENTS, server.url("/small.jpeg")],
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
                    result = parse_wrk(completed.returncode, completed.stdout)
                    ticks = tree_cpu_ticks(server.process.pid) - ticks_before
                    rates[mode, setup].append(result["requests_per_second"])
                    cpu[mode, setup].append(ticks / clock_ticks / max(result["requests"], 1) * 1e6)
                    errors[mode, setup] += result["errors"]
            others.append(round_others.cores())
        for server in servers.values():
            set_tree_affinity(server.process.pid, every_cpu)
        counted = probe_once(servers["on"], METRICS_PATH, None)
    # The counting itself, timed in this process: far below what wrk can tell apart on a shared machine.
    try:
        ims = load_ims()
        counting = per_call_microseconds(
            lambda metrics=ims.Metrics(): metrics.count_request("GET", "/{name}", 200, 0.0003, 80, 20_200),
            lambda metrics=ims.Metrics(enabled=False): metrics.count_request("GET", "/{name}", 200, 0.0003, 80, 20_200))
    except (AttributeError, TypeError) as error:
        counting, counting_problem = None, f"{type(error).__name__}: {error}"
    log_notes = []
    for setup in ("on", "json"):
        lines = logs[setup].read_bytes().splitlines()
        per_line = logs[setup].stat().st_size / max(len(lines), 1)
        last = lines[-1].decode(errors="replace") if lines else ""
        if setup == "json":
            try:
                fine = json.loads(last).get("event") == "request"
            except (ValueError, AttributeError):
                fine = False
        else:
            fine = bool(LOG_LINE.search(last))
        log_notes.append(f"{names[setup]}: {len(lines):,} lines, {per_line:.0f} bytes a line"
                         + ("" if fine else f", last line unexpected: {last[:120]!r}"))

    def pairs(mode: str, first: str, second: str) -> str:
        return ", ".join(f"{a / b:.3f}" for a, b in zip(rates[mode, first], rates[mode, second]))

    command = " ".join(WRK_ARGUMENTS)
    counted_total = metrics_sample(counted.body, "ims_http_requests_total") if counted.status == 200 else None
    what = {"free": "", "pinned": ", server on CPU 0, wrk on CPU 1"}
    rows = []
    for mode in modes:
        medians = {setup: statistics.median(rates[mode, setup]) for setup in setups}
        cpu_medians = {setup: statistics.median(cpu[mode, setup]) for setup in setups}
        rows += [
            *(Row("metrics-cost", f"GET 20 KB JPEG, {names[setup]}, wrk {command}{what[mode]} (median of {runs})",
                  "req/s", medians[setup], note=f"runs {', '.join(f'{rate:,.0f}' for rate in rates[mode, setup])}")
              for setup in setups),
            *(Row("metrics-cost", f"server CPU per request, {names[setup]}{what[mode]} (median of {runs})", "µs",
                  cpu_medians[setup], higher_is_better=False,
                  note=f"runs {', '.join(f'{value:.0f}' for value in cpu[mode, setup])}")
              for setup in setups),
            Row("metrics-cost", f"req/s, metrics on / --metrics off{what[mode]}", "x", medians["on"] / medians["off"],
                target=f">= {METRICS_COST_MIN_FACTOR}", min_ims=METRICS_COST_MIN_FACTOR,
                note=f"ratio of each round's pair of runs: {pairs(mode, 'on', 'off')}"),
            Row("metrics-cost", f"CPU per request, --metrics off / metrics on{what[mode]}", "x",
                cpu_medians["off"] / cpu_medians["on"], target=f">= {METRICS_COST_MIN_FACTOR}",
                min_ims=METRICS_COST_MIN_FACTOR,
                note="the same ratio by the server's CPU time, which other processes' load moves less than req/s: "
                     + ", ".join(f"{off / on:.3f}" for on, off in zip(cpu[mode, "on"], cpu[mode, "off"]))
                     + " a round"),
            Row("metrics-cost", f"req/s, --log-format json / common (metrics on){what[mode]}", "x",
                medians["json"] / medians["on"],
                note=f"ratio of each round's pair of runs: {pairs(mode, 'json', 'on')}; CPU per request, common / "
                     f"json: {cpu_medians['on'] / cpu_medians['json']:.3f}"),
        ]
    if counting:
        reference_mode = "pinned" if "pinned" in modes else "free"
        server_cpu = statistics.median(cpu[reference_mode, "on"])
        share = (counting[0] - counting[1]) / server_cpu * 100
        rows += [
            Row("metrics-cost", "Metrics.count_request, once per request, in this process (timeit)", "µs", counting[0],
                higher_is_better=False,
                note=f"disabled (--metrics off) {counting[1]:.2f} µs; median of {TIMEIT_BATCHES} batches; a new "
                     "connection adds two Metrics.add('open_connections'), wrk's are kept alive"),
            Row("metrics-cost", f"counting's share of the server's CPU per request{what[reference_mode]}", "%", share,
                higher_is_better=False, target="<= 3 %", max_ims=3,
                note=f"(count_request on - off) / {server_cpu:.1f} µs, the median CPU per request with metrics on "
                     "above"),
        ]
    else:
        rows.append(Row("metrics-cost", "Metrics.count_request in this process", "", note=counting_problem))
    problems = [f"{names[setup]} {mode}: {count} socket errors or non-2xx answers"
                for (mode, setup), count in errors.items() if count]
    rows[0].note += "; ".join([
        "", (f"each round: the unpinned and pinned runs in turn, in each the three servers in turn, each going "
             f"first in turn; logs to a file each ({'; '.join(log_notes)}); --metrics off answered GET {METRICS_PATH} "
            f"{metrics_status}; ims_http_requests_total at the end with metrics on: {counted_total}; other processes "
             f"kept {', '.join(f'{cores:.2f}' for cores in others)} cores busy in the rounds"), *problems])
    return rows


SCENARIOS = {
    "idle-rss": (scenario_idle_rss, []),
    "list": (scenario_list, ["wrk"]),
    "small-get": (scenario_small_get, ["wrk"]),
    "big-get": (scenario_big_get, ["wrk"]),
    "upload-rss": (scenario_upload_rss, ["curl"]),
    "upload": (scenario_upload, ["curl"]),
    "upload-4": (scenario_upload_4, ["curl"]),
    "resize": (scenario_resize, ["vipsthumbnail"]),
    "resize-8": (scenario_resize_8, []),
    "first-resize": (scenario_first_resize, []),
    "rendition-get": (scenario_rendition_get, ["wrk"]),
    "rendition-cold": (scenario_rendition_cold, ["vipsthumbnail"]),
    "rendition-crowd": (scenario_rendition_crowd, []),
    "rendition-burst": (scenario_rendition_burst, []),
    "page": (scenario_page, []),
    "soak": (scenario_soak, []),
    "slow-clients": (scenario_slow_clients, []),
    "patch-burst": (scenario_patch_burst, []),
    "workers": (scenario_workers, ["wrk"]),
    "nginx": (scenario_nginx, ["wrk", "nginx"]),
    "nginx-resize": (scenario_nginx_resize, ["nginx"]),
    "gluster": (scenario_gluster, ["wrk", "curl", "nginx", "gluster", "glusterd", "mount.glusterfs"]),
    "health": (scenario_health, ["wrk"]),
    "metrics-cost": (scenario_metrics_cost, ["wrk"]),
}


# ==========================================================================================
# Report and command line
# ==========================================================================================


def progress(message: str) -> None:
    print("bench: " + message, file=sys.stderr, flush=True)


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def format_factor(versus: float | None) -> str:
    return f"{versus:.2f}x" if versus else "-"


def verdict(row: Row, with_seed: bool, with_before: bool) -> str:
    if not row.target:
        return ""
    if row.met is None:
        if row.min_versus_seed and not with_seed:
            return "needs --vs"
        return "needs --baseline" if row.min_versus_before and not with_before else "n/a"
    return "met" if row.met else "MISSED"


def print_table(rows: list[Row], with_seed: bool, with_before: bool) -> None:
    """Print one aligned table, a line per row, and the notes below it."""
    header = ["scenario", "measure", "unit", "IMS"]
    header += ["before", "IMS vs before"] if with_before else []
    header += ["seed", "IMS vs seed"] if with_seed else []
    header += ["target", "verdict"]
    lines = [header]
    notes = []
    for row in rows:
        line = [row.scenario, row.measure, row.unit, format_value(row.ims)]
        if with_before:
            line += [format_value(row.before), format_factor(row.versus_before)]
        if with_seed:
            line += [format_value(row.seed), format_factor(row.versus_seed)]
        line += [row.target, verdict(row, with_seed, with_before)]
        lines.append(line)
        if row.note:
            notes.append(f"  {row.scenario} / {row.measure}: {row.note}")
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    numeric = {"IMS", "before", "IMS vs before", "seed", "IMS vs seed"}
    for line in lines:
        print("  ".join(cell.rjust(width) if name in numeric else cell.ljust(width)
                        for cell, width, name in zip(line, widths, header)).rstrip())
    if with_seed or with_before:
        print("IMS vs seed, IMS vs before: above 1 means IMS is better (more per second, or less time or memory).")
    if notes:
        print("Notes:")
        print("\n".join(notes))


def write_json(path: Path, rows: list[Row], arguments: argparse.Namespace, problems: list[str],
               load_before: float, other_cores: dict[str, float]) -> None:
    results = [dict(dataclasses.asdict(row), versus_seed=row.versus_seed, versus_before=row.versus_before,
                    met=row.met) for row in rows]
    document = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
                "repeat": arguments.repeat, "vs": arguments.vs,
                "baseline": arguments.baseline and str(arguments.baseline), "results": results, "problems": problems,
                "load_average_before": load_before, "other_cores_by_scenario": other_cores}
    path.write_text(json.dumps(document, indent=2) + "\n")


def prepare_storage(folder: Path, small_image: Path) -> None:
    """Fill a storage folder with the same 100 names for every server, before it starts."""
    folder.mkdir()
    shutil.copyfile(small_image, folder / "small.jpeg")
    shutil.copyfile(BIG_PHOTO, folder / "big.jpeg")
    for index in range(LIST_NAMES - 2):
        shutil.copyfile(small_image, folder / f"list-{index:03d}.jpeg")


def run_scenarios(bench: Bench, names: list[str]) -> list[Row]:
    """Run the chosen scenarios in their fixed order; one that fails leaves a row saying why."""
    rows = []
    for name, (scenario, tools) in SCENARIOS.items():
        if name not in names:
            continue
        missing = ", ".join(tool for tool in tools if tool_path(tool) is None)
        if missing:
            progress(f"skipping {name}: {missing} not installed")
            rows.append(Row(name, "skipped", "", note=f"{missing} not installed"))
            continue
        progress(f"running {name}")
        started = time.monotonic()
        others = OtherLoad()
        try:
            for server in bench.servers.values():
                server.check_alive()
            rows.extend(scenario(bench))
        # A surprise in one scenario (a server answering nonsense) must not cost the others.
        except Exception as error:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(name, "failed", "", note=f"{type(error).__name__}: {error}"))
        bench.other_cores[name] = others.cores()
        progress(f"{name} took {time.monotonic() - started:.0f} s; other processes kept "
                 f"{bench.other_cores[name]:.2f} cores busy meanwhile")
    return rows


def exit_on_sigterm(signal_number: int, frame) -> None:
    """Turn SIGTERM into SystemExit, so the servers are stopped and the scratch folder removed."""
    raise SystemExit(128 + signal_number)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", action="store_true",
                        help="also run ../shared/peers/flask_seed.py and print IMS-vs-seed factors")
    parser.add_argument("--baseline", type=Path, metavar="PATH",
                        help='also run the IMS at PATH (another ims.py) as the column "before"')
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only these scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each wrk scenario, 15 MB uploads, resize-8 rounds, first-resize starts, "
                             "PATCH bursts and nginx-resize rounds (default 3)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE")
    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    servers: dict[str, Server] = {}
    problems: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ims-bench-") as scratch_name:
        scratch = Path(scratch_name)
        try:
            progress("making test images")
            small_image = scratch / "small.jpeg"
            make_small_jpeg(small_image)
            large_image = scratch / "large.bmp"
            make_large_bmp(large_image)
            prepare_storage(scratch / "ims-storage", small_image)
            servers["ims"] = start_ims(scratch / "ims-storage", scratch)
            if arguments.baseline:
                prepare_storage(scratch / "before-storage", small_image)
                servers["before"] = start_ims(scratch / "before-storage", scratch, label="before",
                                              script=arguments.baseline.resolve(), kind="before")
            if arguments.vs:
                prepare_storage(scratch / "seed-storage", small_image)
                servers["seed"] = start_seed(scratch / "seed-storage")
            progress("serving: " + ", ".join(f"{kind} on port {server.port}" for kind, server in servers.items()))
            bench = Bench(servers, scratch, small_image, large_image, arguments.repeat, problems,
                          arguments.baseline and arguments.baseline.resolve())
            rows = run_scenarios(bench, arguments.only or list(SCENARIOS))
            other_cores = bench.other_cores
        except BenchError as error:
            progress(f"cannot run: {error}")
            return 1
        finally:
            for server in servers.values():
                problems.extend(server.stop())
    print_table(rows, arguments.vs, bool(arguments.baseline))
    # Whatever else runs on the machine (a test suite, another bench) weighs on every figure.
    print(f"Machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before the run; other processes "
          "kept busy, in cores on average: " + ", ".join(f"{name} {cores:.2f}" for name, cores in other_cores.items()))
    for problem in problems:
        print("Problem: " + problem)
    if arguments.json:
        write_json(arguments.json, rows, arguments, problems, load_before, other_cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
