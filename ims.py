"""IMS: a tiny image store with resizing, served over HTTP.

Run it with nothing but the standard library and Pillow:

    python3 -m pip install -r requirements.txt
    python3 ims.py                  # http://127.0.0.1:5000, images in ./storage

Embed it (tests and other programs do this rather than start a process):

    import threading, ims
    server = ims.make_server("path/to/storage", host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ...  # talk to server.server_address
    server.shutdown(); server.server_close()

README.md describes every endpoint, option and error.
"""
from __future__ import annotations

__version__ = "1.2.0"

import argparse
import base64
import bisect
import dataclasses
import datetime
import email.utils
import errno
import fcntl
import functools
import hashlib
import html
import http.server
import itertools
import json
import math
import mmap
import multiprocessing
import os
import re
import secrets
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
import unicodedata
import urllib.parse

from PIL import BmpImagePlugin  # noqa: F401  (registers the format)
from PIL import __version__ as PILLOW_VERSION
from PIL import features
from PIL import GifImagePlugin  # noqa: F401
from PIL import Image
from PIL import JpegImagePlugin
from PIL import MpoImagePlugin  # noqa: F401  (phones' JPEGs with further images appended)
from PIL import PngImagePlugin  # noqa: F401
from PIL import TiffImagePlugin  # noqa: F401
from PIL import WebPImagePlugin  # noqa: F401

try:
    from PIL import AvifImagePlugin  # Pillow 11.2 and later
except ImportError:
    AvifImagePlugin = None

try:
    import resource
except ImportError:  # Windows: there the parent's time limit is the only one.
    resource = None


# ====
# Settings
# ====
# Owns the options of the contract's table and the fixed limits. Never reads the environment:
# the command line turns flags and variables into a Settings.

DEFAULT_STORAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storage")


# A day: longer time limits are surely mistakes, and past about 10^9 s they overflow system calls.
MAX_SECONDS = 86400
# A line per request on stderr: the Common Log Format, or a JSON object for log shippers.
LOG_FORMATS = ("common", "json")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every option of the contract's table, with its default."""

    host: str = "127.0.0.1"
    port: int = 5000
    storage: str = DEFAULT_STORAGE
    max_upload: int = 16_000_000
    max_pixels: int = 90_000_000
    resize_workers: int = os.cpu_count() or 1
    max_queue: int = 256
    resize_timeout: float = 60.0
    timeout: float = 30.0
    max_connections: int = 256
    workers: int = 1
    cache_size: int = 1_000_000_000
    # ((width, height), ...) with 0 for a side left to the aspect ratio; None allows any size. A
    # string such as "200x200,1200x0" is parsed.
    rendition_sizes: tuple | None = None
    # Origins allowed to read answers in a browser (CORS), or ("*",); none by default. A string
    # such as "https://a.example, https://b.example" is split.
    cors_origin: tuple = ()
    log_format: str = "common"
    metrics: bool = True

    def __post_init__(self):
        """Raise ValueError for a value out of its range."""
        ranges = {
            "port": (0, 65535),
            "max_upload": (1, None),
            "max_pixels": (1, None),
            "resize_workers": (1, None),
            "max_queue": (0, None),
            "max_connections": (1, None),
            "workers": (1, None),
            "cache_size": (0, None),
            "resize_timeout": (0.001, MAX_SECONDS),
            "timeout": (0.001, MAX_SECONDS),
        }
        for field, (lowest, highest) in ranges.items():
            value = getattr(self, field)
            if not lowest <= value <= (highest or value) or value != value:
                bounds = f"from {lowest} to {highest}" if highest else f"at least {lowest}"
                raise ValueError(f"invalid {field}: it must be {bounds}, not {value!r}")
        if isinstance(self.rendition_sizes, str):
            object.__setattr__(self, "rendition_sizes", parse_rendition_sizes(self.rendition_sizes))
        object.__setattr__(self, "cors_origin", parse_origins(self.cors_origin))
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"invalid log_format: it must be {' or '.join(LOG_FORMATS)}, not {self.log_format!r}")


# A socket read hands over at most what the kernel has buffered; 64 KiB reads keep system calls
# few without holding more than that in memory per upload.
READ_CHUNK_SIZE = 64 * 1024
# Apache's LimitRequestLine and LimitRequestFieldSize (8190 bytes) and LimitRequestFields (100);
# a longer request line is answered 414, a longer header line or more fields 431.
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_HEADER_LINE_BYTES = 8 * 1024
MAX_HEADER_FIELDS = 100
# The stdlib's limit for one header line; a whole head past it is answered 431.
MAX_HEAD_BYTES = 64 * 1024
# Headers of one multipart part: Apache's LimitRequestFieldSize allows 8 KiB per header line, and a
# part carries two or three short lines.
MAX_PART_HEADER_BYTES = 8 * 1024
# A chunk-size line is a few hex digits; extensions are ignored but must not grow without bound.
MAX_CHUNK_LINE_BYTES = 4 * 1024
# Trailer fields after the last chunk are read and dropped; the same bound as part headers.
MAX_TRAILER_BYTES = 8 * 1024
# Resize parameters are a few dozen bytes of JSON or form data.
MAX_PARAMETERS_BYTES = 64 * 1024
# Apache's lingering close: after an early error, read and drop what the client still sends for
# this long, so it reads our answer instead of a connection reset.
LINGER_SECONDS = 2.0
# socketserver's default backlog of 5 resets connections under a burst; the kernel caps this at
# net.core.somaxconn.
LISTEN_BACKLOG = 1024
# Directory mtimes tick with the kernel clock, not per change: a listing taken within this much of
# the folder's mtime may miss a change made in the same tick, so it is not trusted (git's
# "racily clean" rule).
FOLDER_MTIME_SLACK_NS = 1_000_000_000
# The contract's bounds: ?wait= up to a minute; ended jobs kept an hour and at least the last 1000.
MAX_JOB_WAIT_SECONDS = 60
JOB_RETENTION_SECONDS = 3600
JOB_RETENTION_COUNT = 1000
# A job may run on another instance: a waiter re-reads its record this often, so it hears of the
# end within the contract's 100 ms, at 20 small reads a second.
JOB_POLL_SECONDS = 0.05
# How often an instance looks in the folder's queue for jobs it did not accept: those of an
# instance that died, or waiting while their own instance's slots are busy. A job running here
# also re-reads its record this often, to hear that a DELETE elsewhere cancelled it.
QUEUE_SCAN_SECONDS = 0.5
# How often an instance removes ended jobs past their retention, and the temp files of writers gone.
JOB_CLEANUP_SECONDS = 60
# A job record's temp file older than this was left by a writer that died: writing one takes
# microseconds.
RECORD_TEMP_SECONDS = 60
# A cached rendition's modification time is its last use, for evicting the least recently used;
# refreshed at most this often, so that a hit costs no write.
CACHE_TOUCH_SECONDS = 60
# A full cache is emptied down to this share of --cache-size, so that the scan that picks what to
# evict runs once per tenth of the cache rendered, not once per rendition.
CACHE_LOW_WATER = 0.9
# A folder with less room than this is full, for /healthz: not one read of an upload fits.
HEALTH_MIN_FREE_BYTES = 64 * 1024
# Files are hashed for Repr-Digest in reads of this size.
DIGEST_READ_BYTES = 1024 * 1024


# ====
# Names and formats
# ====
# Owns what a stored name may be and which formats exist. Pure: never touches a file.

FORMAT_BY_EXTENSION = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
IMAGE_EXTENSIONS = tuple(FORMAT_BY_EXTENSION)
CONTENT_TYPE_BY_FORMAT = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
ALLOWED_FORMATS = tuple(CONTENT_TYPE_BY_FORMAT)
# Formats a rendition may be asked for (?format=); AVIF only where the installed Pillow writes it.
AVIF_IS_WRITABLE = AvifImagePlugin is not None and "avif" in features.modules and bool(features.check_module("avif"))
RENDITION_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
OUTPUT_CONTENT_TYPES = dict(CONTENT_TYPE_BY_FORMAT, AVIF="image/avif")
FORMAT_BY_CONTENT_TYPE = {content_type: image_format for image_format, content_type in OUTPUT_CONTENT_TYPES.items()}
EXTENSION_BY_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "AVIF": ".avif"}
# Formats with a quality setting; the others are lossless, and ?quality= does not change them.
LOSSY_FORMATS = ("JPEG", "WEBP", "AVIF")
# Formats whose files keep every frame of an animation (or page of a TIFF).
MULTI_FRAME_FORMATS = ("GIF", "WEBP", "PNG", "TIFF", "AVIF")
RENDITION_PARAMETERS = ("width", "height", "fit", "format", "quality")
# Query parameters that pages add to bust caches, and that sites add to links they share; a
# download ignores them. Any other unknown parameter is refused, so that ?widht=300 cannot send a
# phone the 12-megapixel original.
IGNORED_PARAMETERS = ("v", "_", "t", "ts", "cb", "version", "fbclid", "gclid", "dclid", "msclkid", "igshid", "mc_cid", "mc_eid")
IGNORED_PARAMETER_PREFIX = "utm_"
# What made a rendition, in its name and ETag: another version of IMS or Pillow may render it
# otherwise, and must not be taken for the same.
RENDERER = f"ims{__version__}-pil{PILLOW_VERSION}"
# Pillow names a JPEG that carries further images after its own (a depth map, a preview: the
# Multi-Picture Format that phones and cameras write) MPO; it is a JPEG, stored and served as one.
FORMAT_ALIASES = {"MPO": "JPEG"}
# The magic numbers the formats' specifications open a file with; WebP is RIFF....WEBP.
FORMAT_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
SNIFF_BYTES = 12
# What a file is served as when its bytes match no allowed format (RFC 9110 §8.3).
UNKNOWN_CONTENT_TYPE = "application/octet-stream"
# Temporary files are hidden, so they are never listed; their writer holds a lock on them, so a
# scan removes only those whose writer is gone, whatever host or PID namespace it ran in.
TEMP_PREFIX = ".ims-tmp-"
# The hidden folder inside storage where instances share their state: job records, the queue of
# jobs not ended, and lock files.
STATE_FOLDER = ".ims"
# A job id: 16 hex digits (secrets.token_hex(8)); anything else names no job and no file.
_JOB_ID = re.compile(r"[0-9a-f]{16}")
# Resize slots are lock files named after their host in STATE_FOLDER/locks.
SLOT_PREFIX = "slot-"

_UNSAFE_FILENAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")
# Path separators, control characters (they could split a header line) and lone surrogates (names
# that are not valid UTF-8 on disk) never appear in a stored name.
_FORBIDDEN_IN_NAME = re.compile(r"[/\\\x00-\x1f\x7f\ud800-\udfff]")


class HTTPError(Exception):
    """A request that cannot be served: `status` and a `message` for the client.

    Raised at any depth; Handler.dispatch() turns it into `{"message": ...}`.
    """

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def extension_of(name):
    """Return the lower-case extension of `name`, dot included ("" when it has none)."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def is_image_name(name):
    """Tell whether `name` can be a stored image: one visible path segment with an image extension."""
    return (
        extension_of(name) in FORMAT_BY_EXTENSION
        and not name.startswith(".")
        and not _FORBIDDEN_IN_NAME.search(name)
    )


def secure_filename(filename):
    """Return `filename` made safe the way Werkzeug's secure_filename does on POSIX.

    ASCII only, no directory parts, runs of white space to "_", no leading or trailing dots or
    underscores. The result may be empty.
    """
    filename = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    filename = filename.replace("/", " ")
    return _UNSAFE_FILENAME_CHARACTERS.sub("", "_".join(filename.split())).strip("._")


def image_name_from_path(path):
    """Return the image name a request path names, or None when it names no possible image.

    The path is one segment after "/", percent-decoded as UTF-8; "/" or "\\" after decoding,
    control characters and a leading dot name nothing, so no path can reach outside the folder.
    """
    if not path.startswith("/"):
        return None
    try:
        name = urllib.parse.unquote(path[1:], errors="strict")
    except UnicodeDecodeError:
        return None
    return name if is_image_name(name) else None


@functools.lru_cache(maxsize=1024)
def format_http_date(seconds):
    """Return the HTTP date (RFC 9110 §5.6.7) of a whole POSIX second."""
    return email.utils.formatdate(seconds, usegmt=True)


@functools.lru_cache(maxsize=1)
def _log_time(seconds):
    # The Common Log Format's time, as http.server writes it: 04/Dec/2026 23:40:00, local time.
    moment = time.localtime(seconds)
    month = http.server.BaseHTTPRequestHandler.monthname[moment.tm_mon]
    return f"{moment.tm_mday:02d}/{month}/{moment.tm_year:04d} {moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}"


def sniff_format(head):
    """Return the allowed format whose signature the bytes `head` begin with, or None.

    A file placed in the folder by hand may carry another format's extension; its content type
    comes from these first SNIFF_BYTES bytes, not from its name.
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, image_format in FORMAT_SIGNATURES:
        if head.startswith(signature):
            return image_format
    return None


# ====
# Store
# ====
# Owns the storage folder: the only code that opens, writes, links, replaces or removes anything in
# it, its shared state (job records, the queue, the rendition cache, lock files) and the locks that
# make changes exact across processes and hosts. The folder is the truth; the listing is a cache of
# it. Never parses HTTP.

# Errors that mean another host removed or replaced a file under us: its name is looked up again,
# once, and then the answer is what that finds (404, a fresh listing).
STALE_ERRNOS = {errno.ESTALE, errno.ENOENT}

# Filesystems whose clients cache names and attributes, so that one host sees another's changes
# only as its caches let it: IMS re-reads the folder for every listing on them, and checks the
# mount options it knows at start-up. Every FUSE filesystem counts, being usually a network one.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "ceph", "cifs", "smb3", "9p", "lustre", "gpfs", "beegfs", "glusterfs"}
# Filesystems whose clients are coherent without options (CephFS hands out capabilities).
COHERENT_FILESYSTEMS = {"ceph", "fuse.ceph-fuse"}
# The FUSE options of a GlusterFS client that IMS needs at 0, with GlusterFS's defaults.
GLUSTERFS_CACHE_OPTIONS = {"attribute-timeout": "1", "entry-timeout": "1", "negative-timeout": "0"}
# A GlusterFS client's own caches of names, attributes and small files, which another client's
# change does not clear, with the volume options that turn them off.
GLUSTERFS_CACHES = {
    "md-cache": "performance.stat-prefetch",
    "quick-read": "performance.quick-read",
    "io-cache": "performance.io-cache",
    "nl-cache": "performance.nl-cache",
}


@dataclasses.dataclass(frozen=True)
class Mount:
    """The mount that holds a folder: where it is mounted, its filesystem type and its options."""

    point: str
    filesystem: str
    options: dict
    device: str = ""
    root: str = "/"
    # Where this filesystem is mounted whole: a bind mount's client process names those points.
    whole_points: tuple = ()

    @property
    def is_network(self):
        """Whether other hosts may change files under this one's caches."""
        return self.filesystem in NETWORK_FILESYSTEMS or self.filesystem.startswith("fuse.")


def _mountinfo_text(text):
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def parse_mountinfo(text):
    """Return the Mounts that the text of /proc/self/mountinfo lists, in its order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if len(fields) < separator + 2:
            continue
        filesystem_options = fields[separator + 3] if len(fields) > separator + 3 else ""
        options = {}
        # The mount's own options, then the filesystem's (where NFS puts its cache settings).
        for option in f"{fields[5]},{filesystem_options}".split(","):
            key, _, value = option.partition("=")
            if key:
                options[key] = value
        mounts.append(Mount(_mountinfo_text(fields[4]), _mountinfo_text(fields[separator + 1]), options, fields[2], _mountinfo_text(fields[3])))
    return mounts


def mount_of(folder, mountinfo_path="/proc/self/mountinfo"):
    """Return the Mount that holds `folder`, or None where mounts cannot be read (not Linux)."""
    try:
        with open(mountinfo_path, encoding="utf-8", errors="surrogateescape") as file:
            mounts = parse_mountinfo(file.read())
    except OSError:
        return None
    folder = os.path.realpath(folder)
    found = None
    # The last of the longest matches: a later mount on the same point hides the earlier one.
    for mount in mounts:
        point = mount.point.rstrip("/") + "/"
        if (folder + "/").startswith(point) and (found is None or len(mount.point) >= len(found.point)):
            found = mount
    if found is None:
        return None
    whole_points = tuple(mount.point for mount in mounts if mount.device == found.device and mount.root == "/")
    return dataclasses.replace(found, whole_points=whole_points or (found.point,))


def _glusterfs_client_options(mount_points):
    """Return the FUSE options of the GlusterFS client process serving one of `mount_points`, or None if none is found."""
    try:
        process_ids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for process_id in process_ids:
        try:
            with open(f"/proc/{process_id}/cmdline", "rb") as file:
                arguments = file.read().decode("utf-8", "surrogateescape").split("\0")
        except OSError:
            continue
        if not arguments or os.path.basename(arguments[0]) not in ("glusterfs", "glusterfsd"):
            continue
        if not set(mount_points) & set(arguments):
            continue
        options = dict(GLUSTERFS_CACHE_OPTIONS)
        for argument in arguments:
            key, _, value = argument[2:].partition("=")
            if argument.startswith("--") and key in options:
                options[key] = value
        return options
    return None


def _glusterfs_caches(mount_points):
    """Return the caching translators a GlusterFS client has loaded, from its .meta folder; None if unseen."""
    for point in mount_points:
        try:
            translators = os.listdir(os.path.join(point, ".meta", "graphs", "active"))
        except OSError:
            continue
        return sorted(cache for cache in GLUSTERFS_CACHES if any(name.endswith("-" + cache) for name in translators))
    return None


def mount_warnings(mount):
    """Return what the mount holding the storage folder lacks for several hosts to share it (README, "Several hosts")."""
    if mount is None or not mount.is_network or mount.filesystem in COHERENT_FILESYSTEMS:
        return []
    consequence = (
        "this host sees other hosts' uploads, replacements and deletes late (stale downloads, 304s and 404s), and "
        "a PATCH or a DELETE with If-Match here can then overwrite or remove another host's newer upload"
    )
    if mount.filesystem in ("nfs", "nfs4"):
        options = mount.options
        caches_attributes = "noac" not in options and any(options.get(key) != "0" for key in ("acregmin", "acregmax", "acdirmin", "acdirmax"))
        warnings = []
        if caches_attributes or options.get("lookupcache") != "none":
            warnings.append(f"{mount.point} is an NFS mount without actimeo=0 (or noac) and lookupcache=none: {consequence}; mount it with actimeo=0,lookupcache=none")
        local = [option for option in ("nolock", "nocto") if option in options]
        if options.get("local_lock", "none") != "none":
            local.append(f"local_lock={options['local_lock']}")
        if local:
            warnings.append(f"{mount.point} is an NFS mount with {','.join(local)}: locks or writes are not shared with other hosts, so two hosts can each win one name, run one job, or read a file half written")
        return warnings
    if mount.filesystem == "fuse.glusterfs":
        warnings = []
        options = _glusterfs_client_options(mount.whole_points)
        fix = "mount it with -o attribute-timeout=0,entry-timeout=0,negative-timeout=0"
        if options is None:
            warnings.append(f"{mount.point} is a GlusterFS mount whose client process IMS cannot see, to check its options: {fix}")
        else:
            wrong = [f"{key}={value}" for key, value in options.items() if value not in ("0", "0.0")]
            if wrong:
                warnings.append(f"{mount.point} is a GlusterFS mount with {', '.join(wrong)}: {consequence}; {fix}")
        caches = _glusterfs_caches(mount.whole_points)
        if caches is None:
            warnings.append(f"{mount.point} is a GlusterFS mount whose translators IMS cannot see (.meta), to check its caches: set {' and '.join(GLUSTERFS_CACHES[cache] + ' off' for cache in GLUSTERFS_CACHES)} on the volume")
        elif caches:
            settings = " and ".join(f"{GLUSTERFS_CACHES[cache]} off" for cache in caches)
            warnings.append(f"{mount.point} is a GlusterFS mount whose client caches with {', '.join(caches)}: {consequence}; set {settings} on the volume (gluster volume set VOLUME OPTION off)")
        return warnings
    return [f"{mount.point} is a {mount.filesystem} mount, whose cache options IMS does not know: if several hosts share it, make sure each sees the others' changes at once"]


# Errors that mean "the disk is full or we may not write here", answered 507.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT}
# Opening never follows a symbolic link, and never blocks on a FIFO someone placed in the folder.
OPEN_FLAGS_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
# Content types sniffed from files' first bytes, one per version; a folder rarely holds more
# images than this is worth caching, and past it the cache starts again.
MAX_SNIFFED_VERSIONS = 4096
# Job states, spelt as the contract's JSON spells them.
QUEUED = "queued"
RUNNING = "running"
DONE_STATE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
ENDED_STATES = (DONE_STATE, FAILED, CANCELLED)

# Locks that hold across processes and hosts are fcntl locks owned by an open file (Linux's open
# file description locks): the kernel, and NFSv4 or NLM for a network folder, release them when
# their holder dies, so nothing judges liveness by a PID or a clock. Owned by an open file rather
# than by a process, they also exclude two servers embedded in one program, and closing another
# descriptor of the file never drops them. Elsewhere flock() gives the same on a local folder.
_HAS_OFD_LOCKS = sys.platform.startswith("linux")
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
# struct flock: l_type, l_whence, l_start, l_len (0: to the end of the file), l_pid (0 for these).
_FLOCK = struct.Struct("hhqqi")


def lock_file(descriptor, blocking=True, shared=False):
    """Take the lock of the open file `descriptor`; False when another holds it and not `blocking`.

    The lock is exclusive, or `shared` with other shared ones.
    """
    try:
        if _HAS_OFD_LOCKS:
            command = _OFD_SETLKW if blocking else _OFD_SETLK
            lock_type = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
            fcntl.fcntl(descriptor, command, _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0))
        else:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            fcntl.flock(descriptor, mode | (0 if blocking else fcntl.LOCK_NB))
    except (BlockingIOError, PermissionError):
        return False
    return True


def unlock_file(descriptor):
    """Let go of the lock taken through `descriptor`, also while a forked child still shares the file."""
    if _HAS_OFD_LOCKS:
        fcntl.fcntl(descriptor, _OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


def is_file_locked(descriptor):
    """Tell whether another open file holds the lock of this file, without taking it."""
    if _HAS_OFD_LOCKS:
        answer = fcntl.fcntl(descriptor, _OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        return _FLOCK.unpack(answer[:_FLOCK.size])[0] != fcntl.F_UNLCK
    if lock_file(descriptor, blocking=False):
        unlock_file(descriptor)
        return False
    return True


def _is_queue_entry(name):
    # <sequence>-<job id>: the job's sequence number across every instance, 12 digits or more, and
    # its id (checked where it is used). Tested for every entry of a long queue on every PATCH:
    # kept cheap.
    sequence = name[:-17]
    return len(name) >= 29 and name[-17] == "-" and sequence.isascii() and sequence.isdigit()


def _queue_order(entry):
    # Ids have one length, so a longer name has the larger sequence number.
    return len(entry), entry


def storage_error(error):
    """Return HTTPError(507) for an OSError that means the folder is full, read-only or gone.

    Any other OSError is returned as it is, to be raised again as the unexpected error it is.
    """
    if error.errno in STORAGE_ERRNOS:
        return HTTPError(507, f"the storage folder is full or not writable ({error.strerror})")
    return error


def _fsync_path(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_if_present(path):
    # Never raises: a file that cannot be removed (a read-only disk) is a leftover, and the
    # start-up scan removes leftovers.
    try:
        os.unlink(path)
    except OSError:
        pass


# The cache's byte count, in its lock file: decimal, padded to one width, so that rewriting it
# never needs a new block of a full disk.
_COUNT_WIDTH = 20


def _read_count(descriptor):
    text = os.pread(descriptor, _COUNT_WIDTH, 0)
    return int(text) if text.strip().isdigit() else 0


def _write_count(descriptor, count):
    os.pwrite(descriptor, b"%*d" % (_COUNT_WIDTH, count), 0)


def _is_in_place(path, descriptor):
    # Whether the open file `descriptor` is still the one at `path`: not removed or replaced, here or
    # by another host.
    try:
        return os.path.samestat(os.stat(path), os.fstat(descriptor))
    except OSError as error:
        if error.errno not in STALE_ERRNOS:
            raise
        return False


def _remember(cache, key, value):
    # Keep what one version of a file gives (`key` names the version) in a cache of at most
    # MAX_SNIFFED_VERSIONS entries, which starts again when full; return the value.
    if len(cache) >= MAX_SNIFFED_VERSIONS:
        cache.clear()
    cache[key] = value
    return value


def _close_quietly(descriptor):
    # Closing a file only read can fail only where another host removed it meanwhile (ESTALE):
    # nothing is lost.
    try:
        os.close(descriptor)
    except OSError:
        pass


def _close_locked(descriptor):
    # Closing lets go of the lock too, but not while a forked child still shares the file: hence
    # the unlock first. A file another host removed meanwhile fails both, and holds no lock.
    try:
        unlock_file(descriptor)
    except OSError as error:
        if error.errno not in STALE_ERRNOS:
            raise
    finally:
        _close_quietly(descriptor)


def _try_lock(descriptor):
    # lock_file(blocking=False) for a file that another host may just have removed: False then.
    try:
        return lock_file(descriptor, blocking=False)
    except OSError as error:
        if error.errno not in STALE_ERRNOS:
            raise
        return False


@dataclasses.dataclass(frozen=True)
class Version:
    """One version of a stored file: writing or replacing it (a new inode) makes another."""

    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, file_status):
        """Return the Version an os.stat_result describes."""
        return cls(file_status.st_ino, file_status.st_mtime_ns, file_status.st_size)

    @property
    def tag(self):
        """This version in a word: its ETag unquoted, and the start of its renditions' names."""
        return f"{self.inode:x}-{self.mtime_ns:x}-{self.size:x}"

    @property
    def etag(self):
        """The strong ETag of this version."""
        return f'"{self.tag}"'

    @property
    def mtime_seconds(self):
        """The modification time in whole POSIX seconds, as HTTP dates have it."""
        return self.mtime_ns // 1_000_000_000


class StoredFile:
    """A stored image opened for reading: its version and real content type, and its bytes.

    Use it as a context manager; the file stays readable whatever happens to its name meanwhile.
    """

    def __init__(self, descriptor, version, content_type):
        self.descriptor = descriptor
        self.version = version
        self.content_type = content_type

    def read(self, start, length):
        """Return `length` bytes from `start` (fewer if the file was truncated meanwhile)."""
        return os.pread(self.descriptor, length, start)

    def send(self, connection, start, length):
        """Send `length` bytes from `start` to the socket `connection` with sendfile(); return the count sent."""
        with open(self.descriptor, "rb", closefd=False) as file:
            return connection.sendfile(file, start, length)

    def reader(self):
        """Return a file object that reads from the start; closing it leaves this file open."""
        os.lseek(self.descriptor, 0, os.SEEK_SET)
        return open(self.descriptor, "rb", closefd=False)

    def close(self):
        """Close the descriptor."""
        _close_quietly(self.descriptor)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class TempFile:
    """A hidden file in the storage folder, being written, that is either published or removed.

    Its writer holds its lock until it is removed, so no scan by any instance removes it meanwhile.
    Write errors that mean a full or read-only disk raise HTTPError(507).
    """

    def __init__(self, path):
        self.path = path
        while True:
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS_NO_FOLLOW, 0o644)
            except OSError as error:
                raise storage_error(error) from None
            lock_file(descriptor)
            # A scan may have taken the new file for a leftover between its creation and its lock,
            # and removed it: then it is made again.
            if _is_in_place(path, descriptor):
                self._descriptor = descriptor
                return
            _close_locked(descriptor)

    def write(self, data):
        """Append `data`; raises HTTPError(507) when the disk is full."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._descriptor, view):]
        except OSError as error:
            raise storage_error(error) from None

    def finish(self):
        """Flush the bytes to disk; the file stays locked until it is removed."""
        try:
            os.fsync(self._descriptor)
        except OSError as error:
            raise storage_error(error) from None

    def remove(self):
        """Delete the file if it is still there (a published or replaced file is not), and let go of it."""
        if self._descriptor is not None:
            _remove_if_present(self.path)
            _close_locked(self._descriptor)
            self._descriptor = None


class FolderLock:
    """The folder's exclusive lock: held by one thread of one instance at a time, on any host.

    A context manager; HTTPError(507) when the lock file cannot be opened (a read-only folder). A
    thread lock in front keeps this instance's threads apart. The lock file is open only while the
    lock is held: a file kept open for writing would stop the folder from being remounted
    read-only.
    """

    def __init__(self, path):
        self._path = path
        self._thread_lock = threading.Lock()
        # The lock file's descriptor while the lock is held, to read or write what it records.
        self.descriptor = None

    def __enter__(self):
        self._thread_lock.acquire()
        try:
            try:
                descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS_NO_FOLLOW, 0o644)
            except OSError as error:
                raise storage_error(error) from None
            try:
                lock_file(descriptor)
            except BaseException:
                os.close(descriptor)
                raise
        except BaseException:
            self._thread_lock.release()
            raise
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info):
        try:
            _close_locked(self.descriptor)
        finally:
            self.descriptor = None
            self._thread_lock.release()


class EntryLock:
    """An exclusive lock on one name, held by one thread of one instance at a time, on any host.

    A context manager. The lock file is removed by its holder as it lets go, so none are left
    behind; a waiter that then holds the lock of a file no longer in place takes the new one.
    Where the lock file cannot be made (a full disk) the lock is not taken, and nothing waits.
    """

    def __init__(self, path):
        self._path = path
        self._descriptor = None

    def __enter__(self):
        while True:
            try:
                descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS_NO_FOLLOW, 0o644)
            except FileNotFoundError:
                # Its folder was removed with the image's renditions, or is not made yet.
                try:
                    os.makedirs(os.path.dirname(self._path), exist_ok=True)
                    continue
                except OSError as error:
                    if error.errno not in STORAGE_ERRNOS:
                        raise
                    return self
            except OSError as error:
                if error.errno not in STORAGE_ERRNOS:
                    raise
                return self
            try:
                lock_file(descriptor)
                is_in_place = _is_in_place(self._path, descriptor)
            except BaseException:
                _close_quietly(descriptor)
                raise
            if is_in_place:
                self._descriptor = descriptor
                return self
            _close_locked(descriptor)

    def __exit__(self, *exc_info):
        if self._descriptor is not None:
            _remove_if_present(self._path)
            _close_locked(self._descriptor)
            self._descriptor = None


@dataclasses.dataclass
class Claim:
    """A queued job this instance holds the lock of, to run it: its queue entry and current record."""

    entry: str
    descriptor: int
    record: dict


class Store:
    """The storage folder: its images and their versions, temp files, job records, queue and locks.

    Names given to it satisfy is_image_name(). A missing image raises HTTPError(404), a full or
    read-only folder HTTPError(507). Several Stores, in any processes on any hosts, may share one
    folder: every change that depends on what is stored happens under the folder's lock.
    """

    def __init__(self, folder, cache_size=Settings.cache_size, on_evicted=None):
        self.folder = folder
        self.cache_size = cache_size
        # Told how many renditions each eviction removed.
        self._on_evicted = on_evicted
        state = os.path.join(folder, STATE_FOLDER)
        self._jobs_folder = os.path.join(state, "jobs")
        self._queue_folder = os.path.join(state, "queue")
        self._locks_folder = os.path.join(state, "locks")
        self._renditions_folder = os.path.join(state, "renditions")
        for path in (self._jobs_folder, self._queue_folder, self._locks_folder, self._renditions_folder):
            os.makedirs(path, exist_ok=True)
        # Resize slots are per host: one lock file per slot, named after the host.
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
        self._slot_prefix = os.path.join(self._locks_folder, f"{SLOT_PREFIX}{host}-")
        # Held while an image is replaced, removed, or its jobs queued or ended, so each happens
        # only if what was checked first is still true.
        self._lock = FolderLock(os.path.join(self._locks_folder, "folder"))
        # Held while renditions are added to the cache or evicted; its file records the bytes the
        # cache holds, for every instance.
        self._cache_lock = FolderLock(os.path.join(self._locks_folder, "renditions"))
        # Renders waiting for a slot hold a shared lock on this file, so that no instance on this
        # host starts a queued job in the slot they wait for.
        self._renders_waiting_path = os.path.join(self._locks_folder, f"renders-{host}")
        self._renders_waiting_descriptor = None
        self._renders_waiting = 0
        self._renders_waiting_lock = threading.Lock()
        # Slots taken in this instance where the folder cannot hold their lock files.
        self._own_slots = set()
        self._own_slots_lock = threading.Lock()
        self.mount = mount_of(folder)
        # Where other hosts change files under this one's caches, the folder's modification time
        # cannot tell when to list it again, and a download's first read must reach the file.
        self._is_network = self.mount is not None and self.mount.is_network
        self._listing_lock = threading.Lock()
        # Reads of a folder whose time is not trusted: counted, so that requests can share one.
        self._read_done = threading.Condition()
        self._reads_started = self._reads_finished = 0
        self._is_reading = False
        self._names = frozenset()
        # The sorted names, and their JSON list encoded.
        self._listing = ((), b"[]\n")
        self._mtime_ns = None
        self._is_settled = False
        self._content_types = {}
        # What images' headers tell, one per version; and digests of files, one per version and algorithm.
        self._facts = {}
        self._digests = {}
        # Queue entries never change once written: their records as queued, by entry name.
        self._entries = {}

    def scan(self):
        """Remove the leftovers of interrupted writes by writers that are gone, then read the folder."""
        self.remove_leftovers()
        with self._listing_lock:
            self._refresh(force=True)

    def remove_leftovers(self):
        """Remove the temp files no writer holds, here or in any other instance; called at start, every minute and at stop."""
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    self._remove_if_unlocked(entry.path)
        for folder in self._rendition_folders():
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.name.startswith(TEMP_PREFIX):
                            self._remove_if_unlocked(entry.path)
            except OSError:
                # Its image was deleted meanwhile, and its renditions with it.
                continue
        cutoff = time.time() - RECORD_TEMP_SECONDS
        for folder in (self._jobs_folder, self._queue_folder):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):
                        continue
                    try:
                        is_old = entry.stat(follow_symlinks=False).st_mtime < cutoff
                    except OSError:
                        # Renamed into place by its writer meanwhile: not a leftover.
                        continue
                    if is_old:
                        _remove_if_present(entry.path)

    # Reading

    def listing(self):
        """Return the sorted JSON list of names, encoded; HTTPError(507) when the folder is gone.

        Every change acknowledged before the call is in the answer. On a network filesystem that
        takes a read of the folder begun after the call: requests that come during one read wait
        for the next, and share it, so a crowd of listings costs two reads, not one each.
        """
        return self._fresh_listing()[1]

    def names(self):
        """Return the stored names, sorted, as fresh as listing()'s."""
        return self._fresh_listing()[0]

    def facts(self, name):
        """Return the Version of the stored image `name` and image_facts() of it, read once per version.

        The facts are None for a file that is no readable image; the whole answer is None when
        there is no image `name`.
        """
        try:
            version = self.version(name)
        except HTTPError:
            return None
        if version not in self._facts:
            try:
                with self.open(name) as stored, stored.reader() as file:
                    facts = image_facts(file)
            except HTTPError:
                return None
            _remember(self._facts, version, facts)
        return version, self._facts.get(version)

    def totals(self):
        """Return the number of stored images and their bytes, as the folder holds them now."""
        count = size = 0
        for name in self.names():
            try:
                size += os.stat(self.path_of(name), follow_symlinks=False).st_size
                count += 1
            except OSError:
                # Removed since the listing.
                continue
        return count, size

    def digest(self, stored, algorithm):
        """Return the `algorithm` digest ("sha-256", "sha-512") of the whole StoredFile `stored`, computed once per version."""
        key = (stored.version, algorithm)
        digest = self._digests.get(key)
        if digest is None:
            hasher = hashlib.new(DIGEST_ALGORITHMS[algorithm])
            offset = 0
            while True:
                data = stored.read(offset, DIGEST_READ_BYTES)
                if not data:
                    break
                hasher.update(data)
                offset += len(data)
            digest = _remember(self._digests, key, hasher.digest())
        return digest

    def health(self):
        """Return None while the folder can be read and written, else why it cannot, in words.

        Asks the kernel (stat, access, statvfs) and writes nothing, so it is cheap enough for a
        load balancer to ask every second.
        """
        for folder in (self.folder, self._locks_folder):
            try:
                status = os.stat(folder)
            except OSError as error:
                return f"the storage folder {folder} cannot be reached: {error.strerror or error}"
            if not stat.S_ISDIR(status.st_mode):
                return f"the storage folder {folder} is not a folder"
            if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                return f"the storage folder {folder} cannot be read and written by this server"
        try:
            space = os.statvfs(self.folder)
        except OSError as error:
            return f"the storage folder {self.folder} cannot be reached: {error.strerror or error}"
        if space.f_flag & os.ST_RDONLY:
            return f"the storage folder {self.folder} is on a read-only filesystem"
        if space.f_bavail * space.f_frsize < HEALTH_MIN_FREE_BYTES or space.f_files and not space.f_favail:
            return f"the disk of the storage folder {self.folder} is full"
        return None

    def _fresh_listing(self):
        if not self._is_network:
            with self._listing_lock:
                self._refresh()
                return self._listing
        with self._read_done:
            wanted = self._reads_started + 1
            while self._is_reading and self._reads_finished < wanted:
                self._read_done.wait()
            if self._reads_finished >= wanted:
                return self._listing
            self._is_reading = True
            self._reads_started += 1
        is_read = False
        try:
            with self._listing_lock:
                self._refresh(force=True)
                listing = self._listing
            is_read = True
        finally:
            with self._read_done:
                self._is_reading = False
                if is_read:
                    self._reads_finished = self._reads_started
                self._read_done.notify_all()
        return listing

    def __contains__(self, name):
        """Tell whether `name` is stored now (a file in the folder, not a cached listing)."""
        try:
            self.version(name)
        except HTTPError:
            return False
        return True

    def resolve(self, name):
        """Return `name`, or the safe name it was stored under when only that exists.

        The old service made names in URLs safe too, so /my%20photo.jpg finds my_photo.jpg.
        """
        safe_name = secure_filename(name)
        if safe_name != name and is_image_name(safe_name):
            if not os.path.lexists(self.path_of(name)) and os.path.lexists(self.path_of(safe_name)):
                return safe_name
        return name

    def version(self, name):
        """Return the Version of the stored image `name`; HTTPError(404) when there is none.

        Symbolic links, folders and FIFOs with an image name are not stored images.
        """
        try:
            file_status = os.stat(self.path_of(name), follow_symlinks=False)
        except OSError:
            file_status = None
        if file_status is None or not stat.S_ISREG(file_status.st_mode):
            raise HTTPError(404, f"no image named {name!r} is stored")
        return Version.of(file_status)

    def open(self, name):
        """Open the stored image `name` for reading: a StoredFile; HTTPError(404) when there is none.

        A network filesystem's client may open a file another host has just removed or replaced,
        and fail only at its first use: the name is then looked up again, once.
        """
        for _ in range(2):
            try:
                return self._open_stored(name)
            except OSError as error:
                if error.errno not in STALE_ERRNOS:
                    raise
        raise HTTPError(404, f"no image named {name!r} is stored")

    def content_type(self, name, version):
        """Return the content type of `version` of the stored image `name`, read from its first bytes once per version.

        HTTPError(404) when there is no image `name`.
        """
        content_type = self._content_types.get(version)
        if content_type is None:
            with self.open(name) as stored:
                content_type = stored.content_type
        return content_type

    def _open_stored(self, name):
        try:
            descriptor = os.open(self.path_of(name), os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW)
        except OSError as error:
            if error.errno == errno.ESTALE:
                raise
            raise HTTPError(404, f"no image named {name!r} is stored") from None
        try:
            file_status = os.fstat(descriptor)
            if not stat.S_ISREG(file_status.st_mode):
                raise HTTPError(404, f"no image named {name!r} is stored")
            version = Version.of(file_status)
            content_type = self._content_types.get(version)
            # On a network filesystem the first read also makes a lazy client really open the
            # file, so that it stays readable whatever another host does to its name from here on.
            if content_type is None or self._is_network:
                content_type = self._sniff(descriptor, version)
            return StoredFile(descriptor, version, content_type)
        except BaseException:
            _close_quietly(descriptor)
            raise

    def path_of(self, name):
        """Return the path of `name` in the folder, for a resize process to read."""
        return os.path.join(self.folder, name)

    # Changing

    def new_file(self, suffix=""):
        """Return a locked TempFile to write an upload or a resize into; HTTPError(507) when not writable."""
        return TempFile(os.path.join(self.folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"))

    def publish(self, temp_file, name):
        """Give a finished TempFile the name `name` without ever overwriting an existing file.

        A hard link fails when the name exists, also when another process made it a moment ago, so
        of two uploads of one name exactly one wins. Raises HTTPError(409) for the loser, 507 when
        the folder is not writable. The name is durable when this returns.
        """
        try:
            os.link(temp_file.path, self.path_of(name))
            _fsync_path(self.folder)
        except FileExistsError:
            raise HTTPError(409, f"an image named {name!r} is already stored") from None
        except OSError as error:
            raise storage_error(error) from None

    def replace(self, name, temp_file, expected, is_wanted):
        """Put the finished `temp_file` in place of `name`, if that is still version `expected`.

        Readers see the old file or the new one, whole, and so does a crash: the new bytes are on
        disk before the name is. Returns False, replacing nothing, when `name` is another version
        or gone, or when is_wanted(inode of the new file), called under the folder's lock, says
        no; HTTPError(507) when the folder is not writable.
        """
        temp_file.finish()
        with self._lock:
            try:
                if self.version(name) != expected:
                    return False
            except HTTPError:
                return False
            if not is_wanted(os.stat(temp_file.path).st_ino):
                return False
            try:
                os.replace(temp_file.path, self.path_of(name))
                _fsync_path(self.folder)
            except OSError as error:
                raise storage_error(error) from None
        self._remove_renditions(name)
        return True

    def remove(self, name, precondition=None, on_removing=None):
        """Remove the stored image `name` and cancel its jobs; HTTPError(404) when there is none, 507 when not writable.

        precondition(version), called under the folder's lock, may raise (412 for If-Match) to keep
        the file. Jobs of the image that have not ended are cancelled, wherever they wait or run,
        before the file goes; on_removing(), under the lock too, stops the ones running here.
        Returns the records of the jobs that waited and are now cancelled.
        """
        with self._lock:
            version = self.version(name)
            if precondition is not None:
                precondition(version)
            cancelled = self._cancel_jobs(name, "the image was deleted")
            if on_removing is not None:
                on_removing()
            try:
                os.unlink(self.path_of(name))
                _fsync_path(self.folder)
            except FileNotFoundError:
                raise HTTPError(404, f"no image named {name!r} is stored") from None
            except OSError as error:
                raise storage_error(error) from None
        self._remove_renditions(name)
        return cancelled

    # Renditions: .ims/renditions/<image name>/<entry>, where the entry names the version of the
    # image it was rendered from and the parameters, so a replaced image's renditions are never
    # found again. Removed with their image, and least recently used first past cache_size.

    def open_rendition(self, name, entry, content_type):
        """Return the cached rendition `entry` of `name` as a StoredFile, or None when it is not cached."""
        try:
            descriptor = os.open(self._rendition_path(name, entry), os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW)
        except OSError:
            return None
        try:
            file_status = os.fstat(descriptor)
            if not stat.S_ISREG(file_status.st_mode):
                _close_quietly(descriptor)
                return None
            if time.time() - file_status.st_mtime > CACHE_TOUCH_SECONDS:
                try:
                    os.utime(descriptor)
                except OSError:
                    # A read-only folder: the rendition is served all the same.
                    pass
        except OSError:
            _close_quietly(descriptor)
            return None
        return StoredFile(descriptor, Version.of(file_status), content_type)

    def rendition_lock(self, name, entry):
        """Return the EntryLock that one renderer of `entry`, on any host, holds at a time."""
        return EntryLock(os.path.join(self._renditions_folder, name, f"{TEMP_PREFIX}lock-{entry}"))

    def new_rendition_file(self, name, suffix):
        """Return a locked TempFile beside the renditions of `name`; HTTPError(507) when not writable."""
        folder = os.path.join(self._renditions_folder, name)
        for attempt in range(2):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as error:
                raise storage_error(error) from None
            try:
                return TempFile(os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"))
            except HTTPError:
                # The image's renditions were removed, folder and all, between the two steps.
                if attempt or os.path.isdir(folder):
                    raise
        raise AssertionError("unreachable")

    def keep_rendition(self, temp_file, name, version, entry, size):
        """Put the finished `temp_file` in the cache as `entry` of `version` of `name`; False when it is not kept.

        It is not kept when `name` is no longer `version` (a delete or a replacement removes the
        renditions it finds under the cache lock: this one comes after), when it is larger than
        the whole cache, or when the disk is full. Entries least recently used are evicted first,
        down to CACHE_LOW_WATER of the cache, when it would grow past cache_size.
        """
        if size > self.cache_size:
            return False
        try:
            temp_file.finish()
            with self._cache_lock as lock:
                try:
                    if self.version(name) != version:
                        return False
                except HTTPError:
                    return False
                total = _read_count(lock.descriptor)
                try:
                    os.link(temp_file.path, self._rendition_path(name, entry))
                except FileExistsError:
                    return True
                total += size
                if total > self.cache_size:
                    total = self._evict_renditions(int(self.cache_size * CACHE_LOW_WATER))
                _write_count(lock.descriptor, total)
        except HTTPError as error:
            if error.status != 507:
                raise
            return False
        except OSError as error:
            if error.errno not in STORAGE_ERRNOS:
                raise
            return False
        return True

    def check_renditions(self):
        """Count the cache's bytes again, and evict if they are past cache_size.

        Called every JOB_CLEANUP_SECONDS: it corrects the count of an instance killed between
        adding a rendition and counting it.
        """
        with self._cache_lock as lock:
            total = self._evict_renditions(None)
            if total > self.cache_size:
                total = self._evict_renditions(int(self.cache_size * CACHE_LOW_WATER))
            _write_count(lock.descriptor, total)

    def cached_bytes(self):
        """Return the bytes of renditions the cache holds, as counted."""
        with self._cache_lock as lock:
            return _read_count(lock.descriptor)

    def announce_render(self, is_waiting):
        """Count a render of this instance that starts (True) or stops (False) waiting for a slot."""
        with self._renders_waiting_lock:
            self._renders_waiting += 1 if is_waiting else -1
            try:
                if is_waiting and self._renders_waiting == 1:
                    descriptor = os.open(self._renders_waiting_path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS_NO_FOLLOW, 0o644)
                    lock_file(descriptor, shared=True)
                    self._renders_waiting_descriptor = descriptor
                elif not is_waiting and self._renders_waiting == 0 and self._renders_waiting_descriptor is not None:
                    _close_locked(self._renders_waiting_descriptor)
                    self._renders_waiting_descriptor = None
            except OSError:
                # A full or read-only disk: this instance's own jobs still wait for its renders.
                pass

    def are_renders_waiting(self):
        """Tell whether renders of any instance on this host wait for a slot, which jobs must leave them."""
        with self._renders_waiting_lock:
            if self._renders_waiting:
                return True
        try:
            descriptor = os.open(self._renders_waiting_path, os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW)
        except OSError:
            return False
        try:
            return is_file_locked(descriptor)
        except OSError:
            return False
        finally:
            _close_quietly(descriptor)

    def _rendition_path(self, name, entry):
        return os.path.join(self._renditions_folder, name, entry)

    def _rendition_folders(self):
        try:
            with os.scandir(self._renditions_folder) as entries:
                return [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    @staticmethod
    def _renditions_in(folder):
        # The renditions in one image's folder, not the hidden files of renders under way:
        # (modification time, size, path) each; none when the folder is gone.
        try:
            with os.scandir(folder) as entries:
                names = [entry.name for entry in entries if not entry.name.startswith(".")]
        except OSError:
            return []
        renditions = []
        for name in names:
            path = os.path.join(folder, name)
            try:
                file_status = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            renditions.append((file_status.st_mtime_ns, file_status.st_size, path))
        return renditions

    def _evict_renditions(self, keep_bytes):
        # Under the cache lock: remove the least recently used renditions until at most
        # `keep_bytes` remain (None removes nothing); return the bytes left. A reader that has
        # one open keeps reading it whole.
        renditions = [rendition for folder in self._rendition_folders() for rendition in self._renditions_in(folder)]
        total = sum(size for _, size, _ in renditions)
        if keep_bytes is not None:
            renditions.sort()
            evicted = 0
            for _, size, path in renditions:
                if total <= keep_bytes:
                    break
                _remove_if_present(path)
                total -= size
                evicted += 1
            if evicted and self._on_evicted is not None:
                self._on_evicted(evicted)
        return total

    def remove_rendition_folder(self, name):
        """Remove the folder of the renditions of `name` if it holds none (nor anything being written)."""
        try:
            os.rmdir(os.path.join(self._renditions_folder, name))
        except OSError:
            pass

    def _remove_renditions(self, name):
        # Every rendition of `name` (none can be of the version now stored, which is new), and
        # its folder when no render into it is under way. Never raises: what is left is counted,
        # and evicted in time, by check_renditions().
        folder = os.path.join(self._renditions_folder, name)
        if not os.path.isdir(folder):
            return
        try:
            with self._cache_lock as lock:
                removed = 0
                for _, size, path in self._renditions_in(folder):
                    try:
                        os.unlink(path)
                    except OSError:
                        continue
                    removed += size
                if removed:
                    _write_count(lock.descriptor, max(0, _read_count(lock.descriptor) - removed))
            os.rmdir(folder)
        except (HTTPError, OSError):
            pass

    # Jobs: a record per job in .ims/jobs/<id>.json, and, until it ends, an entry in .ims/queue
    # named <sequence>-<id>, a hard link to its record as accepted. Sequence numbers order the
    # entries of every instance. The instance running a job holds its entry's lock.

    def load_record(self, job_id):
        """Return the record of job `job_id` as a dict, or None when there is none or it is unreadable."""
        if not _JOB_ID.fullmatch(job_id):
            return None
        return self._read_record(os.path.join(self._jobs_folder, job_id + ".json"))

    def save_record(self, record, durable=False):
        """Write a job's record in place of its last one, atomically; `durable` waits until it is on disk."""
        self._write_record(record, os.path.join(self._jobs_folder, record["id"] + ".json"), durable)

    def update_record(self, record):
        """Write a job's record unless the job has ended meanwhile (a DELETE cancelled it); True if written."""
        with self._lock:
            current = self.load_record(record["id"])
            if current is not None and current["state"] in ENDED_STATES:
                return False
            self.save_record(record)
            return True

    def enqueue(self, record, max_queue, slot_count):
        """Record a new job, durably, and put it at the end of the folder's queue.

        Raises HTTPError(503) when `max_queue` jobs would then wait beyond the ones running and the
        free resize slots of this host (`slot_count` in all), and 507 when the folder is not writable.
        """
        temp_path = os.path.join(self._jobs_folder, f".{record['id']}.json")
        try:
            # A full queue is answered before anything is written; the lock makes the answer exact.
            self._check_queue_room(max_queue, slot_count)
            self._write_file(temp_path, json.dumps(record).encode(), durable=True)
            with self._lock:
                entries = self._check_queue_room(max_queue, slot_count)
                sequence = int(max(entries, key=_queue_order)[:-17]) + 1 if entries else 0
                entry = f"{sequence:012d}-{record['id']}"
                os.link(temp_path, os.path.join(self._queue_folder, entry))
                os.rename(temp_path, os.path.join(self._jobs_folder, record["id"] + ".json"))
            self._entries[entry] = record
            # The entry is the job as accepted: once it is on disk, so is the promise. The record's
            # name may be lost by a crash; claim() then reads the entry instead.
            _fsync_path(self._queue_folder)
        except OSError as error:
            raise storage_error(error) from None
        finally:
            _remove_if_present(temp_path)

    def _check_queue_room(self, max_queue, slot_count):
        # Returns the queue's entries, or raises HTTPError(503).
        entries = self._entry_names()
        if len(entries) >= max_queue:
            # A job runs while it holds a slot, on any host: a few lock files to look at rather
            # than every entry of a long queue.
            slots = [name for name in os.listdir(self._locks_folder) if name.startswith(SLOT_PREFIX)]
            running = sum(self._is_locked(os.path.join(self._locks_folder, name)) for name in slots)
            free_slots = sum(not self._is_locked(f"{self._slot_prefix}{slot}") for slot in range(slot_count))
            if len(entries) - running >= max_queue + free_slots:
                raise HTTPError(503, f"the queue of {max_queue} waiting resizes is full; try again later", {"Retry-After": "1"})
        return entries

    def queued_records(self):
        """Return (entry, record as accepted) for every job not ended, in the order they were accepted."""
        entries = sorted(self._entry_names(), key=_queue_order)
        known = {}
        for entry in entries:
            record = self._entries.get(entry)
            if record is None:
                record = self._read_record(os.path.join(self._queue_folder, entry))
            if record is not None:
                known[entry] = record
        self._entries = known
        return [(entry, record) for entry, record in known.items()]

    def unended_jobs(self):
        """Return how many jobs, of every instance, are queued or running."""
        return len(self._entry_names())

    def claim(self, entry):
        """Take the lock of a queued job to run it: a Claim, or None when another holds it or it has ended.

        An entry whose job has already ended (its runner died before removing it) is removed here.
        """
        path = os.path.join(self._queue_folder, entry)
        try:
            descriptor = os.open(path, os.O_RDWR | OPEN_FLAGS_NO_FOLLOW)
        except OSError:
            return None
        if not _try_lock(descriptor):
            _close_quietly(descriptor)
            return None
        try:
            # Locked only after its last runner removed it: it has ended.
            if not _is_in_place(path, descriptor):
                _close_locked(descriptor)
                return None
            record = self.load_record(entry.partition("-")[2]) or self._read_record(path)
        except BaseException:
            _close_locked(descriptor)
            raise
        if record is None or record["state"] in ENDED_STATES:
            _remove_if_present(path)
            _close_locked(descriptor)
            return None
        return Claim(entry, descriptor, record)

    def end(self, claim, record, on_recorded=None):
        """Record how a claimed job ended, unless a DELETE ended it first, and drop it from the queue.

        on_recorded() runs as soon as the record says so, before it is flushed to disk; the queue
        entry goes only after that, so no crash leaves a job neither queued nor ended.
        """
        try:
            with self._lock:
                current = self.load_record(record["id"])
                if current is None or current["state"] not in ENDED_STATES:
                    self.save_record(record)
            if on_recorded is not None:
                on_recorded()
            try:
                _fsync_path(os.path.join(self._jobs_folder, record["id"] + ".json"))
                _fsync_path(self._jobs_folder)
            except OSError as error:
                raise storage_error(error) from None
            _remove_if_present(os.path.join(self._queue_folder, claim.entry))
        finally:
            _close_locked(claim.descriptor)

    def release(self, claim):
        """Let go of a claimed job without ending it: it stays queued for any instance to run."""
        _close_locked(claim.descriptor)

    def take_slot(self, slot_count):
        """Take one of this host's `slot_count` resize slots: its locked descriptor, or None when all are taken.

        Where the folder cannot hold the slots' lock files (read-only), the bound holds for this
        instance alone: the slot is then a negative number.
        """
        for slot in range(slot_count):
            try:
                descriptor = os.open(f"{self._slot_prefix}{slot}", os.O_RDWR | os.O_CREAT | OPEN_FLAGS_NO_FOLLOW, 0o644)
            except OSError as error:
                if error.errno not in STORAGE_ERRNOS:
                    raise
                return self._take_own_slot(slot_count)
            if lock_file(descriptor, blocking=False):
                return descriptor
            os.close(descriptor)
        return None

    def release_slot(self, descriptor):
        """Give back a resize slot."""
        if descriptor < 0:
            with self._own_slots_lock:
                self._own_slots.discard(descriptor)
        else:
            _close_locked(descriptor)

    def _take_own_slot(self, slot_count):
        with self._own_slots_lock:
            for slot in range(-1, -slot_count - 1, -1):
                if slot not in self._own_slots:
                    self._own_slots.add(slot)
                    return slot
        return None

    def remove_old_records(self):
        """Remove the records of jobs that ended over JOB_RETENTION_SECONDS ago, keeping the last JOB_RETENTION_COUNT."""
        with os.scandir(self._jobs_folder) as entries:
            records = [entry for entry in entries if entry.name.endswith(".json") and not entry.name.startswith(".")]
        if len(records) <= JOB_RETENTION_COUNT:
            return
        queued = {entry.partition("-")[2] + ".json" for entry in self._entry_names()}
        ended = []
        for entry in records:
            try:
                ended.append((entry.stat(follow_symlinks=False).st_mtime, entry))
            except OSError:
                continue
        ended.sort(key=lambda pair: pair[0], reverse=True)
        cutoff = time.time() - JOB_RETENTION_SECONDS
        for mtime, entry in ended[JOB_RETENTION_COUNT:]:
            if mtime < cutoff and entry.name not in queued:
                _remove_if_present(entry.path)

    def _cancel_jobs(self, name, reason):
        # Returns the records of the jobs cancelled that were not running.
        cancelled = []
        for entry, accepted in self.queued_records():
            if accepted.get("image") != name:
                continue
            record = self.load_record(accepted["id"])
            path = os.path.join(self._queue_folder, entry)
            # The instance running it (it holds the lock) removes it when its resize stops.
            is_running = self._is_locked(path)
            if record is not None and record["state"] not in ENDED_STATES:
                record.update(state=CANCELLED, error=reason, finished=time.time())
                self.save_record(record, durable=True)
                if not is_running:
                    cancelled.append(record)
            if not is_running:
                _remove_if_present(path)
        return cancelled

    def _entry_names(self):
        # In no order: sorting costs more than listing, and a PATCH needs only the count and the last.
        try:
            return [name for name in os.listdir(self._queue_folder) if _is_queue_entry(name)]
        except FileNotFoundError:
            raise HTTPError(507, f"the storage folder {self.folder} no longer exists") from None

    @staticmethod
    def _is_locked(path):
        try:
            descriptor = os.open(path, os.O_RDWR | OPEN_FLAGS_NO_FOLLOW)
        except OSError:
            return False
        try:
            return is_file_locked(descriptor)
        except OSError as error:
            # Removed by another host since it was opened: nobody holds it any more.
            if error.errno not in STALE_ERRNOS:
                raise
            return False
        finally:
            _close_quietly(descriptor)

    @staticmethod
    def _read_record(path):
        # A record is replaced by a rename; a network client may fail to read the one it opened,
        # replaced by another host meanwhile, and then reads the name again, once.
        for attempt in (1, 2):
            try:
                with open(os.open(path, os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW), "rb") as file:
                    record = json.loads(file.read(MAX_PARAMETERS_BYTES))
                break
            except OSError as error:
                if error.errno not in STALE_ERRNOS or attempt == 2:
                    return None
            except ValueError:
                return None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or record.get("state") not in (QUEUED, RUNNING, *ENDED_STATES):
            return None
        return record

    def _write_record(self, record, path, durable):
        temp_path = os.path.join(os.path.dirname(path), f".{record['id']}-{secrets.token_hex(4)}.json")
        data = json.dumps(record).encode()
        try:
            self._write_file(temp_path, data, durable)
            os.replace(temp_path, path)
            if durable:
                _fsync_path(os.path.dirname(path))
        except OSError as error:
            _remove_if_present(temp_path)
            if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._overwrite(path, data, durable):
                raise storage_error(error) from None

    @staticmethod
    def _overwrite(path, data, durable):
        # A full disk has no room for a new record, but the last one's block has room for its end:
        # written over in place, padded with JSON white space, so no job stays running for ever.
        try:
            descriptor = os.open(path, os.O_WRONLY | OPEN_FLAGS_NO_FOLLOW)
        except OSError:
            return False
        try:
            os.pwrite(descriptor, data.ljust(os.fstat(descriptor).st_size), 0)
            if durable:
                os.fsync(descriptor)
        except OSError:
            return False
        finally:
            os.close(descriptor)
        return True

    @staticmethod
    def _write_file(path, data, durable):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS_NO_FOLLOW, 0o644)
        try:
            os.write(descriptor, data)
            if durable:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)

    # Caches

    def _sniff(self, descriptor, version):
        image_format = sniff_format(os.pread(descriptor, SNIFF_BYTES, 0))
        return _remember(self._content_types, version, CONTENT_TYPE_BY_FORMAT.get(image_format, UNKNOWN_CONTENT_TYPE))

    def _refresh(self, force=False):
        try:
            mtime_ns = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            raise HTTPError(507, f"the storage folder {self.folder} no longer exists") from None
        if mtime_ns == self._mtime_ns and self._is_settled and not self._is_network and not force:
            return
        now_ns = time.time_ns()
        with os.scandir(self.folder) as entries:
            names = frozenset(
                entry.name for entry in entries if is_image_name(entry.name) and entry.is_file(follow_symlinks=False)
            )
        self._mtime_ns = mtime_ns
        self._is_settled = now_ns - mtime_ns > FOLDER_MTIME_SLACK_NS
        if names != self._names:
            self._names = names
            ordered = tuple(sorted(names))
            self._listing = (ordered, (json.dumps(ordered) + "\n").encode())

    @staticmethod
    def _remove_if_unlocked(path):
        try:
            descriptor = os.open(path, os.O_RDWR | OPEN_FLAGS_NO_FOLLOW)
        except OSError:
            return
        if not _try_lock(descriptor):
            _close_quietly(descriptor)
            return
        _remove_if_present(path)
        _close_locked(descriptor)


# ====
# Body parsing
# ====
# Owns the grammar of request heads and bodies, parameters and conditional headers. Pure: takes
# bytes and strings, returns values or events, raises HTTPError; never touches a socket or a file.

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(r"[0-9]{1,18}")
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_CONTROL_IN_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ENDS_WITH_HTTP_VERSION = re.compile(rb" HTTP/[0-9]\.[0-9]\r?$")


class Headers:
    """Request header fields: case-insensitive look-up, repeated fields kept in order."""

    def __init__(self, fields=()):
        self._values = {}
        for name, value in fields:
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        """Return the first value of field `name`, or `default`."""
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        """Return every value of field `name` in order, or None."""
        return self._values.get(name.lower())

    def __contains__(self, name):
        return name.lower() in self._values


@dataclasses.dataclass(frozen=True)
class Request:
    """A request head, parsed and framed: what is asked, how its body comes, and keep-alive.

    `path` and `query` split the target; `content_length` is 0 for a chunked body;
    `keep_alive` is what the client asked for (its version and Connection header).
    """

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: Headers
    content_length: int
    is_chunked: bool
    keep_alive: bool

    @property
    def has_body(self):
        """Tell whether a body follows the head."""
        return self.is_chunked or self.content_length > 0


def parse_request(head):
    """Parse and frame a request head (RFC 9112 §2–§7), the bytes up to and including its blank line.

    Lines may end in CRLF or a bare LF (RFC 9112 §2.2). Raises HTTPError(400) for a malformed
    request line, target or field and for ambiguous framing, 414 for a request line over
    MAX_REQUEST_LINE_BYTES, 431 for a field line over MAX_HEADER_LINE_BYTES or more than
    MAX_HEADER_FIELDS fields, 505 for a version other than HTTP/1.0 and HTTP/1.1.
    """
    lines = head.split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    if len(request_line) > MAX_REQUEST_LINE_BYTES:
        raise HTTPError(414, f"the request line is longer than {MAX_REQUEST_LINE_BYTES} bytes")
    words = request_line.decode("latin-1").split(" ")
    if len(words) != 3 or not _TOKEN.fullmatch(words[0]) or not words[1]:
        raise HTTPError(400, f"the request line {request_line[:100].decode('latin-1')!r} is not 'METHOD /path HTTP/1.1'")
    method, target, version = words
    version_match = _HTTP_VERSION.fullmatch(version)
    if not version_match:
        raise HTTPError(400, f"{version[:20]!r} is not an HTTP version")
    if version_match.group(1) != "1":
        raise HTTPError(505, f"{version} is not supported; use HTTP/1.1")
    # RFC 9112 §2.3: a later 1.x minor version is answered as the highest one we speak.
    version = "HTTP/1.0" if version == "HTTP/1.0" else "HTTP/1.1"
    if _CONTROL_OR_SPACE.search(target) or not target.isascii():
        raise HTTPError(400, "the request target must be ASCII without spaces; percent-encode the rest")
    fields = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if not line:
            break
        if len(line) > MAX_HEADER_LINE_BYTES:
            raise HTTPError(431, f"a header line is longer than {MAX_HEADER_LINE_BYTES} bytes")
        if len(fields) == MAX_HEADER_FIELDS:
            raise HTTPError(431, f"the request has more than {MAX_HEADER_FIELDS} header fields")
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1–5.2: no white space before the colon, and obsolete line folding refused.
        if not colon or not _TOKEN.fullmatch(name.decode("latin-1")):
            raise HTTPError(400, f"the header line {line[:100].decode('latin-1')!r} is malformed")
        value = value.strip(b" \t")
        # RFC 9110 §5.5: CR, LF and NUL must be refused; other control characters are invalid too.
        if _CONTROL_IN_FIELD_VALUE.search(value):
            raise HTTPError(400, f"the header field {name.decode('latin-1')!r} contains control characters")
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
    headers = Headers(fields)
    content_length, is_chunked = _body_framing(headers, version)
    path, query = _split_target(target)
    connection_options = {option.strip().lower() for option in headers.get("Connection", "").split(",")}
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection_options
    else:
        keep_alive = "keep-alive" in connection_options
    return Request(method, target, path, query, version, headers, content_length, is_chunked, keep_alive)


def _body_framing(headers, version):
    # Returns (content length, is chunked); refuses framing that two parsers could read two ways.
    transfer_encodings = headers.get_all("Transfer-Encoding") or []
    content_lengths = headers.get_all("Content-Length") or []
    if transfer_encodings:
        # RFC 9112 §6.3: Transfer-Encoding with Content-Length is how requests are smuggled past a
        # proxy that reads the other one; refuse rather than pick one.
        if content_lengths:
            raise HTTPError(400, "a request must not carry both Transfer-Encoding and Content-Length")
        codings = [coding.strip(" \t").lower() for value in transfer_encodings for coding in value.split(",")]
        if codings != ["chunked"]:
            raise HTTPError(400, f"only Transfer-Encoding: chunked is supported, not {', '.join(codings)!r}")
        if version == "HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        return 0, True
    if not content_lengths:
        return 0, False
    values = {value.strip(" \t") for header in content_lengths for value in header.split(",")}
    # RFC 9110 §8.6: a list of identical values is one length; differing ones are an attack.
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise HTTPError(400, f"Content-Length must be one non-negative integer, not {', '.join(content_lengths)!r}")
    return int(values.pop()), False


def _split_target(target):
    # Returns (path, query); the absolute form (RFC 9112 §3.2.2) is accepted as a proxy sends it.
    if not target.startswith("/"):
        scheme, _, rest = target.partition("://")
        if scheme.lower() not in ("http", "https") or not rest:
            raise HTTPError(400, f"the request target {target[:100]!r} is not a path")
        target = "/" + rest.partition("/")[2]
    path, _, query = target.partition("?")
    return path, query


PREAMBLE = "preamble"
PART_HEADERS = "part headers"
PART_BODY = "part body"
EPILOGUE = "epilogue"
DONE = "done"

CHUNK_SIZE = "chunk size"
CHUNK_DATA = "chunk data"
CHUNK_END = "chunk end"
TRAILER = "trailer"

_PARAMETER = re.compile(r';\s*([^\s;=]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")
_BOUNDARY_LINE_START = re.compile(rb"[ \t]*\r?")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


@dataclasses.dataclass(frozen=True)
class PartStart:
    """A multipart part begins; `filename` is None when the part carries none."""

    name: str
    filename: str | None
    content_type: str


@dataclasses.dataclass(frozen=True)
class PartData:
    """The next bytes of the current part's body."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class PartEnd:
    """The current part's body is complete."""


def parse_header_parameters(value):
    """Split a header like Content-Type or Content-Disposition into its value and parameters.

    Returns (lower-cased value, {lower-cased name: value}); quoted values are unquoted, and the first
    of two parameters with one name wins.
    """
    main, _, rest = value.partition(";")
    parameters = {}
    for match in _PARAMETER.finditer(";" + rest):
        key, raw = match.group(1).lower(), match.group(2)
        if raw.startswith('"'):
            raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
        parameters.setdefault(key, raw)
    return main.strip().lower(), parameters


def _decode_extended_value(value):
    # RFC 8187: charset'language'percent-encoded, and UTF-8 or ISO-8859-1 are the only charsets a
    # recipient must know; RFC 7578 §4.2 discourages it, yet some clients send it.
    charset, _, rest = value.partition("'")
    _, _, encoded = rest.partition("'")
    encoding = "iso-8859-1" if charset.lower() == "iso-8859-1" else "utf-8"
    return urllib.parse.unquote(encoded, encoding=encoding, errors="replace")


def _decode_header_text(raw):
    # Browsers send file names as raw UTF-8 (RFC 7578 §4.2); anything else is read as Latin-1.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class MultipartParser:
    """A push parser for multipart/form-data bodies (RFC 7578, RFC 2046 §5.1).

    feed(data) returns a list of PartStart, PartData and PartEnd events; close() marks the end of
    the body. Between calls it holds at most one part's headers plus a tail shorter than the
    delimiter line, so memory does not grow with the body. Malformed or truncated input raises
    HTTPError(400).
    """

    def __init__(self, boundary):
        if not isinstance(boundary, str) or not _BOUNDARY.fullmatch(boundary):
            raise HTTPError(400, f"the multipart boundary {boundary!r} is not valid (RFC 2046 §5.1.1)")
        self.state = PREAMBLE
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        # The first delimiter may open the body with no CRLF before it; pretending there is one
        # makes every delimiter look alike.
        self._buffer = b"\r\n"

    def feed(self, data):
        """Parse the next bytes of the body; return the events they complete."""
        if self.state == DONE:
            raise HTTPError(400, "the multipart body continues after its end")
        buffer = self._buffer + data if self._buffer else bytes(data)
        events = []
        while True:
            if self.state in (PREAMBLE, PART_BODY):
                buffer = self._parse_until_delimiter(buffer, events)
                if self.state in (PREAMBLE, PART_BODY):
                    break
            elif self.state == PART_HEADERS:
                buffer = self._parse_part_headers(buffer, events)
                if self.state == PART_HEADERS:
                    break
            else:
                buffer = b""
                break
        self._buffer = buffer
        return events

    def close(self):
        """Mark the end of the body; raise HTTPError(400) unless the closing delimiter was seen."""
        if self.state not in (EPILOGUE, DONE):
            raise HTTPError(400, "the multipart body ended before its closing boundary")
        self.state = DONE

    def _parse_until_delimiter(self, buffer, events):
        index = buffer.find(self._delimiter)
        if index < 0:
            keep = self._start_of_possible_delimiter(buffer)
            if self.state == PART_BODY and keep:
                events.append(PartData(buffer[:keep]))
            return buffer[keep:]
        if self.state == PART_BODY and index:
            events.append(PartData(buffer[:index]))
        after = index + len(self._delimiter)
        if buffer.startswith(b"--", after):
            if self.state == PART_BODY:
                events.append(PartEnd())
            self.state = EPILOGUE
            return b""
        line_end = buffer.find(b"\r\n", after)
        if line_end < 0:
            # Not decided yet while what follows may still become "--" or white space and CRLF.
            rest = buffer[after:]
            if rest != b"-" and (len(rest) > MAX_PART_HEADER_BYTES or not _BOUNDARY_LINE_START.fullmatch(rest)):
                raise HTTPError(400, "a multipart boundary line is followed by unexpected bytes")
            return buffer[index:]
        if buffer[after:line_end].strip(b" \t"):
            raise HTTPError(400, "a multipart boundary line is followed by unexpected bytes")
        if self.state == PART_BODY:
            events.append(PartEnd())
        self.state = PART_HEADERS
        return buffer[line_end + 2:]

    def _start_of_possible_delimiter(self, buffer):
        # Every delimiter starts with CR; only the last len(delimiter) - 1 bytes can hold the start
        # of one that is not complete yet.
        index = buffer.find(b"\r", max(0, len(buffer) - len(self._delimiter) + 1))
        return len(buffer) if index < 0 else index

    def _parse_part_headers(self, buffer, events):
        if buffer.startswith(b"\r\n"):
            block, rest = b"", buffer[2:]
        else:
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > MAX_PART_HEADER_BYTES:
                if end > MAX_PART_HEADER_BYTES or len(buffer) > MAX_PART_HEADER_BYTES + 3:
                    raise HTTPError(400, f"the headers of a multipart part exceed {MAX_PART_HEADER_BYTES} bytes")
                return buffer
            block, rest = buffer[:end], buffer[end + 4:]
        events.append(self._part_start(block))
        self.state = PART_BODY
        return rest

    @staticmethod
    def _part_start(block):
        headers = {}
        for line in block.split(b"\r\n") if block else ():
            name, colon, value = line.partition(b":")
            # RFC 9112 §5.2: obsolete line folding is refused rather than guessed at.
            if not colon or not name.strip() or line[:1] in (b" ", b"\t") or name != name.strip():
                raise HTTPError(400, f"a multipart part has a malformed header line {line[:80]!r}")
            headers.setdefault(name.decode("latin-1").lower(), _decode_header_text(value).strip())
        disposition, parameters = parse_header_parameters(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in parameters:
            raise HTTPError(400, 'every multipart part needs "Content-Disposition: form-data; name=..."')
        filename = parameters.get("filename")
        if "filename*" in parameters:
            filename = _decode_extended_value(parameters["filename*"])
        content_type = headers.get("content-type", "text/plain")
        return PartStart(parameters["name"], filename, content_type)


class ChunkedDecoder:
    """A push decoder for the chunked transfer coding (RFC 9112 §7.1).

    feed(data) returns the decoded bytes that `data` completes; `done` turns true after the last
    chunk and its trailer section, and `unused` then holds the bytes that follow (the next request).
    Malformed input raises HTTPError(400).
    """

    def __init__(self):
        self.state = CHUNK_SIZE
        self.done = False
        self.unused = b""
        self._buffer = b""
        self._remaining = 0
        self._trailer_bytes = 0

    def feed(self, data):
        """Decode the next bytes; return the chunk data they hold."""
        if self.done:
            self.unused += data
            return b""
        buffer = self._buffer + data if self._buffer else bytes(data)
        position = 0
        pieces = []
        while position < len(buffer) and not self.done:
            if self.state == CHUNK_SIZE:
                position = self._parse_size_line(buffer, position)
                if position < 0:
                    position = -position - 1
                    break
            elif self.state == CHUNK_DATA:
                taken = min(self._remaining, len(buffer) - position)
                pieces.append(buffer[position:position + taken])
                position += taken
                self._remaining -= taken
                if not self._remaining:
                    self.state = CHUNK_END
            elif self.state == CHUNK_END:
                if len(buffer) - position < 2:
                    break
                if buffer[position:position + 2] != b"\r\n":
                    raise HTTPError(400, "a chunk of the chunked body is longer than its size line says")
                position += 2
                self.state = CHUNK_SIZE
            else:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    self._check_trailer_size(len(buffer) - position, is_complete=False)
                    break
                if line_end == position:
                    self.done = True
                    self.state = DONE
                    self.unused = buffer[position + 2:]
                    position = len(buffer)
                else:
                    self._check_trailer_size(line_end + 2 - position, is_complete=True)
                    position = line_end + 2
        self._buffer = buffer[position:]
        return b"".join(pieces)

    def close(self):
        """Mark the end of input; raise HTTPError(400) unless the last chunk was seen."""
        if not self.done:
            raise HTTPError(400, "the chunked body ended before its last chunk")

    def _parse_size_line(self, buffer, position):
        # Returns the position after the line, or -(position + 1) when the line is incomplete.
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            if len(buffer) - position > MAX_CHUNK_LINE_BYTES + 1:
                raise HTTPError(400, "a chunk-size line of the chunked body is too long")
            return -(position + 1)
        if line_end - position > MAX_CHUNK_LINE_BYTES:
            raise HTTPError(400, "a chunk-size line of the chunked body is too long")
        # RFC 9112 §7.1.1: chunk extensions are ignored.
        size_text = buffer[position:line_end].split(b";", 1)[0].strip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise HTTPError(400, f"{size_text[:40]!r} is not a valid chunk size")
        size = int(size_text, 16)
        if size:
            self._remaining = size
            self.state = CHUNK_DATA
        else:
            self.state = TRAILER
        return line_end + 2

    def _check_trailer_size(self, line_bytes, is_complete):
        if is_complete:
            self._trailer_bytes += line_bytes
            line_bytes = 0
        if self._trailer_bytes + line_bytes > MAX_TRAILER_BYTES:
            raise HTTPError(400, f"the trailer of the chunked body exceeds {MAX_TRAILER_BYTES} bytes")


FITS = ("fill", "contain", "cover")
# The most a string of digits may say (18 digits); a JSON number is held to it too, as a far
# larger one no longer fits the float that fit=contain scales by.
MAX_DIMENSION = 10**18 - 1


def _dimension(parameters, key):
    value = parameters.get(key)
    if value is None:
        raise HTTPError(400, f"{key} is required: a positive integer number of pixels")
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        raise HTTPError(400, f"{key} must be at most {MAX_DIMENSION} pixels")
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"{key} must be a positive integer, not {repr(value)[:100]}")
    if value < 1:
        raise HTTPError(400, f"{key} must be at least 1, not {repr(value)[:100]}")
    if value > MAX_DIMENSION:
        raise HTTPError(400, f"{key} must be at most {MAX_DIMENSION} pixels")
    return value


def parse_resize_params(query, body, content_type, max_pixels):
    """Return (width, height, fit) from a query string and a JSON or form-urlencoded body.

    Body parameters override query parameters. Raises HTTPError(400) naming the parameter that is
    missing or invalid, or when the result, exactly width × height for fill and cover, exceeds
    `max_pixels` (contain's result depends on the image: the caller checks it).
    """
    parameters = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    media_type, _ = parse_header_parameters(content_type)
    if body.strip():
        # curl -d sends JSON labelled as a form; a body that opens with "{" is JSON whatever its label.
        if media_type == "application/json" or media_type.endswith("+json") or body.lstrip()[:1] == b"{":
            try:
                values = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise HTTPError(400, "the body is not valid JSON") from None
            if not isinstance(values, dict):
                raise HTTPError(400, 'the JSON body must be an object like {"width": 300, "height": 200}')
        else:
            try:
                values = dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True))
            except (ValueError, UnicodeDecodeError):
                raise HTTPError(400, "the body is not valid form data (width=300&height=200)") from None
        parameters.update(values)
    width = _dimension(parameters, "width")
    height = _dimension(parameters, "height")
    fit = parameters.get("fit")
    if fit is None:
        fit = "fill"
    if fit not in FITS:
        raise HTTPError(400, f"fit must be one of fill, contain, cover, not {fit!r}")
    if fit != "contain":
        check_result_pixels(width, height, max_pixels)
    return width, height, fit


def check_result_pixels(width, height, max_pixels):
    """Raise HTTPError(400) when a result of width × height pixels would exceed `max_pixels`."""
    if width * height > max_pixels:
        raise HTTPError(400, f"{width}x{height} is more than the {max_pixels} pixels an image may have")


@dataclasses.dataclass(frozen=True)
class Rendition:
    """What a GET's query asks of a stored image: a size, a fit, an output format and a quality.

    A side left out (None) follows the aspect ratio, and fit matters only when both are given; a
    format left out is the original's, and a quality left out is the format's default (for a
    JPEG kept a JPEG, the original's own quantisation).
    """

    width: int | None = None
    height: int | None = None
    fit: str = "fill"
    format: str | None = None
    quality: int | None = None

    def entry(self, version, source_format):
        """Return this rendition's name for `version` of an image in `source_format`: its cache entry, and its ETag unquoted.

        Parameters that give the same picture give the same name: ?format=jpeg of a JPEG is the
        same as no format, ?quality= of a lossless format is ignored, and so is fit with one side.
        """
        output_format = self.format or source_format
        quality = self.quality if output_format in LOSSY_FORMATS else None
        fit = self.fit if self.width and self.height else "auto"
        size = f"{self.width or 0}x{self.height or 0}"
        return f"{version.tag}-{size}-{fit}-q{quality or 0}-{RENDERER}{EXTENSION_BY_FORMAT[output_format]}"


def parse_rendition_sizes(text):
    """Return the allow-list of rendition sizes "200x200,1200x0" as ((200, 200), (1200, 0)); None for "any".

    0 leaves a side to the aspect ratio; 0x0 allows renditions at the original's size. Raises
    ValueError for anything else.
    """
    if text.strip().lower() in ("", "any"):
        return None
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*([0-9]{1,9})x([0-9]{1,9})\s*", item)
        if match is None:
            raise ValueError(f"invalid rendition_sizes: {item.strip()!r} is not WIDTHxHEIGHT (like 200x200 or 1200x0)")
        sizes.append((int(match.group(1)), int(match.group(2))))
    return tuple(sizes)


def is_facts_query(query):
    """Tell whether a GET's query string asks for the image's facts (?facts); HTTPError(400) when it asks for more."""
    if "facts" not in query:
        return False
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the query string is not valid UTF-8") from None
    if all(key != "facts" for key, _ in pairs):
        return False
    for key, _ in pairs:
        if key != "facts" and key not in IGNORED_PARAMETERS and not key.startswith(IGNORED_PARAMETER_PREFIX):
            raise HTTPError(400, f"?facts takes no other parameter, not {key[:100]!r}")
    return True


# A page asks for the same few renditions again and again: their parsing is kept.
@functools.lru_cache(maxsize=1024)
def parse_rendition_query(query, max_pixels, allowed_sizes=None):
    """Return the Rendition a GET's query string asks for, or None when it asks for the original.

    Cache-busting and tracking parameters (IGNORED_PARAMETERS) are ignored. Raises HTTPError(400) naming
    an unknown, repeated or invalid parameter, an AVIF this Pillow cannot write, a result of more
    than `max_pixels` (known here for fill and cover; the caller checks the others against the
    image), or a size outside `allowed_sizes`.
    """
    if not query:
        return None
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the query string is not valid UTF-8") from None
    parameters = {}
    for key, value in pairs:
        if key in IGNORED_PARAMETERS or key.startswith(IGNORED_PARAMETER_PREFIX):
            continue
        if key not in RENDITION_PARAMETERS:
            known = ", ".join(RENDITION_PARAMETERS)
            raise HTTPError(400, f"unknown parameter {key[:100]!r}: a rendition takes {known} (cache-busting and tracking parameters such as v and utm_source are ignored)")
        if key in parameters:
            raise HTTPError(400, f"{key} is given twice")
        parameters[key] = value
    if not parameters:
        return None
    width = _dimension(parameters, "width") if "width" in parameters else None
    height = _dimension(parameters, "height") if "height" in parameters else None
    fit = parameters.get("fit", "fill")
    if fit not in FITS:
        raise HTTPError(400, f"fit must be one of fill, contain, cover, not {fit[:100]!r}")
    image_format = None
    if "format" in parameters:
        image_format = RENDITION_FORMATS.get(parameters["format"].lower())
        if image_format is None:
            raise HTTPError(400, f"format must be one of jpeg, png, webp, gif, avif, not {parameters['format'][:100]!r}")
        if image_format == "AVIF" and not AVIF_IS_WRITABLE:
            raise HTTPError(400, "format avif is not available: this server's Pillow cannot write AVIF; ask for webp")
    quality = None
    if "quality" in parameters:
        text = parameters["quality"]
        quality = int(text) if _DIGITS.fullmatch(text) else 0
        if not 1 <= quality <= 100:
            raise HTTPError(400, f"quality must be a whole number from 1 to 100, not {text[:100]!r}")
    if width is not None and height is not None and fit != "contain":
        check_result_pixels(width, height, max_pixels)
    if allowed_sizes is not None and (width or 0, height or 0) not in allowed_sizes:
        sizes = ", ".join(f"{w}x{h}" for w, h in allowed_sizes)
        raise HTTPError(400, f"this server renders only the sizes {sizes} (width x height, 0 for a side that follows the aspect ratio), not {width or 0}x{height or 0}")
    return Rendition(width, height, fit, image_format, quality)


def parse_range(header, size):
    """Return the (start, end) byte range, end inclusive, that a Range header asks of `size` bytes.

    Returns None when the whole file should be sent: no header, a unit other than bytes, a
    malformed value, or several ranges (RFC 9110 §14.2 lets a server ignore Range). Raises
    HTTPError(416) when the single range asked for is unsatisfiable.
    """
    if not header:
        return None
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return None
    first, dash, last = ranges.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last) or not all(_DIGITS.fullmatch(text) for text in (first, last) if text):
        return None
    if not first:
        length = int(last)
        if length == 0 or size == 0:
            raise HTTPError(416, f"the range {header!r} selects nothing of {size} bytes", {"Content-Range": f"bytes */{size}"})
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise HTTPError(416, f"the range {header!r} starts beyond the {size} bytes of the image", {"Content-Range": f"bytes */{size}"})
    return start, min(end, size - 1)


def parse_http_date(text):
    """Return the POSIX time of an HTTP date (RFC 9110 §5.6.7), or None when it is not one."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _entity_tags(header):
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def is_etag_match(header, etag, weak):
    """Tell whether an If-Match / If-None-Match header lists `etag` (or "*").

    Weak comparison (If-None-Match) ignores a W/ prefix; strong comparison (If-Match) never
    matches a weak tag (RFC 9110 §8.8.3.2).
    """
    for tag in _entity_tags(header):
        if tag == "*":
            return True
        if weak and tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def is_not_modified(headers, etag, mtime):
    """Tell whether a GET may be answered 304 (RFC 9110 §13.1.2–3; If-None-Match wins)."""
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        return is_etag_match(if_none_match, etag, weak=True)
    since = parse_http_date(headers.get("If-Modified-Since", ""))
    # RFC 7232 §3.3: a date in the future is not a valid validator.
    return since is not None and int(mtime) <= since <= time.time()


# Headers of integrity, identity and origin: Content-Digest and Repr-Digest (RFC 9530), Content-MD5
# (RFC 1864), X-Request-Id, and the origins CORS allows.

# The hash algorithms of RFC 9530's registry that IMS checks and answers, with hashlib's names;
# the others (md5, sha, the unixsum family) are ignored, as RFC 9530 §5 allows.
DIGEST_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}
# RFC 8941 §3.3: the bare items a Structured Field dictionary may hold. Inner lists are refused.
_SF_ITEM = (
    r':[A-Za-z0-9+/=]*:'
    r'|-?[0-9]{1,15}(?:\.[0-9]{1,3})?'
    r'|"(?:[^"\\\x00-\x1f\x7f-\uffff]|\\["\\])*"'
    r"|[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*"
    r'|\?[01]'
)
_SF_KEY = r"[a-z*][a-z0-9_.*-]*"
_SF_MEMBER = re.compile(rf"({_SF_KEY})(?:=({_SF_ITEM}))?((?:;[ ]*{_SF_KEY}(?:=(?:{_SF_ITEM}))?)*)")
_SF_SPACE = re.compile(r"[ \t]*")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# X-Request-Id values taken from clients: 1 to 128 visible ASCII characters, which log lines and
# headers carry as they are.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#,]+/?")


def parse_dictionary(value):
    """Return the (key, item text) members of a Structured Field dictionary (RFC 8941 §3.2), parameters dropped.

    A key alone has the item "?1". Raises ValueError for a value that is not such a dictionary.
    """
    members = []
    position = _SF_SPACE.match(value).end()
    while position < len(value):
        member = _SF_MEMBER.match(value, position)
        if member is None:
            raise ValueError(f"not a dictionary member at {value[position:position + 20]!r}")
        item = member.group(2) or "?1"
        if item.startswith(":") and _byte_sequence(item) is None:
            raise ValueError(f"{item[:20]!r} is not a byte sequence of base64")
        members.append((member.group(1), item))
        position = _SF_SPACE.match(value, member.end()).end()
        if position == len(value):
            break
        if value[position] != ",":
            raise ValueError(f"members must be separated by commas, not {value[position]!r}")
        position = _SF_SPACE.match(value, position + 1).end()
        if position == len(value):
            raise ValueError("a comma with no member after it")
    return members


def _byte_sequence(item):
    # The bytes of an RFC 8941 byte sequence item (":<base64>:"), or None for any other item.
    if len(item) < 2 or item[0] != ":" or item[-1] != ":" or not _BASE64.fullmatch(item[1:-1]):
        return None
    try:
        return base64.b64decode(item[1:-1], validate=True)
    except ValueError:
        return None


def _joined(values):
    # Repeated fields of a list or dictionary are one field, joined by commas (RFC 9110 §5.3).
    return ", ".join(values) if values else None


class BodyDigests:
    """The digests a request's Content-Digest and Content-MD5 promise for its body, checked as it streams.

    Raises HTTPError(400) for a header that cannot be read, and from check() for a body that does
    not match. With neither header, it checks nothing and costs nothing.
    """

    def __init__(self, headers):
        self._expected = []
        content_digest = _joined(headers.get_all("Content-Digest"))
        if content_digest is not None:
            try:
                members = parse_dictionary(content_digest)
            except ValueError as error:
                raise HTTPError(400, f"Content-Digest is not a dictionary like sha-256=:<base64>: ({error})") from None
            # A key given twice means its last value (RFC 8941 §4.2.2).
            promised = {key: item for key, item in members if key in DIGEST_ALGORITHMS}
            for key, item in promised.items():
                digest = _byte_sequence(item)
                hasher = hashlib.new(DIGEST_ALGORITHMS[key])
                if digest is None or len(digest) != hasher.digest_size:
                    raise HTTPError(400, f"the {key} of Content-Digest is not :<base64 of {hasher.digest_size} bytes>:")
                self._expected.append((f"Content-Digest {key}", hasher, digest))
        content_md5 = headers.get("Content-MD5")
        if content_md5 is not None:
            text = content_md5.strip()
            digest = base64.b64decode(text) if len(text) == 24 and _BASE64.fullmatch(text) else None
            if digest is None or len(digest) != 16:
                raise HTTPError(400, "Content-MD5 is not the base64 of 16 bytes (RFC 1864)")
            self._expected.append(("Content-MD5", hashlib.md5(), digest))

    def update(self, data):
        """Hash the next piece of the body."""
        for _, hasher, _ in self._expected:
            hasher.update(data)

    def check(self):
        """Raise HTTPError(400) unless the whole body hashed matches every digest promised."""
        for label, hasher, digest in self._expected:
            if hasher.digest() != digest:
                raise HTTPError(400, f"the body does not match its {label}: it was changed or cut on the way; nothing was stored")

    def __bool__(self):
        return bool(self._expected)


def wanted_digest(headers):
    """Return the algorithm of DIGEST_ALGORITHMS that a Want-Repr-Digest prefers most, or None.

    Preferences run from 1 to 10 (RFC 9530 §4); 0 means "not that one". An unreadable field asks
    for nothing.
    """
    value = _joined(headers.get_all("Want-Repr-Digest"))
    if value is None:
        return None
    try:
        members = parse_dictionary(value)
    except ValueError:
        return None
    preferences = {key: int(item) for key, item in members if key in DIGEST_ALGORITHMS and item.isdigit() and len(item) <= 2}
    best = max(DIGEST_ALGORITHMS, key=lambda key: (preferences.get(key, 0), key))
    return best if 0 < preferences.get(best, 0) <= 10 else None


def repr_digest(algorithm, digest):
    """Return the Repr-Digest field value for one digest."""
    return f"{algorithm}=:{base64.b64encode(digest).decode('ascii')}:"


def client_request_id(headers):
    """Return the client's X-Request-Id when it is 1 to 128 visible ASCII characters, else None."""
    given = headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return None


def parse_origins(value):
    """Return the origins a --cors-origin setting allows, as a tuple; ("*",) for any. ValueError for what is no origin.

    `value` is a string of origins separated by commas or spaces, or a sequence of such strings.
    """
    origins = []
    for text in [value] if isinstance(value, str) else value:
        for origin in re.split(r"[\s,]+", text.strip()):
            if origin == "*":
                return ("*",)
            if origin and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"invalid cors_origin: {origin!r} is not an origin like https://app.example:8080, or *")
            if origin:
                origins.append(origin.rstrip("/").lower())
    return tuple(dict.fromkeys(origins))


# ====
# Image work
# ====
# Owns what is done to pixels: checking uploads, resizing and rendering. Top-level functions that
# take paths and plain values, so they can run in a child process; never touch the store or a socket.

# EXIF Orientation → the transpose that makes the picture upright.
TRANSPOSE_BY_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION = 0x0112
# TIFF tags that describe how the pixels are laid out, rewritten by the writer (TIFF 6.0 §8, §15).
TIFF_LAYOUT_TAGS = {254, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 338, 339, 530, 532, 34675}
# Draft and reduce to this many times the target size first, then filter: thumbnail()'s default,
# indistinguishable from filtering the full image at a fraction of the cost.
REDUCING_GAP = 2.0


def allow_pixels(max_pixels):
    """Raise Pillow's own decompression-bomb limit (process-wide) to `max_pixels` if it is lower.

    Pillow warns above its limit and refuses twice it; IMS applies --max-pixels itself, so a
    larger setting must not be cut short by Pillow's default of about 89 million.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


# Pillow loads its other plugins on the first open; loaded now, a forked resize process never
# imports anything (an import lock copied mid-use by the fork would hang it).
Image.preinit()


def check_image(path, extension, max_pixels):
    """Check that the file at `path` is an image that may be stored under `extension`.

    Only the allowed formats' decoders are offered the bytes. The header is read and the file's
    structure verified (PNG checksums, for one) without decoding the pixels, so a decompression
    bomb costs nothing. Raises HTTPError(415) for an unreadable image, another format or a format
    that does not match the extension, HTTPError(413) for more than `max_pixels` pixels.
    """
    expected_format = FORMAT_BY_EXTENSION[extension]
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            image_format = FORMAT_ALIASES.get(image.format, image.format)
            if image_format != expected_format:
                raise HTTPError(415, f"the file is a {image_format} image, but its name ends in {extension!r}")
            width, height = image.size
            if width * height > max_pixels:
                raise HTTPError(413, f"the image has {width}x{height} pixels, more than the {max_pixels} allowed")
            image.verify()
    except Image.DecompressionBombError:
        raise HTTPError(413, f"the image has more than the {max_pixels} pixels allowed") from None
    except HTTPError:
        raise
    except Exception:
        allowed = ", ".join(ALLOWED_FORMATS)
        raise HTTPError(415, f"the file is not a readable image of an allowed format ({allowed})") from None


def fitted_size(size, width, height, fit):
    """Return the size an image of `size` takes before any crop, for a width × height box and fit."""
    source_width, source_height = size
    if fit == "fill":
        return width, height
    scale_x, scale_y = width / source_width, height / source_height
    scale = min(scale_x, scale_y) if fit == "contain" else max(scale_x, scale_y)
    return max(1, round(source_width * scale)), max(1, round(source_height * scale))


def header_orientation(image):
    """Return the EXIF orientation of an opened image (None when it has none) without decoding pixels."""
    if image.format == "PNG":
        # PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after the
        # pixels; one before them is already in info.
        raw = image.info.get("exif")
        if not raw:
            return None
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(EXIF_ORIENTATION)
    return image.getexif().get(EXIF_ORIENTATION)


def upright_size(file):
    """Return the (width, height) the image in `file` shows upright, from its header alone.

    EXIF orientations 5 to 8 turn the picture a quarter: its stored width is then its height.
    Returns None for a file that is not a readable image of an allowed format.
    """
    try:
        with Image.open(file, formats=ALLOWED_FORMATS) as image:
            return _upright_size(image)
    except Exception:
        return None


def image_facts(file):
    """Return what the header of the image in `file` tells, as the fields of GET /<name>?facts.

    No pixel is decoded: counting a GIF's frames skips their data. Returns None for a file that
    is not a readable image of an allowed format.
    """
    try:
        with Image.open(file, formats=ALLOWED_FORMATS) as image:
            image_format = FORMAT_ALIASES.get(image.format, image.format)
            upright_width, upright_height = _upright_size(image)
            width, height = image.size
            if image.format == "TIFF":
                # Newer Pillows report a turned TIFF's size upright; its tags say how it is stored.
                width, height = image.tag_v2.get(256, width), image.tag_v2.get(257, height)
            orientation = header_orientation(image)
            frames = getattr(image, "n_frames", 1)
            return {
                "format": image_format,
                "content_type": CONTENT_TYPE_BY_FORMAT[image_format],
                "width": width,
                "height": height,
                "upright_width": upright_width,
                "upright_height": upright_height,
                "orientation": orientation if type(orientation) is int and 1 <= orientation <= 8 else None,
                "frames": frames,
                "animated": frames > 1 and image_format != "TIFF",
                "icc_profile": bool(image.info.get("icc_profile")),
                "mode": image.mode,
            }
    except Exception:
        return None


def _upright_size(image):
    width, height = image.size
    is_turned = header_orientation(image) in (5, 6, 7, 8)
    if image.format == "TIFF":
        # Pillow turns a TIFF upright itself; newer versions report the upright size already.
        is_turned = is_turned and (width, height) == (image.tag_v2.get(256), image.tag_v2.get(257))
    return (height, width) if is_turned else (width, height)


# The widest and highest image each output format can hold.
MAX_SIDE_BY_FORMAT = {"JPEG": 65500, "WEBP": 16383, "GIF": 65535, "AVIF": 65535, "PNG": 2**31 - 1, "BMP": 2**31 - 1, "TIFF": 2**32 - 1}


def rendition_box(size, width, height, fit):
    """Return the (width, height, fit) that a rendition of an image of upright `size` is resized to.

    A side left out (None) follows the aspect ratio; with neither, the image keeps its size.
    """
    source_width, source_height = size
    if width is None and height is None:
        return source_width, source_height, "fill"
    if width is None:
        return max(1, round(source_width * height / source_height)), height, "fill"
    if height is None:
        return width, max(1, round(source_height * width / source_width)), "fill"
    return width, height, fit


def resize_frame(frame, width, height, fit):
    """Return `frame` resized for the box and fit; `cover` crops the overflow around the centre."""
    if fit != "cover":
        return frame.resize(fitted_size(frame.size, width, height, fit), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    source_width, source_height = frame.size
    scale = max(width / source_width, height / source_height)
    crop_width, crop_height = width / scale, height / scale
    # Rounding can put a centred edge a hair outside the image, which Pillow refuses.
    left, top = max(0.0, (source_width - crop_width) / 2), max(0.0, (source_height - crop_height) / 2)
    box = (left, top, min(source_width, left + crop_width), min(source_height, top + crop_height))
    return frame.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def _resizable(frame, has_transparency):
    # Palette and bilevel images only resize with NEAREST; 16-bit grey resizes as 32-bit.
    if frame.mode in ("P", "PA"):
        return frame.convert("RGBA" if has_transparency or frame.mode == "PA" else "RGB")
    if frame.mode == "1":
        return frame.convert("L")
    if frame.mode.startswith("I;16"):
        return frame.convert("I")
    return frame


def upright_frames(image, width, height, fit, all_frames=True):
    """Return every frame of `image` (the first only unless `all_frames`) made upright by its EXIF orientation, resized, and their durations.

    Of an MPO only the main picture is kept: the result is a plain JPEG.
    """
    is_jpeg = FORMAT_ALIASES.get(image.format, image.format) == "JPEG"
    n_frames = 1 if is_jpeg or not all_frames else getattr(image, "n_frames", 1)
    if is_jpeg:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for a fraction of the cost, never below the size
        # needed (in the stored orientation); its DCT scaling is itself a good low-pass filter.
        stored_box = (height, width) if header_orientation(image) in (5, 6, 7, 8) else (width, height)
        image.draft(None, stored_box if fit == "fill" else fitted_size(image.size, *stored_box, fit))
    image.load()
    # Read once loaded: Pillow turns a TIFF upright itself as it loads it, and drops its Orientation.
    transpose = TRANSPOSE_BY_ORIENTATION.get(image.getexif().get(EXIF_ORIENTATION, 1))
    has_transparency = "transparency" in image.info
    frames, durations = [], []
    for index in range(n_frames):
        image.seek(index)
        frame = _resizable(image, has_transparency)
        if transpose is not None:
            frame = frame.transpose(transpose)
        frames.append(resize_frame(frame, width, height, fit))
        # In milliseconds; an APNG's are fractions, which some writers (AVIF) refuse.
        durations.append(round(image.info.get("duration") or 0))
    return frames, durations


def _flattened(frame):
    # JPEG has no alpha: transparent pixels show white, as on a page.
    if "A" not in frame.mode:
        return frame
    frame = frame.convert("RGBA")
    background = Image.new("RGB", frame.size, "white")
    background.paste(frame, mask=frame.getchannel("A"))
    return background


# The modes each output format of a rendition stores as they are.
ENCODABLE_MODES = {
    "JPEG": ("L", "RGB", "CMYK"),
    "PNG": ("1", "L", "LA", "RGB", "RGBA", "I;16"),
    "WEBP": ("RGB", "RGBA"),
    "AVIF": ("RGB", "RGBA"),
    "GIF": ("1", "L", "RGB", "RGBA"),
}


def _encodable(frame, image_format, source_mode):
    # A frame of an image in `source_mode`, in a mode that `image_format` stores, where that is
    # not the image's own format.
    modes = ENCODABLE_MODES[image_format]
    if frame.mode == "F":
        frame = frame.convert("I")
    if frame.mode == "I":
        # Grey of 16 bits (resized as 32) or more: PNG keeps 16, the others have 8, to which
        # 16-bit values are scaled, and wider ones clipped, as Pillow converts them.
        if "I;16" in modes:
            return frame.convert("I;16")
        if source_mode.startswith("I;16"):
            frame = frame.point(lambda value: value * (1 / 257))
        frame = frame.convert("L")
    if frame.mode in modes:
        return frame
    if image_format == "JPEG":
        return _flattened(frame).convert("RGB")
    return frame.convert("RGBA" if "A" in frame.mode else "RGB")


def save_like(original, frames, durations, path, image_format=None, quality=None, keep_exif=True):
    """Save `frames` to `path` in the format of `original`, or `image_format`, keeping its profile, EXIF and animation.

    The ICC profile is kept, EXIF is kept without its Orientation (the pixels are upright now)
    unless not `keep_exif`, JPEG kept a JPEG keeps the original's quantisation tables and
    subsampling so quality does not drop, unless a `quality` is given, and animations keep every
    frame, their durations and the loop count where the format has them. In another format, alpha
    is flattened on white for JPEG, and a CMYK image loses its profile as it becomes RGB.
    """
    source_format = FORMAT_ALIASES.get(original.format, original.format)
    image_format = image_format or source_format
    options = {}
    if image_format != source_format:
        frames = [_encodable(frame, image_format, original.mode) for frame in frames]
    icc_profile = original.info.get("icc_profile")
    if icc_profile and image_format != "GIF" and not (original.mode == "CMYK" and frames[0].mode != "CMYK"):
        options["icc_profile"] = icc_profile
    exif = original.getexif()
    # A TIFF's first directory is also its layout (size, strips, samples): only its other tags move.
    dropped = {EXIF_ORIENTATION} | (TIFF_LAYOUT_TAGS if image_format == "TIFF" else set())
    for tag in dropped & set(exif):
        del exif[tag]
    if not keep_exif:
        # Nothing of the original's metadata, not even what Pillow would carry over by itself.
        options.update(exif=b"", xmp=b"")
    elif len(exif) and image_format in ("JPEG", "PNG", "WEBP", "TIFF"):
        options["exif"] = exif.tobytes()
    if quality is not None and image_format in LOSSY_FORMATS:
        options["quality"] = quality
    first = frames[0]
    if image_format == "JPEG":
        if first.mode not in ("L", "RGB", "CMYK"):
            first = first.convert("RGB")
        if quality is None and source_format == "JPEG":
            options["qtables"] = original.quantization
            subsampling = JpegImagePlugin.get_sampling(original)
            if subsampling != -1:
                options["subsampling"] = subsampling
    elif image_format == source_format == "PNG" and original.mode in ("P", "PA"):
        first = first.quantize(256, method=Image.Quantize.FASTOCTREE)
    elif original.mode.startswith("I;16") and first.mode == "I":
        first = first.convert("I;16")
    elif image_format == "BMP" and first.mode not in ("1", "L", "P", "RGB", "RGBA"):
        first = first.convert("RGB")
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:], duration=durations)
        if "loop" in original.info:
            options["loop"] = original.info["loop"]
        if image_format == "WEBP" and "A" in first.mode:
            # libwebp's animation encoder can crop the transparent parts off its sub-frames and
            # then mark the file as without alpha; whole key frames keep it.
            options["kmax"] = 1
    elif image_format == "GIF" and "duration" in original.info:
        options["duration"] = durations[0]
    if image_format == source_format == "WEBP" and original.info.get("lossless") and quality is None:
        options["lossless"] = True
    # Opened here: Pillow resolves a path's links first, which would lose a /proc/self/fd/N.
    with open(path, "w+b") as file:
        first.save(file, format=image_format, **options)


def resize_file(source_path, target_path, width, height, fit):
    """Write to `target_path` the image at `source_path` made upright and resized, in its format.

    Runs in a child process; never follows a symbolic link; raises whatever Pillow raises for an
    image it cannot handle.
    """
    with open(os.open(source_path, os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW), "rb") as file, Image.open(
        file, formats=ALLOWED_FORMATS
    ) as original:
        frames, durations = upright_frames(original, width, height, fit)
        original.seek(0)
        save_like(original, frames, durations, target_path)


class SourceChanged(Exception):
    """The image to render was replaced or removed after its version was read."""


def render_file(source_path, target_path, rendition, version):
    """Write to `target_path` the `rendition` of the image at `source_path`, which must still be `version`.

    Upright, sized, in the asked format and quality, with its ICC profile and, where the format has
    them, its alpha and frames; without EXIF. Runs in a child process; raises SourceChanged when
    the file is another version or gone, and whatever Pillow raises for an image it cannot handle.
    """
    try:
        descriptor = os.open(source_path, os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW)
    except FileNotFoundError:
        raise SourceChanged("the image was deleted while it was being rendered") from None
    with open(descriptor, "rb") as file:
        if Version.of(os.fstat(descriptor)) != version:
            raise SourceChanged("the image was replaced while it was being rendered")
        with Image.open(file, formats=ALLOWED_FORMATS) as original:
            source_format = FORMAT_ALIASES.get(original.format, original.format)
            image_format = rendition.format or source_format
            width, height, fit = rendition_box(_upright_size(original), rendition.width, rendition.height, rendition.fit)
            # A TIFF's pages are no animation: another format takes the first.
            all_frames = image_format in MULTI_FRAME_FORMATS and (source_format != "TIFF" or image_format == "TIFF")
            frames, durations = upright_frames(original, width, height, fit, all_frames)
            original.seek(0)
            save_like(original, frames, durations, target_path, image_format, rendition.quality, keep_exif=False)


# nice(1)'s default increment.
RESIZE_NICENESS = 10


def limit_cpu_seconds(seconds):
    """Have the kernel kill this process after `seconds` of CPU time, even if its parent is gone."""
    if resource is None:
        return
    soft = math.ceil(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))


def detach_from_server(*kept_descriptors):
    """In a child forked from the server, let go of every descriptor but stdio and `kept_descriptors`.

    A fork copies the server's listening socket, its clients' connections and other jobs' pipes:
    held on, they would keep a killed server's port busy and other jobs' pipes open. Each is made a
    copy of /dev/null rather than closed, so its number stays taken and the Python object that still
    owns it can never close a file this child opens later.
    """
    # The server's handlers would stop the server, not this child. A stop signal sent to the whole
    # process group (Ctrl-C, systemd) is the server's to act on: it kills its children, and a job
    # it puts back runs again, rather than failing because its child died first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            descriptors = [int(name) for name in os.listdir(listing)]
            break
        except OSError:
            continue
    else:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for descriptor in descriptors:
            if descriptor > 2 and descriptor != null and descriptor not in kept_descriptors:
                try:
                    os.dup2(null, descriptor)
                except OSError:
                    pass
    finally:
        os.close(null)


# What a resize process answers, with the reason, when it did not write its result.
FAILED_ANSWER = "failed"
NO_SPACE_ANSWER = "no space"
CHANGED_ANSWER = "changed"


def run_resize(connection, work, arguments, timeout_seconds, max_pixels, kept_descriptor=None):
    """Child process entry point: work(*arguments), then send None, or (kind, reason) when it failed, through `connection`.

    `arguments` open with the source and target paths; `kept_descriptor` is one the target path
    may name (/proc/self/fd/N), which the child keeps open. The parent kills a child past
    `timeout_seconds`; the CPU limit also stops one whose parent was killed first, so no orphan
    runs on, and an orphan's result is removed. The reason names no server path. The child always
    leaves with os._exit(): flushing stdio on the way out could wait forever on a lock that
    another server thread held at the moment of the fork.
    """
    source_path, target_path = arguments[:2]
    try:
        detach_from_server(connection.fileno(), kept_descriptor)
        try:
            # Resizing and rendering yield to serving: on a busy host, answering requests comes first.
            os.nice(RESIZE_NICENESS)
            limit_cpu_seconds(timeout_seconds)
            allow_pixels(max_pixels)
            work(*arguments)
            answer = None
        except SourceChanged as error:
            answer = (CHANGED_ANSWER, str(error))
        except Image.UnidentifiedImageError:
            answer = (FAILED_ANSWER, "it is not a readable image of an allowed format")
        except Exception as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            reason = reason.replace(source_path, os.path.basename(source_path)).replace(target_path, "the result")
            is_full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            answer = (NO_SPACE_ANSWER if is_full else FAILED_ANSWER, reason)
        try:
            connection.send(answer)
        except OSError:
            # The server is gone; nobody will put the result in place.
            os.unlink(target_path)
    finally:
        os._exit(0)


# ====
# Jobs
# ====
# Owns resize jobs: running the folder's queue, each job in a child process within its time limit,
# bounded per host, in order per image, and waiting for an end; and renders of renditions, in the
# same processes under the same bound, ahead of the queue, one per rendition. Never parses HTTP;
# reads and changes files, records, the queue and the rendition cache only through the Store.


def _iso_time(timestamp):
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass
class Job:
    """One resize: what was asked, where it stands, and when it was submitted and finished."""

    id: str
    image: str
    width: int
    height: int
    fit: str
    state: str = QUEUED
    error: str | None = None
    submitted: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None
    # With If-Match: the version the resize must start from.
    expected_version: Version | None = dataclasses.field(default=None, repr=False)
    # The inode of the result, recorded just before it replaces the image: a run that died after
    # the replace is then known to be done.
    result_inode: int | None = dataclasses.field(default=None, repr=False)

    def to_json(self):
        """Return the job as the contract's JSON object."""
        return {
            "id": self.id,
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "fit": self.fit,
            "state": self.state,
            "error": self.error,
            "submitted": _iso_time(self.submitted),
            "finished": _iso_time(self.finished),
        }

    def to_record(self):
        """Return the job as the record the Store keeps."""
        record = dataclasses.asdict(self)
        if self.expected_version is not None:
            record["expected_version"] = dataclasses.astuple(self.expected_version)
        return record

    @classmethod
    def from_record(cls, record):
        """Return the Job a record describes; ValueError for a record that is not one (damaged, or made by hand)."""
        try:
            job = cls(**record)
        except TypeError:
            raise ValueError("not a job record") from None
        if not (
            isinstance(job.id, str) and _JOB_ID.fullmatch(job.id)
            and isinstance(job.image, str) and is_image_name(job.image)
            and all(_is_integer(value, 1, MAX_DIMENSION) for value in (job.width, job.height))
            and job.fit in FITS
            and job.state in (QUEUED, RUNNING, *ENDED_STATES)
            and (job.error is None or isinstance(job.error, str))
            and _is_timestamp(job.submitted)
            and (job.finished is None or _is_timestamp(job.finished))
            and (job.result_inode is None or _is_integer(job.result_inode, 0, 2**64))
            and (job.expected_version is None or isinstance(job.expected_version, list)
                 and len(job.expected_version) == 3 and all(_is_integer(value, 0, 2**64) for value in job.expected_version))
        ):
            raise ValueError("not a job record")
        if job.expected_version is not None:
            job.expected_version = Version(*job.expected_version)
        return job


def _is_integer(value, lowest, highest):
    return type(value) is int and lowest <= value <= highest


def _is_timestamp(value):
    # From 1970 to 9999, where ISO 8601 times end.
    return type(value) in (int, float) and 0 <= value < 253402300800


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job, or the resize process it ran, ended: its final state and, unless done, why."""

    state: str
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Run:
    """A job running here: its claim on the folder's queue, its resize slot and its child process."""

    job: Job
    claim: Claim
    slot: int | None
    process: multiprocessing.Process | None = None
    is_cancelled: bool = False
    # How long its resize process ran, once it has.
    seconds: float | None = None


def _multiprocessing_context():
    # On Linux a resize process is forked from the server: it starts in about a millisecond with
    # Pillow and this module loaded, and no helper process (forkserver, resource tracker) sits idle
    # beside the server. Forking a threaded process copies other threads' locks as they are; the
    # child takes none of them: it loads nothing new (Pillow's plugins are loaded before any
    # fork), lets go of the server's descriptors, and leaves with os._exit(). Elsewhere (macOS,
    # where system libraries do not survive a fork) each child is spawned.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class Resizer:
    """Runs the resize jobs queued in the folder by every instance, each in its own process.

    At most `workers` resize processes run at once on this host, whatever the number of instances
    on it; jobs of one image run one at a time, in the order they were accepted, wherever. submit()
    raises HTTPError(503) when `max_queue` jobs already wait. A child still running after
    `timeout_seconds` is killed and its job fails. The result replaces the stored file only if that
    file is still the version the job started from. A job whose instance died is run by another one,
    or by the next to start.
    """

    def __init__(self, store, workers, max_queue, timeout_seconds, max_pixels, metrics=None, on_job_end=None, log=None):
        self._store = store
        self._metrics = metrics or Metrics(enabled=False)
        # log(event, message, details=None), as log_event() with the server's format.
        self._log = log or functools.partial(log_event, "common")
        # Told of every job this instance ends: on_job_end(job, seconds its resize process ran or None).
        self._on_job_end = on_job_end
        self._max_pixels = max_pixels
        self._workers = workers
        self._max_queue = max_queue
        self._timeout_seconds = timeout_seconds
        self._context = _multiprocessing_context()
        self._condition = threading.Condition()
        self._runs = {}
        self._threads = set()
        self._renders = set()
        self._renders_waiting = 0
        self._render_gate = threading.Lock()
        self._is_stopping = False
        self._is_woken = True
        self._is_slot_wanted = False
        self._last_queue_error = None
        self._scheduler = threading.Thread(target=self._schedule, name="ims-scheduler", daemon=True)
        self._scheduler.start()

    def submit(self, name, width, height, fit, expected_version=None):
        """Queue a resize of `name` in the folder and return its Job; HTTPError(503) when the queue is full.

        With `expected_version`, the job fails if the stored file is no longer that Version when
        it starts. The job is on disk when this returns.
        """
        if self._is_stopping:
            raise HTTPError(503, "the server is stopping; try again later", {"Retry-After": "1"})
        job = Job(secrets.token_hex(8), name, width, height, fit, expected_version=expected_version)
        self._store.enqueue(job.to_record(), self._max_queue, self._workers)
        self._wake()
        return job

    def cancel_for(self, name):
        """Kill the resizes of `name` running here; the Store has cancelled its jobs in the folder."""
        with self._condition:
            for run in self._runs.values():
                if run.job.image == name:
                    run.is_cancelled = True
                    if run.process is not None:
                        run.process.kill()

    def wait(self, job_id, timeout_seconds):
        """Return the job's JSON once it has ended or `timeout_seconds` passed; HTTPError(404) if unknown.

        A job ending here wakes the wait at once; one running elsewhere is seen within JOB_POLL_SECONDS.
        """
        job = self._load(job_id)
        if job is None:
            raise HTTPError(404, f"no resize job {job_id!r} is known (ended jobs are kept for an hour)")
        deadline = time.monotonic() + timeout_seconds
        while job.state not in ENDED_STATES and not self._is_stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with self._condition:
                self._condition.wait(min(JOB_POLL_SECONDS, remaining))
            job = self._load(job_id) or job
        return job.to_json()

    def stop(self):
        """Stop running jobs here and leave them, and the queued ones, in the folder for any instance."""
        with self._condition:
            self._is_stopping = True
            for run in self._runs.values():
                if run.process is not None:
                    run.process.kill()
            for process in self._renders:
                process.kill()
            self._condition.notify_all()
        self._scheduler.join()
        with self._condition:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def _load(self, job_id):
        record = self._store.load_record(job_id)
        try:
            job = None if record is None else Job.from_record(record)
        except ValueError:
            return None
        return job if job is not None and job.id == job_id else None

    def _notify(self):
        with self._condition:
            self._condition.notify_all()

    def _wake(self):
        with self._condition:
            self._is_woken = True
            self._condition.notify_all()

    def _schedule(self):
        next_cleanup = 0.0
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._is_woken or self._is_stopping, QUEUE_SCAN_SECONDS)
                if self._is_stopping:
                    return
                self._is_woken = False
            try:
                self._start_ready_jobs()
                if time.monotonic() >= next_cleanup:
                    next_cleanup = time.monotonic() + JOB_CLEANUP_SECONDS
                    # And what instances killed here or on other hosts left, which would else
                    # wait for some instance's next start or stop.
                    self._store.remove_leftovers()
                    self._store.remove_old_records()
                    self._store.check_renditions()
                self._last_queue_error = None
            except (HTTPError, OSError) as error:
                # The folder may be gone or read-only for a while: said once, not twice a second.
                message = getattr(error, "message", None) or str(error)
                if message != self._last_queue_error:
                    self._log("error", f"cannot run the folder's resize queue: {message}")
                    self._last_queue_error = message

    def _start_ready_jobs(self):
        while True:
            # Renders wait for a slot with a client waiting for them: they go first.
            if self._store.are_renders_waiting():
                return
            queued = self._store.queued_records()
            if not queued:
                return
            slot = self._store.take_slot(self._workers)
            # Whether a slot set free should wake the scheduler: only while jobs wait for one.
            self._is_slot_wanted = slot is None
            if slot is None:
                return
            try:
                claim = self._claim_next(queued)
            except BaseException:
                self._store.release_slot(slot)
                raise
            job = None
            if claim is not None:
                try:
                    job = Job.from_record(claim.record)
                except ValueError:
                    self._store.end(claim, dict(claim.record, state=FAILED, error="the job's record is unreadable"))
            with self._condition:
                if job is None or self._is_stopping:
                    self._store.release_slot(slot)
                    if claim is not None and job is not None:
                        self._store.release(claim)
                    return
                run = Run(job, claim, slot)
                self._runs[job.id] = run
                thread = threading.Thread(target=self._run, args=(run,), name=f"ims-job-{job.id}", daemon=True)
                self._threads.add(thread)
                thread.start()

    def _claim_next(self, queued):
        images_seen = set()
        for entry, accepted in queued:
            # A damaged entry names no image: it is claimed alone, and fails.
            image = accepted.get("image") if isinstance(accepted.get("image"), str) else entry
            # Only the first job of an image not ended may run: the others follow it in order.
            if image in images_seen:
                continue
            images_seen.add(image)
            claim = self._store.claim(entry)
            if claim is not None:
                return claim
        return None

    def _free_slot(self, run):
        with self._condition:
            if run.slot is not None:
                self._store.release_slot(run.slot)
                run.slot = None
                if self._is_slot_wanted or self._renders_waiting:
                    self._is_woken = True
                    self._condition.notify_all()

    def render(self, source_path, target_path, rendition, version, kept_descriptor=None):
        """Render `rendition` of the image at `source_path`, which must be `version`, into `target_path`.

        `kept_descriptor` stays open in the resize process, for a target path that names it.
        Runs in a resize process under the host's bound, ahead of queued jobs. Returns None when
        done, or the process's (kind, reason) when it did not write its result. Raises
        HTTPError(503) with Retry-After when --max-queue renders already wait for a slot, when no
        slot frees within the time limit, when the render runs past it, or when the server stops.
        """
        slot = self._take_render_slot(time.monotonic() + self._timeout_seconds)
        process = None
        try:
            reader, writer = self._context.Pipe(duplex=False)
            arguments = (source_path, target_path, rendition, version)
            process = self._context.Process(
                target=run_resize,
                args=(writer, render_file, arguments, self._timeout_seconds, self._max_pixels, kept_descriptor),
                name="ims-render",
                daemon=True,
            )
            try:
                with self._condition:
                    is_startable = not self._is_stopping
                    if is_startable:
                        self._renders.add(process)
                        started = time.monotonic()
                        process.start()
                        self._metrics.add("resizes_running")
            except BaseException:
                reader.close()
                raise
            finally:
                writer.close()
            try:
                if not is_startable:
                    raise HTTPError(503, "the server is stopping; try again later", {"Retry-After": "1"})
                if not reader.poll(self._timeout_seconds):
                    raise HTTPError(503, f"the rendition took longer than {self._timeout_seconds:g} seconds and was stopped", {"Retry-After": "1"})
                return reader.recv()
            except EOFError:
                if self._is_stopping:
                    raise HTTPError(503, "the server is stopping; try again later", {"Retry-After": "1"}) from None
                raise HTTPError(503, f"the render process died (exit code {process.exitcode})", {"Retry-After": "1"}) from None
            finally:
                reader.close()
                if is_startable:
                    process.kill()
                    process.join()
                    self._metrics.add("resizes_running", -1)
                    self._metrics.count_resize("rendition", time.monotonic() - started)
        finally:
            with self._condition:
                self._renders.discard(process)
                self._store.release_slot(slot)
                # The slot goes to a waiting render, else to a queued job.
                self._is_woken = True
                self._condition.notify_all()

    def _take_render_slot(self, deadline):
        slot = self._store.take_slot(self._workers)
        if slot is not None:
            return slot
        busy = HTTPError(503, "every resize process is busy; try again shortly", {"Retry-After": "1"})
        with self._condition:
            if self._renders_waiting >= self._max_queue or self._is_stopping:
                raise busy
            self._renders_waiting += 1
        self._store.announce_render(True)
        try:
            # One waiting render at a time looks for a slot; the others wait their turn on the
            # gate, rather than all trying every slot's lock file whenever one frees.
            if not self._render_gate.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise busy
            try:
                while True:
                    slot = self._store.take_slot(self._workers)
                    if slot is not None:
                        return slot
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._is_stopping:
                        raise busy
                    # Slots set free here wake this at once; those of other instances on the host
                    # are seen within JOB_POLL_SECONDS.
                    with self._condition:
                        self._condition.wait(min(JOB_POLL_SECONDS, remaining))
            finally:
                self._render_gate.release()
        finally:
            self._store.announce_render(False)
            with self._condition:
                self._renders_waiting -= 1

    def _run(self, run):
        job = run.job
        outcome = Outcome(FAILED, "the resize failed unexpectedly; the server log has the details")
        target = None
        try:
            job.state = RUNNING
            if self._store.update_record(job.to_record()):
                target = self._store.new_file(extension_of(job.image))
                outcome = self._resize(run, target)
            else:
                outcome = Outcome(CANCELLED, "the image was deleted")
        except HTTPError as failure:
            outcome = Outcome(FAILED, failure.message)
        except Exception:
            self._log("error", f"resize job {job.id} of {job.image!r} failed unexpectedly", traceback.format_exc())
        finally:
            try:
                if target is not None:
                    target.remove()
                self._free_slot(run)
                if outcome is None:
                    job.state = QUEUED
                    self._store.update_record(job.to_record())
                    self._store.release(run.claim)
                else:
                    job.state, job.error, job.finished = outcome.state, outcome.error, time.time()
                    self._store.end(run.claim, job.to_record(), self._notify)
                    if self._on_job_end is not None:
                        self._on_job_end(job, run.seconds)
            except Exception:
                self._log("error", f"resize job {job.id} could not be ended", traceback.format_exc())
            finally:
                with self._condition:
                    self._runs.pop(job.id, None)
                    self._threads.discard(threading.current_thread())
                    self._is_woken = True
                    self._condition.notify_all()

    def _resize(self, run, target):
        """Resize the job's image into `target` and put it in place: the Outcome, or None when stopping."""
        job = run.job
        try:
            version = self._store.version(job.image)
        except HTTPError:
            return Outcome(FAILED, "the image no longer exists")
        if job.result_inode == version.inode:
            return Outcome(DONE_STATE)
        if job.expected_version not in (None, version):
            return Outcome(FAILED, "the image changed after its ETag was checked (If-Match); nothing was resized")
        arguments = (self._store.path_of(job.image), target.path, job.width, job.height, job.fit)
        outcome = self._run_child(run, arguments)
        if outcome is None or outcome.state != DONE_STATE:
            return outcome

        def is_wanted(inode):
            # Under the folder's lock: a DELETE elsewhere may have cancelled the job meanwhile.
            record = self._store.load_record(job.id)
            if record is None or record["state"] in ENDED_STATES:
                return False
            job.result_inode = inode
            self._store.save_record(job.to_record())
            return True

        if self._store.replace(job.image, target, version, is_wanted):
            return outcome
        return Outcome(CANCELLED, "the image was replaced or deleted while it was being resized")

    def _is_cancelled(self, run):
        if run.is_cancelled:
            return True
        record = self._store.load_record(run.job.id)
        return record is None or record["state"] in ENDED_STATES

    def _run_child(self, run, arguments):
        """Run resize_file(*arguments) in a process of its own, within the time limit; return its Outcome.

        None when the server is stopping. The job's slot is free again as soon as the process has
        exited (it does so right after answering), so at most `workers` resize processes exist at
        once on this host. A job cancelled elsewhere is seen within QUEUE_SCAN_SECONDS.
        """
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_resize,
            args=(writer, resize_file, arguments, self._timeout_seconds, self._max_pixels),
            name=f"ims-resize-{run.job.id}",
            daemon=True,
        )
        with self._condition:
            is_startable = not (self._is_stopping or run.is_cancelled)
            if is_startable:
                run.process = process
                started = time.monotonic()
                process.start()
                self._metrics.add("resizes_running")
        writer.close()
        if not is_startable:
            reader.close()
            return None if self._is_stopping else Outcome(CANCELLED, "the image was deleted")
        # The child holds the only writing end of the pipe: it is readable once the child has
        # answered, or has exited without answering.
        deadline = time.monotonic() + self._timeout_seconds
        is_answered = False
        message = False
        try:
            while not self._is_stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if reader.poll(min(QUEUE_SCAN_SECONDS, remaining)):
                    is_answered = True
                    message = reader.recv()
                    break
                if self._is_cancelled(run):
                    break
        except EOFError:
            message = False
        finally:
            reader.close()
        if not is_answered:
            process.kill()
        process.join()
        run.seconds = time.monotonic() - started
        self._metrics.add("resizes_running", -1)
        self._metrics.count_resize("job", run.seconds)
        with self._condition:
            run.process = None
        self._free_slot(run)
        if self._is_stopping:
            return None
        if self._is_cancelled(run):
            return Outcome(CANCELLED, "the image was deleted")
        if not is_answered:
            return Outcome(FAILED, f"the resize took longer than {self._timeout_seconds:g} seconds and was stopped")
        if message is False:
            return Outcome(FAILED, f"the resize process died (exit code {process.exitcode})")
        if message is not None:
            return Outcome(FAILED, f"the image could not be resized: {message[1]}")
        return Outcome(DONE_STATE)


class Flight:
    """A render under way in this instance, shared by every request for the same rendition."""

    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error = None
        self.users = 1


class Renditions:
    """Serves renditions from the folder's cache, rendering each missing one once.

    Of the requests for one uncached rendition that come together, in this instance or in others
    on the folder, one renders it and the others wait for it and share it. It is kept in the
    Store's cache unless cache_size is 0, it is larger than the cache, or the disk is full; then
    it is served from a file of its own that goes with the last reader.
    """

    def __init__(self, store, resizer, max_pixels, metrics=None):
        self._store = store
        self._resizer = resizer
        self._metrics = metrics or Metrics(enabled=False)
        self._max_pixels = max_pixels
        self._lock = threading.Lock()
        self._flights = {}
        # Counted for tests and benchmarks: renders this instance ran.
        self.renders = 0

    def open(self, name, version, rendition, entry, content_type):
        """Return rendition `entry` of `version` of the stored image `name` as a StoredFile.

        Raises HTTPError: 400 for a result over --max-pixels, 422 for an image that cannot be
        rendered, 503 (with Retry-After) when the resize processes are busy, the render takes too
        long or the image is replaced meanwhile, 507 for a folder that cannot be written.
        """
        cached = self._store.open_rendition(name, entry, content_type)
        if cached is not None:
            self._metrics.add("cache_hits")
            return cached
        self._metrics.add("cache_misses")
        key = (name, entry)
        with self._lock:
            flight = self._flights.get(key)
            is_leader = flight is None
            if is_leader:
                flight = self._flights[key] = Flight()
            else:
                flight.users += 1
        try:
            if is_leader:
                try:
                    flight.result = self._render(name, version, rendition, entry, content_type)
                except HTTPError as error:
                    flight.error = error
                except BaseException:
                    flight.error = HTTPError(500, "the rendition failed unexpectedly; the server log has the details")
                    raise
                finally:
                    with self._lock:
                        del self._flights[key]
                    flight.done.set()
            else:
                flight.done.wait()
            if flight.error is not None:
                raise HTTPError(flight.error.status, flight.error.message, flight.error.headers)
            result = flight.result
            return StoredFile(os.dup(result.descriptor), result.version, content_type)
        finally:
            with self._lock:
                flight.users -= 1
                if flight.users == 0 and flight.result is not None:
                    flight.result.close()

    def _render(self, name, version, rendition, entry, content_type):
        with self._store.open(name) as original, original.reader() as file:
            if original.version != version:
                raise HTTPError(503, "the image was replaced while it was being rendered; ask again", {"Retry-After": "1"})
            size = upright_size(file)
        if size is None:
            raise HTTPError(422, f"{name!r} cannot be rendered: it is not a readable image of an allowed format")
        width, height, fit = rendition_box(size, rendition.width, rendition.height, rendition.fit)
        if fit == "contain":
            width, height = fitted_size(size, width, height, fit)
        check_result_pixels(width, height, self._max_pixels)
        output_format = rendition.format or FORMAT_BY_CONTENT_TYPE[content_type]
        most = MAX_SIDE_BY_FORMAT[output_format]
        if max(width, height) > most:
            side = "width" if width > most else "height"
            raise HTTPError(400, f"{width}x{height} is too large for {output_format}: its {side} may be at most {most} pixels")
        source_path = self._store.path_of(name)
        if self._store.cache_size == 0 and hasattr(os, "memfd_create"):
            # Kept nowhere, so nothing for other instances to wait for: rendered into memory, and
            # gone with its last reader.
            return self._render_in_memory(name, source_path, rendition, version, content_type)
        result = None
        is_kept = False
        try:
            with self._store.rendition_lock(name, entry):
                # Rendered meanwhile by an instance that held the lock first.
                result = self._store.open_rendition(name, entry, content_type)
                if result is None:
                    result, is_kept = self._render_to_cache(name, source_path, version, rendition, entry, content_type)
                else:
                    is_kept = True
        finally:
            if not is_kept:
                self._store.remove_rendition_folder(name)
        # Without a file in the folder (the disk is full), rendered into memory.
        return result or self._render_in_memory(name, source_path, rendition, version, content_type)

    def _render_to_cache(self, name, source_path, version, rendition, entry, content_type):
        # Returns (the rendition, whether it is kept), or (None, False) when the folder cannot hold it.
        try:
            target = self._store.new_rendition_file(name, os.path.splitext(entry)[1])
        except HTTPError:
            return None, False
        try:
            answer = self._run(source_path, target.path, rendition, version)
            if answer is not None:
                if answer[0] == NO_SPACE_ANSWER:
                    return None, False
                self._fail(name, answer)
            result = self._open_result(target.path, content_type)
            try:
                return result, self._store.keep_rendition(target, name, version, entry, result.version.size)
            except BaseException:
                result.close()
                raise
        finally:
            target.remove()

    def _render_in_memory(self, name, source_path, rendition, version, content_type):
        if not hasattr(os, "memfd_create"):
            raise HTTPError(507, "the storage folder is full or not writable, so the rendition cannot be made")
        descriptor = os.memfd_create("ims-rendition")
        try:
            answer = self._run(source_path, f"/proc/self/fd/{descriptor}", rendition, version, descriptor)
            if answer is not None:
                self._fail(name, answer)
            return StoredFile(descriptor, Version.of(os.fstat(descriptor)), content_type)
        except BaseException:
            os.close(descriptor)
            raise

    def _run(self, source_path, target_path, rendition, version, kept_descriptor=None):
        answer = self._resizer.render(source_path, target_path, rendition, version, kept_descriptor)
        with self._lock:
            self.renders += 1
        return answer

    @staticmethod
    def _open_result(path, content_type):
        descriptor = os.open(path, os.O_RDONLY | OPEN_FLAGS_NO_FOLLOW)
        return StoredFile(descriptor, Version.of(os.fstat(descriptor)), content_type)

    @staticmethod
    def _fail(name, answer):
        kind, reason = answer
        if kind == CHANGED_ANSWER:
            raise HTTPError(503, f"{reason}; ask again", {"Retry-After": "1"})
        if kind == NO_SPACE_ANSWER:
            raise HTTPError(507, f"the rendition cannot be made: {reason}")
        raise HTTPError(422, f"{name!r} could not be rendered: {reason}")


# ====
# Metrics
# ====
# Owns what an instance counts, and its Prometheus text (exposition format 0.0.4). Counts are
# float64 cells in memory that every serving process of the instance shares, a block each, so that
# any worker answers a scrape for them all; a restarted worker takes over its predecessor's block,
# so counters never go down. Never touches the folder or a socket.

METRIC_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other")
# Routes are named by their paths' templates, never by an image's name, so labels stay few.
NO_ROUTE = "none"
METRIC_ROUTES = ("/", "/{name}", "/jobs/{id}", "/healthz", "/metrics", NO_ROUTE)
METRIC_STATUSES = tuple(sorted(int(status) for status in http.server.BaseHTTPRequestHandler.responses))
REQUEST_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RESIZE_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RESIZE_KINDS = ("job", "rendition")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHOD_INDEX = {method: index for index, method in enumerate(METRIC_METHODS)}
_ROUTE_INDEX = {route: index for index, route in enumerate(METRIC_ROUTES)}
_STATUS_INDEX = {status: index for index, status in enumerate(METRIC_STATUSES)}
_REQUEST_HISTOGRAM = len(REQUEST_SECONDS_BUCKETS) + 2
_RESIZE_HISTOGRAM = len(RESIZE_SECONDS_BUCKETS) + 2


def _cell_offsets(sizes):
    # Where each count starts in a block, and the block's length.
    offsets, total = {}, 0
    for name, size in sizes:
        offsets[name] = total
        total += size
    return offsets, total


# A histogram is its buckets' counts (not cumulative), the count past the last bucket, then the sum.
_CELL, BLOCK_CELLS = _cell_offsets((
    ("requests", len(METRIC_METHODS) * len(METRIC_ROUTES) * len(METRIC_STATUSES)),
    ("request_seconds", len(METRIC_ROUTES) * _REQUEST_HISTOGRAM),
    ("received_bytes", 1),
    ("sent_bytes", 1),
    ("open_connections", 1),
    ("uploads", 1),
    ("upload_bytes", 1),
    ("jobs", len(ENDED_STATES)),
    ("resizes_running", 1),
    ("resize_seconds", len(RESIZE_KINDS) * _RESIZE_HISTOGRAM),
    ("cache_hits", 1),
    ("cache_misses", 1),
    ("cache_evictions", 1),
    ("pid", 1),
))
# Counts of the moment, which a new worker starts again from 0.
_GAUGE_CELLS = ("open_connections", "resizes_running")


class Metrics:
    """The counts of one instance, a block of cells per serving process, in shared memory.

    Made before workers are forked, for that many processes; each process then takes its block
    with use_block(). Counting is thread-safe; a scrape sums the blocks without a lock, so it may
    miss a count being made, never count one twice. Disabled, it counts nothing.
    """

    def __init__(self, processes=1, enabled=True):
        self.enabled = enabled
        self.processes = processes
        # The supervisor of --workers: its CPU time includes that of workers that died.
        self.supervisor_pid = None
        self._memory = mmap.mmap(-1, processes * BLOCK_CELLS * 8)
        self._all = memoryview(self._memory).cast("d")
        self._cells = self._all[:BLOCK_CELLS]
        self._lock = threading.Lock()

    def use_block(self, index):
        """Count into block `index` from now on: a new process's, or a restarted one's predecessor's."""
        self._cells = self._all[index * BLOCK_CELLS:(index + 1) * BLOCK_CELLS]
        for name in _GAUGE_CELLS:
            self._cells[_CELL[name]] = 0
        self._cells[_CELL["pid"]] = os.getpid()

    def add(self, name, amount=1):
        """Add `amount` to the one-cell count `name` of _CELL."""
        self.add_at(_CELL[name], amount)

    def count_request(self, method, route, status, seconds, received, sent):
        """Count one answered request: its method, route, status, duration and bytes."""
        if not self.enabled:
            return
        route_index = _ROUTE_INDEX[route]
        request = _CELL["requests"] + (_METHOD_INDEX.get(method, _METHOD_INDEX["other"]) * len(METRIC_ROUTES) + route_index) * len(METRIC_STATUSES) + _STATUS_INDEX[status]
        histogram = _CELL["request_seconds"] + route_index * _REQUEST_HISTOGRAM
        bucket = histogram + bisect.bisect_left(REQUEST_SECONDS_BUCKETS, seconds)
        with self._lock:
            cells = self._cells
            cells[request] += 1
            cells[bucket] += 1
            cells[histogram + _REQUEST_HISTOGRAM - 1] += seconds
            cells[_CELL["received_bytes"]] += received
            cells[_CELL["sent_bytes"]] += sent

    def count_job_end(self, state):
        """Count a job that ended in `state` (one of ENDED_STATES)."""
        self.add_at(_CELL["jobs"] + ENDED_STATES.index(state))

    def count_resize(self, kind, seconds):
        """Count a resize process of `kind` (RESIZE_KINDS) that ran for `seconds`."""
        histogram = _CELL["resize_seconds"] + RESIZE_KINDS.index(kind) * _RESIZE_HISTOGRAM
        self.add_at(histogram + bisect.bisect_left(RESIZE_SECONDS_BUCKETS, seconds))
        self.add_at(histogram + _RESIZE_HISTOGRAM - 1, seconds)

    def add_at(self, cell, amount=1):
        """Add `amount` to the cell at offset `cell` of this process's block."""
        if self.enabled:
            with self._lock:
                self._cells[cell] += amount

    def exposition(self, gauges):
        """Return the Prometheus text of every block summed, with `gauges` [(name, help, value)] measured now."""
        totals = [0.0] * BLOCK_CELLS
        pids = []
        for index in range(self.processes):
            block = self._all[index * BLOCK_CELLS:(index + 1) * BLOCK_CELLS].tolist()
            totals = [total + value for total, value in zip(totals, block)]
            if block[_CELL["pid"]]:
                pids.append(int(block[_CELL["pid"]]))
        lines = []

        def family(name, kind, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{sample_name}{_labels(labels)} {_sample(value)}" for sample_name, labels, value in samples)

        def single(name, kind, help_text, cell):
            family(name, kind, help_text, [(name, {}, totals[_CELL[cell]])])

        def histogram(name, help_text, label, values, start, buckets):
            samples = []
            size = len(buckets) + 2
            for index, value in enumerate(values):
                cells = totals[start + index * size:start + (index + 1) * size]
                count = sum(cells[:-1])
                if not count:
                    continue
                running = 0.0
                for bound, bucket_count in zip(buckets, cells):
                    running += bucket_count
                    samples.append((f"{name}_bucket", {label: value, "le": _sample(bound)}, running))
                samples.append((f"{name}_bucket", {label: value, "le": "+Inf"}, count))
                samples.append((f"{name}_sum", {label: value}, cells[-1]))
                samples.append((f"{name}_count", {label: value}, count))
            family(name, "histogram", help_text, samples)

        family("ims_info", "gauge", "The versions of IMS and Pillow serving.", [("ims_info", {"version": __version__, "pillow": PILLOW_VERSION}, 1)])
        family("ims_workers", "gauge", "Serving processes of this instance.", [("ims_workers", {}, self.processes)])
        requests = []
        for method_index, method in enumerate(METRIC_METHODS):
            for route_index, route in enumerate(METRIC_ROUTES):
                start = _CELL["requests"] + (method_index * len(METRIC_ROUTES) + route_index) * len(METRIC_STATUSES)
                for status_index, status in enumerate(METRIC_STATUSES):
                    if totals[start + status_index]:
                        requests.append(("ims_http_requests_total", {"method": method, "route": route, "status": str(status)}, totals[start + status_index]))
        family("ims_http_requests_total", "counter", "Requests answered, by method, route and status.", requests)
        histogram("ims_http_request_duration_seconds", "Time from a request's head to the end of its answer, by route.",
                  "route", METRIC_ROUTES, _CELL["request_seconds"], REQUEST_SECONDS_BUCKETS)
        single("ims_http_received_bytes_total", "counter", "Bytes of requests read, heads and bodies.", "received_bytes")
        single("ims_http_sent_bytes_total", "counter", "Bytes of answers sent, heads and bodies.", "sent_bytes")
        single("ims_http_open_connections", "gauge", "Client connections open now.", "open_connections")
        single("ims_uploads_total", "counter", "Images stored by uploads.", "uploads")
        single("ims_upload_bytes_total", "counter", "Bytes of the images stored by uploads.", "upload_bytes")
        family("ims_resize_jobs_total", "counter", "Resize jobs ended by this instance, by their final state.",
               [("ims_resize_jobs_total", {"state": state}, totals[_CELL["jobs"] + index]) for index, state in enumerate(ENDED_STATES)])
        single("ims_resize_running", "gauge", "Resize processes running now for this instance, jobs and renditions.", "resizes_running")
        histogram("ims_resize_duration_seconds", "Time resize processes ran, by kind: a job, or a rendition.",
                  "kind", RESIZE_KINDS, _CELL["resize_seconds"], RESIZE_SECONDS_BUCKETS)
        single("ims_rendition_cache_hits_total", "counter", "Renditions served from the cache.", "cache_hits")
        single("ims_rendition_cache_misses_total", "counter", "Renditions not in the cache when asked for.", "cache_misses")
        single("ims_rendition_cache_evictions_total", "counter", "Renditions evicted from the cache by this instance.", "cache_evictions")
        for name, help_text, value in gauges:
            family(name, "gauge", help_text, [(name, {}, value)])
        lines.extend(process_exposition(pids, self.supervisor_pid))
        return ("\n".join(lines) + "\n").encode()


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items()) + "}"


def _sample(value):
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _process_status(pid):
    # (CPU clock ticks with those of waited-for children, resident bytes, virtual bytes, open
    # descriptors, start in seconds after boot) of a process, from Linux's /proc; None when gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
        fields = text[text.rindex(b")") + 2:].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu_ticks = sum(int(fields[index]) for index in (11, 12, 13, 14))
        open_descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        return cpu_ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE"), int(fields[20]), open_descriptors, int(fields[19]) / ticks
    except (OSError, ValueError, IndexError):
        return None


def _boot_time():
    with open("/proc/stat", "rb") as file:
        for line in file:
            if line.startswith(b"btime "):
                return int(line.split()[1])
    raise OSError("no btime in /proc/stat")


def process_exposition(pids, supervisor_pid):
    """Return the lines of the usual process_* metrics, summed over `pids` and the supervisor's process."""
    statuses = [_process_status(pid) for pid in dict.fromkeys([supervisor_pid, *pids]) if pid is not None]
    statuses = [status for status in statuses if status is not None]
    lines = []

    def gauge(name, kind, help_text, value):
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_sample(value)}"))

    if resource is not None:
        gauge("process_max_fds", "gauge", "Maximum number of open file descriptors.", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if not statuses:
        return lines
    try:
        started = _boot_time() + statuses[0][4]
    except OSError:
        started = None
    # Ticks are summed before they become seconds: floats summed in another order could make the
    # counter seem to go down when a dead worker's ticks move to its supervisor.
    gauge("process_cpu_seconds_total", "counter", "User and system CPU time of the instance's processes and the resize processes they ended.", sum(status[0] for status in statuses) / os.sysconf("SC_CLK_TCK"))
    gauge("process_resident_memory_bytes", "gauge", "Resident memory of the instance's serving processes.", sum(status[1] for status in statuses))
    gauge("process_virtual_memory_bytes", "gauge", "Virtual memory of the instance's serving processes.", sum(status[2] for status in statuses))
    gauge("process_open_fds", "gauge", "Open file descriptors of the instance's serving processes.", sum(status[3] for status in statuses))
    if started is not None:
        gauge("process_start_time_seconds", "gauge", "Start time of the instance since the Unix epoch, in seconds.", started)
    return lines


# ====
# HTTP handler
# ====
# Owns one connection: request framing, routing, and the answers. read_request_head() and
# read_body() are the only readers of the socket; every error leaves through dispatch().


# The page for people: what a browser gets at GET /. Everything it needs is in these constants,
# so it fetches nothing from elsewhere; its style and script are allowed by their hashes alone.

# Tiles per page unless ?limit= says otherwise; the most a page, or a page of the JSON list, holds.
PAGE_SIZE = 100
MAX_PAGE_SIZE = 10_000
# The box a thumbnail fits in, in CSS pixels; a screen of twice the density gets twice the pixels.
THUMBNAIL_BOX = 240

PAGE_STYLE = """
:root { color-scheme: light dark; --ink: #1d1d1f; --paper: #fafafa; --card: #fff; --line: #d5d5d9;
  --accent: #0b57d0; --error: #b3261e; font: 16px/1.4 system-ui, sans-serif; }
@media (prefers-color-scheme: dark) { :root { --ink: #e8e8ea; --paper: #151518; --card: #222226;
  --line: #3a3a40; --accent: #8ab4f8; --error: #f2b8b5; } }
body { margin: 0 auto; max-width: 1200px; padding: 1rem; color: var(--ink); background: var(--paper); }
h1 { margin: 0 0 .25rem; } h2 { font-size: 1.1rem; }
a { color: var(--accent); }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
#drop-zone { display: block; padding: 1.5rem; border: 2px dashed var(--line); border-radius: 8px; }
#drop-zone.over { border-color: var(--accent); }
#uploads { list-style: none; padding: 0; }
.upload { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; }
.upload.error .message, .status.error { color: var(--error); }
#grid { list-style: none; padding: 0; display: grid; gap: 1rem;
  grid-template-columns: repeat(auto-fill, minmax(min(100%, 260px), 1fr)); }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .75rem; min-width: 0; }
.open { display: flex; align-items: center; justify-content: center; height: 240px; }
.thumb { max-width: 100%; max-height: 240px; height: auto; }
.name { font-weight: 600; overflow-wrap: anywhere; margin: .5rem 0 0; }
.facts { margin: 0; opacity: .8; }
.resize { display: flex; flex-wrap: wrap; gap: .25rem; align-items: end; margin: .5rem 0; }
.resize input { width: 5rem; }
button, input, select { font: inherit; max-width: 100%; }
#drop-zone, .resize label { overflow-wrap: anywhere; }
""".strip()

PAGE_SCRIPT = """
"use strict";
const grid = document.getElementById("grid");
const uploads = document.getElementById("uploads");
const input = document.getElementById("file-input");
const dropZone = document.getElementById("drop-zone");

function messageOf(text) {
  try { return JSON.parse(text).message; } catch (error) { return text || "no answer"; }
}

async function currentPage() {
  const response = await fetch(location.pathname + location.search, {headers: {Accept: "text/html"}});
  return new DOMParser().parseFromString(await response.text(), "text/html");
}

// Refreshes may overlap (several uploads ending together): only the latest one is shown.
let refreshes = 0;

async function refreshGrid() {
  const refresh = ++refreshes;
  const page = await currentPage();
  if (refresh !== refreshes) return;
  grid.replaceChildren(...page.getElementById("grid").children);
  for (const id of ["summary", "pages"]) {
    const mine = document.getElementById(id), theirs = page.getElementById(id);
    if (mine && theirs) mine.replaceWith(theirs);
  }
}

function tileOf(name, root) {
  return (root || grid).querySelector('li.tile[data-name="' + CSS.escape(name) + '"]');
}

// By name: the grid may have been read again, and the tile made anew, while a request was out.
function showStatus(name, text, isError) {
  const tile = tileOf(name);
  if (!tile) return;
  const status = tile.querySelector(".status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

const UNREACHABLE = "The server could not be reached; try again";

function upload(file) {
  const item = document.createElement("li");
  item.className = "upload";
  item.dataset.name = file.name;
  const name = document.createElement("span");
  name.className = "file-name";
  name.textContent = file.name;
  const bar = document.createElement("progress");
  bar.max = 100;
  bar.value = 0;
  bar.setAttribute("aria-label", "Upload of " + file.name);
  const message = document.createElement("span");
  message.className = "message";
  message.setAttribute("role", "status");
  item.append(name, bar, message);
  uploads.append(item);
  const body = new FormData();
  body.append("file", file, file.name);
  const request = new XMLHttpRequest();
  request.open("POST", "/");
  request.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) bar.value = Math.round(100 * event.loaded / event.total);
  });
  request.addEventListener("load", () => {
    if (request.status === 201) {
      bar.value = 100;
      message.textContent = "Uploaded";
      refreshGrid().catch(() => {});
    } else {
      item.classList.add("error");
      message.textContent = messageOf(request.responseText);
    }
  });
  request.addEventListener("error", () => {
    item.classList.add("error");
    message.textContent = "The upload failed: the connection was lost";
  });
  request.send(body);
}

function uploadAll(files) {
  for (const file of files) upload(file);
}

input.addEventListener("change", () => { uploadAll(input.files); input.value = ""; });
document.getElementById("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  uploadAll(input.files);
  input.value = "";
});
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => { event.preventDefault(); dropZone.classList.add("over"); });
}
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  uploadAll(event.dataTransfer.files);
});

async function deleteImage(name) {
  const response = await fetch("/" + encodeURIComponent(name), {method: "DELETE"});
  if (response.status === 204 || response.status === 404) {
    const tile = tileOf(name);
    if (tile) tile.remove();
    refreshGrid().catch(() => {});
  } else {
    showStatus(name, messageOf(await response.text()), true);
  }
}

async function resizeImage(name, parameters) {
  showStatus(name, "Resizing…");
  const response = await fetch("/" + encodeURIComponent(name), {
    method: "PATCH", headers: {"Content-Type": "application/json"}, body: JSON.stringify(parameters),
  });
  if (response.status !== 202) {
    showStatus(name, messageOf(await response.text()), true);
    return;
  }
  const location = response.headers.get("Location");
  let job;
  do {
    const answer = await fetch(location + "?wait=60");
    if (!answer.ok) {
      showStatus(name, messageOf(await answer.text()), true);
      return;
    }
    job = await answer.json();
  } while (job.state === "queued" || job.state === "running");
  if (job.state !== "done") {
    showStatus(name, "The resize " + job.state + ": " + job.error, true);
    return;
  }
  const fresh = tileOf(name, await currentPage());
  const tile = tileOf(name);
  if (fresh && tile) {
    tile.replaceWith(fresh);
    showStatus(name, "Resized to " + fresh.dataset.width + "×" + fresh.dataset.height);
  }
}

grid.addEventListener("click", (event) => {
  const button = event.target.closest("button.delete");
  if (!button) return;
  const name = button.closest("li.tile").dataset.name;
  if (!window.confirm("Delete " + name + "?")) return;
  deleteImage(name).catch(() => showStatus(name, UNREACHABLE, true));
});

grid.addEventListener("submit", (event) => {
  const form = event.target.closest("form.resize");
  if (!form) return;
  event.preventDefault();
  const name = form.closest("li.tile").dataset.name;
  const parameters = {width: form.elements.width.value, height: form.elements.height.value, fit: form.elements.fit.value};
  resizeImage(name, parameters).catch(() => showStatus(name, UNREACHABLE, true));
});
""".strip()


def _source_hash(source):
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


# Nothing but this page's own style and script, images, and requests to this server; data: only for
# the empty icon that keeps a browser from asking for /favicon.ico.
PAGE_POLICY = (
    f"default-src 'none'; img-src 'self' data:; style-src {_source_hash(PAGE_STYLE)}; "
    f"script-src {_source_hash(PAGE_SCRIPT)}; connect-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def prefers_html(accept):
    """Tell whether an Accept header ranks text/html above application/json (RFC 9110 §12.5.1).

    Each type takes the quality of the most specific range that matches it; no Accept, or */*
    alone, ranks them equal, and equal keeps the JSON that programs expect.
    """
    if not accept:
        return False
    ranges = []
    for item in accept.split(","):
        media_range, _, parameters = item.partition(";")
        quality = 1.0
        for parameter in parameters.split(";"):
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        ranges.append((media_range.strip().lower(), quality))

    def quality_of(media_type):
        kind = media_type.split("/")[0] + "/*"
        for matching in (media_type, kind, "*/*"):
            qualities = [quality for media_range, quality in ranges if media_range == matching]
            if qualities:
                return max(qualities)
        return 0.0

    return quality_of("text/html") > quality_of("application/json")


def parse_page_query(query):
    """Return (limit, after) from a listing's query string: how many names, after which one.

    (None, "") without them. Other parameters are ignored, as the old service ignored them all.
    Raises HTTPError(400) for a limit that is not a whole number from 1 to MAX_PAGE_SIZE.
    """
    parameters = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    limit = parameters.get("limit")
    if limit is not None:
        if not _DIGITS.fullmatch(limit) or not 1 <= int(limit) <= MAX_PAGE_SIZE:
            raise HTTPError(400, f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}, not {limit[:100]!r}")
        limit = int(limit)
    return limit, parameters.get("after", "")


def page_of(names, limit, after):
    """Return the names after `after` (all of them when it is empty), at most `limit`, and whether more follow."""
    start = bisect.bisect_right(names, after) if after else 0
    chosen = names[start:start + limit]
    return chosen, start + limit < len(names)


def page_link(limit, after):
    """Return the URL of the page of `limit` names after `after`."""
    return "/?" + urllib.parse.urlencode({"limit": limit, "after": after})


def _size_text(size):
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def render_tile(name, found):
    """Return the HTML of one image's tile; `found` is Store.facts(name)."""
    version, facts = found
    path = "/" + urllib.parse.quote(name)
    shown = html.escape(name)

    def thumbnail(box):
        query = urllib.parse.urlencode({"width": box, "height": box, "fit": "contain", "format": "webp", "v": version.tag})
        return html.escape(f"{path}?{query}")

    if facts is None:
        # No thumbnail can be made of it: a link to the file as it is, and no failing request.
        dimensions, described, picture = "", "not a readable image", "Open the file"
    else:
        size = width, height = facts["upright_width"], facts["upright_height"]
        shown_width, shown_height = fitted_size(size, THUMBNAIL_BOX, THUMBNAIL_BOX, "contain")
        dimensions = f' data-width="{width}" data-height="{height}"'
        details = [facts["format"], f"{width}×{height}", _size_text(version.size)]
        if facts["animated"]:
            details.append(f"{facts['frames']} frames")
        if facts["icc_profile"]:
            details.append("ICC")
        described = " · ".join(details)
        picture = (
            f'<img class="thumb" src="{thumbnail(THUMBNAIL_BOX)}" srcset="{thumbnail(THUMBNAIL_BOX)} 1x, '
            f'{thumbnail(2 * THUMBNAIL_BOX)} 2x" width="{shown_width}" height="{shown_height}" loading="lazy" alt="{shown}">'
        )
    return (
        f'<li class="tile" data-name="{shown}"{dimensions}>'
        f'<a class="open" href="{html.escape(path)}">{picture}</a>'
        f'<p class="name">{shown}</p><p class="facts">{described}</p>'
        '<form class="resize"><label>Width <input name="width" type="number" min="1" required></label> '
        '<label>Height <input name="height" type="number" min="1" required></label> '
        '<label>Fit <select name="fit"><option>fill</option><option>contain</option><option>cover</option></select></label> '
        f'<button type="submit" aria-label="Resize {shown}">Resize</button></form>'
        f'<button class="delete" type="button" aria-label="Delete {shown}">Delete</button>'
        '<p class="status" role="status"></p></li>'
    )


def render_page(tiles, count, next_link):
    """Return the whole page, encoded: `tiles` as render_tile() made them, of `count` images in all."""
    pages = '<a href="/">First page</a>'
    if next_link is not None:
        pages += f' <a rel="next" href="{html.escape(next_link)}">Next page</a>'
    plural = "" if count == 1 else "s"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>IMS: {count} image{plural}</title>
<link rel="icon" href="data:,">
<style>{PAGE_STYLE}</style>
</head>
<body>
<header><h1>IMS</h1><p id="summary">{count} image{plural} stored</p></header>
<main>
<section aria-labelledby="upload-heading">
<h2 id="upload-heading">Upload</h2>
<form id="upload-form" method="post" action="/" enctype="multipart/form-data">
<label id="drop-zone">Drop images here, or choose them: <input id="file-input" type="file" name="file" multiple accept="image/*"></label>
<button type="submit">Upload</button>
</form>
<ul id="uploads" aria-label="Uploads"></ul>
</section>
<section aria-labelledby="images-heading">
<h2 id="images-heading">Images</h2>
<ul id="grid">{"".join(tiles)}</ul>
<nav class="pages" id="pages" aria-label="Pages">{pages}</nav>
</section>
</main>
<script>{PAGE_SCRIPT}</script>
</body>
</html>
""".encode()


def content_disposition(name):
    """Return `inline; filename=<name>`, quoted or RFC 8187-encoded when the name needs it."""
    if re.fullmatch(r"[A-Za-z0-9!#$&+.^_`|~-]+", name):
        return f"inline; filename={name}"
    ascii_name = secure_filename(name) or "image" + extension_of(name)
    return f"inline; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name)}"


# Method → route method name, per kind of path; the keys are also the Allow header of a 405.
ROOT_ACTIONS = {"GET": "list_images", "HEAD": "list_images", "POST": "upload_image"}
IMAGE_ACTIONS = {"GET": "download_image", "HEAD": "download_image", "DELETE": "delete_image", "PATCH": "request_resize"}
JOB_ACTIONS = {"GET": "show_job", "HEAD": "show_job"}
HEALTH_ACTIONS = {"GET": "show_health", "HEAD": "show_health"}
METRICS_ACTIONS = {"GET": "show_metrics", "HEAD": "show_metrics"}
# What a page on another origin may read of an answer, beside the CORS-safelisted headers.
CORS_EXPOSED_HEADERS = "Location, ETag, Last-Modified, Retry-After, Content-Disposition, Content-Range, Link, X-Request-Id, Repr-Digest"
# How long a browser may keep a preflight's answer, in seconds.
CORS_MAX_AGE = 600
_HEADER_NAME_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
NO_HEADERS = Headers()
# An Origin field in a head too long to parse, for the CORS headers of its 414 or 431.
_ORIGIN_FIELD = re.compile(rb"\nOrigin:[ \t]*([\x21-\x7e]+)[ \t]*\r?\n", re.IGNORECASE)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the contract's endpoints over HTTP/1.1 with keep-alive."""

    # Answers are HTTP/1.1 (send_head() writes the status line); keep-alive is decided per answer.
    protocol_version = "HTTP/1.1"
    server_version = f"IMS/{__version__}"
    # Without TCP_NODELAY a keep-alive client waits 40 ms for the delayed ACK after each answer.
    disable_nagle_algorithm = True
    rbufsize = READ_CHUNK_SIZE
    # Buffered writes put a small answer's headers and body in one packet; handle_one_request()
    # flushes after each request.
    wbufsize = READ_CHUNK_SIZE

    def setup(self):
        self.timeout = self.server.settings.timeout
        super().setup()
        self.is_idle = True
        self.server.track_handler(self, True)
        self.server.metrics.add("open_connections")

    def finish(self):
        self.server.metrics.add("open_connections", -1)
        self.server.track_handler(self, False)
        try:
            super().finish()
        except OSError:
            # The client reset the connection; the answer it did not take is of no use now.
            pass

    def handle(self):
        self.close_connection = True
        self.must_linger = False
        self.handle_one_request()
        while not self.close_connection and self.server.mark_idle(self):
            self.handle_one_request()
        # Lingering counts as idle, so a stopping server cuts it short.
        if self.must_linger and self.server.mark_idle(self):
            self.linger()

    def handle_one_request(self):
        """Read one request head within the time limit, then answer the request, count it and log it."""
        self.http_request = None
        self.requestline = ""
        self.command = ""
        self.request_version = "HTTP/1.1"
        self.headers = NO_HEADERS
        self.body_is_consumed = False
        self.response_started = False
        self.close_connection = True
        self.status = None
        self.route_name = NO_ROUTE
        self.request_id = None
        self.bytes_received = self.bytes_sent = self.body_bytes_sent = 0
        try:
            head = self.read_request_head()
        except socket.timeout:
            return
        except HTTPError as error:
            self.started = time.perf_counter()
            # A page on another origin reads this answer too, if the head read so far names an
            # origin allowed.
            origin = _ORIGIN_FIELD.search(self.partial_head)
            if origin is not None:
                self.headers = Headers([("Origin", origin.group(1).decode("ascii"))])
            self.send_error(error.status, error.message)
            self.end_request()
            return
        if head is None:
            return
        self.started = time.perf_counter()
        self.bytes_received = len(head)
        self.is_idle = False
        self.dispatch(head)
        try:
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        self.end_request()

    def end_request(self):
        """Count and log the request just answered; one that got no answer at all is neither."""
        if self.status is None:
            return
        seconds = time.perf_counter() - self.started
        self.server.metrics.count_request(self.command, self.route_name, self.status, seconds, self.bytes_received, self.bytes_sent)
        if self.server.quiet:
            return
        if self.server.settings.log_format == "json":
            log_json({
                "event": "request",
                "request_id": self.request_id,
                "client": self.client_address[0],
                "method": self.command or None,
                "path": self.http_request.target if self.http_request is not None else None,
                "status": self.status,
                "bytes": self.body_bytes_sent,
                "duration": round(seconds, 6),
            })
        else:
            super().log_request(self.status, self.body_bytes_sent)

    def log_date_time_string(self):
        # The stdlib formats the local time anew for every line; it changes once a second.
        return _log_time(int(time.time()))

    def read_request_head(self):
        """Return the bytes of the next request head, or None when the client closed the connection.

        The whole head must arrive within the timeout, however slowly it trickles; raises
        socket.timeout otherwise, HTTPError(414) as soon as the request line outgrows
        MAX_REQUEST_LINE_BYTES, and 431 when the head outgrows MAX_HEAD_BYTES.
        """
        deadline = time.monotonic() + self.timeout
        head = self.partial_head = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request head took too long")
            self.connection.settimeout(remaining)
            try:
                data = self.rfile.peek(READ_CHUNK_SIZE)
            except ConnectionError:
                return None
            if not data:
                return None
            if not head:
                # RFC 9112 §2.2: empty lines before a request line are ignored.
                stripped = data.lstrip(b"\r\n")
                if not stripped:
                    self.rfile.read(len(data))
                    continue
                self.rfile.read(len(data) - len(stripped))
                data = stripped
            searched_from = max(0, len(head) - 3)
            head = self.partial_head = head + data
            end = _HEAD_END.search(head, searched_from)
            consumed = end.end() - (len(head) - len(data)) if end else len(data)
            self.rfile.read(consumed)
            first_line_end = head.find(b"\n")
            # The request line's limit holds however long the line goes on (CR and LF excluded).
            if (first_line_end if first_line_end >= 0 else len(head)) > MAX_REQUEST_LINE_BYTES + 1:
                raise HTTPError(414, f"the request line is longer than {MAX_REQUEST_LINE_BYTES} bytes")
            # An HTTP/0.9 client sends one line and waits: refuse it now rather than at the timeout.
            if first_line_end >= 0 and not _ENDS_WITH_HTTP_VERSION.search(head[:first_line_end]):
                raise HTTPError(400, "the request line is not 'METHOD /path HTTP/1.1'")
            if end and end.end() <= MAX_HEAD_BYTES:
                self.connection.settimeout(self.timeout)
                return head[:end.end()]
            if len(head) > MAX_HEAD_BYTES:
                raise HTTPError(431, f"the request head is longer than {MAX_HEAD_BYTES} bytes")

    # Routing and errors

    def dispatch(self, head):
        """Parse the head, route the request and answer it; the one place where errors become responses."""
        self.requestline = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        try:
            self.accept(parse_request(head))
            action, arguments = self.route(self.http_request.path)
            action(*arguments)
        except HTTPError as error:
            self.send_error(error.status, error.message, headers=error.headers)
        except socket.timeout:
            self.send_error(408, f"the request body stalled for {self.timeout:g} seconds")
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as error:
            if self.server.settings.log_format == "json":
                log_json({"event": "error", "request_id": self.request_id, "message": f"unexpected error in {self.requestline!r}: {error!r}", "traceback": traceback.format_exc()})
            else:
                # log_error() escapes line breaks; the traceback follows on stderr as it is.
                self.log_error("unexpected error in %r: %r", self.requestline, error)
                sys.stderr.write(traceback.format_exc())
            self.send_error(500, "the server failed unexpectedly; its log has the details")

    def send_error(self, code, message=None, explain=None, headers=None):
        """Answer `{"message": ...}`, never an HTML page, also where the stdlib itself answers an error.

        When an answer has already begun, the connection is closed instead, as its framing is
        broken.
        """
        if self.response_started:
            self.close_connection = True
            return
        try:
            self.send_json(code, {"message": message or self.responses.get(code, ("error",))[0]}, headers)
        except OSError:
            self.close_connection = True

    def accept(self, request):
        """Take a parsed Request as the one being answered."""
        self.http_request = request
        self.command, self.path, self.request_version = request.method, request.target, request.version
        self.headers = request.headers
        self.body_is_consumed = not request.has_body
        self.request_id = client_request_id(request.headers) or self.server.new_request_id()

    def decide_keep_alive(self):
        """Decide, once per answer, whether the connection serves another request after it.

        It does when the client asked for it and the request's body has been read to its end:
        unread body bytes must not be parsed as the next request, and after a head that could not
        be parsed nothing on the connection can be trusted.
        """
        request = self.http_request
        self.close_connection = request is None or not request.keep_alive or not self.body_is_consumed

    def route(self, path):
        """Return the route method that answers this request and its arguments; 404 or 405 otherwise.

        With CORS on, OPTIONS is answered on every route.
        """
        if path == "/":
            actions, arguments, self.route_name = ROOT_ACTIONS, (), "/"
        elif path == "/healthz":
            actions, arguments, self.route_name = HEALTH_ACTIONS, (), "/healthz"
        elif path == "/metrics" and self.server.metrics.enabled:
            actions, arguments, self.route_name = METRICS_ACTIONS, (), "/metrics"
        elif path.startswith("/jobs/") and len(path) > len("/jobs/"):
            actions, arguments, self.route_name = JOB_ACTIONS, (urllib.parse.unquote(path[len("/jobs/"):]),), "/jobs/{id}"
        else:
            name = image_name_from_path(path)
            if name is None:
                raise HTTPError(404, f"there is nothing at {path[:200]!r}; images live at /<name> with an image extension")
            actions, arguments, self.route_name = IMAGE_ACTIONS, (self.server.store.resolve(name),), "/{name}"
        action = actions.get(self.command)
        if action is None:
            if self.command == "OPTIONS" and self.server.settings.cors_origin:
                return self.answer_options, (actions,)
            allowed = ", ".join(actions) + (", OPTIONS" if self.server.settings.cors_origin else "")
            raise HTTPError(405, f"{self.command} is not allowed here; use {allowed}", {"Allow": allowed})
        return getattr(self, action), arguments

    def allowed_origin(self):
        """Return what Access-Control-Allow-Origin answers this request's Origin: "*", the origin, or None.

        "*" goes on every answer, Origin or not: the same for everyone, it is what a shared cache may keep.
        """
        allowed = self.server.settings.cors_origin
        if allowed == ("*",):
            return "*"
        origin = self.headers.get("Origin")
        if not allowed or origin is None:
            return None
        return origin if origin.lower() in allowed else None

    # Routes

    def answer_options(self, actions):
        """OPTIONS, with CORS on: a preflight's answer (204) for an allowed origin; the methods allowed otherwise."""
        methods = ", ".join(actions)
        headers = {"Allow": f"{methods}, OPTIONS"}
        origin = self.allowed_origin()
        if origin is not None and "Access-Control-Request-Method" in self.headers:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Allow-Methods"] = methods
            requested = self.headers.get("Access-Control-Request-Headers", "").strip()
            if _HEADER_NAME_LIST.fullmatch(requested):
                headers["Access-Control-Allow-Headers"] = requested
            headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE)
            headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        self.send_head(204, headers)

    def show_health(self):
        """GET /healthz: 200 while this instance serves and can read and write its folder; 503 with the reason otherwise."""
        problem = "the server is stopping" if self.server.is_stopping else self.server.store.health()
        headers = {"Cache-Control": "no-store"}
        if problem is None:
            self.send_json(200, {"status": "ok"}, headers)
        else:
            self.send_json(503, {"status": "unavailable", "message": problem}, headers)

    def show_metrics(self):
        """GET /metrics: every count of the instance, in Prometheus' text format."""
        store = self.server.store
        gauges = []
        try:
            count, size = store.totals()
            gauges.append(("ims_images", "Images stored in the folder.", count))
            gauges.append(("ims_image_bytes", "Bytes of the images stored in the folder.", size))
            gauges.append(("ims_resize_queue_jobs", "Resize jobs accepted and not ended, in the folder's queue, of every instance.", store.unended_jobs()))
            gauges.append(("ims_rendition_cache_bytes", "Bytes of renditions the folder's cache holds.", store.cached_bytes()))
        except (HTTPError, OSError):
            # The folder is gone: /healthz says so; the counts of this instance are still worth reading.
            pass
        self.send_body(200, self.server.metrics.exposition(gauges), METRICS_CONTENT_TYPE, {"Cache-Control": "no-store"})

    def list_images(self):
        """GET / and HEAD /: the sorted JSON list of names, or a page of it; the page for people to a browser.

        Answers 200; 400 for a limit that is not a whole number from 1 to MAX_PAGE_SIZE, 507 when
        the storage folder is gone.
        """
        store = self.server.store
        limit, after = parse_page_query(self.http_request.query)
        if prefers_html(self.headers.get("Accept")):
            names = store.names()
            limit = limit or PAGE_SIZE
            chosen, has_more = page_of(names, limit, after)
            tiles = []
            for name in chosen:
                facts = store.facts(name)
                if facts is not None:
                    tiles.append(render_tile(name, facts))
            next_link = page_link(limit, chosen[-1]) if has_more else None
            headers = {"Vary": "Accept", "Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY,
                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
            self.send_body(200, render_page(tiles, len(names), next_link), "text/html; charset=utf-8", headers)
        elif limit is None and not after:
            self.send_body(200, store.listing(), "application/json", {"Vary": "Accept"})
        else:
            limit = limit or MAX_PAGE_SIZE
            chosen, has_more = page_of(store.names(), limit, after)
            headers = {"Vary": "Accept"}
            if has_more:
                headers["Link"] = f'<{page_link(limit, chosen[-1])}>; rel="next"'
            self.send_json(200, list(chosen), headers)

    def upload_image(self):
        """POST /: stream a multipart upload to a temp file, check it, publish it.

        Answers 201 with Location; 400 for a malformed or truncated body or no file part, 409 for a
        stored name, 411 without a length, 413 past --max-upload or --max-pixels, 415 for what is
        not multipart or not an allowed image matching its extension, 507 for a full disk.
        """
        settings = self.server.settings
        store = self.server.store
        if not self.http_request.is_chunked and "Content-Length" not in self.headers:
            raise HTTPError(411, "send the upload with a Content-Length or Transfer-Encoding: chunked")
        if self.http_request.content_length > settings.max_upload:
            raise HTTPError(413, f"the body has {self.http_request.content_length} bytes, more than the {settings.max_upload} allowed")
        media_type, parameters = parse_header_parameters(self.headers.get("Content-Type", ""))
        if media_type != "multipart/form-data":
            raise HTTPError(415, f"upload the image as multipart/form-data with a part named 'file', not as {media_type or 'nothing'!r}")
        if not parameters.get("boundary"):
            raise HTTPError(400, "the multipart/form-data Content-Type has no boundary")
        parser = MultipartParser(parameters["boundary"])
        upload = None
        name = None
        is_writing = False
        size = 0
        try:
            for data in self.read_body(settings.max_upload):
                for event in parser.feed(data):
                    if isinstance(event, PartData):
                        if is_writing:
                            upload.write(event.data)
                            size += len(event.data)
                    elif isinstance(event, PartStart):
                        if event.name == "file" and event.filename is not None and name is None:
                            name = self.checked_upload_name(event.filename)
                            upload = store.new_file(extension_of(name))
                            is_writing = True
                    else:
                        is_writing = False
            parser.close()
            if name is None:
                raise HTTPError(400, "the form has no part named 'file' carrying a filename")
            upload.finish()
            check_image(upload.path, extension_of(name), settings.max_pixels)
            store.publish(upload, name)
        finally:
            if upload is not None:
                upload.remove()
        self.server.metrics.add("uploads")
        self.server.metrics.add("upload_bytes", size)
        self.send_json(201, "Image successfully uploaded", {"Location": "/" + urllib.parse.quote(name)})

    def checked_upload_name(self, filename):
        """Return the safe name for an uploaded file name; 400, 415 or 409 when it cannot be stored."""
        if not filename:
            raise HTTPError(400, "the file part has an empty filename; choose an image to upload")
        name = secure_filename(filename)
        # "фото.jpeg" is made safe as "jpeg": nothing but the extension is left of it.
        if not name or extension_of(filename.lower()) == "." + name.lower():
            raise HTTPError(400, f"nothing is left of the filename {filename!r} once made safe (ASCII letters, digits, - _ .); rename the file")
        if extension_of(name) not in FORMAT_BY_EXTENSION:
            raise HTTPError(415, f"{name!r} does not end in an image extension ({' '.join(IMAGE_EXTENSIONS)})")
        # Only an early answer, before the body is read: publishing decides exactly.
        if name in self.server.store:
            raise HTTPError(409, f"an image named {name!r} is already stored")
        return name

    def download_image(self, name):
        """GET and HEAD /<name>: the bytes, or a rendition, with validators, 304 and single ranges.

        Answers 200, 206 for a satisfiable single range, 304 when the client's copy is current;
        400 for an invalid rendition parameter, 404 for an unknown name, 416 for a range beyond the
        end; for a rendition also 422 for an image that cannot be rendered, 503 with Retry-After
        when the resize processes are busy or the render takes too long.
        """
        settings = self.server.settings
        store = self.server.store
        if is_facts_query(self.http_request.query):
            self.show_facts(name)
            return
        rendition = parse_rendition_query(self.http_request.query, settings.max_pixels, settings.rendition_sizes)
        if rendition is None:
            with store.open(name) as original:
                version = original.version
                headers = self.file_headers(name, version.etag, version.mtime_seconds)
                if headers is not None:
                    self.send_file(original, headers)
            return
        # A cached rendition is found by the original's version alone: the original is not opened.
        version = store.version(name)
        source_format = FORMAT_BY_CONTENT_TYPE.get(store.content_type(name, version))
        if source_format is None:
            raise HTTPError(422, f"{name!r} cannot be rendered: it is not a readable image of an allowed format")
        output_format = rendition.format or source_format
        entry = rendition.entry(version, source_format)
        if output_format != FORMAT_BY_EXTENSION[extension_of(name)]:
            name_shown = name[: -len(extension_of(name))] + EXTENSION_BY_FORMAT[output_format]
        else:
            name_shown = name
        headers = self.file_headers(name_shown, f'"{entry}"', version.mtime_seconds)
        if headers is not None:
            content_type = OUTPUT_CONTENT_TYPES[output_format]
            with self.server.renditions.open(name, version, rendition, entry, content_type) as rendered:
                self.send_file(rendered, headers)

    def show_facts(self, name):
        """GET /<name>?facts: what the image's header tells, as JSON; 404 for an unknown name, 422 for no readable image."""
        found = self.server.store.facts(name)
        if found is None:
            raise HTTPError(404, f"no image named {name!r} is stored")
        version, facts = found
        if facts is None:
            raise HTTPError(422, f"{name!r} is not a readable image of an allowed format")
        described = {
            "name": name,
            "format": facts["format"],
            "content_type": facts["content_type"],
            "bytes": version.size,
            "etag": version.etag,
            "last_modified": format_http_date(version.mtime_seconds),
        }
        described.update(facts)
        self.send_json(200, described, {"Cache-Control": "no-cache"})

    def file_headers(self, name, etag, mtime_seconds):
        """Return the headers of a file served as `name`; None when 304 has answered the request."""
        headers = {
            "ETag": etag,
            "Last-Modified": format_http_date(mtime_seconds),
            "Cache-Control": "no-cache",
            "Content-Disposition": content_disposition(name),
            "Accept-Ranges": "bytes",
        }
        if is_not_modified(self.headers, etag, mtime_seconds):
            self.send_head(304, headers)
            return None
        return headers

    def send_file(self, stored, headers):
        """Send the StoredFile `stored` with `headers` from file_headers(): whole, or the single range asked for."""
        size = stored.version.size
        byte_range = None
        if_range = self.headers.get("If-Range")
        if if_range is None or if_range.strip() in (headers["ETag"], headers["Last-Modified"]):
            byte_range = parse_range(self.headers.get("Range"), size)
        headers["Content-Type"] = stored.content_type
        if byte_range is None:
            start, length, status = 0, size, 200
        else:
            start, length, status = byte_range[0], byte_range[1] - byte_range[0] + 1, 206
            headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{size}"
        headers["Content-Length"] = str(length)
        algorithm = wanted_digest(self.headers) if "Want-Repr-Digest" in self.headers else None
        if algorithm is not None:
            headers["Repr-Digest"] = repr_digest(algorithm, self.server.store.digest(stored, algorithm))
        self.send_head(status, headers)
        if self.command != "HEAD":
            self.send_file_range(stored, start, length)

    def delete_image(self, name):
        """DELETE /<name>: remove it, unless If-Match names another version; cancel its resizes.

        Answers 204; 404 for an unknown name, 412 when If-Match names another version, 507 when
        the folder is not writable.
        """
        if_match = self.headers.get("If-Match")

        def check_if_match(version):
            if if_match is not None and not is_etag_match(if_match, version.etag, weak=False):
                raise HTTPError(412, f"{name!r} has changed: its ETag is now {version.etag}; nothing was deleted")

        # Cancelled under the store's lock, so an upload of the same name that follows keeps its resizes.
        cancelled = self.server.store.remove(name, check_if_match, functools.partial(self.server.resizer.cancel_for, name))
        for record in cancelled:
            try:
                job = Job.from_record(record)
            except ValueError:
                # A damaged record, cancelled all the same: nothing to count it by.
                continue
            self.server.job_ended(job, None)
        self.send_no_content()

    def request_resize(self, name):
        """PATCH /<name>: check the parameters and queue a resize job.

        Answers 202 with the job's Location; 400 for a missing or invalid parameter or a result
        over --max-pixels, 404 for an unknown name, 412 when If-Match names another version, 413
        for a body over MAX_PARAMETERS_BYTES, 503 with Retry-After when the queue is full, 507
        when the job cannot be recorded in the folder.
        """
        settings = self.server.settings
        with self.server.store.open(name) as stored:
            body = b"".join(self.read_body(MAX_PARAMETERS_BYTES))
            width, height, fit = parse_resize_params(
                self.http_request.query, body, self.headers.get("Content-Type", ""), settings.max_pixels
            )
            if fit == "contain":
                with stored.reader() as file:
                    source_size = upright_size(file)
                # An unreadable image is refused by its job, which says why.
                if source_size is not None:
                    check_result_pixels(*fitted_size(source_size, width, height, fit), settings.max_pixels)
            version = stored.version
        if_match = self.headers.get("If-Match")
        expected_version = None
        if if_match is not None:
            if not is_etag_match(if_match, version.etag, weak=False):
                raise HTTPError(412, f"{name!r} has changed: its ETag is now {version.etag}; nothing was queued")
            # The resize must start from the version the client checked, not from a later one.
            expected_version = version
        job = self.server.resizer.submit(name, width, height, fit, expected_version)
        self.send_json(202, "Image resize command received", {"Location": f"/jobs/{job.id}"})

    def show_job(self, job_id):
        """GET /jobs/<id>: the job's state, after waiting up to ?wait= seconds for it to end.

        Answers 200 with the job's JSON; 400 for a wait that is not a number of seconds, 404 for
        an unknown or forgotten job.
        """
        wait_text = urllib.parse.parse_qs(self.http_request.query).get("wait", ["0"])[-1]
        try:
            wait_seconds = float(wait_text)
        except ValueError:
            wait_seconds = -1.0
        if not 0 <= wait_seconds < float("inf"):
            raise HTTPError(400, f"wait must be a number of seconds from 0 to {MAX_JOB_WAIT_SECONDS}, not {wait_text!r}")
        self.send_json(200, self.server.resizer.wait(job_id, min(wait_seconds, MAX_JOB_WAIT_SECONDS)))

    # Reading

    def read_body(self, limit_bytes):
        """Yield the request body in pieces of at most READ_CHUNK_SIZE bytes.

        Sends 100 Continue first when the client waits for it. Raises HTTPError(413) past
        `limit_bytes`, HTTPError(400) for a truncated or malformed body, socket.timeout (408) when
        the client is silent for the timeout.
        """
        if self.body_is_consumed:
            return
        content_length = self.http_request.content_length
        if content_length > limit_bytes:
            raise HTTPError(413, f"the body has {content_length} bytes, more than the {limit_bytes} allowed")
        digests = BodyDigests(self.headers)
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        pieces = self._read_chunked(limit_bytes) if self.http_request.is_chunked else self._read_sized(content_length)
        for data in pieces:
            self.bytes_received += len(data)
            if digests:
                digests.update(data)
            yield data
        self.body_is_consumed = True
        digests.check()

    def _read_sized(self, content_length):
        remaining = content_length
        while remaining:
            data = self.rfile.read1(min(remaining, READ_CHUNK_SIZE))
            if not data:
                raise HTTPError(400, f"the body ended after {content_length - remaining} of {content_length} bytes")
            remaining -= len(data)
            yield data

    def _read_chunked(self, limit_bytes):
        decoder = ChunkedDecoder()
        total = 0
        while not decoder.done:
            # peek, then consume only what the decoder used: bytes after the last chunk are the
            # next request's.
            data = self.rfile.peek(READ_CHUNK_SIZE)
            if not data:
                decoder.close()
            decoded = decoder.feed(data)
            self.rfile.read(len(data) - len(decoder.unused))
            total += len(decoded)
            if total > limit_bytes:
                raise HTTPError(413, f"the chunked body exceeds the {limit_bytes} bytes allowed")
            if decoded:
                yield decoded

    # Writing

    def send_head(self, status, headers):
        """Send the status line and headers, with the request's id and, with CORS on, what a browser needs; the body, if any, follows."""
        self.response_started = True
        self.status = status
        if self.request_id is None:
            self.request_id = self.server.new_request_id()
        lines = [
            f"HTTP/1.1 {status} {self.responses[status][0]}",
            f"Server: {self.server_version}",
            f"Date: {format_http_date(int(time.time()))}",
            f"X-Request-Id: {self.request_id}",
        ]
        if self.server.settings.cors_origin and "Access-Control-Allow-Origin" not in headers:
            self.add_cors_headers(headers)
        lines.extend(f"{key}: {value}" for key, value in headers.items())
        self.decide_keep_alive()
        if self.close_connection and not self.body_is_consumed:
            # The client may still be sending: read what it sends, so it gets this answer, not a reset.
            self.must_linger = True
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("latin-1")
        self.bytes_sent += len(head)
        self.wfile.write(head)

    def add_cors_headers(self, headers):
        # Answers differ by Origin unless every origin is allowed.
        origin = self.allowed_origin()
        if origin is not None:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
        if self.server.settings.cors_origin != ("*",):
            headers["Vary"] = f"{headers['Vary']}, Origin" if "Vary" in headers else "Origin"

    def send_body(self, status, body, content_type, headers=None):
        """Send a whole response whose body is in memory (not sent for HEAD)."""
        all_headers = dict(headers or {})
        all_headers["Content-Type"] = content_type
        all_headers["Content-Length"] = str(len(body))
        self.send_head(status, all_headers)
        if self.command != "HEAD":
            self.wfile.write(body)
            self.bytes_sent += len(body)
            self.body_bytes_sent += len(body)

    def send_json(self, status, value, headers=None):
        """Send `value` as JSON."""
        self.send_body(status, (json.dumps(value) + "\n").encode(), "application/json", headers)

    def send_no_content(self):
        """Send 204 with no body."""
        self.send_head(204, {})

    def send_file_range(self, stored, start, length):
        """Send `length` bytes of the StoredFile `stored` from `start`.

        A small file goes out with the headers in one write; a larger one with sendfile(), which
        spares copying it through Python.
        """
        try:
            if length <= READ_CHUNK_SIZE:
                data = stored.read(start, length)
                self.wfile.write(data)
                sent = len(data)
            else:
                self.wfile.flush()
                sent = stored.send(self.connection, start, length)
        except OSError as error:
            # A network filesystem's client that lost the file to another host's delete.
            if error.errno not in STALE_ERRNOS:
                raise
            sent = None
        if sent != length:
            # The file shrank or went under us (truncated in place, or lost): the framing is broken.
            self.close_connection = True
        self.bytes_sent += sent or 0
        self.body_bytes_sent += sent or 0

    def linger(self):
        """Close after an early answer without resetting: read and drop what the client still sends."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.connection.recv(READ_CHUNK_SIZE):
                    break
        except OSError:
            pass



# ====
# Server and command line
# ====
# Owns the listening socket, the connection threads, start-up and shutdown, and turning flags and
# environment variables into Settings.


class Server(http.server.ThreadingHTTPServer):
    """The HTTP server: settings, store and resizer, one thread per connection."""

    daemon_threads = False
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, settings, quiet=False, listener=None, supervisor_pid=None, metrics=None, block=0):
        self.settings = settings
        self.supervisor_pid = supervisor_pid
        self.quiet = quiet
        # With --workers, the instance's Metrics, made by the supervisor, and this worker's block of it.
        self.metrics = metrics or Metrics(enabled=settings.metrics)
        self.metrics.use_block(block)
        # Made request ids: random per process (each worker makes its own), then counted, which
        # costs no system call per request.
        self._request_id_prefix = secrets.token_hex(8)
        self._request_numbers = itertools.count()
        self.store = Store(settings.storage, settings.cache_size, functools.partial(self.metrics.add, "cache_evictions"))
        self.store.scan()
        allow_pixels(settings.max_pixels)
        self.connection_slots = threading.BoundedSemaphore(settings.max_connections)
        self._handlers_lock = threading.Lock()
        self._handlers = set()
        self._connection_threads = set()
        self._is_stopping = False
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        self.resizer = Resizer(
            self.store,
            settings.resize_workers,
            settings.max_queue,
            settings.resize_timeout,
            settings.max_pixels,
            self.metrics,
            self.job_ended,
            self.log_event,
        )
        self.renditions = Renditions(self.store, self.resizer, settings.max_pixels, self.metrics)
        try:
            super().__init__((settings.host, settings.port), Handler, bind_and_activate=listener is None)
        except BaseException:
            # TCPServer has already called server_close() when binding failed; this covers the rest.
            self.resizer.stop()
            raise
        if listener is not None:
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()
            self.server_name, self.server_port = self.server_address[:2]

    def server_bind(self):
        # Each of several workers listens on the port with its own socket; the kernel spreads
        # new connections among them.
        if self.settings.workers > 1:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a host without DNS.
        socketserver_bind = http.server.socketserver.TCPServer.server_bind
        socketserver_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        # Past max_connections, leave new connections in the listen backlog rather than accept them.
        if not self.connection_slots.acquire(timeout=0.5):
            raise OSError("every connection slot is busy")
        try:
            return self.socket.accept()
        except BaseException:
            self.connection_slots.release()
            raise

    def shutdown_request(self, request):
        try:
            super().shutdown_request(request)
        finally:
            self.connection_slots.release()

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address))
        with self._handlers_lock:
            self._connection_threads.add(thread)
        thread.start()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._handlers_lock:
                self._connection_threads.discard(threading.current_thread())

    @property
    def is_stopping(self):
        """Tell whether the server has begun to stop."""
        return self._is_stopping

    def new_request_id(self):
        """Return a request id of 32 hex digits that no other request to any instance gets."""
        return f"{self._request_id_prefix}{next(self._request_numbers):016x}"

    def job_ended(self, job, seconds):
        """Count a Job this instance ended, and log it in the JSON format; `seconds` its resize process ran, or None."""
        self.metrics.count_job_end(job.state)
        if not self.quiet and self.settings.log_format == "json":
            log_json({"event": "job", "job": job.id, "image": job.image, "state": job.state, "error": job.error,
                           "duration": None if seconds is None else round(seconds, 6)})

    def log_event(self, event, message, details=None):
        """Log what is not a request, in the server's log format."""
        log_event(self.settings.log_format, event, message, details)

    def track_handler(self, handler, is_open):
        """Remember the open connections, so stopping can close the idle ones."""
        with self._handlers_lock:
            if is_open:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def mark_idle(self, handler):
        """Mark a connection as waiting for its next request; False when the server is stopping."""
        with self._handlers_lock:
            handler.is_idle = not self._is_stopping
            return handler.is_idle

    def server_close(self):
        """Stop: close the listener, stop resizes, finish requests in flight, remove temp files."""
        super().server_close()
        with self._handlers_lock:
            self._is_stopping = True
        self._cut_connections(only_idle=True)
        self.resizer.stop()
        with self._handlers_lock:
            threads = list(self._connection_threads)
        # Requests in flight get one more --timeout to finish; then their connections are cut.
        deadline = time.monotonic() + self.settings.timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._cut_connections(only_idle=False)
        for thread in threads:
            thread.join()
        try:
            self.store.remove_leftovers()
        except OSError as error:
            # The folder went while serving: nothing of it is left to clean.
            self.log_event("error", f"cannot remove leftovers from {self.settings.storage}: {error.strerror or error}")

    def _cut_connections(self, only_idle):
        # Shutting a socket down wakes the thread blocked reading it.
        with self._handlers_lock:
            for handler in self._handlers:
                if handler.is_idle or not only_idle:
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def service_actions(self):
        # A worker whose supervisor was killed stops, rather than serve on unsupervised.
        if self.supervisor_pid is not None and os.getppid() != self.supervisor_pid:
            self.supervisor_pid = None
            os.kill(os.getpid(), signal.SIGTERM)

    def handle_error(self, request, client_address):
        self.log_event("error", f"unexpected error serving {client_address}", traceback.format_exc())


# One line of JSON is written whole, whichever threads log at once.
_LOG_LOCK = threading.Lock()


def log_json(fields):
    """Write `fields` on a line of stderr as one JSON object, after the time."""
    line = json.dumps({"time": _iso_time(time.time()), **fields}) + "\n"
    with _LOG_LOCK:
        sys.stderr.write(line)
        sys.stderr.flush()


def log_event(log_format, event, message, details=None):
    """Log what is not a request: "ims.py: <message>" and the details (a traceback) as they are, or a JSON object."""
    if log_format == "json":
        log_json({"event": event, "message": message, **({"traceback": details} if details else {})})
    else:
        sys.stderr.write(f"ims.py: {message}\n{details or ''}")


def make_server(storage, host="127.0.0.1", port=5000, quiet=False, **options):
    """Return a Server for `storage`, already listening; run it with serve_forever().

    `options` are the other Settings fields (max_upload=..., timeout=...); `quiet` silences the
    per-request log lines. Raises ValueError for an invalid option, OSError when the address is
    taken.
    """
    settings = Settings(host=host, port=port, storage=os.path.abspath(storage), **options)
    return Server(settings, quiet=quiet)


# flag, type, help; the environment variable is IMS_ + the flag in capitals. Settings checks ranges.
OPTIONS = (
    ("--host", str, "interface to bind; 0.0.0.0 serves other hosts (there is no authentication)"),
    ("--port", int, "port to listen on; 0 picks a free one"),
    ("--storage", str, "folder that holds the images; created if missing"),
    ("--max-upload", int, "largest request body accepted for an upload, in bytes"),
    ("--max-pixels", int, "largest image (width x height) accepted, uploaded or produced"),
    ("--resize-workers", int, "resize processes running at once; more wait in a queue"),
    ("--max-queue", int, "resizes waiting beyond the running ones; past it PATCH answers 503"),
    ("--resize-timeout", float, "seconds after which a resize process is killed and its job fails"),
    ("--timeout", float, "seconds a client may take to send its request head, or stay silent"),
    ("--max-connections", int, "connections served at once; more wait in the listen backlog"),
    ("--workers", int, "serving processes on one port, restarted when they die"),
    ("--cache-size", int, "bytes of rendered renditions kept on disk; 0 keeps none"),
    ("--rendition-sizes", str, "the only rendition sizes served, like 200x200,1200x0 (0: follows the aspect ratio); any by default"),
    ("--cors-origin", tuple, "an origin whose pages may read answers (CORS), like https://app.example; repeatable, or *"),
    ("--log-format", str, "common (Common Log Format) or json (one object per line)"),
    ("--metrics", "switch", "on or off: GET /metrics and the counting behind it"),
)


def _switch(text):
    # "on" or "off", as --metrics takes them, also from IMS_METRICS.
    if text.lower() in ("on", "off"):
        return text.lower() == "on"
    raise argparse.ArgumentTypeError(f"invalid value {text!r}: use on or off")


def parse_args(argv, environ):
    """Return the Settings that command-line flags, then IMS_* environment variables, then defaults give."""
    parser = argparse.ArgumentParser(
        prog="ims.py",
        description="IMS: a tiny image store with resizing, served over HTTP.",
        epilog="Every option falls back to its environment variable (IMS_HOST, IMS_PORT, ...).",
    )
    parser.add_argument("--version", action="version", version=f"IMS {__version__}")
    defaults = Settings()
    for flag, value_type, help_text in OPTIONS:
        field = flag[2:].replace("-", "_")
        variable = "IMS_" + field.upper()
        default = environ.get(variable) or getattr(defaults, field)
        shown_default = {"rendition_sizes": "any", "cors_origin": "off", "metrics": "on"}.get(field, getattr(defaults, field))
        if value_type is tuple:
            # Repeatable: the flags given replace the variable's list.
            options = {"action": "append", "default": None}
        else:
            options = {"type": _switch if value_type == "switch" else value_type, "default": default}
        parser.add_argument(
            flag, metavar=variable.replace("IMS_", ""), help=f"{help_text} (env {variable}, default {shown_default})", **options,
        )
    values = vars(parser.parse_args(argv))
    if values["cors_origin"] is None:
        values["cors_origin"] = environ.get("IMS_CORS_ORIGIN", "")
    values["storage"] = os.path.abspath(values["storage"])
    try:
        return Settings(**values)
    except ValueError as error:
        parser.error(str(error))


def serve(server):
    """Serve until SIGINT or SIGTERM, then stop cleanly."""

    def stop(signal_number, frame):
        # shutdown() waits for serve_forever() to return, which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def print_serving(settings, address):
    """Print the one start-up line the contract promises, flushed."""
    host, port = address[:2]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"IMS serving {settings.storage} on http://{shown_host}:{port}", flush=True)


# Linux spreads connections among sockets listening on one port with SO_REUSEPORT; elsewhere (BSD,
# macOS) the option exists but one socket gets them all, so workers share one listening socket.
REUSE_PORT_BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
# A worker that dies sooner than this after its start is restarted only after this long, so a
# worker that cannot start does not spin.
WORKER_RESTART_SECONDS = 1.0


def _reserve_port(settings):
    # Binds the port for the workers, so --port 0 picks one port for all of them. With SO_REUSEPORT
    # this socket never listens: it only keeps the port while workers come and go.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    port = settings.port
    if REUSE_PORT_BALANCES:
        # Bound first without SO_REUSEPORT, which fails while any socket holds the port: a second
        # IMS started on it by mistake is refused rather than quietly given half the connections.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, port))
            port = probe.getsockname()[1]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if REUSE_PORT_BALANCES:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((settings.host, port))
        if not REUSE_PORT_BALANCES:
            listener.listen(LISTEN_BACKLOG)
            # Every worker waits on it; those that lose the race for a connection must not block.
            listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _run_worker(settings, listener, ready_descriptor, metrics, block):
    # In a forked worker: serve until told to stop; the exit status of the worker process.
    try:
        server = Server(settings, listener=None if REUSE_PORT_BALANCES else listener, supervisor_pid=os.getppid(), metrics=metrics, block=block)
    except OSError as error:
        log_event(settings.log_format, "error", f"worker {os.getpid()} cannot serve on {settings.host}:{settings.port}: {error}")
        return 1
    try:
        os.write(ready_descriptor, b"+")
        os.close(ready_descriptor)
    except OSError:
        pass
    serve(server)
    return 0


def _describe_exit(status):
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"was killed by {signal.Signals(number).name}"
        except ValueError:
            return f"was killed by signal {number}"
    return f"exited with status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"


def serve_workers(settings):
    """Run `settings.workers` serving processes on one port until SIGINT or SIGTERM; return the exit status.

    The calling process supervises them: it prints the start-up line once every worker listens,
    restarts a worker that dies (and logs it), and on SIGINT or SIGTERM stops them all cleanly.
    Resize slots are shared by every process on the host through the folder's lock files.
    """
    try:
        listener = _reserve_port(settings)
    except OSError as error:
        log_event(settings.log_format, "error", f"cannot serve on {settings.host}:{settings.port}: {error}")
        return 1
    settings = dataclasses.replace(settings, port=listener.getsockname()[1])
    # Every worker counts in its own block of these; a restarted one in its predecessor's.
    metrics = Metrics(settings.workers, settings.metrics)
    metrics.supervisor_pid = os.getpid()
    # pid → (start time, block)
    workers = {}
    is_stopping = False
    stop_signals = {signal.SIGINT, signal.SIGTERM}

    def stop(signal_number, frame):
        nonlocal is_stopping
        is_stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    def start_worker(block):
        reader, writer = os.pipe()
        # Signals wait until the worker has its own handlers and the supervisor knows the worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(reader)
                for number in stop_signals:
                    signal.signal(number, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                status = _run_worker(settings, listener, writer, metrics, block)
            except BaseException:
                log_event(settings.log_format, "error", f"worker {os.getpid()} failed", traceback.format_exc())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        workers[pid] = (time.monotonic(), block)
        os.close(writer)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        return reader

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    readers = [start_worker(block) for block in range(settings.workers)]
    is_ready = True
    for reader in readers:
        is_ready = is_ready and os.read(reader, 1) == b"+"
        os.close(reader)
    if is_ready:
        print_serving(settings, listener.getsockname())
    else:
        stop(None, None)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        worker = workers.pop(pid, None)
        if worker is None or is_stopping:
            continue
        started, block = worker
        log_event(settings.log_format, "worker", f"worker {pid} {_describe_exit(status)}; restarting it")
        if time.monotonic() - started < WORKER_RESTART_SECONDS:
            time.sleep(WORKER_RESTART_SECONDS)
        if not is_stopping:
            os.close(start_worker(block))
    listener.close()
    return 0 if is_ready else 1


def main(argv=None):
    """Run IMS until SIGINT or SIGTERM; return the exit status."""
    settings = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    for warning in mount_warnings(mount_of(settings.storage)):
        log_event(settings.log_format, "warning", f"warning: {warning}")
    if settings.workers > 1:
        return serve_workers(settings)
    try:
        server = Server(settings)
    except OSError as error:
        log_event(settings.log_format, "error", f"cannot serve on {settings.host}:{settings.port}: {error}")
        return 1
    print_serving(settings, server.server_address)
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
