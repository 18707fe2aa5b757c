"""Tests for ims.py: python3 -m unittest -v

Unit tests of the pure parts first, then one class per endpoint against an in-process server,
then the real `python3 ims.py` process. Every fixture image is made here with Pillow.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import functools
import hashlib
import html
import http.client
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import warnings
from unittest import mock

from PIL import Image
from PIL import ImageCms
from PIL import ImageOps
from PIL import PngImagePlugin

import ims

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240501


def setUpModule():
    # IMS forks its resize processes from the threaded server on purpose (README, "Resize
    # processes"); Python 3.12 and later warn about every such fork. Set here, after unittest
    # has installed its own warning filters.
    warnings.filterwarnings("ignore", r"This process .* is multi-threaded, use of fork", DeprecationWarning)


# ====
# Helpers
# ====


@dataclasses.dataclass
class Reply:
    """A whole HTTP response."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def message(self):
        return self.json["message"]


def multipart_body(files=(), fields=(), boundary="ims-test-boundary"):
    """Encode a multipart/form-data body; `files` are (field, filename, bytes), `fields` (name, value)."""
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() if isinstance(value, str) else value)
        out.write(b"\r\n")
    for field, filename, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def make_image(fmt="JPEG", size=(64, 48), color=(200, 30, 30), orientation=None, frames=1, mode="RGB", icc=None):
    """Return the bytes of an image made with Pillow: a left half in `color`, a right half blue.

    The halves make orientation visible in the pixels; `orientation` sets the EXIF tag.
    """
    images = []
    for index in range(frames):
        image = Image.new("RGB", size, color)
        image.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
        image.paste((20, 200, 20), (0, 0, max(1, size[0] // 8), max(1, size[1] // 8 + index)))
        images.append(image.convert(mode) if mode != "RGB" else image)
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    if icc is not None:
        options["icc_profile"] = icc
    if frames > 1:
        options.update(save_all=True, append_images=images[1:], duration=[100 + 10 * i for i in range(frames)], loop=0)
    out = io.BytesIO()
    images[0].save(out, format=fmt, **options)
    return out.getvalue()


def feed_all_ways(parser_factory, data, finish):
    """Feed `data` to fresh parsers in every way of splitting it; return the one result.

    Whole, one byte at a time, split at every position, and in seeded random pieces. `finish`
    turns (parser, outputs of feed) into a comparable result; all ways must agree.
    """
    splits = [[data], [data[i:i + 1] for i in range(len(data))]]
    splits += [[data[:i], data[i:]] for i in range(1, len(data))]
    rng = random.Random(SEED)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8)))) if len(data) > 1 else []
        bounds = [0] + cuts + [len(data)]
        splits.append([data[a:b] for a, b in zip(bounds, bounds[1:])])
    results = []
    for pieces in splits:
        parser = parser_factory()
        outputs = [parser.feed(piece) for piece in pieces]
        results.append(finish(parser, outputs))
    for result in results[1:]:
        assert result == results[0], (result, results[0])
    return results[0]


# The states of a job that has ended, as the contract spells them.
ENDED_STATES = ("done", "failed", "cancelled")

# How long a test waits for something that should happen at once (an answer, a close, a job's
# end, a file to appear) before it fails. Generous, so that a loaded machine never trips it; a test
# that passes never waits it out.
DEADLINE_SECONDS = 30


def wait_for(predicate, timeout=DEADLINE_SECONDS):
    """Return once `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        threading.Event().wait(0.01)


def folder_files(storage):
    """Return the sorted names in a storage folder, but for the hidden folder of shared state."""
    return sorted(name for name in os.listdir(storage) if name != ims.STATE_FOLDER)


def dead_pid():
    """Return the process id of a process that has exited (a writer that is gone)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def start_server(test, storage, **options):
    """Return an in-process server on a free port for `storage`, serving; `test` stops it at cleanup.

    The socket listens as soon as make_server() returns, so there is nothing to wait for.
    """
    server = ims.make_server(storage, host="127.0.0.1", port=0, quiet=True, **options)
    # serve_forever() checks for shutdown() every poll_interval; 0.5 s would slow every test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return server


class ServerTestCase(unittest.TestCase):
    """Each test gets its own storage folder and an in-process server on a free port."""

    server_options = {}

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        self.prepare_storage()
        self.server = start_server(self, self.storage, **self.server_options)
        self.host, self.port = self.server.server_address[:2]

    def prepare_storage(self):
        """Ready the storage folder before the server starts; make_server() creates it if missing."""

    def connect(self, address=None):
        """Return a new connection to this server (or to `address`), closed at cleanup."""
        # Longer than any ?wait= a test asks for, so the server always answers first.
        connection = http.client.HTTPConnection(*(address or (self.host, self.port)), timeout=2 * DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        return connection

    def request(self, method, path, body=None, headers=None, connection=None):
        """Send one request on a new (or the given) connection and return the whole Reply."""
        connection = connection or self.connect()
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())

    def upload(self, name, data, connection=None):
        body, content_type = multipart_body(files=[("file", name, data)])
        return self.request("POST", "/", body, {"Content-Type": content_type}, connection)

    def raw_exchange(self, data):
        """Send raw bytes on a new connection; return everything the server answers until it closes."""
        with socket.create_connection((self.host, self.port), timeout=DEADLINE_SECONDS) as sock:
            sock.sendall(data)
            return self.read_until_close(sock)

    def read_until_close(self, sock):
        """Return everything the server sends on `sock` until it closes the connection.

        A server that neither sends nor closes for the socket's timeout fails the test, showing
        what it had sent by then.
        """
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                self.fail(f"the connection is still open after {sock.gettimeout()} s of silence; "
                          f"answered so far: {b''.join(chunks)[:300]!r}")
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def stored_files(self):
        """Return the files in the storage folder, but for the hidden folder of shared state."""
        return sorted(name for name in os.listdir(self.storage) if name != ims.STATE_FOLDER)

    def temp_files(self):
        """Return the hidden temp files in the storage folder (an upload or resize in progress)."""
        return [name for name in os.listdir(self.storage) if name.startswith(ims.TEMP_PREFIX)]

    def assertNoTempFiles(self):
        self.assertEqual(self.temp_files(), [])

    def assertError(self, reply, status, words):
        """The reply is `status` with a JSON body of exactly {"message": <text>}, the text holding `words`.

        `words` (a string or a tuple of strings) is what the contract, the README or the style
        guide's rule "name the bad value" fixes of the message: the parameter, the name, the limit.
        None checks the shape only, for a message of which nothing is fixed (a 500's).
        """
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        body = json.loads(reply.body)
        self.assertIsInstance(body, dict, reply.body)
        self.assertEqual(set(body), {"message"}, reply.body)
        self.assertIsInstance(body["message"], str, reply.body)
        self.assertTrue(body["message"].strip(), "the message is empty")
        for word in (words,) if isinstance(words, str) else words or ():
            self.assertTrue(word, "an empty word is in every message")
            self.assertIn(word, body["message"])

    def wait_job(self, location):
        """Return the JSON of the job at `location` once it has ended, waiting with ?wait=."""
        reply = self.request("GET", f"{location}?wait={DEADLINE_SECONDS}")
        self.assertEqual(reply.status, 200, reply.body)
        self.assertIn(reply.json["state"], ENDED_STATES, reply.json)
        return reply.json


# ====
# Unit tests: names, parsers, parameters
# ====


BOUNDARY = "ims-test-boundary"  # multipart_body's default
MAX_PIXELS = 90000000  # the contract's default --max-pixels
FORM = "application/x-www-form-urlencoded"




def multipart_events(parser, outputs):
    """Finish a MultipartParser for feed_all_ways: close it, return its events as a tuple.

    Consecutive PartData are joined (and empty ones dropped), so every way of splitting the body
    compares equal.
    """
    parser.close()
    events = []
    for event in itertools.chain.from_iterable(outputs):
        if isinstance(event, ims.PartData):
            if not event.data:
                continue
            if events and isinstance(events[-1], ims.PartData):
                event = ims.PartData(events.pop().data + event.data)
        events.append(event)
    return tuple(events)


def chunked_output(decoder, outputs):
    """Finish a ChunkedDecoder for feed_all_ways: close it, return (decoded bytes, unused bytes)."""
    decoder.close()
    return b"".join(outputs), decoder.unused


def outcome(parser_factory, pieces, finish):
    """Feed `pieces` to a fresh parser and finish it; return ("parsed", result) or ("refused", status).

    Only ims.HTTPError counts as a refusal; any other exception propagates, so the test reports it.
    """
    parser = parser_factory()
    try:
        outputs = [parser.feed(piece) for piece in pieces]
        return ("parsed", finish(parser, outputs))
    except ims.HTTPError as error:
        return ("refused", error.status)


def outcomes_all_ways(parser_factory, data, finish):
    """Return the set of outcomes of feeding `data` whole, one byte at a time and split at every position."""
    splits = [[data], [data[i:i + 1] for i in range(len(data))]]
    splits += [[data[:i], data[i:]] for i in range(1, len(data))]
    return {outcome(parser_factory, pieces, finish) for pieces in splits}


def mutate(rng, data):
    """Return `data` with one to three random byte flips, insertions, deletions, truncations or duplications."""
    data = bytearray(data)
    tokens = [b"\r\n", b"\r", b"\n", b"-", b"--", b";", b":", b" ", b"\t", b'"', b"0", b"f", b"\x00", b"\xff"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(5)
        position = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            insert = rng.choice(tokens) if rng.random() < 0.6 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            data[position:position] = insert
        elif kind == 2:
            del data[position:position + rng.randint(1, 8)]
        elif kind == 3:
            del data[position:]
        else:
            start = rng.randrange(len(data) + 1)
            data[position:position] = data[start:start + rng.randint(1, 24)]
    return bytes(data)


# ====
# Names and formats
# ====


class TestSecureFilename(unittest.TestCase):
    def test_werkzeug_examples_give_werkzeugs_answers(self):
        self.assertEqual(ims.secure_filename("My cool movie.mov"), "My_cool_movie.mov")
        self.assertEqual(ims.secure_filename("../../../etc/passwd"), "etc_passwd")
        self.assertEqual(ims.secure_filename("i contain cool \xfcml\xe4uts.txt"), "i_contain_cool_umlauts.txt")

    def test_safe_names_are_kept_as_they_are(self):
        for name in ("photo.png", "Photo-1_final.JPG", "a..b.png", "2024.05.01.tiff"):
            self.assertEqual(ims.secure_filename(name), name)

    def test_leading_dots_and_underscores_are_removed(self):
        self.assertEqual(ims.secure_filename(".bashrc"), "bashrc")
        self.assertEqual(ims.secure_filename("...hidden.png"), "hidden.png")
        self.assertEqual(ims.secure_filename("__init__.py"), "init__.py")
        self.assertEqual(ims.secure_filename("._.cat.gif"), "cat.gif")

    def test_names_with_nothing_safe_in_them_become_empty(self):
        for name in ("", "..", "../..", "/", "._.", "   ", "\u65e5\u672c\u8a9e", "\x00\x01"):
            self.assertEqual(ims.secure_filename(name), "", name)

    def test_runs_of_white_space_become_one_underscore(self):
        self.assertEqual(ims.secure_filename("a \t\n b.png"), "a_b.png")

    def test_directory_parts_never_survive(self):
        for name in ("../secret.png", "/etc/passwd", "..\\..\\evil.png", "a/../../b.png", "C:\\photos\\cat.png"):
            safe = ims.secure_filename(name)
            self.assertNotIn("/", safe, name)
            self.assertNotIn("\\", safe, name)
            self.assertFalse(safe.startswith("."), name)
        self.assertEqual(ims.secure_filename("..\\..\\evil.png"), "evil.png")

    def test_result_is_ascii(self):
        self.assertEqual(ims.secure_filename("caf\xe9 \u20ac.png"), "cafe_.png")

    def test_plain_path_names_its_image(self):
        self.assertEqual(ims.image_name_from_path("/cat.png"), "cat.png")

    def test_path_is_percent_decoded_as_utf8(self):
        self.assertEqual(ims.image_name_from_path("/my%20cat.png"), "my cat.png")
        self.assertEqual(ims.image_name_from_path("/caf%C3%A9.png"), "caf\xe9.png")

    def test_every_image_extension_is_accepted_in_any_case(self):
        for extension in ims.IMAGE_EXTENSIONS:
            for name in ("cat" + extension, "CAT" + extension.upper(), "Cat" + extension.title()):
                self.assertEqual(ims.image_name_from_path("/" + name), name)

    def test_traversal_names_nothing(self):
        for path in ("/../etc/passwd", "/../secret.png", "/..%2Fsecret.png", "/%2e%2e%2fsecret.png",
                     "/%2E%2E/secret.png", "/a/b.png", "/a%2Fb.png", "/a%2fb.png", "/cat.png/", "//cat.png"):
            self.assertIsNone(ims.image_name_from_path(path), path)

    def test_nul_and_control_characters_name_nothing(self):
        for path in ("/a%00.png", "/a\x00.png", "/a%0A.png", "/a%0D%0A.png", "/a%7F.png", "/cat.png%00.txt"):
            self.assertIsNone(ims.image_name_from_path(path), path)

    def test_backslash_names_nothing(self):
        for path in ("/a%5Cb.png", "/a\\b.png", "/..%5Csecret.png", "/..\\secret.png"):
            self.assertIsNone(ims.image_name_from_path(path), path)

    def test_leading_dot_names_nothing(self):
        for path in ("/.hidden.png", "/%2Ehidden.png", "/..png", "/.png", "/" + ims.TEMP_PREFIX + "1-x.png"):
            self.assertIsNone(ims.image_name_from_path(path), path)

    def test_non_utf8_percent_escapes_name_nothing(self):
        for path in ("/%FF.png", "/%C3.png", "/a%E9.png", "/%ED%A0%80.png", "/%C0%AE%C0%AE%C0%AFx.png"):
            self.assertIsNone(ims.image_name_from_path(path), path)

    def test_names_without_an_image_extension_name_nothing(self):
        for path in ("/cat", "/cat.txt", "/cat.png.exe", "/cat.", "/png", "/", "/jobs", "/cat.svg"):
            self.assertIsNone(ims.image_name_from_path(path), path)

    def test_path_without_leading_slash_names_nothing(self):
        self.assertIsNone(ims.image_name_from_path("cat.png"))
        self.assertIsNone(ims.image_name_from_path(""))

    def test_every_safe_upload_name_can_be_downloaded_by_its_path(self):
        uploads = ("My cool photo.JPG", "../../../etc/x.png", "caf\xe9.webp", "a..b.png", "__x__.gif", " x .tif")
        for filename in uploads:
            name = ims.secure_filename(filename)
            self.assertEqual(ims.image_name_from_path("/" + urllib.parse.quote(name)), name, filename)


# ====
# Body parsing
# ====


class TestMultipartParser(unittest.TestCase):
    def parse(self, body, boundary=BOUNDARY):
        return feed_all_ways(lambda: ims.MultipartParser(boundary), body, multipart_events)

    def test_one_file_gives_its_name_filename_type_and_bytes(self):
        data = make_image("PNG", (8, 6))
        body, _ = multipart_body(files=[("file", "photo.png", data)])
        self.assertEqual(self.parse(body), (
            ims.PartStart("file", "photo.png", "application/octet-stream"),
            ims.PartData(data),
            ims.PartEnd(),
        ))

    def test_fields_and_file_come_in_order(self):
        body, _ = multipart_body(files=[("file", "a.gif", b"GIF89a...")], fields=[("note", "hello"), ("tag", "")])
        self.assertEqual(self.parse(body), (
            ims.PartStart("note", None, "text/plain"), ims.PartData(b"hello"), ims.PartEnd(),
            ims.PartStart("tag", None, "text/plain"), ims.PartEnd(),
            ims.PartStart("file", "a.gif", "application/octet-stream"), ims.PartData(b"GIF89a..."), ims.PartEnd(),
        ))

    def test_preamble_and_epilogue_are_ignored(self):
        body, _ = multipart_body(files=[("file", "a.png", b"1234")])
        body = (b"This is the preamble, not --" + BOUNDARY.encode() + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n"
                + body + b"This is the epilogue.\r\n--" + BOUNDARY.encode() + b"--\r\n\r\nmore")
        self.assertEqual(self.parse(body), (
            ims.PartStart("file", "a.png", "application/octet-stream"), ims.PartData(b"1234"), ims.PartEnd(),
        ))

    def test_body_may_start_with_a_crlf_before_the_first_boundary(self):
        body, _ = multipart_body(fields=[("a", "b")])
        self.assertEqual(self.parse(b"\r\n" + body), (ims.PartStart("a", None, "text/plain"), ims.PartData(b"b"), ims.PartEnd()))

    def test_empty_file_has_no_data(self):
        body, _ = multipart_body(files=[("file", "empty.png", b"")])
        self.assertEqual(self.parse(body), (ims.PartStart("file", "empty.png", "application/octet-stream"), ims.PartEnd()))

    def test_binary_data_with_crlf_dashes_and_partial_boundaries_is_kept_exactly(self):
        delimiter = b"\r\n--" + BOUNDARY.encode()
        data = (bytes(range(256)) + b"\r\n--\r\n\r\n" + delimiter[:-1] + b"X--" + BOUNDARY.encode() + b"--"
                + b"\n--" + BOUNDARY.encode() + b"\r-" + delimiter[:-3] + b"\r\n\r")
        self.assertNotIn(delimiter, data)
        body, _ = multipart_body(files=[("file", "bin.png", data)])
        self.assertEqual(self.parse(body), (
            ims.PartStart("file", "bin.png", "application/octet-stream"), ims.PartData(data), ims.PartEnd(),
        ))

    def test_data_that_ends_like_a_delimiter_start_is_kept(self):
        for data in (b"\r", b"\r\n", b"\r\n-", b"\r\n--", b"\r\n--" + BOUNDARY.encode()[:-1]):
            body, _ = multipart_body(files=[("file", "a.png", data)])
            self.assertEqual(self.parse(body)[1], ims.PartData(data), data)

    def test_boundary_with_allowed_odd_characters_works(self):
        boundary = "a'()+_,-./:=? z"
        body, _ = multipart_body(files=[("file", "a.png", b"data")], boundary=boundary)
        self.assertEqual(self.parse(body, boundary), (
            ims.PartStart("file", "a.png", "application/octet-stream"), ims.PartData(b"data"), ims.PartEnd(),
        ))

    def test_boundary_of_seventy_characters_works(self):
        boundary = "b" * 70
        body, _ = multipart_body(fields=[("a", "1")], boundary=boundary)
        self.assertEqual(self.parse(body, boundary), (ims.PartStart("a", None, "text/plain"), ims.PartData(b"1"), ims.PartEnd()))

    def test_quoted_filename_with_escaped_quote_is_unquoted(self):
        body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="say \\"cheese\\".png"\r\n\r\n'
                f"x\r\n--{BOUNDARY}--\r\n").encode()
        self.assertEqual(self.parse(body)[0], ims.PartStart("file", 'say "cheese".png', "text/plain"))

    def test_filename_with_semicolon_inside_quotes_is_whole(self):
        body, _ = multipart_body(files=[("file", "a;b=c.png", b"x")])
        self.assertEqual(self.parse(body)[0].filename, "a;b=c.png")

    def test_utf8_filename_sent_raw_is_decoded(self):
        body, _ = multipart_body(files=[("file", "caf\xe9.png", b"x")])
        self.assertEqual(self.parse(body)[0].filename, "caf\xe9.png")

    def test_extended_filename_is_decoded_from_utf8(self):
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename*=UTF-8''%E2%82%AC%20rates.png\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode()
        self.assertEqual(self.parse(body)[0].filename, "\u20ac rates.png")

    def test_extended_filename_wins_over_plain_filename(self):
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"rates.png\"; "
                f"filename*=utf-8''%E2%82%AC.png\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode()
        self.assertEqual(self.parse(body)[0].filename, "\u20ac.png")

    def test_white_space_after_a_boundary_is_allowed(self):
        body = (f"--{BOUNDARY} \t \r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n"
                f"--{BOUNDARY}\t\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\n2\r\n--{BOUNDARY}--  \r\n").encode()
        self.assertEqual(self.parse(body), (
            ims.PartStart("a", None, "text/plain"), ims.PartData(b"1"), ims.PartEnd(),
            ims.PartStart("b", None, "text/plain"), ims.PartData(b"2"), ims.PartEnd(),
        ))

    def test_part_without_filename_has_filename_none(self):
        body, _ = multipart_body(fields=[("file", "not a file")])
        self.assertIsNone(self.parse(body)[0].filename)

    def test_empty_filename_is_kept_empty_not_none(self):
        body, _ = multipart_body(files=[("file", "", b"")])
        self.assertEqual(self.parse(body)[0].filename, "")

    def test_header_names_are_case_insensitive_and_content_type_is_kept(self):
        body = (f"--{BOUNDARY}\r\ncontent-DISPOSITION: form-data; name=file; filename=a.png\r\n"
                f"CONTENT-TYPE: image/png\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode()
        self.assertEqual(self.parse(body)[0], ims.PartStart("file", "a.png", "image/png"))

    def test_closing_boundary_split_between_its_two_dashes_is_accepted(self):
        body, _ = multipart_body(files=[("file", "a.png", b"data")])
        cut = body.rindex(b"--\r\n") + 1
        parser = ims.MultipartParser(BOUNDARY)
        events = parser.feed(body[:cut]) + parser.feed(body[cut:])
        parser.close()
        self.assertEqual(events[-1], ims.PartEnd())

    def test_part_headers_of_exactly_the_limit_are_accepted_however_split(self):
        head = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\nX-Padding: '
        head += b"p" * (ims.MAX_PART_HEADER_BYTES - len(head))
        body = f"--{BOUNDARY}\r\n".encode() + head + f"\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()
        self.assertEqual(self.parse(body)[0].filename, "a.png")

    def test_body_bytes_are_handed_on_as_they_arrive(self):
        parser = ims.MultipartParser(BOUNDARY)
        head, _ = multipart_body(files=[("file", "a.png", b"")])
        events = parser.feed(head[:head.index(b"\r\n\r\n") + 4])
        data = random.Random(SEED).getrandbits(800000).to_bytes(100000, "little").replace(b"\r", b"")
        events += parser.feed(data)
        handed_on = sum(len(event.data) for event in events if isinstance(event, ims.PartData))
        self.assertGreater(handed_on, len(data) - len(BOUNDARY) - 4)


class TestMultipartParserRejects(unittest.TestCase):
    def assertRefusedAllWays(self, body, boundary=BOUNDARY):
        outcomes = outcomes_all_ways(lambda: ims.MultipartParser(boundary), body, multipart_events)
        self.assertEqual(outcomes, {("refused", 400)}, body[:200])

    def test_missing_closing_boundary_is_refused_on_close(self):
        body, _ = multipart_body(files=[("file", "a.png", b"data")])
        for truncated in (body[:-len(f"--{BOUNDARY}--\r\n")], body[:-5], body[:40], b"", b"no boundary at all"):
            parser = ims.MultipartParser(BOUNDARY)
            parser.feed(truncated)
            with self.assertRaises(ims.HTTPError) as caught:
                parser.close()
            self.assertEqual(caught.exception.status, 400)
            self.assertRefusedAllWays(truncated)

    def test_bytes_after_close_are_refused(self):
        body, _ = multipart_body(fields=[("a", "1")])
        parser = ims.MultipartParser(BOUNDARY)
        parser.feed(body)
        parser.close()
        with self.assertRaises(ims.HTTPError) as caught:
            parser.feed(b"more")
        self.assertEqual(caught.exception.status, 400)

    def test_garbage_after_a_boundary_is_refused(self):
        tail = f"Content-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{BOUNDARY}--\r\n"
        for line in (f"--{BOUNDARY}X", f"--{BOUNDARY} x", f"--{BOUNDARY}-", f"--{BOUNDARY}\t-"):
            self.assertRefusedAllWays(f"{line}\r\n{tail}".encode())

    def test_garbage_after_a_boundary_inside_a_body_is_refused(self):
        body, _ = multipart_body(files=[("file", "a.png", f"abc\r\n--{BOUNDARY}zzz\r\ndef".encode())])
        self.assertRefusedAllWays(body)

    def test_part_headers_over_the_limit_are_refused(self):
        head = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\nX-Padding: '
        head += b"p" * (ims.MAX_PART_HEADER_BYTES + 1 - len(head))
        self.assertRefusedAllWays(f"--{BOUNDARY}\r\n".encode() + head + f"\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode())

    def test_endless_part_headers_are_refused_before_the_body_ends(self):
        parser = ims.MultipartParser(BOUNDARY)
        parser.feed(f"--{BOUNDARY}\r\nX-Padding: ".encode())
        with self.assertRaises(ims.HTTPError) as caught:
            for _ in range(ims.MAX_PART_HEADER_BYTES // 1000 + 1):
                parser.feed(b"p" * 1000)
        self.assertEqual(caught.exception.status, 400)

    def test_part_without_content_disposition_is_refused(self):
        body = f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()
        self.assertRefusedAllWays(body)
        self.assertRefusedAllWays(f"--{BOUNDARY}\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode())

    def test_content_disposition_other_than_form_data_is_refused(self):
        body = f"--{BOUNDARY}\r\nContent-Disposition: attachment; name=\"file\"\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()
        self.assertRefusedAllWays(body)

    def test_part_without_name_is_refused(self):
        body = f"--{BOUNDARY}\r\nContent-Disposition: form-data; filename=\"a.png\"\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()
        self.assertRefusedAllWays(body)

    def test_folded_header_line_is_refused(self):
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data;\r\n name=\"file\"; filename=\"a.png\"\r\n\r\n"
                f"x\r\n--{BOUNDARY}--\r\n").encode()
        self.assertRefusedAllWays(body)
        self.assertRefusedAllWays(body.replace(b"\r\n name", b"\r\n\tname"))

    def test_header_line_without_colon_is_refused(self):
        body, _ = multipart_body(files=[("file", "a.png", b"x")])
        body = body.replace(b"Content-Type: ", b"Content-Type ")
        self.assertRefusedAllWays(body)

    def test_white_space_before_a_header_colon_is_refused(self):
        body = (f"--{BOUNDARY}\r\nContent-Disposition : form-data; name=\"file\"\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode()
        self.assertRefusedAllWays(body)

    def test_invalid_boundaries_are_refused_by_the_constructor(self):
        for boundary in ("", "b" * 71, "abc ", " ", "a\r\nb", "a\nb", "a\rb", "a\x00b", 'a"b', "a;b", "caf\xe9", None, b"abc"):
            with self.assertRaises(ims.HTTPError, msg=repr(boundary)) as caught:
                ims.MultipartParser(boundary)
            self.assertEqual(caught.exception.status, 400)

    def test_extended_filename_in_an_odd_charset_is_read_as_utf8(self):
        # RFC 8187: UTF-8 and ISO-8859-1 are the charsets a recipient must know; any other is read
        # as UTF-8, bytes that are not UTF-8 replaced, never a codec looked up by its name.
        for charset in ("idna", "punycode", "hex", "rot13", "utf-16", "no-such-charset", ""):
            body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                    f"filename*={charset}''a%FF%00b.png\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode()
            kind, result = outcome(lambda: ims.MultipartParser(BOUNDARY), [body], multipart_events)
            self.assertEqual(kind, "parsed", charset)
            self.assertEqual(result[0].filename, "a\ufffd\x00b.png", charset)

    def test_random_mutations_are_parsed_or_refused_with_400(self):
        body, _ = multipart_body(files=[("file", "a.png", b"\x89PNG\r\n\x1a\n--data--\r\n")], fields=[("note", "hi")])
        factory = functools.partial(ims.MultipartParser, BOUNDARY)
        original = outcome(factory, [body], multipart_events)
        self.assertEqual(original[0], "parsed")
        rng = random.Random(SEED)
        seen = {"same": 0, "different": 0, "refused": 0}
        for _ in range(3000):
            mutated = mutate(rng, body)
            result = outcome(factory, [mutated], multipart_events)
            if result[0] == "refused":
                self.assertEqual(result[1], 400, mutated)
                seen["refused"] += 1
            else:
                seen["same" if result == original else "different"] += 1
        self.assertTrue(all(seen.values()), seen)

    def test_random_mutations_give_one_outcome_however_split(self):
        body, _ = multipart_body(files=[("file", "a.png", b"\x89PNG\r\n\x1a\n--data--\r\n")], fields=[("note", "hi")])
        factory = functools.partial(ims.MultipartParser, BOUNDARY)
        rng = random.Random(SEED + 1)
        for _ in range(1500):
            mutated = mutate(rng, body)
            cuts = sorted(rng.sample(range(len(mutated) + 1), min(len(mutated) + 1, 3)))
            pieces = [mutated[a:b] for a, b in zip([0] + cuts, cuts + [len(mutated)])]
            self.assertEqual(outcome(factory, pieces, multipart_events), outcome(factory, [mutated], multipart_events), mutated)


class TestChunkedDecoder(unittest.TestCase):
    def decode(self, body):
        return feed_all_ways(ims.ChunkedDecoder, body, chunked_output)

    def assertRefusedAllWays(self, body):
        self.assertEqual(outcomes_all_ways(ims.ChunkedDecoder, body, chunked_output), {("refused", 400)}, body[:200])

    def test_several_chunks_are_joined(self):
        self.assertEqual(self.decode(b"5\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n"), (b"hello world!", b""))

    def test_chunk_data_may_hold_crlf_and_hex_digits(self):
        self.assertEqual(self.decode(b"7\r\n\r\n0\r\n\r\n\r\n0\r\n\r\n"), (b"\r\n0\r\n\r\n", b""))

    def test_chunk_extensions_are_ignored(self):
        body = b'5;name=value;quoted="a;b"\r\nhello\r\n6 ; x\r\n world\r\n0;last\r\n\r\n'
        self.assertEqual(self.decode(body), (b"hello world", b""))

    def test_trailer_fields_are_dropped(self):
        body = b"5\r\nhello\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\nX-Checksum: abc\r\n\r\n"
        self.assertEqual(self.decode(body), (b"hello", b""))

    def test_trailer_of_a_few_hundred_bytes_is_accepted_however_split(self):
        body = b"5\r\nhello\r\n0\r\nX-Signature: " + b"s" * 300 + b"\r\n\r\n"
        self.assertEqual(self.decode(body), (b"hello", b""))

    def test_hex_sizes_work_in_upper_and_lower_case(self):
        data = bytes(range(0x1F + 0x0A + 0x0A))
        body = (b"A\r\n" + data[:10] + b"\r\na\r\n" + data[10:20] + b"\r\n1f\r\n" + data[20:51]
                + b"\r\n0000\r\n\r\n")
        self.assertEqual(self.decode(body), (data, b""))

    def test_zero_length_body_is_just_the_last_chunk(self):
        self.assertEqual(self.decode(b"0\r\n\r\n"), (b"", b""))

    def test_bytes_after_the_end_are_kept_in_unused(self):
        following = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        self.assertEqual(self.decode(b"3\r\nabc\r\n0\r\nX: y\r\n\r\n" + following), (b"abc", following))

    def test_done_only_after_the_trailer_section_ends(self):
        decoder = ims.ChunkedDecoder()
        self.assertEqual(decoder.feed(b"3\r\nabc\r\n0\r\n"), b"abc")
        self.assertFalse(decoder.done)
        decoder.feed(b"X: y\r\n")
        self.assertFalse(decoder.done)
        decoder.feed(b"\r\n")
        self.assertTrue(decoder.done)
        decoder.close()

    def test_chunk_data_is_handed_on_as_it_arrives(self):
        decoder = ims.ChunkedDecoder()
        self.assertEqual(decoder.feed(b"186A0\r\n" + b"x" * 50000), b"x" * 50000)
        self.assertEqual(decoder.feed(b"y" * 49999), b"y" * 49999)
        self.assertFalse(decoder.done)

    def test_chunk_size_line_of_exactly_the_limit_is_accepted_however_split(self):
        line = b"5;" + b"e" * (ims.MAX_CHUNK_LINE_BYTES - 2)
        self.assertEqual(self.decode(line + b"\r\nhello\r\n0\r\n\r\n"), (b"hello", b""))

    def test_non_hex_sizes_are_refused(self):
        for size in (b"g", b"0x10", b"+5", b"-5", b"5.0", b"", b"\xff", b"1_0", b"10000000000000000"):
            self.assertRefusedAllWays(size + b"\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n")

    def test_missing_crlf_after_chunk_data_is_refused(self):
        for body in (b"5\r\nhelloX\r\n0\r\n\r\n", b"5\r\nhello0\r\n\r\n", b"3\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\n0\r\n\r\n"):
            self.assertRefusedAllWays(body)

    def test_size_line_over_the_limit_is_refused(self):
        self.assertRefusedAllWays(b"5;" + b"e" * ims.MAX_CHUNK_LINE_BYTES + b"\r\nhello\r\n0\r\n\r\n")

    def test_endless_size_line_is_refused_before_the_body_ends(self):
        decoder = ims.ChunkedDecoder()
        with self.assertRaises(ims.HTTPError) as caught:
            for _ in range(ims.MAX_CHUNK_LINE_BYTES // 1000 + 1):
                decoder.feed(b"0" * 1000)
        self.assertEqual(caught.exception.status, 400)

    def test_trailer_over_the_limit_is_refused(self):
        self.assertRefusedAllWays(b"0\r\nX: " + b"t" * ims.MAX_TRAILER_BYTES + b"\r\n\r\n")
        line = b"X-Many: " + b"m" * 90 + b"\r\n"
        self.assertRefusedAllWays(b"0\r\n" + line * (ims.MAX_TRAILER_BYTES // len(line) + 1) + b"\r\n")

    def test_close_before_the_last_chunk_is_refused(self):
        for body in (b"", b"5\r\nhel", b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n", b"0\r\nX: y\r\n", b"5"):
            decoder = ims.ChunkedDecoder()
            decoder.feed(body)
            with self.assertRaises(ims.HTTPError) as caught:
                decoder.close()
            self.assertEqual(caught.exception.status, 400)
            if body:
                self.assertRefusedAllWays(body)

    def test_random_mutations_are_decoded_or_refused_with_400(self):
        body = b"5\r\nhello\r\n1a;ext=1\r\n" + bytes(range(65, 91)) + b"\r\n3\r\n\r\n-\r\n0\r\nX-Trailer: y\r\n\r\n"
        original = outcome(ims.ChunkedDecoder, [body], chunked_output)
        self.assertEqual(original[0], "parsed")
        rng = random.Random(SEED)
        seen = {"same": 0, "different": 0, "refused": 0}
        for _ in range(3000):
            mutated = mutate(rng, body)
            result = outcome(ims.ChunkedDecoder, [mutated], chunked_output)
            if result[0] == "refused":
                self.assertEqual(result[1], 400, mutated)
                seen["refused"] += 1
            else:
                seen["same" if result == original else "different"] += 1
        self.assertTrue(all(seen.values()), seen)

    def test_random_mutations_give_one_outcome_however_split(self):
        body = b"5\r\nhello\r\n1a;ext=1\r\n" + bytes(range(65, 91)) + b"\r\n3\r\n\r\n-\r\n0\r\nX-Trailer: y\r\n\r\n"
        rng = random.Random(SEED + 1)
        for _ in range(1500):
            mutated = mutate(rng, body)
            cuts = sorted(rng.sample(range(len(mutated) + 1), min(len(mutated) + 1, 3)))
            pieces = [mutated[a:b] for a, b in zip([0] + cuts, cuts + [len(mutated)])]
            whole = outcome(ims.ChunkedDecoder, [mutated], chunked_output)
            self.assertEqual(outcome(ims.ChunkedDecoder, pieces, chunked_output), whole, mutated)


class TestParseRange(unittest.TestCase):
    def test_first_bytes(self):
        self.assertEqual(ims.parse_range("bytes=0-9", 100), (0, 9))
        self.assertEqual(ims.parse_range("bytes=0-0", 100), (0, 0))

    def test_open_ended_range_runs_to_the_end(self):
        self.assertEqual(ims.parse_range("bytes=5-", 100), (5, 99))
        self.assertEqual(ims.parse_range("bytes=99-", 100), (99, 99))

    def test_suffix_range_is_the_last_bytes(self):
        self.assertEqual(ims.parse_range("bytes=-5", 100), (95, 99))
        self.assertEqual(ims.parse_range("bytes=-500", 100), (0, 99))

    def test_end_beyond_the_size_is_clamped(self):
        self.assertEqual(ims.parse_range("bytes=90-1000", 100), (90, 99))

    def test_unit_and_spaces_are_tolerated(self):
        self.assertEqual(ims.parse_range("Bytes = 1 - 2", 100), (1, 2))

    def test_start_beyond_the_size_is_416_with_content_range(self):
        for header, size in (("bytes=100-", 100), ("bytes=500-600", 100), ("bytes=0-", 0), ("bytes=0-0", 0)):
            with self.assertRaises(ims.HTTPError, msg=header) as caught:
                ims.parse_range(header, size)
            self.assertEqual(caught.exception.status, 416)
            self.assertEqual(caught.exception.headers, {"Content-Range": f"bytes */{size}"})

    def test_suffix_of_zero_is_416(self):
        for header, size in (("bytes=-0", 100), ("bytes=-5", 0)):
            with self.assertRaises(ims.HTTPError, msg=header) as caught:
                ims.parse_range(header, size)
            self.assertEqual(caught.exception.status, 416)
            self.assertEqual(caught.exception.headers["Content-Range"], f"bytes */{size}")

    def test_no_header_means_the_whole_file(self):
        self.assertIsNone(ims.parse_range(None, 100))
        self.assertIsNone(ims.parse_range("", 100))

    def test_several_ranges_mean_the_whole_file(self):
        self.assertIsNone(ims.parse_range("bytes=0-9,20-29", 100))
        self.assertIsNone(ims.parse_range("bytes=0-9, 200-300", 100))

    def test_other_units_mean_the_whole_file(self):
        for header in ("items=0-9", "none", "bits=0-9", "bytes0-9"):
            self.assertIsNone(ims.parse_range(header, 100), header)

    def test_malformed_ranges_mean_the_whole_file(self):
        for header in ("bytes=", "bytes=-", "bytes=abc", "bytes=1-2-3", "bytes=0x1-2", "bytes=+1-2",
                       "bytes=1.5-2", "bytes=5", "bytes=--5", "bytes=1-\xb2", "bytes=" + "9" * 40 + "-"):
            self.assertIsNone(ims.parse_range(header, 100), header)

    def test_end_before_start_means_the_whole_file(self):
        self.assertIsNone(ims.parse_range("bytes=9-5", 100))


class TestResizeParams(unittest.TestCase):
    def assertRefused(self, query, body, content_type, *words, max_pixels=MAX_PIXELS):
        """parse_resize_params() raises 400 with a message holding every one of `words` (one at least)."""
        self.assertTrue(words, "name what the message must hold")
        with self.assertRaises(ims.HTTPError, msg=(query, body)) as caught:
            ims.parse_resize_params(query, body, content_type, max_pixels)
        self.assertEqual(caught.exception.status, 400)
        for word in words:
            self.assertIn(word, caught.exception.message, (query, body))

    def test_json_numbers(self):
        self.assertEqual(ims.parse_resize_params("", b'{"width": 300, "height": 200}', "application/json", MAX_PIXELS), (300, 200, "fill"))

    def test_json_digit_strings(self):
        self.assertEqual(ims.parse_resize_params("", b'{"width": "300", "height": "0200"}', "application/json", MAX_PIXELS), (300, 200, "fill"))

    def test_every_fit_is_accepted(self):
        for fit in ("fill", "contain", "cover"):
            body = b'{"width": 3, "height": 2, "fit": "%s"}' % fit.encode()
            self.assertEqual(ims.parse_resize_params("", body, "application/json; charset=utf-8", MAX_PIXELS), (3, 2, fit))

    def test_form_body_as_requests_sends_it(self):
        self.assertEqual(ims.parse_resize_params("", b"width=300&height=200&fit=cover", FORM, MAX_PIXELS), (300, 200, "cover"))

    def test_query_string(self):
        self.assertEqual(ims.parse_resize_params("width=30&height=20&fit=contain", b"", "", MAX_PIXELS), (30, 20, "contain"))

    def test_body_overrides_query(self):
        self.assertEqual(ims.parse_resize_params("width=30&height=20", b'{"width": 40}', "application/json", MAX_PIXELS), (40, 20, "fill"))
        self.assertEqual(ims.parse_resize_params("width=30&height=20&fit=cover", b"height=50", FORM, MAX_PIXELS), (30, 50, "cover"))

    def test_json_labelled_as_form_is_read_as_json(self):
        body = b'{"width": 300, "height": 200, "fit": "contain"}'
        self.assertEqual(ims.parse_resize_params("", body, FORM, MAX_PIXELS), (300, 200, "contain"))
        self.assertEqual(ims.parse_resize_params("", b"\n " + body, "", MAX_PIXELS), (300, 200, "contain"))

    def test_result_of_exactly_max_pixels_is_accepted(self):
        self.assertEqual(ims.parse_resize_params("width=9000&height=10000", b"", "", MAX_PIXELS), (9000, 10000, "fill"))

    def test_missing_width_or_height_is_400_naming_it(self):
        self.assertRefused("height=20", b"", "", "width")
        self.assertRefused("", b'{"width": 20}', "application/json", "height")
        self.assertRefused("", b"", "", "width")

    def test_values_below_one_are_400_naming_the_parameter(self):
        for value in (b"0", b"-1", b'"0"', b'"-1"', b"-99999999999999999999"):
            self.assertRefused("", b'{"width": %s, "height": 2}' % value, "application/json", "width")
            self.assertRefused("", b'{"width": 2, "height": %s}' % value, "application/json", "height")
        self.assertRefused("width=0&height=2", b"", "", "width")
        self.assertRefused("width=2&height=-1", b"", "", "height")

    def test_non_integers_are_400_naming_the_parameter_and_value(self):
        for value in (b"1.5", b'"1.5"', b'"abc"', b'""', b'" 3"', b"true", b"false", b"[3]", b'{"n": 3}', b"1e3", b'"\xd9\xa3"'):
            self.assertRefused("", b'{"width": %s, "height": 2}' % value, "application/json", "width")
            self.assertRefused("", b'{"width": 2, "height": %s}' % value, "application/json", "height")
        self.assertRefused("width=abc&height=2", b"", "", "width", "'abc'")
        self.assertRefused("", b"width=2&height=1.5", FORM, "height", "1.5")

    def test_null_is_400_naming_the_parameter(self):
        self.assertRefused("", b'{"width": null, "height": 2}', "application/json", "width")
        self.assertRefused("width=3&height=2", b'{"height": null}', "application/json", "height")

    def test_product_over_max_pixels_is_400(self):
        self.assertRefused("width=9001&height=10000", b"", "", str(MAX_PIXELS))
        self.assertRefused("", b'{"width": 100000000000000000000000, "height": 1}', "application/json", "pixels")
        self.assertRefused("width=3&height=3", b"", "", "3x3", max_pixels=8)

    def test_a_json_size_beyond_18_digits_is_400_whatever_the_fit(self):
        for fit in ("fill", "contain", "cover"):
            body = b'{"width": 1' + b"0" * 400 + b', "height": 100, "fit": "' + fit.encode() + b'"}'
            self.assertRefused("", body, "application/json", "width must be at most")

    def test_unknown_fit_is_400_naming_fit(self):
        for fit in ("stretch", "FILL", "cover ", "0"):
            self.assertRefused(urllib.parse.urlencode({"width": 3, "height": 2, "fit": fit}), b"", "", "fit")
        self.assertRefused("", b'{"width": 3, "height": 2, "fit": 1}', "application/json", "fit")

    def test_json_array_body_is_400(self):
        self.assertRefused("", b"[300, 200]", "application/json", "object")
        self.assertRefused("width=3&height=2", b'"300"', "application/json", "object")

    def test_invalid_json_is_400(self):
        for body in (b'{"width": 3', b"{width: 3, height: 2}", b"{'width': 3}", b'{"width": 3}}', b"{\xff}"):
            self.assertRefused("", body, "application/json", "JSON")

    def test_deeply_nested_json_is_400(self):
        body = b'{"width": ' + b"[" * 50000 + b"]" * 50000 + b', "height": 2}'
        self.assertRefused("", body, "application/json", "JSON")

    def test_malformed_form_body_is_400(self):
        for body in (b"width", b"width=3&&height=2&x", b"\xff=1"):
            self.assertRefused("", body, FORM, "form")


class TestParseRequest(unittest.TestCase):
    """parse_request() on bytes: what is asked, how the body is framed, and keep-alive."""

    def parse(self, head):
        return ims.parse_request(head)

    def assertRejected(self, head, status, words):
        with self.assertRaises(ims.HTTPError) as caught:
            self.parse(head)
        self.assertEqual(caught.exception.status, status)
        self.assertIn(words, caught.exception.message)

    def test_a_get_has_its_path_query_and_no_body(self):
        request = self.parse(b"GET /a.png?width=3 HTTP/1.1\r\nHost: ims.test\r\n\r\n")
        self.assertEqual((request.method, request.path, request.query), ("GET", "/a.png", "width=3"))
        self.assertEqual((request.content_length, request.is_chunked, request.has_body), (0, False, False))
        self.assertTrue(request.keep_alive)

    def test_bare_line_feeds_end_lines_too(self):
        request = self.parse(b"GET / HTTP/1.1\nHost: ims.test\nConnection: close\n\n")
        self.assertEqual(request.headers.get("host"), "ims.test")
        self.assertFalse(request.keep_alive)

    def test_keep_alive_follows_the_version_and_connection_options(self):
        for head, keep_alive in (
            (b"GET / HTTP/1.1\r\n\r\n", True),
            (b"GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
            (b"GET / HTTP/1.9\r\n\r\n", True),
        ):
            with self.subTest(head=head):
                self.assertEqual(self.parse(head).keep_alive, keep_alive)

    def test_a_later_minor_version_is_answered_as_http_1_1(self):
        self.assertEqual(self.parse(b"GET / HTTP/1.9\r\n\r\n").version, "HTTP/1.1")

    def test_content_length_frames_the_body_and_identical_repeats_are_one(self):
        request = self.parse(b"POST / HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 12, 12\r\n\r\n")
        self.assertEqual((request.content_length, request.is_chunked, request.has_body), (12, False, True))

    def test_chunked_frames_the_body(self):
        request = self.parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n")
        self.assertEqual((request.content_length, request.is_chunked, request.has_body), (0, True, True))

    def test_an_absolute_target_is_reduced_to_its_path(self):
        request = self.parse(b"GET http://ims.test/a.png?x=1 HTTP/1.1\r\n\r\n")
        self.assertEqual((request.path, request.query), ("/a.png", "x=1"))

    def test_smuggling_shapes_are_400(self):
        for head, words in (
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "Content-Length"),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "chunked"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            (b"GET / HTTP/1.1\r\nHost : ims.test\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", "control"),
        ):
            with self.subTest(head=head):
                self.assertRejected(head, 400, words)

    def test_malformed_request_lines_and_targets_are_400(self):
        for head, words in (
            (b"GET /\r\n\r\n", "METHOD /path"),
            (b"GET  / HTTP/1.1\r\n\r\n", "METHOD /path"),
            (b"GET / HTTX/1.1\r\n\r\n", "HTTP version"),
            (b"GET ftp://ims.test/ HTTP/1.1\r\n\r\n", "not a path"),
            (b"GET /\xe9.png HTTP/1.1\r\n\r\n", "ASCII"),
        ):
            with self.subTest(head=head):
                self.assertRejected(head, 400, words)

    def test_limits_of_the_head(self):
        self.assertRejected(b"GET /" + b"a" * ims.MAX_REQUEST_LINE_BYTES + b" HTTP/1.1\r\n\r\n", 414, "request line")
        self.assertRejected(b"GET / HTTP/1.1\r\nX-A: " + b"a" * ims.MAX_HEADER_LINE_BYTES + b"\r\n\r\n", 431, "header line")
        fields = b"".join(b"X-%d: 1\r\n" % number for number in range(ims.MAX_HEADER_FIELDS + 1))
        self.assertRejected(b"GET / HTTP/1.1\r\n" + fields + b"\r\n", 431, "header fields")
        self.assertRejected(b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0")

    def test_seeded_garbage_is_parsed_or_refused_with_a_4xx_or_505(self):
        rng = random.Random(SEED)
        valid = b"POST /a.png?w=1 HTTP/1.1\r\nHost: ims.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        for _ in range(2000):
            head = mutate(rng, valid)
            try:
                request = self.parse(head)
            except ims.HTTPError as error:
                self.assertIn(error.status, (400, 414, 431, 505), head)
                self.assertTrue(error.message)
            else:
                self.assertIsInstance(request.content_length, int)
                self.assertFalse(request.is_chunked and request.content_length, head)


class TestConditionals(unittest.TestCase):
    ETAG = '"1a-2b-3c"'
    DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
    TIME = 784111777

    def test_strong_etag_matches_itself(self):
        self.assertTrue(ims.is_etag_match(self.ETAG, self.ETAG, weak=True))
        self.assertTrue(ims.is_etag_match(self.ETAG, self.ETAG, weak=False))

    def test_weak_etag_matches_only_in_weak_comparison(self):
        self.assertTrue(ims.is_etag_match("W/" + self.ETAG, self.ETAG, weak=True))
        self.assertFalse(ims.is_etag_match("W/" + self.ETAG, self.ETAG, weak=False))

    def test_star_matches_any_etag(self):
        self.assertTrue(ims.is_etag_match("*", self.ETAG, weak=True))
        self.assertTrue(ims.is_etag_match("*", self.ETAG, weak=False))

    def test_a_list_matches_when_one_tag_matches(self):
        self.assertTrue(ims.is_etag_match('"other", ' + self.ETAG, self.ETAG, weak=False))
        self.assertTrue(ims.is_etag_match('W/"other",W/' + self.ETAG, self.ETAG, weak=True))

    def test_other_etags_do_not_match(self):
        for header in ('"other"', "", "1a-2b-3c", '"1A-2B-3C"', self.ETAG[:-1], ", ,"):
            self.assertFalse(ims.is_etag_match(header, self.ETAG, weak=True), header)
            self.assertFalse(ims.is_etag_match(header, self.ETAG, weak=False), header)

    def test_no_conditional_headers_means_modified(self):
        self.assertFalse(ims.is_not_modified({}, self.ETAG, self.TIME))

    def test_matching_if_none_match_is_not_modified(self):
        self.assertTrue(ims.is_not_modified({"If-None-Match": "W/" + self.ETAG}, self.ETAG, self.TIME))
        self.assertFalse(ims.is_not_modified({"If-None-Match": '"other"'}, self.ETAG, self.TIME))

    def test_if_none_match_wins_over_if_modified_since(self):
        later = "Mon, 01 Jan 2035 00:00:00 GMT"
        earlier = "Sat, 01 Jan 1972 00:00:00 GMT"
        self.assertFalse(ims.is_not_modified({"If-None-Match": '"other"', "If-Modified-Since": later}, self.ETAG, self.TIME))
        self.assertTrue(ims.is_not_modified({"If-None-Match": self.ETAG, "If-Modified-Since": earlier}, self.ETAG, self.TIME))

    def test_if_modified_since_at_or_after_the_file_time_is_not_modified(self):
        self.assertTrue(ims.is_not_modified({"If-Modified-Since": self.DATE}, self.ETAG, self.TIME + 0.75))
        self.assertTrue(ims.is_not_modified({"If-Modified-Since": self.DATE}, self.ETAG, self.TIME - 100))
        self.assertFalse(ims.is_not_modified({"If-Modified-Since": self.DATE}, self.ETAG, self.TIME + 1))

    def test_garbage_if_modified_since_is_ignored(self):
        self.assertFalse(ims.is_not_modified({"If-Modified-Since": "yesterday"}, self.ETAG, 0))

    def test_the_three_http_date_formats_are_read(self):
        for text in (self.DATE, "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"):
            self.assertEqual(ims.parse_http_date(text), self.TIME, text)

    def test_garbage_dates_are_none(self):
        for text in ("", "yesterday", "1994-11-06T08:49:37Z", "Sun, 32 Nov 1994 08:49:37 GMT",
                     "Sun, 06 Nov 1994 25:49:37 GMT", "Sun, 06 Nov 99999 08:49:37 GMT", "1 2 3 4 5",
                     "Sun, 06 Nov 1994 08:49:37 +99999999999999999999",
                     "06 Nov 1994 08:49:99999999999999999999 GMT"):
            self.assertIsNone(ims.parse_http_date(text), text)


# ====
# HTTP: list, upload, download, delete, methods and paths
# ====


class TestIntegrityHeaders(unittest.TestCase):
    """Content-Digest, Content-MD5, Want-Repr-Digest and X-Request-Id, parsed from header values alone."""

    BODY = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nPNG...\r\n--b--\r\n"

    @staticmethod
    def headers(*fields):
        return ims.Headers(fields)

    def sf_bytes(self, data):
        return ":" + base64.b64encode(data).decode() + ":"

    def digests(self, *fields):
        checked = ims.BodyDigests(self.headers(*fields))
        for start in range(0, len(self.BODY), 7):
            checked.update(self.BODY[start:start + 7])
        return checked

    def test_dictionaries_of_rfc_8941(self):
        example = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        self.assertEqual(ims.parse_dictionary(example), [("sha-256", example[8:])])
        self.assertEqual(ims.parse_dictionary(' a=1;q=0.5 ,b, c="x, y",d=?0,e=tok/en:1 '),
                         [("a", "1"), ("b", "?1"), ("c", '"x, y"'), ("d", "?0"), ("e", "tok/en:1")])
        self.assertEqual(ims.parse_dictionary(""), [])
        for bad in ("A=1", "a=1,", ",a=1", "a=(1 2)", "a=:abc", "a=1 b=2", 'a="unterminated', "a=\x01", "a=1;", "a=-", "sha-256=:ab:cd:"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                ims.parse_dictionary(bad)

    def test_random_values_parse_or_raise_value_error_only(self):
        rng = random.Random(SEED)
        alphabet = 'a-z=:,; "?*0123456789+/\\\t\x00\xff().'
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
            try:
                members = ims.parse_dictionary(text)
            except ValueError:
                continue
            self.assertTrue(all(isinstance(key, str) and isinstance(item, str) for key, item in members), text)

    def test_a_body_that_matches_every_digest_passes(self):
        sha256 = self.sf_bytes(hashlib.sha256(self.BODY).digest())
        sha512 = self.sf_bytes(hashlib.sha512(self.BODY).digest())
        md5 = base64.b64encode(hashlib.md5(self.BODY).digest()).decode()
        for fields in (
            [("Content-Digest", f"sha-256={sha256}")],
            [("Content-Digest", f"sha-512={sha512}, sha-256={sha256}")],
            [("Content-Digest", f"sha-512={sha512}"), ("Content-Digest", f"sha-256={sha256}")],
            [("Content-MD5", md5)],
            [("Content-Digest", f"sha-256={sha256};q=1, md5=:AAAA:"), ("Content-MD5", f" {md5} ")],
        ):
            with self.subTest(fields=fields):
                checked = self.digests(*fields)
                self.assertTrue(checked)
                checked.check()

    def test_a_body_that_does_not_match_is_refused(self):
        sha256 = self.sf_bytes(hashlib.sha256(self.BODY).digest())
        wrong256 = self.sf_bytes(hashlib.sha256(self.BODY + b"x").digest())
        wrong512 = self.sf_bytes(hashlib.sha512(b"").digest())
        wrong_md5 = base64.b64encode(hashlib.md5(b"").digest()).decode()
        for fields, named in (
            ([("Content-Digest", f"sha-256={wrong256}")], "sha-256"),
            ([("Content-Digest", f"sha-256={sha256}, sha-512={wrong512}")], "sha-512"),
            ([("Content-Digest", f"sha-256={sha256}"), ("Content-MD5", wrong_md5)], "Content-MD5"),
        ):
            with self.subTest(fields=fields), self.assertRaises(ims.HTTPError) as caught:
                self.digests(*fields).check()
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(named, caught.exception.message)
            self.assertIn("nothing was stored", caught.exception.message)

    def test_unreadable_digest_fields_are_400_before_the_body(self):
        short = self.sf_bytes(b"\x00" * 31)
        for fields in (
            [("Content-Digest", "sha-256=AAAA")],
            [("Content-Digest", f"sha-256={short}")],
            [("Content-Digest", "sha-256=:not base64!:")],
            [("Content-Digest", "sha-512=:AAAA:")],
            [("Content-Digest", "sha-256")],
            [("Content-Digest", "SHA-256=:AAAA:")],
            [("Content-MD5", "AAAA")],
            [("Content-MD5", "not base64 at all, not!")],
            [("Content-MD5", "")],
        ):
            with self.subTest(fields=fields), self.assertRaises(ims.HTTPError) as caught:
                ims.BodyDigests(self.headers(*fields))
            self.assertEqual(caught.exception.status, 400)

    def test_only_unknown_algorithms_check_nothing(self):
        for value in ("md5=:AAAA:", "sha=:AAAA:, unixsum=1", "id-sha-256=:AAAA:"):
            with self.subTest(value=value):
                checked = self.digests(("Content-Digest", value))
                self.assertFalse(checked)
                checked.check()
        self.assertFalse(ims.BodyDigests(self.headers()))

    def test_want_repr_digest_picks_the_preferred_known_algorithm(self):
        for value, expected in (
            ("sha-256=1", "sha-256"),
            ("sha-512=3, sha-256=1", "sha-512"),
            ("sha-256=10, sha-512=9", "sha-256"),
            ("sha-256=5, sha-512=5", "sha-512"),
            ("sha-256=0", None),
            ("sha-256=0, sha-512=1", "sha-512"),
            ("md5=10, sha=3", None),
            ("sha-256=11", None),
            ("sha-256=:AAAA:", None),
            ("sha-256=1.5", None),
            ("garbage (", None),
            ("", None),
        ):
            with self.subTest(value=value):
                self.assertEqual(ims.wanted_digest(self.headers(("Want-Repr-Digest", value))), expected)
        self.assertIsNone(ims.wanted_digest(self.headers()))
        self.assertEqual(ims.repr_digest("sha-256", b"\x00" * 32), "sha-256=:" + "A" * 43 + "=:")

    def test_request_ids_are_kept_when_printable_and_bounded(self):
        for given in ("abc-123", "x" * 128, "req:1/2@host", "~!"):
            with self.subTest(given=given):
                self.assertEqual(ims.client_request_id(self.headers(("X-Request-Id", given))), given)
        for given in ("", "x" * 129, "has space", "tab\there", "ünïcode", "\x7f"):
            with self.subTest(given=given):
                self.assertIsNone(ims.client_request_id(self.headers(("X-Request-Id", given))))
        self.assertIsNone(ims.client_request_id(self.headers()))

    def test_cors_origins_are_checked_and_normalised(self):
        self.assertEqual(ims.parse_origins("https://a.example, http://b.test:8080"), ("https://a.example", "http://b.test:8080"))
        self.assertEqual(ims.parse_origins(["HTTPS://A.Example/", "https://a.example  http://c.test"]), ("https://a.example", "http://c.test"))
        self.assertEqual(ims.parse_origins("https://a.example *"), ("*",))
        self.assertEqual(ims.parse_origins(""), ())
        self.assertEqual(ims.parse_origins(()), ())
        for bad in ("a.example", "https://a.example/path", "https://", "//a.example", "https://a.example?x"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                ims.parse_origins(bad)
        self.assertEqual(ims.Settings(cors_origin="http://a.test").cors_origin, ("http://a.test",))
        with self.assertRaises(ValueError):
            ims.Settings(log_format="xml")


class TestMetrics(unittest.TestCase):
    """The counts of an instance, summed over its processes' blocks, and their text."""

    SAMPLE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})? (-?[0-9.e+]+|\+Inf|NaN)')

    def samples(self, text):
        values = {}
        for line in text.decode().splitlines():
            if line.startswith("#"):
                self.assertRegex(line, r"\A# (HELP|TYPE) [a-z_]+ ")
                continue
            self.assertRegex(line, self.SAMPLE)
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
        return values

    def test_blocks_are_summed_and_gauges_start_again_in_a_new_process(self):
        metrics = ims.Metrics(processes=3)
        for block in (0, 2):
            metrics.use_block(block)
            metrics.count_request("GET", "/{name}", 200, 0.004, 100, 1000)
            metrics.count_request("BREW", ims.NO_ROUTE, 501, 0.0001, 50, 90)
            metrics.add("open_connections")
            metrics.count_job_end("failed")
            metrics.count_resize("rendition", 0.2)
        values = self.samples(metrics.exposition([("ims_images", "Images.", 7)]))
        self.assertEqual(values['ims_http_requests_total{method="GET",route="/{name}",status="200"}'], 2)
        self.assertEqual(values['ims_http_requests_total{method="other",route="none",status="501"}'], 2)
        self.assertEqual(values['ims_http_request_duration_seconds_bucket{route="/{name}",le="0.0025"}'], 0)
        self.assertEqual(values['ims_http_request_duration_seconds_bucket{route="/{name}",le="0.005"}'], 2)
        self.assertEqual(values['ims_http_request_duration_seconds_bucket{route="/{name}",le="+Inf"}'], 2)
        self.assertAlmostEqual(values['ims_http_request_duration_seconds_sum{route="/{name}"}'], 0.008)
        self.assertEqual(values["ims_http_received_bytes_total"], 300)
        self.assertEqual(values["ims_http_sent_bytes_total"], 2180)
        self.assertEqual(values["ims_http_open_connections"], 2)
        self.assertEqual(values['ims_resize_jobs_total{state="failed"}'], 2)
        self.assertEqual(values['ims_resize_duration_seconds_count{kind="rendition"}'], 2)
        self.assertEqual(values["ims_images"], 7)
        self.assertEqual(values["ims_workers"], 3)
        # A worker restarted in block 2: its counters go on, its open connections are gone.
        metrics.use_block(2)
        values = self.samples(metrics.exposition([]))
        self.assertEqual(values['ims_http_requests_total{method="GET",route="/{name}",status="200"}'], 2)
        self.assertEqual(values["ims_http_open_connections"], 1)

    def test_a_forked_process_counts_into_the_same_memory(self):
        metrics = ims.Metrics(processes=2)
        metrics.use_block(0)
        pid = os.fork()
        if pid == 0:
            try:
                metrics.use_block(1)
                for _ in range(5):
                    metrics.count_request("POST", "/", 201, 0.01, 10, 10)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        metrics.count_request("POST", "/", 201, 0.01, 10, 10)
        values = self.samples(metrics.exposition([]))
        self.assertEqual(values['ims_http_requests_total{method="POST",route="/",status="201"}'], 6)

    def test_process_metrics_describe_this_process(self):
        if not os.path.exists("/proc/self/stat"):
            self.skipTest("no /proc here")
        metrics = ims.Metrics()
        metrics.use_block(0)
        values = self.samples(metrics.exposition([]))
        self.assertGreater(values["process_resident_memory_bytes"], 10_000_000)
        self.assertGreater(values["process_open_fds"], 2)
        self.assertGreater(values["process_cpu_seconds_total"], 0)
        self.assertLess(time.time() - 30 * 86400, values["process_start_time_seconds"])
        self.assertLessEqual(values["process_start_time_seconds"], time.time())

    def test_disabled_metrics_count_nothing(self):
        metrics = ims.Metrics(enabled=False)
        metrics.use_block(0)
        metrics.count_request("GET", "/", 200, 0.1, 1, 1)
        metrics.add("uploads")
        values = self.samples(metrics.exposition([]))
        self.assertNotIn('ims_http_requests_total{method="GET",route="/",status="200"}', values)
        self.assertEqual(values["ims_uploads_total"], 0)

    def test_label_values_are_escaped(self):
        self.assertEqual(ims._labels({"a": 'x"y\\z\nw'}), '{a="x\\"y\\\\z\\nw"}')


class TestLogEvents(unittest.TestCase):
    """What is logged besides requests: a line of text, or with --log-format json an object per line."""

    def test_events_are_text_lines_or_json_objects(self):
        with mock.patch("sys.stderr", io.StringIO()) as stderr:
            ims.log_event("common", "warning", "warning: the folder is on NFS")
            ims.log_event("common", "error", "it broke", "Traceback (most recent call last):\n  ...\n")
        self.assertEqual(stderr.getvalue(), "ims.py: warning: the folder is on NFS\nims.py: it broke\nTraceback (most recent call last):\n  ...\n")
        with mock.patch("sys.stderr", io.StringIO()) as stderr:
            ims.log_event("json", "warning", "warning: the folder is on NFS")
            ims.log_event("json", "error", "it broke\nbadly", "Traceback (most recent call last):\n  ...\n")
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual((first["event"], first["message"]), ("warning", "warning: the folder is on NFS"))
        self.assertNotIn("traceback", first)
        self.assertEqual((second["event"], second["message"], second["traceback"]), ("error", "it broke\nbadly", "Traceback (most recent call last):\n  ...\n"))
        self.assertRegex(second["time"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")

    def test_a_queue_that_cannot_be_read_is_logged_once_as_json(self):
        tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(tempdir.cleanup)
        with mock.patch("sys.stderr", io.StringIO()) as stderr:
            server = ims.make_server(tempdir.name, port=0, log_format="json")
            threading.Thread(target=server.serve_forever, daemon=True).start()
            try:
                os.rename(os.path.join(tempdir.name, ".ims", "queue"), os.path.join(tempdir.name, ".ims", "queue-away"))
                wait_for(lambda: "resize queue" in stderr.getvalue())
            finally:
                os.rename(os.path.join(tempdir.name, ".ims", "queue-away"), os.path.join(tempdir.name, ".ims", "queue"))
                server.shutdown()
                server.server_close()
        events = [json.loads(line) for line in stderr.getvalue().splitlines()]
        errors = [event for event in events if event["event"] == "error"]
        self.assertEqual(len(errors), 1, events)
        self.assertIn("cannot run the folder's resize queue", errors[0]["message"])


class HTTPTestCase(ServerTestCase):
    """ServerTestCase plus raw-socket helpers for what http.client cannot send or see."""

    def open_socket(self):
        """Return a socket connected to the server, closed at cleanup."""
        sock = socket.create_connection((self.host, self.port), timeout=DEADLINE_SECONDS)
        self.addCleanup(sock.close)
        return sock

    def read_head(self, sock):
        """Read up to and including the first blank line; return it (and nothing past it)."""
        data = b""
        while b"\r\n\r\n" not in data:
            byte = sock.recv(1)
            if not byte:
                break
            data += byte
        return data

    def read_reply(self, sock, method="GET"):
        """Read one final response from `sock`: its head, then exactly the body it announces."""
        head = self.read_head(sock)
        while head.startswith(b"HTTP/1.1 1"):
            head = self.read_head(sock)
        self.assertTrue(head.endswith(b"\r\n\r\n"), f"no complete response head in {head!r}")
        status = int(head.split(b" ", 2)[1])
        headers = http.client.parse_headers(io.BytesIO(head.partition(b"\r\n")[2]))
        length = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("Content-Length", "0"))
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            self.assertTrue(chunk, "the server closed before the whole body")
            body += chunk
        return self.parse_reply(head + body, method)

    def split_reply(self, raw, method="GET"):
        """Parse the first final response in `raw` (1xx skipped); return it and the bytes after it."""
        while True:
            head, separator, rest = raw.partition(b"\r\n\r\n")
            self.assertTrue(separator, f"no complete response head in {raw[:300]!r}")
            status_line, _, header_block = head.partition(b"\r\n")
            parts = status_line.split(b" ", 2)
            self.assertTrue(parts[0].startswith(b"HTTP/1."), f"not a status line: {status_line[:100]!r}")
            status = int(parts[1])
            headers = http.client.parse_headers(io.BytesIO(header_block + b"\r\n\r\n"))
            if status >= 200:
                break
            raw = rest
        length = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("Content-Length", "0"))
        self.assertGreaterEqual(len(rest), length, f"the body is shorter than its Content-Length: {rest[:300]!r}")
        return Reply(status, headers, rest[:length]), rest[length:]

    def parse_reply(self, raw, method="GET"):
        """Parse exactly one final response from `raw`; nothing may follow it."""
        reply, rest = self.split_reply(raw, method)
        self.assertEqual(rest, b"", "bytes follow the response")
        return reply

    def raw_requests(self, *requests):
        """Send (method, path, headers) requests one after another on one connection; return the Replies.

        Each answer must be framed exactly: a byte too many shows up in front of the next answer.
        The last request asks the server to close, and nothing may follow its answer.
        """
        sock = self.open_socket()
        replies = []
        for index, (method, path, headers) in enumerate(requests):
            is_last = index == len(requests) - 1
            lines = [f"{method} {path} HTTP/1.1", "Host: ims.test"]
            lines += [f"{key}: {value}" for key, value in headers.items()]
            if is_last:
                lines.append("Connection: close")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if is_last:
                replies.append(self.parse_reply(self.read_until_close(sock), method))
            else:
                replies.append(self.read_reply(sock, method))
        return replies

    def multipart_request_head(self, content_type, content_length=None, extra_headers=()):
        lines = ["POST / HTTP/1.1", "Host: ims.test", f"Content-Type: {content_type}"]
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        lines.extend(extra_headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def upload_at_once(self, name, images):
        """Upload each of `images` as `name`, each on a connection of its own, all at one moment.

        Return the answers in the order of `images`: (status, body), or (None, the error) for a
        request that failed, or None for one still unanswered after DEADLINE_SECONDS.
        """
        barrier = threading.Barrier(len(images))
        results = [None] * len(images)

        def upload(index):
            body, content_type = multipart_body(files=[("file", name, images[index])])
            connection = http.client.HTTPConnection(self.host, self.port, timeout=DEADLINE_SECONDS)
            try:
                connection.connect()
                barrier.wait(timeout=DEADLINE_SECONDS)
                connection.request("POST", "/", body, {"Content-Type": content_type})
                response = connection.getresponse()
                results[index] = (response.status, response.read())
            except Exception as error:  # reported in the main thread
                results[index] = (None, repr(error))
            finally:
                connection.close()

        threads = [threading.Thread(target=upload, args=(index,)) for index in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_SECONDS)
        return results

    def assertConnectionStillServes(self, connection):
        """The connection is open and framed right: another request on it gets a whole answer."""
        self.assertIsNotNone(connection.sock, "the server closed the connection")
        local_address = connection.sock.getsockname()
        reply = self.request("GET", "/", connection=connection)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertIsInstance(reply.json, list)
        self.assertEqual(connection.sock.getsockname(), local_address, "a new connection was opened")

    def assertNothingStored(self):
        self.assertEqual(self.stored_files(), [])
        self.assertNoTempFiles()
        self.assertEqual(self.request("GET", "/").json, [])

    def put_file(self, name, data, folder=None):
        """Place a file in the folder directly, the way a person or a backup restore would."""
        path = os.path.join(folder or self.storage, name)
        with open(path, "wb") as file:
            file.write(data)
        return path


# ====
# GET / — list
# ====


class TestList(HTTPTestCase):
    def test_empty_storage_lists_an_empty_array(self):
        reply = self.request("GET", "/")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        self.assertEqual(reply.json, [])
        self.assertEqual(int(reply.headers["Content-Length"]), len(reply.body))

    def test_names_are_listed_sorted(self):
        png = make_image("PNG")
        for name in ("b.png", "C.png", "a.png", "a0.png"):
            self.assertEqual(self.upload(name, png).status, 201)
        reply = self.request("GET", "/")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json, ["C.png", "a.png", "a0.png", "b.png"])

    def test_head_has_headers_but_no_body(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        head, get = self.raw_requests(("HEAD", "/", {}), ("GET", "/", {}))
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual(head.headers["Content-Type"], "application/json")
        self.assertEqual(head.headers["Content-Length"], str(len(get.body)))
        self.assertEqual(get.json, ["a.png"])

    def test_hidden_non_image_and_temp_files_are_never_listed(self):
        self.put_file("visible.jpg", make_image("JPEG"))
        self.put_file(".hidden.jpg", make_image("JPEG"))
        self.put_file("notes.txt", b"hello")
        self.put_file("no_extension", b"hello")
        self.put_file(ims.TEMP_PREFIX + f"{os.getpid()}-abc.jpg", b"half")
        os.mkdir(os.path.join(self.storage, "folder.jpg"))
        os.symlink(os.path.join(self.storage, "visible.jpg"), os.path.join(self.storage, "link.jpg"))
        self.assertEqual(self.request("GET", "/").json, ["visible.jpg"])

    def test_file_placed_in_folder_by_someone_else_shows_in_next_listing(self):
        hour_ago = time.time() - 3600
        os.utime(self.storage, (hour_ago, hour_ago))
        self.assertEqual(self.request("GET", "/").json, [])
        self.put_file("restored.png", make_image("PNG"))
        self.assertEqual(self.request("GET", "/").json, ["restored.png"])
        self.assertEqual(self.request("GET", "/restored.png").status, 200)

    def test_file_removed_from_folder_by_someone_else_disappears_from_next_listing(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        self.assertEqual(self.upload("b.png", make_image("PNG")).status, 201)
        hour_ago = time.time() - 3600
        os.utime(self.storage, (hour_ago, hour_ago))
        self.assertEqual(self.request("GET", "/").json, ["a.png", "b.png"])
        os.remove(os.path.join(self.storage, "a.png"))
        self.assertEqual(self.request("GET", "/").json, ["b.png"])
        self.assertError(self.request("GET", "/a.png"), 404, "a.png")

    def test_leftovers_of_dead_writers_are_removed_at_start_up(self):
        storage = os.path.join(self.tempdir.name, "prepared")
        os.mkdir(storage)
        leftover = self.put_file(f"{ims.TEMP_PREFIX}{dead_pid()}-x", b"half an upload", storage)
        leftover_jpg = self.put_file(f"{ims.TEMP_PREFIX}{dead_pid()}-y.jpg", b"half", storage)
        self.put_file("kept.jpg", make_image("JPEG"), storage)
        server = start_server(self, storage)
        self.assertFalse(os.path.exists(leftover))
        self.assertFalse(os.path.exists(leftover_jpg))
        self.assertEqual(folder_files(storage), ["kept.jpg"])
        reply = self.request("GET", "/", connection=self.connect(server.server_address))
        self.assertEqual(reply.json, ["kept.jpg"])

    def test_temp_file_of_a_live_writer_is_kept_at_start_up_but_not_listed(self):
        storage = os.path.join(self.tempdir.name, "shared")
        os.mkdir(storage)
        # Another IMS instance serving the same folder is writing this upload right now, and holds
        # its lock; its PID says nothing here (another host, another PID namespace).
        in_progress = ims.TempFile(os.path.join(storage, f"{ims.TEMP_PREFIX}{dead_pid()}-z.jpg"))
        self.addCleanup(in_progress.remove)
        in_progress.write(b"half")
        server = start_server(self, storage)
        self.assertTrue(os.path.exists(in_progress.path))
        in_progress.write(b" and the rest")
        in_progress.finish()
        with open(in_progress.path, "rb") as file:
            self.assertEqual(file.read(), b"half and the rest")
        self.assertEqual(self.request("GET", "/", connection=self.connect(server.server_address)).json, [])


# ====
# POST / — upload
# ====


class TestUpload(HTTPTestCase):
    def assertUploadRefused(self, reply, status, words):
        """The upload got `status` with a JSON message holding `words` (see assertError), and left nothing behind."""
        self.assertError(reply, status, words)
        self.assertNotIn("Location", reply.headers)
        self.assertNothingStored()

    def test_upload_is_201_with_message_and_location(self):
        data = make_image("JPEG")
        reply = self.upload("cat.jpg", data)
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        self.assertEqual(reply.json, "Image successfully uploaded")
        self.assertEqual(reply.headers["Location"], "/cat.jpg")
        self.assertEqual(self.stored_files(), ["cat.jpg"])
        self.assertNoTempFiles()

    def test_stored_bytes_equal_uploaded_bytes(self):
        for fmt, name in (("JPEG", "a.jpg"), ("PNG", "b.png"), ("GIF", "c.gif"), ("WEBP", "d.webp"),
                          ("BMP", "e.bmp"), ("TIFF", "f.tiff")):
            with self.subTest(fmt=fmt):
                data = make_image(fmt, size=(300, 200))
                self.assertEqual(self.upload(name, data).status, 201)
                with open(os.path.join(self.storage, name), "rb") as file:
                    self.assertEqual(file.read(), data)
                self.assertEqual(self.request("GET", "/" + name).body, data)

    def test_other_form_fields_are_ignored(self):
        data = make_image("PNG")
        body, content_type = multipart_body(files=[("file", "a.png", data)], fields=[("note", "hi"), ("x", "y")])
        reply = self.request("POST", "/", body, {"Content-Type": content_type})
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.stored_files(), ["a.png"])

    def test_name_with_spaces_is_stored_with_underscores(self):
        reply = self.upload("my holiday photo.jpg", make_image("JPEG"))
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(reply.headers["Location"], "/my_holiday_photo.jpg")
        self.assertEqual(self.stored_files(), ["my_holiday_photo.jpg"])
        self.assertEqual(self.request("GET", "/").json, ["my_holiday_photo.jpg"])

    def test_directory_parts_of_the_name_never_leave_the_folder(self):
        reply = self.upload("../../evil dir/x.jpg", make_image("JPEG"))
        self.assertEqual(reply.status, 201, reply.body)
        # Werkzeug's secure_filename("../../evil dir/x.jpg") == "evil_dir_x.jpg"
        self.assertEqual(reply.headers["Location"], "/evil_dir_x.jpg")
        self.assertEqual(self.stored_files(), ["evil_dir_x.jpg"])
        self.assertEqual(sorted(os.listdir(self.tempdir.name)), ["storage"])

    def test_windows_path_keeps_only_a_safe_name(self):
        reply = self.upload("C:\\Users\\me\\cat.jpg", make_image("JPEG"))
        self.assertEqual(reply.status, 201, reply.body)
        name = reply.headers["Location"][1:]
        self.assertNotIn("\\", name)
        self.assertEqual(self.stored_files(), [name])

    def test_upload_without_file_part_is_400(self):
        body, content_type = multipart_body(fields=[("note", "no image here")])
        self.assertUploadRefused(self.request("POST", "/", body, {"Content-Type": content_type}), 400, "file")

    def test_file_under_another_field_name_is_400(self):
        body, content_type = multipart_body(files=[("image", "a.png", make_image("PNG"))])
        self.assertUploadRefused(self.request("POST", "/", body, {"Content-Type": content_type}), 400, "file")

    def test_empty_filename_is_400(self):
        self.assertUploadRefused(self.upload("", make_image("PNG")), 400, "filename")

    def test_filename_with_nothing_left_once_made_safe_is_400(self):
        self.assertUploadRefused(self.upload("../..", make_image("PNG")), 400, "'../..'")

    def test_name_already_stored_is_409_and_keeps_the_first_file(self):
        first = make_image("PNG", color=(1, 2, 3))
        self.assertEqual(self.upload("a.png", first).status, 201)
        reply = self.upload("a.png", make_image("PNG", color=(250, 250, 250)))
        self.assertError(reply, 409, "a.png")
        self.assertEqual(self.stored_files(), ["a.png"])
        self.assertNoTempFiles()
        self.assertEqual(self.request("GET", "/a.png").body, first)

    def test_name_that_becomes_a_stored_name_once_made_safe_is_409(self):
        self.assertEqual(self.upload("my_cat.png", make_image("PNG")).status, 201)
        self.assertError(self.upload("my cat.png", make_image("PNG")), 409, "my_cat.png")
        self.assertEqual(self.stored_files(), ["my_cat.png"])
        self.assertNoTempFiles()

    def test_name_placed_in_folder_by_someone_else_is_409(self):
        self.put_file("taken.png", b"someone else's file")
        self.assertError(self.upload("taken.png", make_image("PNG")), 409, "taken.png")
        with open(os.path.join(self.storage, "taken.png"), "rb") as file:
            self.assertEqual(file.read(), b"someone else's file")
        self.assertNoTempFiles()

    def test_not_multipart_is_415(self):
        reply = self.request("POST", "/", make_image("JPEG"), {"Content-Type": "image/jpeg"})
        self.assertUploadRefused(reply, 415, ("multipart/form-data", "'image/jpeg'"))

    def test_no_content_type_is_415(self):
        self.assertUploadRefused(self.request("POST", "/", b"abc"), 415, "multipart/form-data")

    def test_not_an_image_is_415(self):
        self.assertUploadRefused(self.upload("notes.jpg", b"these are not the pixels you are looking for"), 415, "readable image")

    def test_truncated_image_is_415(self):
        data = make_image("PNG", size=(200, 200))
        self.assertUploadRefused(self.upload("cut.png", data[: len(data) // 2]), 415, "readable image")

    def test_a_phone_photo_with_further_images_appended_is_a_jpeg(self):
        # Phones and cameras write JPEGs with a depth map or preview appended (MPO).
        main = Image.open(io.BytesIO(make_image("PNG", (80, 60))))
        out = io.BytesIO()
        main.save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (20, 15), BLUE)])
        self.assertEqual(self.upload("phone.jpg", out.getvalue()).status, 201)
        reply = self.request("GET", "/phone.jpg")
        self.assertEqual((reply.headers["Content-Type"], reply.body), ("image/jpeg", out.getvalue()))

    def test_format_not_matching_extension_is_415(self):
        self.assertUploadRefused(self.upload("really_a_png.jpg", make_image("PNG")), 415, ("PNG", "'.jpg'"))

    def test_ico_named_jpg_is_415(self):
        self.assertUploadRefused(self.upload("icon.jpg", make_image("ICO", size=(32, 32))), 415, "readable image")

    def test_pdf_named_jpg_is_415(self):
        self.assertUploadRefused(self.upload("paper.jpg", make_image("PDF")), 415, "readable image")

    def test_name_without_image_extension_is_415(self):
        self.assertUploadRefused(self.upload("icon.ico", make_image("ICO", size=(32, 32))), 415, "'icon.ico'")

    def test_malformed_multipart_is_400(self):
        body = b'--b\r\nthis line is no header\r\n\r\ndata\r\n--b--\r\n'
        reply = self.request("POST", "/", body, {"Content-Type": "multipart/form-data; boundary=b"})
        self.assertUploadRefused(reply, 400, "this line is no header")

    def test_part_without_content_disposition_is_400(self):
        body = b"--b\r\nContent-Type: image/png\r\n\r\n" + make_image("PNG") + b"\r\n--b--\r\n"
        reply = self.request("POST", "/", body, {"Content-Type": "multipart/form-data; boundary=b"})
        self.assertUploadRefused(reply, 400, "Content-Disposition")

    def test_body_that_is_not_multipart_at_all_is_400(self):
        reply = self.request("POST", "/", b"just some bytes", {"Content-Type": "multipart/form-data; boundary=b"})
        self.assertUploadRefused(reply, 400, "closing boundary")

    def test_body_without_closing_boundary_is_400(self):
        body, content_type = multipart_body(files=[("file", "a.png", make_image("PNG"))])
        reply = self.request("POST", "/", body[: -len(b"--ims-test-boundary--\r\n")], {"Content-Type": content_type})
        self.assertUploadRefused(reply, 400, "closing boundary")

    def test_missing_boundary_is_400(self):
        body, _ = multipart_body(files=[("file", "a.png", make_image("PNG"))])
        reply = self.request("POST", "/", body, {"Content-Type": "multipart/form-data"})
        self.assertUploadRefused(reply, 400, "boundary")

    def test_truncated_body_is_400(self):
        body, content_type = multipart_body(files=[("file", "a.png", make_image("PNG", size=(400, 400)))])
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body) + 1000) + body[: len(body) // 2])
        wait_for(self.temp_files)
        sock.shutdown(socket.SHUT_WR)
        reply = self.parse_reply(self.read_until_close(sock))
        self.assertUploadRefused(reply, 400, f"of {len(body) + 1000} bytes")

    def test_no_content_length_and_not_chunked_is_411(self):
        _, content_type = multipart_body(files=[("file", "a.png", b"")])
        raw = self.raw_exchange(self.multipart_request_head(content_type, None, ["Connection: close"]))
        self.assertUploadRefused(self.parse_reply(raw), 411, "Content-Length")

    def test_client_disconnecting_mid_upload_leaves_nothing(self):
        body, content_type = multipart_body(files=[("file", "a.png", make_image("PNG", size=(400, 400)))])
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body)) + body[: len(body) // 2])
        wait_for(self.temp_files)
        sock.close()
        wait_for(lambda: self.stored_files() == [])
        self.assertNothingStored()

    def test_upload_in_progress_is_not_visible(self):
        data = make_image("PNG", size=(400, 400))
        body, content_type = multipart_body(files=[("file", "a.png", data)])
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body)) + body[: len(body) // 2])
        wait_for(self.temp_files)
        self.assertEqual(self.request("GET", "/").json, [])
        self.assertError(self.request("GET", "/a.png"), 404, "a.png")
        sock.sendall(body[len(body) // 2:])
        reply = self.read_reply(sock)
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.request("GET", "/").json, ["a.png"])
        self.assertEqual(self.request("GET", "/a.png").body, data)

    def test_chunked_upload_is_stored(self):
        data = make_image("PNG", size=(300, 300))
        body, content_type = multipart_body(files=[("file", "chunked.png", data)])
        pieces = [body[i:i + 1000] for i in range(0, len(body), 1000)]
        connection = self.connect()
        connection.request(
            "POST", "/", body=iter(pieces), encode_chunked=True,
            headers={"Content-Type": content_type, "Transfer-Encoding": "chunked"},
        )
        response = connection.getresponse()
        self.assertEqual(response.status, 201)
        self.assertEqual(json.loads(response.read()), "Image successfully uploaded")
        self.assertEqual(response.headers["Location"], "/chunked.png")
        with open(os.path.join(self.storage, "chunked.png"), "rb") as file:
            self.assertEqual(file.read(), data)
        self.assertNoTempFiles()
        self.assertConnectionStillServes(connection)

    def test_raw_chunked_upload_with_extensions_and_trailer_is_stored(self):
        data = make_image("GIF")
        body, content_type = multipart_body(files=[("file", "raw.gif", data)])
        middle = len(body) // 2
        chunked = (
            f"{middle:x};name=value\r\n".encode() + body[:middle] + b"\r\n"
            + f"{len(body) - middle:X}\r\n".encode() + body[middle:] + b"\r\n"
            + b"0\r\nX-Trailer: ignored\r\n\r\n"
        )
        head = self.multipart_request_head(content_type, None, ["Transfer-Encoding: chunked", "Connection: close"])
        reply = self.parse_reply(self.raw_exchange(head + chunked))
        self.assertEqual(reply.status, 201, reply.body)
        with open(os.path.join(self.storage, "raw.gif"), "rb") as file:
            self.assertEqual(file.read(), data)

    def test_expect_100_continue_is_answered_before_the_body(self):
        data = make_image("JPEG")
        body, content_type = multipart_body(files=[("file", "expect.jpg", data)])
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body), ["Expect: 100-continue"]))
        self.assertEqual(self.read_head(sock), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        reply = self.read_reply(sock)
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(reply.json, "Image successfully uploaded")
        with open(os.path.join(self.storage, "expect.jpg"), "rb") as file:
            self.assertEqual(file.read(), data)

    def test_expect_100_continue_gets_the_final_error_when_headers_are_wrong(self):
        sock = self.open_socket()
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: ims.test\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        reply = self.parse_reply(self.read_until_close(sock))
        self.assertUploadRefused(reply, 415, "'image/png'")

    def test_concurrent_uploads_of_one_name_store_exactly_one(self):
        count = 10
        images = [make_image("PNG", size=(200, 200), color=(20 * i, 100, 100)) for i in range(count)]
        results = self.upload_at_once("race.png", images)
        statuses = sorted(result[0] for result in results if result)
        self.assertEqual(statuses, [201] + [409] * (count - 1), results)
        winner = next(index for index, result in enumerate(results) if result[0] == 201)
        self.assertEqual(self.stored_files(), ["race.png"])
        with open(os.path.join(self.storage, "race.png"), "rb") as file:
            self.assertEqual(file.read(), images[winner])
        self.assertNoTempFiles()

    def test_keep_alive_serves_several_requests_including_after_a_read_4xx(self):
        connection = self.connect()
        png = make_image("PNG")
        self.assertEqual(self.upload("a.png", png, connection).status, 201)
        local_address = connection.sock.getsockname()
        body, content_type = multipart_body(fields=[("note", "no file")])
        reply = self.request("POST", "/", body, {"Content-Type": content_type}, connection)
        self.assertError(reply, 400, "'file'")
        self.assertNotEqual(reply.headers.get("Connection"), "close")
        self.assertError(self.upload("b.jpg", b"not an image", connection), 415, "readable image")
        self.assertError(self.request("GET", "/missing.png", connection=connection), 404, "missing.png")
        self.assertEqual(self.request("GET", "/a.png", connection=connection).body, png)
        self.assertEqual(self.request("GET", "/", connection=connection).json, ["a.png"])
        self.assertEqual(self.request("DELETE", "/a.png", connection=connection).status, 204)
        self.assertEqual(self.request("GET", "/", connection=connection).json, [])
        self.assertEqual(connection.sock.getsockname(), local_address, "the connection was not kept alive")

    def test_unexpected_error_during_upload_is_500_and_leaves_nothing(self):
        with mock.patch.object(ims.Handler, "log_error") as log_error:
            with mock.patch.object(ims, "check_image", side_effect=RuntimeError("secret internals")):
                reply = self.upload("a.png", make_image("PNG"))
        self.assertError(reply, 500, None)  # a generic message, of which nothing is fixed
        self.assertNotIn(b"Traceback", reply.body)
        self.assertNotIn(b"secret internals", reply.body)
        self.assertIn("RuntimeError", str(log_error.call_args))
        self.assertNothingStored()
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        self.assertEqual(self.request("GET", "/").json, ["a.png"])


class TestUploadBodyLimit(HTTPTestCase):
    server_options = {"max_upload": 2000}

    def body_of_length(self, length, name="a.png"):
        """A valid upload body of exactly `length` bytes, padded with an ignored field."""
        data = make_image("PNG", size=(8, 8))
        body, content_type = multipart_body(files=[("file", name, data)], fields=[("pad", "")])
        body, content_type = multipart_body(files=[("file", name, data)], fields=[("pad", "x" * (length - len(body)))])
        self.assertEqual(len(body), length)
        return body, content_type

    def test_body_of_exactly_max_upload_is_accepted(self):
        body, content_type = self.body_of_length(2000)
        self.assertEqual(self.request("POST", "/", body, {"Content-Type": content_type}).status, 201)
        self.assertEqual(self.stored_files(), ["a.png"])

    def test_body_larger_than_max_upload_is_413(self):
        body, content_type = self.body_of_length(2001)
        reply = self.request("POST", "/", body, {"Content-Type": content_type})
        self.assertError(reply, 413, "2000")
        self.assertNothingStored()

    def test_chunked_body_larger_than_max_upload_is_413(self):
        body, content_type = self.body_of_length(5000)
        connection = self.connect()
        connection.request(
            "POST", "/", body=iter([body[:1500], body[1500:3000], body[3000:]]), encode_chunked=True,
            headers={"Content-Type": content_type, "Transfer-Encoding": "chunked"},
        )
        response = connection.getresponse()
        reply = Reply(response.status, response.headers, response.read())
        self.assertError(reply, 413, "2000")
        self.assertNothingStored()

    def test_expect_with_too_large_content_length_is_413_at_once_and_closes(self):
        _, content_type = self.body_of_length(2000)
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, 100000, ["Expect: 100-continue"]))
        # The body is never sent: the answer must come from the headers alone, then the close.
        raw = self.read_until_close(sock)
        self.assertFalse(raw.startswith(b"HTTP/1.1 100"), raw)
        reply = self.parse_reply(raw)
        self.assertError(reply, 413, "100000")
        self.assertEqual(reply.headers["Connection"], "close")
        self.assertNothingStored()


class TestUploadPixelLimit(HTTPTestCase):
    server_options = {"max_pixels": 1000}

    def test_image_of_exactly_max_pixels_is_accepted(self):
        self.assertEqual(self.upload("small.png", make_image("PNG", size=(40, 25))).status, 201)

    def test_image_larger_than_max_pixels_is_413(self):
        reply = self.upload("big.png", make_image("PNG", size=(40, 26)))
        self.assertError(reply, 413, ("40x26", "1000"))
        self.assertNothingStored()


# ====
# GET /<name> — download
# ====


class TestDownload(HTTPTestCase):
    def stored(self, name, fmt="PNG", **options):
        data = make_image(fmt, **options)
        self.assertEqual(self.upload(name, data).status, 201)
        return data

    def assertDownloadHeaders(self, reply, name, content_type, data):
        file_status = os.stat(os.path.join(self.storage, name))
        self.assertEqual(reply.headers["Content-Type"], content_type)
        self.assertEqual(reply.headers["Content-Length"], str(len(data)))
        self.assertRegex(reply.headers["ETag"], r'^"[^"]+"$')
        self.assertEqual(reply.headers["Last-Modified"], email.utils.formatdate(file_status.st_mtime, usegmt=True))
        self.assertEqual(reply.headers["Cache-Control"], "no-cache")
        self.assertEqual(reply.headers["Content-Disposition"], f"inline; filename={name}")
        self.assertEqual(reply.headers["Accept-Ranges"], "bytes")

    def test_download_has_every_header_and_the_bytes(self):
        for fmt, name, content_type in (
            ("JPEG", "a.jpg", "image/jpeg"),
            ("JPEG", "b.JPEG", "image/jpeg"),
            ("PNG", "c.png", "image/png"),
            ("GIF", "d.gif", "image/gif"),
            ("WEBP", "e.webp", "image/webp"),
        ):
            with self.subTest(name=name):
                data = self.stored(name, fmt)
                reply = self.request("GET", "/" + name)
                self.assertEqual(reply.status, 200)
                self.assertEqual(reply.body, data)
                self.assertDownloadHeaders(reply, name, content_type, data)

    def test_head_has_the_same_headers_and_no_body(self):
        data = self.stored("a.png")
        head, get = self.raw_requests(("HEAD", "/a.png", {}), ("GET", "/a.png", {}))
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertDownloadHeaders(head, "a.png", "image/png", data)
        self.assertEqual(head.headers["ETag"], get.headers["ETag"])
        self.assertEqual(get.body, data)

    def test_etag_changes_when_the_file_changes(self):
        self.stored("a.png")
        before = self.request("GET", "/a.png").headers["ETag"]
        self.put_file("a.png", make_image("PNG", size=(10, 10)))
        self.assertNotEqual(self.request("GET", "/a.png").headers["ETag"], before)

    def test_if_none_match_with_current_etag_is_304_without_body(self):
        data = self.stored("a.png")
        etag = self.request("GET", "/a.png").headers["ETag"]
        not_modified, get = self.raw_requests(("GET", "/a.png", {"If-None-Match": etag}), ("GET", "/a.png", {}))
        self.assertEqual(not_modified.status, 304)
        self.assertEqual(not_modified.body, b"")
        self.assertEqual(not_modified.headers["ETag"], etag)
        self.assertEqual(get.body, data)

    def test_if_none_match_listing_the_etag_among_others_is_304(self):
        self.stored("a.png")
        etag = self.request("GET", "/a.png").headers["ETag"]
        reply = self.request("GET", "/a.png", headers={"If-None-Match": f'"other", W/{etag}'})
        self.assertEqual(reply.status, 304)

    def test_if_none_match_with_another_etag_is_200(self):
        data = self.stored("a.png")
        reply = self.request("GET", "/a.png", headers={"If-None-Match": '"something-else"'})
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, data)

    def test_if_modified_since_last_modified_is_304(self):
        data = self.stored("a.png")
        last_modified = self.request("GET", "/a.png").headers["Last-Modified"]
        not_modified, get = self.raw_requests(
            ("GET", "/a.png", {"If-Modified-Since": last_modified}), ("GET", "/a.png", {})
        )
        self.assertEqual(not_modified.status, 304)
        self.assertEqual(not_modified.body, b"")
        self.assertEqual(get.body, data)

    def test_if_modified_since_an_older_date_is_200(self):
        data = self.stored("a.png")
        reply = self.request("GET", "/a.png", headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, data)

    def test_range_of_first_bytes_is_206(self):
        data = self.stored("a.png", size=(100, 100))
        reply = self.request("GET", "/a.png", headers={"Range": "bytes=0-9"})
        self.assertEqual(reply.status, 206)
        self.assertEqual(reply.body, data[:10])
        self.assertEqual(reply.headers["Content-Range"], f"bytes 0-9/{len(data)}")
        self.assertEqual(reply.headers["Content-Length"], "10")
        self.assertEqual(reply.headers["Content-Type"], "image/png")

    def test_suffix_range_is_the_last_bytes(self):
        data = self.stored("a.png", size=(100, 100))
        reply = self.request("GET", "/a.png", headers={"Range": "bytes=-7"})
        self.assertEqual(reply.status, 206)
        self.assertEqual(reply.body, data[-7:])
        self.assertEqual(reply.headers["Content-Range"], f"bytes {len(data) - 7}-{len(data) - 1}/{len(data)}")

    def test_open_range_runs_to_the_end(self):
        data = self.stored("a.png", size=(100, 100))
        reply = self.request("GET", "/a.png", headers={"Range": "bytes=20-"})
        self.assertEqual(reply.status, 206)
        self.assertEqual(reply.body, data[20:])
        self.assertEqual(reply.headers["Content-Range"], f"bytes 20-{len(data) - 1}/{len(data)}")
        self.assertEqual(reply.headers["Content-Length"], str(len(data) - 20))

    def test_range_beyond_the_end_is_416(self):
        data = self.stored("a.png")
        reply = self.request("GET", "/a.png", headers={"Range": f"bytes={len(data)}-{len(data) + 10}"})
        self.assertError(reply, 416, f"'bytes={len(data)}-{len(data) + 10}'")
        self.assertEqual(reply.headers["Content-Range"], f"bytes */{len(data)}")

    def test_open_range_starting_at_or_past_the_end_is_416(self):
        data = self.stored("a.png")
        for first in (len(data), len(data) + 100):
            with self.subTest(first=first):
                reply = self.request("GET", "/a.png", headers={"Range": f"bytes={first}-"})
                self.assertError(reply, 416, f"'bytes={first}-'")
                self.assertEqual(reply.headers["Content-Range"], f"bytes */{len(data)}")

    def test_range_with_stale_if_range_sends_the_whole_file(self):
        data = self.stored("a.png", size=(100, 100))
        reply = self.request("GET", "/a.png", headers={"Range": "bytes=0-9", "If-Range": '"old-etag"'})
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, data)

    def test_unknown_name_is_404(self):
        reply = self.request("GET", "/missing.png")
        self.assertError(reply, 404, "missing.png")
        self.assertEqual(self.request("HEAD", "/missing.png").status, 404)

    def test_percent_encoded_name_is_decoded(self):
        data = self.stored("a-b_c.png")
        reply = self.request("GET", "/a%2Db%5Fc%2Epng")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, data)

    def test_name_that_needs_encoding_can_be_downloaded(self):
        data = make_image("JPEG")
        self.put_file("été photo.jpg", data)
        self.assertEqual(self.request("GET", "/").json, ["été photo.jpg"])
        reply = self.request("GET", "/" + urllib.parse.quote("été photo.jpg"))
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, data)
        self.assertEqual(reply.headers["Content-Type"], "image/jpeg")
        self.assertIn("filename*=UTF-8''%C3%A9t%C3%A9%20photo.jpg", reply.headers["Content-Disposition"])

    def test_download_in_progress_finishes_with_the_old_file_when_deleted(self):
        # Larger than the loopback socket buffers, so the server is still sending when it is deleted.
        data = os.urandom(24 * 1024 * 1024)
        self.put_file("big.png", data)
        connection = self.connect()
        connection.request("GET", "/big.png")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.request("DELETE", "/big.png").status, 204)
        self.assertFalse(os.path.exists(os.path.join(self.storage, "big.png")))
        body = response.read()
        self.assertEqual(len(body), len(data))
        self.assertTrue(body == data, "the download is not the whole old file")
        self.assertError(self.request("GET", "/big.png"), 404, "big.png")


# ====
# DELETE /<name> — delete
# ====


class TestDelete(HTTPTestCase):
    def test_delete_is_204_without_body_then_gone(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        deleted, listing = self.raw_requests(("DELETE", "/a.png", {}), ("GET", "/", {}))
        self.assertEqual(deleted.status, 204)
        self.assertEqual(deleted.body, b"")
        self.assertNotIn("Content-Type", deleted.headers)
        self.assertEqual(listing.json, [])
        self.assertError(self.request("GET", "/a.png"), 404, "a.png")
        self.assertEqual(self.stored_files(), [])

    def test_deleted_name_can_be_uploaded_again(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        self.assertEqual(self.upload("a.png", make_image("PNG", color=(0, 0, 0))).status, 201)

    def test_delete_unknown_is_404(self):
        self.assertError(self.request("DELETE", "/missing.png"), 404, "missing.png")

    def test_delete_twice_is_404_the_second_time(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        self.assertError(self.request("DELETE", "/a.png"), 404, "a.png")

    def test_if_match_with_current_etag_deletes(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        etag = self.request("HEAD", "/a.png").headers["ETag"]
        self.assertEqual(self.request("DELETE", "/a.png", headers={"If-Match": etag}).status, 204)
        self.assertEqual(self.stored_files(), [])

    def test_if_match_with_another_etag_is_412_and_keeps_the_file(self):
        data = make_image("PNG")
        self.assertEqual(self.upload("a.png", data).status, 201)
        etag = self.request("HEAD", "/a.png").headers["ETag"]
        self.put_file("a.png", make_image("PNG", size=(10, 10)))
        reply = self.request("DELETE", "/a.png", headers={"If-Match": etag})
        self.assertError(reply, 412, "a.png")
        self.assertEqual(self.stored_files(), ["a.png"])
        self.assertEqual(self.request("GET", "/").json, ["a.png"])
        self.assertError(self.request("DELETE", "/a.png", headers={"If-Match": '"made-up"'}), 412, "a.png")
        self.assertEqual(self.stored_files(), ["a.png"])


# ====
# Anything else
# ====


class TestMethodsAndPaths(HTTPTestCase):
    def test_put_on_root_is_405_with_allow(self):
        reply = self.request("PUT", "/", b"x")
        self.assertError(reply, 405, "PUT")
        self.assertEqual({method.strip() for method in reply.headers["Allow"].split(",")}, {"GET", "HEAD", "POST"})

    def test_put_on_image_is_405_with_allow(self):
        reply = self.request("PUT", "/x.jpg", b"x")
        self.assertError(reply, 405, "PUT")
        self.assertEqual(
            {method.strip() for method in reply.headers["Allow"].split(",")}, {"GET", "HEAD", "DELETE", "PATCH"}
        )
        self.assertEqual(self.stored_files(), [])

    def test_post_on_image_and_delete_on_root_are_405(self):
        self.assertError(self.request("POST", "/x.jpg", b""), 405, "POST")
        self.assertError(self.request("DELETE", "/"), 405, "DELETE")

    def test_unknown_method_is_405_not_501(self):
        reply = self.request("FOO", "/")
        self.assertError(reply, 405, "FOO")
        self.assertIn("GET", reply.headers["Allow"])
        self.assertError(self.request("FOO", "/x.jpg"), 405, "FOO")

    def test_unknown_method_on_unknown_path_is_404(self):
        self.assertError(self.request("FOO", "/nothing/here"), 404, "'/nothing/here'")

    def test_unknown_paths_are_404(self):
        for path in ("/x.txt", "/x", "/a/b.jpg", "/index.html", "/x.jpg/", "/favicon.ico", "/jobs"):
            with self.subTest(path=path):
                self.assertError(self.request("GET", path), 404, repr(path))

    def test_traversal_attempts_are_404_and_never_serve_outside_files(self):
        secret = b"outside the storage folder"
        self.put_file("x.jpg", secret, self.tempdir.name)
        self.put_file("secret.jpg", secret, self.tempdir.name)
        os.makedirs(os.path.join(self.tempdir.name, "etc"))
        self.put_file("passwd.jpg", secret, os.path.join(self.tempdir.name, "etc"))
        for path in (
            "/../x.jpg", "/..%2Fx.jpg", "/%2e%2e%2fsecret.jpg", "/%2E%2E/secret.jpg", "/%2Fetc%2Fpasswd.jpg",
            "//etc/passwd.jpg", "/..%5Cx.jpg", "/a%00.jpg", "/.hidden.jpg", "/%2ehidden.jpg", "/..", "/%ff.jpg",
        ):
            # Each names no image (a "/" or a backslash once decoded, NUL, a leading dot, no image
            # extension, not UTF-8), so the route answers 404 before any file is looked at.
            for method in ("GET", "HEAD", "DELETE"):
                with self.subTest(path=path, method=method):
                    reply = self.request(method, path)
                    self.assertNotIn(secret, reply.body)
                    if method == "HEAD":
                        self.assertEqual((reply.status, reply.body), (404, b""))
                    else:
                        self.assertError(reply, 404, repr(path))
        self.assertTrue(os.path.exists(os.path.join(self.tempdir.name, "x.jpg")))
        self.assertTrue(os.path.exists(os.path.join(self.tempdir.name, "secret.jpg")))
        self.assertTrue(os.path.exists(os.path.join(self.tempdir.name, "etc", "passwd.jpg")))

    def test_hidden_file_in_folder_is_not_served(self):
        self.put_file(".hidden.jpg", make_image("JPEG"))
        self.assertError(self.request("GET", "/.hidden.jpg"), 404, "'/.hidden.jpg'")
        self.assertError(self.request("DELETE", "/.hidden.jpg"), 404, "'/.hidden.jpg'")
        self.assertTrue(os.path.exists(os.path.join(self.storage, ".hidden.jpg")))

    def test_symlink_to_outside_file_is_not_served(self):
        outside = self.put_file("outside.jpg", b"outside the storage folder", self.tempdir.name)
        os.symlink(outside, os.path.join(self.storage, "link.jpg"))
        reply = self.request("GET", "/link.jpg")
        self.assertError(reply, 404, "link.jpg")
        self.assertNotIn(b"outside the storage folder", reply.body)

    def test_every_error_body_is_json_with_a_message(self):
        body, content_type = multipart_body(fields=[("a", "b")])
        cases = [
            (self.request("GET", "/missing.jpg"), 404, "missing.jpg"),
            (self.request("GET", "/nothing"), 404, "'/nothing'"),
            (self.request("PUT", "/"), 405, "PUT"),
            (self.request("POST", "/", body, {"Content-Type": content_type}), 400, "'file'"),
            (self.request("POST", "/", b"x", {"Content-Type": "text/plain"}), 415, "'text/plain'"),
            (self.request("DELETE", "/missing.jpg"), 404, "missing.jpg"),
        ]
        for reply, status, words in cases:
            with self.subTest(status=status, words=words):
                self.assertError(reply, status, words)

    def test_malformed_request_line_gets_a_4xx_json_answer(self):
        for request_line in (
            b"GARBAGE", b"GET / HTTP/1.1 extra", b"GET / HTTP/x.y", b"POST /", b"GET / FOO/1.1", b"GET  HTTP/1.1",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ):
            with self.subTest(request_line=request_line):
                raw = self.raw_exchange(request_line + b"\r\nHost: ims.test\r\n\r\n")
                self.assertError(self.parse_reply(raw), 400, "request line")

    def test_malformed_header_line_gets_a_400_json_answer(self):
        raw = self.raw_exchange(b"GET / HTTP/1.1\r\nHost: ims.test\r\nno colon here\r\n\r\n")
        reply = self.parse_reply(raw)
        self.assertError(reply, 400, "'no colon here'")

    def test_content_length_with_transfer_encoding_is_400(self):
        body, content_type = multipart_body(files=[("file", "a.png", make_image("PNG"))])
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        head = self.multipart_request_head(content_type, len(chunked), ["Transfer-Encoding: chunked"])
        reply = self.parse_reply(self.raw_exchange(head + chunked))
        self.assertError(reply, 400, "Content-Length")
        self.assertNothingStored()

    def test_two_different_content_lengths_are_400(self):
        body, content_type = multipart_body(files=[("file", "a.png", make_image("PNG"))])
        head = self.multipart_request_head(content_type, len(body), [f"Content-Length: {len(body) + 1}"])
        reply = self.parse_reply(self.raw_exchange(head + body + b"x"))
        self.assertError(reply, 400, "Content-Length")
        self.assertNothingStored()

    def test_repeated_equal_content_lengths_are_one_length(self):
        body, content_type = multipart_body(files=[("file", "a.png", make_image("PNG"))])
        head = self.multipart_request_head(content_type, len(body), [f"Content-Length: {len(body)}", "Connection: close"])
        reply = self.parse_reply(self.raw_exchange(head + body))
        self.assertEqual(reply.status, 201, reply.body)

    def test_unsupported_transfer_encoding_is_400(self):
        head = self.multipart_request_head("multipart/form-data; boundary=b", None, ["Transfer-Encoding: gzip, chunked"])
        reply = self.parse_reply(self.raw_exchange(head + b"0\r\n\r\n"))
        self.assertError(reply, 400, "chunked")
        self.assertNothingStored()

    def test_unexpected_error_in_a_handler_is_500_json_and_server_keeps_serving(self):
        with mock.patch.object(ims.Handler, "log_error") as log_error:
            with mock.patch.object(ims.Handler, "list_images", side_effect=RuntimeError("secret internals")):
                reply = self.request("GET", "/")
        self.assertIn("RuntimeError", str(log_error.call_args))
        self.assertError(reply, 500, None)  # a generic message, of which nothing is fixed
        self.assertNotIn(b"Traceback", reply.body)
        self.assertNotIn(b"secret internals", reply.body)
        self.assertEqual(self.request("GET", "/").json, [])

    def test_an_error_the_stdlib_would_answer_itself_is_json_not_html(self):
        def answer_as_the_stdlib_does(handler):
            handler.send_error(501, "Unsupported method ('GET')")

        with mock.patch.object(ims.Handler, "list_images", answer_as_the_stdlib_does):
            reply = self.request("GET", "/")
        self.assertError(reply, 501, "Unsupported method")
        self.assertNotIn(b"<", reply.body)
        self.assertEqual(self.request("GET", "/").json, [])


class TestOddFilesAndNames(HTTPTestCase):
    """What a careful user tries that the contract is silent on."""

    def test_a_fifo_with_an_image_name_is_neither_listed_nor_served_nor_resized(self):
        os.makedirs(self.storage, exist_ok=True)
        os.mkfifo(os.path.join(self.storage, "pipe.jpg"))
        self.assertEqual(self.request("GET", "/").json, [])
        self.assertError(self.request("GET", "/pipe.jpg"), 404, "pipe.jpg")
        self.assertError(self.request("PATCH", "/pipe.jpg?width=5&height=5"), 404, "pipe.jpg")

    def test_a_symbolic_link_or_folder_with_an_image_name_cannot_be_resized(self):
        outside = os.path.join(self.tempdir.name, "outside.png")
        with open(outside, "wb") as file:
            file.write(make_image("PNG"))
        os.symlink(outside, os.path.join(self.storage, "link.png"))
        os.mkdir(os.path.join(self.storage, "folder.png"))
        for name in ("link.png", "folder.png"):
            self.assertError(self.request("PATCH", f"/{name}?width=5&height=5"), 404, name)
        with Image.open(outside) as image:
            self.assertEqual(image.size, (64, 48))

    def test_a_url_with_the_unsafe_name_finds_the_safe_stored_name_as_the_old_service_did(self):
        self.assertEqual(self.upload("my photo.png", make_image("PNG")).headers["Location"], "/my_photo.png")
        self.assertEqual(self.request("GET", "/my%20photo.png").status, 200)
        self.assertEqual(self.request("DELETE", "/my%20photo.png").status, 204)
        self.assertEqual(self.request("GET", "/").json, [])

    def test_a_filename_with_nothing_but_its_extension_left_once_safe_is_400(self):
        self.assertError(self.upload("\u0444\u043e\u0442\u043e.jpeg", make_image("JPEG")), 400, ("nothing is left", "'\u0444\u043e\u0442\u043e.jpeg'"))
        self.assertNothingStored()

    def test_a_request_target_with_raw_non_ascii_bytes_is_400(self):
        reply = self.parse_reply(self.raw_exchange("GET /\u00e9.jpg HTTP/1.1\r\nConnection: close\r\n\r\n".encode("utf-8")))
        self.assertError(reply, 400, "ASCII")

    def test_a_request_whose_body_is_not_read_is_answered_with_connection_close(self):
        self.upload("a.png", make_image("PNG"))
        connection = self.connect()
        reply = self.request("DELETE", "/a.png", body=b'{"why": "testing"}', connection=connection)
        self.assertEqual(reply.status, 204)
        self.assertEqual(reply.headers["Connection"], "close")

    def test_if_modified_since_in_the_future_is_ignored(self):
        self.upload("a.png", make_image("PNG"))
        future = email.utils.formatdate(time.time() + 86400, usegmt=True)
        self.assertEqual(self.request("GET", "/a.png", headers={"If-Modified-Since": future}).status, 200)

    def place(self, name, data):
        """Put a file into the folder by hand, as a person or a backup restore would."""
        with open(os.path.join(self.storage, name), "wb") as file:
            file.write(data)

    def test_a_file_placed_by_hand_is_served_as_its_real_format_not_its_extension(self):
        for image_format, name, content_type in (
            ("PNG", "photo.jpg", "image/png"),
            ("JPEG", "scan.png", "image/jpeg"),
            ("GIF", "anim.webp", "image/gif"),
            ("WEBP", "phone.gif", "image/webp"),
            ("BMP", "old.tif", "image/bmp"),
            ("TIFF", "print.bmp", "image/tiff"),
        ):
            with self.subTest(name=name):
                data = make_image(image_format)
                self.place(name, data)
                for method in ("GET", "HEAD"):
                    reply = self.request(method, f"/{name}")
                    self.assertEqual(reply.status, 200, reply.body)
                    self.assertEqual(reply.headers["Content-Type"], content_type)
                self.assertEqual(reply.headers["Content-Length"], str(len(data)))

    def test_a_file_placed_by_hand_that_is_no_image_is_served_as_octet_stream(self):
        self.place("notes.jpg", b"shopping list: milk, eggs")
        reply = self.request("GET", "/notes.jpg")
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/octet-stream")
        self.assertEqual(reply.body, b"shopping list: milk, eggs")

    def test_a_file_replaced_by_hand_with_another_format_changes_its_content_type(self):
        self.place("swap.png", make_image("PNG"))
        self.assertEqual(self.request("GET", "/swap.png").headers["Content-Type"], "image/png")
        temp = os.path.join(self.storage, ".swap")
        with open(temp, "wb") as file:
            file.write(make_image("JPEG", size=(65, 48)))
        os.replace(temp, os.path.join(self.storage, "swap.png"))
        self.assertEqual(self.request("GET", "/swap.png").headers["Content-Type"], "image/jpeg")


# ====
# Resizing and jobs
# ====


# make_image's colours: the left half, the right half, the small marker in the top-left corner.
RED = (200, 30, 30)
BLUE = (20, 20, 220)
GREEN = (20, 200, 20)
ICC_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
EXIF_MAKE = 0x010F
EXIF_ORIENTATION = 0x0112
FORMAT_BY_SUFFIX = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF"}
JOB_FIELDS = {"id", "image", "width", "height", "fit", "state", "error", "submitted", "finished"}


def noise(size, seed=SEED):
    """Return an RGB image of seeded random pixels: it does not compress, and every byte shows."""
    count = size[0] * size[1] * 3
    return Image.frombytes("RGB", size, random.Random(seed).getrandbits(count * 8).to_bytes(count, "little"))


def encode(image, image_format, **options):
    """Return the bytes of `image` saved in `image_format`."""
    out = io.BytesIO()
    image.save(out, format=image_format, **options)
    return out.getvalue()


def decode(data):
    """Open and fully decode image bytes; a truncated or mixed file raises."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def animation(image_format, colors=(RED, GREEN, BLUE), durations=(100, 200, 300), loop=3, size=(64, 48)):
    """Return an animated image with one plain colour per frame (so no two frames can be merged)."""
    frames = [Image.new("RGB", size, color) for color in colors]
    return encode(
        frames[0], image_format, save_all=True, append_images=frames[1:], duration=list(durations), loop=loop
    )


def frames_of(image):
    """Return (duration, centre colour) for every frame of an opened image."""
    frames = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        image.load()
        centre = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
        frames.append((image.info.get("duration"), centre))
    return frames


def epoch_of(value):
    """Return a job timestamp (ISO 8601 text or a number of seconds) as seconds since the epoch."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


# A source that makes a resize run for a long time at no cost to the test: upscaling 200x200 of
# noise to a 4000x4000 PNG takes about 9 s of CPU here, and a test stops its process (SIGSTOP)
# besides, so it never ends on its own; deleting the image or server_close() kills it.
# SLOW_ENOUGH takes about 1.5 s of CPU: ample time to catch its process and stop it, short enough
# to wait for once it is let go on.
SLOW_SOURCE = encode(noise((200, 200)), "PNG")
SLOW_FOREVER = "width=4000&height=4000"
SLOW_ENOUGH = "width=2000&height=2000"


def is_stopped(pid):
    """Tell whether process `pid` is stopped (SIGSTOP); True where /proc cannot tell (not Linux)."""
    if not os.path.isdir("/proc/self"):
        return True
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] in ("T", "t")
    except FileNotFoundError:
        return False


class ColourAssertions:
    """Pixel comparisons with room for resampling and lossy codecs."""

    def assertColour(self, pixel, expected, tolerance=45):
        self.assertEqual(len(pixel[:3]), 3, pixel)
        distance = max(abs(a - b) for a, b in zip(pixel[:3], expected))
        self.assertLessEqual(distance, tolerance, f"{pixel} is not close to {expected}")

    def assertLeftRedRightBlue(self, image):
        """The picture make_image draws, neither rotated nor mirrored (marker aside)."""
        rgb = image.convert("RGB")
        middle = rgb.height // 2
        self.assertColour(rgb.getpixel((rgb.width // 4, middle)), RED)
        self.assertColour(rgb.getpixel((rgb.width * 3 // 4, middle)), BLUE)

    def assertFitsContain(self, size, source_size, box):
        """`size` is the largest size of `source_size`'s aspect ratio inside `box`."""
        width, height = size
        self.assertLessEqual(width, box[0])
        self.assertLessEqual(height, box[1])
        self.assertTrue(width == box[0] or height == box[1], f"{size} does not touch the sides of {box}")
        self.assertAlmostEqual(width / height, source_size[0] / source_size[1], delta=0.02)


# ====
# Image work
# ====


class TestImageWork(ColourAssertions, unittest.TestCase):
    """resize_file() on files in a temporary folder, no server."""

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)

    def resized_bytes(self, data, suffix, width, height, fit="fill"):
        """Write `data` to a file, resize it with resize_file() and return the bytes of the result."""
        source = os.path.join(self.tempdir.name, f"source.{suffix}")
        target = os.path.join(self.tempdir.name, f"target.{suffix}")
        with open(source, "wb") as file:
            file.write(data)
        ims.resize_file(source, target, width, height, fit)
        with open(target, "rb") as file:
            return file.read()

    def resized(self, data, suffix, width, height, fit="fill"):
        """The result of resized_bytes(), opened and decoded."""
        return decode(self.resized_bytes(data, suffix, width, height, fit))

    def assertUprightPortrait(self, image):
        """Orientation 6 on make_image's picture, applied: the left (red) half on top, the marker top right."""
        self.assertLess(image.width, image.height)
        self.assertEqual(image.getexif().get(EXIF_ORIENTATION, 1), 1)
        rgb = image.convert("RGB")
        self.assertColour(rgb.getpixel((rgb.width // 2, rgb.height // 4)), RED)
        self.assertColour(rgb.getpixel((rgb.width // 2, rgb.height * 3 // 4)), BLUE)
        self.assertColour(rgb.getpixel((rgb.width - 4, 4)), GREEN)
        self.assertColour(rgb.getpixel((4, 4)), RED)

    def test_exif_orientation_is_applied_and_the_result_stored_upright(self):
        # Stored landscape 400x300 with Orientation 6: shown rotated 90° clockwise, 300x400.
        image = self.resized(make_image("JPEG", (400, 300), orientation=6), "jpg", 300, 300, "contain")
        self.assertEqual(image.format, "JPEG")
        self.assertEqual(image.size, (225, 300))
        self.assertUprightPortrait(image)

    def test_resizing_an_upright_result_does_not_rotate_it_again(self):
        first = self.resized_bytes(make_image("JPEG", (400, 300), orientation=6), "jpg", 300, 300, "contain")
        second = self.resized(first, "jpg", 150, 150, "contain")
        self.assertFitsContain(second.size, (225, 300), (150, 150))
        self.assertUprightPortrait(second)

    def test_a_tiff_with_an_orientation_is_turned_upright_once(self):
        # Pillow turns a TIFF upright as it loads it; IMS must not turn it a second time.
        picture = Image.open(io.BytesIO(make_image("PNG", (400, 300))))
        out = io.BytesIO()
        picture.save(out, "TIFF", tiffinfo={EXIF_ORIENTATION: 6})
        image = self.resized(out.getvalue(), "tif", 300, 300, "contain")
        self.assertEqual(image.size, (225, 300))
        self.assertUprightPortrait(image)
        with io.BytesIO(out.getvalue()) as file:
            self.assertEqual(ims.upright_size(file), (300, 400))

    def test_cover_whose_centred_crop_rounds_past_an_edge_still_resizes(self):
        # 800x600 covered by 100x158: the centred crop's left edge computes as -4e-16.
        image = self.resized(make_image("PNG", (800, 600)), "png", 100, 158, "cover")
        self.assertEqual(image.size, (100, 158))

    def test_upright_size_reads_a_png_header_without_decoding_its_pixels(self):
        # Decoding a big PNG in the server to answer a PATCH would cost its whole size in memory.
        with mock.patch.object(PngImagePlugin.PngImageFile, "load", side_effect=AssertionError("decoded")):
            for data, size in ((make_image("PNG", (400, 300)), (400, 300)), (make_image("PNG", (400, 300), orientation=6), (300, 400))):
                with io.BytesIO(data) as file:
                    self.assertEqual(ims.upright_size(file), size)

    def test_an_mpo_photo_resizes_to_a_plain_jpeg_of_its_main_picture(self):
        main = Image.open(io.BytesIO(make_image("PNG", (400, 300))))
        out = io.BytesIO()
        main.save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (40, 30), BLUE)])
        image = self.resized(out.getvalue(), "jpg", 200, 150)
        self.assertEqual((image.format, image.size), ("JPEG", (200, 150)))
        self.assertLeftRedRightBlue(image)

    def test_every_orientation_comes_out_the_way_it_was_shown(self):
        source = Image.open(io.BytesIO(make_image("PNG", (80, 60))))
        for orientation in range(1, 9):
            with self.subTest(orientation=orientation):
                exif = Image.Exif()
                exif[EXIF_ORIENTATION] = orientation
                data = encode(source, "PNG", exif=exif.tobytes())
                # Pillow's own reading of the tag is the reference.
                expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).resize((40, 40))
                image = self.resized(data, "png", 40, 40, "fill")
                self.assertEqual(image.getexif().get(EXIF_ORIENTATION, 1), 1)
                for point in ((3, 3), (36, 3), (3, 36), (36, 36), (20, 20)):
                    self.assertColour(image.convert("RGB").getpixel(point), expected.convert("RGB").getpixel(point))

    def test_fill_gives_exactly_the_box(self):
        image = self.resized(make_image("PNG", (64, 48)), "png", 50, 70, "fill")
        self.assertEqual(image.size, (50, 70))
        self.assertLeftRedRightBlue(image)

    def test_contain_keeps_the_aspect_ratio_inside_the_box(self):
        for source_size, box in (((400, 300), (200, 200)), ((64, 48), (300, 300)), ((300, 400), (500, 100))):
            with self.subTest(source_size=source_size, box=box):
                image = self.resized(make_image("PNG", source_size), "png", *box, "contain")
                self.assertFitsContain(image.size, source_size, box)
                self.assertLeftRedRightBlue(image)

    def test_cover_gives_exactly_the_box_and_keeps_the_centre(self):
        # Thirds red, green, blue: only the green centre may be left once the sides are cropped.
        wide = Image.new("RGB", (300, 100), RED)
        wide.paste(GREEN, (100, 0, 200, 100))
        wide.paste(BLUE, (200, 0, 300, 100))
        for source, box in ((wide, (100, 100)), (wide.transpose(Image.Transpose.ROTATE_90), (50, 50))):
            with self.subTest(source=source.size, box=box):
                image = self.resized(encode(source, "PNG"), "png", *box, "cover")
                self.assertEqual(image.size, box)
                rgb = image.convert("RGB")
                for point in ((2, 2), (box[0] - 3, box[1] - 3), (box[0] // 2, box[1] // 2), (2, box[1] - 3)):
                    self.assertColour(rgb.getpixel(point), GREEN)

    def test_cover_of_a_wide_box_crops_top_and_bottom(self):
        tall = Image.new("RGB", (100, 300), RED)
        tall.paste(GREEN, (0, 100, 100, 200))
        tall.paste(BLUE, (0, 200, 100, 300))
        image = self.resized(encode(tall, "PNG"), "png", 90, 30, "cover")
        self.assertEqual(image.size, (90, 30))
        self.assertColour(image.convert("RGB").getpixel((45, 2)), GREEN)
        self.assertColour(image.convert("RGB").getpixel((45, 27)), GREEN)

    def test_the_format_is_kept(self):
        for suffix, image_format in FORMAT_BY_SUFFIX.items():
            with self.subTest(image_format=image_format):
                image = self.resized(make_image(image_format, (64, 48)), suffix, 32, 24, "fill")
                self.assertEqual(image.format, image_format)
                self.assertEqual(image.size, (32, 24))
                self.assertLeftRedRightBlue(image)

    def test_the_icc_profile_is_kept(self):
        for suffix, image_format in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("tif", "TIFF")):
            with self.subTest(image_format=image_format):
                image = self.resized(make_image(image_format, (64, 48), icc=ICC_PROFILE), suffix, 32, 24, "fill")
                self.assertEqual(image.size, (32, 24))
                self.assertEqual(image.info.get("icc_profile"), ICC_PROFILE)

    def test_other_exif_tags_are_kept_without_the_orientation(self):
        source = Image.open(io.BytesIO(make_image("PNG", (64, 48))))
        exif = Image.Exif()
        exif[EXIF_MAKE] = "IMS Test Camera"
        exif[EXIF_ORIENTATION] = 6
        for suffix, image_format in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("tif", "TIFF")):
            with self.subTest(image_format=image_format):
                image = self.resized(encode(source, image_format, exif=exif.tobytes()), suffix, 30, 40, "fill")
                self.assertEqual(image.size, (30, 40))
                self.assertEqual(image.getexif().get(EXIF_MAKE), "IMS Test Camera")
                self.assertEqual(image.getexif().get(EXIF_ORIENTATION, 1), 1)

    def test_png_alpha_is_kept(self):
        source = Image.new("RGBA", (64, 48), RED + (255,))
        source.paste((0, 0, 0, 0), (32, 0, 64, 48))
        image = self.resized(encode(source, "PNG"), "png", 32, 24, "fill").convert("RGBA")
        self.assertEqual(image.getpixel((28, 12))[3], 0)
        self.assertEqual(image.getpixel((4, 12)), RED + (255,))

    def palette_source(self):
        """A palette image: red left, blue right, a bottom strip of the transparent index 2."""
        source = Image.new("P", (64, 48), 0)
        source.putpalette([*RED, *BLUE, 0, 0, 0])
        source.paste(1, (32, 0, 64, 48))
        source.paste(2, (0, 40, 64, 48))
        return source

    def test_a_palette_png_stays_valid_and_transparent(self):
        image = self.resized(encode(self.palette_source(), "PNG", transparency=2), "png", 32, 24, "fill")
        self.assertEqual(image.format, "PNG")
        rgba = image.convert("RGBA")
        self.assertColour(rgba.getpixel((4, 4)), RED, tolerance=4)
        self.assertColour(rgba.getpixel((28, 4)), BLUE, tolerance=4)
        self.assertGreater(rgba.getpixel((4, 4))[3], 250)
        self.assertEqual(rgba.getpixel((4, 23))[3], 0)

    def test_a_gif_stays_valid_and_transparent(self):
        image = self.resized(encode(self.palette_source(), "GIF", transparency=2), "gif", 32, 24, "fill")
        self.assertEqual(image.format, "GIF")
        rgba = image.convert("RGBA")
        self.assertColour(rgba.getpixel((4, 4)), RED, tolerance=4)
        self.assertColour(rgba.getpixel((28, 4)), BLUE, tolerance=4)
        self.assertEqual(rgba.getpixel((4, 23))[3], 0)

    def test_animated_gif_and_webp_keep_their_frames_durations_and_loop(self):
        # WebP is lossy by default, so its colours may drift a little more.
        for image_format, suffix, tolerance in (("GIF", "gif", 4), ("WEBP", "webp", 12)):
            with self.subTest(image_format=image_format):
                image = self.resized(animation(image_format), suffix, 32, 24, "fill")
                self.assertEqual((image.format, image.size, image.n_frames), (image_format, (32, 24), 3))
                self.assertEqual(image.info.get("loop"), 3)
                frames = frames_of(image)
                self.assertEqual([duration for duration, _ in frames], [100, 200, 300])
                for (_, centre), expected in zip(frames, (RED, GREEN, BLUE)):
                    self.assertColour(centre, expected, tolerance=tolerance)

    def test_a_cmyk_jpeg_is_resized(self):
        data = make_image("JPEG", (64, 48), mode="CMYK")
        self.assertEqual(Image.open(io.BytesIO(data)).mode, "CMYK")
        image = self.resized(data, "jpg", 32, 24, "fill")
        self.assertEqual((image.format, image.size), ("JPEG", (32, 24)))
        self.assertLeftRedRightBlue(image)

    def test_a_16_bit_png_is_resized_and_keeps_its_depth(self):
        row = struct.pack("<64H", *([1000] * 32 + [60000] * 32))
        source = Image.frombytes("I;16", (64, 48), row * 48)
        self.assertEqual((source.getpixel((4, 4)), source.getpixel((60, 4))), (1000, 60000))
        image = self.resized(encode(source, "PNG"), "png", 32, 24, "fill")
        self.assertEqual((image.format, image.size), ("PNG", (32, 24)))
        self.assertIn(image.mode, ("I;16", "I;16B", "I"))
        self.assertAlmostEqual(image.getpixel((4, 12)), 1000, delta=50)
        self.assertAlmostEqual(image.getpixel((28, 12)), 60000, delta=300)

    def test_jpeg_quality_does_not_collapse(self):
        source = encode(noise((512, 512)), "JPEG", quality=95)
        result = self.resized_bytes(source, "jpg", 256, 256, "fill")
        self.assertEqual(decode(result).size, (256, 256))
        # The same pixels saved at Pillow's default quality 75: noise makes the size follow the quality
        # (about 2.3 times as large at the source's 95).
        at_quality_75 = encode(Image.open(io.BytesIO(source)).resize((256, 256), Image.Resampling.LANCZOS), "JPEG", quality=75)
        self.assertGreater(len(result), 1.5 * len(at_quality_75))

    def test_an_unreadable_file_raises(self):
        broken = make_image("PNG", (64, 48))[:60]
        with self.assertRaises(OSError):
            self.resized(broken, "png", 32, 24, "fill")


# ====
# HTTP: PATCH /<name> and GET /jobs/<id>
# ====


class ResizeTestCase(ColourAssertions, ServerTestCase):
    """ServerTestCase plus the requests resizing needs."""

    def store(self, name, data):
        """Upload `data` as `name` and check it was stored."""
        reply = self.upload(name, data)
        self.assertEqual(reply.status, 201, reply.body)

    def patch(self, name, query="", body=None, headers=None, connection=None):
        """PATCH /<name>?<query> and return the Reply."""
        return self.request("PATCH", f"/{name}" + (f"?{query}" if query else ""), body, headers, connection)

    def submit(self, name, query, connection=None):
        """PATCH with a query string, expect 202, return the job's location."""
        reply = self.patch(name, query, connection=connection)
        self.assertEqual(reply.status, 202, reply.body)
        return reply.headers["Location"]

    def job(self, location, connection=None):
        """GET the job now, without waiting."""
        reply = self.request("GET", location, connection=connection)
        self.assertEqual(reply.status, 200, reply.body)
        return reply.json

    def download(self, name):
        """GET /<name> and return the image, decoded."""
        reply = self.request("GET", f"/{name}")
        self.assertEqual(reply.status, 200, reply.body)
        return decode(reply.body)

    def start_slow_resize(self, name="slow.png", query=SLOW_FOREVER):
        """Store SLOW_SOURCE and start a resize of it that cannot end; return its location.

        Its process is stopped (see hold()), so the job stays running, and holds its worker, until
        the test deletes the image or the server stops; both kill the process.
        """
        if name not in self.request("GET", "/").json:
            self.store(name, SLOW_SOURCE)
        children = set(multiprocessing.active_children())
        location = self.submit(name, query)
        self.hold(location, children)
        return location

    def hold(self, location, children_before):
        """Stop (SIGSTOP) the resize process of the job at `location`; return its pid.

        `children_before` are multiprocessing.active_children() from before the job was submitted;
        the job must start at once (a worker free) and run long enough to be caught.
        """
        def new_children():
            return set(multiprocessing.active_children()) - children_before

        # "running" is reported a moment before the process is started.
        wait_for(lambda: new_children() or self.job(location)["state"] in ENDED_STATES)
        children = new_children()
        self.assertEqual(len(children), 1, f"not one new resize process: {children}")
        pid = children.pop().pid
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: is_stopped(pid) or self.job(location)["state"] in ENDED_STATES)
        self.assertTrue(is_stopped(pid), "the resize ended before it could be stopped")
        self.assertEqual(self.job(location)["state"], "running")
        return pid

    def wait_in_background(self, location, seconds, connection=None):
        """Send GET <location>?wait=<seconds> from a thread; return (thread, answers) once it is sent.

        `answers` gets (status, job JSON) when the answer comes.
        """
        connection = connection or self.connect()
        sent, answers = threading.Event(), []

        def wait():
            connection.request("GET", f"{location}?wait={seconds}")
            sent.set()
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        self.assertTrue(sent.wait(DEADLINE_SECONDS), "the request could not be sent")
        return waiter, answers


class TestResize(ResizeTestCase):
    def test_patch_answers_202_with_the_location_of_its_job(self):
        self.store("a.png", make_image("PNG"))
        reply = self.patch("a.png", "width=32&height=24")
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(reply.json, "Image resize command received")
        self.assertRegex(reply.headers["Location"], r"^/jobs/[A-Za-z0-9_-]+$")
        self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")
        self.assertEqual(self.download("a.png").size, (32, 24))
        self.assertNoTempFiles()

    def test_parameters_in_a_json_body(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        for body, size in (({"width": 40, "height": 20}, (40, 20)), ({"width": "30", "height": "16"}, (30, 16))):
            with self.subTest(body=body):
                reply = self.patch("a.png", body=json.dumps(body), headers={"Content-Type": "application/json"})
                self.assertEqual(reply.status, 202, reply.body)
                self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")
                self.assertEqual(self.download("a.png").size, size)

    def test_parameters_in_a_form_body_as_requests_sends_them(self):
        # requests.patch(url, {"width": 256, "height": 256}) sends exactly this.
        self.store("a.png", make_image("PNG", (64, 48)))
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        reply = self.patch("a.png", body=b"width=256&height=256", headers=headers)
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")
        image = self.download("a.png")
        self.assertEqual(image.size, (256, 256))
        self.assertLeftRedRightBlue(image)

    def test_parameters_in_the_query_string(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        for query, size in (("width=32&height=32&fit=contain", (32, 24)), ("width=20&height=20&fit=cover", (20, 20))):
            with self.subTest(query=query):
                location = self.submit("a.png", query)
                self.assertEqual(self.wait_job(location)["state"], "done")
                self.assertEqual(self.download("a.png").size, size)

    def test_fit_defaults_to_fill(self):
        self.store("a.jpg", make_image("JPEG", (64, 48)))
        job = self.wait_job(self.submit("a.jpg", "width=50&height=70"))
        self.assertEqual((job["state"], job["fit"]), ("done", "fill"))
        self.assertEqual(self.download("a.jpg").size, (50, 70))

    def test_a_photo_with_exif_orientation_comes_back_upright(self):
        self.store("photo.jpg", make_image("JPEG", (400, 300), orientation=6))
        self.assertEqual(self.wait_job(self.submit("photo.jpg", "width=300&height=300&fit=contain"))["state"], "done")
        image = self.download("photo.jpg")
        self.assertEqual(image.size, (225, 300))
        self.assertEqual(image.getexif().get(EXIF_ORIENTATION, 1), 1)
        self.assertColour(image.convert("RGB").getpixel((112, 60)), RED)
        self.assertColour(image.convert("RGB").getpixel((112, 240)), BLUE)

    def test_invalid_parameters_are_400_naming_the_parameter(self):
        self.store("a.png", make_image("PNG"))
        cases = [
            ("", "width"),
            ("height=10", "width"),
            ("width=10", "height"),
            ("width=&height=10", "width"),
            ("width=abc&height=10", "width"),
            ("width=0&height=10", "width"),
            ("width=10&height=0", "height"),
            ("width=-3&height=10", "width"),
            ("width=1.5&height=10", "width"),
            ("width=12px&height=10", "width"),
            ("width=10&height=%20", "height"),
            ("width=10&height=10&fit=stretch", "fit"),
            ("width=10&height=10&fit=", "fit"),
            ("width=10000&height=9001", "pixels"),
        ]
        for query, words in cases:
            with self.subTest(query=query):
                self.assertError(self.patch("a.png", query), 400, words)
        json_cases = [
            ({"width": 1.5, "height": 10}, "width"),
            ({"width": True, "height": 10}, "width"),
            ({"width": None, "height": 10}, "width"),
            ({"width": [10], "height": 10}, "width"),
            ({"width": -1, "height": 10}, "width"),
            ({"width": "0", "height": 10}, "width"),
            ({"width": 10, "height": "ten"}, "height"),
            ({"width": 10, "height": 10, "fit": "squash"}, "fit"),
            ({"width": 10, "height": 10, "fit": 1}, "fit"),
            ({"width": 10 ** 12, "height": 10 ** 12}, "pixels"),
        ]
        for body, words in json_cases:
            with self.subTest(body=body):
                reply = self.patch("a.png", body=json.dumps(body), headers={"Content-Type": "application/json"})
                self.assertError(reply, 400, words)
        bodies = [
            (b"{not json", "application/json", "JSON"),
            (b"[10, 10]", "application/json", "JSON"),
            (b"width", "application/x-www-form-urlencoded", "form"),
        ]
        for body, content_type, words in bodies:
            with self.subTest(body=body):
                self.assertError(self.patch("a.png", body=body, headers={"Content-Type": content_type}), 400, words)
        self.assertEqual(self.download("a.png").size, (64, 48))

    def test_unknown_image_is_404(self):
        self.assertError(self.patch("nothing.png", "width=10&height=10"), 404, "nothing.png")

    def test_if_match_with_another_etag_is_412_and_the_current_one_is_accepted(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        etag = self.request("HEAD", "/a.png").headers["ETag"]
        self.assertError(self.patch("a.png", "width=10&height=10", headers={"If-Match": '"another"'}), 412, "a.png")
        reply = self.patch("a.png", "width=20&height=10", headers={"If-Match": etag})
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")
        self.assertEqual(self.download("a.png").size, (20, 10))
        # The resize made a new version: the old ETag no longer matches.
        self.assertError(self.patch("a.png", "width=30&height=10", headers={"If-Match": etag}), 412, "a.png")

    def test_twenty_resizes_of_one_image_apply_in_the_order_they_were_accepted(self):
        self.store("a.jpg", make_image("JPEG", (200, 150)))
        connection = self.connect()
        locations = [self.submit("a.jpg", f"width={40 + i}&height={30 + i}", connection) for i in range(20)]
        self.wait_job(locations[-1])
        jobs = [self.wait_job(location) for location in locations]
        self.assertEqual([job["state"] for job in jobs], ["done"] * 20)
        self.assertEqual([(job["width"], job["height"]) for job in jobs], [(40 + i, 30 + i) for i in range(20)])
        finished = [epoch_of(job["finished"]) for job in jobs]
        self.assertEqual(finished, sorted(finished))
        self.assertEqual(self.download("a.jpg").size, (59, 49))
        self.assertNoTempFiles()

    def test_readers_during_resizes_always_get_a_whole_image(self):
        self.store("r.png", encode(noise((300, 300)), "PNG"))
        sizes = [(290, 290) if i % 2 else (310, 310) for i in range(10)]
        seen, failures, stop = [], [], threading.Event()
        reader_connection = self.connect()

        def read_in_a_loop():
            while not stop.is_set():
                try:
                    reply = self.request("GET", "/r.png", connection=reader_connection)
                    if reply.status != 200:
                        failures.append(reply.status)
                    else:
                        seen.append(decode(reply.body).size)
                except Exception as error:
                    failures.append(repr(error))

        reader = threading.Thread(target=read_in_a_loop)
        reader.start()
        try:
            wait_for(lambda: len(seen) + len(failures) > 0)
            locations = [self.submit("r.png", f"width={w}&height={h}") for w, h in sizes]
            self.assertEqual(self.wait_job(locations[-1])["state"], "done")
            # How many reads fall during the resizes is up to the scheduler. The reader goes on
            # until it has read more times than there were resizes, and has begun a read after
            # the last resize (the read after the one in flight now).
            reads_when_done = len(seen)
            wait_for(lambda: failures or len(seen) > max(len(sizes), reads_when_done + 1))
        finally:
            stop.set()
            reader.join()
        self.assertEqual(failures, [])
        self.assertLessEqual(set(seen), {(300, 300), (290, 290), (310, 310)})
        self.assertEqual((seen[0], seen[reads_when_done + 1]), ((300, 300), sizes[-1]))

    def test_delete_cancels_the_queued_resizes(self):
        running = self.start_slow_resize()
        queued = [self.submit("slow.png", "width=10&height=10"), self.submit("slow.png", "width=20&height=20")]
        for location in queued:
            self.assertEqual(self.job(location)["state"], "queued")
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        for location in queued:
            job = self.wait_job(location)
            self.assertEqual(job["state"], "cancelled")
            self.assertIsNotNone(job["finished"])
        self.assertEqual(self.wait_job(running)["state"], "cancelled")
        self.assertError(self.request("GET", "/slow.png"), 404, "slow.png")

    def test_delete_during_a_running_resize_does_not_bring_the_image_back(self):
        location = self.start_slow_resize()
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertEqual(self.wait_job(location)["state"], "cancelled")
        self.assertError(self.request("GET", "/slow.png"), 404, "slow.png")
        self.assertEqual(self.request("GET", "/").json, [])
        # The job is recorded cancelled at once; its process is killed and its temp file removed
        # a moment later.
        wait_for(lambda: not self.temp_files())
        self.assertEqual(self.stored_files(), [])

    def test_delete_stops_the_running_resize_process(self):
        self.start_slow_resize()
        self.assertEqual(len(multiprocessing.active_children()), 1)
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        # The process is stopped: only a kill ends it.
        wait_for(lambda: not multiprocessing.active_children())

    def test_delete_and_upload_again_during_a_running_resize_keeps_the_new_upload(self):
        location = self.start_slow_resize()
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        replacement = make_image("PNG", (30, 20))
        self.store("slow.png", replacement)
        self.assertEqual(self.wait_job(location)["state"], "cancelled")
        self.assertEqual(self.request("GET", "/slow.png").body, replacement)
        # Recorded cancelled at once by the DELETE; the temp file goes a moment later.
        wait_for(lambda: not self.temp_files())

    def test_a_file_replaced_in_the_folder_during_a_resize_is_not_overwritten(self):
        # Someone else (a person, a backup restore, another IMS) replaces the file while it is
        # resized: the resize process is stopped meanwhile, then let go on to finish.
        self.store("slow.png", SLOW_SOURCE)
        children = set(multiprocessing.active_children())
        location = self.submit("slow.png", SLOW_ENOUGH)
        pid = self.hold(location, children)
        replacement = make_image("PNG", (30, 20))
        temp_path = os.path.join(self.storage, ".replacement")
        with open(temp_path, "wb") as file:
            file.write(replacement)
        os.replace(temp_path, os.path.join(self.storage, "slow.png"))
        os.kill(pid, signal.SIGCONT)
        self.assertEqual(self.wait_job(location)["state"], "cancelled")
        self.assertEqual(self.request("GET", "/slow.png").body, replacement)
        self.assertNoTempFiles()

    def test_resize_of_an_unreadable_image_fails_its_job_and_the_server_goes_on(self):
        # Placed in the folder by someone else: uploads are checked, files in the folder are not.
        broken = make_image("PNG", (64, 48))[:60]
        with open(os.path.join(self.storage, "broken.png"), "wb") as file:
            file.write(broken)
        job = self.wait_job(self.submit("broken.png", "width=10&height=10"))
        self.assertEqual(job["state"], "failed")
        self.assertIsInstance(job["error"], str)
        self.assertTrue(job["error"])
        with open(os.path.join(self.storage, "broken.png"), "rb") as file:
            self.assertEqual(file.read(), broken)
        self.store("a.png", make_image("PNG"))
        self.assertEqual(self.wait_job(self.submit("a.png", "width=10&height=10"))["state"], "done")
        self.assertNoTempFiles()


class TestResizeWithOneWorkerAndOneQueued(ResizeTestCase):
    server_options = {"resize_workers": 1, "max_queue": 1}

    def test_a_full_queue_is_503_with_retry_after(self):
        self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        queued = self.submit("a.png", "width=10&height=10")
        reply = self.patch("a.png", "width=20&height=20")
        self.assertError(reply, 503, "try again later")
        self.assertRegex(reply.headers.get("Retry-After", ""), r"^\d+$")
        self.assertEqual(self.job(queued)["state"], "queued")

    def test_if_match_with_another_etag_queues_nothing(self):
        self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        self.assertError(self.patch("a.png", "width=10&height=10", headers={"If-Match": '"another"'}), 412, "a.png")
        # The one queue slot is still free, so the 412 took none.
        self.submit("a.png", "width=20&height=20")
        self.assertError(self.patch("a.png", "width=30&height=30"), 503, "try again later")

    def test_a_queued_resize_of_a_deleted_image_is_cancelled_while_others_run_on(self):
        running = self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        queued = self.submit("a.png", "width=10&height=10")
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        self.assertEqual(self.wait_job(queued)["state"], "cancelled")
        self.assertEqual(self.job(running)["state"], "running")


class TestResizeWithoutQueue(ResizeTestCase):
    server_options = {"resize_workers": 1, "max_queue": 0}

    def test_a_resize_runs_at_once_when_a_worker_is_free(self):
        self.store("a.png", make_image("PNG"))
        reply = self.patch("a.png", "width=10&height=10")
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")

    def test_a_resize_is_503_when_every_worker_is_busy(self):
        self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        self.assertError(self.patch("a.png", "width=10&height=10"), 503, "try again later")


class TestResizePixelLimit(ResizeTestCase):
    server_options = {"max_pixels": 10_000}

    def test_a_result_over_max_pixels_is_400(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        self.assertError(self.patch("a.png", "width=101&height=100"), 400, ("101x100", "10000"))
        self.assertEqual(self.wait_job(self.submit("a.png", "width=100&height=100"))["state"], "done")
        self.assertEqual(self.download("a.png").size, (100, 100))

    def test_contain_is_judged_by_its_result_not_by_the_box(self):
        # 100x100 contained in 1000x50 is 50x50: 2,500 pixels, though the box has 50,000.
        self.store("square.png", make_image("PNG", (100, 100)))
        self.assertEqual(self.wait_job(self.submit("square.png", "width=1000&height=50&fit=contain"))["state"], "done")
        self.assertEqual(self.download("square.png").size, (50, 50))

    def test_contain_whose_result_is_over_max_pixels_is_400(self):
        self.store("wide.png", make_image("PNG", (100, 50)))
        # 100x50 contained in 300x300 is 300x150: 45,000 pixels.
        self.assertError(self.patch("wide.png", "width=300&height=300&fit=contain"), 400, "300x150")
        self.assertEqual(self.download("wide.png").size, (100, 50))

    def test_contain_reads_the_upright_size_of_a_turned_photo(self):
        # Stored 200x50 with orientation 6, it shows 50x200; contained in 40x400 that is 40x160.
        self.store("turned.jpg", make_image("JPEG", (200, 50), orientation=6))
        self.assertEqual(self.wait_job(self.submit("turned.jpg", "width=40&height=400&fit=contain"))["state"], "done")
        self.assertEqual(self.download("turned.jpg").size, (40, 160))
        self.assertError(self.patch("turned.jpg", "width=400&height=400&fit=contain"), 400, "100x400")


class TestResizeTimeLimit(ResizeTestCase):
    # SLOW_FOREVER needs about 9 s of CPU, far past the limit; the small resize after it needs a
    # few milliseconds, far below it even on a loaded machine.
    server_options = {"resize_timeout": 2}

    def test_a_resize_past_the_time_limit_is_stopped_and_fails(self):
        self.store("slow.png", SLOW_SOURCE)
        job = self.wait_job(self.submit("slow.png", SLOW_FOREVER))
        self.assertEqual(job["state"], "failed")
        self.assertIn("2 seconds", job["error"])
        self.assertEqual(multiprocessing.active_children(), [])
        self.assertEqual(self.request("GET", "/slow.png").body, SLOW_SOURCE)
        self.assertNoTempFiles()
        # The server goes on serving, and resizing.
        self.store("a.png", make_image("PNG"))
        self.assertEqual(self.wait_job(self.submit("a.png", "width=10&height=10"))["state"], "done")
        self.assertEqual(self.request("GET", "/").json, ["a.png", "slow.png"])


class TestResizeOnOneWorker(ResizeTestCase):
    server_options = {"resize_workers": 1}

    def test_queued_resizes_checked_against_one_etag_apply_only_to_that_version(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        etag = self.request("HEAD", "/a.png").headers["ETag"]
        # Both are queued while the one worker is held, so both are accepted against one version.
        self.start_slow_resize()
        first = self.patch("a.png", "width=32&height=24", headers={"If-Match": etag})
        second = self.patch("a.png", "width=16&height=12", headers={"If-Match": etag})
        self.assertEqual((first.status, second.status), (202, 202))
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertEqual(self.wait_job(first.headers["Location"])["state"], "done")
        late = self.wait_job(second.headers["Location"])
        self.assertEqual(late["state"], "failed")
        self.assertIn("If-Match", late["error"])
        self.assertEqual(self.download("a.png").size, (32, 24))

    def test_a_failed_job_names_no_server_path(self):
        with open(os.path.join(self.storage, "broken.png"), "wb") as file:
            file.write(b"\x89PNG\r\n\x1a\n not really a PNG")
        job = self.wait_job(self.submit("broken.png", "width=5&height=5"))
        self.assertEqual(job["state"], "failed")
        self.assertNotIn(self.storage, job["error"])
        self.assertNotIn(ims.TEMP_PREFIX, job["error"])


class TestJobs(ResizeTestCase):
    server_options = {"resize_workers": 1}

    def test_a_job_has_every_field_of_the_contract(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        before = time.time()
        reply = self.patch(
            "a.png", body=json.dumps({"width": "40", "height": 40, "fit": "contain"}), headers={"Content-Type": "application/json"}
        )
        self.assertEqual(reply.status, 202, reply.body)
        job = self.wait_job(reply.headers["Location"])
        after = time.time()
        self.assertEqual(set(job), JOB_FIELDS)
        self.assertEqual(reply.headers["Location"], f"/jobs/{job['id']}")
        expected = {"image": "a.png", "width": 40, "height": 40, "fit": "contain", "state": "done", "error": None}
        self.assertEqual({key: job[key] for key in expected}, expected)
        self.assertIs(type(job["width"]), int)
        submitted, finished = epoch_of(job["submitted"]), epoch_of(job["finished"])
        self.assertLessEqual(before - 1, submitted)
        self.assertLessEqual(submitted, finished)
        self.assertLessEqual(finished, after + 1)

    def test_queued_and_running_jobs_show_their_state_before_the_end(self):
        running = self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        queued = self.submit("a.png", "width=10&height=10")
        for location, state in ((running, "running"), (queued, "queued")):
            with self.subTest(state=state):
                job = self.job(location)
                self.assertEqual(set(job), JOB_FIELDS)
                self.assertEqual((job["state"], job["error"], job["finished"]), (state, None, None))
                self.assertIsNotNone(job["submitted"])

    def test_wait_answers_as_soon_as_the_job_ends(self):
        # The job waited on is queued behind one that cannot end. Deleting that one's image frees
        # the worker, and the job runs and ends: the answer must come then, with the job done,
        # not when the 60 s of ?wait= are up. (Were the DELETE served before the wait began, the
        # answer would be the same; the request is sent first so that it is already waiting.)
        self.start_slow_resize()
        self.store("a.png", make_image("PNG", (64, 48)))
        location = self.submit("a.png", "width=32&height=24")
        self.assertEqual(self.job(location)["state"], "queued")
        waiter, answers = self.wait_in_background(location, 60)
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        waiter.join(DEADLINE_SECONDS)
        self.assertFalse(waiter.is_alive(), "the answer waited for the whole ?wait=")
        self.assertEqual([(status, job["state"]) for status, job in answers], [(200, "done")], answers)
        self.assertEqual(self.download("a.png").size, (32, 24))

    def test_wait_answers_when_the_time_is_up(self):
        # Neither job can end while the test runs: the first one's process is stopped, and the
        # second, of the same image, waits for it.
        running = self.start_slow_resize()
        queued = self.submit("slow.png", "width=10&height=10")
        for location, state in ((running, "running"), (queued, "queued")):
            with self.subTest(state=state):
                reply = self.request("GET", f"{location}?wait=0.5")
                self.assertEqual(reply.status, 200, reply.body)
                self.assertEqual((reply.json["state"], reply.json["finished"]), (state, None))

    def test_unknown_job_is_404(self):
        self.assertError(self.request("GET", "/jobs/no-such-job"), 404, "'no-such-job'")
        self.assertError(self.request("GET", "/jobs/no-such-job?wait=5"), 404, "'no-such-job'")

    def test_invalid_wait_is_400(self):
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10")
        for wait in ("-1", "abc", "nan", "1e999"):
            with self.subTest(wait=wait):
                self.assertError(self.request("GET", f"{location}?wait={wait}"), 400, ("wait", repr(wait)))

    def test_wait_above_60_is_accepted(self):
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10")
        self.assertEqual(self.wait_job(location)["state"], "done")
        for wait in ("61", "3600"):
            with self.subTest(wait=wait):
                reply = self.request("GET", f"{location}?wait={wait}")
                self.assertEqual(reply.status, 200, reply.body)
                self.assertEqual(reply.json["state"], "done")


# ====
# The real process
# ====


def start_ims(test, *arguments, env=None, log=None, wrapper=()):
    """Start `python3 ims.py --port 0 ...` and return (process, port) once it has said it listens.

    The process leads a session of its own, so its resize processes can be told from others (see
    session_processes()). Its request log goes to a file: a pipe that nobody reads would stop the
    server once the log filled it, after a number of requests that depends on the machine's speed.
    `log` is that file when the test reads it (a temporary one otherwise); `wrapper` is a command
    that runs ims.py, such as unshare(1)'s.
    """
    if log is None:
        log = tempfile.TemporaryFile()
        test.addCleanup(log.close)
    process = subprocess.Popen(
        [*wrapper, sys.executable, os.path.join(HERE, "ims.py"), "--port", "0", *arguments],
        stdout=subprocess.PIPE,
        stderr=log,
        env=dict(os.environ, **(env or {})),
        cwd=HERE,
        text=True,
        start_new_session=True,
    )

    def stop():
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()

    test.addCleanup(stop)
    line = process.stdout.readline()
    test.assertRegex(line, r"^IMS serving .+ on http://127\.0\.0\.1:\d+\n$")
    return process, int(line.rsplit(":", 1)[1])


def session_processes(session_id):
    """Return the ids of the processes of session `session_id` that still run (zombies aside).

    Reads /proc (Linux); elsewhere returns [], so a test that waits for it waits for nothing.
    """
    pids = []
    if not os.path.isdir("/proc/self"):
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command name: state, parent, process group, session (proc(5)).
        if fields[0] != "Z" and int(fields[3]) == session_id:
            pids.append(int(entry))
    return pids


def kill_session(session_id):
    """SIGKILL every process of session `session_id` that still runs."""
    for pid in session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ====
# GET /<name>?width=… — renditions: bad input
# ====
# parse_rendition_query() and parse_rendition_sizes() on their own, then the same refusals over
# HTTP: every invalid parameter is a 400 naming it (for GET and HEAD, on a connection that stays
# open), cache-busting parameters are ignored, an unknown image is 404 once the parameters have
# been read, a file that is not a readable image is 422, and nothing is ever a 500.


# (query, words its 400 message holds): one row for every way a rendition query can be refused
# whatever the image. MAX_PIXELS is the default --max-pixels that these rows assume.
RENDITION_ERROR_ROWS = (
    ("width=0", "width"),
    ("width=-1", "width"),
    ("width=abc", ("width", "'abc'")),
    ("width=1.5", ("width", "1.5")),
    ("width=1e3", "width"),
    ("width=0x10", "width"),
    ("width=", "width"),
    ("width", "width"),
    ("width=%2B5", ("width", "'+5'")),
    ("width=+5", ("width", "' 5'")),
    ("width=5+", ("width", "'5 '")),
    ("width=%D9%A3", "width"),  # ARABIC-INDIC DIGIT THREE: a digit to str.isdigit(), not to IMS
    ("width=%EF%BC%95", "width"),  # FULLWIDTH DIGIT FIVE
    ("width=1" + "0" * 18, "width"),  # 19 digits: past MAX_DIMENSION
    ("width=50%26height=20", ("width", "50&height=20")),  # an encoded & separates nothing
    ("width=3;height=4", ("width", "3;height=4")),  # nor does a semicolon
    ("width=5%23frag", "width"),
    ("height=0", "height"),
    ("height=-3", "height"),
    ("height=x", ("height", "'x'")),
    ("width=10&height=0", "height"),
    ("width=10&height=10&fit=stretch", ("fit", "stretch")),
    ("width=10&height=10&fit=FILL", ("fit", "FILL")),
    ("width=10&height=10&fit=", "fit"),
    ("width=10&height=10&fit=cover%20", "fit"),
    ("width=10&height=10&fit=%00", "fit"),
    ("width=10&fit=crop", ("fit", "crop")),  # refused even where a single side ignores fit
    ("format=bmp", ("format", "bmp")),
    ("format=tiff", ("format", "tiff")),
    ("format=", "format"),
    ("format=jpe", "format"),
    ("format=png%00", "format"),
    ("format=.png", "format"),
    ("format=image%2Fpng", "format"),
    ("format=%C4%B0", "format"),  # "İ", whose lower() is two characters
    ("quality=0", "quality"),
    ("quality=101", ("quality", "101")),
    ("quality=-5", "quality"),
    ("quality=50.5", "quality"),
    ("quality=", "quality"),
    ("quality=abc", ("quality", "abc")),
    ("quality=" + "9" * 30, "quality"),
    ("width=10&quality=0", "quality"),
    ("widht=300", "widht"),
    ("Width=300", "'Width'"),
    ("w=300", "'w'"),
    ("size=300x200", "'size'"),
    ("=300", "unknown parameter"),
    ("width=50&dpr=2", "'dpr'"),
    ("V=3", "'V'"),  # the cache-busting names are case-sensitive
    ("width=10&width=10", ("width", "twice")),
    ("width=10&width=20", ("width", "twice")),
    ("width=1&height=1&fit=cover&fit=cover", ("fit", "twice")),
    ("format=png&format=png", ("format", "twice")),
    ("quality=5&quality=5", ("quality", "twice")),
    ("height=5&height=6", ("height", "twice")),
    ("width=10&wid%74h=10", ("width", "twice")),  # the same name once decoded
    ("width=%ff", "UTF-8"),
    ("%ff=1", "UTF-8"),
    ("v=%ff", "UTF-8"),  # the query is decoded before cache busters are set aside
    ("width=10&format=%C0%AF", "UTF-8"),  # an overlong encoding of "/"
    ("width=%ED%A0%80", "UTF-8"),  # an encoded surrogate
    ("width=9001&height=10000", str(MAX_PIXELS)),
    ("width=9001&height=10000&fit=cover", str(MAX_PIXELS)),
    ("width=999999999999999999&height=999999999999999999", str(MAX_PIXELS)),
)

# Pieces the seeded garbage of query strings is made of: the names and values that matter, their
# near misses, and the characters that a query parser treats specially.
GARBAGE_KEYS = (
    "width", "height", "fit", "format", "quality", "v", "_", "t", "ts", "cb", "version",
    "widht", "Width", "w", "", "wid%74h", "%77idth", "width%00", "width ", "dpr", "%ff", "%", "+",
)
GARBAGE_VALUES = (
    "", "0", "1", "7", "20", "050", "-1", "+3", "%2B3", " 3", "1.5", "1e3", "99999999999999999999",
    "999999999999999999", "%ff", "%00", "%", "%e2%82", "%C0%AF", "cover", "contain", "fill", "FILL",
    "png", "jpeg", "jpg", "JPEG", "webp", "gif", "avif", "bmp", "tiff", "%c3%a9", "50", "100", "101",
    "%D9%A3", "&", "=", ";", "#",
)
GARBAGE_CHARACTERS = "&=%+;#?/.,-_~!$'()*:@[]0123456789abcdefxX"


def garbage_query(rng, ascii_only=True):
    """Return a random query string: parameters, near misses and stray characters.

    `ascii_only` keeps to the printable ASCII that a request target can carry; otherwise any
    character but a lone surrogate may appear as well (str.encode cannot encode those, and a
    request target decoded from bytes never holds one).
    """
    parts = []
    for _ in range(rng.randint(0, 6)):
        roll = rng.random()
        if roll < 0.6:
            parts.append(f"{rng.choice(GARBAGE_KEYS)}={rng.choice(GARBAGE_VALUES)}")
        elif roll < 0.75:
            parts.append(rng.choice(GARBAGE_KEYS))
        elif roll < 0.9 or ascii_only:
            parts.append("".join(rng.choice(GARBAGE_CHARACTERS) for _ in range(rng.randint(0, 12))))
        else:
            characters = []
            for _ in range(rng.randint(1, 6)):
                code = rng.choice((rng.randint(0x80, 0xFF), rng.randint(0x100, 0xD7FF), rng.randint(0xE000, 0x10FFFF)))
                characters.append(chr(code))
            parts.append("".join(characters))
    query = rng.choice(("&", "&", "&", "&&", ";")).join(parts)
    # http.client sends no space in a target; a form encodes it as "+".
    return query.replace(" ", "+") if ascii_only else query


def garbage_sizes(rng):
    """Return a random --rendition-sizes text: sizes, near misses and stray characters."""
    items = []
    for _ in range(rng.randint(0, 5)):
        roll = rng.random()
        if roll < 0.5:
            width = rng.choice(("", " ", "0", "7", "200", "0012", "999999999", "1000000000", "-1", "+1", "1.5"))
            cross = rng.choice(("x", "x", "X", "*", " x ", "xx", ""))
            height = rng.choice(("", " ", "0", "9", "1200", "0x0", "12345678901", "\t", "\u0663"))
            items.append(width + cross + height)
        elif roll < 0.8:
            items.append(rng.choice(("any", "ANY", "0x0", " ", "", "x", "auto", "200x200x200", "\n200x200\n")))
        else:
            items.append("".join(rng.choice("0123456789xX ,;\t\n-+.*\u0663\u00d7") for _ in range(rng.randint(0, 10))))
    return rng.choice((",", ",", ", ", ";")).join(items)


class TestParseRenditionQuery(unittest.TestCase):
    """parse_rendition_query(): a Rendition, None for the original, or HTTPError(400) naming the parameter."""

    def parse(self, query, max_pixels=MAX_PIXELS, allowed_sizes=None):
        return ims.parse_rendition_query(query, max_pixels, allowed_sizes)

    def assertRefused(self, query, *words, max_pixels=MAX_PIXELS, allowed_sizes=None):
        """The query is refused with HTTPError(400) whose message holds every one of `words`."""
        self.assertTrue(words, "name what the message must hold")
        with self.assertRaises(ims.HTTPError, msg=query) as caught:
            self.parse(query, max_pixels, allowed_sizes)
        self.assertEqual(caught.exception.status, 400, query)
        self.assertIsInstance(caught.exception.message, str)
        for word in words:
            self.assertIn(word, caught.exception.message, query)
        return caught.exception.message

    def test_every_error_row_is_400_naming_the_parameter(self):
        for query, words in RENDITION_ERROR_ROWS:
            with self.subTest(query=query):
                self.assertRefused(query, *((words,) if isinstance(words, str) else words))

    def test_no_query_or_only_separators_is_the_original(self):
        for query in ("", "&", "&&&"):
            with self.subTest(query=query):
                self.assertIsNone(self.parse(query))

    def test_cache_busting_parameters_alone_are_the_original(self):
        for query in ("v=3", "_=1700000000000", "t=1", "ts=2", "cb=x", "version=7", "v=", "v",
                      "v=1&v=2", "_=1&t=2&ts=3&cb=4&version=5&v=6", "v=%2F..%2F"):
            with self.subTest(query=query):
                self.assertIsNone(self.parse(query))

    def test_cache_busting_parameters_beside_a_rendition_are_ignored(self):
        expected = ims.Rendition(50, None, "fill", None, None)
        for query in ("width=50&v=3", "v=3&width=50", "width=50&v=1&v=2", "_=9&width=50&cb=abc"):
            with self.subTest(query=query):
                self.assertEqual(self.parse(query), expected)

    def test_each_parameter_alone_is_read(self):
        self.assertEqual(self.parse("width=50"), ims.Rendition(50, None, "fill", None, None))
        self.assertEqual(self.parse("height=40"), ims.Rendition(None, 40, "fill", None, None))
        self.assertEqual(self.parse("width=5&height=4&fit=cover"), ims.Rendition(5, 4, "cover", None, None))
        self.assertEqual(self.parse("format=webp"), ims.Rendition(None, None, "fill", "WEBP", None))
        self.assertEqual(self.parse("quality=1"), ims.Rendition(None, None, "fill", None, 1))
        self.assertEqual(self.parse("quality=100"), ims.Rendition(None, None, "fill", None, 100))

    def test_fit_alone_is_accepted_as_a_rendition_at_the_original_size(self):
        # As built: fit without a side is not refused; it asks for a re-encoding at the original size.
        self.assertEqual(self.parse("fit=cover"), ims.Rendition(None, None, "cover", None, None))

    def test_percent_encoded_names_and_values_are_decoded(self):
        self.assertEqual(self.parse("wid%74h=50"), ims.Rendition(50))
        self.assertEqual(self.parse("%77idth=%35%30&fit=%63over&height=%33"), ims.Rendition(50, 3, "cover"))
        self.assertEqual(self.parse("format=%70%6E%67"), ims.Rendition(format="PNG"))

    def test_leading_zeros_and_18_digits_are_read_as_numbers(self):
        self.assertEqual(self.parse("width=050"), ims.Rendition(50))
        self.assertEqual(self.parse("width=000000000000000050"), ims.Rendition(50))
        self.assertEqual(self.parse("quality=007"), ims.Rendition(quality=7))
        self.assertEqual(self.parse("quality=0100"), ims.Rendition(quality=100))
        # One side alone is checked against the image, not here.
        self.assertEqual(self.parse("width=999999999999999999"), ims.Rendition(10 ** 18 - 1))

    def test_format_names_are_case_insensitive_and_jpg_is_jpeg(self):
        for text, image_format in (("jpeg", "JPEG"), ("jpg", "JPEG"), ("JPG", "JPEG"), ("Jpeg", "JPEG"),
                                   ("png", "PNG"), ("PNG", "PNG"), ("WebP", "WEBP"), ("gif", "GIF"), ("GIF", "GIF")):
            with self.subTest(format=text):
                self.assertEqual(self.parse(f"format={text}").format, image_format)

    def test_avif_is_accepted_exactly_where_pillow_writes_it(self):
        # What was parsed before is kept per query, whatever the mock says.
        ims.parse_rendition_query.cache_clear()
        self.addCleanup(ims.parse_rendition_query.cache_clear)
        with mock.patch.object(ims, "AVIF_IS_WRITABLE", True):
            self.assertEqual(self.parse("width=5&format=avif").format, "AVIF")
            self.assertEqual(self.parse("format=AVIF").format, "AVIF")
        ims.parse_rendition_query.cache_clear()
        with mock.patch.object(ims, "AVIF_IS_WRITABLE", False):
            self.assertRefused("width=5&format=avif", "avif")
            self.assertRefused("format=AVIF", "avif")
            self.assertEqual(self.parse("width=5&format=webp").format, "WEBP")
        if ims.AVIF_IS_WRITABLE:
            self.assertEqual(self.parse("format=avif").format, "AVIF")
        else:
            self.assertRefused("format=avif", "avif")

    def test_unknown_parameter_names_are_truncated_in_the_message(self):
        message = self.assertRefused("x" * 5000 + "=1", "'" + "x" * 100)
        self.assertLess(len(message), 1000)
        message = self.assertRefused("format=" + "p" * 5000, "format", "p" * 100)
        self.assertLess(len(message), 1000)
        message = self.assertRefused("width=1&height=1&fit=" + "c" * 5000, "fit", "c" * 100)
        self.assertLess(len(message), 1000)
        message = self.assertRefused("quality=" + "1" * 5000, "quality")
        self.assertLess(len(message), 1000)

    def test_the_first_problem_in_the_query_is_the_one_named(self):
        # Names in order of the query; a repeat is found before the values are read.
        self.assertRefused("widht=1&width=0", "widht")
        self.assertRefused("width=0&width=0", "twice")
        self.assertRefused("width=1&fit=cover&fit=bad&height=1", "fit", "twice")

    def test_result_of_exactly_max_pixels_is_accepted_and_one_more_is_not(self):
        self.assertEqual(self.parse("width=3&height=3", max_pixels=9), ims.Rendition(3, 3))
        self.assertEqual(self.parse("width=3&height=3&fit=cover", max_pixels=9), ims.Rendition(3, 3, "cover"))
        self.assertRefused("width=3&height=3", "3x3", "8", max_pixels=8)
        self.assertRefused("width=3&height=3&fit=cover", "3x3", "8", max_pixels=8)

    def test_contain_and_a_single_side_are_left_to_the_image(self):
        # Their result depends on the image's aspect ratio: download_image checks them on a miss.
        self.assertEqual(self.parse("width=3&height=3&fit=contain", max_pixels=8), ims.Rendition(3, 3, "contain"))
        self.assertEqual(self.parse("width=100", max_pixels=8), ims.Rendition(100))
        self.assertEqual(self.parse("height=100", max_pixels=8), ims.Rendition(None, 100))
        self.assertEqual(self.parse("width=100&fit=cover", max_pixels=8), ims.Rendition(100, None, "cover"))

    def test_allowed_sizes_accept_their_sizes_with_any_fit_format_and_quality(self):
        sizes = ((200, 200), (1200, 0))
        self.assertEqual(self.parse("width=200&height=200", allowed_sizes=sizes), ims.Rendition(200, 200))
        for fit in ("fill", "contain", "cover"):
            self.assertEqual(self.parse(f"width=200&height=200&fit={fit}", allowed_sizes=sizes).fit, fit)
        self.assertEqual(self.parse("width=1200", allowed_sizes=sizes), ims.Rendition(1200))
        self.assertEqual(self.parse("width=1200&format=webp&quality=60&v=2", allowed_sizes=sizes),
                         ims.Rendition(1200, None, "fill", "WEBP", 60))
        self.assertIsNone(self.parse("v=3", allowed_sizes=sizes))
        self.assertIsNone(self.parse("", allowed_sizes=sizes))

    def test_allowed_sizes_refuse_other_sizes_naming_the_allowed_and_the_asked(self):
        sizes = ((200, 200), (1200, 0))
        for query, asked in (("width=200", "200x0"), ("height=200", "0x200"), ("height=1200", "0x1200"),
                             ("width=1200&height=900", "1200x900"), ("width=201&height=200", "201x200"),
                             ("format=png", "0x0"), ("quality=50", "0x0"), ("fit=cover", "0x0")):
            with self.subTest(query=query):
                self.assertRefused(query, "200x200", "1200x0", f"not {asked}", allowed_sizes=sizes)

    def test_allowed_sizes_with_0x0_allow_a_rendition_at_the_original_size(self):
        self.assertEqual(self.parse("format=png", allowed_sizes=((0, 0),)), ims.Rendition(format="PNG"))
        self.assertRefused("width=5", "0x0", "not 5x0", allowed_sizes=((0, 0),))

    def test_an_invalid_parameter_is_named_before_the_allow_list_is_consulted(self):
        sizes = ((200, 200),)
        self.assertRefused("width=0&height=200", "width", allowed_sizes=sizes)
        self.assertRefused("width=200&height=200&fit=bad", "fit", allowed_sizes=sizes)
        self.assertRefused("widht=200", "widht", allowed_sizes=sizes)

    def check_outcome(self, query, max_pixels, allowed_sizes):
        """Parse `query`: a valid Rendition or None, or HTTPError(400); anything else fails the test."""
        try:
            rendition = self.parse(query, max_pixels, allowed_sizes)
        except ims.HTTPError as error:
            self.assertEqual(error.status, 400, (query, error.message))
            self.assertIsInstance(error.message, str)
            self.assertTrue(error.message.strip())
            json.dumps({"message": error.message})
            return "refused"
        except Exception as error:
            self.fail(f"{query!r} raised {error!r}, not HTTPError(400)")
        if rendition is None:
            return "original"
        self.assertIsInstance(rendition, ims.Rendition)
        for side in (rendition.width, rendition.height):
            self.assertTrue(side is None or (type(side) is int and 1 <= side <= ims.MAX_DIMENSION), (query, rendition))
        self.assertIn(rendition.fit, ims.FITS, query)
        self.assertTrue(rendition.format is None or rendition.format in ims.RENDITION_FORMATS.values(), query)
        self.assertTrue(rendition.format != "AVIF" or ims.AVIF_IS_WRITABLE, query)
        self.assertTrue(rendition.quality is None or (type(rendition.quality) is int and 1 <= rendition.quality <= 100), query)
        if rendition.width and rendition.height and rendition.fit != "contain":
            self.assertLessEqual(rendition.width * rendition.height, max_pixels, query)
        if allowed_sizes is not None:
            self.assertIn((rendition.width or 0, rendition.height or 0), allowed_sizes, query)
        version = ims.Version(1, 2, 3)
        for source_format in ims.ALLOWED_FORMATS:
            entry = rendition.entry(version, source_format)
            self.assertEqual(entry, os.path.basename(entry), query)
            self.assertFalse(entry.startswith("."), query)
        return "rendition"

    def test_seeded_garbage_queries_are_parsed_or_refused_with_400(self):
        rng = random.Random(SEED)
        outcomes = collections.Counter()
        for _ in range(3000):
            query = garbage_query(rng, ascii_only=rng.random() < 0.7)
            max_pixels = rng.choice((1, 100, 10000, MAX_PIXELS))
            allowed_sizes = rng.choice((None, None, ((20, 20), (0, 20), (7, 0)), ((0, 0),)))
            with self.subTest(query=query, max_pixels=max_pixels, allowed_sizes=allowed_sizes):
                outcomes[self.check_outcome(query, max_pixels, allowed_sizes)] += 1
        # The garbage reaches every outcome, so it tests more than the query parser's first refusal.
        self.assertEqual(set(outcomes), {"refused", "original", "rendition"}, outcomes)

    def test_seeded_mutations_of_valid_queries_are_parsed_or_refused_with_400(self):
        rng = random.Random(SEED + 1)
        valid = b"width=300&height=200&fit=cover&format=webp&quality=80&v=7"
        for _ in range(2000):
            query = mutate(rng, valid).decode("latin-1")
            with self.subTest(query=query):
                self.check_outcome(query, MAX_PIXELS, None)


class TestParseRenditionSizes(unittest.TestCase):
    """parse_rendition_sizes(): ((width, height), ...), None for any size, or ValueError naming the bad item."""

    def assertInvalid(self, text, *words):
        with self.assertRaises(ValueError, msg=text) as caught:
            ims.parse_rendition_sizes(text)
        self.assertIn("rendition_sizes", str(caught.exception), text)
        for word in words:
            self.assertIn(word, str(caught.exception), text)

    def test_the_contracts_example(self):
        self.assertEqual(ims.parse_rendition_sizes("200x200,1200x0"), ((200, 200), (1200, 0)))

    def test_white_space_around_items_is_ignored(self):
        self.assertEqual(ims.parse_rendition_sizes(" 200x200 , 1200x0\n"), ((200, 200), (1200, 0)))
        self.assertEqual(ims.parse_rendition_sizes("\t5x6"), ((5, 6),))

    def test_zero_sides_and_leading_zeros(self):
        self.assertEqual(ims.parse_rendition_sizes("0x0"), ((0, 0),))
        self.assertEqual(ims.parse_rendition_sizes("0x16,16x0"), ((0, 16), (16, 0)))
        self.assertEqual(ims.parse_rendition_sizes("007x0008"), ((7, 8),))
        self.assertEqual(ims.parse_rendition_sizes("999999999x1"), ((999999999, 1),))

    def test_empty_or_any_is_every_size(self):
        for text in ("", "   ", "any", "ANY", " Any\n"):
            with self.subTest(text=text):
                self.assertIsNone(ims.parse_rendition_sizes(text))

    def test_malformed_items_are_value_errors_naming_the_item(self):
        for text, item in (
            ("200", "'200'"), ("200x", "'200x'"), ("x200", "'x200'"), ("200X200", "'200X200'"),
            ("200*200", "'200*200'"), ("200\u00d7200", "200\u00d7200"), ("200 x 200", "'200 x 200'"),
            ("-1x2", "'-1x2'"), ("+1x2", "'+1x2'"), ("1.5x2", "'1.5x2'"), ("1e3x2", "'1e3x2'"),
            ("1000000000x1", "'1000000000x1'"), ("\u0663x3", "\u0663x3"), ("0x0x0", "'0x0x0'"),
            ("auto", "'auto'"), ("none", "'none'"), ("200x200;1x1", "'200x200;1x1'"),
            ("200x200,any", "'any'"), ("any,200x200", "'any'"), ("0x10,wide", "'wide'"),
        ):
            with self.subTest(text=text):
                self.assertInvalid(text, item)

    def test_empty_items_are_value_errors(self):
        for text in ("200x200,", ",200x200", "200x200,,1x1", ",", " , "):
            with self.subTest(text=text):
                self.assertInvalid(text, "WIDTHxHEIGHT")

    def test_settings_parse_the_text_and_refuse_a_bad_one(self):
        self.assertEqual(ims.Settings(rendition_sizes="20x20,32x0").rendition_sizes, ((20, 20), (32, 0)))
        self.assertIsNone(ims.Settings(rendition_sizes="any").rendition_sizes)
        with self.assertRaises(ValueError) as caught:
            ims.Settings(rendition_sizes="20x")
        self.assertIn("rendition_sizes", str(caught.exception))

    def test_seeded_garbage_is_parsed_or_a_value_error(self):
        rng = random.Random(SEED)
        outcomes = collections.Counter()
        for _ in range(3000):
            text = garbage_sizes(rng)
            with self.subTest(text=text):
                try:
                    sizes = ims.parse_rendition_sizes(text)
                except ValueError as error:
                    self.assertIn("rendition_sizes", str(error))
                    outcomes["invalid"] += 1
                    continue
                except Exception as error:
                    self.fail(f"{text!r} raised {error!r}, not ValueError")
                if sizes is None:
                    outcomes["any"] += 1
                    continue
                self.assertIsInstance(sizes, tuple)
                self.assertTrue(sizes)
                for size in sizes:
                    self.assertIsInstance(size, tuple)
                    self.assertEqual(len(size), 2)
                    for side in size:
                        self.assertIs(type(side), int)
                        self.assertTrue(0 <= side <= 999999999, text)
                outcomes["sizes"] += 1
        self.assertEqual(set(outcomes), {"invalid", "any", "sizes"}, outcomes)


class TestRenditionEntry(unittest.TestCase):
    """Rendition.entry(): parameters that give the same picture give the same cache entry and ETag."""

    VERSION = ims.Version(0x1234, 0x5678, 0x9ABC)

    def entry(self, query, source_format="JPEG", version=VERSION):
        return ims.parse_rendition_query(query, MAX_PIXELS).entry(version, source_format)

    def assertSameEntry(self, source_format, *queries):
        entries = {query: self.entry(query, source_format) for query in queries}
        self.assertEqual(len(set(entries.values())), 1, entries)

    def assertDistinctEntries(self, source_format, *queries):
        entries = {query: self.entry(query, source_format) for query in queries}
        self.assertEqual(len(set(entries.values())), len(queries), entries)

    def test_the_original_format_asked_for_is_no_format(self):
        self.assertSameEntry("JPEG", "width=50", "width=50&format=jpeg", "width=50&format=jpg", "width=50&format=JPEG")
        self.assertSameEntry("PNG", "width=50", "width=50&format=png", "width=50&format=PNG")
        self.assertSameEntry("GIF", "width=50", "width=50&format=gif")
        self.assertSameEntry("WEBP", "width=50", "width=50&format=webp")

    def test_another_format_is_another_entry(self):
        self.assertDistinctEntries("JPEG", "width=50", "width=50&format=png", "width=50&format=webp", "width=50&format=gif")

    def test_quality_is_ignored_for_lossless_formats(self):
        self.assertSameEntry("PNG", "width=50", "width=50&quality=80", "width=50&quality=1")
        self.assertSameEntry("GIF", "width=50", "width=50&quality=80")
        self.assertSameEntry("JPEG", "width=50&format=png", "width=50&format=png&quality=80")
        self.assertSameEntry("JPEG", "width=50&format=gif", "width=50&format=gif&quality=5")
        self.assertSameEntry("BMP", "width=50", "width=50&quality=5")
        self.assertSameEntry("TIFF", "width=50", "width=50&quality=5")

    def test_quality_counts_for_lossy_formats(self):
        self.assertDistinctEntries("JPEG", "width=50", "width=50&quality=80", "width=50&quality=81")
        self.assertDistinctEntries("PNG", "width=50&format=webp", "width=50&format=webp&quality=80")
        self.assertDistinctEntries("WEBP", "width=50", "width=50&quality=80")

    def test_quality_counts_for_avif(self):
        ims.parse_rendition_query.cache_clear()
        self.addCleanup(ims.parse_rendition_query.cache_clear)
        with mock.patch.object(ims, "AVIF_IS_WRITABLE", True):
            self.assertDistinctEntries("PNG", "width=50&format=avif", "width=50&format=avif&quality=80")

    def test_fit_is_ignored_with_one_side_or_none(self):
        self.assertSameEntry("JPEG", "width=50", "width=50&fit=fill", "width=50&fit=contain", "width=50&fit=cover")
        self.assertSameEntry("JPEG", "height=50", "height=50&fit=fill", "height=50&fit=contain", "height=50&fit=cover")
        self.assertSameEntry("JPEG", "format=png", "format=png&fit=cover", "format=png&fit=contain")

    def test_fit_counts_with_both_sides_and_fill_is_the_default(self):
        self.assertSameEntry("JPEG", "width=50&height=40", "width=50&height=40&fit=fill")
        self.assertDistinctEntries("JPEG", "width=50&height=40", "width=50&height=40&fit=contain", "width=50&height=40&fit=cover")

    def test_sizes_are_told_apart(self):
        self.assertDistinctEntries("JPEG", "width=50", "height=50", "width=50&height=50", "width=5&height=50", "width=55", "format=jpeg&quality=50")

    def test_cache_busters_and_spelling_do_not_change_the_entry(self):
        self.assertSameEntry("JPEG", "width=50", "width=50&v=1", "v=2&width=50", "width=050", "wid%74h=%35%30", "width=50&_=9&cb=x")

    def test_another_version_is_another_entry(self):
        other = ims.Version(0x1234, 0x5679, 0x9ABC)
        self.assertNotEqual(self.entry("width=50"), self.entry("width=50", version=other))

    def test_the_entry_starts_with_the_version_and_ends_with_the_output_extension(self):
        for query, source_format, extension in (
            ("width=5", "JPEG", ".jpg"), ("width=5", "PNG", ".png"), ("width=5", "GIF", ".gif"),
            ("width=5", "WEBP", ".webp"), ("width=5", "BMP", ".bmp"), ("width=5", "TIFF", ".tif"),
            ("width=5&format=png", "JPEG", ".png"), ("width=5&format=jpg", "PNG", ".jpg"),
        ):
            with self.subTest(query=query, source_format=source_format):
                entry = self.entry(query, source_format)
                self.assertTrue(entry.startswith(self.VERSION.tag + "-"), entry)
                self.assertTrue(entry.endswith(extension), entry)
                self.assertEqual(entry, os.path.basename(entry))


class RenditionInputTestCase(HTTPTestCase):
    """HTTPTestCase plus renditions asked for on one connection that must stay open after every answer."""

    def store(self, name, data):
        """Upload `data` as `name` and check it was stored; return it."""
        reply = self.upload(name, data)
        self.assertEqual(reply.status, 201, reply.body)
        return data

    def kept_alive(self):
        """Return a connection that has served one request; ask() checks that it stays this one."""
        connection = self.connect()
        self.assertEqual(self.request("GET", "/", connection=connection).status, 200)
        self.assertIsNotNone(connection.sock)
        connection.kept_address = connection.sock.getsockname()
        return connection

    def ask(self, connection, target, method="GET", headers=None):
        """Send one request on the kept-alive `connection`; the server must keep it open after the answer."""
        reply = self.request(method, target, headers=headers, connection=connection)
        self.assertNotEqual(reply.status, 500, (method, target, reply.body))
        self.assertIsNotNone(connection.sock, f"the server closed the connection after {method} {target} ({reply.status})")
        self.assertEqual(connection.sock.getsockname(), connection.kept_address, f"a new connection after {method} {target}")
        return reply

    def assertRefusedGetAndHead(self, connection, target, status, words):
        """GET `target` is the JSON error `status` holding `words`; HEAD the same head without a body."""
        get = self.ask(connection, target)
        self.assertError(get, status, words)
        head = self.ask(connection, target, "HEAD")
        self.assertEqual(head.status, status, target)
        self.assertEqual(head.headers["Content-Type"], "application/json", target)
        self.assertEqual(head.headers["Content-Length"], str(len(get.body)), target)
        self.assertEqual(head.body, b"")
        return get

    def assertImage(self, reply, content_type, size):
        """The reply is 200 with a whole image of `content_type` and `size`."""
        self.assertEqual(reply.status, 200, reply.body[:300])
        self.assertEqual(reply.headers["Content-Type"], content_type)
        self.assertEqual(int(reply.headers["Content-Length"]), len(reply.body))
        if content_type != "image/avif":
            self.assertEqual(decode(reply.body).size, size)

    def assertSameRendition(self, connection, name, plain, queries, content_type, size, same_bytes=False):
        """Each of `queries` on /<name> is the rendition `plain` (a Reply): an image of `content_type` and `size`, its ETag (and bytes)."""
        for query in queries:
            with self.subTest(query=query):
                reply = self.ask(connection, f"/{name}?{query}")
                self.assertImage(reply, content_type, size)
                self.assertEqual(reply.headers["ETag"], plain.headers["ETag"])
                if same_bytes:
                    self.assertEqual(reply.body, plain.body)

    def assertOriginal(self, reply, data, content_type):
        """The reply is 200 with the stored bytes as they are, as their real content type."""
        self.assertEqual(reply.status, 200, reply.body[:300])
        self.assertEqual(reply.body, data)
        self.assertEqual(reply.headers["Content-Type"], content_type)

    def rendition_files(self, name):
        """Return the renditions of `name` kept in the cache (temp and lock files not counted)."""
        folder = os.path.join(self.storage, ims.STATE_FOLDER, "renditions", name)
        if not os.path.isdir(folder):
            return []
        return sorted(entry for entry in os.listdir(folder) if not entry.startswith(ims.TEMP_PREFIX))


class TestRenditionBadQueries(RenditionInputTestCase):
    """Invalid rendition parameters over HTTP: 400 naming them, for GET and HEAD, and the connection stays open."""

    def setUp(self):
        super().setUp()
        self.jpeg = self.store("a.jpg", make_image("JPEG", size=(64, 48)))
        self.png = self.store("b.png", make_image("PNG", size=(64, 48)))

    def test_every_error_row_is_400_json_naming_the_parameter_for_get_and_head(self):
        connection = self.kept_alive()
        for query, words in RENDITION_ERROR_ROWS:
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/a.jpg?{query}", 400, words)
        self.assertConnectionStillServes(connection)
        self.assertEqual(self.server.renditions.renders, 0)
        self.assertEqual(self.rendition_files("a.jpg"), [])

    def test_refusals_are_framed_exactly_one_after_another_on_one_connection(self):
        requests = []
        for query, _ in RENDITION_ERROR_ROWS[::4]:
            requests += [("HEAD", f"/a.jpg?{query}", {}), ("GET", f"/a.jpg?{query}", {})]
        replies = self.raw_requests(*requests, ("GET", "/a.jpg", {}))
        for (method, target, _), reply in zip(requests, replies):
            with self.subTest(method=method, target=target):
                self.assertEqual(reply.status, 400, reply.body)
                self.assertEqual(reply.body == b"", method == "HEAD")
        self.assertOriginal(replies[-1], self.jpeg, "image/jpeg")

    def test_a_misspelt_parameter_is_400_not_the_original(self):
        connection = self.kept_alive()
        reply = self.assertRefusedGetAndHead(connection, "/a.jpg?widht=300", 400, ("widht", "width"))
        self.assertNotEqual(reply.body, self.jpeg)
        self.assertNotIn("ETag", reply.headers)

    def test_cache_busting_parameters_alone_serve_the_original(self):
        connection = self.kept_alive()
        original = self.ask(connection, "/a.jpg")
        for query in ("v=3", "_=1700000000000", "t=1", "ts=2", "cb=x", "version=7", "v=", "v=1&v=2", "v=3&_=4"):
            with self.subTest(query=query):
                reply = self.ask(connection, f"/a.jpg?{query}")
                self.assertOriginal(reply, self.jpeg, "image/jpeg")
                self.assertEqual(reply.headers["ETag"], original.headers["ETag"])
                head = self.ask(connection, f"/a.jpg?{query}", "HEAD")
                self.assertEqual((head.status, head.body, head.headers["ETag"]), (200, b"", original.headers["ETag"]))
        self.assertEqual(self.server.renditions.renders, 0)

    def test_cache_busting_parameters_beside_a_rendition_serve_that_rendition(self):
        connection = self.kept_alive()
        plain = self.ask(connection, "/a.jpg?width=50")
        self.assertImage(plain, "image/jpeg", (50, 38))
        self.assertSameRendition(connection, "a.jpg", plain, ("width=50&v=3", "v=3&width=50", "width=50&_=1&cb=2"),
                                 "image/jpeg", (50, 38), same_bytes=True)
        self.assertNotEqual(plain.headers["ETag"], self.ask(connection, "/a.jpg", "HEAD").headers["ETag"])

    def test_an_empty_query_serves_the_original(self):
        connection = self.kept_alive()
        original = self.ask(connection, "/a.jpg")
        for target in ("/a.jpg?", "/a.jpg?&", "/a.jpg?&&&"):
            with self.subTest(target=target):
                reply = self.ask(connection, target)
                self.assertOriginal(reply, self.jpeg, "image/jpeg")
                self.assertEqual(reply.headers["ETag"], original.headers["ETag"])

    def test_percent_encoded_names_and_values_are_decoded(self):
        connection = self.kept_alive()
        plain = self.ask(connection, "/a.jpg?width=50")
        for query in ("wid%74h=50", "%77idth=50", "width=%35%30", "width=050", "width=50&format=%6A%70%65%67"):
            with self.subTest(query=query):
                reply = self.ask(connection, f"/a.jpg?{query}")
                self.assertImage(reply, "image/jpeg", (50, 38))
                self.assertEqual(reply.headers["ETag"], plain.headers["ETag"])
        reply = self.ask(connection, "/a.jpg?%77idth=40&fit=%63over&height=%33%30&format=%50NG")
        self.assertImage(reply, "image/png", (40, 30))

    def test_a_plus_is_a_space_and_an_encoded_plus_is_a_plus(self):
        connection = self.kept_alive()
        for query, words in (
            ("width=+50", ("width", "' 50'")), ("width=50+", ("width", "'50 '")), ("width=%2B50", ("width", "'+50'")),
            ("width=5+0", ("width", "'5 0'")), ("width=5&height=5&fit=+cover", ("fit", "' cover'")),
            ("wi+dth=5", "'wi dth'"), ("width+=5", "'width '"), ("format=png+", ("format", "'png '")),
            ("quality=+50", ("quality", "' 50'")),
        ):
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/a.jpg?{query}", 400, words)

    def test_an_unknown_name_is_404_once_its_parameters_are_valid(self):
        connection = self.kept_alive()
        for query in ("width=50", "v=3", "", "width=50&v=3", "width=5&height=5&fit=contain", "format=png"):
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/nope.png?{query}", 404, "'nope.png'")

    def test_bad_parameters_on_an_unknown_name_are_400_as_they_are_read_first(self):
        # As built: download_image() parses the query before it looks the name up.
        connection = self.kept_alive()
        for query, words in (("widht=50", "widht"), ("width=0", "width"), ("width=%ff", "UTF-8"),
                             ("width=5&width=5", "twice"), ("width=9001&height=10000", str(MAX_PIXELS))):
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/nope.png?{query}", 400, words)

    def test_a_path_that_names_no_image_is_404_whatever_the_query(self):
        # Routing comes first: the query of a path that cannot be an image is never read.
        connection = self.kept_alive()
        for target in ("/nope.txt?widht=5", "/nope.txt?width=50", "/.hidden.png?width=5", "/%2e%2e%2fa.jpg?width=5",
                       "/%ff.png?widht=5", "/a.jpg/?width=5"):
            with self.subTest(target=target):
                self.assertRefusedGetAndHead(connection, target, 404, None)

    def test_quality_of_a_lossless_format_is_accepted_and_ignored(self):
        connection = self.kept_alive()
        plain = self.ask(connection, "/b.png?width=20")
        self.assertImage(plain, "image/png", (20, 15))
        self.assertSameRendition(connection, "b.png", plain,
                                 ("width=20&quality=50", "width=20&quality=1", "width=20&format=png&quality=100"),
                                 "image/png", (20, 15))
        self.assertImage(self.ask(connection, "/a.jpg?width=20&format=png&quality=5"), "image/png", (20, 15))
        self.assertImage(self.ask(connection, "/a.jpg?width=20&format=gif&quality=100"), "image/gif", (20, 15))
        # Still checked where it is ignored.
        self.assertRefusedGetAndHead(connection, "/b.png?width=20&quality=0", 400, "quality")

    def test_the_original_format_asked_for_is_the_rendition_without_format(self):
        connection = self.kept_alive()
        plain = self.ask(connection, "/a.jpg?width=20")
        for query in ("width=20&format=jpeg", "width=20&format=jpg", "width=20&format=JPEG"):
            with self.subTest(query=query):
                reply = self.ask(connection, f"/a.jpg?{query}")
                self.assertEqual(reply.headers["ETag"], plain.headers["ETag"])
        self.assertNotEqual(self.ask(connection, "/a.jpg?width=20&quality=5").headers["ETag"], plain.headers["ETag"])

    def test_fit_with_one_side_is_ignored(self):
        connection = self.kept_alive()
        plain = self.ask(connection, "/a.jpg?width=20")
        for fit in ("fill", "contain", "cover"):
            with self.subTest(fit=fit):
                reply = self.ask(connection, f"/a.jpg?width=20&fit={fit}")
                self.assertImage(reply, "image/jpeg", (20, 15))
                self.assertEqual(reply.headers["ETag"], plain.headers["ETag"])

    def test_avif_is_served_or_refused_as_this_pillow_can_write_it(self):
        connection = self.kept_alive()
        reply = self.ask(connection, "/a.jpg?width=20&format=avif")
        if ims.AVIF_IS_WRITABLE:
            self.assertImage(reply, "image/avif", (20, 15))
            self.assertEqual(reply.body[4:8], b"ftyp")
        else:
            self.assertError(reply, 400, "avif")
        # Queries parsed before are kept, whatever the mock says.
        ims.parse_rendition_query.cache_clear()
        self.addCleanup(ims.parse_rendition_query.cache_clear)
        with mock.patch.object(ims, "AVIF_IS_WRITABLE", False):
            self.assertRefusedGetAndHead(connection, "/a.jpg?width=21&format=avif", 400, "avif")
            self.assertImage(self.ask(connection, "/a.jpg?width=21&format=webp"), "image/webp", (21, 16))

    def test_bad_parameters_win_over_conditional_and_range_headers(self):
        connection = self.kept_alive()
        etag = self.ask(connection, "/a.jpg", "HEAD").headers["ETag"]
        for headers in ({"If-None-Match": etag}, {"If-None-Match": "*"}, {"Range": "bytes=0-9"},
                        {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}):
            with self.subTest(headers=headers):
                reply = self.ask(connection, "/a.jpg?widht=20", headers=headers)
                self.assertError(reply, 400, "widht")

    def test_a_range_beyond_a_renditions_end_is_416(self):
        connection = self.kept_alive()
        reply = self.ask(connection, "/a.jpg?width=20", headers={"Range": "bytes=999999-"})
        self.assertError(reply, 416, None)
        reply = self.ask(connection, "/a.jpg?width=20", headers={"Range": "bytes=0-9"})
        self.assertEqual((reply.status, len(reply.body)), (206, 10))

    def test_a_huge_single_side_is_400_for_its_pixels_before_any_render(self):
        connection = self.kept_alive()
        for query in ("width=999999999999999999", "height=999999999999999999", "width=100000",
                      "width=99999&height=99999&fit=contain", "width=999999999999999999&fit=cover"):
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/a.jpg?{query}", 400, str(MAX_PIXELS))
        self.assertEqual(self.server.renditions.renders, 0)

    def test_a_parameter_name_of_thousands_of_characters_is_400_with_a_short_message(self):
        connection = self.kept_alive()
        reply = self.assertRefusedGetAndHead(connection, "/a.jpg?" + "x" * 7000 + "=1", 400, "x" * 100)
        self.assertLess(len(reply.body), 1000)

    def test_a_query_past_the_request_line_limit_is_414_json(self):
        reply = self.parse_reply(self.raw_exchange(
            b"GET /a.jpg?width=" + b"1" * ims.MAX_REQUEST_LINE_BYTES + b" HTTP/1.1\r\nHost: ims.test\r\n\r\n"))
        self.assertError(reply, 414, None)

    def test_a_fragment_sent_by_a_careless_client_is_part_of_the_query(self):
        # As built: "#" has no meaning in a request target, so "#top" is a name or a value like another.
        connection = self.kept_alive()
        self.assertRefusedGetAndHead(connection, "/a.jpg?width=5#top", 400, ("width", "5#top"))
        self.assertRefusedGetAndHead(connection, "/a.jpg?#top", 400, "'#top'")


class TestRenditionPixelLimit(RenditionInputTestCase):
    """--max-pixels 10000: fill and cover refused at once, contain and one side against the image."""

    server_options = {"max_pixels": 10000}

    def setUp(self):
        super().setUp()
        self.store("a.png", make_image("PNG", size=(64, 48)))

    def test_fill_and_cover_over_the_limit_are_400_without_a_render(self):
        connection = self.kept_alive()
        for query in ("width=101&height=100", "width=101&height=100&fit=fill", "width=101&height=100&fit=cover",
                      "width=10001&height=1"):
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/a.png?{query}", 400, "10000")
        self.assertEqual(self.server.renditions.renders, 0)

    def test_contain_and_one_side_over_the_limit_for_this_image_are_400_without_a_render(self):
        connection = self.kept_alive()
        # 64x48: contain in 200x200 is 200x150; width 200 is 200x150; height 150 is 200x150.
        for query in ("width=200&height=200&fit=contain", "width=200", "height=150", "width=116",
                      "width=200&fit=cover", "width=999999999999999999&height=999999999999999999&fit=contain"):
            with self.subTest(query=query):
                self.assertRefusedGetAndHead(connection, f"/a.png?{query}", 400, "10000")
        self.assertEqual(self.server.renditions.renders, 0)

    def test_results_at_or_under_the_limit_are_served(self):
        connection = self.kept_alive()
        for query, size in (("width=100&height=100", (100, 100)), ("width=50&height=50&fit=cover", (50, 50)),
                            ("width=100&height=100&fit=contain", (100, 75)), ("width=115", (115, 86)),
                            ("height=86", (115, 86)), ("width=10000&height=1&fit=contain", (1, 1))):
            with self.subTest(query=query):
                self.assertImage(self.ask(connection, f"/a.png?{query}"), "image/png", size)

    def test_cover_at_the_limit_is_served_as_patch_accepts_it(self):
        # cover crops while it resizes (resize_frame's box): it never makes the uncropped 133x100,
        # and PATCH accepts the same 100x100 cover. Renditions.open() checks fitted_size(..., "cover"),
        # the size before the crop, and refuses with a size nobody asked for.
        connection = self.kept_alive()
        for query, size in (("width=100&height=100&fit=cover", (100, 100)), ("width=20&height=400&fit=cover", (20, 400))):
            with self.subTest(query=query):
                self.assertImage(self.ask(connection, f"/a.png?{query}"), "image/png", size)
        reply = self.request("PATCH", "/a.png?width=100&height=100&fit=cover")
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")

    def test_on_an_unknown_name_fill_over_the_limit_is_400_and_contain_is_404(self):
        connection = self.kept_alive()
        self.assertRefusedGetAndHead(connection, "/nope.png?width=101&height=100", 400, "10000")
        self.assertRefusedGetAndHead(connection, "/nope.png?width=200&height=200&fit=contain", 404, "'nope.png'")
        self.assertRefusedGetAndHead(connection, "/nope.png?width=200", 404, "'nope.png'")

    def test_an_original_over_the_limit_placed_by_hand_renders_smaller_but_not_at_its_size(self):
        data = encode(noise((200, 200)), "PNG")
        self.put_file("big.png", data)
        connection = self.kept_alive()
        self.assertOriginal(self.ask(connection, "/big.png"), data, "image/png")
        self.assertImage(self.ask(connection, "/big.png?width=10"), "image/png", (10, 10))
        self.assertRefusedGetAndHead(connection, "/big.png?format=png", 400, ("200x200", "10000"))
        self.assertRefusedGetAndHead(connection, "/big.png?quality=50", 400, ("200x200", "10000"))


class TestRenditionSizeAllowList(RenditionInputTestCase):
    """--rendition-sizes 20x20,32x0,0x16: those sizes only; the original is still served."""

    server_options = {"rendition_sizes": "20x20,32x0,0x16"}

    def setUp(self):
        super().setUp()
        self.data = self.store("a.png", make_image("PNG", size=(64, 48)))

    def test_listed_sizes_are_served_with_any_fit_format_and_quality(self):
        connection = self.kept_alive()
        for query, content_type, size in (
            ("width=20&height=20", "image/png", (20, 20)),
            ("width=20&height=20&fit=cover", "image/png", (20, 20)),
            ("width=20&height=20&fit=contain", "image/png", (20, 15)),
            ("width=32", "image/png", (32, 24)),
            ("width=32&v=9", "image/png", (32, 24)),
            ("height=16", "image/png", (21, 16)),
            ("width=32&format=webp&quality=5", "image/webp", (32, 24)),
            ("width=32&format=png&quality=5", "image/png", (32, 24)),
        ):
            with self.subTest(query=query):
                self.assertImage(self.ask(connection, f"/a.png?{query}"), content_type, size)

    def test_other_sizes_are_400_naming_the_allowed_and_the_asked(self):
        connection = self.kept_alive()
        for query, asked in (("width=20", "20x0"), ("height=20", "0x20"), ("width=32&height=24", "32x24"),
                             ("width=21&height=20", "21x20"), ("width=16", "16x0"), ("height=32", "0x32"),
                             ("format=png", "0x0"), ("quality=50", "0x0"), ("fit=cover", "0x0"),
                             ("width=20&height=20&width=20", "twice")):
            with self.subTest(query=query):
                words = ("twice",) if asked == "twice" else ("20x20", "32x0", "0x16", f"not {asked}")
                self.assertRefusedGetAndHead(connection, f"/a.png?{query}", 400, words)
        self.assertEqual(self.server.renditions.renders, 0)

    def test_the_original_is_served_without_rendition_parameters(self):
        connection = self.kept_alive()
        for target in ("/a.png", "/a.png?", "/a.png?v=3", "/a.png?_=1&cb=2"):
            with self.subTest(target=target):
                self.assertOriginal(self.ask(connection, target), self.data, "image/png")

    def test_an_unknown_name_is_400_for_a_refused_size_and_404_for_a_listed_one(self):
        connection = self.kept_alive()
        self.assertRefusedGetAndHead(connection, "/nope.png?width=21", 400, "not 21x0")
        self.assertRefusedGetAndHead(connection, "/nope.png?width=32", 404, "'nope.png'")


class TestRenditionSizeAllowListOfTheOriginalSize(RenditionInputTestCase):
    """--rendition-sizes 0x0: a rendition in another format at the original's size, and nothing else."""

    server_options = {"rendition_sizes": "0x0"}

    def test_only_the_original_size_is_rendered(self):
        self.store("a.png", make_image("PNG", size=(64, 48)))
        connection = self.kept_alive()
        self.assertImage(self.ask(connection, "/a.png?format=webp"), "image/webp", (64, 48))
        self.assertImage(self.ask(connection, "/a.png?format=jpeg&quality=40"), "image/jpeg", (64, 48))
        self.assertRefusedGetAndHead(connection, "/a.png?width=64", 400, ("0x0", "not 64x0"))
        self.assertRefusedGetAndHead(connection, "/a.png?width=64&height=48", 400, ("0x0", "not 64x48"))


def png_without_pixels(width, height):
    """Return a PNG of width x height that has its header chunk but no pixel data."""
    import zlib  # only here: the rest of the tests need no checksums

    header = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    end = b"IEND"
    return (b"\x89PNG\r\n\x1a\n"
            + struct.pack(">I", len(header) - 4) + header + struct.pack(">I", zlib.crc32(header))
            + struct.pack(">I", 0) + end + struct.pack(">I", zlib.crc32(end)))


class TestRenditionUnreadableFiles(RenditionInputTestCase):
    """Files placed by hand that are not readable images: 422 for a rendition, the original still served."""

    def setUp(self):
        super().setUp()
        self.good = self.store("good.png", make_image("PNG", size=(64, 48)))

    RENDITION_QUERIES = ("width=10", "format=png", "width=10&height=10&fit=cover", "quality=50", "width=10&format=webp")

    def assertUnrenderable(self, name, data, content_type, words=None):
        """`data` placed as `name`: every rendition 422 naming it (twice: not cached), the original served as it is."""
        self.put_file(name, data)
        connection = self.kept_alive()
        for query in self.RENDITION_QUERIES:
            for attempt in (1, 2):
                with self.subTest(name=name, query=query, attempt=attempt):
                    self.assertRefusedGetAndHead(connection, f"/{name}?{query}", 422, (f"'{name}'",) + tuple(words or ()))
        self.assertOriginal(self.ask(connection, f"/{name}"), data, content_type)
        self.assertOriginal(self.ask(connection, f"/{name}?v=3"), data, content_type)
        # Bad parameters are still 400: they are read before the file is.
        self.assertRefusedGetAndHead(connection, f"/{name}?widht=10", 400, "widht")
        self.assertEqual(self.rendition_files(name), [])
        self.assertNoTempFiles()
        self.assertImage(self.ask(connection, "/good.png?width=10"), "image/png", (10, 8))
        self.assertConnectionStillServes(connection)

    def test_text_named_png_is_422_while_the_original_downloads(self):
        self.assertUnrenderable("bad.png", b"hello, I am not an image\n", "application/octet-stream", ("not a readable image",))

    def test_an_empty_file_is_422(self):
        self.assertUnrenderable("empty.png", b"", "application/octet-stream")

    def test_a_truncated_jpeg_is_422(self):
        data = encode(noise((90, 90)), "JPEG")
        self.assertUnrenderable("truncated.jpg", data[: len(data) // 2], "image/jpeg", ("truncated",))

    def test_a_jpeg_cut_inside_its_header_is_422(self):
        self.assertUnrenderable("head.jpg", encode(noise((90, 90)), "JPEG")[:300], "image/jpeg")

    def test_jpeg_magic_followed_by_garbage_is_422(self):
        self.assertUnrenderable("magic.jpg", b"\xff\xd8\xff" + b"garbage" * 20, "image/jpeg")

    def test_a_jpeg_with_garbage_in_its_scan_never_500s(self):
        # A damaged scan may decode to something (Pillow fills what it cannot read) or be refused.
        data = bytearray(encode(noise((90, 90)), "JPEG"))
        rng = random.Random(SEED)
        for index in rng.sample(range(len(data) // 2, len(data) - 2), 40):
            data[index] = rng.randrange(256)
        self.put_file("damaged.jpg", bytes(data))
        connection = self.kept_alive()
        for query in self.RENDITION_QUERIES:
            with self.subTest(query=query):
                reply = self.ask(connection, f"/damaged.jpg?{query}")
                self.assertIn(reply.status, (200, 422), reply.body[:300])
                if reply.status == 422:
                    self.assertError(reply, 422, "'damaged.jpg'")

    def test_a_truncated_png_is_422(self):
        data = encode(noise((90, 90)), "PNG")
        self.assertUnrenderable("truncated.png", data[: len(data) // 2], "image/png", ("truncated",))

    def test_a_truncated_gif_is_422(self):
        data = encode(noise((90, 90)), "GIF")
        self.assertUnrenderable("truncated.gif", data[: len(data) // 2], "image/gif")

    def test_a_truncated_webp_is_422(self):
        data = encode(noise((90, 90)), "WEBP")
        self.assertUnrenderable("truncated.webp", data[: len(data) // 2], "image/webp")

    def test_a_png_header_of_a_pixel_bomb_is_422(self):
        # 30000x30000 declared, no pixel data: Pillow refuses it as a decompression bomb.
        self.assertUnrenderable("bomb.png", png_without_pixels(30000, 30000), "image/png")

    def test_a_png_header_without_pixels_is_422(self):
        self.assertUnrenderable("hollow.png", png_without_pixels(60, 40), "image/png")

    def test_an_image_of_another_format_than_its_name_is_rendered_as_what_it_is(self):
        data = encode(noise((40, 30)), "PNG")
        self.put_file("lie.jpg", data)
        connection = self.kept_alive()
        reply = self.ask(connection, "/lie.jpg?width=20")
        self.assertImage(reply, "image/png", (20, 15))
        self.assertIn("lie.png", reply.headers["Content-Disposition"])
        self.assertImage(self.ask(connection, "/lie.jpg?width=20&format=jpeg"), "image/jpeg", (20, 15))

    def test_many_requests_at_once_for_an_unrenderable_rendition_are_all_422(self):
        data = encode(noise((90, 90)), "JPEG")
        self.put_file("truncated.jpg", data[: len(data) // 2])
        count = 8
        barrier = threading.Barrier(count)
        answers = [None] * count

        def ask(index):
            connection = http.client.HTTPConnection(self.host, self.port, timeout=DEADLINE_SECONDS)
            try:
                connection.connect()
                barrier.wait(timeout=DEADLINE_SECONDS)
                connection.request("GET", "/truncated.jpg?width=10")
                response = connection.getresponse()
                answers[index] = (response.status, response.read())
            except Exception as error:  # reported in the main thread
                answers[index] = (None, repr(error))
            finally:
                connection.close()

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_SECONDS)
        for status, body in answers:
            self.assertEqual(status, 422, body)
            self.assertIn("'truncated.jpg'", json.loads(body)["message"])
        self.assertEqual(self.rendition_files("truncated.jpg"), [])

    def test_a_folder_with_an_image_name_is_404(self):
        os.mkdir(os.path.join(self.storage, "folder.png"))
        connection = self.kept_alive()
        self.assertRefusedGetAndHead(connection, "/folder.png?width=10", 404, "'folder.png'")

    def test_a_bad_file_replaced_by_an_image_renders(self):
        self.put_file("later.png", b"not yet an image")
        connection = self.kept_alive()
        self.assertRefusedGetAndHead(connection, "/later.png?width=10", 422, "'later.png'")
        temporary = self.put_file("later.tmp", make_image("PNG", size=(64, 48)), folder=self.tempdir.name)
        os.replace(temporary, os.path.join(self.storage, "later.png"))
        self.assertImage(self.ask(connection, "/later.png?width=10"), "image/png", (10, 8))


class TestRenditionGarbageQueries(RenditionInputTestCase):
    """Seeded random queries over HTTP: 200 or a JSON 400, never anything else, on one open connection."""

    # Small enough that whatever the garbage asks for renders at once.
    server_options = {"max_pixels": 4096}

    def test_seeded_garbage_queries_are_served_or_refused_with_400(self):
        data = self.store("a.png", make_image("PNG", size=(64, 48)))
        connection = self.kept_alive()
        rng = random.Random(SEED)
        statuses = collections.Counter()
        for index in range(300):
            query = garbage_query(rng)
            method = "HEAD" if index % 3 == 2 else "GET"
            with self.subTest(query=query, method=method):
                reply = self.ask(connection, f"/a.png?{query}", method)
                statuses[reply.status] += 1
                self.assertIn(reply.status, (200, 400), reply.body[:300])
                if reply.status == 400 and method == "GET":
                    self.assertError(reply, 400, None)
                elif reply.status == 200:
                    self.assertTrue(reply.headers["Content-Type"].startswith("image/"), reply.headers["Content-Type"])
                    if method == "GET" and reply.body != data and reply.headers["Content-Type"] != "image/avif":
                        width, height = decode(reply.body).size
                        self.assertLessEqual(width * height, 4096)
        self.assertEqual(set(statuses), {200, 400}, statuses)
        self.assertConnectionStillServes(connection)

    def test_seeded_garbage_queries_on_an_unknown_name_are_404_or_400(self):
        connection = self.kept_alive()
        rng = random.Random(SEED + 2)
        for _ in range(300):
            query = garbage_query(rng)
            with self.subTest(query=query):
                reply = self.ask(connection, f"/nope.png?{query}")
                self.assertIn(reply.status, (400, 404), reply.body[:300])
                self.assertError(reply, reply.status, None)


class TestRenditionOfUnusualImages(RenditionInputTestCase):
    """Every image that uploads accept renders in every format offered: never a 422, never a 500."""

    FORMATS = ("jpeg", "png", "webp", "gif") + (("avif",) if ims.AVIF_IS_WRITABLE else ())
    CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif", "avif": "image/avif"}
    BASE = noise((40, 30))

    def assertRendersIn(self, name, data, formats):
        """`data` uploads as `name`, and renders 20 wide (20x15) in each of `formats`."""
        self.store(name, data)
        connection = self.kept_alive()
        for image_format in formats:
            with self.subTest(name=name, format=image_format):
                reply = self.ask(connection, f"/{name}?width=20&format={image_format}")
                self.assertImage(reply, self.CONTENT_TYPES[image_format], (20, 15))

    def test_images_of_common_modes_and_animations_render_in_every_format(self):
        transparent = self.BASE.convert("P")
        transparent.info["transparency"] = 0
        for name, data in (
            ("rgba.png", encode(self.BASE.convert("RGBA"), "PNG")),
            ("la.png", encode(self.BASE.convert("LA"), "PNG")),
            ("p.png", encode(transparent, "PNG")),
            ("bilevel.png", encode(self.BASE.convert("1"), "PNG")),
            ("i16.png", encode(self.BASE.convert("L").convert("I;16"), "PNG")),
            ("cmyk.jpg", encode(self.BASE.convert("CMYK"), "JPEG")),
            ("cmyk.tif", encode(self.BASE.convert("CMYK"), "TIFF")),
            ("animated.gif", animation("GIF", size=(40, 30))),
            ("animated.webp", animation("WEBP", size=(40, 30))),
            ("pages.tif", animation("TIFF", size=(40, 30))),
        ):
            self.assertRendersIn(name, data, self.FORMATS)
        self.assertRendersIn("animated.png", animation("PNG", size=(40, 30)), ("jpeg", "png", "webp", "gif"))

    def test_a_32_bit_integer_grey_tiff_renders_in_every_format(self):
        self.assertRendersIn("i32.tif", encode(self.BASE.convert("L").convert("I"), "TIFF"), self.FORMATS)

    def test_a_floating_point_grey_tiff_renders_in_every_format(self):
        self.assertRendersIn("float.tif", encode(self.BASE.convert("L").convert("F"), "TIFF"), self.FORMATS)

    def test_a_ycbcr_tiff_renders_in_every_format(self):
        data = encode(self.BASE.convert("YCbCr"), "TIFF")
        try:
            decode(data)
        except OSError as error:
            self.skipTest(f"this Pillow cannot read the YCbCr TIFF it writes: {error}")
        self.assertRendersIn("ycbcr.tif", data, self.FORMATS)

    def test_an_animated_png_renders_as_avif(self):
        # APNG frame durations are fractions of a millisecond, which the AVIF writer refuses.
        if not ims.AVIF_IS_WRITABLE:
            self.skipTest("this Pillow cannot write AVIF")
        self.assertRendersIn("animated.png", animation("PNG", size=(40, 30)), ("avif",))


# ====
# The page for people, on the server's side
# ====


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


class TestPageParts(unittest.TestCase):
    def test_prefers_html_only_when_html_ranks_above_json(self):
        for accept in (BROWSER_ACCEPT, "text/html", "text/*", "text/html;q=0.5, application/json;q=0.4", "TEXT/HTML"):
            with self.subTest(accept=accept):
                self.assertTrue(ims.prefers_html(accept))
        for accept in (None, "", "*/*", "application/json", "application/json, text/html", "text/html;q=0.5, */*",
                       "text/html;q=0", "text/html;q=abc", "image/*", "application/*, text/html;q=0.9", ";;,,", "text/html;q=0.5, application/json;q=0.5"):
            with self.subTest(accept=accept):
                self.assertFalse(ims.prefers_html(accept))

    def test_prefers_html_takes_any_garbage(self):
        rng = random.Random(SEED)
        alphabet = "text/html,application/json;q=0.5*/ \t.9e-"
        for _ in range(3000):
            accept = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            self.assertIn(ims.prefers_html(accept), (True, False))

    def test_paging(self):
        names = ("a.png", "b.png", "c.png", "d.png")
        self.assertEqual(ims.page_of(names, 2, ""), (("a.png", "b.png"), True))
        self.assertEqual(ims.page_of(names, 2, "b.png"), (("c.png", "d.png"), False))
        self.assertEqual(ims.page_of(names, 2, "bb"), (("c.png", "d.png"), False))
        self.assertEqual(ims.page_of(names, 9, "d.png"), ((), False))
        self.assertEqual(ims.parse_page_query(""), (None, ""))
        self.assertEqual(ims.parse_page_query("limit=5&after=b.png&v=3"), (5, "b.png"))
        for query in ("limit=0", "limit=-1", "limit=x", "limit=", "limit=10001", "limit=1e3"):
            with self.subTest(query=query), self.assertRaises(ims.HTTPError) as caught:
                ims.parse_page_query(query)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn("limit", caught.exception.message)

    def test_the_policy_allows_exactly_the_page_s_own_style_and_script(self):
        page = ims.render_page([], 0, None).decode()
        for tag, directive in (("style", "style-src"), ("script", "script-src")):
            source = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
            digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
            self.assertIn(f"{directive} 'sha256-{digest}'", ims.PAGE_POLICY)
            self.assertEqual(page.count(f"<{tag}"), 1)
        self.assertIn("default-src 'none'", ims.PAGE_POLICY)
        self.assertNotIn("unsafe", ims.PAGE_POLICY)
        self.assertNotRegex(page, r"\son[a-z]+=")
        self.assertNotRegex(page, r"(src|href)=\"(https?:)?//")


class TestPage(HTTPTestCase):
    HOSTILE = '<img src=x onerror=alert(1)>.jpg'

    def page(self, path="/"):
        reply = self.request("GET", path, headers={"Accept": BROWSER_ACCEPT})
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "text/html; charset=utf-8")
        return reply

    def test_programs_keep_the_json_list_and_browsers_get_the_page(self):
        for name in ("b.png", "a.png"):
            self.assertEqual(self.upload(name, make_image("PNG")).status, 201)
        for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):
            with self.subTest(headers=headers):
                reply = self.request("GET", "/", headers=headers)
                self.assertEqual((reply.status, reply.body), (200, b'["a.png", "b.png"]\n'))
                self.assertEqual(reply.headers["Content-Type"], "application/json")
                self.assertEqual(reply.headers["Vary"], "Accept")
        reply = self.page()
        self.assertEqual(reply.headers["Vary"], "Accept")
        self.assertEqual(reply.headers["Content-Security-Policy"], ims.PAGE_POLICY)
        self.assertEqual([tile for tile in re.findall(r'<li class="tile" data-name="([^"]+)"', reply.body.decode())], ["a.png", "b.png"])
        head = self.request("HEAD", "/", headers={"Accept": BROWSER_ACCEPT})
        self.assertEqual((head.status, head.body, head.headers["Content-Length"]), (200, b"", str(len(reply.body))))

    def test_tiles_link_the_original_and_show_renditions_facts_and_controls(self):
        self.assertEqual(self.upload("a.jpg", make_image("JPEG", (400, 300), orientation=6)).status, 201)
        page = self.page().body.decode()
        tile = page.split('<li class="tile"', 1)[1].split("</li>", 1)[0]
        self.assertIn('href="/a.jpg"', tile)
        self.assertIn('data-width="300" data-height="400"', tile)
        self.assertIn("300×400 · ", tile)
        self.assertIn('loading="lazy"', tile)
        for url in re.findall(r'(?:src|srcset)="([^" ]+)', tile):
            reply = self.request("GET", html.unescape(url))
            self.assertEqual((reply.status, reply.headers["Content-Type"]), (200, "image/webp"))
            self.assertEqual(max(decode(reply.body).size), 240)
        self.assertIn('class="delete"', tile)
        self.assertIn('<form class="resize">', tile)

    def test_a_hostile_name_is_text_everywhere(self):
        with open(os.path.join(self.storage, self.HOSTILE), "wb") as file:
            file.write(make_image("JPEG"))
        page = self.page().body.decode()
        self.assertNotIn("<img src=x", page)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;.jpg", page)
        self.assertIn('href="/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.jpg"', page)

    def test_a_large_folder_is_paged(self):
        for index in range(105):
            with open(os.path.join(self.storage, f"{index:03}.png"), "wb") as file:
                file.write(make_image("PNG", (8, 8)))
        page = self.page().body.decode()
        self.assertEqual(page.count('<li class="tile"'), 100)
        self.assertIn('<a rel="next" href="/?limit=100&amp;after=099.png">', page)
        second = self.page("/?limit=100&after=099.png").body.decode()
        self.assertEqual(re.findall(r'<li class="tile" data-name="([^"]+)"', second), [f"{index:03}.png" for index in range(100, 105)])
        self.assertNotIn('rel="next"', second)
        self.assertIn("105 images stored", second)
        reply = self.request("GET", "/?limit=2&after=050.png")
        self.assertEqual(reply.json, ["051.png", "052.png"])
        self.assertEqual(reply.headers["Link"], '</?limit=2&after=052.png>; rel="next"')
        last = self.request("GET", "/?limit=10&after=100.png")
        self.assertEqual((last.json, last.headers["Link"]), (["101.png", "102.png", "103.png", "104.png"], None))
        self.assertEqual(len(self.request("GET", "/").json), 105)
        self.assertError(self.request("GET", "/?limit=0"), 400, "limit")
        self.assertError(self.request("GET", "/?limit=abc", headers={"Accept": BROWSER_ACCEPT}), 400, "limit")

    def test_a_file_that_is_no_image_gets_a_tile_that_says_so(self):
        with open(os.path.join(self.storage, "bad.png"), "wb") as file:
            file.write(b"not an image")
        page = self.page().body.decode()
        self.assertIn('data-name="bad.png"', page)
        self.assertIn("not a readable image", page)


class TestCommandLine(unittest.TestCase):
    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "images")

    def test_start_up_line_names_the_absolute_storage_and_the_real_port(self):
        process, port = start_ims(self, "--storage", self.storage)
        self.assertTrue(os.path.isdir(self.storage))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        connection.request("GET", "/")
        self.assertEqual(connection.getresponse().read(), b"[]\n")
        connection.close()

    def test_environment_variables_are_the_fallback_for_flags(self):
        process, port = start_ims(self, env={"IMS_STORAGE": self.storage, "IMS_MAX_UPLOAD": "1000"})
        body, content_type = multipart_body(files=[("file", "a.png", bytes(range(256)) * 8)])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/", body, {"Content-Type": content_type})
        response = connection.getresponse()
        self.assertEqual(response.status, 413)
        self.assertIn("1000", json.loads(response.read())["message"])

    def test_help_lists_every_option_with_its_environment_variable(self):
        result = subprocess.run(
            [sys.executable, os.path.join(HERE, "ims.py"), "--help"], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(result.returncode, 0)
        for flag, _, _ in ims.OPTIONS:
            self.assertIn(flag, result.stdout)
            self.assertIn("IMS_" + flag[2:].replace("-", "_").upper(), result.stdout)

    def test_invalid_option_value_is_refused_with_status_2(self):
        for arguments, env in ((["--max-upload", "zero"], {}), ([], {"IMS_RESIZE_WORKERS": "0"})):
            result = subprocess.run(
                [sys.executable, os.path.join(HERE, "ims.py"), "--storage", self.storage, *arguments],
                capture_output=True, text=True, timeout=30, env=dict(os.environ, **env),
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("invalid", result.stderr)

    def test_cors_origins_log_format_and_metrics_from_flags_and_variables(self):
        settings = ims.parse_args(["--cors-origin", "http://a.test:8080", "--cors-origin", "https://b.example"], {"IMS_CORS_ORIGIN": "http://c.test"})
        self.assertEqual(settings.cors_origin, ("http://a.test:8080", "https://b.example"))
        settings = ims.parse_args([], {"IMS_CORS_ORIGIN": "http://c.test, http://d.test", "IMS_LOG_FORMAT": "json", "IMS_METRICS": "off"})
        self.assertEqual((settings.cors_origin, settings.log_format, settings.metrics), (("http://c.test", "http://d.test"), "json", False))
        settings = ims.parse_args(["--cors-origin", "*", "--metrics", "ON"], {})
        self.assertEqual((settings.cors_origin, settings.log_format, settings.metrics), (("*",), "common", True))
        for argv in (["--log-format", "xml"], ["--metrics", "maybe"], ["--cors-origin", "app.example"]):
            with self.subTest(argv=argv), mock.patch("sys.stderr", io.StringIO()) as stderr:
                with self.assertRaises(SystemExit) as raised:
                    ims.parse_args(argv, {})
                self.assertEqual(raised.exception.code, 2)
                self.assertIn("invalid", stderr.getvalue())

    def test_out_of_range_values_are_refused_and_empty_variables_mean_the_default(self):
        for argv in (["--port", "70000"], ["--timeout", "1e12"], ["--resize-timeout", "nan"], ["--max-queue", "-1"]):
            with self.subTest(argv=argv), mock.patch("sys.stderr", io.StringIO()) as stderr:
                with self.assertRaises(SystemExit) as raised:
                    ims.parse_args(argv, {})
                self.assertEqual(raised.exception.code, 2)
                self.assertIn("invalid", stderr.getvalue())
        settings = ims.parse_args([], {"IMS_HOST": "", "IMS_STORAGE": ""})
        self.assertEqual(settings.host, "127.0.0.1")
        self.assertEqual(settings.storage, ims.DEFAULT_STORAGE)

    def test_cache_size_and_rendition_sizes(self):
        settings = ims.parse_args(["--cache-size", "0", "--rendition-sizes", "200x200, 1200x0"], {})
        self.assertEqual((settings.cache_size, settings.rendition_sizes), (0, ((200, 200), (1200, 0))))
        settings = ims.parse_args([], {"IMS_CACHE_SIZE": "5000", "IMS_RENDITION_SIZES": "0x0"})
        self.assertEqual((settings.cache_size, settings.rendition_sizes), (5000, ((0, 0),)))
        self.assertEqual(ims.parse_args(["--rendition-sizes", "any"], {}).rendition_sizes, None)
        self.assertEqual(ims.parse_args([], {}).rendition_sizes, None)
        for argv in (["--cache-size", "-1"], ["--rendition-sizes", "200"], ["--rendition-sizes", "200x200,x3"]):
            with self.subTest(argv=argv), mock.patch("sys.stderr", io.StringIO()) as stderr:
                with self.assertRaises(SystemExit) as raised:
                    ims.parse_args(argv, {})
                self.assertEqual(raised.exception.code, 2)
                self.assertIn("invalid", stderr.getvalue())

    def test_a_server_with_an_allow_list_and_no_cache_renders_only_those_sizes(self):
        os.makedirs(self.storage)
        with open(os.path.join(self.storage, "a.png"), "wb") as file:
            file.write(make_image("PNG", (400, 300)))
        _, port = start_ims(self, "--storage", self.storage, "--rendition-sizes", "100x0", "--cache-size", "0")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        for query, status in (("width=100", 200), ("width=100&format=webp", 200), ("width=50", 400), ("height=75", 400)):
            connection.request("GET", "/a.png?" + query)
            response = connection.getresponse()
            self.assertEqual(response.status, status, response.read())
            response.read()
        cache = os.path.join(self.storage, ims.STATE_FOLDER, "renditions")
        self.assertEqual([name for _, _, files in os.walk(cache) for name in files], [])

    def test_parse_args_prefers_flags_to_environment_to_defaults(self):
        settings = ims.parse_args(["--port", "7"], {"IMS_PORT": "8", "IMS_TIMEOUT": "2.5"})
        self.assertEqual((settings.port, settings.timeout, settings.max_queue), (7, 2.5, 256))
        self.assertTrue(os.path.isabs(settings.storage))


class TestSignals(unittest.TestCase):
    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "images")

    def check_clean_stop(self, signal_number):
        process, port = start_ims(self, "--storage", self.storage)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        body, content_type = multipart_body(files=[("file", "kept.png", make_image("PNG"))])
        connection.request("POST", "/", body, {"Content-Type": content_type})
        self.assertEqual(connection.getresponse().read(), b'"Image successfully uploaded"\n')
        # The idle keep-alive connection must not hold the stop up.
        process.send_signal(signal_number)
        self.assertEqual(process.wait(timeout=DEADLINE_SECONDS), 0)
        connection.close()
        self.assertEqual(folder_files(self.storage), ["kept.png"])

    def test_sigterm_stops_cleanly_with_status_0(self):
        self.check_clean_stop(signal.SIGTERM)

    def test_sigint_stops_cleanly_with_status_0(self):
        self.check_clean_stop(signal.SIGINT)

    def test_leftovers_of_a_killed_upload_are_removed_at_start_up(self):
        os.makedirs(self.storage)
        leftover = os.path.join(self.storage, f"{ims.TEMP_PREFIX}{dead_pid()}-abc.jpg")
        with open(leftover, "wb") as file:
            file.write(b"half an upload")
        start_ims(self, "--storage", self.storage)
        self.assertEqual(folder_files(self.storage), [])


@unittest.skipUnless(shutil.which("curl"), "curl is not installed")
class TestReadmeExamples(unittest.TestCase):
    def test_every_curl_example_in_the_readme_works_as_written(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            readme = file.read()
        blocks = [block.split("```", 1)[0] for block in readme.split("```sh\n")[1:]]
        self.assertGreaterEqual(len(blocks), 8)
        tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(tempdir.cleanup)
        process, port = start_ims(self, "--storage", os.path.join(tempdir.name, "storage"))
        outputs = []
        for block in blocks:
            script = block.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
            for file_name in ("downloaded.jpeg", "thumbnail.webp"):
                script = script.replace(file_name, os.path.join(tempdir.name, file_name))
            result = subprocess.run(["bash", "-e", "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, (block, result.stderr))
            outputs.append(result.stdout)
        self.assertEqual(outputs[0], "[]\n")
        self.assertIn("HTTP/1.1 200 OK", outputs[1])
        self.assertIn("Vary: Accept", outputs[1])
        self.assertTrue(outputs[1].endswith("\n\n[]\n"), outputs[1])
        self.assertEqual(outputs[2], '"Image successfully uploaded"\n')
        with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as original, open(os.path.join(tempdir.name, "downloaded.jpeg"), "rb") as copy:
            self.assertEqual(original.read(), copy.read())
        with open(os.path.join(tempdir.name, "thumbnail.webp"), "rb") as file:
            thumbnail = decode(file.read())
        self.assertEqual((thumbnail.format, thumbnail.size), ("WEBP", (300, 400)))
        self.assertIn("HTTP/1.1 200 OK", outputs[4])
        self.assertIn("Content-Type: image/jpeg", outputs[4])
        self.assertIn("-200x200-cover-", outputs[4])
        self.assertEqual(outputs[5], '"Image resize command received"\n')
        job = json.loads(outputs[6])
        self.assertEqual((job["state"], job["width"], job["height"], job["fit"]), ("done", 200, 200, "cover"))
        self.assertIn("HTTP/1.1 204", outputs[7])
        # Uploaded again, with its digest; then its own digest, its facts, health and metrics.
        self.assertEqual(outputs[8], '"Image successfully uploaded"\n')
        with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as original:
            digest = base64.b64encode(hashlib.sha256(original.read()).digest()).decode()
        self.assertIn(f"Repr-Digest: sha-256=:{digest}:", outputs[9])
        facts = json.loads(outputs[10])
        self.assertEqual((facts["width"], facts["upright_width"], facts["orientation"], facts["icc_profile"]), (1600, 1200, 6, True))
        self.assertEqual(outputs[11], '{"status": "ok"}\nims_images 1\n')
        self.assertFalse(os.path.exists(os.path.join(HERE, "upload.body")))

    def test_the_srcset_example_in_the_readme_gets_every_width_it_names(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            html_block = file.read().split("```html\n", 1)[1].split("```", 1)[0]
        srcset = html.unescape(re.search(r'srcset="([^"]+)"', html_block).group(1))
        candidates = [candidate.split() for candidate in srcset.split(",")]
        self.assertEqual(len(candidates), 3)
        tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(tempdir.cleanup)
        storage = os.path.join(tempdir.name, "storage")
        os.makedirs(storage)
        shutil.copy(os.path.join(HERE, "IMG_X.jpeg"), storage)
        _, port = start_ims(self, "--storage", storage)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        for url, width in [*candidates, [html.unescape(re.search(r' src="([^"]+)"', html_block).group(1)), "400w"]]:
            connection.request("GET", url)
            response = connection.getresponse()
            image = decode(response.read())
            self.assertEqual((response.status, response.getheader("Content-Type")), (200, "image/webp"))
            self.assertEqual(f"{image.width}w", width)


class TestSampleImage(unittest.TestCase):
    def test_img_x_is_a_photo_with_orientation_and_colour_profile(self):
        path = os.path.join(HERE, "IMG_X.jpeg")
        self.assertLess(os.path.getsize(path), 400_000)
        with Image.open(path) as image:
            self.assertEqual(image.format, "JPEG")
            self.assertNotIn(image.getexif().get(0x0112), (None, 1))
            self.assertTrue(image.info.get("icc_profile"))


# ====
# Faults: hostile requests, slow clients, limits, full disks, load, crashes
# ====


class TestHostileRequests(HTTPTestCase):
    """Whatever the bytes, the answer is a JSON 4xx (or a correct answer), and never a hang."""

    def assertRefused(self, data, status, words):
        """`data` gets exactly one JSON error of `status` holding `words` (see assertError), and the
        connection is closed after it."""
        reply = self.parse_reply(self.raw_exchange(data))
        self.assertError(reply, status, words)
        return reply

    def store(self, name="a.png"):
        data = make_image("PNG", size=(40, 30))
        self.assertEqual(self.upload(name, data).status, 201)
        return data

    # Request lines

    def test_garbage_request_lines_are_400_json(self):
        for request_line, words in (
            (b"GARBAGE", "request line"),
            (b"\x00\x01\x02\x03 / HTTP/1.1", "request line"),
            (b"GET / HTTP/1.1 extra words", "request line"),
            (b"GET /a b.png HTTP/1.1", "request line"),
            (b"GET  / HTTP/1.1", "request line"),
            (b"GET\t/\tHTTP/1.1", "request line"),
            (b"G(T / HTTP/1.1", "request line"),
            (b"GET /\r HTTP/1.1", "request target"),
            (b"GET /\x7f.png HTTP/1.1", "request target"),
            (b"/ GET HTTP/1.1", "request line"),
        ):
            with self.subTest(request_line=request_line):
                self.assertRefused(request_line + b"\r\nHost: ims.test\r\n\r\n", 400, words)

    def test_lowercase_and_malformed_versions_are_400_json(self):
        for version in (b"http/1.1", b"HTTP/1", b"HTTP/1.1.1", b"HTTP/11", b"HTTP/1.x", b"HTTPS/1.1", b"HTTP/ 1.1"):
            with self.subTest(version=version):
                self.assertRefused(b"GET / " + version + b"\r\nHost: ims.test\r\n\r\n", 400, "request line")

    def test_http_2_request_line_is_505_json(self):
        self.assertRefused(b"GET / HTTP/2.0\r\nHost: ims.test\r\n\r\n", 505, ("HTTP/2.0", "HTTP/1.1"))
        self.assertRefused(b"GET / HTTP/3.0\r\nHost: ims.test\r\n\r\n", 505, ("HTTP/3.0", "HTTP/1.1"))

    def test_http_2_connection_preface_gets_a_json_refusal(self):
        # "PRI * HTTP/2.0" is a well-formed request line of major version 2.
        self.assertRefused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, ("HTTP/2.0", "HTTP/1.1"))

    def test_http_1_2_request_is_answered_as_http_1_1(self):
        # RFC 9110 §6.2: a higher minor version of a major version we implement is treated as ours.
        reply = self.parse_reply(self.raw_exchange(b"GET / HTTP/1.2\r\nHost: ims.test\r\nConnection: close\r\n\r\n"))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json, [])

    def test_http_0_9_style_request_with_blank_line_is_400_json(self):
        self.assertRefused(b"GET /\r\n\r\n", 400, "request line")

    def test_http_0_9_client_waiting_after_its_one_line_gets_400_at_once(self):
        # An HTTP/0.9 client sends "GET /" and one line end, then waits for the answer; the line
        # alone is already not HTTP/1.x, so waiting for more (until --timeout) would hang it. A
        # server that waited would close at its --timeout (30 s) without a word: no 400 to parse.
        reply = self.parse_reply(self.raw_exchange(b"GET /\r\n"))
        self.assertError(reply, 400, "request line")

    def test_unknown_methods_are_405_with_allow(self):
        for method in ("BREW", "get", "PROPFIND", "TRACE", "A" * 200):
            with self.subTest(method=method[:20]):
                request = f"{method} / HTTP/1.1\r\nHost: ims.test\r\nX-Secret: do-not-echo\r\nConnection: close\r\n\r\n".encode()
                reply = self.assertRefused(request, 405, method)
                self.assertEqual({m.strip() for m in reply.headers["Allow"].split(",")}, {"GET", "HEAD", "POST"})
                self.assertNotIn(b"do-not-echo", reply.body)

    def test_unknown_method_on_an_image_keeps_the_image(self):
        data = self.store()
        reply = self.assertRefused(b"PUT /a.png HTTP/1.1\r\nHost: ims.test\r\nContent-Length: 3\r\n\r\nabc", 405, "PUT")
        self.assertIn("PATCH", reply.headers["Allow"])
        self.assertEqual(self.request("GET", "/a.png").body, data)

    def test_connect_and_asterisk_targets_are_4xx_json(self):
        # Neither a path nor an http(s) URL: the target names nothing IMS serves.
        for request, target in (
            (b"CONNECT ims.test:443 HTTP/1.1", "'ims.test:443'"),
            (b"OPTIONS * HTTP/1.1", "'*'"),
            (b"GET ftp://ims.test/a.png HTTP/1.1", "'ftp://ims.test/a.png'"),
        ):
            with self.subTest(request=request):
                self.assertRefused(request + b"\r\nHost: ims.test\r\nConnection: close\r\n\r\n", 400, target)

    # HTTP/1.0 and absolute-form

    def test_http_1_0_request_is_answered_then_closed(self):
        self.store()
        raw = self.raw_exchange(b"GET / HTTP/1.0\r\n\r\n")
        reply = self.parse_reply(raw)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json, ["a.png"])

    def test_http_1_0_keep_alive_request_keeps_the_connection_open(self):
        sock = self.open_socket()
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply = self.read_reply(sock)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["Connection"].lower(), "keep-alive")
        sock.sendall(b"GET /missing.png HTTP/1.0\r\n\r\n")
        reply = self.parse_reply(self.read_until_close(sock))
        self.assertError(reply, 404, "missing.png")

    def test_http_1_0_upload_with_content_length_is_stored(self):
        data = make_image("PNG")
        body, content_type = multipart_body(files=[("file", "old.png", data)])
        head = f"POST / HTTP/1.0\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        reply = self.parse_reply(self.raw_exchange(head + body))
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.request("GET", "/old.png").body, data)

    def test_absolute_form_targets_are_served_like_paths(self):
        data = self.store()
        reply = self.parse_reply(self.raw_exchange(
            b"GET http://ims.test/a.png HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n"
        ))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.body, data)
        for target in (b"http://ims.test/", b"HTTP://ims.test:5000/", b"http://ims.test"):
            with self.subTest(target=target):
                reply = self.parse_reply(self.raw_exchange(
                    b"GET " + target + b" HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n"
                ))
                self.assertEqual(reply.status, 200, reply.body)
                self.assertEqual(reply.json, ["a.png"])

    # Pipelining

    def test_pipelined_requests_are_answered_in_order_each_framed_exactly(self):
        data = self.store()
        requests = (
            b"GET /a.png HTTP/1.1\r\nHost: ims.test\r\n\r\n"
            b"HEAD /a.png HTTP/1.1\r\nHost: ims.test\r\n\r\n"
            b"GET /missing.png HTTP/1.1\r\nHost: ims.test\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n"
        )
        raw = self.raw_exchange(requests)
        first, raw = self.split_reply(raw)
        second, raw = self.split_reply(raw, "HEAD")
        third, raw = self.split_reply(raw)
        fourth = self.parse_reply(raw)
        self.assertEqual((first.status, first.body), (200, data))
        self.assertEqual((second.status, second.body), (200, b""))
        self.assertEqual(second.headers["Content-Length"], str(len(data)))
        self.assertError(third, 404, "missing.png")
        self.assertEqual((fourth.status, fourth.json), (200, ["a.png"]))

    def test_pipelined_uploads_with_bodies_are_each_read_to_their_exact_end(self):
        first_data, second_data = make_image("PNG", color=(1, 2, 3)), make_image("PNG", color=(4, 5, 6))
        body, content_type = multipart_body(files=[("file", "one.png", first_data)])
        by_length = self.multipart_request_head(content_type, len(body)) + body
        body, content_type = multipart_body(files=[("file", "two.png", second_data)])
        chunks = f"{len(body) // 2:x}\r\n".encode() + body[:len(body) // 2] + b"\r\n"
        chunks += f"{len(body) - len(body) // 2:x}\r\n".encode() + body[len(body) // 2:] + b"\r\n0\r\n\r\n"
        by_chunks = self.multipart_request_head(content_type, None, ["Transfer-Encoding: chunked"]) + chunks
        listing = b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n"
        raw = self.raw_exchange(by_length + by_chunks + listing)
        first, raw = self.split_reply(raw)
        second, raw = self.split_reply(raw)
        third = self.parse_reply(raw)
        self.assertEqual((first.status, second.status), (201, 201), (first.body, second.body))
        self.assertEqual((third.status, third.json), (200, ["one.png", "two.png"]))
        self.assertEqual(self.request("GET", "/two.png").body, second_data)

    # Header injection

    def test_header_injection_attempts_are_400_json_and_close(self):
        for header_lines, words in (
            (b"X-Name: a\rInjected: yes", ("'X-Name'", "control characters")),
            (b"X-Name: a\x00b", ("'X-Name'", "control characters")),
            (b"Host : ims.test", ("'Host : ims.test'", "malformed")),
            (b"X-Name\t: a", "malformed"),
            (b"X-Name: a\r\n folded: continuation", ("' folded: continuation'", "malformed")),
            (b"X-Name: a\r\n\tfolded", "malformed"),
            (b" X-Leading-Space: a", ("' X-Leading-Space: a'", "malformed")),
            (b"X Name: a", ("'X Name: a'", "malformed")),
            (b"X-N\xe4me: a", "malformed"),
            (b": no name", ("': no name'", "malformed")),
            (b"no colon at all", ("'no colon at all'", "malformed")),
        ):
            with self.subTest(header_lines=header_lines):
                request = b"GET / HTTP/1.1\r\nHost: ims.test\r\n" + header_lines + b"\r\n\r\n"
                self.assertRefused(request, 400, words)

    def test_header_injection_after_a_request_is_never_answered_as_a_second_request(self):
        self.store()
        request = b"GET / HTTP/1.1\r\nHost: ims.test\r\nX-Name: a\r\rDELETE /a.png HTTP/1.1\r\n\r\n"
        self.assertRefused(request, 400, ("'X-Name'", "control characters"))
        self.assertEqual(self.request("GET", "/").json, ["a.png"])

    # Request smuggling (RFC 9112 §6.3)

    # Hidden after an ambiguous request; it asks to close, so a server that runs it answers at once.
    SMUGGLED = b"DELETE /a.png HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n"

    def assertSmugglingRefused(self, head, body, words):
        """The ambiguous request is 400 saying why, the connection is closed, and the request hidden
        after it never runs."""
        if not os.path.exists(os.path.join(self.storage, "a.png")):
            self.store()
        self.assertRefused(head + body + self.SMUGGLED, 400, words)
        self.assertEqual(self.request("GET", "/").json, ["a.png"])
        self.assertNoTempFiles()

    def smuggling_head(self, *framing_lines, version="HTTP/1.1"):
        _, content_type = multipart_body()
        lines = [f"POST / {version}", "Host: ims.test", f"Content-Type: {content_type}", *framing_lines]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def test_content_length_with_transfer_encoding_is_400_and_closes(self):
        head = self.smuggling_head("Content-Length: 5", "Transfer-Encoding: chunked")
        self.assertSmugglingRefused(head, b"0\r\n\r\n", "Content-Length")

    def test_transfer_encoding_before_content_length_is_400_and_closes(self):
        head = self.smuggling_head("Transfer-Encoding: chunked", "Content-Length: 5")
        self.assertSmugglingRefused(head, b"0\r\n\r\n", "Content-Length")

    def test_two_different_content_lengths_are_400_and_close(self):
        head = self.smuggling_head("Content-Length: 5", "Content-Length: 50")
        self.assertSmugglingRefused(head, b"hello", "Content-Length")

    def test_content_length_list_with_different_values_is_400_and_closes(self):
        self.assertSmugglingRefused(self.smuggling_head("Content-Length: 5, 50"), b"hello", "Content-Length")

    def test_chunked_chunked_is_400_and_closes(self):
        head = self.smuggling_head("Transfer-Encoding: chunked, chunked")
        self.assertSmugglingRefused(head, b"0\r\n\r\n", "Transfer-Encoding")

    def test_chunked_twice_in_two_fields_is_400_and_closes(self):
        head = self.smuggling_head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")
        self.assertSmugglingRefused(head, b"0\r\n\r\n", "Transfer-Encoding")

    def test_gzip_transfer_encoding_is_400_and_closes(self):
        self.assertSmugglingRefused(self.smuggling_head("Transfer-Encoding: gzip"), b"0\r\n\r\n", "Transfer-Encoding")

    def test_identity_and_unknown_transfer_encodings_are_400_and_close(self):
        for coding in ("identity", "chunked, identity", "xchunked", "chunked;q=1", '"chunked"'):
            with self.subTest(coding=coding):
                head = self.smuggling_head(f"Transfer-Encoding: {coding}")
                self.assertRefused(head + b"0\r\n\r\n" + self.SMUGGLED, 400, "Transfer-Encoding")

    def test_transfer_encoding_in_http_1_0_is_400_and_closes(self):
        head = self.smuggling_head("Transfer-Encoding: chunked", version="HTTP/1.0")
        self.assertSmugglingRefused(head, b"0\r\n\r\n", "Transfer-Encoding")

    def test_content_length_with_white_space_other_than_space_and_tab_is_400(self):
        # RFC 9110 §5.5: only SP and HTAB surround a field value; a proxy that reads "\x0b5" or
        # "5\xa0" differently from us would frame the next request differently.
        for value in (b"\x0b5", b"5\x0c", b"\xa05", b"5\x1c", b"\x855"):
            with self.subTest(value=value):
                head = self.smuggling_head()[:-2] + b"Content-Length: " + value + b"\r\n\r\n"
                self.assertSmugglingRefused(head, b"hello", "Content-Length")

    # Absurd numbers

    def test_absurd_content_lengths_are_4xx_json(self):
        # None is one non-negative integer of at most 18 digits, so none is compared with the limit.
        for value in ("1" * 30, "-1", "0x10", "1e3", "+5", "", "5 5", "99999999999999999999999999999999999999999"):
            with self.subTest(value=value):
                head = self.smuggling_head(f"Content-Length: {value}")
                self.assertRefused(head + b"hello", 400, ("Content-Length", repr(value)))
        self.assertNoTempFiles()

    def test_content_length_far_over_the_upload_limit_is_413_before_the_body(self):
        head = self.smuggling_head("Content-Length: 999999999999999999")
        self.assertRefused(head + b"a little", 413, ("999999999999999999", "16000000"))

    def test_get_with_absurd_content_length_is_never_a_5xx(self):
        request = b"GET / HTTP/1.1\r\nHost: ims.test\r\nContent-Length: 999999999999999999\r\n\r\nabc"
        reply = self.parse_reply(self.raw_exchange(request))
        # GET / reads no body, so it is answered, and the connection closed: the unread body must
        # not be taken for the next request.
        self.assertEqual((reply.status, reply.json, reply.headers["Connection"]), (200, [], "close"))

    def test_absurd_ranges_give_the_whole_image_a_range_or_416(self):
        data = self.store()
        # A number of more than 18 digits, a malformed range or several ranges are ignored (RFC
        # 9110 §14.2): the whole image. A start past the end, or a suffix of 0 bytes: 416.
        for value, status in (
            ("bytes=99999999999999999999-", 200), ("bytes=0-99999999999999999999", 200),
            ("bytes=-99999999999999999999", 200), ("bytes=999999999999999999-", 416),
            ("bytes=18446744073709551616-18446744073709551617", 200), ("bytes=-0", 416), ("bytes=--1", 200),
            ("bytes=1-0", 200), ("bytes=0x10-", 200), ("bytes=" + "0" * 5000 + "-", 200), ("bytes=" + "0-," * 2000, 200),
        ):
            with self.subTest(value=value[:40]):
                request = f"GET /a.png HTTP/1.1\r\nHost: ims.test\r\nRange: {value}\r\nConnection: close\r\n\r\n"
                reply = self.parse_reply(self.raw_exchange(request.encode()))
                if status == 200:
                    self.assertEqual((reply.status, reply.body), (200, data))
                else:
                    self.assertError(reply, 416, repr(value))
                    self.assertEqual(reply.headers["Content-Range"], f"bytes */{len(data)}")

    def test_absurd_dates_in_conditional_headers_are_never_a_5xx(self):
        data = self.store()
        for value in (
            "Fri, 31 Dec 99999 23:59:59 GMT", "Sat, 01 Jan 0001 00:00:00 +1400", "Fri, 31 Dec 9999 23:59:59 -2359",
            "Fri, 31 Dec 9999 99:99:99 GMT", "Thu, 01 Jan 1970 00:00:00 +9999", "1" * 400, "\xff\xfe",
        ):
            with self.subTest(value=value[:40]):
                # None is a valid date at or after the file's and not in the future, so
                # If-Modified-Since never gives 304 and the range is served; as If-Range, it is
                # neither the ETag nor the Last-Modified, so the whole image is sent.
                for header, status, body in (("If-Modified-Since", 206, data[:4]), ("If-Range", 200, data)):
                    request = (
                        f"GET /a.png HTTP/1.1\r\nHost: ims.test\r\n{header}: {value}\r\n"
                        "Range: bytes=0-3\r\nConnection: close\r\n\r\n"
                    )
                    reply = self.parse_reply(self.raw_exchange(request.encode("latin-1")))
                    self.assertEqual((reply.status, reply.body), (status, body), header)

    def test_absurd_job_waits_are_400_json_and_finite_huge_ones_are_capped(self):
        self.store()
        reply = self.request("PATCH", "/a.png?width=4&height=3")
        self.assertEqual(reply.status, 202, reply.body)
        location = reply.headers["Location"]
        connection = self.connect()
        # Asked at once, while the job most likely still runs: the wait must be capped, not overflow.
        for value in ("1e308", "99999999999999999999999", "60.0000001"):
            with self.subTest(value=value):
                reply = self.request("GET", f"{location}?wait={value}", connection=connection)
                self.assertEqual((reply.status, reply.json["state"]), (200, "done"))
        for value in ("1e309", "inf", "-inf", "nan", "NaN", "-1", "-0.001", "0x10", "1" * 400, "1e-400x", "%00"):
            with self.subTest(value=value[:20]):
                self.assertError(self.request("GET", f"{location}?wait={value}", connection=connection), 400, "wait")

    def test_absurd_resize_dimensions_are_400_json(self):
        self.store()
        for body, words in (
            ({"width": 10 ** 30, "height": 10}, "pixels"),
            ({"width": 10, "height": 10 ** 30}, "pixels"),
            ({"width": 10 ** 30, "height": 10 ** 30}, "pixels"),
            ({"width": -10 ** 30, "height": 10}, "width"),
            ({"width": "1" * 30, "height": "10"}, "width"),
            ({"width": 1e30, "height": 10}, "width"),
            ({"width": 10, "height": 0}, "height"),
            ({"width": [10], "height": {"10": 10}}, "width"),
        ):
            with self.subTest(body=str(body)[:60]):
                reply = self.request("PATCH", "/a.png", json.dumps(body), {"Content-Type": "application/json"})
                self.assertError(reply, 400, words)
        # Pythons that limit int() to 4300 digits (3.8.14 and later) refuse a longer JSON number as
        # invalid JSON; older ones read it, and it is then too many pixels.
        long_number_words = "JSON" if hasattr(sys, "get_int_max_str_digits") else "pixels"
        for raw_body, status, words in (
            (b'{"width": 1e400, "height": 10}', 400, ("width", "inf")),
            (b'{"width": NaN, "height": 10}', 400, ("width", "nan")),
            (b'{"width": Infinity, "height": 10}', 400, ("width", "inf")),
            (b'{"width": 1' + b"0" * 5000 + b', "height": 10}', 400, long_number_words),
            (b"[" * 30000 + b"]" * 30000, 400, "JSON"),
            (b'{"width": ' * 5000, 400, "JSON"),
            (b"[" * 100000, 413, ("100000", str(ims.MAX_PARAMETERS_BYTES))),
            (b"\xff\xfe{}", 400, "JSON"),
        ):
            with self.subTest(raw_body=raw_body[:40]):
                reply = self.request("PATCH", "/a.png", raw_body, {"Content-Type": "application/json"})
                self.assertError(reply, status, words)
        for query, words in (("width=" + "9" * 30 + "&height=10", "width"), ("width=10&height=-0", "height"), ("width=1e3&height=10", "width")):
            with self.subTest(query=query[:40]):
                self.assertError(self.request("PATCH", f"/a.png?{query}"), 400, words)
        self.assertEqual(self.request("GET", "/").json, ["a.png"])

    def test_chunk_size_of_forty_hex_digits_is_400_and_closes(self):
        head = self.smuggling_head("Transfer-Encoding: chunked")
        self.assertRefused(head + b"f" * 40 + b"\r\nabc\r\n0\r\n\r\n" + self.SMUGGLED, 400, "chunk")
        self.assertNoTempFiles()

    def test_negative_and_non_hex_chunk_sizes_are_400(self):
        for size_line in (b"-1", b"0x10", b"1 0", b"", b"g", b"+5"):
            with self.subTest(size_line=size_line):
                head = self.smuggling_head("Transfer-Encoding: chunked")
                self.assertRefused(head + size_line + b"\r\nhello\r\n0\r\n\r\n", 400, "chunk size")

    def test_huge_chunk_that_never_arrives_is_4xx_not_a_hang(self):
        head = self.smuggling_head("Transfer-Encoding: chunked")
        sock = self.open_socket()
        sock.sendall(head + b"ffffffffffffffff\r\n" + b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        reply = self.parse_reply(self.read_until_close(sock))
        # 1000 bytes are far below --max-upload; then the body ends inside the chunk.
        self.assertError(reply, 400, "last chunk")
        self.assertNoTempFiles()

    # Size limits of the head

    def test_request_line_over_8_kib_is_414_json(self):
        request = b"GET /" + b"a" * (8 * 1024 + 10) + b".png HTTP/1.1\r\nHost: ims.test\r\n\r\n"
        self.assertRefused(request, 414, "8192")

    def test_request_line_that_never_ends_is_414_json(self):
        self.assertRefused(b"GET /" + b"a" * (100 * 1024), 414, "8192")

    def test_request_line_of_100_kib_followed_by_headers_is_414_json(self):
        request = b"GET /" + b"a" * (100 * 1024) + b".png HTTP/1.1\r\nHost: ims.test\r\n\r\n"
        self.assertRefused(request, 414, "request line")

    def test_long_request_line_and_header_within_the_limits_are_served(self):
        cookie = b"Cookie: " + b"c" * 6000 + b"\r\n"
        request = b"GET /" + b"a" * 6000 + b".png HTTP/1.1\r\nHost: ims.test\r\n" + cookie + b"Connection: close\r\n\r\n"
        self.assertRefused(request, 404, "a" * 6000 + ".png")
        request = b"GET / HTTP/1.1\r\nHost: ims.test\r\n" + cookie + b"Connection: close\r\n\r\n"
        self.assertEqual(self.parse_reply(self.raw_exchange(request)).status, 200)

    def test_header_line_over_8_kib_is_431_json(self):
        request = b"GET / HTTP/1.1\r\nHost: ims.test\r\nCookie: " + b"c" * (8 * 1024 + 10) + b"\r\n\r\n"
        self.assertRefused(request, 431, "8192")

    def test_more_than_100_header_fields_is_431_json(self):
        fields = b"".join(b"X-Field-%d: %d\r\n" % (index, index) for index in range(100))
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: ims.test\r\n" + fields + b"\r\n", 431, "100")

    def test_exactly_100_header_fields_are_served(self):
        fields = b"".join(b"X-Field-%d: %d\r\n" % (index, index) for index in range(98))
        request = b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n" + fields + b"\r\n"
        self.assertEqual(self.parse_reply(self.raw_exchange(request)).status, 200)

    def test_head_over_64_kib_of_short_lines_is_431_json(self):
        fields = b"".join(b"X-Field-%d: %s\r\n" % (index, b"v" * 4000) for index in range(20))
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n" + fields + b"\r\n", 431, "65536")

    def test_server_keeps_serving_after_every_kind_of_hostile_request(self):
        for request, status, words in (
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", 400, "request line"),
            (b"GET / HTTP/1.1\r\nHost: ims.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "Content-Length"),
            (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414, "8192"),
        ):
            self.assertRefused(request, status, words)
        self.assertEqual(self.request("GET", "/").json, [])


# ====
# Slow and silent clients
# ====


class SlowClientAssertions:
    """For HTTPTestCase classes: helpers that tell a disconnected client from a waiting one."""

    def assertDisconnected(self, sock, status=None, may_reset=False):
        """The server closes `sock` (failing the test after DEADLINE_SECONDS).

        `status` None: a request head that did not come in time is dropped without a word; 408:
        a body that stalled is answered 408 first. `may_reset`: the client may have written after
        the close, so the kernel may report a reset instead.
        """
        try:
            data = self.read_until_close(sock)
        except ConnectionResetError:
            if not may_reset:
                raise
            return
        if status is None:
            self.assertEqual(data, b"", "the server answered a request head that never came whole")
        else:
            self.assertError(self.parse_reply(data), status, f"stalled for {self.server_options['timeout']:g} seconds")

    def is_closed_by_server(self, sock):
        """Tell, without waiting, whether the server has closed `sock` (or answered on it)."""
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)


class TestSlowClients(SlowClientAssertions, HTTPTestCase):
    server_options = {"timeout": 0.5}

    def test_half_a_request_head_then_silence_is_disconnected(self):
        sock = self.open_socket()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\n")
        self.assertDisconnected(sock)

    def test_connection_that_never_sends_a_byte_is_disconnected(self):
        self.assertDisconnected(self.open_socket())

    def test_head_trickled_a_byte_at_a_time_past_the_timeout_is_disconnected(self):
        # Each byte comes well within the timeout, but the whole head would take 25 s.
        head = b"GET / HTTP/1.1\r\nHost: ims.test\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
        sock = self.open_socket()
        for byte in head:
            # One byte per 0.1 s; select returns early when the server closes the connection.
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                break
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return
        else:
            self.fail("the whole trickled head was accepted")
        self.assertDisconnected(sock, may_reset=True)

    def test_idle_keep_alive_connection_is_closed_after_the_timeout(self):
        sock = self.open_socket()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\n\r\n")
        self.assertEqual(self.read_reply(sock).status, 200)
        self.assertDisconnected(sock)

    def test_resize_body_that_stops_midway_is_disconnected(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        sock = self.open_socket()
        head = b"PATCH /a.png HTTP/1.1\r\nHost: ims.test\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
        sock.sendall(head + b'{"width": 10')
        self.assertDisconnected(sock, 408)
        self.assertEqual(self.request("GET", "/a.png").body, make_image("PNG"))

    def test_server_serves_others_after_slow_clients_are_dropped(self):
        slow = [self.open_socket() for _ in range(10)]
        for sock in slow:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: ims.test\r\n")
        for sock in slow:
            self.assertDisconnected(sock)
        self.assertEqual(self.upload("after.png", make_image("PNG")).status, 201)


class TestStalledUploads(SlowClientAssertions, HTTPTestCase):
    # A stalled upload's temp file lives for --timeout after its last byte, and the test must see
    # it in that time: ample on a loaded machine, short enough to wait out.
    server_options = {"timeout": 2}

    def test_upload_that_stops_mid_body_is_disconnected_and_leaves_no_temp_file(self):
        body, content_type = multipart_body(files=[("file", "stalled.png", encode(noise((100, 100)), "PNG"))])
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body)) + body[:len(body) // 2])
        wait_for(self.temp_files)
        self.assertDisconnected(sock, 408)
        wait_for(lambda: not self.temp_files())
        self.assertEqual(self.stored_files(), [])
        self.assertEqual(self.request("GET", "/").json, [])

    def test_chunked_upload_that_stops_mid_body_is_disconnected_and_leaves_no_temp_file(self):
        body, content_type = multipart_body(files=[("file", "stalled.png", encode(noise((100, 100)), "PNG"))])
        head = self.multipart_request_head(content_type, None, ["Transfer-Encoding: chunked"])
        sock = self.open_socket()
        sock.sendall(head + f"{len(body):x}\r\n".encode() + body[:len(body) // 2])
        wait_for(self.temp_files)
        self.assertDisconnected(sock, 408)
        wait_for(lambda: not self.temp_files())
        self.assertEqual(self.request("GET", "/").json, [])


class TestManySlowClients(SlowClientAssertions, HTTPTestCase):
    # Far longer than the test, so the trickling sockets stay open while another client is served,
    # however loaded the machine; server_close() cuts them at once (they are waiting for a head).
    server_options = {"timeout": 60}
    SLOW_CLIENTS = 50

    def test_get_is_answered_while_fifty_clients_trickle_their_heads(self):
        slow = [self.open_socket() for _ in range(self.SLOW_CLIENTS)]
        stop = threading.Event()
        sent = []

        def trickle():
            line = b"GET / HTTP/1.1\r\nHost: ims.test\r\nX-Slow: " + b"a" * 1000
            for byte in line:
                for sock in slow:
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        pass
                sent.append(byte)
                # Pacing: one byte per socket every 0.1 s until the test ends.
                if stop.wait(0.1):
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        self.addCleanup(trickler.join)
        self.addCleanup(stop.set)
        wait_for(lambda: len(sent) >= 3)
        self.assertEqual([sock for sock in slow if self.is_closed_by_server(sock)], [])
        connection = self.connect()
        self.assertEqual(self.request("GET", "/", connection=connection).json, [])
        self.assertEqual(self.upload("during.png", make_image("PNG"), connection=connection).status, 201)
        self.assertEqual(self.request("GET", "/", connection=connection).json, ["during.png"])
        # The slow clients were still connected (and still trickling) while the others were served.
        self.assertEqual([sock for sock in slow if self.is_closed_by_server(sock)], [])


# ====
# Connection limit
# ====


class TestConnectionLimit(HTTPTestCase):
    server_options = {"max_connections": 2}

    def open_served_socket(self):
        """Return a keep-alive connection that has been served once, so it holds a slot."""
        sock = self.open_socket()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\n\r\n")
        self.assertEqual(self.read_reply(sock).status, 200)
        return sock

    def test_connection_past_the_limit_waits_then_is_served_when_a_slot_frees(self):
        first, second = self.open_served_socket(), self.open_served_socket()
        third = self.open_socket()  # connect succeeds: it waits in the listen backlog
        third.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n")
        # An upload on a connection that holds a slot is served meanwhile, and the third's listing,
        # when it comes, already holds it: the third was not served before.
        body, content_type = multipart_body(files=[("file", "during.png", make_image("PNG"))])
        second.sendall(self.multipart_request_head(content_type, len(body)) + body)
        self.assertEqual(self.read_reply(second).status, 201)
        readable, _, _ = select.select([third], [], [], 0)
        self.assertEqual(readable, [], "a third connection was served while two held both slots")
        first.close()
        reply = self.parse_reply(self.read_until_close(third))
        self.assertEqual((reply.status, reply.json), (200, ["during.png"]))
        second.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n")
        self.assertEqual(self.parse_reply(self.read_until_close(second)).status, 200)

    def test_burst_far_past_the_limit_is_served_in_full_without_resets(self):
        sockets = [self.open_socket() for _ in range(40)]
        for sock in sockets:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n")
        for sock in sockets:
            reply = self.parse_reply(self.read_until_close(sock))
            self.assertEqual(reply.status, 200)


# ====
# Full and read-only disk
# ====


class TestDiskFull(HTTPTestCase):
    """The storage folder is a 1 MiB tmpfs; skipped where mounting one is not allowed."""

    TMPFS_SIZE = "1m"

    def prepare_storage(self):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        os.mkdir(self.storage)
        self.mount("-t", "tmpfs", "-o", f"size={self.TMPFS_SIZE},mode=0755", "tmpfs", self.storage)
        self.addCleanup(subprocess.run, ["umount", "-l", self.storage], capture_output=True)

    def mount(self, *arguments):
        try:
            result = subprocess.run(["mount", *arguments], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as error:
            self.skipTest(f"cannot run mount: {error}")
        if result.returncode != 0:
            self.skipTest(f"cannot mount here: {result.stderr.strip()}")

    def fill_disk(self):
        """Write a file that takes every byte the tmpfs has left."""
        descriptor = os.open(os.path.join(self.storage, "filler.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            with self.assertRaises(OSError) as caught:
                for _ in range(1000):
                    os.write(descriptor, bytes(64 * 1024))
            self.assertEqual(caught.exception.errno, errno.ENOSPC)
        finally:
            os.close(descriptor)

    def noise_png(self, seed):
        """About 120 KB that does not compress: eight of them fill the tmpfs."""
        return encode(noise((200, 200), seed), "PNG")

    def test_upload_that_does_not_fit_is_507_and_stored_images_stay_whole(self):
        stored = {}
        refused = None
        for index in range(20):
            name, data = f"fill-{index}.png", self.noise_png(SEED + index)
            reply = self.upload(name, data)
            if reply.status == 507:
                refused = (name, data, reply)
                break
            self.assertEqual(reply.status, 201, reply.body)
            stored[name] = data
        self.assertIsNotNone(refused, "the 1 MiB tmpfs never filled up")
        self.assertGreater(len(stored), 2)
        name, data, reply = refused
        self.assertError(reply, 507, os.strerror(errno.ENOSPC))
        self.assertNoTempFiles()
        self.assertEqual(self.request("GET", "/").json, sorted(stored))
        for stored_name, stored_data in stored.items():
            self.assertEqual(self.request("GET", "/" + stored_name).body, stored_data)
        # Space freed by a delete is usable again: the refusal was the full disk, nothing else.
        self.assertEqual(self.request("DELETE", "/" + sorted(stored)[0]).status, 204)
        self.assertEqual(self.request("DELETE", "/" + sorted(stored)[1]).status, 204)
        self.assertEqual(self.upload(name, data).status, 201)
        self.assertEqual(self.request("GET", "/" + name).body, data)

    def test_chunked_upload_that_does_not_fit_is_507_and_leaves_nothing(self):
        self.fill_disk()
        data = self.noise_png(SEED)
        body, content_type = multipart_body(files=[("file", "big.png", data)])
        pieces = [body[start:start + 8192] for start in range(0, len(body), 8192)]
        chunks = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces)
        reply = self.request(
            "POST", "/", chunks + b"0\r\n\r\n", {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
        )
        self.assertError(reply, 507, os.strerror(errno.ENOSPC))
        self.assertNoTempFiles()
        self.assertEqual(self.request("GET", "/").json, [])

    def test_resize_on_a_full_disk_is_507_and_keeps_the_image(self):
        # A 202 is a promise that the job is on disk; a full disk cannot hold its record.
        data = self.noise_png(SEED)
        self.assertEqual(self.upload("a.png", data).status, 201)
        self.fill_disk()
        self.assertError(self.request("PATCH", "/a.png?width=400&height=400"), 507, os.strerror(errno.ENOSPC))
        self.assertEqual(self.request("GET", "/a.png").body, data)
        self.assertNoTempFiles()

    def test_resize_that_does_not_fit_fails_its_job_and_keeps_the_image(self):
        data = self.noise_png(SEED)
        self.assertEqual(self.upload("a.png", data).status, 201)
        hold = self.request("PATCH", "/a.png?width=4000&height=4000")
        self.assertEqual(hold.status, 202, hold.body)
        reply = self.request("PATCH", "/a.png?width=400&height=400")
        self.assertEqual(reply.status, 202, reply.body)
        self.fill_disk()
        for location in (hold.headers["Location"], reply.headers["Location"]):
            job = self.wait_job(location)
            self.assertEqual(job["state"], "failed")
            self.assertTrue(job["error"])
        self.assertEqual(self.request("GET", "/a.png").body, data)
        self.assertNoTempFiles()

    def test_a_rendition_on_a_full_disk_is_served_uncached(self):
        self.assertEqual(self.upload("a.png", self.noise_png(SEED)).status, 201)
        self.fill_disk()
        for _ in range(2):
            reply = self.request("GET", "/a.png?width=100&format=png")
            self.assertEqual(reply.status, 200, reply.body)
            self.assertEqual(decode(reply.body).size, (100, 100))
        cache = os.path.join(self.storage, ims.STATE_FOLDER, "renditions")
        self.assertEqual([name for _, _, files in os.walk(cache) for name in files], [])
        self.assertNoTempFiles()

    def test_read_only_folder_refuses_writes_with_507_and_keeps_serving_downloads(self):
        data = self.noise_png(SEED)
        self.assertEqual(self.upload("kept.png", data).status, 201)
        self.mount("-o", "remount,ro", self.storage)
        self.addCleanup(subprocess.run, ["mount", "-o", "remount,rw", self.storage], capture_output=True)
        self.assertError(self.upload("new.png", self.noise_png(SEED + 1)), 507, os.strerror(errno.EROFS))
        self.assertError(self.request("DELETE", "/kept.png"), 507, os.strerror(errno.EROFS))
        self.assertError(self.request("PATCH", "/kept.png?width=10&height=10"), 507, os.strerror(errno.EROFS))
        self.assertEqual(self.request("GET", "/").json, ["kept.png"])
        reply = self.request("GET", "/kept.png")
        self.assertEqual((reply.status, reply.body), (200, data))
        rendition = self.request("GET", "/kept.png?width=20")
        self.assertEqual((rendition.status, decode(rendition.body).size), (200, (20, 20)))
        self.assertEqual(self.stored_files(), ["kept.png"])


# ====
# Mixed concurrent load
# ====


class TestMixedLoad(HTTPTestCase):
    server_options = {"resize_workers": 2}
    NAMES = ("a.png", "b.jpg", "c.gif", "d.png", "e.webp")
    CLIENTS = 8
    OPERATIONS_PER_CLIENT = 60

    def image_for(self, name, rng):
        image_format = FORMAT_BY_SUFFIX[name.rsplit(".", 1)[1]]
        size = (rng.randint(40, 120), rng.randint(30, 90))
        return encode(noise(size, rng.getrandbits(32)), image_format)

    def run_client(self, index, seen, failures):
        rng = random.Random(SEED + index)
        # Longer than the ?wait= below, so the server always answers first.
        connection = http.client.HTTPConnection(self.host, self.port, timeout=2 * DEADLINE_SECONDS)
        try:
            for _ in range(self.OPERATIONS_PER_CLIENT):
                name = rng.choice(self.NAMES)
                kind = rng.choice(("upload", "upload", "download", "download", "delete", "resize", "list"))
                if kind == "upload":
                    reply = self.upload(name, self.image_for(name, rng), connection)
                    expected = (201, 409)
                elif kind == "download":
                    reply = self.request("GET", "/" + name, connection=connection)
                    expected = (200, 404)
                    if reply.status == 200:
                        self.assertEqual(len(reply.body), int(reply.headers["Content-Length"]))
                        decode(reply.body)
                elif kind == "delete":
                    reply = self.request("DELETE", "/" + name, connection=connection)
                    expected = (204, 404)
                elif kind == "resize":
                    size = {"width": rng.randint(8, 100), "height": rng.randint(8, 100), "fit": rng.choice(ims.FITS)}
                    headers = {"Content-Type": "application/json"}
                    reply = self.request("PATCH", "/" + name, json.dumps(size), headers, connection)
                    expected = (202, 404)
                    if reply.status == 202:
                        job = self.request("GET", f"{reply.headers['Location']}?wait={DEADLINE_SECONDS}", connection=connection)
                        seen.append(("job", job.status))
                        self.assertEqual(job.status, 200, job.body)
                        self.assertIn(job.json["state"], ("done", "failed", "cancelled"), job.json)
                        if job.json["state"] != "done":
                            self.assertTrue(job.json["error"])
                else:
                    reply = self.request("GET", "/", connection=connection)
                    expected = (200,)
                    self.assertIsInstance(reply.json, list)
                seen.append((kind, reply.status))
                # Which of two statuses depends on what the other clients did to the same five
                # names a moment before; either way a refusal is JSON naming the image.
                self.assertIn(reply.status, expected, (kind, name, reply.body))
                if reply.status >= 400:
                    self.assertError(reply, reply.status, name)
        except BaseException as error:
            failures.append(error)
        finally:
            connection.close()

    def test_concurrent_uploads_downloads_deletes_and_resizes_leave_a_consistent_store(self):
        seen, failures = [], []
        threads = [
            threading.Thread(target=self.run_client, args=(index, seen, failures)) for index in range(self.CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(4 * DEADLINE_SECONDS)
            self.assertFalse(thread.is_alive(), "a client hung")
        if failures:
            raise failures[0]
        self.assertEqual([entry for entry in seen if entry[1] >= 500], [])
        kinds = {kind for kind, status in seen}
        self.assertLessEqual({"upload", "download", "delete", "resize", "job"}, kinds)
        # Invariants once the load is over.
        wait_for(lambda: not self.temp_files())
        listed = self.request("GET", "/").json
        on_disk = sorted(
            name for name in os.listdir(self.storage)
            if not name.startswith(".") and name.lower().endswith(ims.IMAGE_EXTENSIONS)
        )
        self.assertEqual(listed, on_disk)
        for name in listed:
            reply = self.request("GET", "/" + name)
            self.assertEqual(reply.status, 200, name)
            decode(reply.body)


# ====
# SIGKILL and restart
# ====


class TestCrashRecovery(unittest.TestCase):
    """The real process, killed with SIGKILL at seeded random moments and restarted on one folder."""

    def kill_mid_resize(self, query):
        """Start ims.py on slow.png, SIGKILL it while a resize of it runs; return (process, port)."""
        if not os.path.isdir("/proc/self"):
            self.skipTest("telling a server's resize process needs /proc")
        os.makedirs(self.storage)
        with open(os.path.join(self.storage, "slow.png"), "wb") as file:
            file.write(SLOW_SOURCE)
        process, port = start_ims(self, "--storage", self.storage, "--resize-timeout", "20")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        connection.request("PATCH", "/slow.png?" + query)
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 202)
        location = response.getheader("Location")

        def is_running():
            connection.request("GET", location)
            return json.loads(connection.getresponse().read())["state"] == "running"

        wait_for(is_running)
        # Its job runs from before its process is forked: wait for the process itself.
        wait_for(lambda: len(session_processes(process.pid)) > 1)
        process.kill()
        process.wait()
        return process, port

    def test_a_restart_after_kill_9_mid_resize_gets_the_port_at_once(self):
        # The killed server's resize process runs on for a while: it must not keep the port.
        process, port = self.kill_mid_resize(SLOW_FOREVER)
        self.addCleanup(kill_session, process.pid)
        start_ims(self, "--storage", self.storage, "--port", str(port))
        restarted = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(restarted.close)
        restarted.request("GET", "/")
        self.assertEqual(json.loads(restarted.getresponse().read()), ["slow.png"])

    def test_a_render_killed_with_its_server_leaves_no_partial_rendition(self):
        if not os.path.isdir("/proc/self"):
            self.skipTest("telling a server's render process needs /proc")
        os.makedirs(self.storage)
        with open(os.path.join(self.storage, "slow.png"), "wb") as file:
            file.write(SLOW_SOURCE)
        cache = os.path.join(self.storage, ims.STATE_FOLDER, "renditions")

        def cache_files():
            return sorted(name for _, _, files in os.walk(cache) for name in files)

        process, port = start_ims(self, "--storage", self.storage, "--resize-timeout", "20")
        self.addCleanup(kill_session, process.pid)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        connection.request("GET", "/slow.png?" + SLOW_ENOUGH)
        wait_for(lambda: len(session_processes(process.pid)) > 1)
        self.assertTrue(cache_files(), "the render writes into the cache folder")
        process.kill()
        process.wait()
        # The render runs on alone, then finds its server gone and removes what it wrote.
        wait_for(lambda: not session_processes(process.pid))
        self.assertEqual([name for name in cache_files() if not name.startswith(ims.TEMP_PREFIX)], [])
        _, port = start_ims(self, "--storage", self.storage)
        self.assertEqual(cache_files(), [])
        restarted = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(restarted.close)
        restarted.request("GET", "/slow.png?width=300")
        response = restarted.getresponse()
        self.assertEqual((response.status, decode(response.read()).size), (200, (300, 300)))

    def test_a_resize_that_outlives_its_killed_server_leaves_no_file_behind(self):
        process, _ = self.kill_mid_resize(SLOW_ENOUGH)
        wait_for(lambda: not session_processes(process.pid))
        self.assertEqual([name for name in os.listdir(self.storage) if name.startswith(ims.TEMP_PREFIX)], [])
        self.assertEqual(folder_files(self.storage), ["slow.png"])

    ROUNDS = 10
    CLIENTS = 3

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        # About 900 KB that does not compress: an upload of it may still be in its body when killed.
        self.big_png = encode(noise((640, 480), SEED), "PNG")
        self.acknowledged = {}  # name -> the bytes of an upload answered 201
        self.resized = set()  # names a PATCH was sent for: their bytes may have changed
        self.deleted = set()  # names a DELETE was sent for: they may be gone
        self.answered = collections.Counter()  # "upload" (201s) and "resize" answers of this round
        self.lock = threading.Lock()

    def small_image(self, rng, extension):
        image_format = {"png": "PNG", "jpg": "JPEG"}[extension]
        return encode(noise((rng.randint(32, 96), rng.randint(32, 96)), rng.getrandbits(32)), image_format)

    def run_client(self, port, round_index, client_index, rng, stop):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        try:
            for operation in range(1000):
                if stop.is_set():
                    return
                with self.lock:
                    candidates = sorted(set(self.acknowledged) - self.deleted)
                choice = rng.random()
                if choice < 0.5 or not candidates:
                    extension = rng.choice(("png", "jpg"))
                    name = f"r{round_index}-c{client_index}-{operation}.{extension}"
                    data = self.big_png if extension == "png" and rng.random() < 0.3 else self.small_image(rng, extension)
                    if data is self.big_png:
                        name = name.replace(".png", "-big.png")
                    body, content_type = multipart_body(files=[("file", name, data)])
                    connection.request("POST", "/", body, {"Content-Type": content_type})
                    response = connection.getresponse()
                    response.read()
                    if response.status == 201:
                        with self.lock:
                            self.acknowledged[name] = data
                            self.answered["upload"] += 1
                elif choice < 0.8:
                    name = rng.choice(candidates)
                    with self.lock:
                        self.resized.add(name)
                    size = f"width={rng.randint(8, 200)}&height={rng.randint(8, 200)}"
                    connection.request("PATCH", f"/{name}?{size}")
                    connection.getresponse().read()
                    with self.lock:
                        self.answered["resize"] += 1
                else:
                    name = rng.choice(candidates)
                    with self.lock:
                        self.deleted.add(name)
                    connection.request("DELETE", f"/{name}")
                    connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass  # the server was killed under this request
        finally:
            connection.close()

    def check_store(self, port):
        """The invariants a restart must give, whatever moment the previous process died at."""
        # Jobs are durable: the restarted process runs the ones the killed one accepted, each
        # with a temp file of its own while it runs. Its leftovers are judged once they are done.
        queue = os.path.join(self.storage, ims.STATE_FOLDER, "queue")
        wait_for(lambda: not os.path.isdir(queue) or not os.listdir(queue))
        folder = os.listdir(self.storage)
        self.assertEqual([name for name in folder if name.startswith(ims.TEMP_PREFIX)], [])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(connection.close)
        connection.request("GET", "/")
        listed = json.loads(connection.getresponse().read())
        on_disk = sorted(
            name for name in folder if not name.startswith(".") and name.lower().endswith(ims.IMAGE_EXTENSIONS)
        )
        self.assertEqual(listed, on_disk)
        for name in listed:
            connection.request("GET", "/" + name)
            response = connection.getresponse()
            data = response.read()
            self.assertEqual(response.status, 200, name)
            decode(data)
            if name in self.acknowledged and name not in self.resized:
                self.assertEqual(data, self.acknowledged[name], f"{name} changed after it was acknowledged")
        for name in self.acknowledged:
            if name not in self.deleted:
                self.assertIn(name, listed, f"{name} was acknowledged with 201 and is gone")
        connection.close()

    def test_sigkill_at_random_moments_never_loses_acknowledged_uploads_or_leaves_partial_files(self):
        rng = random.Random(SEED)
        for round_index in range(self.ROUNDS):
            process, port = start_ims(self, "--storage", self.storage, "--resize-workers", "2")
            with self.subTest(restart=round_index):
                self.check_store(port)
            stop = threading.Event()
            self.answered.clear()
            clients = [
                threading.Thread(target=self.run_client, args=(port, round_index, index, random.Random(rng.random()), stop))
                for index in range(self.CLIENTS)
            ]
            for client in clients:
                client.start()
            # The fault injection: a SIGKILL in the midst of the load, once this round has had a
            # seeded random number of uploads acknowledged and a resize answered. Counting answers
            # rather than seconds, every round gets that far however loaded the machine is; the
            # other clients' requests are anywhere in flight when it strikes.
            uploads = rng.randint(2, 8)
            wait_for(lambda: self.answered["upload"] >= uploads and self.answered["resize"] >= 1)
            process.kill()
            process.wait()
            stop.set()
            for client in clients:
                client.join(DEADLINE_SECONDS)
                self.assertFalse(client.is_alive(), "a client hung after the kill")
            # Resize processes outlive a killed server until they finish (README: they stop by
            # themselves); one that wrote its temp file after the next start-up's clean-up would
            # leave it until the start after. Restart once they are gone, as a supervisor would.
            wait_for(lambda: not session_processes(process.pid))
        process, port = start_ims(self, "--storage", self.storage, "--resize-workers", "2")
        self.check_store(port)
        self.assertGreater(len(self.acknowledged), self.ROUNDS)
        self.assertTrue(self.resized)


# ====
# Scaling out: several instances on one folder
# ====
# Two or three make_server() servers on one storage folder, in this one process, are separate
# instances (spec: locks are per open file, so they exclude each other inside one process too).
# What one instance accepts, every other must see, answer and, when it stops, carry on.


def job_id_of(location):
    """Return the job id of a Location header (/jobs/<id>)."""
    return location.rpartition("/")[2]


def open_files(pid):
    """Return the paths of the files process `pid` has open (Linux's /proc); [] once it is gone."""
    paths = []
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return paths
    for descriptor in descriptors:
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{descriptor}"))
        except FileNotFoundError:
            pass
    return paths


class SharedFolderTestCase(ResizeTestCase, HTTPTestCase):
    """Instance A (self.server, the default for every helper) and instance B on one folder.

    Both have the class's server_options. Either may be stopped by the test (stop_instance); a
    stopped instance is not stopped again at cleanup.
    """

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        self.prepare_storage()
        self.server = self.start_instance()
        self.host, self.port = self.a = self.server.server_address[:2]
        self.other = self.start_instance()
        self.b = self.other.server_address[:2]

    def start_instance(self, **options):
        """Return another in-process server on the folder, serving; stopped at cleanup unless stopped before.

        Its options are the class's server_options, updated with `options`.
        """
        server = ims.make_server(self.storage, host="127.0.0.1", port=0, quiet=True, **{**self.server_options, **options})
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        server.ims_test_is_running = True
        self.addCleanup(self.stop_instance, server)
        return server

    def stop_instance(self, server):
        """Stop `server` the way an embedding program does (shutdown, server_close): a graceful stop."""
        if server.ims_test_is_running:
            server.ims_test_is_running = False
            server.shutdown()
            server.server_close()

    def on_b(self):
        """Return a new connection to instance B."""
        return self.connect(self.b)

    def job_on(self, address, location):
        """GET the job from the instance at `address` now, without waiting."""
        return self.job(location, self.connect(address))

    def wait_job_on(self, address, location):
        """Return the job's JSON from the instance at `address` once it has ended, waiting with ?wait=."""
        reply = self.request("GET", f"{location}?wait={DEADLINE_SECONDS}", connection=self.connect(address))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertIn(reply.json["state"], ENDED_STATES, reply.json)
        return reply.json

    def listing_on(self, address):
        reply = self.request("GET", "/", connection=self.connect(address))
        self.assertEqual(reply.status, 200, reply.body)
        return reply.json

    def image_size_on(self, address, name):
        """Return the (width, height) of the stored image `name` as the instance at `address` serves it."""
        reply = self.request("GET", f"/{name}", connection=self.connect(address))
        self.assertEqual(reply.status, 200, reply.body)
        return Image.open(io.BytesIO(reply.body)).size

    def wait_for_no_temp_files(self):
        """Wait for the temp file of a cancelled resize to go.

        A DELETE records the image's jobs cancelled at once; the instance running one kills its
        process and removes its temp file a moment later (spec: within about 0.5 s).
        """
        wait_for(lambda: not self.temp_files())

    def wrap_store(self, method, wrapper, *servers):
        """Make the Stores of `servers` call wrapper(original method, *arguments) for `method` until the test ends.

        Tests use it to force a moment that a race or a crash hits only now and then.
        """
        for server in servers:
            patcher = mock.patch.object(server.store, method, functools.partial(wrapper, getattr(server.store, method)))
            patcher.start()
            self.addCleanup(patcher.stop)

    def delete_and_upload_on_b(self, name, data):
        """DELETE `name` on B and upload `data` as `name` on B; return the two statuses."""
        return (self.request("DELETE", f"/{name}", connection=self.on_b()).status,
                self.upload(name, data, self.on_b()).status)


class TestSharedFolder(SharedFolderTestCase):
    def test_an_upload_acknowledged_by_one_instance_is_listed_and_served_by_the_other_at_once(self):
        for index in range(10):
            name, data = f"a{index}.png", encode(noise((40 + index, 30), SEED + index), "PNG")
            writer, reader = (self.a, self.b) if index % 2 == 0 else (self.b, self.a)
            with self.subTest(name=name):
                self.assertEqual(self.upload(name, data, self.connect(writer)).status, 201)
                self.assertIn(name, self.listing_on(reader))
                self.assertEqual(self.request("GET", f"/{name}", connection=self.connect(reader)).body, data)
        self.assertEqual(self.listing_on(self.a), self.listing_on(self.b))

    def test_a_delete_on_one_instance_is_seen_by_the_other_at_once(self):
        for index in range(6):
            name = f"d{index}.png"
            deleter, reader = (self.b, self.a) if index % 2 == 0 else (self.a, self.b)
            with self.subTest(name=name):
                self.assertEqual(self.upload(name, make_image("PNG")).status, 201)
                # The reader has listed and served the name before it goes.
                self.assertIn(name, self.listing_on(reader))
                self.assertEqual(self.request("HEAD", f"/{name}", connection=self.connect(reader)).status, 200)
                self.assertEqual(self.request("DELETE", f"/{name}", connection=self.connect(deleter)).status, 204)
                self.assertNotIn(name, self.listing_on(reader))
                self.assertError(self.request("GET", f"/{name}", connection=self.connect(reader)), 404, name)
                self.assertError(self.request("DELETE", f"/{name}", connection=self.connect(reader)), 404, name)
        self.assertEqual(self.stored_files(), [])

    def test_both_instances_give_one_file_one_etag(self):
        self.store("a.png", make_image("PNG"))
        from_a = self.request("HEAD", "/a.png")
        from_b = self.request("HEAD", "/a.png", connection=self.on_b())
        self.assertEqual(from_a.headers["ETag"], from_b.headers["ETag"])
        self.assertEqual(from_a.headers["Last-Modified"], from_b.headers["Last-Modified"])
        reply = self.request("GET", "/a.png", headers={"If-None-Match": from_a.headers["ETag"]}, connection=self.on_b())
        self.assertEqual(reply.status, 304)

    def test_concurrent_uploads_of_one_name_split_between_instances_give_exactly_one_201(self):
        rounds, uploaders = 5, 6
        for round_index in range(rounds):
            name = f"same{round_index}.png"
            # Big enough (about 120 KB each, not compressible) that the uploads overlap in time.
            bodies = [encode(noise((200, 200), SEED + 100 * round_index + i), "PNG") for i in range(uploaders)]
            connections = [self.connect(self.a if i % 2 == 0 else self.b) for i in range(uploaders)]
            barrier = threading.Barrier(uploaders)
            statuses = [None] * uploaders

            def upload(index):
                barrier.wait(DEADLINE_SECONDS)
                statuses[index] = self.upload(name, bodies[index], connections[index]).status

            threads = [threading.Thread(target=upload, args=(i,)) for i in range(uploaders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(2 * DEADLINE_SECONDS)
            with self.subTest(name=name):
                self.assertEqual(sorted(statuses), [201] + [409] * (uploaders - 1), statuses)
                winner = bodies[statuses.index(201)]
                for address in (self.a, self.b):
                    self.assertEqual(self.request("GET", f"/{name}", connection=self.connect(address)).body, winner)
        self.assertEqual(self.listing_on(self.b), [f"same{i}.png" for i in range(rounds)])
        self.assertNoTempFiles()

    def test_job_records_are_never_listed_or_served(self):
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10")
        job_id = job_id_of(location)
        self.assertEqual(self.wait_job(location)["state"], "done")
        # The record is where the spec keeps it, so the requests below aim at a real file.
        record = os.path.join(self.storage, ".ims", "jobs", f"{job_id}.json")
        self.assertTrue(os.path.isfile(record), os.listdir(self.storage))
        with open(record, "rb") as file:
            record_bytes = file.read()
        for address in (self.a, self.b):
            with self.subTest(instance=address):
                self.assertEqual(self.listing_on(address), ["a.png"])
                paths = ["/.ims", "/.ims/", "/.ims/jobs", f"/.ims/jobs/{job_id}.json", f"/%2Eims%2Fjobs%2F{job_id}.json",
                         "/%2eims", f"/jobs/../.ims/jobs/{job_id}.json", f"/jobs/%2E%2E%2F.ims%2Fjobs%2F{job_id}.json"]
                for path in paths:
                    for method in ("GET", "HEAD", "DELETE", "PATCH"):
                        reply = self.request(method, path + ("?width=5&height=5" if method == "PATCH" else ""),
                                             connection=self.connect(address))
                        self.assertIn(reply.status, (400, 404, 405), f"{method} {path}: {reply.status} {reply.body[:200]!r}")
                        self.assertNotIn(b'"state"', reply.body, f"{method} {path} served a job record")
        with open(record, "rb") as file:
            self.assertEqual(file.read(), record_bytes)
        self.assertEqual(self.job_on(self.b, location)["state"], "done")

    def test_a_start_up_scan_leaves_a_live_upload_of_another_instance_alone(self):
        data = encode(noise((300, 300)), "PNG")
        body, content_type = multipart_body(files=[("file", "live.png", data)])
        sock = socket.create_connection(self.a, timeout=DEADLINE_SECONDS)
        self.addCleanup(sock.close)
        head = ("POST / HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body[:len(body) // 3])
        wait_for(self.temp_files)
        # A third instance starts on the folder while A writes; its start-up scan must not take
        # A's temp file, whose writer lives though it is in this very process.
        third = self.start_instance()
        sock.sendall(body[len(body) // 3:2 * len(body) // 3])
        self.assertTrue(self.temp_files(), "the live upload's temp file was removed")
        sock.sendall(body[2 * len(body) // 3:])
        reply = self.parse_reply(self.read_until_close(sock))
        self.assertEqual(reply.status, 201, reply.body)
        for address in (self.a, self.b, third.server_address[:2]):
            self.assertEqual(self.request("GET", "/live.png", connection=self.connect(address)).body, data)
        self.assertNoTempFiles()

    def test_a_start_up_scan_at_the_moment_an_upload_creates_its_temp_file_leaves_it_alone(self):
        # The moment forced: A has just created the temp file of an upload and has not yet
        # locked it when a new instance's start-up scan looks at the folder.
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("telling which file a descriptor is needs /proc")
        lock_file, scanned = ims.lock_file, []

        def scan_then_lock(descriptor, *arguments, **keywords):
            path = os.readlink(f"/proc/self/fd/{descriptor}")
            if os.path.basename(path).startswith(ims.TEMP_PREFIX) and not scanned:
                scanned.append(path)
                self.start_instance()
            return lock_file(descriptor, *arguments, **keywords)

        data = encode(noise((100, 100)), "PNG")
        with mock.patch.object(ims, "lock_file", scan_then_lock):
            reply = self.upload("new.png", data)
        self.assertEqual(len(scanned), 1, "no temp file was locked")
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.request("GET", "/new.png", connection=self.on_b()).body, data)

    def test_a_start_up_scan_removes_leftover_temp_files_that_nobody_holds(self):
        # Named after processes that are alive (init, this test's parent) and after none: what a
        # writer in another PID namespace or on another host, since gone, would leave. Only the
        # lock tells whether their writers still write.
        leftovers = [f"{ims.TEMP_PREFIX}1-0123456789abcdef.png", f"{ims.TEMP_PREFIX}{os.getppid()}-abc.jpg",
                     f"{ims.TEMP_PREFIX}{os.getpid()}-def.gif", f"{ims.TEMP_PREFIX}elsewhere"]
        for name in leftovers:
            with open(os.path.join(self.storage, name), "wb") as file:
                file.write(b"half an upload")
        self.start_instance()
        self.assertEqual(self.temp_files(), [])
        self.assertEqual(self.listing_on(self.a), [])


class TestSharedFolderJobs(SharedFolderTestCase):
    server_options = {"resize_workers": 1}

    def test_a_job_accepted_by_one_instance_is_answered_by_the_other(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        reply = self.patch("a.png", "width=40&height=30&fit=cover")
        self.assertEqual(reply.status, 202, reply.body)
        location = reply.headers["Location"]
        job = self.job_on(self.b, location)
        self.assertEqual(set(job), JOB_FIELDS)
        expected = {"id": job_id_of(location), "image": "a.png", "width": 40, "height": 30, "fit": "cover"}
        self.assertEqual({key: job[key] for key in expected}, expected)
        self.assertIn(job["state"], ("queued", "running", "done"))
        ended = self.wait_job_on(self.b, location)
        self.assertEqual(ended["state"], "done")
        self.assertEqual(ended, self.job_on(self.a, location))
        self.assertEqual(self.image_size_on(self.b, "a.png"), (40, 30))
        self.assertError(self.request("GET", "/jobs/no-such-job", connection=self.on_b()), 404, "'no-such-job'")

    def test_wait_on_one_instance_answers_when_the_job_ends_on_the_other(self):
        # A runs the job, held stopped until B is waiting for it; then it is let go on and ends
        # in about 1.5 s. B must answer then, with the job done, not when the 60 s of ?wait= are up.
        self.store("slow.png", SLOW_SOURCE)
        children = set(multiprocessing.active_children())
        location = self.submit("slow.png", SLOW_ENOUGH)
        pid = self.hold(location, children)
        self.assertEqual(self.job_on(self.b, location)["state"], "running")
        waiter, answers = self.wait_in_background(location, 60, self.on_b())
        os.kill(pid, signal.SIGCONT)
        waiter.join(DEADLINE_SECONDS)
        self.assertFalse(waiter.is_alive(), "B's answer waited for the whole ?wait=")
        self.assertEqual([(status, job["state"]) for status, job in answers], [(200, "done")], answers)
        self.assertEqual(self.image_size_on(self.b, "slow.png"), (2000, 2000))

    def test_resizes_of_one_image_accepted_by_both_instances_run_one_at_a_time_in_acceptance_order(self):
        self.store("a.jpg", make_image("JPEG", (200, 150)))
        connections = {self.a: self.connect(self.a), self.b: self.connect(self.b)}
        locations = []
        for index in range(10):
            address = self.a if index % 2 == 0 else self.b
            locations.append(self.submit("a.jpg", f"width={100 + index}&height={80 + index}", connections[address]))
        jobs = [self.wait_job_on(self.b if index % 2 == 0 else self.a, location) for index, location in enumerate(locations)]
        self.assertEqual([job["state"] for job in jobs], ["done"] * 10, jobs)
        self.assertEqual([(job["width"], job["height"]) for job in jobs], [(100 + i, 80 + i) for i in range(10)])
        submitted = [epoch_of(job["submitted"]) for job in jobs]
        self.assertEqual(submitted, sorted(submitted))
        finished = [epoch_of(job["finished"]) for job in jobs]
        self.assertEqual(finished, sorted(finished), "the resizes did not end in the order they were accepted")
        for address in (self.a, self.b):
            self.assertEqual(self.image_size_on(address, "a.jpg"), (109, 89))
        self.assertNoTempFiles()

    def test_a_start_up_scan_leaves_the_temp_file_of_a_resize_running_on_another_instance_alone(self):
        self.store("slow.png", SLOW_SOURCE)
        children = set(multiprocessing.active_children())
        location = self.submit("slow.png", SLOW_ENOUGH)
        pid = self.hold(location, children)
        running_temp_files = self.temp_files()
        self.assertTrue(running_temp_files, "the running resize has no temp file")
        self.start_instance()
        self.assertEqual(self.temp_files(), running_temp_files)
        os.kill(pid, signal.SIGCONT)
        job = self.wait_job_on(self.b, location)
        self.assertEqual(job["state"], "done", job)
        self.assertEqual(self.image_size_on(self.b, "slow.png"), (2000, 2000))

    def test_if_match_on_one_instance_sees_the_version_a_resize_on_the_other_made(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        before = self.request("HEAD", "/a.png").headers["ETag"]
        self.assertEqual(self.wait_job(self.submit("a.png", "width=32&height=24"))["state"], "done")
        after = self.request("HEAD", "/a.png").headers["ETag"]
        self.assertNotEqual(before, after)
        self.assertError(self.request("DELETE", "/a.png", headers={"If-Match": before}, connection=self.on_b()), 412, "a.png")
        self.assertError(self.patch("a.png", "width=10&height=10", headers={"If-Match": before}, connection=self.on_b()), 412, "a.png")
        self.assertEqual(self.image_size_on(self.a, "a.png"), (32, 24))
        reply = self.request("DELETE", "/a.png", headers={"If-Match": after}, connection=self.on_b())
        self.assertEqual(reply.status, 204, reply.body)
        self.assertError(self.request("GET", "/a.png"), 404, "a.png")

    def test_if_match_accepted_by_one_instance_applies_only_to_the_version_before_the_others_running_resize(self):
        # A runs a resize of slow.png (held stopped). B accepts a resize of it against its current
        # ETag: B's job must wait for A's, which makes a new version, and then fail on If-Match.
        self.store("slow.png", SLOW_SOURCE)
        etag = self.request("HEAD", "/slow.png").headers["ETag"]
        children = set(multiprocessing.active_children())
        first = self.submit("slow.png", SLOW_ENOUGH)
        pid = self.hold(first, children)
        reply = self.patch("slow.png", "width=10&height=10", headers={"If-Match": etag}, connection=self.on_b())
        self.assertEqual(reply.status, 202, reply.body)
        second = reply.headers["Location"]
        self.assertEqual(self.job_on(self.a, second)["state"], "queued")
        self.assertEqual(self.job_on(self.b, second)["state"], "queued")
        os.kill(pid, signal.SIGCONT)
        self.assertEqual(self.wait_job_on(self.b, first)["state"], "done")
        late = self.wait_job_on(self.a, second)
        self.assertEqual(late["state"], "failed", late)
        self.assertIn("If-Match", late["error"])
        self.assertEqual(self.image_size_on(self.b, "slow.png"), (2000, 2000))

    def test_a_conditional_delete_racing_a_resize_on_the_other_instance_is_all_or_nothing(self):
        # B deletes with the ETag from before a resize that A runs meanwhile. Either the DELETE
        # comes first (204: the resize never ends done and never brings the file back), or the
        # resize does (412: the file is resized). Which, the race decides, round by round.
        rng, connection = random.Random(SEED), self.on_b()
        for index in range(20):
            name = f"race{index}.png"
            self.store(name, encode(noise((300, 300), SEED + index), "PNG"))
            etag = self.request("HEAD", f"/{name}").headers["ETag"]
            location = self.submit(name, "width=32&height=24")
            # The DELETE is sent at a seeded point of the resize: once it runs, after a number of
            # requests to B, each taking about as long as a small part of the resize.
            wait_for(lambda: self.job_on(self.b, location)["state"] != "queued")
            for _ in range(rng.randrange(40)):
                self.request("HEAD", f"/{name}", connection=connection)
            reply = self.request("DELETE", f"/{name}", headers={"If-Match": etag}, connection=self.on_b())
            job = self.wait_job_on(self.b, location)
            with self.subTest(name=name, delete=reply.status, job=job["state"]):
                if reply.status == 204:
                    self.assertIn(job["state"], ("cancelled", "failed"))
                    for address in (self.a, self.b):
                        self.assertEqual(self.request("HEAD", f"/{name}", connection=self.connect(address)).status, 404)
                else:
                    self.assertError(reply, 412, name)
                    self.assertEqual(job["state"], "done")
                    self.assertEqual(self.image_size_on(self.b, name), (32, 24))
        self.wait_for_no_temp_files()

    def test_delete_on_one_instance_cancels_the_image_s_queued_and_running_resizes_on_the_other(self):
        running = self.start_slow_resize()
        queued = [self.submit("slow.png", "width=10&height=10"), self.submit("slow.png", "width=20&height=20"),
                  self.submit("slow.png", "width=30&height=30", connection=self.on_b())]
        for location in queued:
            self.assertEqual(self.job(location)["state"], "queued")
        self.assertEqual(self.request("DELETE", "/slow.png", connection=self.on_b()).status, 204)
        for location in queued + [running]:
            for address in (self.b, self.a):
                job = self.wait_job_on(address, location)
                self.assertEqual(job["state"], "cancelled", job)
                self.assertIn("deleted", job["error"])
                self.assertIsNotNone(job["finished"])
        # A kills its stopped resize process (only a kill ends it), which never writes its result.
        wait_for(lambda: not multiprocessing.active_children())
        for address in (self.a, self.b):
            self.assertError(self.request("GET", "/slow.png", connection=self.connect(address)), 404, "slow.png")
            self.assertEqual(self.listing_on(address), [])
        self.wait_for_no_temp_files()
        self.assertEqual(self.stored_files(), [])

    def test_a_delete_and_upload_on_b_just_as_a_starts_the_job_cancel_it_and_keep_the_upload(self):
        # The moment forced: A has claimed the job and is about to record it running when B
        # deletes the image and a new one is uploaded under its name. The job must end cancelled
        # and the new upload stay as it was: a resize never overwrites a new upload.
        self.store("a.png", make_image("PNG", (64, 48)))
        replacement = make_image("PNG", (30, 20), color=GREEN)
        injected = []

        def claim_then_delete_and_upload_on_b(claim, *arguments, **keywords):
            claimed = claim(*arguments, **keywords)
            if claimed is not None and not injected:
                injected.append(self.delete_and_upload_on_b("a.png", replacement))
            return claimed

        # Either instance may be the one that runs the job: both get the hook.
        self.wrap_store("claim", claim_then_delete_and_upload_on_b, self.server, self.other)
        location = self.submit("a.png", "width=32&height=24")
        job = self.wait_job_on(self.b, location)
        self.assertEqual(injected, [(204, 201)])
        for address in (self.a, self.b):
            self.assertEqual(self.request("GET", "/a.png", connection=self.connect(address)).body, replacement,
                             "the resize overwrote the new upload")
        self.assertEqual(job["state"], "cancelled", job)
        self.assertIn("deleted", job["error"])

    def test_an_upload_after_a_delete_on_the_other_instance_survives_the_cancelled_resize(self):
        running = self.start_slow_resize(query=SLOW_ENOUGH)
        self.assertEqual(self.request("DELETE", "/slow.png", connection=self.on_b()).status, 204)
        replacement = make_image("PNG", (30, 20))
        self.assertEqual(self.upload("slow.png", replacement, self.on_b()).status, 201)
        self.assertEqual(self.wait_job_on(self.b, running)["state"], "cancelled")
        wait_for(lambda: not multiprocessing.active_children())
        for address in (self.a, self.b):
            self.assertEqual(self.request("GET", "/slow.png", connection=self.connect(address)).body, replacement)
        self.wait_for_no_temp_files()


class TestSharedFolderQueue(SharedFolderTestCase):
    # One resize slot on this host, whichever instance holds it; two waiting jobs in the folder.
    server_options = {"resize_workers": 1, "max_queue": 2}

    def test_max_queue_counts_the_jobs_waiting_in_the_folder_not_in_one_instance(self):
        running = self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        queued = [self.submit("a.png", "width=10&height=10"), self.submit("a.png", "width=20&height=20")]
        for connection in (self.on_b(), self.connect()):
            reply = self.patch("a.png", "width=30&height=30", connection=connection)
            self.assertError(reply, 503, "try again later")
            self.assertRegex(reply.headers.get("Retry-After", ""), r"^\d+$")
            reply = self.patch("slow.png", "width=30&height=30", connection=connection)
            self.assertError(reply, 503, "try again later")
        for location in queued:
            self.assertEqual(self.job_on(self.b, location)["state"], "queued")
        # Freeing the slot lets the folder's queue run, and then B has room again.
        self.assertEqual(self.request("DELETE", "/slow.png", connection=self.on_b()).status, 204)
        self.assertEqual(self.wait_job_on(self.b, running)["state"], "cancelled")
        self.assertEqual([self.wait_job_on(self.b, location)["state"] for location in queued], ["done", "done"])
        location = self.submit("a.png", "width=30&height=30", connection=self.on_b())
        self.assertEqual(self.wait_job_on(self.a, location)["state"], "done")
        self.assertEqual(self.image_size_on(self.a, "a.png"), (30, 30))

    def test_at_most_resize_workers_resizes_run_at_once_on_one_host(self):
        # Each instance has one slot of its own in memory, but the host has one: with A's resize
        # held, B's resize of another image waits.
        self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10", connection=self.on_b())
        reply = self.request("GET", f"{location}?wait=1", connection=self.on_b())
        self.assertEqual(reply.json["state"], "queued")
        self.assertEqual(len(multiprocessing.active_children()), 1)
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertEqual(self.wait_job_on(self.b, location)["state"], "done")


class TestDurableJobs(SharedFolderTestCase):
    server_options = {"resize_workers": 1}

    def test_ended_jobs_are_answered_the_same_after_every_instance_restarts(self):
        self.store("a.png", make_image("PNG", (64, 48)))
        self.put_file("broken.png", make_image("PNG", (64, 48))[:60])
        done = self.submit("a.png", "width=20&height=10")
        failed = self.submit("broken.png", "width=5&height=5", connection=self.on_b())
        ended = {location: self.wait_job(location) for location in (done, failed)}
        self.assertEqual([job["state"] for job in ended.values()], ["done", "failed"])
        self.stop_instance(self.server)
        self.stop_instance(self.other)
        restarted = self.start_instance()
        address = restarted.server_address[:2]
        for location, job in ended.items():
            with self.subTest(state=job["state"]):
                self.assertEqual(self.job_on(address, location), job)
                reply = self.request("GET", f"{location}?wait=5", connection=self.connect(address))
                self.assertEqual((reply.status, reply.json), (200, job))
        self.assertEqual(self.image_size_on(address, "a.png"), (20, 10))

    def store_slow_and_small(self, connection=None):
        for name, data in (("slow.png", SLOW_SOURCE), ("a.png", make_image("PNG", (64, 48)))):
            self.assertEqual(self.upload(name, data, connection).status, 201)

    def hold_one_on_a_and_queue_one(self, queue_connection=None):
        """A runs a resize of slow.png, held stopped, in the host's one slot; a.png's waits (via `queue_connection`).

        Return the locations of the running job and of the queued one.
        """
        self.store_slow_and_small()
        children = set(multiprocessing.active_children())
        running = self.submit("slow.png", SLOW_ENOUGH)
        self.hold(running, children)
        queued = self.submit("a.png", "width=32&height=24", queue_connection)
        self.assertEqual(self.job_on(self.b, queued)["state"], "queued")
        return running, queued

    def assertBothDone(self, address, running, queued):
        """The held job and the queued one (see hold_one_on_a_and_queue_one) end done, as the instance at `address` says."""
        for location, size, name in ((running, (2000, 2000), "slow.png"), (queued, (32, 24), "a.png")):
            job = self.wait_job_on(address, location)
            self.assertEqual(job["state"], "done", job)
            self.assertEqual(self.image_size_on(address, name), size)

    def test_queued_and_running_jobs_of_a_stopped_instance_are_run_by_the_other(self):
        # A graceful stop of A leaves both of its jobs in the folder (spec: a graceful stop no
        # longer cancels queued jobs, and a running one is run again), and B runs both.
        running, queued = self.hold_one_on_a_and_queue_one()
        self.stop_instance(self.server)
        self.assertBothDone(self.b, running, queued)
        self.assertNoTempFiles()

    def test_a_delete_and_upload_on_b_while_a_stops_mid_resize_cancel_the_job_and_keep_the_upload(self):
        # The moment forced: A, stopping, has killed its resize and is about to put the job back
        # in the queue when B deletes the image and a new one is uploaded under its name. The job
        # must end cancelled, not be run again by B on the new upload.
        running, queued = self.hold_one_on_a_and_queue_one()
        replacement = make_image("PNG", (30, 20), color=GREEN)
        injected = []

        def delete_and_upload_on_b_then_requeue(update_record, record, *arguments, **keywords):
            if record.get("state") == "queued" and not injected:
                injected.append(self.delete_and_upload_on_b("slow.png", replacement))
            return update_record(record, *arguments, **keywords)

        self.wrap_store("update_record", delete_and_upload_on_b_then_requeue, self.server)
        self.stop_instance(self.server)
        self.assertEqual(injected, [(204, 201)])
        job = self.wait_job_on(self.b, running)
        self.assertEqual(self.request("GET", "/slow.png", connection=self.on_b()).body, replacement,
                         "the job was run again on the new upload")
        self.assertEqual(job["state"], "cancelled", job)
        self.assertEqual(self.wait_job_on(self.b, queued)["state"], "done")

    def test_a_job_whose_instance_died_after_putting_the_result_in_place_ends_done_without_running_again(self):
        # The moment forced: A has replaced the image with the result and dies before it records
        # the end; only its lock on the job goes, as the kernel lets go of a dead process's locks.
        # Whoever runs the job next must see that it is done, not resize the result once more.
        self.store("a.jpg", make_image("JPEG", (64, 48)))
        died = []

        def die_once(end, claim, record, *arguments, **keywords):
            if died:
                return end(claim, record, *arguments, **keywords)
            died.append(self.request("HEAD", "/a.jpg", connection=self.on_b()).headers["ETag"])
            self.server.store.release(claim)

        self.wrap_store("end", die_once, self.server)
        location = self.submit("a.jpg", "width=40&height=30")
        job = self.wait_job_on(self.b, location)
        self.assertEqual(job["state"], "done", job)
        self.assertEqual(len(died), 1, "the job did not run on A")
        reply = self.request("HEAD", "/a.jpg", connection=self.on_b())
        self.assertEqual(reply.headers["ETag"], died[0], "the result was resized again")
        self.assertEqual(self.image_size_on(self.b, "a.jpg"), (40, 30))

    def test_a_job_put_back_by_a_stopping_instance_still_runs_before_the_later_ones_of_its_image(self):
        self.store("slow.png", SLOW_SOURCE)
        children = set(multiprocessing.active_children())
        first = self.submit("slow.png", SLOW_ENOUGH)
        self.hold(first, children)
        later = [self.submit("slow.png", "width=10&height=10", self.on_b()), self.submit("slow.png", "width=20&height=20")]
        self.stop_instance(self.server)
        jobs = [self.wait_job_on(self.b, location) for location in [first] + later]
        self.assertEqual([job["state"] for job in jobs], ["done"] * 3, jobs)
        finished = [epoch_of(job["finished"]) for job in jobs]
        self.assertEqual(finished, sorted(finished), "the jobs of slow.png did not end in the order they were accepted")
        self.assertEqual(self.image_size_on(self.b, "slow.png"), (20, 20))

    def test_jobs_left_when_every_instance_stopped_run_when_one_starts_again(self):
        running, queued = self.hold_one_on_a_and_queue_one(self.on_b())
        self.stop_instance(self.other)
        self.stop_instance(self.server)
        self.assertEqual(multiprocessing.active_children(), [])
        self.assertBothDone(self.start_instance().server_address[:2], running, queued)

    def kill_a_mid_resize(self, kill):
        """Run A as the real process, one job of it running (its process stopped) and one queued; kill(A).

        Start B in this process once A's jobs are running and queued, so that A alone can have
        taken them; return B's address and the two jobs' locations.
        """
        if not os.path.isdir("/proc/self"):
            self.skipTest("telling a server's resize process needs /proc")
        self.stop_instance(self.server)
        self.stop_instance(self.other)
        process, port = start_ims(self, "--storage", self.storage, "--resize-workers", "1")
        self.addCleanup(kill_session, process.pid)
        a = self.connect(("127.0.0.1", port))
        self.store_slow_and_small(a)
        running = self.submit("slow.png", SLOW_ENOUGH, a)
        wait_for(lambda: len(session_processes(process.pid)) > 1 or self.job(running, a)["state"] in ENDED_STATES)
        resize_pids = set(session_processes(process.pid)) - {process.pid}
        self.assertEqual(len(resize_pids), 1, "not one resize process")
        resize_pid = resize_pids.pop()
        # A resize process lets go of its server's descriptors as it starts: stopped before
        # that, it would hold the server's locks as long as it lives.
        state_folder = os.path.join(os.path.realpath(self.storage), ims.STATE_FOLDER)
        wait_for(lambda: not any(path.startswith(state_folder) for path in open_files(resize_pid)))
        os.kill(resize_pid, signal.SIGSTOP)
        queued = self.submit("a.png", "width=32&height=24", a)
        b = self.start_instance().server_address[:2]
        self.assertEqual(self.job_on(b, running)["state"], "running")
        self.assertEqual(self.job_on(b, queued)["state"], "queued")
        kill(process)
        return b, running, queued

    def test_jobs_of_an_instance_killed_with_sigkill_are_run_by_the_other(self):
        # A dies the way a crashed host does: SIGKILL to it and to its resize process at once,
        # no clean-up of any kind.
        def kill_all(process):
            kill_session(process.pid)
            process.wait()
            wait_for(lambda: not session_processes(process.pid))

        self.assertBothDone(*self.kill_a_mid_resize(kill_all))

    def test_jobs_of_a_server_killed_with_sigkill_are_run_by_the_other_while_its_resize_process_lives_on(self):
        # Only the server dies; its resize process, stopped, outlives it and must hold nothing
        # that keeps the job from B.
        def kill_server(process):
            process.kill()
            process.wait()

        self.assertBothDone(*self.kill_a_mid_resize(kill_server))

    def check_retention(self, ages, kept):
        """Make ended jobs' records by hand from a real one, ended `ages` seconds ago; start an instance.

        It must keep the records of the first `kept` ages (the newest) and remove the others.
        """
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10")
        self.assertEqual(self.wait_job(location)["state"], "done")
        jobs = os.path.join(self.storage, ims.STATE_FOLDER, "jobs")
        with open(os.path.join(jobs, f"{job_id_of(location)}.json")) as file:
            record = json.load(file)
        now = time.time()
        ids = [f"{index:016x}" for index in range(len(ages))]
        for job_id, age in zip(ids, ages):
            path = os.path.join(jobs, f"{job_id}.json")
            with open(path, "w") as file:
                json.dump(dict(record, id=job_id, submitted=now - age - 1, finished=now - age), file)
            os.utime(path, (now - age, now - age))
        address = self.start_instance().server_address[:2]
        wait_for(lambda: self.request("GET", f"/jobs/{ids[-1]}", connection=self.connect(address)).status == 404)
        self.assertEqual([os.path.exists(os.path.join(jobs, f"{job_id}.json")) for job_id in ids],
                         [True] * kept + [False] * (len(ids) - kept))
        for job_id in (ids[0], ids[kept - 1], job_id_of(location)):
            self.assertEqual(self.job_on(self.b, f"/jobs/{job_id}")["state"], "done")
        self.assertError(self.request("GET", f"/jobs/{ids[kept]}", connection=self.on_b()), 404, ids[kept])

    def test_jobs_ended_within_the_hour_are_kept_past_1000_and_older_ones_are_cleaned_by_any_instance(self):
        # With the real job's record, 1,004 ended within the hour: all kept; the 5 older go.
        self.check_retention([60 + index for index in range(1003)] + [7200 + index for index in range(5)], kept=1003)

    def test_the_last_1000_ended_jobs_are_kept_past_the_hour_and_older_ones_are_cleaned_by_any_instance(self):
        # With the real job's record, the newest 1,000 are it, 990 recent ones and 9 of the old.
        self.check_retention([60 + index for index in range(990)] + [7200 + index for index in range(15)], kept=999)

    def test_a_job_is_on_disk_before_its_202(self):
        # Nothing but the folder is left when an instance dies right after its answer.
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10")
        self.assertTrue(os.path.isfile(os.path.join(self.storage, ".ims", "jobs", f"{job_id_of(location)}.json")))
        self.assertEqual(self.wait_job_on(self.b, location)["state"], "done")



# ====
# Renditions
# ====


class RenditionTestCase(ResizeTestCase):
    """ResizeTestCase plus renditions: GET /<name>?<query>, and the render processes behind them."""

    def rendition(self, name, query, headers=None, connection=None, method="GET"):
        """Return the Reply of GET (or `method`) /<name>?<query>."""
        return self.request(method, f"/{name}?{query}", headers=headers, connection=connection)

    def rendered(self, name, query, content_type=None):
        """GET a rendition, expect 200 (and `content_type`), return it decoded."""
        reply = self.rendition(name, query)
        self.assertEqual(reply.status, 200, reply.body)
        if content_type is not None:
            self.assertEqual(reply.headers["Content-Type"], content_type)
        return decode(reply.body)

    def cache_entries(self, server=None):
        """Return the cached renditions in the folder, as {path relative to the cache: size}."""
        folder = os.path.join(self.storage, ims.STATE_FOLDER, "renditions")
        entries = {}
        for root, _, files in os.walk(folder):
            for file_name in files:
                if not file_name.startswith("."):
                    path = os.path.join(root, file_name)
                    entries[os.path.relpath(path, folder)] = os.path.getsize(path)
        return entries

    def cache_temp_files(self):
        folder = os.path.join(self.storage, ims.STATE_FOLDER, "renditions")
        return [name for _, _, files in os.walk(folder) for name in files if name.startswith(ims.TEMP_PREFIX)]

    def in_background(self, function, *arguments):
        """Run function(*arguments) in a thread; return (thread, results) where results gets its return value."""
        results = []
        thread = threading.Thread(target=lambda: results.append(function(*arguments)), daemon=True)
        thread.start()
        self.addCleanup(thread.join, DEADLINE_SECONDS)
        return thread, results

    def hold_new_process(self, children_before):
        """SIGSTOP the one resize or render process started since `children_before`; return its pid."""
        def new_children():
            return set(multiprocessing.active_children()) - children_before

        wait_for(new_children)
        children = new_children()
        self.assertEqual(len(children), 1, f"not one new process: {children}")
        pid = children.pop().pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.resume, pid)
        wait_for(lambda: is_stopped(pid))
        return pid

    def hold_renders(self, server):
        """Make `server`'s renders wait until the returned Event is set (at cleanup at the latest)."""
        release = threading.Event()
        render = server.resizer.render

        def held_render(*arguments):
            release.wait(DEADLINE_SECONDS)
            return render(*arguments)

        patcher = mock.patch.object(server.resizer, "render", held_render)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(release.set)
        return release

    @staticmethod
    def resume(pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class TestRenderFile(ColourAssertions, unittest.TestCase):
    """render_file() on every kind of source and every output format, no server."""

    def sources(self):
        picture = Image.open(io.BytesIO(make_image("PNG", (64, 48))))
        turned = picture.rotate(180)
        animated = {"save_all": True, "append_images": [turned], "duration": [100, 200], "loop": 0}
        return {
            "rgb.jpg": encode(picture, "JPEG"),
            "cmyk.jpg": encode(picture.convert("CMYK"), "JPEG"),
            "grey.jpg": encode(picture.convert("L"), "JPEG"),
            "rgba.png": encode(picture.convert("RGBA"), "PNG"),
            "la.png": encode(picture.convert("LA"), "PNG"),
            "palette.png": encode(picture.convert("P"), "PNG"),
            "sixteen.png": encode(picture.convert("L").convert("I;16"), "PNG"),
            "bilevel.png": encode(picture.convert("1"), "PNG"),
            "animated.gif": encode(picture, "GIF", **animated),
            "transparent.gif": encode(picture.convert("P"), "GIF", transparency=0),
            "animated.webp": encode(picture, "WEBP", **animated),
            "lossless.webp": encode(picture.convert("RGBA"), "WEBP", lossless=True),
            "rgb.bmp": encode(picture, "BMP"),
            "rgb.tif": encode(picture, "TIFF"),
            "cmyk.tif": encode(picture.convert("CMYK"), "TIFF"),
            "sixteen.tif": encode(picture.convert("L").convert("I;16"), "TIFF"),
        }

    def test_every_source_renders_in_every_format_and_quality(self):
        tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(tempdir.cleanup)
        formats = [None, "JPEG", "PNG", "WEBP", "GIF"] + (["AVIF"] if ims.AVIF_IS_WRITABLE else [])
        target = os.path.join(tempdir.name, "rendition")
        for name, data in self.sources().items():
            source = os.path.join(tempdir.name, name)
            with open(source, "wb") as file:
                file.write(data)
            version = ims.Version.of(os.stat(source))
            source_format = ims.FORMAT_BY_EXTENSION[ims.extension_of(name)]
            for image_format, quality in itertools.product(formats, (None, 50)):
                with self.subTest(source=name, format=image_format, quality=quality):
                    ims.render_file(source, target, ims.Rendition(32, None, "fill", image_format, quality), version)
                    with open(target, "rb") as file:
                        image = decode(file.read())
                    self.assertEqual((image.format, image.size), (image_format or source_format, (32, 24)))
                    if name.startswith(("rgb", "cmyk", "animated", "lossless", "palette", "rgba")):
                        self.assertLeftRedRightBlue(image)
                    is_animation = name.startswith("animated") and (image_format or source_format) in ims.MULTI_FRAME_FORMATS
                    self.assertEqual(getattr(image, "n_frames", 1), 2 if is_animation else 1)

    def test_a_source_that_is_another_version_or_gone_is_not_rendered(self):
        tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(tempdir.cleanup)
        source, target = os.path.join(tempdir.name, "a.png"), os.path.join(tempdir.name, "rendition")
        with open(source, "wb") as file:
            file.write(make_image("PNG"))
        version = ims.Version.of(os.stat(source))
        with open(source, "ab") as file:
            file.write(b"\0")
        with self.assertRaises(ims.SourceChanged):
            ims.render_file(source, target, ims.Rendition(10), version)
        os.unlink(source)
        with self.assertRaises(ims.SourceChanged):
            ims.render_file(source, target, ims.Rendition(10), version)
        self.assertFalse(os.path.exists(target))


class TestRenditions(RenditionTestCase):
    def test_width_alone_keeps_the_aspect_ratio_and_the_original_is_untouched(self):
        original = make_image("PNG", (400, 300))
        self.store("a.png", original)
        image = self.rendered("a.png", "width=200", "image/png")
        self.assertEqual((image.format, image.size), ("PNG", (200, 150)))
        self.assertLeftRedRightBlue(image)
        self.assertEqual(self.request("GET", "/a.png").body, original)
        self.assertEqual(self.request("GET", "/").json, ["a.png"])
        self.assertEqual(self.stored_files(), ["a.png"])

    def test_height_alone_keeps_the_aspect_ratio(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        self.assertEqual(self.rendered("a.png", "height=60").size, (80, 60))

    def test_width_and_height_follow_fit(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        self.assertEqual(self.rendered("a.png", "width=100&height=100").size, (100, 100))
        self.assertEqual(self.rendered("a.png", "width=100&height=100&fit=fill").size, (100, 100))
        self.assertEqual(self.rendered("a.png", "width=100&height=100&fit=contain").size, (100, 75))
        cover = self.rendered("a.png", "width=100&height=100&fit=cover")
        self.assertEqual(cover.size, (100, 100))
        self.assertLeftRedRightBlue(cover)

    def test_format_alone_converts_at_the_original_size(self):
        self.store("a.jpg", make_image("JPEG", (64, 48)))
        expected = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"), "gif": ("GIF", "image/gif"), "jpeg": ("JPEG", "image/jpeg")}
        if ims.AVIF_IS_WRITABLE:
            expected["avif"] = ("AVIF", "image/avif")
        for asked, (image_format, content_type) in expected.items():
            with self.subTest(format=asked):
                image = self.rendered("a.jpg", f"format={asked}", content_type)
                self.assertEqual((image.format, image.size), (image_format, (64, 48)))
                self.assertLeftRedRightBlue(image)

    def test_a_converted_rendition_is_named_with_its_own_extension(self):
        self.store("photo.jpg", make_image("JPEG"))
        reply = self.rendition("photo.jpg", "width=32&format=webp")
        self.assertEqual(reply.headers["Content-Disposition"], "inline; filename=photo.webp")
        reply = self.rendition("photo.jpg", "width=32")
        self.assertEqual(reply.headers["Content-Disposition"], "inline; filename=photo.jpg")

    def test_quality_changes_lossy_output_and_the_original_quantisation_is_kept_without_it(self):
        photo = encode(noise((300, 200)), "JPEG", quality=95)
        self.store("a.jpg", photo)
        low = self.rendition("a.jpg", "width=150&quality=10")
        high = self.rendition("a.jpg", "width=150&quality=90")
        self.assertLess(len(low.body), len(high.body) * 0.6)
        kept = decode(self.rendition("a.jpg", "width=150").body)
        self.assertEqual(kept.quantization, Image.open(io.BytesIO(photo)).quantization)
        webp_low = self.rendition("a.jpg", "format=webp&quality=5")
        webp_high = self.rendition("a.jpg", "format=webp&quality=95")
        self.assertLess(len(webp_low.body), len(webp_high.body))

    def test_a_photo_with_orientation_6_is_rendered_upright_without_exif(self):
        self.store("a.jpg", make_image("JPEG", (400, 300), orientation=6))
        for query in ("width=150", "width=150&format=webp", "width=150&format=png"):
            with self.subTest(query=query):
                image = self.rendered("a.jpg", query)
                self.assertEqual(image.size, (150, 200))
                self.assertEqual(image.getexif().get(EXIF_ORIENTATION, 1), 1)
                rgb = image.convert("RGB")
                self.assertColour(rgb.getpixel((75, 50)), RED)
                self.assertColour(rgb.getpixel((75, 150)), BLUE)
                self.assertColour(rgb.getpixel((rgb.width - 4, 4)), GREEN)

    def test_img_x_is_rendered_upright_with_its_colour_profile(self):
        with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as file:
            photo = file.read()
        self.store("IMG_X.jpeg", photo)
        with Image.open(io.BytesIO(photo)) as original:
            upright = ImageOps.exif_transpose(original).size
            profile = original.info["icc_profile"]
        for query in ("width=300", "width=300&format=webp"):
            with self.subTest(query=query):
                image = self.rendered("IMG_X.jpeg", query)
                self.assertEqual(image.size, (300, round(upright[1] * 300 / upright[0])))
                self.assertEqual(image.info.get("icc_profile"), profile)
                self.assertEqual(len(image.getexif()), 0)

    def test_the_colour_profile_is_kept_in_every_format_that_has_one(self):
        self.store("a.png", make_image("PNG", (64, 48), icc=ICC_PROFILE))
        for asked in ("png", "jpeg", "webp"):
            with self.subTest(format=asked):
                self.assertEqual(self.rendered("a.png", f"width=32&format={asked}").info.get("icc_profile"), ICC_PROFILE)

    def test_alpha_is_kept_where_the_format_has_it_and_flattened_on_white_for_jpeg(self):
        picture = Image.new("RGBA", (64, 48), (200, 30, 30, 255))
        picture.paste((0, 0, 0, 0), (32, 0, 64, 48))
        self.store("a.png", encode(picture, "PNG"))
        for asked in ("png", "webp"):
            with self.subTest(format=asked):
                image = self.rendered("a.png", f"width=32&format={asked}").convert("RGBA")
                self.assertEqual(image.getpixel((28, 12))[3], 0)
                self.assertEqual(image.getpixel((4, 12))[3], 255)
        jpeg = self.rendered("a.png", "width=32&format=jpeg", "image/jpeg").convert("RGB")
        self.assertColour(jpeg.getpixel((28, 12)), (255, 255, 255), tolerance=10)
        self.assertColour(jpeg.getpixel((4, 12)), RED)

    def test_every_frame_is_kept_for_gif_and_webp_and_jpeg_takes_the_first(self):
        self.store("a.gif", animation("GIF", size=(64, 48)))
        for asked, image_format in (("gif", "GIF"), ("webp", "WEBP")):
            with self.subTest(format=asked):
                image = self.rendered("a.gif", f"width=32&format={asked}")
                self.assertEqual(image.format, image_format)
                frames = frames_of(image)
                self.assertEqual([duration for duration, _ in frames], [100, 200, 300])
                for (_, colour), expected in zip(frames, (RED, GREEN, BLUE)):
                    self.assertColour(colour, expected)
        first = self.rendered("a.gif", "width=32&format=jpeg")
        self.assertEqual(getattr(first, "n_frames", 1), 1)
        self.assertColour(first.convert("RGB").getpixel((16, 12)), RED)

    def test_a_repeated_request_is_served_from_the_cache_by_the_same_bytes(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        first = self.rendition("a.png", "width=100")
        second = self.rendition("a.png", "width=100")
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(first.body, second.body)
        self.assertEqual(first.headers["ETag"], second.headers["ETag"])
        self.assertEqual(self.server.renditions.renders, 1)
        self.assertEqual(len(self.cache_entries()), 1)
        # Equivalent parameters are one rendition: fit does not matter with one side.
        self.assertEqual(self.rendition("a.png", "width=100&fit=cover&v=2").body, first.body)
        self.assertEqual(self.server.renditions.renders, 1)

    def test_renditions_have_validators_of_their_own(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        original = self.request("GET", "/a.png")
        small = self.rendition("a.png", "width=100")
        other = self.rendition("a.png", "width=101")
        etags = {original.headers["ETag"], small.headers["ETag"], other.headers["ETag"]}
        self.assertEqual(len(etags), 3)
        self.assertRegex(small.headers["ETag"], r'^"[!#-~]+"$')
        self.assertEqual(small.headers["Last-Modified"], original.headers["Last-Modified"])
        self.assertEqual(small.headers["Cache-Control"], "no-cache")
        self.assertEqual(small.headers["Accept-Ranges"], "bytes")
        self.assertEqual(small.headers["Content-Length"], str(len(small.body)))

    def test_if_none_match_answers_304_without_rendering(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        etag = self.rendition("a.png", "width=100").headers["ETag"]
        shutil.rmtree(os.path.join(self.storage, ims.STATE_FOLDER, "renditions", "a.png"))
        reply = self.rendition("a.png", "width=100", {"If-None-Match": etag})
        self.assertEqual((reply.status, reply.body), (304, b""))
        self.assertEqual(reply.headers["ETag"], etag)
        self.assertEqual(self.server.renditions.renders, 1)
        self.assertEqual(self.cache_entries(), {})
        # The original's ETag is not the rendition's.
        original_etag = self.request("GET", "/a.png").headers["ETag"]
        self.assertEqual(self.rendition("a.png", "width=100", {"If-None-Match": original_etag}).status, 200)

    def test_range_and_head(self):
        self.store("a.png", encode(noise((200, 150)), "PNG"))
        whole = self.rendition("a.png", "width=100")
        part = self.rendition("a.png", "width=100", {"Range": "bytes=10-49"})
        self.assertEqual(part.status, 206)
        self.assertEqual(part.body, whole.body[10:50])
        self.assertEqual(part.headers["Content-Range"], f"bytes 10-49/{len(whole.body)}")
        self.assertEqual(self.rendition("a.png", "width=100", {"Range": f"bytes={len(whole.body)}-"}).status, 416)
        stale = self.rendition("a.png", "width=100", {"Range": "bytes=0-9", "If-Range": '"other"'})
        self.assertEqual((stale.status, stale.body), (200, whole.body))
        head = self.rendition("a.png", "width=100", method="HEAD")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.headers["Content-Length"], str(len(whole.body)))
        self.assertEqual(head.headers["ETag"], whole.headers["ETag"])
        # HEAD of one not rendered yet renders it, to know its length.
        head = self.rendition("a.png", "width=50", method="HEAD")
        self.assertEqual(int(head.headers["Content-Length"]), len(self.rendition("a.png", "width=50").body))

    def test_a_resize_replace_or_delete_of_the_original_retires_its_renditions(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        before = self.rendition("a.png", "format=png")
        self.assertEqual(decode(before.body).size, (400, 300))
        self.wait_job(self.submit("a.png", "width=200&height=100"))
        after = self.rendition("a.png", "format=png")
        self.assertNotEqual(after.headers["ETag"], before.headers["ETag"])
        self.assertEqual(decode(after.body).size, (200, 100))
        self.assertEqual(len(self.cache_entries()), 1)
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        self.assertError(self.rendition("a.png", "format=png"), 404, "a.png")
        self.assertEqual(self.cache_entries(), {})
        self.assertFalse(os.path.exists(os.path.join(self.storage, ims.STATE_FOLDER, "renditions", "a.png")))
        self.store("a.png", make_image("PNG", (60, 40)))
        again = self.rendition("a.png", "format=png")
        self.assertEqual(decode(again.body).size, (60, 40))
        self.assertNotIn(again.headers["ETag"], (before.headers["ETag"], after.headers["ETag"]))

    def test_a_rendition_finished_after_its_original_went_is_not_kept(self):
        for change in ("delete", "replace"):
            with self.subTest(change=change):
                self.store("a.png", make_image("PNG", (400, 300)))
                keep = self.server.store.keep_rendition

                def keep_after_change(*arguments):
                    if change == "delete":
                        self.server.store.remove("a.png")
                    else:
                        replacement = os.path.join(self.storage, "replacement.tmp")
                        with open(replacement, "wb") as file:
                            file.write(make_image("PNG", (40, 30)))
                        os.replace(replacement, os.path.join(self.storage, "a.png"))
                    return keep(*arguments)

                with mock.patch.object(self.server.store, "keep_rendition", keep_after_change):
                    # Asked before the change: answered with the picture it asked for.
                    reply = self.rendition("a.png", "width=100")
                self.assertEqual((reply.status, decode(reply.body).size), (200, (100, 75)))
                self.assertEqual(self.cache_entries(), {})
                self.assertEqual(self.cache_temp_files(), [])
                if change == "delete":
                    self.assertFalse(os.path.exists(os.path.join(self.storage, ims.STATE_FOLDER, "renditions", "a.png")))
                else:
                    self.assertEqual(decode(self.rendition("a.png", "width=100").body).size, (100, 75))
                    self.assertEqual(self.request("DELETE", "/a.png").status, 204)

    def test_a_size_past_what_the_format_holds_is_400_without_rendering(self):
        self.store("a.png", make_image("PNG", (40, 30)))
        self.assertError(self.rendition("a.png", "width=20000&height=10&format=webp"), 400, ("width", "16383", "WEBP"))
        self.assertError(self.rendition("a.png", "height=70000&width=10&format=jpeg"), 400, ("height", "65500"))
        self.assertError(self.rendition("a.png", "width=1000000000000000000"), 400, ("width", "at most"))
        self.assertEqual(self.server.renditions.renders, 0)

    def test_tracking_parameters_of_shared_links_are_ignored(self):
        data = make_image("PNG", (40, 30))
        self.store("a.png", data)
        self.assertEqual(self.request("GET", "/a.png?utm_source=news&utm_medium=email&fbclid=IwAR0x&gclid=1").body, data)
        self.assertEqual(decode(self.rendition("a.png", "width=20&utm_campaign=x").body).size, (20, 15))

    def test_the_etag_names_the_renderer_so_an_upgrade_renders_anew(self):
        self.store("a.png", make_image("PNG", (40, 30)))
        etag = self.rendition("a.png", "width=20").headers["ETag"]
        self.assertIn(ims.RENDERER, etag)
        with mock.patch.object(ims, "RENDERER", "ims9.9.9-pil99.0.0"):
            ims.parse_rendition_query.cache_clear()
            upgraded = self.rendition("a.png", "width=20", {"If-None-Match": etag})
        self.assertEqual(upgraded.status, 200)
        self.assertIn("ims9.9.9-pil99.0.0", upgraded.headers["ETag"])
        self.assertEqual(self.server.renditions.renders, 2)

    def test_the_pages_of_a_tiff_are_no_animation(self):
        pages = [Image.new("RGB", (40, 30), colour) for colour in (RED, GREEN, BLUE)]
        self.store("scan.tif", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
        for asked in ("webp", "png", "gif"):
            with self.subTest(format=asked):
                image = self.rendered("scan.tif", f"width=20&format={asked}")
                self.assertEqual(getattr(image, "n_frames", 1), 1)
                self.assertColour(image.convert("RGB").getpixel((10, 7)), RED)
        self.assertEqual(getattr(self.rendered("scan.tif", "width=20"), "n_frames", 1), 3)

    def test_an_animated_gif_with_transparency_keeps_it_as_webp_at_its_own_size(self):
        frames = []
        for index in range(4):
            frame = Image.new("P", (120, 80), 0)
            frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
            frame.paste(index % 3 + 1, (10 + index * 10, 10, 60 + index * 10, 60))
            frames.append(frame)
        self.store("a.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0, duration=100, loop=0))
        for query in ("format=webp", "width=60&format=webp"):
            with self.subTest(query=query):
                image = self.rendered("a.gif", query)
                self.assertEqual(image.n_frames, 4)
                self.assertEqual(image.convert("RGBA").getpixel((image.width - 1, image.height - 1))[3], 0)

    def test_a_file_replaced_by_hand_is_rendered_anew(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        before = self.rendition("a.png", "width=100")
        replacement = os.path.join(self.storage, "replacement.tmp")
        with open(replacement, "wb") as file:
            file.write(make_image("PNG", (100, 100)))
        os.replace(replacement, os.path.join(self.storage, "a.png"))
        after = self.rendition("a.png", "width=100")
        self.assertEqual(decode(after.body).size, (100, 100))
        self.assertNotEqual(after.headers["ETag"], before.headers["ETag"])

    def test_fifty_requests_at_once_cause_one_render_and_get_the_same_bytes(self):
        self.store("a.png", encode(noise((200, 150)), "PNG"))
        release = self.hold_renders(self.server)
        threads = [self.in_background(self.rendition, "a.png", "width=400&height=300", None, self.connect()) for _ in range(50)]
        # All 50 wait for the one render, held back until they do.
        wait_for(lambda: sum(flight.users for flight in self.server.renditions._flights.values()) == 50)
        release.set()
        replies = []
        for thread, results in threads:
            thread.join(DEADLINE_SECONDS)
            replies.extend(results)
        self.assertEqual([reply.status for reply in replies], [200] * 50)
        self.assertEqual({reply.body for reply in replies}, {replies[0].body})
        self.assertEqual(decode(replies[0].body).size, (400, 300))
        self.assertEqual(self.server.renditions.renders, 1)



class TestRenditionTimeLimit(RenditionTestCase):
    server_options = {"resize_timeout": 0.5}

    def test_a_render_past_the_time_limit_is_503_with_a_message(self):
        self.store("slow.png", SLOW_SOURCE)
        reply = self.rendition("slow.png", SLOW_FOREVER)
        self.assertError(reply, 503, "longer than 0.5 seconds")
        self.assertEqual(reply.headers["Retry-After"], "1")
        self.assertEqual(self.cache_entries(), {})
        self.assertEqual(self.cache_temp_files(), [])
        self.assertEqual(self.rendition("slow.png", "width=20").status, 200)


class TestRenditionsOnOneWorker(RenditionTestCase):
    server_options = {"resize_workers": 1, "max_queue": 1}

    def test_renders_go_ahead_of_queued_jobs(self):
        self.start_slow_resize("slow.png")
        self.store("queued.png", SLOW_SOURCE)
        queued = self.submit("queued.png", SLOW_FOREVER)
        self.store("a.png", make_image("PNG", (400, 300)))
        thread, results = self.in_background(self.rendition, "a.png", "width=100")
        wait_for(lambda: self.server.resizer._renders_waiting == 1)
        # The running job goes; its slot must go to the render, not to the queued job, which
        # would hold it for good.
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        thread.join(DEADLINE_SECONDS)
        self.assertEqual(results[0].status, 200, results[0].body)
        self.assertEqual(decode(results[0].body).size, (100, 75))
        self.assertIn(self.job(queued)["state"], ("queued", "running"))
        self.assertEqual(self.request("DELETE", "/queued.png").status, 204)

    def test_past_the_queue_bound_a_rendition_is_503_with_retry_after(self):
        self.start_slow_resize("slow.png")
        self.store("a.png", make_image("PNG", (400, 300)))
        thread, results = self.in_background(self.rendition, "a.png", "width=100")
        wait_for(lambda: self.server.resizer._renders_waiting == 1)
        reply = self.rendition("a.png", "width=101")
        self.assertError(reply, 503, "busy")
        self.assertEqual(reply.headers["Retry-After"], "1")
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        thread.join(DEADLINE_SECONDS)
        self.assertEqual(results[0].status, 200, results[0].body)


class TestManyRenditionsAtOnce(RenditionTestCase):
    server_options = {"resize_workers": 2, "max_queue": 8}

    def test_many_different_renditions_at_once_stay_within_the_bound_and_answer_200_or_503(self):
        self.store("a.png", encode(noise((400, 300)), "PNG"))
        stop, peak = threading.Event(), [0]

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], len(multiprocessing.active_children()))
                stop.wait(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        requests = [self.in_background(self.rendition, "a.png", f"width={width}", None, self.connect()) for width in range(100, 140)]
        replies = []
        for thread, results in requests:
            thread.join(2 * DEADLINE_SECONDS)
            replies.extend(results)
        stop.set()
        sampler.join()
        self.assertEqual(len(replies), 40)
        statuses = collections.Counter(reply.status for reply in replies)
        self.assertEqual(set(statuses) - {200, 503}, set(), statuses)
        self.assertGreaterEqual(statuses[200], 2, statuses)
        for reply in replies:
            if reply.status == 503:
                self.assertError(reply, 503, "busy")
                self.assertEqual(reply.headers["Retry-After"], "1")
            else:
                self.assertEqual(decode(reply.body).width, int(reply.headers["ETag"].split("-")[3].split("x")[0]))
        self.assertLessEqual(peak[0], 2)
        self.assertEqual(self.server.renditions.renders, statuses[200])


class TestRenditionCacheSize(RenditionTestCase):
    # Room for about four of the renditions below (each about 22 KB of noise as PNG).
    server_options = {"cache_size": 100_000}

    def test_least_recently_used_renditions_go_first_and_readers_always_get_whole_files(self):
        self.store("a.png", encode(noise((400, 300)), "PNG"))
        queries = [f"width={width}" for width in range(100, 112)]
        expected = {query: self.rendition("a.png", query).body for query in queries}
        self.assertLessEqual(sum(self.cache_entries().values()), 100_000)
        stop, failures, counts = threading.Event(), [], collections.Counter()

        def read(seed):
            rng, connection = random.Random(seed), self.connect()
            while not stop.is_set():
                query = rng.choice(queries)
                reply = self.rendition("a.png", query, connection=connection)
                counts[reply.status] += 1
                if reply.status != 200 or reply.body != expected[query] or int(reply.headers["Content-Length"]) != len(reply.body):
                    failures.append((query, reply.status, len(reply.body)))

        readers = [threading.Thread(target=read, args=(SEED + index,)) for index in range(4)]
        for reader in readers:
            reader.start()
        wait_for(lambda: self.server.renditions.renders >= 3 * len(queries) or failures)
        stop.set()
        for reader in readers:
            reader.join(DEADLINE_SECONDS)
        self.assertEqual(failures, [])
        self.assertLessEqual(sum(self.cache_entries().values()), 100_000)
        self.assertEqual(self.server.store.cached_bytes(), sum(self.cache_entries().values()))

    def test_the_one_used_last_stays(self):
        self.store("a.png", encode(noise((400, 300)), "PNG"))
        self.rendition("a.png", "width=100")
        for width in range(101, 108):
            # Used between every other render: it is never the least recently used.
            entry = next(path for path in self.cache_entries() if "-100x0-" in path)
            os.utime(os.path.join(self.storage, ims.STATE_FOLDER, "renditions", entry))
            self.rendition("a.png", f"width={width}")
        self.assertTrue(any("-100x0-" in path for path in self.cache_entries()))
        self.assertEqual(self.server.renditions.renders, 8)

    def test_a_rendition_larger_than_the_cache_is_served_and_not_kept(self):
        self.store("a.png", encode(noise((400, 300)), "PNG"))
        reply = self.rendition("a.png", "format=png")
        self.assertEqual(decode(reply.body).size, (400, 300))
        self.assertEqual(self.cache_entries(), {})
        self.assertEqual(self.cache_temp_files(), [])


class TestRenditionsWithoutCache(RenditionTestCase):
    server_options = {"cache_size": 0}

    def test_cache_size_0_renders_every_time_and_keeps_nothing(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        first = self.rendition("a.png", "width=100")
        second = self.rendition("a.png", "width=100")
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(first.body, second.body)
        self.assertEqual(self.server.renditions.renders, 2)
        self.assertEqual(self.cache_entries(), {})
        self.assertEqual(self.cache_temp_files(), [])


class TestRenditionsOnSharedFolder(RenditionTestCase, SharedFolderTestCase):
    def test_a_rendition_made_by_one_instance_is_served_by_the_other(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        made = self.rendition("a.png", "width=100")
        served = self.rendition("a.png", "width=100", connection=self.on_b())
        self.assertEqual((served.status, served.body, served.headers["ETag"]), (200, made.body, made.headers["ETag"]))
        self.assertEqual((self.server.renditions.renders, self.other.renditions.renders), (1, 0))

    def test_requests_at_both_instances_at_once_cause_one_render(self):
        self.store("a.png", encode(noise((200, 150)), "PNG"))
        release = self.hold_renders(self.server)
        first = self.in_background(self.rendition, "a.png", "width=400&height=300")
        wait_for(lambda: self.server.renditions._flights)
        # B's requests share one flight there, whose render waits for the lock A's render holds.
        on_b = [self.in_background(self.rendition, "a.png", "width=400&height=300", None, self.on_b()) for _ in range(5)]
        wait_for(lambda: sum(flight.users for flight in self.other.renditions._flights.values()) == 5)
        release.set()
        replies = []
        for thread, results in [first, *on_b]:
            thread.join(DEADLINE_SECONDS)
            replies.extend(results)
        self.assertEqual([reply.status for reply in replies], [200] * 6)
        self.assertEqual({reply.body for reply in replies}, {replies[0].body})
        self.assertEqual((self.server.renditions.renders, self.other.renditions.renders), (1, 0))

    def test_a_delete_on_one_instance_retires_the_renditions_the_other_made(self):
        self.store("a.png", make_image("PNG", (400, 300)))
        self.assertEqual(self.rendition("a.png", "width=100", connection=self.on_b()).status, 200)
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        self.assertEqual(self.rendition("a.png", "width=100", connection=self.on_b()).status, 404)
        self.assertEqual(self.cache_entries(), {})



class TestStoreLocks(unittest.TestCase):
    """Two Stores on one folder, in this one process: their locks exclude each other as two hosts' would."""

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.folder = os.path.join(self.tempdir.name, "storage")
        self.first, self.second = ims.Store(self.folder), ims.Store(self.folder)
        self.path = os.path.join(self.folder, "a.png")
        with open(self.path, "wb") as file:
            file.write(make_image("PNG"))

    def run_meanwhile(self, action):
        """Start action() in a thread and give it half a second; return (thread, outcomes).

        Called while the first Store holds its lock: a second Store that does not wait for that
        lock has done its work by the time this returns.
        """
        outcomes = []

        def run():
            try:
                outcomes.append(action())
            except ims.HTTPError as error:
                outcomes.append(error.status)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(0.5)
        return thread, outcomes

    def test_of_two_removes_of_one_image_from_two_stores_the_one_holding_the_lock_removes_it(self):
        meanwhile = []
        try:
            self.first.remove("a.png", precondition=lambda version: meanwhile.append(self.run_meanwhile(lambda: self.second.remove("a.png"))))
        except ims.HTTPError as error:
            self.fail(f"the first Store, holding the lock, could not remove the image: {error.status} {error.message}")
        thread, outcomes = meanwhile[0]
        thread.join(DEADLINE_SECONDS)
        self.assertEqual(outcomes, [404], "the second Store removed the image while the first held the lock")
        self.assertFalse(os.path.exists(self.path))

    def test_a_remove_if_unchanged_from_another_store_waits_for_a_replace_and_sees_its_version(self):
        before = self.first.version("a.png")
        temp_file = self.first.new_file(".png")
        temp_file.write(make_image("PNG", (10, 10)))

        def precondition(version):
            if version != before:
                raise ims.HTTPError(412, "the image changed")

        meanwhile = []

        def is_wanted(*arguments):
            meanwhile.append(self.run_meanwhile(lambda: self.second.remove("a.png", precondition=precondition)))
            return True

        self.assertTrue(self.first.replace("a.png", temp_file, before, is_wanted))
        thread, outcomes = meanwhile[0]
        thread.join(DEADLINE_SECONDS)
        self.assertEqual(outcomes, [412], "the second Store removed the image under the first one's replace")
        with open(self.path, "rb") as file:
            self.assertEqual(decode(file.read()).size, (10, 10))

    def test_a_queued_job_is_claimed_by_one_store_at_a_time_and_by_none_once_ended(self):
        job = ims.Job("0123456789abcdef", "a.png", 10, 10, "fill")
        self.first.enqueue(job.to_record(), max_queue=10, slot_count=1)
        [(entry, record)] = self.second.queued_records()
        self.assertEqual(record["id"], job.id)
        claim = self.first.claim(entry)
        self.assertIsNotNone(claim)
        self.assertIsNone(self.second.claim(entry), "two Stores hold one job")
        self.assertIsNone(self.first.claim(entry), "one Store holds one job twice")
        self.first.release(claim)
        claim = self.second.claim(entry)
        self.assertIsNotNone(claim, "a released job cannot be claimed again")
        self.second.end(claim, dict(claim.record, state="done", finished=time.time()))
        self.assertIsNone(self.first.claim(entry))
        self.assertEqual(self.first.queued_records(), [])
        self.assertEqual(self.first.load_record(job.id)["state"], "done")

    def test_the_claim_of_a_process_killed_with_sigkill_is_free_at_once(self):
        # The kernel lets go of a dead process's locks: no lease, no clock.
        job = ims.Job("0123456789abcdef", "a.png", 10, 10, "fill")
        self.first.enqueue(job.to_record(), max_queue=10, slot_count=1)
        [(entry, _)] = self.first.queued_records()
        context = multiprocessing.get_context("fork")
        reader, writer = context.Pipe(duplex=False)

        def claim_and_wait_forever():
            writer.send(ims.Store(self.folder).claim(entry) is not None)
            threading.Event().wait()

        holder = context.Process(target=claim_and_wait_forever, daemon=True)
        holder.start()
        self.addCleanup(holder.join)
        self.addCleanup(holder.kill)
        self.assertTrue(reader.poll(DEADLINE_SECONDS) and reader.recv(), "the other process could not claim the job")
        self.assertIsNone(self.first.claim(entry))
        holder.kill()
        holder.join()
        self.assertIsNotNone(self.first.claim(entry))

    def test_a_temp_file_being_written_survives_another_store_s_scan_and_a_leftover_does_not(self):
        live = self.first.new_file(".png")
        live.write(b"the first bytes")
        leftover = os.path.join(self.folder, f"{ims.TEMP_PREFIX}{os.getpid()}-leftover.png")
        with open(leftover, "wb") as file:
            file.write(b"half an upload")
        self.second.scan()
        self.assertTrue(os.path.exists(live.path))
        self.assertFalse(os.path.exists(leftover))
        live.remove()
        self.assertFalse(os.path.exists(live.path))


# Odd JSON values for the fields of a damaged job record.
ODD_VALUES = (None, True, -1, 0, 10 ** 30, 1e308, "", "x", "../../etc/passwd", "/a.png", [], {}, [1, 2],
              {"id": "x"}, "2024-01-01T00:00:00Z", "queued", "done", "\u0000")


def garbage_records(rng, record, count=300):
    """Yield seeded random damage to a job record (a dict): broken bytes, odd values, fields missing or added."""
    valid = json.dumps(record).encode()
    for _ in range(count):
        yield mutate(rng, valid)
    for _ in range(count):
        damaged = dict(record)
        for key in rng.sample(sorted(damaged), rng.randint(1, 3)):
            if rng.random() < 0.2:
                del damaged[key]
            else:
                damaged[key] = rng.choice(ODD_VALUES)
        if rng.random() < 0.1:
            damaged[rng.choice(("extra", "owner"))] = rng.choice(ODD_VALUES)
        yield json.dumps(damaged).encode()
    yield from (b"", b"null", b"[]", b"\xff\xfe", b"{" * 10000, b'"' + b"a" * 100000 + b'"', valid[:-1])


class TestJobRecordReader(unittest.TestCase):
    """Store.load_record() on seeded random garbage: a record or None, never an exception."""

    RECORD = {"id": "0123456789abcdef", "image": "a.png", "width": 40, "height": 30, "fit": "fill", "state": "done",
              "error": None, "submitted": 1700000000.0, "finished": 1700000001.5, "expected_version": None,
              "result_inode": None}

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.store = ims.Store(os.path.join(self.tempdir.name, "storage"))
        self.record_path = os.path.join(self.store.folder, ims.STATE_FOLDER, "jobs", self.RECORD["id"] + ".json")

    def test_garbage_reads_as_none_or_as_a_record(self):
        for index, data in enumerate(garbage_records(random.Random(SEED), self.RECORD)):
            with open(self.record_path, "wb") as file:
                file.write(data)
            with self.subTest(index=index, data=data[:200]):
                record = self.store.load_record(self.RECORD["id"])
                self.assertTrue(record is None or isinstance(record, dict), record)
        with open(self.record_path, "wb") as file:
            file.write(json.dumps(self.RECORD).encode())
        self.assertEqual(self.store.load_record(self.RECORD["id"]), self.RECORD)

    def test_ids_that_are_not_job_ids_name_no_file(self):
        outside = os.path.join(self.tempdir.name, "outside.json")
        with open(outside, "w") as file:
            json.dump(dict(self.RECORD, id="../../outside"), file)
        for job_id in ("../../../outside", "../../outside", "", ".", "0123456789ABCDEF", "0123456789abcdef/"):
            with self.subTest(job_id=job_id):
                self.assertIsNone(self.store.load_record(job_id))


class TestDamagedJobRecords(ResizeTestCase):
    """A job record damaged on disk (a bad sector, a person's edit) is a 404 or a whole job, never a 500."""

    server_options = {"resize_workers": 1}

    def real_record(self):
        """Run one resize of a.png; return its location and its record as the server wrote it."""
        self.store("a.png", make_image("PNG", (64, 48)))
        location = self.submit("a.png", "width=32&height=24")
        self.assertEqual(self.wait_job(location)["state"], "done")
        path = os.path.join(self.storage, ims.STATE_FOLDER, "jobs", f"{job_id_of(location)}.json")
        with open(path, "rb") as file:
            return location, path, json.loads(file.read())

    def test_get_of_a_damaged_record_is_404_or_a_whole_job(self):
        _, path, record = self.real_record()
        # The real record's id and times change from run to run; the damage is the same when the
        # record is, so it is copied under a fixed id with fixed times.
        record.update(id="0123456789abcdef", submitted=1700000000.0, finished=1700000001.5, result_inode=None)
        location, path = "/jobs/0123456789abcdef", os.path.join(os.path.dirname(path), "0123456789abcdef.json")
        connection = self.connect()
        for index, data in enumerate(garbage_records(random.Random(SEED), record, count=100)):
            with open(path, "wb") as file:
                file.write(data)
            with self.subTest(index=index, data=data[:200]):
                reply = self.request("GET", location, connection=connection)
                self.assertIn(reply.status, (200, 404), reply.body)
                if reply.status == 200:
                    self.assertEqual(set(reply.json), JOB_FIELDS)
                    self.assertEqual(reply.json["id"], job_id_of(location))
                else:
                    self.assertError(reply, 404, job_id_of(location))
        self.assertEqual(self.request("GET", "/").json, ["a.png"])

    def test_damaged_records_in_the_queue_never_stop_the_jobs_behind_them(self):
        # Each damaged record waits in the queue ahead of a real resize of the same image: the
        # real one must still run, and the server answer every job without a 500.
        _, _, record = self.real_record()
        queue = os.path.join(self.storage, ims.STATE_FOLDER, "queue")
        jobs = os.path.join(self.storage, ims.STATE_FOLDER, "jobs")
        rng = random.Random(SEED)
        damaged = list(garbage_records(rng, dict(record, state="queued", error=None, finished=None), count=15))
        for round_index in range(0, len(damaged), 10):
            ids = []
            for data in damaged[round_index:round_index + 10]:
                job_id = f"{rng.getrandbits(64):016x}"
                data = data.replace(record["id"].encode(), job_id.encode())
                ids.append(job_id)
                with open(os.path.join(jobs, f"{job_id}.json"), "wb") as file:
                    file.write(data)
                entries = sorted(os.listdir(queue))
                sequence = int(entries[-1].partition("-")[0]) + 1 if entries else round_index * 100
                os.link(os.path.join(jobs, f"{job_id}.json"), os.path.join(queue, f"{sequence:012d}-{job_id}"))
            with self.subTest(round=round_index // 10):
                job = self.wait_job(self.submit("a.png", f"width={20 + round_index // 10}&height=20"))
                self.assertEqual(job["state"], "done", job)
                for job_id in ids:
                    reply = self.request("GET", f"/jobs/{job_id}")
                    self.assertIn(reply.status, (200, 404), reply.body)
        self.assertEqual(self.request("GET", "/").json, ["a.png"])

    def test_odd_files_in_the_queue_folder_never_stop_new_jobs(self):
        # What a person or a tool might leave there: files and folders named almost like entries
        # (folders stay: no instance can claim one and clear it away).
        _, _, record = self.real_record()
        queue = os.path.join(self.storage, ims.STATE_FOLDER, "queue")
        files = {"notes.txt": b"x", ".hidden": b"x", "000000000001-0123456789ABCDEF": json.dumps(record).encode(),
                 "000000000002-zzzzzzzzzzzzzzzz": json.dumps(record).encode(), "000000000003-0123456789abcdef": b"\xff"}
        for name, data in files.items():
            with open(os.path.join(queue, name), "wb") as file:
                file.write(data)
        # Twelve digits, but not 0 to 9: superscript twos.
        for name in ("999999999999-0123456789abcdef", "\u00b2" * 12 + "-0123456789abcdef", "folder"):
            os.mkdir(os.path.join(queue, name))
        for size in (10, 20):
            with self.subTest(size=size):
                job = self.wait_job(self.submit("a.png", f"width={size}&height={size}"))
                self.assertEqual(job["state"], "done", job)
                self.assertEqual(self.download("a.png").size, (size, size))

    def test_a_queued_record_naming_a_file_outside_the_folder_never_touches_it(self):
        # Only IMS writes records, but whatever a damaged one names, the contract's "never touches
        # a file outside the storage folder" holds.
        _, _, record = self.real_record()
        outside = os.path.join(self.tempdir.name, "outside.png")
        original = make_image("PNG", (64, 48))
        with open(outside, "wb") as file:
            file.write(original)
        queue = os.path.join(self.storage, ims.STATE_FOLDER, "queue")
        jobs = os.path.join(self.storage, ims.STATE_FOLDER, "jobs")
        sequence = int(sorted(os.listdir(queue) or ["000000000000-x"])[-1].partition("-")[0]) + 1
        ids = []
        for index, image in enumerate(("../outside.png", outside, "a.png/../../outside.png")):
            job_id = f"{index:016x}"
            ids.append(job_id)
            damaged = dict(record, id=job_id, image=image, state="queued", error=None, finished=None)
            with open(os.path.join(jobs, f"{job_id}.json"), "w") as file:
                json.dump(damaged, file)
            os.link(os.path.join(jobs, f"{job_id}.json"), os.path.join(queue, f"{sequence + index:012d}-{job_id}"))
        # A real job queued behind them has run when they have.
        self.assertEqual(self.wait_job(self.submit("a.png", "width=10&height=10"))["state"], "done")
        with open(outside, "rb") as file:
            self.assertEqual(file.read(), original, "a resize wrote a file outside the storage folder")
        for job_id in ids:
            reply = self.request("GET", f"/jobs/{job_id}")
            self.assertIn(reply.status, (200, 404), reply.body)
            if reply.status == 200:
                self.assertNotEqual(reply.json["state"], "done", reply.json)
        self.assertEqual(sorted(os.listdir(self.tempdir.name)), ["outside.png", "storage"])


# ====
# Scaling out: real processes
# ====
# Several real `python3 ims.py` processes on one folder: a supervisor and its workers, three
# instances behind a real nginx, instances in PID namespaces of their own. They read /proc (Linux).


def parent_of(pid):
    """Return the id of the parent of process `pid`, or None once it has gone (reads /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return int(file.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def command_line_of(pid):
    """Return the command line of process `pid` as /proc has it, or None once it has gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return None


def serving_pid(connection, pids):
    """Return which of `pids` holds the server's end of the open http.client `connection`, or None.

    The kernel's table of TCP sockets (/proc/net/tcp) gives the server end's inode from the two
    addresses of the connection; the process that answered has that socket among its open files.
    """
    def address(host, port):
        return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"

    client, server = connection.sock.getsockname(), connection.sock.getpeername()
    wanted = (address(*server[:2]), address(*client[:2]))
    with open("/proc/net/tcp") as file:
        rows = [line.split() for line in file.readlines()[1:]]
    sockets = {f"socket:[{row[9]}]" for row in rows if (row[1], row[2]) == wanted}
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") in sockets:
                    return pid
            except OSError:
                pass
    return None


def free_port():
    """Return a TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Instance:
    """A real `python3 ims.py` that a test started: its process (leading a session), port and log."""

    process: subprocess.Popen
    port: int
    log_path: str
    supervised: bool  # started with --workers above 1: the process is the workers' supervisor

    def log(self):
        """Return what it has written to stderr: the request log and the supervisor's lines."""
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def has_served(self, method, target):
        """Tell whether its request log has the line of `method target`."""
        return f'"{method} {target} HTTP/1.1"' in self.log()

    def workers(self):
        """Return the ids of a supervisor's workers: its children that run ims.py as it does."""
        leader = self.process.pid
        command_line = command_line_of(leader)
        return sorted(
            pid for pid in session_processes(leader) if parent_of(pid) == leader and command_line_of(pid) == command_line
        )

    def resize_processes(self):
        """Return the ids of its resize processes: the children of the processes that serve."""
        serving = set(self.workers()) if self.supervised else {self.process.pid}
        return sorted(pid for pid in session_processes(self.process.pid) if parent_of(pid) in serving)


class RealProcessTestCase(ResizeTestCase, HTTPTestCase):
    """The request helpers of ResizeTestCase and HTTPTestCase, sent to real ims.py processes.

    setUp makes an empty temporary folder; a test starts its processes with start_instance() and
    points self.port at the one its requests go to (an instance, a supervisor, nginx).
    """

    def setUp(self):
        if not os.path.isdir("/proc/self"):
            self.skipTest("telling real processes apart needs /proc (Linux)")
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        self.host, self.port = "127.0.0.1", None
        self.instances = []

    def start_instance(self, *arguments, env=None, wrapper=()):
        """Start ims.py on self.storage with `arguments`; return its Instance, listening.

        Its stderr is unbuffered, so a request's log line is there once the request is answered.
        At cleanup every process of its session is killed, resize processes held with SIGSTOP too.
        """
        env = dict(env or {}, PYTHONUNBUFFERED="1")
        log_path = os.path.join(self.tempdir.name, f"ims-{len(self.instances)}.log")
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        storage = self.instance_storage(len(self.instances))
        process, port = start_ims(self, "--storage", storage, *arguments, env=env, log=log, wrapper=wrapper)
        self.addCleanup(self.end_session, process.pid)
        instance = Instance(process, port, log_path, supervised="--workers" in arguments or "IMS_WORKERS" in env)
        self.instances.append(instance)
        return instance

    def instance_storage(self, index):
        """Return the folder the `index`th instance serves: self.storage, as the host it runs on sees it."""
        return self.storage

    def end_session(self, session_id):
        """Kill every process of the session, again until none is left: a dying one may still fork."""
        def ended():
            kill_session(session_id)
            return not session_processes(session_id)

        wait_for(ended)

    def direct(self, instance):
        """Return a new connection straight to `instance`, closed at cleanup."""
        return self.connect(("127.0.0.1", instance.port))

    def hold_resize(self, location):
        """Stop (SIGSTOP) the one resize process of the job at `location`; return (its Instance, its pid).

        The job must start at once and run long enough to be caught (SLOW_FOREVER, SLOW_ENOUGH).
        """
        def running():
            return [(instance, pid) for instance in self.instances for pid in instance.resize_processes()]

        wait_for(lambda: running() or self.job(location)["state"] in ENDED_STATES)
        found = running()
        self.assertEqual(len(found), 1, f"not one resize process: {found}")
        instance, pid = found[0]
        # Stopped while it still held its worker's listening socket (a fork copies it, and the
        # child lets go of it first thing), it would keep that socket in the port's SO_REUSEPORT
        # group after the worker died, and connections sent there would be reset.
        wait_for(lambda: not any(path.startswith("socket:") for path in open_files(pid)))
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: is_stopped(pid) or self.job(location)["state"] in ENDED_STATES)
        self.assertTrue(is_stopped(pid), "the resize ended before it could be stopped")
        self.assertEqual(self.job(location)["state"], "running")
        return instance, pid

    def wait_for_log(self, instance, *words):
        """Return the first line of `instance`'s stderr that holds every one of `words`, once there is one."""
        def lines():
            return [line for line in instance.log().splitlines() if all(word in line for word in words)]

        try:
            wait_for(lines)
        except AssertionError:
            self.fail(f"no line of stderr holds {words}; it ends with: {instance.log()[-1500:]}")
        return lines()[0]


class TestWorkers(RealProcessTestCase):
    """`python3 ims.py --workers 2`: a supervisor and two serving processes on one port."""

    def start_workers(self, *arguments):
        instance = self.start_instance("--workers", "2", *arguments)
        self.port = instance.port
        return instance

    def serving_pids(self, instance, listing, count=40):
        """Ask GET / on `count` new connections; return a Counter of the processes that answered.

        Every answer must be `listing`. The kernel spreads new connections over the workers' sockets
        (SO_REUSEPORT), so 40 reach both of two workers but once in 2**39 runs.
        """
        answered = collections.Counter()
        for _ in range(count):
            connection = self.connect()
            reply = self.request("GET", "/", connection=connection)
            self.assertEqual((reply.status, reply.json), (200, listing), reply.body)
            answered[serving_pid(connection, instance.workers())] += 1
            connection.close()
        return answered

    def connection_to_worker(self, instance, pid):
        """Return a new connection that worker `pid` serves (opening others until one is)."""
        for _ in range(100):
            connection = self.connect()
            self.assertEqual(self.request("GET", "/", connection=connection).status, 200)
            if serving_pid(connection, instance.workers()) == pid:
                return connection
            connection.close()
        self.fail(f"none of 100 new connections reached worker {pid}")

    def test_two_workers_serve_one_port_after_one_start_up_line(self):
        instance = self.start_workers()
        workers = instance.workers()
        self.assertEqual(len(workers), 2, f"the supervisor's workers: {workers}")
        answered = self.serving_pids(instance, [])
        self.assertEqual(set(answered), set(workers), f"who answered: {answered}")
        instance.process.send_signal(signal.SIGTERM)
        self.assertEqual(instance.process.wait(timeout=DEADLINE_SECONDS), 0)
        self.assertEqual(instance.process.stdout.read(), "", "more than the one start-up line")

    def test_ims_workers_in_the_environment_starts_that_many_workers(self):
        instance = self.start_instance(env={"IMS_WORKERS": "2"})
        self.port = instance.port
        workers = instance.workers()
        self.assertEqual(len(workers), 2, f"the supervisor's workers: {workers}")
        self.assertEqual(set(self.serving_pids(instance, [])), set(workers))

    def test_fewer_than_one_worker_is_refused_with_status_2(self):
        for arguments, env in ((["--workers", "0"], {}), (["--workers", "-1"], {}), ([], {"IMS_WORKERS": "0"})):
            with self.subTest(arguments=arguments, env=env):
                result = subprocess.run(
                    [sys.executable, os.path.join(HERE, "ims.py"), "--port", "0", "--storage", self.storage, *arguments],
                    capture_output=True, text=True, timeout=DEADLINE_SECONDS, env=dict(os.environ, **env),
                )
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn("invalid", result.stderr)
                self.assertIn("workers", result.stderr)
                self.assertEqual(result.stdout, "")

    def test_a_killed_worker_is_replaced_and_the_supervisor_says_so(self):
        instance = self.start_workers()
        self.store("kept.png", make_image("PNG"))
        workers = instance.workers()
        self.assertEqual(len(workers), 2, f"the supervisor's workers: {workers}")
        victim = workers[0]
        # An upload in flight on the worker that dies is lost, and its partial file goes.
        uploading = self.connection_to_worker(instance, victim)
        body, content_type = multipart_body(files=[("file", "lost.png", encode(noise((300, 200)), "PNG"))])
        uploading.sock.sendall(self.multipart_request_head(content_type, len(body)) + body[:len(body) // 2])
        wait_for(self.temp_files)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in instance.workers() and len(instance.workers()) == 2)
        line = self.wait_for_log(instance, f"worker {victim}")
        self.assertIn("restart", line)
        replacement = set(instance.workers()) - set(workers)
        self.assertEqual(len(replacement), 1, instance.workers())
        wait_for(lambda: not self.temp_files())
        answered = self.serving_pids(instance, ["kept.png"])
        self.assertEqual(set(answered), set(instance.workers()), f"who answered: {answered}")
        self.assertEqual(instance.process.poll(), None, "the supervisor has exited")

    def is_refused(self):
        """Tell whether a new connection to self.port is refused (no socket listens on it any more).

        One that a stopping worker's socket had queued is reset instead when that socket closes.
        """
        try:
            socket.create_connection((self.host, self.port), timeout=DEADLINE_SECONDS).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            pass
        return False

    def check_clean_stop(self, signal_number):
        instance = self.start_workers()
        self.assertEqual(len(instance.workers()), 2)
        name = f"kept-{signal_number.name}.png"
        data = encode(noise((300, 200)), "PNG")
        body, content_type = multipart_body(files=[("file", name, data)])
        idle = self.connect()
        self.assertEqual(self.request("GET", "/", connection=idle).status, 200)
        uploading = self.open_socket()
        uploading.sendall(self.multipart_request_head(content_type, len(body)) + body[:len(body) // 2])
        wait_for(self.temp_files)
        # The idle keep-alive connection must not hold the stop up; the upload in flight finishes.
        instance.process.send_signal(signal_number)
        wait_for(self.is_refused)
        uploading.sendall(body[len(body) // 2:])
        reply = self.read_reply(uploading)
        self.assertEqual((reply.status, reply.json), (201, "Image successfully uploaded"))
        self.assertEqual(instance.process.wait(timeout=DEADLINE_SECONDS), 0)
        self.assertEqual(session_processes(instance.process.pid), [], "processes outlive the supervisor")
        self.assertNoTempFiles()
        with open(os.path.join(self.storage, name), "rb") as file:
            self.assertEqual(file.read(), data)

    def test_sigterm_stops_every_worker_with_status_0(self):
        self.check_clean_stop(signal.SIGTERM)

    def test_sigint_stops_every_worker_with_status_0(self):
        self.check_clean_stop(signal.SIGINT)

    def test_resize_workers_bounds_resize_processes_on_the_host_not_per_worker(self):
        instance = self.start_workers("--resize-workers", "1")
        names = ["a.png", "b.png", "c.png", "d.png"]
        for name in names:
            self.store(name, make_image("PNG", (64, 48)))
        self.store("slow.png", SLOW_SOURCE)
        counts, stop = [], threading.Event()

        def count_resize_processes():
            while not stop.is_set():
                counts.append(len(instance.resize_processes()))
                stop.wait(0.005)

        sampler = threading.Thread(target=count_resize_processes, daemon=True)
        sampler.start()
        self.addCleanup(sampler.join)
        self.addCleanup(stop.set)
        held = self.submit("slow.png", SLOW_FOREVER)
        _, pid = self.hold_resize(held)
        # Each job goes to the worker that is not running the held resize: it has no resize of its own.
        other = next(worker for worker in instance.workers() if worker != parent_of(pid))
        locations = [self.submit(name, "width=32&height=24", self.connection_to_worker(instance, other)) for name in names]
        for location in locations:
            reply = self.request("GET", f"{location}?wait=0.5")
            self.assertEqual((reply.status, reply.json["state"]), (200, "queued"), reply.body)
        self.assertEqual(instance.resize_processes(), [pid])
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertEqual(self.wait_job(held)["state"], "cancelled")
        self.assertEqual([self.wait_job(location)["state"] for location in locations], ["done"] * len(names))
        stop.set()
        sampler.join(DEADLINE_SECONDS)
        self.assertEqual(max(counts), 1, "more than one resize process ran at once")
        for name in names:
            self.assertEqual(self.download(name).size, (32, 24))


    def test_workers_stop_when_their_supervisor_is_killed(self):
        instance = self.start_workers()
        workers = instance.workers()
        self.assertEqual(len(workers), 2, f"the supervisor's workers: {workers}")
        instance.process.kill()
        instance.process.wait()
        # Unsupervised, they stop by themselves and free the port for the next start.
        wait_for(lambda: not set(workers) & set(session_processes(instance.process.pid)))
        self.assertTrue(self.is_refused())
        restarted = self.start_workers("--port", str(instance.port))
        self.assertEqual(set(self.serving_pids(restarted, [])), set(restarted.workers()))

    def test_a_port_another_ims_serves_is_refused_with_status_1(self):
        # SO_REUSEPORT lets any process of the same user listen on a port its sockets share: a
        # second IMS started there by mistake must not take half of the first one's connections.
        first = self.start_workers()
        for workers in ("2", "1"):
            with self.subTest(workers=workers):
                process = subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "ims.py"), "--workers", workers, "--port", str(first.port),
                     "--storage", os.path.join(self.tempdir.name, "other")],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                )
                self.addCleanup(process.stderr.close)
                self.addCleanup(process.stdout.close)
                self.addCleanup(process.wait)
                self.addCleanup(self.end_session, process.pid)
                self.assertEqual(process.stdout.readline(), "", "it serves on the port already served")
                self.assertEqual(process.wait(timeout=DEADLINE_SECONDS), 1)
                self.assertIn(f"cannot serve on 127.0.0.1:{first.port}", process.stderr.read())
        answered = self.serving_pids(first, [])
        self.assertEqual(set(answered), set(first.workers()), f"who answered (None: not the first IMS): {answered}")

    def test_a_stop_signal_to_the_whole_process_group_leaves_running_jobs_to_run_again(self):
        # A terminal's Ctrl-C sends SIGINT, and systemd's stop SIGTERM, to every process of the
        # group (the unit) at once, resize processes included: a job running then is a 202 too.
        for arguments, signal_number in (((), signal.SIGINT), (("--workers", "2"), signal.SIGTERM)):
            with self.subTest(arguments=arguments, signal=signal_number.name):
                self.storage = os.path.join(self.tempdir.name, f"storage-{signal_number.name}")
                instance = self.start_instance(*arguments)
                self.port = instance.port
                self.store("slow.png", SLOW_SOURCE)
                location = self.submit("slow.png", SLOW_ENOUGH)
                wait_for(lambda: instance.resize_processes() or self.job(location)["state"] in ENDED_STATES)
                self.assertEqual(self.job(location)["state"], "running")
                os.killpg(instance.process.pid, signal_number)
                self.assertEqual(instance.process.wait(timeout=DEADLINE_SECONDS), 0)
                self.port = self.start_instance(*arguments).port
                job = self.wait_job(location)
                self.assertEqual((job["state"], job["error"]), ("done", None), job)
                self.assertEqual(self.download("slow.png").size, (2000, 2000))

    def test_a_job_whose_worker_is_killed_still_ends_done(self):
        instance = self.start_workers()
        self.store("slow.png", SLOW_SOURCE)
        location = self.submit("slow.png", SLOW_ENOUGH)
        _, pid = self.hold_resize(location)
        worker = parent_of(pid)
        os.kill(worker, signal.SIGKILL)
        # Connections waiting on the worker's own socket when it died are reset (SO_REUSEPORT):
        # a client asks again once the worker is gone. Gone means reaped: its main thread is a
        # zombie while other threads still exit, holding the socket.
        wait_for(lambda: not os.path.exists(f"/proc/{worker}"))
        # Its resize process, orphaned, runs on to its end, as after the OOM killer took the worker.
        os.kill(pid, signal.SIGCONT)
        job = self.wait_job(location)
        self.assertEqual((job["state"], job["error"]), ("done", None), job)
        self.assertEqual(self.download("slow.png").size, (2000, 2000))
        wait_for(lambda: pid not in session_processes(instance.process.pid))
        self.assertNoTempFiles()
        self.assertEqual(self.request("GET", "/").json, ["slow.png"])

    def test_jobs_accepted_before_a_stop_end_done_after_the_restart(self):
        instance = self.start_workers("--resize-workers", "1")
        self.store("slow.png", SLOW_SOURCE)
        running = self.submit("slow.png", SLOW_ENOUGH)
        self.hold_resize(running)
        queued = self.submit("slow.png", "width=30&height=20")
        self.assertEqual(self.job(queued)["state"], "queued")
        instance.process.send_signal(signal.SIGTERM)
        self.assertEqual(instance.process.wait(timeout=DEADLINE_SECONDS), 0)
        self.assertEqual(session_processes(instance.process.pid), [], "processes outlive the supervisor")
        self.start_workers("--resize-workers", "1")
        jobs = [self.wait_job(location) for location in (running, queued)]
        self.assertEqual([(job["state"], job["error"]) for job in jobs], [("done", None)] * 2, jobs)
        self.assertEqual(self.download("slow.png").size, (30, 20))
        self.assertNoTempFiles()


# nginx in front of several instances, as the README shows it: the file a site adds to nginx's
# http block (Debian: /etc/nginx/conf.d/ims.conf), one `server` line per instance. The tests put
# their own ports in place of these.
NGINX_CONFIG = """\
upstream ims {
    # Round robin (nginx's default): any request may go to any instance on the folder.
    server 127.0.0.1:5001;
    server 127.0.0.1:5002;
    server 127.0.0.1:5003;
    keepalive 16;                       # connections to the instances kept open for reuse
}

server {
    listen 127.0.0.1:8080;
    location / {
        proxy_pass http://ims;
        proxy_http_version 1.1;         # keep-alive and chunked bodies to the instances
        proxy_set_header Connection "";
        proxy_request_buffering off;    # uploads stream through as they come
        proxy_read_timeout 90s;         # GET /jobs/<id>?wait= may hold its answer 60 s
    }

    # nginx, not IMS, answers "Expect: 100-continue": with IMS's --max-upload here too, an upload
    # that says it is larger gets IMS's 413 before its body is sent, not a 100 Continue.
    client_max_body_size 16000000;
    error_page 413 @too_large;
    location @too_large {
        default_type application/json;
        return 413 '{"message": "the body is larger than the 16000000 bytes allowed"}\\n';
    }
}
"""

# What a test wraps around NGINX_CONFIG to run nginx in a temporary folder of its own, as any
# user. One worker process, so requests go round the instances strictly in turn.
NGINX_TEST_MAIN = """\
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/ims.conf;
}}
"""


def nginx_config(instance_ports, listen_port):
    """Return NGINX_CONFIG with the three `instance_ports` in its server lines, listening on `listen_port`."""
    ports = dict(zip(("5001", "5002", "5003", "8080"), (*instance_ports, listen_port)))

    def address(match):
        return f"127.0.0.1:{ports[match.group(1)]}"

    return re.sub(r"127\.0\.0\.1:(5001|5002|5003|8080)\b", address, NGINX_CONFIG)


NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))


@unittest.skipUnless(NGINX, "nginx is not installed (Debian: apt-get install nginx-light, as .ci/run does)")
class TestNginx(RealProcessTestCase):
    """A real nginx, round robin over three real instances on one folder; requests go through nginx."""

    def setUp(self):
        super().setUp()
        instances = [self.start_instance() for _ in range(3)]
        self.port = self.start_nginx([instance.port for instance in instances])
        self.probes = itertools.count()

    def start_nginx(self, instance_ports):
        """Start nginx from NGINX_CONFIG in a temporary folder; return its port once it listens."""
        # A folder of its own that every user may enter: run by root, nginx's workers are `nobody`.
        folder = tempfile.mkdtemp(prefix="ims-nginx-")
        self.addCleanup(shutil.rmtree, folder, True)
        os.chmod(folder, 0o755)
        listen_port = free_port()
        with open(os.path.join(folder, "ims.conf"), "w") as file:
            file.write(nginx_config(instance_ports, listen_port))
        with open(os.path.join(folder, "nginx.conf"), "w") as file:
            file.write(NGINX_TEST_MAIN.format(folder=folder))
        error_log = os.path.join(folder, "error.log")
        output = open(os.path.join(folder, "output.log"), "wb")
        self.addCleanup(output.close)
        process = subprocess.Popen(
            [NGINX, "-p", folder, "-c", os.path.join(folder, "nginx.conf"), "-e", error_log, "-g", "daemon off;"],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.addCleanup(self.stop_nginx, process)

        def is_listening():
            if process.poll() is not None:
                with open(os.path.join(folder, "output.log"), errors="replace") as file:
                    self.fail(f"nginx exited with status {process.returncode}: {file.read()}")
            try:
                socket.create_connection(("127.0.0.1", listen_port), timeout=DEADLINE_SECONDS).close()
            except ConnectionRefusedError:
                return False
            return True

        wait_for(is_listening)
        return listen_port

    def stop_nginx(self, process):
        process.terminate()
        try:
            process.wait(timeout=DEADLINE_SECONDS)
        finally:
            self.end_session(process.pid)
            process.wait()

    def served_by(self, method, target):
        """Return the one instance whose log shows it answered `method target`."""
        wait_for(lambda: any(instance.has_served(method, target) for instance in self.instances))
        served = [instance for instance in self.instances if instance.has_served(method, target)]
        self.assertEqual(len(served), 1, f"{method} {target} was answered by {len(served)} instances")
        return served[0]

    def steer_away_from(self, instance):
        """Send requests through nginx until the next one, by its round robin, goes to another instance."""
        for _ in range(2 * len(self.instances)):
            target = f"/jobs/steering-{next(self.probes)}"
            self.assertEqual(self.request("GET", target).status, 404)
            following = (self.instances.index(self.served_by("GET", target)) + 1) % len(self.instances)
            if self.instances[following] is not instance:
                return
        self.fail("nginx does not send requests round the instances in turn")

    def assertServedEverywhere(self, name, data):
        """`name` is listed by every instance and downloads whole from each, and through nginx."""
        for instance in self.instances:
            connection = self.direct(instance)
            self.assertIn(name, self.request("GET", "/", connection=connection).json)
            self.assertEqual(self.request("GET", f"/{name}", connection=connection).body, data)
        self.assertEqual(self.request("GET", f"/{name}").body, data)

    def test_uploads_of_every_framing_are_listed_and_downloaded_from_every_instance_at_once(self):
        images = {name: encode(noise((300, 200), index), FORMAT_BY_SUFFIX[name[-3:]]) for index, name in enumerate(
            ("length.png", "chunked.jpg", "expect.png")
        )}
        with self.subTest(framing="Content-Length"):
            self.assertEqual(self.upload("length.png", images["length.png"]).status, 201)
            self.assertServedEverywhere("length.png", images["length.png"])
        with self.subTest(framing="chunked"):
            body, content_type = multipart_body(files=[("file", "chunked.jpg", images["chunked.jpg"])])
            connection = self.connect()
            connection.request(
                "POST", "/", body=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]), encode_chunked=True,
                headers={"Content-Type": content_type, "Transfer-Encoding": "chunked"},
            )
            response = connection.getresponse()
            self.assertEqual((response.status, json.loads(response.read())), (201, "Image successfully uploaded"))
            self.assertServedEverywhere("chunked.jpg", images["chunked.jpg"])
        with self.subTest(framing="Expect: 100-continue"):
            body, content_type = multipart_body(files=[("file", "expect.png", images["expect.png"])])
            sock = self.open_socket()
            sock.sendall(self.multipart_request_head(content_type, len(body), ["Expect: 100-continue"]))
            self.assertEqual(self.read_head(sock), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            reply = self.read_reply(sock)
            self.assertEqual((reply.status, reply.json), (201, "Image successfully uploaded"))
            self.assertServedEverywhere("expect.png", images["expect.png"])
        self.assertEqual(self.request("GET", "/").json, sorted(images))
        self.assertNoTempFiles()

    def test_an_upload_over_max_upload_is_refused_before_its_body(self):
        # API.md: Expect: 100-continue is answered with the final error when the headers show it.
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, 16000001, ["Expect: 100-continue", "Connection: close"]))
        raw = self.read_until_close(sock)
        self.assertFalse(raw.startswith(b"HTTP/1.1 100"), raw)
        self.assertError(self.parse_reply(raw), 413, "16000000")
        self.assertEqual(self.request("GET", "/").json, [])

    def test_concurrent_uploads_of_one_name_through_nginx_store_exactly_one(self):
        count = 9
        images = [encode(noise((100, 100), index), "PNG") for index in range(count)]
        results = self.upload_at_once("race.png", images)
        self.assertEqual(sorted(result[0] for result in results if result), [201] + [409] * (count - 1), results)
        winner = next(index for index, result in enumerate(results) if result[0] == 201)
        self.assertServedEverywhere("race.png", images[winner])
        self.assertEqual({instance.has_served("POST", "/") for instance in self.instances}, {True})
        self.assertNoTempFiles()

    def test_a_job_is_awaited_on_another_instance_than_the_one_running_it(self):
        self.store("slow.png", SLOW_SOURCE)
        location = self.submit("slow.png", SLOW_ENOUGH)
        runner, pid = self.hold_resize(location)
        self.steer_away_from(runner)
        connection, sent, answers = self.connect(), threading.Event(), []

        def wait():
            connection.request("GET", f"{location}?wait=60")
            sent.set()
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())["state"]))

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        self.assertTrue(sent.wait(DEADLINE_SECONDS), "the request could not be sent")
        os.kill(pid, signal.SIGCONT)
        waiter.join(DEADLINE_SECONDS)
        self.assertFalse(waiter.is_alive(), "the answer waited for the whole ?wait=")
        self.assertEqual(answers, [(200, "done")])
        self.assertIsNot(self.served_by("GET", f"{location}?wait=60"), runner)
        self.assertEqual(self.download("slow.png").size, (2000, 2000))

    def test_twenty_patches_of_one_image_apply_in_the_order_they_were_accepted(self):
        self.store("a.png", SLOW_SOURCE)
        # The first job is held, so the twenty queue behind it in the folder, spread over the instances.
        first = self.submit("a.png", SLOW_ENOUGH)
        _, pid = self.hold_resize(first)
        queries = [f"width={width}&height=50&fit=fill" for width in range(100, 120)]
        locations = [first] + [self.submit("a.png", query) for query in queries]
        accepting = {self.instances.index(self.served_by("PATCH", f"/a.png?{query}")) for query in queries}
        self.assertEqual(accepting, {0, 1, 2}, "nginx did not spread the PATCHes over the instances")
        self.assertEqual([self.job(location)["state"] for location in locations[1:]], ["queued"] * len(queries))
        os.kill(pid, signal.SIGCONT)
        jobs = [self.wait_job(location) for location in locations]
        self.assertEqual([job["state"] for job in jobs], ["done"] * len(jobs), jobs)
        self.assertEqual([job["width"] for job in jobs], [2000] + list(range(100, 120)))
        finished = [epoch_of(job["finished"]) for job in jobs]
        self.assertEqual(finished, sorted(finished), "jobs ended out of the order they were accepted in")
        self.assertEqual(self.download("a.png").size, (119, 50))

    def test_max_queue_counts_the_jobs_waiting_in_the_folder(self):
        # Three instances of their own, on a folder of their own: one resize at a time on the
        # host, and three jobs waiting at most.
        self.storage = os.path.join(self.tempdir.name, "queue-storage")
        self.instances = []
        for _ in range(3):
            self.start_instance("--resize-workers", "1", "--max-queue", "3")
        self.port = self.start_nginx([instance.port for instance in self.instances])
        names = ["a.png", "b.png", "c.png", "d.png"]
        for name in names:
            self.store(name, make_image("PNG"))
        self.store("slow.png", SLOW_SOURCE)
        held = self.submit("slow.png", SLOW_FOREVER)
        self.hold_resize(held)
        queued = [self.submit(name, "width=10&height=10") for name in names[:3]]
        accepting = {self.instances.index(self.served_by("PATCH", f"/{name}?width=10&height=10")) for name in names[:3]}
        self.assertEqual(accepting, {0, 1, 2}, "nginx did not spread the PATCHes over the instances")
        for instance in self.instances:
            reply = self.patch("d.png", "width=10&height=10", connection=self.direct(instance))
            self.assertError(reply, 503, "try again later")
            self.assertRegex(reply.headers.get("Retry-After", ""), r"^\d+$")
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertEqual([self.wait_job(location)["state"] for location in queued], ["done"] * 3)
        self.assertEqual(self.wait_job(self.submit("d.png", "width=10&height=10"))["state"], "done")

    def test_delete_during_a_resize_on_another_instance_cancels_it_for_good(self):
        self.store("slow.png", SLOW_SOURCE)
        location = self.submit("slow.png", SLOW_FOREVER)
        runner, pid = self.hold_resize(location)
        self.steer_away_from(runner)
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertIsNot(self.served_by("DELETE", "/slow.png"), runner)
        job = self.wait_job(location)
        self.assertEqual((job["state"], job["finished"] is None), ("cancelled", False), job)
        # Once its process is gone, and the file it was writing, nothing can bring the image back.
        wait_for(lambda: pid not in session_processes(runner.process.pid) and not self.temp_files())
        for instance in self.instances:
            connection = self.direct(instance)
            self.assertEqual(self.request("GET", "/", connection=connection).json, [])
            self.assertEqual(self.request("GET", "/slow.png", connection=connection).status, 404)
            self.assertEqual(self.request("GET", location, connection=connection).json["state"], "cancelled")
        self.assertNotIn("slow.png", os.listdir(self.storage))

    def test_a_job_whose_instance_is_killed_still_ends_done(self):
        self.store("slow.png", SLOW_SOURCE)
        location = self.submit("slow.png", SLOW_ENOUGH)
        runner, _ = self.hold_resize(location)
        kill_session(runner.process.pid)
        wait_for(lambda: not session_processes(runner.process.pid))
        job = self.wait_job(location)
        self.assertEqual((job["state"], job["error"]), ("done", None), job)
        self.assertEqual(self.download("slow.png").size, (2000, 2000))
        self.assertEqual(self.request("GET", "/").json, ["slow.png"])


# Each instance gets a PID namespace of its own, as in a container of its own: the same numbers
# mean other processes, or none, in each.
UNSHARE = ("unshare", "--pid", "--mount-proc", "--kill-child")


class TestPidNamespaces(RealProcessTestCase):
    """Two instances on one folder, each in a PID namespace of its own."""

    @classmethod
    def setUpClass(cls):
        if not shutil.which("unshare"):
            raise unittest.SkipTest("unshare (util-linux) is not installed")
        try:
            probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=DEADLINE_SECONDS)
        except OSError as error:
            raise unittest.SkipTest(f"unshare cannot run: {error}")
        if probe.returncode != 0:
            raise unittest.SkipTest(f"new PID namespaces are not permitted here: {probe.stderr.strip()}")

    def test_a_restart_in_another_namespace_never_removes_a_live_upload(self):
        # A's ims.py is process 2 of its namespace (a shell is 1), B's is process 1 of its own: in
        # B's namespace no process 2 runs, so A's upload looks like a dead writer's to a scan that
        # judges by process ids.
        streaming = self.start_instance("--timeout", "120", wrapper=(*UNSHARE, "sh", "-c", '"$@"; exit $?', "sh"))
        restarting = self.start_instance(wrapper=UNSHARE)
        data = encode(noise((400, 300), SEED), "PNG")
        body, content_type = multipart_body(files=[("file", "streamed.png", data)])
        self.port = streaming.port
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body), ["Connection: close"]))
        sock.sendall(body[:len(body) // 2])
        wait_for(self.temp_files)
        uploading = self.temp_files()

        server = next(pid for pid in session_processes(restarting.process.pid) if parent_of(pid) == restarting.process.pid)
        os.kill(server, signal.SIGTERM)
        self.assertEqual(restarting.process.wait(timeout=DEADLINE_SECONDS), 0)
        restarted = self.start_instance(wrapper=UNSHARE)
        self.assertEqual(self.temp_files(), uploading, "the restart removed the upload in progress")
        self.assertEqual(self.request("GET", "/", connection=self.direct(restarted)).json, [])

        sock.sendall(body[len(body) // 2:])
        reply = self.parse_reply(self.read_until_close(sock))
        self.assertEqual((reply.status, reply.json), (201, "Image successfully uploaded"))
        connection = self.direct(restarted)
        self.assertEqual(self.request("GET", "/", connection=connection).json, ["streamed.png"])
        self.assertEqual(self.request("GET", "/streamed.png", connection=connection).body, data)
        self.assertNoTempFiles()


class TestLeftoversWhileServing(ServerTestCase):
    """A running instance removes the temp files no writer holds, every JOB_CLEANUP_SECONDS (shortened here)."""

    def setUp(self):
        patcher = mock.patch.object(ims, "JOB_CLEANUP_SECONDS", 0.05)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()

    def test_a_killed_writer_s_temp_file_goes_without_a_restart_and_a_live_one_stays(self):
        leftover = os.path.join(self.storage, f"{ims.TEMP_PREFIX}0123456789abcdef.png")
        with open(leftover, "wb") as file:
            file.write(b"half an upload, its writer killed on another host")
        writing = self.server.store.new_file(".png")
        self.addCleanup(writing.remove)
        wait_for(lambda: not os.path.exists(leftover))
        self.assertTrue(os.path.exists(writing.path))


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /srv/ims rw,relatime shared:9 - nfs4 files:/export/ims rw,vers=4.2,hard,proto=tcp,sec=sys
31 22 0:41 / /srv/fresh rw,relatime shared:10 - nfs4 files:/export/ims rw,vers=4.2,acregmin=0,acregmax=0,acdirmin=0,acdirmax=0,lookupcache=none
32 22 0:42 / /srv/noac rw,sync,relatime shared:11 - nfs files:/export/ims rw,vers=3,noac,lookupcache=none
33 22 0:43 / /srv/ceph rw,relatime shared:12 - ceph 10.0.0.1:/ rw,name=ims
34 22 0:44 / /srv/with\\040space rw,relatime shared:13 - fuse.sshfs me@host:/ims rw,user_id=0
35 30 0:45 / /srv/ims/inner rw,relatime shared:14 - tmpfs tmpfs rw
36 22 0:46 / /srv/ims rw,relatime shared:15 - ext4 /dev/sdb1 rw
37 22 0:47 / /srv/nolock rw,relatime shared:16 - nfs files:/x rw,vers=3,acregmin=0,acregmax=0,acdirmin=0,acdirmax=0,lookupcache=none,nolock,nocto,local_lock=all
38 22 0:41 /storage /data rw,relatime shared:17 - nfs4 files:/export/ims rw,vers=4.2,acregmin=0,acregmax=0,acdirmin=0,acdirmax=0,lookupcache=none,local_lock=none
"""


class TestMounts(unittest.TestCase):
    """Finding the mount of the storage folder in /proc/self/mountinfo, and what IMS warns about it."""

    def mount(self, folder):
        with tempfile.NamedTemporaryFile("w", suffix=".mountinfo", delete=False) as file:
            file.write(MOUNTINFO)
        self.addCleanup(os.unlink, file.name)
        with mock.patch.object(os.path, "realpath", lambda path: path):
            return ims.mount_of(folder, file.name)

    def test_the_deepest_mount_holding_the_folder_is_found_and_a_later_one_on_the_same_point_hides_the_earlier(self):
        self.assertEqual(self.mount("/var/lib/ims").filesystem, "ext4")
        self.assertEqual(self.mount("/srv/fresh/storage").point, "/srv/fresh")
        self.assertEqual((self.mount("/srv/ims/inner/x").point, self.mount("/srv/ims/inner/x").filesystem), ("/srv/ims/inner", "tmpfs"))
        # Mounted again over /srv/ims: the NFS mount under it is hidden.
        self.assertEqual(self.mount("/srv/ims").filesystem, "ext4")
        self.assertEqual(self.mount("/srv/imsother").point, "/")
        self.assertEqual(self.mount("/srv/with space/x").point, "/srv/with space")

    def test_a_bind_mount_knows_where_its_filesystem_is_mounted_whole(self):
        bound = self.mount("/data/x")
        self.assertEqual((bound.point, bound.root, bound.whole_points), ("/data", "/storage", ("/srv/fresh",)))
        self.assertEqual(self.mount("/srv/fresh").whole_points, ("/srv/fresh",))

    def test_nfs_without_actimeo_0_and_lookupcache_none_is_warned_about(self):
        mounts = {mount.point: mount for mount in ims.parse_mountinfo(MOUNTINFO)}
        warnings = ims.mount_warnings(ims.parse_mountinfo(MOUNTINFO)[1])
        self.assertEqual(len(warnings), 1)
        self.assertIn("overwrite or remove another host's newer upload", warnings[0])
        self.assertIn("mount it with actimeo=0,lookupcache=none", warnings[0])
        self.assertEqual(ims.mount_warnings(mounts["/srv/fresh"]), [])
        self.assertEqual(ims.mount_warnings(mounts["/srv/noac"]), [])
        self.assertEqual(ims.mount_warnings(mounts["/data"]), [], "local_lock=none is NFSv4's own")
        noac_alone = ims.Mount("/srv/noac", "nfs", {"noac": ""})
        self.assertIn("lookupcache=none", ims.mount_warnings(noac_alone)[0])

    def test_nfs_with_locks_or_writes_kept_on_one_host_is_warned_about(self):
        mounts = {mount.point: mount for mount in ims.parse_mountinfo(MOUNTINFO)}
        warnings = ims.mount_warnings(mounts["/srv/nolock"])
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("nolock,nocto,local_lock=all", warnings[0])

    def test_local_and_coherent_filesystems_are_not_warned_about_and_unknown_network_ones_are(self):
        mounts = {mount.point: mount for mount in ims.parse_mountinfo(MOUNTINFO)}
        self.assertEqual(ims.mount_warnings(mounts["/"]), [])
        self.assertEqual(ims.mount_warnings(mounts["/srv/ceph"]), [])
        self.assertEqual(ims.mount_warnings(None), [])
        self.assertIn("fuse.sshfs", ims.mount_warnings(mounts["/srv/with space"])[0])
        self.assertFalse(mounts["/"].is_network)
        self.assertTrue(mounts["/srv/with space"].is_network)

    def test_garbage_in_mountinfo_is_skipped_line_by_line(self):
        rng = random.Random(SEED)
        pieces = ["-", "0:1", "/", "/srv", "rw,a=1,,=", "nfs4", "\\\\040", "\\\\777", "", "x" * 300, "\udcff"]
        for _ in range(3000):
            line = " ".join(rng.choice(pieces) for _ in range(rng.randrange(14)))
            for mount in ims.parse_mountinfo(f"{line}\n{MOUNTINFO}\n{line}"):
                self.assertIsInstance(mount.point, str)
        self.assertEqual(len(ims.parse_mountinfo("\n".join([MOUNTINFO, "garbage", "1 2 3 - -"]))), 10)

    def test_listings_asked_during_a_read_of_a_network_folder_share_the_next_read_and_see_what_came_before(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with mock.patch.object(ims, "mount_of", lambda path: ims.Mount(folder, "fuse.glusterfs", {})):
            store = ims.Store(folder)
        store.scan()
        reads = []
        first_read = threading.Event()
        release = threading.Event()
        scandir = os.scandir

        def slow_scandir(path):
            if path == folder:
                reads.append(path)
                if len(reads) == 1:
                    first_read.set()
                    release.wait(DEADLINE_SECONDS)
            return scandir(path)

        answers = []
        with mock.patch.object(ims.os, "scandir", slow_scandir):
            first = threading.Thread(target=store.listing)
            first.start()
            first_read.wait(DEADLINE_SECONDS)
            # Stored while the first read is under way: the listings asked after it must show it.
            with open(os.path.join(folder, "new.png"), "wb") as file:
                file.write(make_image("PNG"))
            crowd = [threading.Thread(target=lambda: answers.append(json.loads(store.listing()))) for _ in range(20)]
            for thread in crowd:
                thread.start()
            wait_for(lambda: len(store._read_done._waiters) == 20)
            release.set()
            for thread in [first, *crowd]:
                thread.join()
        self.assertEqual(answers, [["new.png"]] * 20)
        self.assertEqual(len(reads), 2, "twenty listings asked during one read share the next one")

    def test_a_store_on_a_network_filesystem_lists_what_another_host_added_without_trusting_the_folder_time(self):
        with tempfile.TemporaryDirectory() as folder:
            nfs = ims.Mount(folder, "nfs4", {})
            with mock.patch.object(ims, "mount_of", lambda path: nfs):
                store = ims.Store(folder)
            an_hour_ago = time.time() - 3600
            os.utime(folder, (an_hour_ago, an_hour_ago))
            store.scan()
            listed = store.listing()
            # Another host adds a file, and this host's cached attributes still show the folder's
            # old modification time, as an NFS client's do for up to a minute.
            with open(os.path.join(folder, "new.png"), "wb") as file:
                file.write(make_image("PNG"))
            os.utime(folder, (an_hour_ago, an_hour_ago))
            self.assertEqual((listed, json.loads(store.listing())), (b"[]\n", ["new.png"]))


class TestStaleFiles(unittest.TestCase):
    """Files another host removes between this host's open and its next use (ESTALE on a network filesystem)."""

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.folder = os.path.join(self.tempdir.name, "storage")
        self.store = ims.Store(self.folder)
        with open(os.path.join(self.folder, "a.png"), "wb") as file:
            file.write(make_image("PNG"))

    def queue_job(self):
        record = ims.Job(secrets.token_hex(8), "a.png", 10, 10, "fill").to_record()
        self.store.enqueue(record, max_queue=10, slot_count=1)
        return record

    def stale(self, *arguments, **keywords):
        raise OSError(errno.ESTALE, "Stale file handle")

    def test_a_delete_whose_job_entry_goes_stale_under_its_lock_check_still_deletes(self):
        self.queue_job()
        with mock.patch.object(ims, "is_file_locked", self.stale):
            self.store.remove("a.png")
        self.assertFalse(os.path.exists(os.path.join(self.folder, "a.png")))

    def test_a_job_entry_that_goes_stale_before_its_lock_is_not_claimed_and_stays_queued(self):
        self.queue_job()
        (entry, _), = self.store.queued_records()
        with mock.patch.object(ims, "lock_file", self.stale):
            self.assertIsNone(self.store.claim(entry))
        claim = self.store.claim(entry)
        self.assertIsNotNone(claim, "the job can no longer be run")
        self.store.release(claim)

    def test_a_lock_that_goes_stale_is_let_go_of_quietly_and_its_file_closed(self):
        self.queue_job()
        (entry, _), = self.store.queued_records()
        claim = self.store.claim(entry)
        with mock.patch.object(ims, "unlock_file", self.stale):
            self.store.release(claim)
        with self.assertRaises(OSError):
            os.fstat(claim.descriptor)

    def test_a_record_renamed_into_place_during_a_scan_is_not_an_error(self):
        scandir = os.scandir

        class Renamed:
            name = ".0123456789abcdef-00000000.json"
            path = "/nowhere/" + name

            def stat(self, follow_symlinks=True):
                raise FileNotFoundError(errno.ENOENT, "renamed by its writer")

        @contextlib.contextmanager
        def scandir_with_a_renamed_record(path):
            with scandir(path) as entries:
                yield [*entries, Renamed()] if path == self.store._jobs_folder else list(entries)

        with mock.patch.object(ims.os, "scandir", scandir_with_a_renamed_record):
            self.store.remove_leftovers()

    def test_a_leftover_that_goes_stale_under_a_scan_is_left_to_the_host_that_removed_it(self):
        leftover = os.path.join(self.folder, f"{ims.TEMP_PREFIX}0123456789abcdef.png")
        with open(leftover, "wb") as file:
            file.write(b"half")
        with mock.patch.object(ims, "lock_file", self.stale):
            self.store.remove_leftovers()
        self.store.remove_leftovers()
        self.assertFalse(os.path.exists(leftover))


# ====
# Several hosts: a GlusterFS volume, mounted once per instance as each host would mount it
# ====


def system_tool(name):
    """Return the path of the program `name`, looking in the system folders too, or None."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"]))


# The mount options and volume options the README asks of a GlusterFS volume that IMS serves.
GLUSTERFS_MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0"
GLUSTERFS_VOLUME_OPTIONS = {"performance.stat-prefetch": "off", "performance.quick-read": "off"}


def is_running(command_name):
    """Tell whether a process named `command_name` runs (Linux's /proc)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as file:
                if file.read().strip() == command_name:
                    return True
        except OSError:
            continue
    return False


class GlusterVolume:
    """A GlusterFS volume of one brick in a temporary folder, started; mount() adds a client of it.

    Each mount is a FUSE client of its own, with its own caches, as another host's would be.
    glusterd is started when none runs, and then stopped with the volume.
    """

    def __init__(self):
        self.gluster = system_tool("gluster")
        self.folder = tempfile.mkdtemp(prefix="ims-gluster-")
        self.name = f"ims-test-{os.getpid()}"
        self.mounts = []
        self.mount_numbers = itertools.count(1)
        self.started_glusterd = False
        self.is_created = False

    @staticmethod
    def unavailable():
        """Return why a volume cannot be had here, or None when it can."""
        if not sys.platform.startswith("linux"):
            return "GlusterFS runs on Linux"
        if os.geteuid() != 0:
            return "mounting a GlusterFS volume needs root"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing: FUSE mounts cannot be made here"
        missing = [tool for tool in ("glusterd", "gluster", "mount.glusterfs") if not system_tool(tool)]
        if missing:
            return f"{', '.join(missing)} not installed (Debian: apt-get install glusterfs-server glusterfs-client, as .ci/run does)"
        return None

    def run(self, *arguments, check=True):
        """Run the gluster command line with `arguments`; return its CompletedProcess."""
        result = subprocess.run([self.gluster, "--mode=script", *arguments], capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"gluster {' '.join(arguments)}: {(result.stdout + result.stderr).strip()}")
        return result

    def start(self):
        """Start glusterd if needed, then create and start the volume; raise RuntimeError when it cannot be."""
        if not is_running("glusterd"):
            subprocess.run([system_tool("glusterd")], check=True, timeout=60)
            self.started_glusterd = True
        brick = os.path.join(self.folder, "brick")
        os.mkdir(brick)
        host = socket.gethostname()
        answers = []

        def created():
            answers.append(self.run("volume", "create", self.name, f"{host}:{brick}", "force", check=False))
            return answers[-1].returncode == 0 or "already exists" in answers[-1].stdout + answers[-1].stderr

        # glusterd answers the command line a moment after it starts.
        try:
            wait_for(created, 60)
        except AssertionError:
            pass  # the last answer says why
        if answers[-1].returncode != 0:
            raise RuntimeError(f"gluster volume create: {(answers[-1].stdout + answers[-1].stderr).strip()}")
        self.is_created = True
        for option, value in GLUSTERFS_VOLUME_OPTIONS.items():
            self.run("volume", "set", self.name, option, value)
        self.run("volume", "start", self.name)

    def mount(self, options=GLUSTERFS_MOUNT_OPTIONS):
        """Mount the volume once more, as another host would; return the mount point."""
        point = os.path.join(self.folder, f"host-{next(self.mount_numbers)}")
        os.mkdir(point)
        command = ["mount", "-t", "glusterfs", *(["-o", options] if options else []), f"{socket.gethostname()}:/{self.name}", point]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {(result.stdout + result.stderr).strip()}")
        self.mounts.append(point)
        return point

    def unmount(self, point):
        """Unmount the client at `point` (lazily if it is still in use)."""
        if subprocess.run(["umount", point], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
        self.mounts.remove(point)

    def stop(self):
        """Unmount every client, stop and delete the volume, stop glusterd if it was started here."""
        for point in reversed(self.mounts):
            self.unmount(point)
        if self.is_created:
            self.run("volume", "stop", self.name, "force", check=False)
            self.run("volume", "delete", self.name, check=False)
        if self.started_glusterd:
            subprocess.run(["pkill", "-x", "glusterd"], capture_output=True, timeout=60)
            subprocess.run(["pkill", "-x", "glusterfsd"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


@unittest.skipUnless(NGINX, "nginx is not installed (Debian: apt-get install nginx-light, as .ci/run does)")
class TestGlusterFS(TestNginx):
    """Three instances as on three hosts: each serves the volume through a GlusterFS mount of its own.

    Every test of TestNginx runs here too, through nginx; the tests below go at the hosts directly,
    to catch one host's caches lying about what another did.
    """

    @classmethod
    def setUpClass(cls):
        reason = GlusterVolume.unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        cls.volume = GlusterVolume()
        try:
            cls.volume.start()
            cls.host_mounts = [cls.volume.mount() for _ in range(3)]
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            cls.volume.stop()
            raise unittest.SkipTest(f"a GlusterFS volume cannot be set up here: {error}")

    @classmethod
    def tearDownClass(cls):
        cls.volume.stop()

    def setUp(self):
        if not os.path.isdir("/proc/self"):
            self.skipTest("telling real processes apart needs /proc (Linux)")
        # The test's folder is on the volume, seen through the first host's mount; every path
        # under it names the same file through another host's mount.
        self.tempdir = tempfile.TemporaryDirectory(dir=self.host_mounts[0])
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        self.host, self.port = "127.0.0.1", None
        self.instances = []
        instances = [self.start_instance() for _ in range(3)]
        self.port = self.start_nginx([instance.port for instance in instances])
        self.probes = itertools.count()

    def instance_storage(self, index, mounts=None):
        mounts = mounts or self.host_mounts
        relative = os.path.relpath(self.storage, self.host_mounts[0])
        return os.path.join(mounts[index % len(mounts)], relative)

    def hosts(self):
        """Return a new direct connection to each instance, in the order they were started."""
        return [self.direct(instance) for instance in self.instances]

    def on_every_host_at_once(self, request_for):
        """Send each instance the request request_for(its index) gives, (method, target, body, headers), all at one moment.

        Return the statuses, in the order of the instances.
        """
        statuses = [None] * len(self.instances)
        barrier = threading.Barrier(len(self.instances))

        def send(index):
            method, target, body, headers = request_for(index)
            connection = http.client.HTTPConnection("127.0.0.1", self.instances[index].port, timeout=DEADLINE_SECONDS)
            try:
                connection.connect()
                barrier.wait()
                connection.request(method, target, body, headers)
                statuses[index] = connection.getresponse().status
            finally:
                connection.close()

        threads = [threading.Thread(target=send, args=(index,)) for index in range(len(self.instances))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return statuses

    def test_the_instances_serve_three_mounts_and_find_nothing_to_warn_about(self):
        self.assertEqual(len({ims.mount_of(self.instance_storage(index)).point for index in range(3)}), 3)
        for index, instance in enumerate(self.instances):
            self.assertEqual(ims.mount_of(self.instance_storage(index)).filesystem, "fuse.glusterfs")
            self.assertNotIn("warning", instance.log())

    def test_an_upload_or_a_delete_on_one_host_shows_on_every_host_at_once(self):
        hosts = self.hosts()
        for round_number in range(12):
            name, data = f"r{round_number}.png", make_image("PNG", color=(round_number, 40, 80))
            self.assertEqual(self.upload(name, data, connection=hosts[round_number % 3]).status, 201)
            for host in hosts:
                self.assertIn(name, self.request("GET", "/", connection=host).json)
                self.assertEqual(self.request("GET", f"/{name}", connection=host).body, data)
            self.assertEqual(self.request("DELETE", f"/{name}", connection=hosts[(round_number + 1) % 3]).status, 204)
            for host in hosts:
                self.assertNotIn(name, self.request("GET", "/", connection=host).json)
                self.assertEqual(self.request("GET", f"/{name}", connection=host).status, 404)
                self.assertEqual(self.request("HEAD", f"/{name}", connection=host).status, 404)

    def test_validators_never_vouch_for_bytes_another_host_replaced(self):
        hosts = self.hosts()
        for round_number in range(8):
            name = f"v{round_number}.png"
            old, new = make_image("PNG", (30, 20), color=(1, 2, round_number)), make_image("PNG", (31, 20), color=(9, 9, round_number))
            self.assertEqual(self.upload(name, old, connection=hosts[0]).status, 201)
            seen = self.request("GET", f"/{name}", connection=hosts[2])
            self.assertEqual(seen.body, old)
            etag = seen.headers["ETag"]
            # Deleted on one host and uploaded again, other bytes, on another: the first and the
            # third, which both served the old bytes, must not call them current.
            self.assertEqual(self.request("DELETE", f"/{name}", connection=hosts[1]).status, 204)
            self.assertEqual(self.upload(name, new, connection=hosts[1]).status, 201)
            for host in (hosts[0], hosts[2]):
                reply = self.request("GET", f"/{name}", headers={"If-None-Match": etag}, connection=host)
                self.assertEqual((reply.status, reply.body), (200, new), f"round {round_number}")
                self.assertNotEqual(reply.headers["ETag"], etag)
                reply = self.request("GET", f"/{name}", headers={"Range": "bytes=0-3", "If-Range": etag}, connection=host)
                self.assertEqual((reply.status, reply.body), (200, new), "If-Range with the old ETag must send the whole new file")
                reply = self.request("DELETE", f"/{name}", headers={"If-Match": etag}, connection=host)
                self.assertEqual(reply.status, 412, "If-Match with the old ETag must not delete the new bytes")
        # Replaced by a resize that ran on one host: the others see the new size and a new ETag.
        name = "resized.png"
        self.assertEqual(self.upload(name, make_image("PNG", (40, 40)), connection=hosts[0]).status, 201)
        etag = self.request("GET", f"/{name}", connection=hosts[2]).headers["ETag"]
        location = self.submit(name, "width=10&height=12", connection=hosts[0])
        self.assertEqual(self.wait_job(location)["state"], "done")
        for host in hosts:
            reply = self.request("GET", f"/{name}", headers={"If-None-Match": etag}, connection=host)
            self.assertEqual(reply.status, 200)
            self.assertEqual(decode(reply.body).size, (10, 12))

    def test_racing_uploads_of_one_name_on_three_hosts_store_the_winners_bytes_every_time(self):
        for round_number in range(50):
            name = f"race-{round_number}.png"
            images = [make_image("PNG", (20 + index, 20), color=(round_number, index * 60, 0)) for index in range(3)]
            forms = [multipart_body(files=[("file", name, image)]) for image in images]
            answers = self.on_every_host_at_once(lambda index: ("POST", "/", forms[index][0], {"Content-Type": forms[index][1]}))
            self.assertEqual(sorted(answers), [201, 409, 409], f"round {round_number}")
            winner = images[answers.index(201)]
            for host in self.hosts():
                self.assertEqual(self.request("GET", f"/{name}", connection=host).body, winner, f"round {round_number}")

    def test_a_large_file_from_another_host_is_sent_whole_and_by_range(self):
        data = encode(noise((900, 700), SEED), "PNG")
        self.assertGreater(len(data), 4 * ims.READ_CHUNK_SIZE, "the file must go out with sendfile()")
        hosts = self.hosts()
        self.assertEqual(self.upload("large.png", data, connection=hosts[0]).status, 201)
        for host in hosts[1:]:
            self.assertEqual(self.request("GET", "/large.png", connection=host).body, data)
            reply = self.request("GET", "/large.png", headers={"Range": "bytes=100000-"}, connection=host)
            self.assertEqual((reply.status, reply.body), (206, data[100000:]))

    def test_deletes_of_one_name_on_three_hosts_at_once_remove_it_once(self):
        for round_number in range(15):
            name = f"d{round_number}.png"
            self.assertEqual(self.upload(name, make_image("PNG"), connection=self.direct(self.instances[0])).status, 201)
            answers = self.on_every_host_at_once(lambda index: ("DELETE", f"/{name}", None, {}))
            self.assertEqual(sorted(answers), [204, 404, 404], f"round {round_number}")

    def test_an_instance_killed_during_an_upload_stores_nothing_and_the_name_stays_free(self):
        streaming = self.instances[0]
        data = encode(noise((400, 300), SEED), "PNG")
        body, content_type = multipart_body(files=[("file", "cut.png", data)])
        self.port = streaming.port
        sock = self.open_socket()
        sock.sendall(self.multipart_request_head(content_type, len(body)))
        sock.sendall(body[:len(body) // 2])
        wait_for(self.temp_files)
        self.end_session(streaming.process.pid)
        for host in self.hosts()[1:]:
            self.assertEqual(self.request("GET", "/", connection=host).json, [])
            self.assertEqual(self.request("GET", "/cut.png", connection=host).status, 404)
        self.assertEqual(self.upload("cut.png", data, connection=self.direct(self.instances[1])).status, 201)
        self.assertEqual(self.request("GET", "/cut.png", connection=self.direct(self.instances[2])).body, data)
        # The killed writer's lock goes with it, once its client has told the volume: an instance
        # started again on its host then removes the half-written file it left.
        wait_for(lambda: not any(self.is_locked(name) for name in self.temp_files()))
        self.start_instance()
        wait_for(lambda: not self.temp_files())
        self.assertEqual(folder_files(self.storage), ["cut.png"])

    def start_on_caching_mounts(self, count):
        """Start `count` instances more, each on a mount of its own with GlusterFS's default caches; return them."""
        caching = [self.volume.mount(options="") for _ in range(count)]
        for point in caching:
            self.addCleanup(self.volume.unmount, point)
        self.instances = []
        original = self.instance_storage
        self.instance_storage = lambda index: original(index, caching)
        return [self.start_instance() for _ in range(count)]

    def test_a_mount_that_caches_is_warned_about_at_start(self):
        for instance in self.start_on_caching_mounts(1):
            warning = self.wait_for_log(instance, "warning")
            self.assertIn("attribute-timeout=1, entry-timeout=1", warning)
            self.assertIn("attribute-timeout=0,entry-timeout=0,negative-timeout=0", warning)

    def test_a_volume_whose_clients_cache_is_warned_about_at_start(self):
        translators = os.path.join(self.host_mounts[0], ".meta", "graphs", "active")

        def has_quick_read():
            # None while the client switches to its new translators.
            try:
                return any(name.endswith("-quick-read") for name in os.listdir(translators))
            except OSError:
                return None

        self.volume.run("volume", "set", self.volume.name, "performance.quick-read", "on")
        self.addCleanup(wait_for, lambda: has_quick_read() is False)
        self.addCleanup(self.volume.run, "volume", "set", self.volume.name, "performance.quick-read", "off")
        # The clients load the new translator a moment after the volume's option changes.
        wait_for(has_quick_read)
        self.instances = []
        warning = self.wait_for_log(self.start_instance(), "warning")
        self.assertIn("caches with quick-read", warning)
        self.assertIn("set performance.quick-read off on the volume", warning)

    def test_a_bind_mount_of_a_folder_of_the_volume_is_checked_as_its_whole_mount(self):
        bound = tempfile.mkdtemp(prefix="ims-bound-")
        self.addCleanup(os.rmdir, bound)
        subprocess.run(["mount", "--bind", self.storage, bound], check=True, timeout=60)
        self.addCleanup(subprocess.run, ["umount", "-l", bound], timeout=60)
        self.instances = []
        self.instance_storage = lambda index: bound
        instance = self.start_instance()
        self.assertEqual(self.request("GET", "/", connection=self.direct(instance)).status, 200)
        self.assertNotIn("warning", instance.log())

    def test_on_mounts_that_cache_what_another_host_did_is_never_a_500(self):
        instances = self.start_on_caching_mounts(2)
        hosts = [self.direct(instance) for instance in instances]
        # A host's caches may show it another host's change up to a second late (README), but
        # a file that went under it is looked up again: the answer is never a 500.
        for round_number in range(10):
            name = f"c{round_number}.png"
            self.assertEqual(self.upload(name, make_image("PNG", color=(round_number, 0, 0)), connection=hosts[0]).status, 201)
            self.assertIn(self.request("GET", f"/{name}", connection=hosts[1]).status, (200, 404))
            self.assertEqual(self.request("DELETE", f"/{name}", connection=hosts[0]).status, 204)
            self.assertIn(self.request("GET", f"/{name}", connection=hosts[1]).status, (200, 404))
            self.assertEqual(self.upload(name, make_image("PNG", (9, 9)), connection=hosts[0]).status, 201)
            for _ in range(3):
                self.assertIn(self.request("GET", f"/{name}", connection=hosts[1]).status, (200, 404))
                self.assertEqual(self.request("GET", "/", connection=hosts[1]).status, 200)
        for instance in instances:
            self.assertNotIn("unexpected error", instance.log())

    def is_locked(self, name):
        """Tell whether a process holds the lock of the file `name` in the storage folder."""
        try:
            descriptor = os.open(os.path.join(self.storage, name), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return ims.is_file_locked(descriptor)
        finally:
            os.close(descriptor)


# ====
# The page, in a real browser
# ====
# The page GET / gives browsers, in Debian's headless Chromium driven by selenium (both from
# requirements-dev.txt and .ci/run, never needed to run IMS), against a real `python3 ims.py`:
# every class has a storage folder, a server and a browser of its own. A class skips, saying why,
# where selenium, Chromium or chromedriver cannot be had. A test that fails saves a screenshot of
# the page and names it in its failure (the class's temporary folder, with the server's log, is
# then kept). The classes of content negotiation and of the JSON list's paging need no browser.
# With IMS_SCREENSHOT=<path>, TestPageScreenshot saves the README's picture of the page there.

try:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.common.exceptions import TimeoutException
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as error:  # the browser classes skip, saying so
    SELENIUM_MISSING = f"selenium is not installed ({error}); python3 -m pip install -r requirements-dev.txt"
else:
    SELENIUM_MISSING = None

# What Chromium and Firefox send when they navigate to a page.
CHROMIUM_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,"
    "application/signed-exchange;v=b3;q=0.7"
)
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

# Names a person can give a file in the folder (none of them can come through an upload, which
# makes names safe). Each must show as itself, and reach its own image.
HOSTILE_NAMES = (
    "<img src=x onerror=alert(1)>.jpg",
    "\"'><svg onload=alert(2)>.png",
    "javascript:alert(3).png",
    "&lt;b&gt; & co.png",
    "a, b 2x.png",
    "100% #1?.png",
    "фото ü.png",
)

# Run by Chromium in every document before the page's own script (through the DevTools protocol,
# so the page's policy does not apply to it): it records what the policy blocked, the errors no
# one caught, and every alert() instead of showing it.
PAGE_WATCH_SCRIPT = """
(() => {
  const watch = window.__imsWatch = {violations: [], errors: [], alerts: []};
  document.addEventListener("securitypolicyviolation", (event) => watch.violations.push(
    event.violatedDirective + " blocked " + (event.blockedURI || "inline code") + " at " + event.sourceFile + ":" +
    event.lineNumber + " " + (event.sample || "")));
  window.addEventListener("error", (event) => watch.errors.push(event.message + " at " + event.filename + ":" + event.lineno));
  window.addEventListener("unhandledrejection", (event) => watch.errors.push("unhandled rejection: " + event.reason));
  window.alert = (message) => { watch.alerts.push(String(message)); };
})();
"""


def find_chromium():
    """Return the paths of Chromium and of chromedriver, each None where it is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    for candidate in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"):
        if chromedriver is None and os.access(candidate, os.X_OK):
            chromedriver = candidate
    return chromium, chromedriver


def start_chromium(owner, javascript=True):
    """Return a headless Chromium under chromedriver, quit at the end of the test class `owner`.

    With `javascript` false, the browser runs no script of any page. Raises unittest.SkipTest,
    saying why, where selenium, Chromium or chromedriver is missing, or the browser does not start.
    """
    if SELENIUM_MISSING:
        raise unittest.SkipTest(SELENIUM_MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = find_chromium()
    if chromium is None:
        raise unittest.SkipTest("Chromium is not installed (Debian: apt-get install chromium)")
    if chromedriver is None:
        raise unittest.SkipTest("chromedriver is not installed (Debian: apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium's sandbox cannot start as root, nor in most containers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--no-first-run", "--no-default-browser-check",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    try:
        # The driver is named, so selenium-manager never tries to download one.
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    except WebDriverException as error:
        first_line = (error.msg or repr(error)).strip().splitlines()[0]
        raise unittest.SkipTest(f"Chromium ({chromium}) does not start under {chromedriver}: {first_line}") from None
    owner.addClassCleanup(driver.quit)
    driver.set_page_load_timeout(DEADLINE_SECONDS)
    driver.set_script_timeout(DEADLINE_SECONDS)
    if javascript:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_WATCH_SCRIPT})
    return driver


class ClassScope(unittest.TestCase):
    """Stands for a test in start_ims() when a whole class shares what it starts: its cleanups run
    when the class ends."""

    def __init__(self, owner):
        super().__init__()
        self.addCleanup = owner.addClassCleanup


def css_string(value):
    """Return `value` as a CSS string, for an attribute selector."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_srcset(srcset):
    """Return the (URL, descriptor) candidates of a srcset attribute (HTML's parsing, simplified)."""
    candidates = []
    position = 0
    while True:
        position = re.compile(r"[\s,]*").match(srcset, position).end()
        if position >= len(srcset):
            return candidates
        url = re.compile(r"\S+").match(srcset, position)
        position = url.end()
        url = url.group()
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            descriptors = re.compile(r"[^,]*").match(srcset, position)
            position = descriptors.end()
            descriptor = descriptors.group().strip()
        candidates.append((url, descriptor or "1x"))


def parse_policy(header):
    """Return a Content-Security-Policy header as {directive: [source, ...]}."""
    policy = {}
    for directive in header.split(";"):
        words = directive.split()
        if words:
            policy.setdefault(words[0].lower(), words[1:])
    return policy


def with_screenshot_on_failure(method):
    """Wrap a test of a BrowserTestCase: a failure or error saves a screenshot and says where;
    a test that passes must leave no traceback in the server's log."""

    @functools.wraps(method)
    def test(self):
        log_start = os.path.getsize(self.log_path)
        try:
            method(self)
        except unittest.SkipTest:
            raise
        except Exception as error:
            what = str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"
            raise self.failureException(f"{what}\n{self.save_failure_screenshot()}") from error
        with open(self.log_path, "rb") as log:
            log.seek(log_start)
            logged = log.read().decode("utf-8", "replace")
        self.assertNotIn("Traceback", logged, f"the server logged a traceback during the test:\n{logged[-3000:]}")

    return test


class BrowserTestCase(unittest.TestCase):
    """A real `python3 ims.py` on a storage folder of the class's own, and a headless Chromium.

    `images` ({name: bytes}) are placed in the folder before the server starts. Every test starts
    on a blank page with no dialog open and the browser's log read.
    """

    server_arguments = ()
    images = {}
    javascript = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("test") and callable(value):
                setattr(cls, name, with_screenshot_on_failure(value))

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.keep_tempdir = False
        cls.tempdir = tempfile.mkdtemp(prefix="ims-browser-")
        cls.addClassCleanup(cls.remove_tempdir)
        cls.storage = os.path.join(cls.tempdir, "storage")
        os.mkdir(cls.storage)
        for name, data in cls.images.items():
            cls.put_file(name, data)
        cls.driver = start_chromium(cls, cls.javascript)
        cls.log_path = os.path.join(cls.tempdir, "ims.log")
        log = open(cls.log_path, "wb")
        cls.addClassCleanup(log.close)
        cls.process, cls.port = start_ims(ClassScope(cls), "--storage", cls.storage, *cls.server_arguments, log=log)
        cls.origin = f"http://127.0.0.1:{cls.port}"

    @classmethod
    def remove_tempdir(cls):
        if not cls.keep_tempdir:
            shutil.rmtree(cls.tempdir, ignore_errors=True)

    def setUp(self):
        self.dismiss_dialog()
        self.driver.get("about:blank")
        self.driver.get_log("browser")

    def save_failure_screenshot(self):
        """Save a screenshot of the page as it is; return a sentence that says where."""
        type(self).keep_tempdir = True
        folder = os.path.join(self.tempdir, "screenshots")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{type(self).__name__}.{self._testMethodName}.png")
        dialog = self.dismiss_dialog()
        said = f" A dialog was open, saying {dialog!r}." if dialog is not None else ""
        try:
            self.driver.save_screenshot(path)
        except WebDriverException as error:
            return f"No screenshot could be taken ({error.msg}).{said} The server's log: {self.log_path}"
        return f"Screenshot of the page: {path}.{said} The server's log: {self.log_path}"

    @contextlib.contextmanager
    def about(self, what):
        """Name `what` in a failure within (a subTest() would keep its failures from the screenshot)."""
        try:
            yield
        except AssertionError as error:
            raise self.failureException(f"{what!r}: {error}") from error

    def dismiss_dialog(self):
        """Dismiss an open alert or confirm; return its text, or None when none is open."""
        try:
            alert = self.driver.switch_to.alert
            text = alert.text
            alert.dismiss()
            return text
        except NoAlertPresentException:
            return None

    # The server, directly

    def request(self, method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2 * DEADLINE_SECONDS)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()

    def upload(self, name, data):
        body, content_type = multipart_body(files=[("file", name, data)])
        return self.request("POST", "/", body, {"Content-Type": content_type})

    @classmethod
    def put_file(cls, name, data):
        """Place a file in the storage folder by hand."""
        with open(os.path.join(cls.storage, name), "wb") as file:
            file.write(data)

    def stored(self):
        return folder_files(self.storage)

    def local_file(self, name, data):
        """Write `data` to a file `name` outside the storage folder, for the browser to upload; return its path."""
        folder = os.path.join(self.tempdir, "chosen", self._testMethodName)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "wb") as file:
            file.write(data)
        return path

    def log_has(self, words, after=None):
        """Tell whether the server's log holds `words` (after the first `after`)."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            logged = log.read()
        if after is not None:
            if after not in logged:
                return False
            logged = logged[logged.index(after):]
        return words in logged

    # The page

    def open_page(self, path="/"):
        self.driver.get(self.origin + path)
        self.assertIn("IMS", self.find("h1").text)

    def js(self, script, *arguments):
        return self.driver.execute_script(script, *arguments)

    def find(self, selector, within=None):
        return (within or self.driver).find_element(By.CSS_SELECTOR, selector)

    def find_all(self, selector, within=None):
        return (within or self.driver).find_elements(By.CSS_SELECTOR, selector)

    def tile(self, name):
        """Return the tile of `name` in the grid, or None."""
        tiles = self.find_all(f"#grid li.tile[data-name={css_string(name)}]")
        return tiles[0] if tiles else None

    def tile_names(self):
        return self.js("return Array.from(document.querySelectorAll('#grid li.tile'), (tile) => tile.dataset.name)")

    def tile_state(self, name):
        """Return what the tile of `name` shows, or None when there is no such tile."""
        return self.js("""
            const tile = Array.from(document.querySelectorAll("#grid li.tile")).find((tile) => tile.dataset.name === arguments[0]);
            if (!tile) return null;
            const text = (selector) => { const found = tile.querySelector(selector); return found && found.textContent; };
            const image = tile.querySelector("img.thumb");
            return {name: text(".name"), facts: text(".facts"), status: text(".status"),
                    src: image && image.getAttribute("src"), complete: image && image.complete,
                    naturalWidth: image && image.naturalWidth, naturalHeight: image && image.naturalHeight};
        """, name)

    def wait_until(self, condition, what, state=None, timeout=DEADLINE_SECONDS):
        """Return the first true value of condition(); fail after `timeout` s naming `what` and, if given, state()."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(lambda driver: condition())
        except TimeoutException:
            now = f"; it shows {state()!r}" if state is not None else ""
            self.fail(f"{what}: not so within {timeout} s{now}")

    def wait_for_tile(self, name):
        return self.wait_until(lambda: self.tile(name), f"the tile of {name!r} is in #grid", self.tile_names)

    def assertThumbnailsDecode(self, names=None):
        """Every img.thumb (of the tiles of `names`) loads and decodes, each scrolled into view, as they load lazily."""
        if names is None:
            images = self.find_all("#grid li.tile img.thumb")
        else:
            images = [self.find("img.thumb", self.wait_for_tile(name)) for name in names]
        self.assertTrue(images, "no thumbnails")
        for image in images:
            source = image.get_attribute("src")
            self.js("arguments[0].scrollIntoView({block: 'center'})", image)
            self.wait_until(lambda image=image: self.js("return arguments[0].complete", image), f"the thumbnail {source} loads")
            self.assertGreater(self.js("return arguments[0].naturalWidth", image), 0, f"the thumbnail {source} does not decode")
        self.js("window.scrollTo(0, 0)")

    def watched(self):
        """Return what PAGE_WATCH_SCRIPT recorded in this document."""
        return self.js("return window.__imsWatch || null")

    def assertNothingBlockedOrThrown(self, allow_failed_requests=False):
        """No policy violation, uncaught error or alert in the document, and nothing SEVERE in the
        browser's console since it was last read (with `allow_failed_requests`, but for answers
        of 4xx and 5xx: the console reports every one, those the test asks for too)."""
        watched = self.watched()
        self.assertIsNotNone(watched, "the watch script did not run")
        severe = [entry for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"
                  and not (allow_failed_requests and entry["source"] == "network")]
        self.assertEqual(severe, [], "the console has errors")
        self.assertEqual(watched, {"violations": [], "errors": [], "alerts": []})

    # Uploads and the tiles' forms

    def choose_files(self, *paths):
        self.find("#file-input").send_keys("\n".join(paths))

    def upload_state(self, name):
        """Return what the entry of `name` in #uploads shows, or None when there is none."""
        return self.js("""
            const item = Array.from(document.querySelectorAll("#uploads li.upload")).find((item) => item.dataset.name === arguments[0]);
            if (!item) return null;
            const bar = item.querySelector("progress"), message = item.querySelector(".message");
            const fileName = item.querySelector(".file-name");
            return {error: item.classList.contains("error"), progress: bar && bar.value, max: bar && bar.max,
                    message: message && message.textContent, role: message && message.getAttribute("role"),
                    fileName: fileName && fileName.textContent};
        """, name)

    def wait_for_upload_end(self, name):
        """Return the state of the upload of `name` once it says "Uploaded" or has failed."""
        def ended():
            state = self.upload_state(name)
            return state if state and (state["error"] or "Uploaded" in (state["message"] or "")) else None
        return self.wait_until(ended, f"the upload of {name!r} ends", lambda: self.upload_state(name))

    def assertUploaded(self, name, stored_name=None):
        state = self.wait_for_upload_end(name)
        self.assertFalse(state["error"], state)
        self.assertEqual(state["message"].strip(), "Uploaded", state)
        self.assertEqual((state["progress"], state["role"], state["fileName"]), (100, "status", name), state)
        self.wait_for_tile(stored_name or name)

    def assertUploadFails(self, name, message):
        """The upload of `name` ends marked as an error, showing `message`, the server's own words."""
        state = self.wait_for_upload_end(name)
        self.assertTrue(state["error"], f"the upload of {name!r} is not marked as failed: {state}")
        self.assertIn(message, state["message"])
        self.assertEqual(state["role"], "status")

    def resize_on_page(self, name, width, height, fit):
        tile = self.wait_for_tile(name)
        form = self.find("form.resize", tile)
        for field, value in (("width", width), ("height", height)):
            box = self.find(f"input[name={field}]", form)
            box.clear()
            box.send_keys(str(value))
        # By the option's value, which is its text when it has no value attribute.
        [option] = [option for option in Select(self.find("select[name=fit]", form)).options if option.get_attribute("value") == fit]
        option.click()
        self.find("button[type=submit], button:not([type]), input[type=submit]", form).click()

    def wait_for_status(self, name, words):
        """Return the tile of `name`'s state once its .status holds `words`."""
        def shown():
            state = self.tile_state(name)
            return state if state and words in (state["status"] or "") else None
        return self.wait_until(shown, f"the tile of {name!r} says {words!r}", lambda: self.tile_state(name))

    def click_delete(self, name):
        """Click the tile's delete button; return the confirm dialog it opens."""
        self.find("button.delete", self.wait_for_tile(name)).click()
        return self.wait_until(lambda: expected_conditions.alert_is_present()(self.driver), f"deleting {name!r} asks first")


def sample_images():
    """Return {name: bytes} of a few small images of every kind a tile shows."""
    return {
        "a.png": make_image("PNG", (64, 48)),
        "b.gif": make_image("GIF", (50, 50), color=(30, 160, 40)),
        "c.webp": make_image("WEBP", (80, 60), color=(240, 200, 0)),
        "d.jpg": make_image("JPEG", (64, 48), orientation=6),
        "e.bmp": make_image("BMP", (30, 20)),
        "f.tiff": make_image("TIFF", (40, 40), color=(90, 0, 120)),
    }


def readme_photo():
    with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as file:
        return file.read()


class TestPageInBrowser(BrowserTestCase):
    images = dict(sample_images(), **{"IMG_X.jpeg": readme_photo()})

    # The upright size each tile shows: d.jpg and IMG_X.jpeg are turned by their EXIF orientation.
    upright = {"a.png": (64, 48), "b.gif": (50, 50), "c.webp": (80, 60), "d.jpg": (48, 64),
               "e.bmp": (30, 20), "f.tiff": (40, 40), "IMG_X.jpeg": (1200, 1600)}

    def test_the_page_loads_without_console_errors_or_policy_violations(self):
        self.open_page()
        self.assertThumbnailsDecode()
        self.assertEqual(self.js("return document.readyState"), "complete")
        self.assertNothingBlockedOrThrown()
        self.assertEqual(self.js("return Array.from(document.querySelectorAll('img.thumb')).filter((image) => !(image.naturalWidth > 0)).length"), 0)

    def test_every_thumbnail_is_a_lazy_rendition_with_a_2x_candidate_and_decodes(self):
        self.open_page()
        self.assertThumbnailsDecode()
        for name in sorted(self.images):
            with self.about(name):
                image = self.find("a.open img.thumb", self.tile(name))
                self.assertEqual(image.get_attribute("loading"), "lazy")
                self.assertEqual(image.get_attribute("alt"), name)
                source = urllib.parse.urlsplit(image.get_attribute("src"))
                self.assertEqual(urllib.parse.unquote(source.path), "/" + name)
                query = urllib.parse.parse_qs(source.query)
                self.assertEqual({key: query[key] for key in ("width", "height", "fit", "format")},
                                 {"width": ["240"], "height": ["240"], "fit": ["contain"], "format": ["webp"]})
                self.assertTrue(query.get("v"), f"no version in {source}")
                candidates = {descriptor: url for url, descriptor in parse_srcset(image.get_attribute("srcset"))}
                self.assertIn("2x", candidates, image.get_attribute("srcset"))
                reply = self.request("GET", candidates["2x"])
                self.assertEqual((reply.status, reply.headers["Content-Type"]), (200, "image/webp"))
                self.assertEqual(max(decode(reply.body).size), 480)

    def test_a_tile_per_image_sorted_with_its_name_size_link_and_controls(self):
        self.open_page()
        self.assertEqual(self.tile_names(), sorted(self.images))
        for name in sorted(self.images):
            with self.about(name):
                tile = self.tile(name)
                self.assertEqual(self.find(".name", tile).text, name)
                self.assertIn("{}×{}".format(*self.upright[name]), self.find(".facts", tile).text)
                self.assertRegex(self.find(".facts", tile).text, r"\d\s*(bytes|B|KB|kB|KiB|MB|MiB)\b")
                link = self.find("a.open", tile).get_attribute("href")
                self.assertEqual(urllib.parse.unquote(urllib.parse.urlsplit(link).path), "/" + name)
                self.assertEqual(self.request("GET", urllib.parse.urlsplit(link).path).body, self.images[name])
                self.find("button.delete", tile)
                form = self.find("form.resize", tile)
                self.find("input[name=width]", form)
                self.find("input[name=height]", form)
                fits = [option.get_attribute("value") for option in Select(self.find("select[name=fit]", form)).options]
                self.assertEqual(sorted(fits), ["contain", "cover", "fill"])
                self.find("button[type=submit], button:not([type]), input[type=submit]", form)
                self.assertEqual(self.find(".status", tile).get_attribute("role"), "status")
        upload = self.find("form#upload-form")
        self.assertEqual((upload.get_attribute("method"), upload.get_attribute("enctype")), ("post", "multipart/form-data"))
        self.assertEqual(urllib.parse.urlsplit(upload.get_attribute("action")).path, "/")
        field = self.find("#file-input")
        self.assertEqual((field.get_attribute("type"), field.get_attribute("name")), ("file", "file"))
        self.assertIsNotNone(field.get_attribute("multiple"))
        self.find("#drop-zone")
        self.find("ul#uploads")

    def test_a_click_on_a_thumbnail_opens_the_original(self):
        self.open_page()
        self.find("a.open", self.tile("IMG_X.jpeg")).click()
        self.wait_until(lambda: self.driver.current_url == self.origin + "/IMG_X.jpeg", "the original opens",
                        lambda: self.driver.current_url)
        self.assertEqual(self.js("return document.contentType"), "image/jpeg")
        self.driver.back()
        self.wait_for_tile("IMG_X.jpeg")

    def test_everything_comes_from_the_server_under_a_strict_policy(self):
        reply = self.request("GET", "/", headers={"Accept": CHROMIUM_ACCEPT})
        policy = parse_policy(reply.headers["Content-Security-Policy"] or "")
        self.assertIn(policy.get("default-src"), (["'none'"], ["'self'"]), policy)
        for kind in ("script", "style"):
            sources = policy.get(f"{kind}-src", policy["default-src"])
            self.assertTrue(all(source in ("'self'", "'none'") or re.fullmatch(r"'(sha256|sha384|sha512|nonce)-[^']+'", source)
                                for source in sources), f"{kind}-src allows more than the page's own: {sources}")
            for directive in (f"{kind}-src-elem", f"{kind}-src-attr"):
                self.assertFalse(set(policy.get(directive, ())) & {"'unsafe-inline'", "'unsafe-hashes'", "*"}, policy)
        self.assertNotIn("'unsafe-eval'", policy.get("script-src", ()))
        self.open_page()
        self.assertThumbnailsDecode()
        fetched = self.js("return performance.getEntriesByType('resource').map((entry) => entry.name)")
        self.assertTrue(fetched, "no resources fetched")
        for url in fetched:
            self.assertTrue(url.startswith((self.origin + "/", "data:")), f"fetched from elsewhere: {url}")
        handlers = self.js("""return Array.from(document.querySelectorAll("*")).flatMap((element) =>
            Array.from(element.attributes).filter((attribute) => /^on/i.test(attribute.name)).map((attribute) => element.tagName + " " + attribute.name))""")
        self.assertEqual(handlers, [], "inline event handlers")
        external = self.js("""return Array.from(document.querySelectorAll("[src], [href], [action], link, script")).map((element) =>
            element.src || element.href || element.action || "").filter((url) => url && !url.startsWith(location.origin + "/") && !url.startsWith("data:"))""")
        self.assertEqual(external, [])
        self.assertNothingBlockedOrThrown()

    def test_every_control_is_labelled_and_every_image_described(self):
        self.open_page()
        unnamed = self.js("""
            return Array.from(document.querySelectorAll("input, select, button, textarea, progress")).filter((control) =>
                !(control.labels && control.labels.length && Array.from(control.labels).some((label) => label.textContent.trim()))
                && !control.getAttribute("aria-label") && !control.getAttribute("aria-labelledby")
                && !(control.tagName === "BUTTON" && control.textContent.trim()) && !control.title)
              .map((control) => control.outerHTML);
        """)
        self.assertEqual(unnamed, [], "controls without an accessible name")
        self.assertEqual(self.js("return document.querySelectorAll('img:not([alt])').length"), 0)
        self.assertEqual(self.js("return document.documentElement.lang ? 1 : 0"), 1, "no lang on <html>")

    def test_a_phone_width_screen_scrolls_only_down_and_gets_the_2x_thumbnails(self):
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": True})
        self.addCleanup(self.driver.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})
        self.open_page()
        self.assertThumbnailsDecode()
        self.assertLessEqual(self.js("return document.documentElement.scrollWidth"),
                             self.js("return document.documentElement.clientWidth"), "the page is wider than the phone")
        for source in self.js("return Array.from(document.querySelectorAll('img.thumb'), (image) => image.currentSrc)"):
            self.assertEqual(urllib.parse.parse_qs(urllib.parse.urlsplit(source).query)["width"], ["480"], source)
        self.assertNothingBlockedOrThrown()


class TestPageUploads(BrowserTestCase):
    images = {"taken.png": make_image("PNG", (20, 20))}

    def test_three_files_chosen_in_the_file_input_reach_100_and_join_the_grid(self):
        files = {"up-1.jpg": make_image("JPEG", (120, 90)), "up-2.png": make_image("PNG", (64, 48)),
                 "up-3.gif": make_image("GIF", (50, 40))}
        self.open_page()
        self.js("window.__imsSameDocument = true")
        self.choose_files(*(self.local_file(name, data) for name, data in files.items()))
        for name in files:
            self.assertUploaded(name)
        self.assertTrue(self.js("return window.__imsSameDocument === true"), "the page was reloaded")
        for name, data in files.items():
            self.assertEqual(self.request("GET", "/" + name).body, data)
        for name, size in (("up-1.jpg", "120×90"), ("up-2.png", "64×48"), ("up-3.gif", "50×40")):
            self.assertIn(size, self.tile_state(name)["facts"])
        self.assertEqual(self.tile_names(), self.stored(), "the grid is not the folder, sorted")
        self.assertThumbnailsDecode(list(files))
        self.assertNothingBlockedOrThrown()

    def test_a_duplicate_shows_the_409_message_next_to_that_file_only(self):
        expected = self.upload("taken.png", make_image("PNG", (30, 30)))
        self.assertError(expected, 409)
        self.open_page()
        self.choose_files(self.local_file("taken.png", make_image("PNG", (30, 30))),
                          self.local_file("fresh.png", make_image("PNG", (30, 30))))
        self.assertUploadFails("taken.png", expected.message)
        self.assertUploaded("fresh.png")
        self.assertEqual(decode(self.request("GET", "/taken.png").body).size, (20, 20))
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)

    def test_a_file_that_is_no_image_shows_the_415_message(self):
        expected = self.upload("notes.png", b"these are notes, not a picture")
        self.assertError(expected, 415)
        self.open_page()
        self.choose_files(self.local_file("notes.png", b"these are notes, not a picture"))
        self.assertUploadFails("notes.png", expected.message)
        self.assertNotIn("notes.png", self.stored())
        self.assertIsNone(self.tile("notes.png"))
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)

    def test_files_dropped_on_the_drop_zone_are_uploaded(self):
        files = {"dropped-1.png": make_image("PNG", (33, 22)), "dropped-2.jpg": make_image("JPEG", (44, 33))}
        self.open_page()
        self.js("""
            const [names, contents, zone] = arguments;
            const transfer = new DataTransfer();
            names.forEach((name, index) => transfer.items.add(
                new File([Uint8Array.from(atob(contents[index]), (c) => c.charCodeAt(0))], name)));
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
            }
        """, list(files), [base64.b64encode(data).decode() for data in files.values()], self.find("#drop-zone"))
        for name in files:
            self.assertUploaded(name)
        for name, data in files.items():
            self.assertEqual(self.request("GET", "/" + name).body, data)
        self.assertThumbnailsDecode(list(files))
        self.assertNothingBlockedOrThrown()

    def test_a_name_made_safe_joins_the_grid_under_its_stored_name(self):
        self.open_page()
        self.choose_files(self.local_file("my holiday.png", make_image("PNG", (24, 24))))
        self.assertUploaded("my holiday.png", stored_name="my_holiday.png")
        self.assertIn("my_holiday.png", self.stored())
        self.assertThumbnailsDecode(["my_holiday.png"])
        self.assertNothingBlockedOrThrown()

    def assertError(self, reply, status):
        self.assertEqual(reply.status, status, reply.body)
        self.assertTrue(reply.message)


class TestPageUploadLimit(BrowserTestCase):
    server_arguments = ("--max-upload", "20000")

    def test_a_file_past_the_limit_shows_the_413_message(self):
        big = encode(noise((120, 120)), "PNG")
        self.assertGreater(len(big), 20000)
        self.open_page()
        self.choose_files(self.local_file("big.png", big), self.local_file("small.png", make_image("PNG", (10, 10))))
        self.assertUploadFails("big.png", "20000")
        self.assertUploaded("small.png")
        self.assertEqual(self.stored(), ["small.png"])
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)


class TestPageDeleteAndResize(BrowserTestCase):
    server_arguments = ("--resize-workers", "1")
    images = {
        **{name: make_image("PNG", (64, 64)) for name in ("delete-me.png", "keep-me.png", "gone.png", "offline.png",
                                                          "fill.png", "refused.png", "race.png", "race-other.png")},
        "contain.png": make_image("PNG", (64, 48)),
        "slow.png": SLOW_SOURCE,
    }

    def test_delete_asks_and_once_accepted_removes_the_tile_and_the_file(self):
        self.open_page()
        self.click_delete("delete-me.png").accept()
        self.wait_until(lambda: self.tile("delete-me.png") is None, "the tile goes", self.tile_names)
        self.wait_until(lambda: "delete-me.png" not in self.stored(), "the file goes", self.stored)
        self.assertIsNotNone(self.tile("keep-me.png"))
        self.assertNothingBlockedOrThrown()

    def test_delete_dismissed_keeps_the_tile_and_the_file(self):
        self.open_page()
        self.click_delete("keep-me.png").dismiss()
        self.assertEqual(self.request("GET", "/keep-me.png").status, 200)
        self.assertIsNotNone(self.tile("keep-me.png"))
        self.assertEqual(self.js("return document.querySelector('#grid li.tile[data-name=\"keep-me.png\"] .status').textContent"), "")

    def test_delete_of_a_file_already_gone_removes_the_tile_or_says_so(self):
        self.open_page()
        self.wait_for_tile("gone.png")
        os.remove(os.path.join(self.storage, "gone.png"))
        expected = self.request("DELETE", "/gone.png")
        self.assertEqual(expected.status, 404)
        self.click_delete("gone.png").accept()
        self.wait_until(lambda: self.tile("gone.png") is None or expected.message in (self.tile_state("gone.png")["status"] or ""),
                        "the tile goes, or shows the 404's message", lambda: self.tile_state("gone.png"))
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)

    def test_a_delete_that_cannot_reach_the_server_says_so_in_the_tile(self):
        self.open_page()
        self.wait_for_tile("offline.png")
        self.block_requests_to("/offline.png")
        self.click_delete("offline.png").accept()

        def ended():
            state = self.tile_state("offline.png")
            if state is None:
                return "gone"
            return state if (state["status"] or "").strip() else None

        state = self.wait_until(ended, "the tile says the delete failed",
                                lambda: {"tile": self.tile_state("offline.png"), "uncaught": self.watched()["errors"]})
        self.assertNotEqual(state, "gone", "the tile went, but the image was not deleted")
        self.assertIn("offline.png", self.stored())
        self.assertEqual(self.watched()["errors"], [])

    def test_a_resize_shows_its_end_and_the_new_size(self):
        self.open_page()
        self.assertThumbnailsDecode(["fill.png"])
        before = self.tile_state("fill.png")
        self.resize_on_page("fill.png", 40, 30, "fill")
        state = self.wait_for_status("fill.png", "Resized to 40×30")
        self.assertTrue(self.log_has("?wait=", after='"PATCH /fill.png'), "the page did not follow the job with ?wait=")
        self.assertIn("40×30", state["facts"])
        self.assertNotEqual(state["src"], before["src"], "the thumbnail is the old one")
        self.assertThumbnailsDecode(["fill.png"])
        state = self.tile_state("fill.png")
        self.assertEqual(state["naturalWidth"] * 3, state["naturalHeight"] * 4, f"the thumbnail is not the new 4:3 picture: {state}")
        self.assertEqual(decode(self.request("GET", "/fill.png").body).size, (40, 30))
        self.assertNothingBlockedOrThrown()

    def test_a_contain_resize_shows_the_size_it_made(self):
        self.open_page()
        self.resize_on_page("contain.png", 32, 32, "contain")
        state = self.wait_for_status("contain.png", "Resized to 32×24")
        self.assertIn("32×24", state["facts"])
        self.assertEqual(decode(self.request("GET", "/contain.png").body).size, (32, 24))

    def test_a_refused_resize_shows_the_servers_message(self):
        expected = self.request("PATCH", "/refused.png", json.dumps({"width": 100000, "height": 100000, "fit": "fill"}).encode(),
                                {"Content-Type": "application/json"})
        self.assertEqual(expected.status, 400)
        self.open_page()
        self.resize_on_page("refused.png", 100000, 100000, "fill")
        self.wait_for_status("refused.png", expected.message)
        self.assertEqual(decode(self.request("GET", "/refused.png").body).size, (64, 64))
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)

    def test_a_resize_shows_its_end_also_when_the_grid_changed_while_it_waited(self):
        self.open_page()
        self.assertThumbnailsDecode()
        # The one resize worker is held by a job that cannot end, so the page's job waits in the queue.
        before = set(session_processes(self.process.pid))
        held = self.request("PATCH", "/slow.png?" + SLOW_FOREVER)
        self.assertEqual(held.status, 202, held.body)
        pid = self.wait_until(lambda: next(iter(set(session_processes(self.process.pid)) - before), None),
                              "the held job's process starts")
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.request, "DELETE", "/slow.png")
        self.resize_on_page("race.png", 40, 30, "fill")
        self.wait_until(lambda: self.log_has('"PATCH /race.png'), "the page's resize is accepted")
        # Meanwhile the grid changes: a delete on the page.
        self.click_delete("race-other.png").accept()
        self.wait_until(lambda: self.tile("race-other.png") is None and "race-other.png" not in self.stored(),
                        "race-other.png is deleted", self.tile_names)
        # Give a page that reads the grid again after a delete the time to do it before the job ends
        # (this page does); one that does not is not waited for.
        with contextlib.suppress(TimeoutException):
            WebDriverWait(self.driver, 5, poll_frequency=0.05).until(
                lambda driver: self.log_has("GET / HTTP", after='"DELETE /race-other.png'))
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        state = self.wait_for_status("race.png", "Resized to 40×30")
        self.assertIn("40×30", state["facts"])

    def block_requests_to(self, path):
        """Make Chromium fail every request to exactly `path` (no query) as if the server could not be reached."""
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": [self.origin + path]})
        self.addCleanup(self.driver.execute_cdp_cmd, "Network.setBlockedURLs", {"urls": []})


class TestPageResizeFailure(BrowserTestCase):
    # Placed by hand, truncated: its header says 64×48, its pixels are not there (uploads are
    # checked, files in the folder are not). Its thumbnail cannot be rendered either.
    images = {"broken.png": make_image("PNG", (64, 48))[:60]}

    def test_a_resize_whose_job_fails_shows_the_jobs_error(self):
        self.open_page()
        self.resize_on_page("broken.png", 10, 10, "fill")
        jobs = os.path.join(self.storage, ims.STATE_FOLDER, "jobs")

        def failed_job():
            for entry in os.listdir(jobs) if os.path.isdir(jobs) else ():
                try:
                    with open(os.path.join(jobs, entry), encoding="utf-8") as file:
                        record = json.load(file)
                except (OSError, ValueError):
                    continue
                if record.get("image") == "broken.png" and record.get("state") == "failed":
                    return record
            return None

        record = self.wait_until(failed_job, "the job of broken.png fails")
        self.assertTrue(record["error"])
        self.wait_for_status("broken.png", record["error"])


class TestPageHostileNames(BrowserTestCase):
    # Two more, for the test that resizes and deletes on the page.
    RESIZED = "<b onmouseover=alert(4)>resize me.jpg"
    DELETED = "<i>delete me, 'x' 1x.png"
    images = {name: make_image("PNG" if name.endswith(".png") else "JPEG", (40, 30))
              for name in (*HOSTILE_NAMES, RESIZED, DELETED, "plain.png")}

    def assertNamesAreText(self):
        self.assertEqual(self.tile_names(), self.stored())
        for name in self.stored():
            self.assertEqual(self.tile_state(name)["name"], name)
        self.assertEqual(self.js("return document.querySelectorAll('img[src=x], img[src=\"x\"], svg[onload]').length"), 0)
        self.assertEqual(self.js("return Array.from(document.querySelectorAll('*')).filter((element) =>"
                                 " Array.from(element.attributes).some((attribute) => /^on/i.test(attribute.name))).length"), 0)
        self.dismiss_dialog_or_fail()
        self.assertEqual(self.watched()["alerts"], [])
        self.assertEqual(self.watched()["violations"], [])

    def dismiss_dialog_or_fail(self):
        dialog = self.dismiss_dialog()
        self.assertIsNone(dialog, f"a dialog opened, saying {dialog!r}")

    def test_names_render_as_text_and_run_nothing(self):
        self.open_page()
        self.assertThumbnailsDecode()
        self.assertNamesAreText()
        self.assertNothingBlockedOrThrown()

    def test_each_link_and_thumbnail_reaches_its_own_image(self):
        self.open_page()
        for name in HOSTILE_NAMES:
            with self.about(name):
                tile = self.tile(name)
                href = self.find("a.open", tile).get_attribute("href")
                self.assertTrue(href.startswith(self.origin + "/"), href)
                path = urllib.parse.urlsplit(href).path
                self.assertEqual(urllib.parse.unquote(path), "/" + name)
                with open(os.path.join(self.storage, name), "rb") as file:
                    self.assertEqual(self.request("GET", path).body, file.read())
                self.assertEqual(self.find("img.thumb", tile).get_attribute("alt"), name)
        self.assertThumbnailsDecode()
        self.find("a.open", self.tile(HOSTILE_NAMES[0])).click()
        self.wait_until(lambda: self.js("return document.contentType") == "image/jpeg", "the original opens",
                        lambda: self.driver.current_url)
        self.dismiss_dialog_or_fail()

    def test_an_upload_a_resize_and_a_delete_on_the_page_keep_the_names_text(self):
        self.open_page()
        self.choose_files(self.local_file("new.png", make_image("PNG", (16, 16))))
        self.assertUploaded("new.png")
        self.assertNamesAreText()
        self.resize_on_page(self.RESIZED, 20, 15, "fill")
        self.wait_for_status(self.RESIZED, "Resized to 20×15")
        self.assertNamesAreText()
        self.click_delete(self.DELETED).accept()
        self.wait_until(lambda: self.DELETED not in self.stored(), "the file is deleted", self.stored)
        self.wait_until(lambda: self.tile(self.DELETED) is None, "its tile goes", self.tile_names)
        self.assertEqual(self.stored(), sorted(set(self.images) - {self.DELETED} | {"new.png"}))
        self.assertNamesAreText()
        self.assertNothingBlockedOrThrown()


class TestPageWithoutJavaScript(BrowserTestCase):
    javascript = False
    images = dict(sample_images(), **{HOSTILE_NAMES[0]: make_image("JPEG", (40, 30))})

    def test_scripts_do_not_run_in_this_browser(self):
        self.driver.get("data:text/html,<p id=p>off</p><script>document.getElementById('p').textContent='on'</script>")
        self.assertEqual(self.find("#p").text, "off")

    def test_the_tiles_links_and_thumbnails_are_in_the_servers_html(self):
        self.open_page()
        self.assertEqual(self.tile_names(), sorted(self.images))
        for name in sorted(self.images):
            with self.about(name):
                tile = self.tile(name)
                self.assertEqual(self.find(".name", tile).text, name)
                self.assertRegex(self.find(".facts", tile).text, r"\d+×\d+")
                path = urllib.parse.urlsplit(self.find("a.open", tile).get_attribute("href")).path
                self.assertEqual(self.request("GET", path).body, self.images[name])
        self.assertThumbnailsDecode()
        self.assertEqual(self.find_all("img[src=x]"), [])

    def test_the_next_page_link_works(self):
        self.open_page("/?limit=4")
        names = sorted(self.images)
        self.assertEqual(self.tile_names(), names[:4])
        self.find("nav.pages a[rel=next]").click()
        self.wait_until(lambda: self.tile_names() == names[4:], "the next page shows the rest", self.tile_names)
        self.assertEqual(self.find_all("nav.pages a[rel=next]"), [])


class TestPagePaging(BrowserTestCase):
    images = {f"p{index:03}.png": make_image("PNG", (8, 6)) for index in range(105)}

    def test_a_folder_of_105_images_shows_100_and_a_next_page_with_the_rest(self):
        names = sorted(self.images)
        self.open_page()
        self.assertEqual(self.tile_names(), names[:100])
        self.assertThumbnailsDecode(names[:3])
        self.assertNothingBlockedOrThrown()
        self.find("nav.pages a[rel=next]").click()
        self.wait_until(lambda: self.tile_names() == names[100:], "the next page shows the rest", self.tile_names)
        self.assertEqual(self.find_all("nav.pages a[rel=next]"), [])
        self.assertThumbnailsDecode()
        self.assertNothingBlockedOrThrown()

    def test_limit_and_after_choose_the_page(self):
        names = sorted(self.images)
        self.open_page("/?limit=10&after=p050.png")
        self.assertEqual(self.tile_names(), names[51:61])
        self.find("nav.pages a[rel=next]").click()
        self.wait_until(lambda: self.tile_names() == names[61:71], "the next page follows", self.tile_names)


class TestPageScreenshot(BrowserTestCase):
    """The README's screenshot of the page, a small PNG: saved to IMS_SCREENSHOT=<path> when set."""

    @classmethod
    def setUpClass(cls):
        cls.images = {"IMG_X.jpeg": readme_photo()}
        for index, name in enumerate(("beach.jpg", "city.jpg", "forest.jpg", "harbour.jpg", "meadow.jpg")):
            cls.images[name] = sample_photo(index)
        super().setUpClass()

    def test_the_readme_s_screenshot_can_be_taken_small(self):
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": False})
        self.addCleanup(self.driver.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})
        self.driver.execute_cdp_cmd("Emulation.setScrollbarsHidden", {"hidden": True})
        self.addCleanup(self.driver.execute_cdp_cmd, "Emulation.setScrollbarsHidden", {"hidden": False})
        self.open_page()
        self.assertThumbnailsDecode()
        picture = Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")
        picture = picture.crop((0, 0, min(picture.width, 1000), min(picture.height, 700)))
        # 256 colours: a quarter of the bytes of the full-colour PNG (some 40 KB), at a little banding.
        path = os.environ.get("IMS_SCREENSHOT") or os.path.join(self.tempdir, "gallery.png")
        picture.quantize(colors=256, dither=Image.Dither.FLOYDSTEINBERG if hasattr(Image, "Dither") else 3).save(
            path, "PNG", optimize=True)
        with Image.open(path) as saved:
            self.assertEqual(saved.size, (1000, 700))
        self.assertLess(os.path.getsize(path), 100_000)


def sample_photo(seed, size=(640, 480)):
    """Return a JPEG of a made-up photo: a coloured gradient under blurred discs, like IMG_X's."""
    from PIL import ImageDraw, ImageFilter

    rng = random.Random(seed)
    photo = Image.linear_gradient("L").resize(size).convert("RGB")
    tint = [rng.randrange(1, 4) for _ in range(3)]
    photo = Image.merge("RGB", [band.point(lambda v, k=k: 40 + v * k // 4) for k, band in zip(tint, photo.split())])
    draw = ImageDraw.Draw(photo)
    for _ in range(25):
        x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randrange(15, 90)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    return encode(photo.filter(ImageFilter.GaussianBlur(2)), "JPEG", quality=85)


class TestPageNegotiation(HTTPTestCase):
    """GET / answers a browser with the page and everything else with the JSON list, as before."""

    NAMES = ("C.png", "a b.png", "a.png", "фото.png", "<x>.png")

    def prepare_storage(self):
        os.makedirs(self.storage, exist_ok=True)
        for name in self.NAMES:
            self.put_file(name, make_image("PNG", (8, 8)))

    def test_programs_get_the_json_list_byte_for_byte_as_before(self):
        expected = (json.dumps(sorted(self.NAMES)) + "\n").encode()
        for accept in (None, "*/*", "", "application/json", "application/json, text/plain, */*",
                       "text/html;q=0.5, application/json", "text/html;q=0", "image/webp,*/*"):
            with self.subTest(accept=accept):
                reply = self.request("GET", "/", headers={} if accept is None else {"Accept": accept})
                self.assertEqual((reply.status, reply.body), (200, expected))
                self.assertEqual(reply.headers["Content-Type"], "application/json")
                self.assertIn("Accept", [value.strip() for value in (reply.headers["Vary"] or "").split(",")])
                self.assertIsNone(reply.headers["Link"])

    def test_browsers_get_the_page(self):
        for accept in (CHROMIUM_ACCEPT, FIREFOX_ACCEPT, "text/html", "Text/HTML"):
            with self.subTest(accept=accept):
                reply = self.request("GET", "/", headers={"Accept": accept})
                self.assertEqual(reply.status, 200)
                media_type, _, parameters = reply.headers["Content-Type"].partition(";")
                self.assertEqual(media_type.strip(), "text/html")
                self.assertEqual(parameters.replace(" ", "").lower(), "charset=utf-8")
                self.assertIn("Accept", [value.strip() for value in (reply.headers["Vary"] or "").split(",")])
                self.assertTrue(reply.headers["Content-Security-Policy"])
                page = reply.body.decode("utf-8")
                self.assertIn("<h1", page)
                self.assertIn('id="grid"', page)
                self.assertIn("&lt;x&gt;.png", page)
                self.assertNotIn("<x>", page)

    def test_head_gives_the_pages_headers(self):
        get = self.request("GET", "/", headers={"Accept": CHROMIUM_ACCEPT})
        head = self.request("HEAD", "/", headers={"Accept": CHROMIUM_ACCEPT})
        self.assertEqual((head.status, head.body), (200, b""))
        for header in ("Content-Type", "Content-Length", "Vary", "Content-Security-Policy"):
            self.assertEqual(head.headers[header], get.headers[header], header)


class TestListPaging(HTTPTestCase):
    """The JSON list's ?limit=&after= pages, with a Link to the next one while more remain."""

    NAMES = tuple(sorted(("a.png", "a&b.png", "c d.png", "e#f.png", "g+h.png", "i%20j.png", "k=l.png", "Z.png", "ä.png")))

    def prepare_storage(self):
        os.makedirs(self.storage, exist_ok=True)
        for name in self.NAMES:
            self.put_file(name, make_image("PNG", (8, 8)))

    def test_following_the_links_walks_the_whole_list_once(self):
        for limit in (1, 2, 4, len(self.NAMES), 100):
            with self.subTest(limit=limit):
                path, seen, pages = f"/?limit={limit}", [], 0
                while path is not None:
                    reply = self.request("GET", path)
                    self.assertEqual(reply.status, 200, reply.body)
                    self.assertEqual(reply.headers["Content-Type"], "application/json")
                    self.assertEqual(reply.body, (json.dumps(reply.json) + "\n").encode())
                    self.assertLessEqual(len(reply.json), limit)
                    seen += reply.json
                    pages += 1
                    link = reply.headers["Link"]
                    if link is None:
                        path = None
                    else:
                        match = re.fullmatch(r'<([^>]+)>;\s*rel="?next"?', link)
                        self.assertIsNotNone(match, link)
                        target = urllib.parse.urlsplit(urllib.parse.urljoin("http://ims.test/", match.group(1)))
                        self.assertEqual((target.netloc, target.path), ("ims.test", "/"), link)
                        path = f"/?{target.query}"
                    self.assertLessEqual(pages, len(self.NAMES) + 1, "the links go round")
                self.assertEqual(seen, list(self.NAMES))
                self.assertEqual(pages, max(1, -(-len(self.NAMES) // limit)))

    def test_after_starts_past_a_name_stored_or_not(self):
        names = list(self.NAMES)
        for after, expected in ((names[2], names[3:5]), ("b", [name for name in names if name > "b"][:2]),
                                (names[-1], []), ("", names[:2])):
            with self.subTest(after=after):
                reply = self.request("GET", "/?" + urllib.parse.urlencode({"limit": 2, "after": after}))
                self.assertEqual(reply.json, expected)

    def test_a_bad_limit_is_400_naming_it(self):
        for limit in ("0", "-1", "abc", "1.5", ""):
            with self.subTest(limit=limit):
                self.assertError(self.request("GET", f"/?limit={limit}"), 400, "limit")

    def test_without_parameters_the_list_is_whole(self):
        for index in range(150):
            self.put_file(f"n{index:03}.png", make_image("PNG", (4, 4)))
        reply = self.request("GET", "/")
        self.assertEqual(reply.body, (json.dumps(sorted(self.NAMES + tuple(f"n{index:03}.png" for index in range(150)))) + "\n").encode())
        self.assertIsNone(reply.headers["Link"])


# ====
# Issue 12: health, request ids, logs, CORS, digests and facts, good and bad input
# ====


MADE_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
CORS_ORIGIN = "http://app.test:8080"
EXPOSED_HEADERS = {"location", "etag", "last-modified", "retry-after", "content-disposition", "content-range",
                   "link", "x-request-id", "repr-digest"}
ROOT_METHODS = {"GET", "HEAD", "POST"}
IMAGE_METHODS = {"GET", "HEAD", "DELETE", "PATCH"}
READ_METHODS = {"GET", "HEAD"}
FACT_FIELDS = {"name", "format", "content_type", "bytes", "etag", "last_modified", "width", "height", "upright_width",
               "upright_height", "orientation", "frames", "animated", "icc_profile", "mode"}
REQUEST_LOG_FIELDS = {"time", "event", "request_id", "client", "method", "path", "status", "bytes", "duration"}
JOB_LOG_FIELDS = {"time", "event", "job", "image", "state", "error", "duration"}


def b64(data):
    return base64.b64encode(data).decode("ascii")


def content_digest(body, *algorithms):
    """Return a Content-Digest value (RFC 9530) of `body` for `algorithms` ("sha-256", "sha-512")."""
    functions = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
    return ", ".join(f"{name}=:{b64(functions[name](body).digest())}:" for name in algorithms)


def content_md5(body):
    return b64(hashlib.md5(body).digest())


def chunked(body, size=1000):
    """Return `body` in chunked transfer coding, in chunks of `size` bytes."""
    pieces = [body[start:start + size] for start in range(0, len(body), size)]
    return b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces) + b"0\r\n\r\n"


def list_tokens(reply, field):
    """Return the lower-case comma-separated items of every `field` header of a reply, as a set."""
    return {item.strip().lower() for value in reply.headers.get_all(field) or [] for item in value.split(",") if item.strip()}


def cors_headers(reply):
    return sorted(key for key in reply.headers if key.lower().startswith("access-control-"))


def second_server(test, **options):
    """Start another in-process server on a folder of its own; return (its storage, its address)."""
    storage = os.path.join(tempfile.mkdtemp(dir=test.tempdir.name), "storage")
    server = start_server(test, storage, **options)
    return storage, server.server_address[:2]


def take_folder_away(test, path):
    """Move the folder at `path` aside, as if it had been removed; put it back at cleanup at the latest.

    Returns the function that puts it back (whatever was put at `path` meanwhile is removed).
    """
    away = path + ".away"
    os.rename(path, away)

    def put_back():
        if os.path.lexists(away):
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            elif os.path.lexists(path):
                os.remove(path)
            os.rename(away, path)

    # Registered after the server started, so it runs before the server is closed.
    test.addCleanup(put_back)
    return put_back


class StructuredFieldError(ValueError):
    pass


def parse_sf_dictionary(text):
    """Parse an RFC 8941 dictionary strictly; return {key: (value, parameters)}; StructuredFieldError otherwise.

    Byte sequences become bytes (missing "=" padding tolerated, as RFC 8941 §4.2.7 advises), tokens
    str wrapped in a tuple ("token", text), strings str, inner lists lists.
    """
    text = text.strip(" \t")
    position = 0

    def peek():
        return text[position] if position < len(text) else ""

    def fail(why):
        raise StructuredFieldError(f"{why} at {position} in {text!r}")

    def key():
        nonlocal position
        if not (peek() and (peek() in "abcdefghijklmnopqrstuvwxyz*")):
            fail("a key must start with a lower-case letter or *")
        start = position
        while peek() and peek() in "abcdefghijklmnopqrstuvwxyz0123456789_-.*":
            position += 1
        return text[start:position]

    def bare_item():
        nonlocal position
        char = peek()
        if char == "-" or char.isdigit() and char.isascii():
            match = re.match(r"-?([0-9]*)(\.([0-9]*))?", text[position:])
            digits, fraction = match.group(1), match.group(3)
            if not digits:
                fail("a number without digits")
            if match.group(2) is None:
                if len(digits) > 15:
                    fail("an integer of more than 15 digits")
                value = int(match.group(0))
            else:
                if len(digits) > 12 or not 1 <= len(fraction) <= 3:
                    fail("a decimal out of range")
                value = float(match.group(0))
            position += len(match.group(0))
            return value
        if char == '"':
            position += 1
            out = []
            while True:
                char = peek()
                if not char:
                    fail("an unterminated string")
                position += 1
                if char == "\\":
                    escaped = peek()
                    if escaped not in ('"', "\\") or not escaped:
                        fail("a bad escape")
                    out.append(escaped)
                    position += 1
                elif char == '"':
                    return "".join(out)
                elif not " " <= char <= "~":
                    fail("a character not allowed in a string")
                else:
                    out.append(char)
        if char and (char.isascii() and char.isalpha() or char == "*"):
            start = position
            while peek() and (peek() in "!#$%&'*+-.^_`|~:/" or peek().isascii() and peek().isalnum()):
                position += 1
            return ("token", text[start:position])
        if char == ":":
            end = text.find(":", position + 1)
            if end < 0:
                fail("an unterminated byte sequence")
            encoded = text[position + 1:end]
            if not re.fullmatch(r"[A-Za-z0-9+/]*=*", encoded):
                fail("a byte sequence that is not base64")
            core = encoded.rstrip("=")
            if len(core) % 4 == 1:
                fail("a byte sequence of an impossible length")
            position = end + 1
            return base64.b64decode(core + "=" * (-len(core) % 4))
        if char == "?":
            if text[position + 1:position + 2] in ("0", "1"):
                position += 2
                return text[position - 1] == "1"
            fail("a bad boolean")
        fail("no bare item")

    def parameters():
        nonlocal position
        found = {}
        while peek() == ";":
            position += 1
            while peek() == " ":
                position += 1
            name = key()
            value = True
            if peek() == "=":
                position += 1
                value = bare_item()
            found[name] = value
        return found

    def item_or_inner_list():
        nonlocal position
        if peek() != "(":
            return bare_item(), parameters()
        position += 1
        items = []
        while True:
            while peek() == " ":
                position += 1
            if peek() == ")":
                position += 1
                return items, parameters()
            if not peek():
                fail("an unterminated inner list")
            items.append((bare_item(), parameters()))
            if peek() not in (" ", ")"):
                fail("a bad inner list")

    members = {}
    while position < len(text):
        name = key()
        if peek() == "=":
            position += 1
            members[name] = item_or_inner_list()
        else:
            members[name] = (True, parameters())
        while peek() in (" ", "\t") and peek():
            position += 1
        if position >= len(text):
            break
        if peek() != ",":
            fail("members not separated by a comma")
        position += 1
        while peek() in (" ", "\t") and peek():
            position += 1
        if position >= len(text):
            fail("a trailing comma")
    return members


def folder_snapshot(storage):
    """Return every path under `storage` with its size and modification time, and the folder's own time."""
    entries = {}
    for root, folders, files in os.walk(storage):
        for name in folders + files:
            path = os.path.join(root, name)
            status = os.lstat(path)
            entries[os.path.relpath(path, storage)] = (status.st_size, status.st_mtime_ns)
    return os.stat(storage).st_mtime_ns, entries


class HealthAssertions:
    def assertHealthy(self, address=None):
        connection = self.connect(address)
        reply = self.request("GET", "/healthz", connection=connection)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        self.assertEqual(reply.headers["Cache-Control"], "no-store")
        self.assertEqual(reply.json, {"status": "ok"})
        self.assertEqual(reply.body, b'{"status": "ok"}\n')
        self.assertEqual(int(reply.headers["Content-Length"]), len(reply.body))
        head = self.request("HEAD", "/healthz", connection=connection)
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.headers["Content-Type"], "application/json")
        self.assertEqual(head.headers["Cache-Control"], "no-store")
        self.assertEqual(head.headers["Content-Length"], reply.headers["Content-Length"])
        return reply

    def assertUnhealthy(self, address=None):
        """GET and HEAD /healthz are 503 with {"status": "unavailable", "message": <text>}; return the message."""
        connection = self.connect(address)
        reply = self.request("GET", "/healthz", connection=connection)
        self.assertEqual(reply.status, 503, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        body = reply.json
        self.assertEqual(set(body), {"status", "message"}, body)
        self.assertEqual(body["status"], "unavailable")
        self.assertIsInstance(body["message"], str)
        self.assertTrue(body["message"].strip())
        self.assertEqual(int(reply.headers["Content-Length"]), len(reply.body))
        head = self.request("HEAD", "/healthz", connection=connection)
        self.assertEqual((head.status, head.body), (503, b""))
        return body["message"]


class TestHealth(HealthAssertions, HTTPTestCase):
    mount = TestDiskFull.mount


    def test_a_healthy_server_answers_200_ok_to_get_and_head_without_caching(self):
        self.assertHealthy()
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        self.assertHealthy()

    def test_other_methods_are_405_with_allow_get_head(self):
        for method in ("POST", "DELETE", "PUT", "PATCH"):
            with self.subTest(method=method):
                reply = self.request(method, "/healthz", body=b"", headers={"Content-Length": "0"})
                self.assertError(reply, 405, method)
                self.assertEqual(list_tokens(reply, "Allow"), {"get", "head"})

    def test_health_checks_write_nothing_in_the_folder(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        before = folder_snapshot(self.storage)
        for _ in range(20):
            self.assertEqual(self.request("GET", "/healthz").status, 200)
        self.assertEqual(folder_snapshot(self.storage), before)

    def test_a_removed_folder_is_503_and_200_again_once_it_is_back(self):
        put_back = take_folder_away(self, self.storage)
        self.assertUnhealthy()
        put_back()
        self.assertHealthy()

    def test_a_folder_replaced_by_a_file_or_a_link_to_a_file_is_503_and_200_again_once_it_is_back(self):
        put_back = take_folder_away(self, self.storage)
        with open(self.storage, "wb") as file:
            file.write(b"not a folder")
        self.assertUnhealthy()
        os.remove(self.storage)
        os.symlink(os.path.join(self.tempdir.name, "file"), self.storage)
        with open(os.path.join(self.tempdir.name, "file"), "wb") as file:
            file.write(b"not a folder either")
        self.assertUnhealthy()
        put_back()
        self.assertHealthy()

    def test_a_read_only_bind_mount_is_503_and_200_again_once_writable(self):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            self.skipTest("mounting needs root (and chmod does not stop root)")
        self.mount("--bind", self.storage, self.storage)
        self.addCleanup(subprocess.run, ["umount", "-l", self.storage], capture_output=True)
        self.mount("-o", "remount,bind,ro", self.storage)
        with self.assertRaises(OSError):
            open(os.path.join(self.storage, "probe"), "wb").close()
        self.assertUnhealthy()
        self.mount("-o", "remount,bind,rw", self.storage)
        self.assertHealthy()


class TestHealthOnASmallTmpfs(HealthAssertions, HTTPTestCase):
    """The storage folder is a 1 MiB tmpfs (TestDiskFull's); skipped where mounting is not allowed."""

    TMPFS_SIZE = TestDiskFull.TMPFS_SIZE
    prepare_storage = TestDiskFull.prepare_storage
    mount = TestDiskFull.mount
    fill_disk = TestDiskFull.fill_disk

    def test_a_read_only_remount_is_503_and_200_again_once_writable(self):
        self.assertHealthy()
        self.mount("-o", "remount,ro", self.storage)
        self.addCleanup(subprocess.run, ["mount", "-o", "remount,rw", self.storage], capture_output=True)
        self.assertUnhealthy()
        self.mount("-o", "remount,rw", self.storage)
        self.assertHealthy()

    def test_a_full_disk_is_503_and_200_again_once_space_is_freed(self):
        self.assertHealthy()
        self.fill_disk()
        self.assertUnhealthy()
        os.remove(os.path.join(self.storage, "filler.bin"))
        self.assertHealthy()


class TestHealthWhileResizesAreBusy(HealthAssertions, ResizeTestCase, HTTPTestCase):
    server_options = {"resize_workers": 1}

    def test_health_is_answered_while_every_resize_slot_is_held_and_jobs_wait(self):
        self.start_slow_resize()
        self.store("a.png", make_image("PNG"))
        queued = [self.submit("a.png", "width=10&height=10") for _ in range(3)]
        self.assertEqual(self.job(queued[-1])["state"], "queued")
        with socket.create_connection((self.host, self.port), timeout=DEADLINE_SECONDS) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n")
            reply = self.parse_reply(self.read_until_close(sock))
        self.assertEqual((reply.status, reply.json), (200, {"status": "ok"}))
        self.assertHealthy()
        self.assertEqual(self.job(queued[0])["state"], "queued")


class TestRequestIds(HTTPTestCase):
    def raw_get(self, id_bytes, target=b"/"):
        """GET `target` with `id_bytes` sent as they are as the X-Request-Id; return the Reply."""
        data = b"GET " + target + b" HTTP/1.1\r\nHost: ims.test\r\nX-Request-Id: " + id_bytes + b"\r\nConnection: close\r\n\r\n"
        return self.parse_reply(self.raw_exchange(data))

    def assertMadeId(self, reply):
        self.assertIsNotNone(reply.headers["X-Request-Id"], "no X-Request-Id")
        self.assertEqual(len(reply.headers.get_all("X-Request-Id")), 1)
        self.assertRegex(reply.headers["X-Request-Id"], MADE_REQUEST_ID)
        self.assertIsNotNone(MADE_REQUEST_ID.fullmatch(reply.headers["X-Request-Id"]), reply.headers["X-Request-Id"])
        return reply.headers["X-Request-Id"]

    def test_valid_ids_are_echoed_exactly(self):
        every_visible = bytes(range(0x21, 0x7F))
        for value in (b"a", b"x" * 128, every_visible, b"req-1234_ABC.def:ghi", b'"quoted"\\back', b"0" * 32, b"F" * 32):
            with self.subTest(value=value):
                reply = self.raw_get(value)
                self.assertEqual(reply.status, 200, reply.body)
                self.assertEqual(reply.headers.get_all("X-Request-Id"), [value.decode("ascii")])

    def test_invalid_ids_are_replaced_by_a_made_id(self):
        for value in (b"x" * 129, b"x" * 5000, b"", b"a b", b"a\tb", b"\x01abc", b"abc\x7f", b"a\x00b", b"caf\xc3\xa9",
                      b"\xff\xfe", b"\x1b[31mred"):
            with self.subTest(value=value[:20]):
                reply = self.raw_get(value)
                self.assertIn(reply.status, (200, 400), reply.body)
                self.assertMadeId(reply)

    def test_requests_without_an_id_get_distinct_made_ids(self):
        ids = {self.assertMadeId(self.request("GET", "/")) for _ in range(20)}
        self.assertEqual(len(ids), 20)

    def test_every_kind_of_answer_carries_the_id(self):
        data = make_image("PNG")
        self.assertEqual(self.upload("a.png", data).status, 201)
        etag = self.request("GET", "/a.png").headers["ETag"]
        _, small_upload = second_server(self, max_upload=1000)
        gone_storage, gone = second_server(self)
        take_folder_away(self, gone_storage)
        counter = itertools.count()

        def upload(headers):
            body, content_type = multipart_body(files=[("file", f"u{next(counter)}.png", data)])
            return self.request("POST", "/", body, dict(headers, **{"Content-Type": content_type}))

        def delete(headers):
            name = f"d{next(counter)}.png"
            self.assertEqual(self.upload(name, data).status, 201)
            return self.request("DELETE", "/" + name, headers=headers)

        def too_large(headers):
            body, content_type = multipart_body(files=[("file", "big.png", bytes(3000))])
            return self.request("POST", "/", body, dict(headers, **{"Content-Type": content_type}), self.connect(small_upload))

        kinds = (
            (200, lambda headers: self.request("GET", "/a.png", headers=headers)),
            (200, lambda headers: self.request("HEAD", "/", headers=headers)),
            (201, upload),
            (204, delete),
            (304, lambda headers: self.request("GET", "/a.png", headers=dict(headers, **{"If-None-Match": etag}))),
            (400, lambda headers: self.request("GET", "/a.png?width=abc", headers=headers)),
            (404, lambda headers: self.request("GET", "/missing.png", headers=headers)),
            (405, lambda headers: self.request("PUT", "/", body=b"", headers=headers)),
            (413, too_large),
            (503, lambda headers: self.request("GET", "/healthz", headers=headers, connection=self.connect(gone))),
        )
        for status, send in kinds:
            with self.subTest(status=status):
                reply = send({"X-Request-Id": f"client-{status}"})
                self.assertEqual(reply.status, status, reply.body)
                self.assertEqual(reply.headers.get_all("X-Request-Id"), [f"client-{status}"])
                reply = send({})
                self.assertEqual(reply.status, status, reply.body)
                self.assertMadeId(reply)

    def test_requests_that_cannot_be_parsed_get_a_made_id(self):
        for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"GET /\x7f.png HTTP/1.1\r\n\r\n",
                     b"GET / HTTP/2.0\r\n\r\n", b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n"):
            with self.subTest(data=data[:30]):
                reply = self.parse_reply(self.raw_exchange(data))
                self.assertTrue(400 <= reply.status < 500 or reply.status == 505, reply.status)
                self.assertMadeId(reply)

    def test_each_request_on_a_kept_alive_connection_gets_its_own_id(self):
        connection = self.connect()
        ids = []
        for index in range(6):
            headers = {"X-Request-Id": "mine"} if index == 2 else {}
            reply = self.request("GET", "/", headers=headers, connection=connection)
            self.assertEqual(reply.status, 200)
            ids.append(reply.headers["X-Request-Id"])
        self.assertEqual(ids[2], "mine")
        made = ids[:2] + ids[3:]
        for value in made:
            self.assertIsNotNone(MADE_REQUEST_ID.fullmatch(value), value)
        self.assertEqual(len(set(made)), len(made), ids)
        self.assertConnectionStillServes(connection)


class CorsTestCase(HTTPTestCase):
    def setUp(self):
        super().setUp()
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        reply = self.request("PATCH", "/a.png?width=8&height=8")
        self.assertEqual(reply.status, 202, reply.body)
        self.job_path = reply.headers["Location"]
        # Ended before the tests look at a.png, so its version holds still.
        self.assertEqual(self.wait_job(self.job_path)["state"], "done")
        self.routes = (
            ("/", ROOT_METHODS),
            ("/a.png", IMAGE_METHODS),
            ("/missing.png", IMAGE_METHODS),
            (self.job_path, READ_METHODS),
            ("/jobs/0123456789abcdef", READ_METHODS),
            ("/healthz", READ_METHODS),
            ("/metrics", READ_METHODS),
        )

    def preflight(self, path, origin, method, request_headers=None, connection=None):
        headers = {"Origin": origin, "Access-Control-Request-Method": method}
        if request_headers is not None:
            headers["Access-Control-Request-Headers"] = request_headers
        return self.request("OPTIONS", path, headers=headers, connection=connection)

    def assertNoCors(self, reply):
        self.assertEqual(cors_headers(reply), [], reply.headers)

    def assertSimpleCors(self, reply, allow_origin):
        self.assertEqual(reply.headers.get_all("Access-Control-Allow-Origin"), [allow_origin], reply.headers)
        self.assertEqual(list_tokens(reply, "Access-Control-Expose-Headers"), EXPOSED_HEADERS)
        if allow_origin == "*":
            self.assertNotIn("origin", list_tokens(reply, "Vary"))
        else:
            self.assertIn("origin", list_tokens(reply, "Vary"))

    def simple_requests(self, origin):
        """Yield (expected status, Reply) for requests with `origin` that give 200, 201, 304, 206, 400, 404, 405 and 503."""
        headers = {"Origin": origin}
        yield 200, self.request("GET", "/", headers=headers)
        yield 200, self.request("GET", "/a.png", headers=headers)
        yield 200, self.request("GET", "/healthz", headers=headers)
        body, content_type = multipart_body(files=[("file", f"c{secrets.token_hex(4)}.png", make_image("PNG"))])
        yield 201, self.request("POST", "/", body, dict(headers, **{"Content-Type": content_type}))
        etag = self.request("GET", "/a.png").headers["ETag"]
        yield 304, self.request("GET", "/a.png", headers=dict(headers, **{"If-None-Match": etag}))
        yield 206, self.request("GET", "/a.png", headers=dict(headers, Range="bytes=0-3"))
        yield 400, self.request("GET", "/a.png?width=abc", headers=headers)
        yield 404, self.request("GET", "/missing.png", headers=headers)
        yield 405, self.request("PUT", "/a.png", body=b"", headers=headers)
        gone_storage, gone = second_server(self, **self.server_options)
        take_folder_away(self, gone_storage)
        yield 503, self.request("GET", "/healthz", headers=headers, connection=self.connect(gone))


class TestCorsPreflight(CorsTestCase):
    server_options = {"cors_origin": (CORS_ORIGIN,)}

    def test_preflight_on_every_route_and_method_from_the_allowed_origin(self):
        connection = self.connect()
        for path, methods in self.routes:
            for method in sorted(methods):
                with self.subTest(path=path, method=method):
                    reply = self.preflight(path, CORS_ORIGIN, method, connection=connection)
                    self.assertEqual(reply.status, 204, reply.body)
                    self.assertEqual(reply.body, b"")
                    self.assertEqual(reply.headers.get_all("Access-Control-Allow-Origin"), [CORS_ORIGIN])
                    self.assertEqual({item.upper() for item in list_tokens(reply, "Access-Control-Allow-Methods")}, methods)
                    self.assertIsNone(reply.headers["Access-Control-Allow-Headers"])
                    self.assertEqual(reply.headers["Access-Control-Max-Age"], "600")
                    self.assertEqual(list_tokens(reply, "Vary"),
                                     {"origin", "access-control-request-method", "access-control-request-headers"})
        self.assertConnectionStillServes(connection)

    def test_requested_headers_are_echoed(self):
        for asked in ("Content-Type", "content-type, x-request-id", "Want-Repr-Digest, Content-Digest, If-Match, X-Custom"):
            with self.subTest(asked=asked):
                reply = self.preflight("/a.png", CORS_ORIGIN, "PATCH", asked)
                self.assertEqual(reply.status, 204, reply.body)
                self.assertEqual(list_tokens(reply, "Access-Control-Allow-Headers"),
                                 {item.strip().lower() for item in asked.split(",")})

    def test_preflight_from_an_origin_not_allowed_is_204_without_cors_headers(self):
        for origin in ("http://evil.test", "http://app.test:8081", "http://app.test", "https://app.test:8080",
                       "http://APP.test:8080x", "null", CORS_ORIGIN + "/"):
            with self.subTest(origin=origin):
                reply = self.preflight("/a.png", origin, "DELETE", "content-type")
                self.assertEqual(reply.status, 204, reply.body)
                self.assertNoCors(reply)

    def test_preflight_on_an_unrouted_path_is_404(self):
        for path in ("/nothing", "/a.txt", "/jobs/", "/no/such.png/x"):
            with self.subTest(path=path):
                reply = self.preflight(path, CORS_ORIGIN, "GET")
                self.assertEqual(reply.status, 404, reply.body)
                self.assertEqual(reply.headers["Access-Control-Allow-Origin"], CORS_ORIGIN)

    def test_plain_options_lists_the_route_s_methods_and_options(self):
        for path, methods in self.routes:
            for headers in ({}, {"Origin": CORS_ORIGIN}):
                with self.subTest(path=path, headers=headers):
                    reply = self.request("OPTIONS", path, headers=headers)
                    self.assertEqual(reply.status, 204, reply.body)
                    self.assertEqual({item.upper() for item in list_tokens(reply, "Allow")}, methods | {"OPTIONS"})

    def test_a_405_allows_options_too(self):
        for path, methods in (("/", ROOT_METHODS), ("/a.png", IMAGE_METHODS), ("/healthz", READ_METHODS)):
            with self.subTest(path=path):
                reply = self.request("PUT", path, body=b"")
                self.assertError(reply, 405, "PUT")
                self.assertEqual({item.upper() for item in list_tokens(reply, "Allow")}, methods | {"OPTIONS"})

    def test_answers_to_the_allowed_origin_carry_allow_origin_and_expose_headers_errors_included(self):
        for status, reply in self.simple_requests(CORS_ORIGIN):
            with self.subTest(status=status):
                self.assertEqual(reply.status, status, reply.body)
                self.assertSimpleCors(reply, CORS_ORIGIN)

    def test_answers_to_other_origins_carry_no_cors_headers(self):
        for origin in ("http://evil.test", "null", "http://app.test:8081"):
            for status, reply in self.simple_requests(origin):
                with self.subTest(origin=origin, status=status):
                    self.assertEqual(reply.status, status, reply.body)
                    self.assertNoCors(reply)

    def garbage_strings(self, rng, alphabet, count):
        return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(count)]

    def test_garbage_origins_and_request_methods_and_headers_never_give_500(self):
        rng = random.Random(SEED)
        printable = [chr(code) for code in range(0x20, 0x7F)]
        controls = [chr(code) for code in range(0x20) if chr(code) not in "\r\n"] + ["\x7f"] + printable
        pieces = ["http://app.test:8080", "GET", "PATCH", ",", " ", "*", "null", "content-type", "\t"]
        for alphabet, must_keep_alive in ((printable, True), (controls, False)):
            sock = self.open_socket()
            values = self.garbage_strings(rng, alphabet + pieces, 600)
            for index in range(300):
                origin, method, asked = values[2 * index], rng.choice(values), values[2 * index + 1]
                verb = rng.choice(("OPTIONS", "OPTIONS", "GET", "PATCH"))
                lines = [f"{verb} {rng.choice(['/', '/a.png', '/healthz', '/nothing'])} HTTP/1.1", "Host: ims.test",
                         f"Origin: {origin}", f"Access-Control-Request-Method: {method}",
                         f"Access-Control-Request-Headers: {asked}", "Content-Length: 0"]
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                reply = self.read_reply(sock, verb)
                with self.subTest(index=index, lines=lines):
                    self.assertLess(reply.status, 500, reply.body)
                    if reply.headers["Connection"] == "close":
                        self.assertFalse(must_keep_alive, "printable garbage closed the connection")
                        sock = self.open_socket()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: ims.test\r\n\r\n")
            reply = self.read_reply(sock)
            self.assertEqual(reply.status, 200, reply.body)
            self.assertEqual(len(reply.json), len(self.stored_files()))


class TestCorsAnyOrigin(CorsTestCase):
    server_options = {"cors_origin": "*"}

    def test_preflight_from_any_origin_is_allowed_with_a_star(self):
        for origin in ("http://evil.test", "null", CORS_ORIGIN):
            for path, methods in self.routes:
                with self.subTest(origin=origin, path=path):
                    reply = self.preflight(path, origin, sorted(methods)[0], "content-type")
                    self.assertEqual(reply.status, 204, reply.body)
                    self.assertEqual(reply.headers.get_all("Access-Control-Allow-Origin"), ["*"])
                    self.assertEqual({item.upper() for item in list_tokens(reply, "Access-Control-Allow-Methods")}, methods)
                    self.assertEqual(list_tokens(reply, "Access-Control-Allow-Headers"), {"content-type"})
                    self.assertEqual(reply.headers["Access-Control-Max-Age"], "600")

    def test_answers_to_any_origin_carry_a_star_and_no_vary_origin(self):
        for origin in ("http://evil.test", CORS_ORIGIN):
            for status, reply in self.simple_requests(origin):
                with self.subTest(origin=origin, status=status):
                    self.assertEqual(reply.status, status, reply.body)
                    self.assertSimpleCors(reply, "*")

    def test_answers_without_an_origin_carry_the_star_too(self):
        for path in ("/", "/healthz", "/missing.png"):
            with self.subTest(path=path):
                reply = self.request("GET", path)
                self.assertEqual(reply.headers["Access-Control-Allow-Origin"], "*")
                self.assertIn("ETag", reply.headers["Access-Control-Expose-Headers"])


class TestCorsOriginList(CorsTestCase):
    server_options = {"cors_origin": "http://a.test http://b.test:81,http://c.test"}

    def test_a_string_of_origins_is_split_on_commas_and_spaces(self):
        for origin in ("http://a.test", "http://b.test:81", "http://c.test"):
            with self.subTest(origin=origin):
                reply = self.request("GET", "/", headers={"Origin": origin})
                self.assertSimpleCors(reply, origin)
                self.assertEqual(self.preflight("/", origin, "POST").headers["Access-Control-Allow-Origin"], origin)
        self.assertNoCors(self.request("GET", "/", headers={"Origin": "http://b.test"}))


class TestWithoutCors(CorsTestCase):
    def test_options_stays_405_without_options_in_allow_and_no_cors_headers(self):
        for path, methods in self.routes:
            for headers in ({}, {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "GET"}):
                with self.subTest(path=path, headers=headers):
                    reply = self.request("OPTIONS", path, headers=headers)
                    self.assertError(reply, 405, "OPTIONS")
                    self.assertEqual({item.upper() for item in list_tokens(reply, "Allow")}, methods)
                    self.assertNoCors(reply)

    def test_answers_with_an_origin_carry_no_cors_headers(self):
        for status, reply in self.simple_requests(CORS_ORIGIN):
            with self.subTest(status=status):
                self.assertEqual(reply.status, status, reply.body)
                self.assertNoCors(reply)


class TestContentDigest(ResizeTestCase, HTTPTestCase):
    def setUp(self):
        super().setUp()
        self.kept = make_image("PNG", (16, 12))
        self.store("kept.png", self.kept)
        self.data = make_image("PNG", (20, 10), color=(10, 200, 10))

    def send_upload(self, name, headers_of, use_chunked=False, data=None, connection=None):
        """POST `name` with the headers that `headers_of(body)` gives; return the Reply."""
        body, content_type = multipart_body(files=[("file", name, self.data if data is None else data)])
        headers = dict(headers_of(body), **{"Content-Type": content_type})
        if use_chunked:
            headers["Transfer-Encoding"] = "chunked"
            body = chunked(body)
        return self.request("POST", "/", body, headers, connection)

    def assertStored(self, reply, name):
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.request("GET", "/" + name).body, self.data)

    def assertRefusedAndNothingStored(self, reply, name):
        self.assertError(reply, 400, None)
        self.assertEqual(self.request("GET", "/" + name).status, 404)
        self.assertEqual(self.request("GET", "/").json, ["kept.png"])
        self.assertEqual(self.stored_files(), ["kept.png"])
        self.assertNoTempFiles()
        self.assertEqual(self.request("GET", "/kept.png").body, self.kept)

    def test_correct_digests_are_accepted(self):
        cases = {
            "sha-256": lambda body: {"Content-Digest": content_digest(body, "sha-256")},
            "sha-512": lambda body: {"Content-Digest": content_digest(body, "sha-512")},
            "both": lambda body: {"Content-Digest": content_digest(body, "sha-256", "sha-512")},
            "both-reversed": lambda body: {"Content-Digest": content_digest(body, "sha-512", "sha-256")},
            "md5": lambda body: {"Content-MD5": content_md5(body)},
            "all": lambda body: {"Content-Digest": content_digest(body, "sha-256"), "Content-MD5": content_md5(body)},
            "with-unknown": lambda body: {"Content-Digest": f"sha-1=:{b64(hashlib.sha1(body).digest())}:, "
                                                            + content_digest(body, "sha-512") + ", unixsum=12"},
            "parameters": lambda body: {"Content-Digest": content_digest(body, "sha-256") + ";note=1"},
            "spacing": lambda body: {"Content-Digest": "  " + content_digest(body, "sha-256", "sha-512").replace(", ", " ,\t ") + " "},
        }
        for index, (kind, headers_of) in enumerate(cases.items()):
            for use_chunked in (False, True):
                with self.subTest(kind=kind, chunked=use_chunked):
                    name = f"ok-{index}-{int(use_chunked)}.png"
                    self.assertStored(self.send_upload(name, headers_of, use_chunked), name)
        self.assertNoTempFiles()

    def test_wrong_digests_are_400_and_nothing_is_stored(self):
        other = b"other bytes"
        cases = {
            "sha-256": lambda body: {"Content-Digest": content_digest(other, "sha-256")},
            "sha-512": lambda body: {"Content-Digest": content_digest(other, "sha-512")},
            "sha-256 right, sha-512 wrong": lambda body: {
                "Content-Digest": content_digest(body, "sha-256") + ", " + content_digest(other, "sha-512")},
            "sha-512 right, sha-256 wrong": lambda body: {
                "Content-Digest": content_digest(body, "sha-512") + ", " + content_digest(other, "sha-256")},
            "md5": lambda body: {"Content-MD5": content_md5(other)},
            "sha-256 right, md5 wrong": lambda body: {"Content-Digest": content_digest(body, "sha-256"), "Content-MD5": content_md5(other)},
            "md5 right, sha-256 wrong": lambda body: {"Content-Digest": content_digest(other, "sha-256"), "Content-MD5": content_md5(body)},
            "digest of the file, not the body": lambda body: {"Content-Digest": content_digest(self.data, "sha-256")},
            "last byte of the body left out": lambda body: {"Content-Digest": content_digest(body[:-1], "sha-256")},
        }
        for kind, headers_of in cases.items():
            for use_chunked in (False, True):
                with self.subTest(kind=kind, chunked=use_chunked):
                    self.assertRefusedAndNothingStored(self.send_upload("new.png", headers_of, use_chunked), "new.png")

    def test_a_big_upload_with_a_wrong_digest_leaves_nothing(self):
        data = encode(noise((400, 400)), "PNG")
        for use_chunked in (False, True):
            with self.subTest(chunked=use_chunked):
                reply = self.send_upload("big.png", lambda body: {"Content-Digest": content_digest(body + b"x", "sha-512")},
                                         use_chunked, data=data)
                self.assertRefusedAndNothingStored(reply, "big.png")

    def test_unknown_algorithms_alone_are_ignored(self):
        for index, value in enumerate(("sha-1=:AAAA:", "md5=:AAAAAAAAAAAAAAAAAAAAAA==:", "unixsum=1", "id-sha-256=:AAAA:",
                                       "adler=:AAAA:, crc32c=:AAAAAA==:")):
            with self.subTest(value=value):
                name = f"unknown-{index}.png"
                self.assertStored(self.send_upload(name, lambda body: {"Content-Digest": value}), name)

    def test_malformed_headers_are_400(self):
        def sha256(body):
            return hashlib.sha256(body).digest()

        cases = {
            "not base64": lambda body: {"Content-Digest": "sha-256=:!!!!:"},
            "31 bytes": lambda body: {"Content-Digest": f"sha-256=:{b64(sha256(body)[:-1])}:"},
            "33 bytes": lambda body: {"Content-Digest": f"sha-256=:{b64(sha256(body) + b'0')}:"},
            "sha-512 of sha-256's length": lambda body: {"Content-Digest": f"sha-512=:{b64(sha256(body))}:"},
            "sha-256 of sha-512's length": lambda body: {"Content-Digest": f"sha-256=:{b64(hashlib.sha512(body).digest())}:"},
            "no colons": lambda body: {"Content-Digest": f"sha-256={b64(sha256(body))}"},
            "no closing colon": lambda body: {"Content-Digest": f"sha-256=:{b64(sha256(body))}"},
            "a string": lambda body: {"Content-Digest": f'sha-256="{b64(sha256(body))}"'},
            "an integer": lambda body: {"Content-Digest": "sha-256=1"},
            "a token": lambda body: {"Content-Digest": "sha-256=abc"},
            "an inner list": lambda body: {"Content-Digest": f"sha-256=(:{b64(sha256(body))}:)"},
            "a bare key": lambda body: {"Content-Digest": "sha-256"},
            "no key": lambda body: {"Content-Digest": f":{b64(sha256(body))}:"},
            "a trailing comma": lambda body: {"Content-Digest": content_digest(body, "sha-256") + ","},
            "hex, not base64": lambda body: {"Content-Digest": f"sha-256=:{hashlib.sha256(body).hexdigest()}:"},
            "garbage": lambda body: {"Content-Digest": "garbage garbage"},
            "semicolons": lambda body: {"Content-Digest": ";;;"},
            "md5 not base64": lambda body: {"Content-MD5": "!!!!"},
            "md5 of 15 bytes": lambda body: {"Content-MD5": b64(hashlib.md5(body).digest()[:15])},
            "md5 in hex": lambda body: {"Content-MD5": hashlib.md5(body).hexdigest()},
            "md5 of sha-256's length": lambda body: {"Content-MD5": b64(sha256(body))},
        }
        for kind, headers_of in cases.items():
            for use_chunked in (False, True):
                with self.subTest(kind=kind, chunked=use_chunked):
                    self.assertRefusedAndNothingStored(self.send_upload("new.png", headers_of, use_chunked), "new.png")

    def test_a_dictionary_broken_only_in_an_unknown_algorithm_s_byte_sequence_is_400(self):
        # RFC 8941 §4.2.7: a byte sequence that does not base64-decode fails the whole field.
        for extra in (", md5=:A:", ", md5=:AB=CDEFG:", ", crc32c=:AAAAA:"):
            with self.subTest(extra=extra):
                reply = self.send_upload("new.png", lambda body: {"Content-Digest": content_digest(body, "sha-256") + extra})
                self.assertRefusedAndNothingStored(reply, "new.png")

    def digest_mutations(self, count, seed, header, valid_value, expected_ok):
        """Upload with `count` seeded mutations of `valid_value` in `header`; 400 or 201, and 201 only when
        `expected_ok(value, body)` says the mutated value is a well-formed one that matches."""
        rng = random.Random(seed)
        connection = self.connect()
        stored, wrong = ["kept.png"], []
        for index in range(count):
            name = f"m{index:04}.png"
            body, content_type = multipart_body(files=[("file", name, self.data)])
            value = mutate(rng, valid_value(body).encode("latin-1")).replace(b"\r", b"").replace(b"\n", b"")
            reply = self.request("POST", "/", body, {"Content-Type": content_type, header: value}, connection)
            if reply.status == 201:
                stored.append(name)
                if not expected_ok(value.decode("latin-1"), body):
                    wrong.append((value, reply.status))
            elif reply.status != 400:
                wrong.append((value, reply.status, reply.body[:200]))
        self.maxDiff = None
        self.assertEqual(wrong, [], f"{len(wrong)} of {count} mutated headers were answered wrongly")
        self.assertEqual(self.request("GET", "/").json, sorted(stored))
        self.assertNoTempFiles()

    def test_seeded_mutations_of_a_content_digest_are_400_or_201_and_201_only_when_it_matches(self):
        def valid_value(body):
            return content_digest(body, "sha-256", "sha-512") + f", md5=:{b64(hashlib.md5(body).digest())}:"

        def expected_ok(value, body):
            """Whether no sha-256 or sha-512 that the header holds fails to match the body."""
            right = {"sha-256": hashlib.sha256(body).digest(), "sha-512": hashlib.sha512(body).digest()}
            try:
                members = parse_sf_dictionary(value)
            except StructuredFieldError:
                # Broken elsewhere (say in an unknown algorithm's member): every sha-256 or sha-512
                # member that can be made out must still be a byte sequence of the right digest.
                for match in re.finditer(r"(?:^|,)[ \t]*(sha-256|sha-512)=([^,]*)", value.strip(" \t")):
                    item = re.fullmatch(r":([A-Za-z0-9+/]*=*):(;.*)?", match.group(2).rstrip(" \t"))
                    if item is None or len(item.group(1).rstrip("=")) % 4 == 1:
                        return False
                    core = item.group(1).rstrip("=")
                    if base64.b64decode(core + "=" * (-len(core) % 4)) != right[match.group(1)]:
                        return False
                return True
            return all(members[name][0] == digest for name, digest in right.items() if name in members)

        self.digest_mutations(2000, SEED, "Content-Digest", valid_value, expected_ok)

    def test_seeded_mutations_of_a_content_md5_are_400_or_201_and_201_only_when_it_matches(self):
        def expected_ok(value, body):
            value = value.strip(" \t")
            if not re.fullmatch(r"[A-Za-z0-9+/]*=*", value) or len(value.rstrip("=")) % 4 == 1:
                return False
            core = value.rstrip("=")
            return base64.b64decode(core + "=" * (-len(core) % 4)) == hashlib.md5(body).digest()

        self.digest_mutations(500, SEED + 1, "Content-MD5", content_md5, expected_ok)

    def jobs_on_disk(self):
        folder = os.path.join(self.storage, ims.STATE_FOLDER, "jobs")
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def test_patch_with_a_wrong_digest_is_400_and_queues_nothing(self):
        body = json.dumps({"width": 8, "height": 6}).encode()
        jobs = self.jobs_on_disk()
        for headers in ({"Content-Digest": content_digest(b"{}", "sha-256")}, {"Content-MD5": content_md5(b"{}")},
                        {"Content-Digest": "sha-512=:AAAA:"}):
            with self.subTest(headers=headers):
                reply = self.patch("kept.png", body=body, headers=dict(headers, **{"Content-Type": "application/json"}))
                self.assertError(reply, 400, None)
                self.assertIsNone(reply.headers["Location"])
                self.assertEqual(self.jobs_on_disk(), jobs)
        self.assertEqual(self.request("GET", "/kept.png").body, self.kept)
        # The same body with its right digest is taken.
        headers = {"Content-Type": "application/json", "Content-Digest": content_digest(body, "sha-256", "sha-512"),
                   "Content-MD5": content_md5(body)}
        reply = self.patch("kept.png", body=body, headers=headers)
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.wait_job(reply.headers["Location"])["state"], "done")
        self.assertEqual(self.download("kept.png").size, (8, 6))


def repr_digest(data, algorithm):
    function = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}[algorithm]
    return f"{algorithm}=:{b64(function(data).digest())}:"


class TestReprDigest(RenditionTestCase, HTTPTestCase):
    def setUp(self):
        super().setUp()
        self.data = make_image("PNG", (40, 30))
        self.store("a.png", self.data)

    def get(self, target, want=None, method="GET", headers=None):
        headers = dict(headers or {})
        if want is not None:
            headers["Want-Repr-Digest"] = want
        return self.request(method, target, headers=headers)

    def test_the_most_preferred_known_algorithm_is_answered_with_the_whole_file_s_digest(self):
        for want, algorithm in (
            ("sha-256=1", "sha-256"),
            ("sha-512=1", "sha-512"),
            ("sha-512=3, sha-256=1", "sha-512"),
            ("sha-256=10, sha-512=3", "sha-256"),
            ("sha-256=0, sha-512=1", "sha-512"),
            ("sha-512=0, sha-256=5", "sha-256"),
            ("sha-1=10, sha-256=2", "sha-256"),
            ("md5=9, unixsum=8, sha-512=1", "sha-512"),
            ("sha-256=1, id-sha-512=10", "sha-256"),
        ):
            for method in ("GET", "HEAD"):
                with self.subTest(want=want, method=method):
                    reply = self.get("/a.png", want, method)
                    self.assertEqual(reply.status, 200, reply.body)
                    self.assertEqual(reply.headers.get_all("Repr-Digest"), [repr_digest(self.data, algorithm)])
                    self.assertEqual(reply.body, self.data if method == "GET" else b"")

    def test_no_digest_without_a_positive_preference_for_a_known_algorithm(self):
        for want in (None, "sha-256=0", "sha-256=0, sha-512=0", "sha-1=5", "md5=1", "unixsum=10, crc32c=3"):
            with self.subTest(want=want):
                reply = self.get("/a.png", want)
                self.assertEqual((reply.status, reply.body), (200, self.data))
                self.assertIsNone(reply.headers["Repr-Digest"])

    def test_equal_preferences_give_either_known_digest(self):
        reply = self.get("/a.png", "sha-256=1, sha-512=1")
        self.assertIn(reply.headers["Repr-Digest"], (repr_digest(self.data, "sha-256"), repr_digest(self.data, "sha-512")))

    def test_garbage_preferences_give_a_200_and_no_wrong_digest(self):
        rng = random.Random(SEED)
        fixed = ["!!!", "sha-256", "sha-256=", "sha-256=:abc:", ",,,", "=1", "sha-256=-1", "sha-256=abc", "sha-256=1.5",
                 "sha-256=99999999999999999999", "SHA-256=1", "sha-256=1,", '"sha-256"=1', "sha-256=1;q=0"]
        pieces = ["sha-256", "sha-512", "=", ",", " ", ";", ":", "1", "0", "10", "-", "\t", '"', "(", ")", "?1", "a"]
        values = fixed + ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12))) for _ in range(300)]
        connection = self.connect()
        good = {repr_digest(self.data, "sha-256"), repr_digest(self.data, "sha-512")}
        for value in values:
            with self.subTest(value=value):
                reply = self.request("GET", "/a.png", headers={"Want-Repr-Digest": value}, connection=connection)
                self.assertEqual((reply.status, reply.body), (200, self.data))
                digests = reply.headers.get_all("Repr-Digest") or []
                self.assertLessEqual(len(digests), 1)
                self.assertLessEqual(set(digests), good)
        self.assertConnectionStillServes(connection)

    def test_a_range_answer_carries_the_whole_file_s_digest(self):
        for want, algorithm in (("sha-256=1", "sha-256"), ("sha-512=1", "sha-512")):
            with self.subTest(want=want):
                reply = self.get("/a.png", want, headers={"Range": "bytes=0-9"})
                self.assertEqual((reply.status, reply.body), (206, self.data[:10]))
                self.assertEqual(reply.headers["Repr-Digest"], repr_digest(self.data, algorithm))
                reply = self.get("/a.png", want, headers={"Range": "bytes=-5"})
                self.assertEqual((reply.status, reply.body), (206, self.data[-5:]))
                self.assertEqual(reply.headers["Repr-Digest"], repr_digest(self.data, algorithm))

    def test_a_rendition_carries_the_digest_of_its_own_bytes(self):
        for query in ("width=10", "width=12&format=jpeg", "height=7&format=webp"):
            for want, algorithm in (("sha-256=1", "sha-256"), ("sha-512=2, sha-256=1", "sha-512")):
                with self.subTest(query=query, want=want):
                    reply = self.get(f"/a.png?{query}", want)
                    self.assertEqual(reply.status, 200, reply.body)
                    self.assertNotEqual(reply.body, self.data)
                    self.assertEqual(reply.headers["Repr-Digest"], repr_digest(reply.body, algorithm))
                    head = self.get(f"/a.png?{query}", want, "HEAD")
                    self.assertEqual(head.headers["Repr-Digest"], repr_digest(reply.body, algorithm))
                    ranged = self.get(f"/a.png?{query}", want, headers={"Range": "bytes=2-5"})
                    self.assertEqual((ranged.status, ranged.body), (206, reply.body[2:6]))
                    self.assertEqual(ranged.headers["Repr-Digest"], repr_digest(reply.body, algorithm))

    def test_the_digest_is_computed_once_per_stored_version(self):
        calls = []

        class CountingHashlib:
            """ims's view of hashlib, counting the sha-256 and sha-512 hashers it makes."""

            def __getattr__(self, attribute):
                real = getattr(hashlib, attribute)
                if attribute not in ("new", "sha256", "sha512", "file_digest"):
                    return real

                def counted(*arguments, **keywords):
                    name = attribute if attribute.startswith("sha") else str(arguments[0] if arguments else "")
                    if name.replace("-", "").lower() in ("sha256", "sha512") or attribute == "file_digest":
                        calls.append(name)
                    return real(*arguments, **keywords)

                return counted

        with mock.patch.object(ims, "hashlib", CountingHashlib()):
            first = self.get("/a.png", "sha-256=1")
            if not calls:
                self.skipTest("ims hashes in a way this test cannot count")
            self.assertEqual(first.headers["Repr-Digest"], repr_digest(self.data, "sha-256"))
            counted = len(calls)
            for _ in range(10):
                self.assertEqual(self.get("/a.png", "sha-256=1").headers["Repr-Digest"], first.headers["Repr-Digest"])
                self.assertEqual(self.get("/a.png", "sha-256=1", "HEAD").headers["Repr-Digest"], first.headers["Repr-Digest"])
                self.assertEqual(self.get("/a.png", "sha-256=1", headers={"Range": "bytes=1-2"}).status, 206)
            self.assertEqual(len(calls), counted, "the digest of one version was computed again")

    def test_the_digest_follows_a_resize_and_a_new_upload(self):
        before = self.get("/a.png", "sha-256=1").headers["Repr-Digest"]
        self.assertEqual(self.wait_job(self.submit("a.png", "width=20&height=15"))["state"], "done")
        reply = self.get("/a.png", "sha-256=1")
        self.assertEqual(decode(reply.body).size, (20, 15))
        self.assertEqual(reply.headers["Repr-Digest"], repr_digest(reply.body, "sha-256"))
        self.assertNotEqual(reply.headers["Repr-Digest"], before)
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        other = make_image("PNG", (40, 30), color=(0, 0, 0))
        self.store("a.png", other)
        self.assertEqual(self.get("/a.png", "sha-512=1").headers["Repr-Digest"], repr_digest(other, "sha-512"))
        self.assertEqual(self.get("/a.png", "sha-256=1").headers["Repr-Digest"], repr_digest(other, "sha-256"))


def upright(size, orientation):
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


class TestFacts(ResizeTestCase, HTTPTestCase):
    def facts(self, name, query="facts", method="GET"):
        reply = self.request(method, f"/{name}?{query}")
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        return reply

    def expected(self, name, data):
        """The facts of `data` stored as `name`, as this Pillow reads them, and as the download shows them."""
        download = self.request("GET", "/" + name)
        self.assertEqual(download.body, data)
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION)
            frames = getattr(image, "n_frames", 1)
            image_format = ims.FORMAT_ALIASES.get(image.format, image.format)
            stored_size = image.size
            if image_format == "TIFF":
                # Newer Pillows report a turned TIFF's upright size on opening; the file's own tags
                # (ImageWidth, ImageLength) hold the size as stored.
                stored_size = (image.tag_v2[256], image.tag_v2[257])
            return {
                "name": name, "format": image_format, "content_type": ims.CONTENT_TYPE_BY_FORMAT[image_format],
                "bytes": len(data), "etag": download.headers["ETag"],
                "width": stored_size[0], "height": stored_size[1],
                "upright_width": upright(stored_size, orientation)[0], "upright_height": upright(stored_size, orientation)[1],
                "orientation": orientation, "frames": frames, "animated": frames > 1,
                "icc_profile": bool(image.info.get("icc_profile")), "mode": image.mode,
            }

    def check(self, name, data, **fixed):
        """Store `data` as `name`; its facts are what Pillow reads and what `fixed` says; return them."""
        self.store(name, data)
        facts = self.facts(name).json
        self.assertEqual(set(facts), FACT_FIELDS)
        expected = self.expected(name, data)
        self.assertEqual({field: value for field, value in facts.items() if field != "last_modified"}, expected)
        self.assertLastModified(facts, name)
        for field, value in fixed.items():
            self.assertEqual(facts[field], value, field)
        for field in ("bytes", "width", "height", "upright_width", "upright_height", "frames"):
            self.assertIs(type(facts[field]), int, field)
        for field in ("animated", "icc_profile"):
            self.assertIs(type(facts[field]), bool, field)
        return facts

    def assertLastModified(self, facts, name):
        """The facts' last_modified is the download's Last-Modified: the same text, or the same moment."""
        header = self.request("HEAD", "/" + name).headers["Last-Modified"]
        value = facts["last_modified"]
        self.assertIsInstance(value, str)
        if value != header:
            self.assertEqual(int(epoch_of(value)), email.utils.parsedate_to_datetime(header).timestamp(), value)

    def test_a_jpeg_turned_by_exif_orientation_6(self):
        self.check("turned.jpg", make_image("JPEG", (64, 48), orientation=6), format="JPEG", content_type="image/jpeg",
                   width=64, height=48, upright_width=48, upright_height=64, orientation=6, frames=1, animated=False,
                   icc_profile=False, mode="RGB")

    def test_the_sample_photo_with_orientation_and_an_icc_profile(self):
        with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as file:
            data = file.read()
        facts = self.check("IMG_X.jpeg", data, format="JPEG", icc_profile=True, frames=1, animated=False)
        self.assertEqual(facts["orientation"], 6)
        self.assertEqual((facts["upright_width"], facts["upright_height"]), (facts["height"], facts["width"]))

    def test_a_png_with_alpha_and_one_with_an_icc_profile(self):
        self.check("alpha.png", make_image("PNG", (30, 20), mode="RGBA"), format="PNG", content_type="image/png",
                   width=30, height=20, upright_width=30, upright_height=20, orientation=None, frames=1,
                   animated=False, icc_profile=False, mode="RGBA")
        self.check("icc.png", make_image("PNG", (30, 20), icc=ICC_PROFILE), icc_profile=True, orientation=None)

    def test_animated_gif_and_webp(self):
        self.check("anim.gif", animation("GIF"), format="GIF", content_type="image/gif", frames=3, animated=True,
                   width=64, height=48)
        self.check("anim.webp", animation("WEBP"), format="WEBP", content_type="image/webp", frames=3, animated=True,
                   width=64, height=48)

    def test_still_gif_webp_tiff_and_bmp(self):
        self.check("still.gif", make_image("GIF"), format="GIF", frames=1, animated=False)
        self.check("still.webp", make_image("WEBP"), format="WEBP", frames=1, animated=False)
        self.check("a.tif", make_image("TIFF", (33, 22)), format="TIFF", content_type="image/tiff", width=33, height=22,
                   orientation=None, frames=1)
        turned = io.BytesIO()
        Image.open(io.BytesIO(make_image("PNG", (33, 22)))).save(turned, "TIFF", tiffinfo={EXIF_ORIENTATION: 8})
        self.check("b.tiff", turned.getvalue(), width=33, height=22, upright_width=22, upright_height=33,
                   orientation=8)
        self.check("a.bmp", make_image("BMP", (17, 9)), format="BMP", content_type="image/bmp", width=17, height=9,
                   frames=1, mode="RGB")

    def test_head_and_an_empty_facts_value(self):
        data = make_image("JPEG", orientation=3)
        self.store("a.jpg", data)
        get = self.facts("a.jpg")
        head = self.facts("a.jpg", method="HEAD")
        self.assertEqual(head.body, b"")
        self.assertEqual(head.headers["Content-Length"], str(len(get.body)))
        self.assertEqual(int(get.headers["Content-Length"]), len(get.body))
        self.assertEqual(self.facts("a.jpg", "facts=").json, get.json)
        self.assertEqual(get.json["orientation"], 3)

    def test_facts_with_another_parameter_is_400(self):
        self.store("a.png", make_image("PNG"))
        for query in ("facts&width=3", "width=3&facts", "facts&format=png", "facts=&quality=50", "facts&bogus=1"):
            with self.subTest(query=query):
                self.assertError(self.request("GET", f"/a.png?{query}"), 400, None)

    def test_facts_ignore_cache_busters_as_downloads_do_and_refuse_other_parameters(self):
        self.store("a.png", make_image("PNG"))
        for query in ("facts&v=1", "facts&utm_source=x", "_=123&facts"):
            with self.subTest(query=query):
                self.assertEqual(self.request("GET", f"/a.png?{query}").json["format"], "PNG")
        for query in ("facts&width=3", "facts&widht=3", "format=png&facts"):
            with self.subTest(query=query):
                self.assertError(self.request("GET", f"/a.png?{query}"), 400, "facts")

    def test_unknown_name_is_404_and_a_file_that_is_no_image_is_422(self):
        self.assertError(self.request("GET", "/missing.png?facts"), 404, None)
        self.put_file("fake.png", b"this is no image at all" * 10)
        self.put_file("cut.jpg", make_image("JPEG")[:20])
        for name in ("fake.png", "cut.jpg"):
            with self.subTest(name=name):
                self.assertError(self.request("GET", f"/{name}?facts"), 422, None)
                self.assertEqual(self.request("HEAD", f"/{name}?facts").status, 422)

    def png_header_and_a_little_data(self, width, height):
        """A PNG whose header says `width` x `height` and whose pixel data runs out at once: no decoder reads it."""
        import zlib

        data = png_without_pixels(width, height)
        pixels = b"IDAT" + zlib.compress(bytes(1000))
        data = data[:-12] + struct.pack(">I", len(pixels) - 4) + pixels + struct.pack(">I", zlib.crc32(pixels)) + data[-12:]
        with self.assertRaises(Exception):
            decode(data)
        return data

    def test_facts_come_from_the_header_without_decoding_the_pixels(self):
        self.put_file("big.png", self.png_header_and_a_little_data(9000, 8000))
        facts = self.facts("big.png").json
        self.assertEqual((facts["width"], facts["height"], facts["upright_width"], facts["upright_height"]),
                         (9000, 8000, 9000, 8000))
        self.assertEqual((facts["format"], facts["frames"], facts["animated"], facts["mode"]), ("PNG", 1, False, "RGB"))

    def test_facts_of_an_image_over_twice_the_pixel_limit_are_422_like_its_renditions(self):
        # 600 megapixels, placed by hand (no upload can store it): Pillow's decompression-bomb guard,
        # at twice --max-pixels, refuses to open it at all.
        self.put_file("huge.png", self.png_header_and_a_little_data(30000, 20000))
        self.assertError(self.request("GET", "/huge.png?facts"), 422, "huge.png")
        self.put_file("large.png", self.png_header_and_a_little_data(9000, 8000))
        self.assertEqual(self.facts("large.png").json["width"], 9000)

    def test_the_gallery_tiles_show_format_upright_size_frames_and_icc(self):
        with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as file:
            photo = file.read()
        self.store("photo.jpeg", photo)
        self.store("anim.gif", animation("GIF"))
        self.store("plain.png", make_image("PNG", (30, 20)))
        page = self.request("GET", "/", headers={"Accept": "text/html"})
        self.assertEqual(page.status, 200)
        tiles = {}
        for tile in page.body.decode("utf-8").split('<li class="tile"')[1:]:
            name = re.search(r'data-name="([^"]*)"', tile).group(1)
            tiles[name] = html.unescape(re.sub(r"<[^>]*>", " ", tile.split("</li>")[0]))
        self.assertEqual(set(tiles), {"photo.jpeg", "anim.gif", "plain.png"})
        photo_facts = self.facts("photo.jpeg").json
        upright_size = f"{photo_facts['upright_width']}×{photo_facts['upright_height']}"
        for name, words in (("photo.jpeg", ("JPEG", upright_size, "ICC")), ("anim.gif", ("GIF", "64×48", "3")),
                            ("plain.png", ("PNG", "30×20"))):
            for word in words:
                self.assertIn(word, tiles[name], name)
        self.assertNotIn("ICC", tiles["plain.png"])

    def test_facts_follow_a_resize(self):
        data = make_image("JPEG", (64, 48), orientation=6)
        self.store("a.jpg", data)
        before = self.facts("a.jpg").json
        self.assertEqual(self.wait_job(self.submit("a.jpg", "width=20&height=30"))["state"], "done")
        after = self.facts("a.jpg").json
        resized = self.request("GET", "/a.jpg")
        self.assertEqual((after["width"], after["height"], after["upright_width"], after["upright_height"]), (20, 30, 20, 30))
        self.assertIn(after["orientation"], (None, 1))
        self.assertEqual(after["bytes"], len(resized.body))
        self.assertEqual(after["etag"], resized.headers["ETag"])
        self.assertNotEqual(after["etag"], before["etag"])


ISO_UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


class TestJsonLogs(RealProcessTestCase):
    """`python3 ims.py --log-format json`: one JSON object per line on stderr."""

    def start(self, *arguments, env=None):
        instance = self.start_instance(*arguments, env=env)
        self.port = instance.port
        with open(instance.log_path, "rb") as file:
            self.log_start = len(file.read())
        return instance

    def events(self, instance):
        """Return every line of stderr written since the start, each parsed as a JSON object."""
        with open(instance.log_path, "rb") as file:
            data = file.read()[self.log_start:]
        text = data.decode("utf-8")  # JSON text is UTF-8 (RFC 8259); anything else fails here
        complete, _, _ = text.rpartition("\n")
        events = []
        for line in complete.split("\n") if complete else []:
            try:
                event = json.loads(line)
            except ValueError:
                self.fail(f"a line of stderr is no JSON: {line[:300]!r}")
            self.assertIsInstance(event, dict, line)
            self.assertIn(event.get("event"), ("request", "job", "error"), line)
            events.append(event)
        return events

    def event_of(self, instance, **fields):
        """Wait for the one event with `fields` and return it."""
        def found():
            return [event for event in self.events(instance) if all(event.get(key) == value for key, value in fields.items())]

        try:
            wait_for(found)
        except AssertionError:
            self.fail(f"no event with {fields}; the log has {self.events(instance)[-5:]}")
        matches = found()
        self.assertEqual(len(matches), 1, matches)
        return matches[0]

    def assertRequestEvent(self, instance, reply, method, path, sent_before):
        event = self.event_of(instance, event="request", request_id=reply.headers["X-Request-Id"])
        self.assertEqual(set(event), REQUEST_LOG_FIELDS, event)
        self.assertIsNotNone(ISO_UTC_TIME.fullmatch(event["time"]), event["time"])
        self.assertLessEqual(abs(epoch_of(event["time"]) - sent_before), DEADLINE_SECONDS)
        self.assertEqual((event["client"], event["method"], event["path"]), ("127.0.0.1", method, path))
        self.assertIs(type(event["status"]), int)
        self.assertEqual(event["status"], reply.status)
        self.assertIs(type(event["bytes"]), int)
        self.assertEqual(event["bytes"], len(reply.body))
        self.assertIs(type(event["duration"]), float)
        self.assertGreaterEqual(event["duration"], 0)
        self.assertLess(event["duration"], DEADLINE_SECONDS)
        return event

    def test_every_request_is_one_json_line_with_the_contract_s_fields(self):
        instance = self.start("--log-format", "json")
        data = make_image("PNG", (40, 30))
        body, content_type = multipart_body(files=[("file", "a.png", data)])
        connection = self.connect()
        etag = None
        for method, path, headers, request_body, status in (
            ("GET", "/?x=1", {"X-Request-Id": "client-id-1"}, None, 200),
            ("POST", "/", {"Content-Type": content_type}, body, 201),
            ("GET", "/a.png", {}, None, 200),
            ("GET", "/a.png?width=3", {}, None, 200),
            ("HEAD", "/a.png", {}, None, 200),
            ("GET", "/a.png", {"Range": "bytes=0-9"}, None, 206),
            ("GET", "/a.png", "etag", None, 304),
            ("GET", "/missing.png?v=2", {}, None, 404),
            ("GET", "/a.png?width=abc", {}, None, 400),
            ("PUT", "/", {}, b"", 405),
            ("GET", "/healthz", {}, None, 200),
        ):
            with self.subTest(method=method, path=path, status=status):
                if headers == "etag":
                    headers = {"If-None-Match": etag}
                sent_before = time.time()
                reply = self.request(method, path, request_body, headers, connection)
                self.assertEqual(reply.status, status, reply.body)
                etag = etag or reply.headers["ETag"] if path == "/a.png" else etag
                event = self.assertRequestEvent(instance, reply, method, path, sent_before)
                if "X-Request-Id" in headers:
                    self.assertEqual(event["request_id"], headers["X-Request-Id"])
                else:
                    self.assertIsNotNone(MADE_REQUEST_ID.fullmatch(event["request_id"]))
        self.events(instance)

    def test_jobs_that_end_are_logged(self):
        instance = self.start("--log-format", "json")
        self.store("a.png", make_image("PNG", (40, 30)))
        with open(os.path.join(self.storage, "broken.png"), "wb") as file:
            file.write(make_image("PNG", (64, 48))[:60])
        for name, state in (("a.png", "done"), ("broken.png", "failed")):
            with self.subTest(state=state):
                location = self.submit(name, "width=10&height=10")
                job = self.wait_job(location)
                self.assertEqual(job["state"], state)
                event = self.event_of(instance, event="job", job=job_id_of(location))
                self.assertEqual(set(event), JOB_LOG_FIELDS, event)
                self.assertIsNotNone(ISO_UTC_TIME.fullmatch(event["time"]), event["time"])
                self.assertEqual((event["image"], event["state"]), (name, state))
                if state == "done":
                    self.assertIsNone(event["error"])
                    self.assertIs(type(event["duration"]), float)
                    self.assertGreaterEqual(event["duration"], 0)
                else:
                    self.assertIsInstance(event["error"], str)
                    self.assertTrue(event["error"])
                    self.assertIn(type(event["duration"]), (float, type(None)))
        self.events(instance)

    def test_a_job_cancelled_by_a_delete_is_logged(self):
        instance = self.start("--log-format", "json", "--resize-workers", "1")
        self.store("slow.png", SLOW_SOURCE)
        self.hold_resize(self.submit("slow.png", SLOW_FOREVER))
        self.store("a.png", make_image("PNG"))
        location = self.submit("a.png", "width=10&height=10")
        self.assertEqual(self.request("DELETE", "/a.png").status, 204)
        self.assertEqual(self.wait_job(location)["state"], "cancelled")
        event = self.event_of(instance, event="job", job=job_id_of(location))
        self.assertEqual(set(event), JOB_LOG_FIELDS, event)
        self.assertEqual((event["image"], event["state"]), ("a.png", "cancelled"))
        self.assertIn(type(event["duration"]), (float, type(None)))
        self.events(instance)

    def test_hostile_methods_and_paths_still_give_one_json_line_each(self):
        instance = self.start("--log-format", "json")
        for request_line in (
            b'GET /a"b\\c.png HTTP/1.1',
            b"GET /\x01\x1b[31m\x7f.png HTTP/1.1",
            b"GET /\xff\xfe\xc3(.png?\xff=\xfe HTTP/1.1",
            b"GET /\xe2\x80\xa8\xe2\x80\xa9.png?a=\"'\\ HTTP/1.1",
            b'B"R\\EW / HTTP/1.1',
            b"GET\x00 / HTTP/1.1",
            b"\xff\xfe / HTTP/1.1",
            b"GET /%22%5C%00%0A.png?x=%ff HTTP/1.1",
            b"GARBAGE\x00\x01",
            b"GET /a.png HTTP/1.1\r\nX-Request-Id: \x01\xff\"\\",
            b"GET /a.png HTTP/1.1\r\nUser-Agent: \xff\"\\\x1b\r\nReferer: \"\\",
        ):
            with self.subTest(request_line=request_line):
                before = len(self.events(instance))
                reply = self.parse_reply(self.raw_exchange(request_line + b"\r\nHost: ims.test\r\nConnection: close\r\n\r\n"))
                self.assertLess(reply.status, 500, reply.body)
                event = self.event_of(instance, event="request", request_id=reply.headers["X-Request-Id"])
                self.assertEqual(event["status"], reply.status)
                self.assertEqual(set(event), REQUEST_LOG_FIELDS, event)
                # What could not be parsed may be null; what could is text.
                self.assertIsInstance(event["method"], (str, type(None)))
                self.assertIsInstance(event["path"], (str, type(None)))
                self.assertEqual(len(self.events(instance)), before + 1)
        self.assertEqual(self.request("GET", "/").status, 200)

    def test_the_environment_variable_chooses_json_too(self):
        instance = self.start(env={"IMS_LOG_FORMAT": "json"})
        reply = self.request("GET", "/?from=env")
        self.assertRequestEvent(instance, reply, "GET", "/?from=env", time.time())

    def test_the_default_stays_the_common_log_format(self):
        instance = self.start()
        reply = self.request("GET", "/?x=1")
        self.assertEqual(reply.status, 200)
        line = self.wait_for_log(instance, '"GET /?x=1 HTTP/1.1"')
        self.assertRegex(line, r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4} \d\d:\d\d:\d\d\] "GET /\?x=1 HTTP/1\.1" 200 -?\d*$')
        with self.assertRaises(ValueError):
            json.loads(line)

    def test_an_unknown_log_format_exits_with_status_2_and_usage(self):
        result = subprocess.run(
            [sys.executable, os.path.join(HERE, "ims.py"), "--port", "0", "--storage", self.storage, "--log-format", "xml"],
            capture_output=True, text=True, timeout=DEADLINE_SECONDS, cwd=HERE,
        )
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("usage:", result.stderr)
        self.assertIn("--log-format", result.stderr)
        self.assertIn("xml", result.stderr)
        self.assertEqual(result.stdout, "")


class TestJsonErrorEvents(HTTPTestCase):
    """An unexpected error in an in-process server that logs JSON: an "error" event beside the request's."""

    def setUp(self):
        self.stderr = io.StringIO()
        patcher = mock.patch("sys.stderr", self.stderr)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        self.server = ims.make_server(self.storage, host="127.0.0.1", port=0, quiet=False, log_format="json")
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.host, self.port = self.server.server_address[:2]

    def events(self):
        lines = self.stderr.getvalue().split("\n")
        return [json.loads(line) for line in lines[:-1]]

    def test_a_500_logs_an_error_event_with_the_traceback_and_a_request_event(self):
        with mock.patch.object(ims.Handler, "list_images", side_effect=RuntimeError("boom \" \\ \x01")):
            reply = self.request("GET", "/?q=1", headers={"X-Request-Id": "broken-1"})
        self.assertError(reply, 500, None)
        self.assertEqual(reply.headers["X-Request-Id"], "broken-1")
        wait_for(lambda: len([event for event in self.events() if event.get("request_id") == "broken-1"]) == 2)
        events = {event["event"]: event for event in self.events() if event.get("request_id") == "broken-1"}
        self.assertEqual(set(events), {"error", "request"})
        error = events["error"]
        self.assertEqual(set(error), {"time", "event", "request_id", "message", "traceback"})
        self.assertIsNotNone(ISO_UTC_TIME.fullmatch(error["time"]))
        self.assertIsInstance(error["message"], str)
        self.assertIn("boom", error["traceback"])
        self.assertIn("RuntimeError", error["traceback"])
        self.assertEqual((events["request"]["status"], events["request"]["path"]), (500, "/?q=1"))
        for line in self.stderr.getvalue().split("\n")[:-1]:
            self.assertIsInstance(json.loads(line), dict, line)


class TestCorsCommandLine(RealProcessTestCase):
    def test_the_flag_repeats_and_the_environment_variable_splits_on_commas_and_spaces(self):
        for arguments, env in (
            (("--cors-origin", "http://a.test", "--cors-origin", "http://b.test:81"), None),
            ((), {"IMS_CORS_ORIGIN": "http://a.test, http://b.test:81"}),
            ((), {"IMS_CORS_ORIGIN": "http://a.test http://b.test:81"}),
        ):
            with self.subTest(arguments=arguments, env=env):
                self.port = self.start_instance(*arguments, env=env).port
                for origin in ("http://a.test", "http://b.test:81"):
                    reply = self.request("OPTIONS", "/", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
                    self.assertEqual(reply.status, 204, reply.body)
                    self.assertEqual(reply.headers["Access-Control-Allow-Origin"], origin)
                reply = self.request("GET", "/", headers={"Origin": "http://c.test"})
                self.assertEqual(cors_headers(reply), [])
        self.port = self.start_instance().port
        self.assertEqual(self.request("OPTIONS", "/", headers={"Origin": "http://a.test"}).status, 405)


# ====
# Issue 12: CORS in a real browser
# ====
# A front end served from another origin (a second, tiny stdlib server on another port of
# 127.0.0.1) whose script talks to a real `python3 ims.py` with fetch() and XMLHttpRequest, in
# headless Chromium: the list, an upload, a download, a resize and its job, deletes with If-Match,
# digests, errors (400, 404, 412, 413, 414, 431, 503). With --cors-origin naming the front end (or
# `*`) every read succeeds and the exposed headers are readable; without it, or with another
# origin, the browser blocks every read, says so in its console, and sends no preflighted request
# at all. The page writes what it saw into its DOM, one <li> of JSON per step; the test reads them.
# And the gallery page's tiles, showing the image facts, in the same browser.

import http.server  # noqa: E402 (the front end's server, here with the only tests that need it)

FRONT_END_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Another origin</title><link rel="icon" href="data:,"></head>
<body><h1>A front end on another origin</h1><ol id="results"></ol><script src="/front.js"></script></body></html>
"""

# Reads from its own address ?ims= (IMS's origin) and ?mode=: "scenario" (the default: the steps of
# FRONT_END_STEPS, uploading as ?name=, and with ?credentialed=1 one more request, with
# credentials), "errors" (an upload of ?big= bytes, a request line too long, a request head too
# large: errors that IMS answers early) or "health" (GET /healthz). A step that cannot read its
# answer records the error fetch() rejected with (or XMLHttpRequest's error event); later steps
# then fall back on what the page knows without reading: the upload's name, If-Match values of its
# own. Every body that is not JSON is recorded as its length and SHA-256.
FRONT_END_SCRIPT = r"""
"use strict";
const query = new URLSearchParams(location.search);
const ims = query.get("ims"), name = query.get("name");
const results = document.getElementById("results");
const READ = ["Location", "ETag", "Last-Modified", "X-Request-Id", "Content-Type", "Retry-After", "Repr-Digest"];

function record(step, value) {
  const item = document.createElement("li");
  item.dataset.step = step;
  item.textContent = JSON.stringify(value);
  results.append(item);
  return value;
}

async function call(step, path, init) {
  let response;
  try {
    response = await fetch(ims + path, init);
  } catch (error) {
    return record(step, {ok: false, error: error.name + ": " + error.message});
  }
  const headers = {};
  for (const header of READ) headers[header] = response.headers.get(header);
  const visible = Array.from(response.headers.keys());
  const type = response.headers.get("Content-Type") || "";
  let body;
  if (type.startsWith("application/json")) {
    body = await response.json();
  } else {
    const bytes = await response.arrayBuffer();
    body = {bytes: bytes.byteLength, sha256: await sha256(bytes)};
  }
  return record(step, {ok: true, status: response.status, headers, visible, body});
}

async function sha256(data) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return btoa(String.fromCharCode(...digest));
}

function uploadWithXhr(file) {
  return new Promise((resolve) => {
    const form = new FormData();
    form.append("file", file, name);
    const request = new XMLHttpRequest();
    request.open("POST", ims + "/");
    request.onload = () => {
      const headers = {};
      for (const header of READ) headers[header] = request.getResponseHeader(header);
      let body = request.responseText;
      try { body = JSON.parse(body); } catch (error) { /* kept as text */ }
      resolve(record("upload", {ok: true, status: request.status, headers, body}));
    };
    request.onerror = () => resolve(record("upload", {ok: false, status: request.status, error: "XMLHttpRequest error event"}));
    request.send(form);
  });
}

async function run() {
  await call("list", "/");
  const picture = await (await fetch("/upload.png")).blob();
  const upload = await uploadWithXhr(picture);
  const path = (upload.ok && upload.headers.Location) || "/" + encodeURIComponent(name);
  const first = await call("get", path);
  const firstTag = (first.ok && first.headers.ETag) || '"not-read"';
  // A body whose Content-Digest does not match it is refused, as the server reads it.
  const parameters = JSON.stringify({width: 20, height: 10, fit: "fill"});
  const wrong = await sha256(new TextEncoder().encode(parameters + " "));
  await call("bad-digest-patch", path, {method: "PATCH", body: parameters,
                                        headers: {"Content-Type": "application/json", "Content-Digest": "sha-256=:" + wrong + ":"}});
  const resize = await call("patch", path, {method: "PATCH", headers: {"Content-Type": "application/json"}, body: parameters});
  if (resize.ok && resize.headers.Location) await call("job", resize.headers.Location + "?wait=30");
  else record("job", {ok: false, error: "no job to follow"});
  await call("stale-delete", path, {method: "DELETE", headers: {"If-Match": firstTag}});
  const second = await call("get-again", path, {headers: {"Want-Repr-Digest": "sha-256=5"}});
  const tag = (second.ok && second.headers.ETag) || "*";
  await call("delete", path, {method: "DELETE", headers: {"If-Match": tag, "X-Request-Id": "front-end-delete-1"}});
  await call("gone", path);
  if (query.get("credentialed")) await call("credentialed", "/", {credentials: "include"});
}

async function errors() {
  const form = new FormData();
  form.append("file", new Blob([new Uint8Array(Number(query.get("big")))], {type: "image/png"}), "big.png");
  await call("too-big", "/", {method: "POST", body: form});
  await call("too-long", "/" + "a".repeat(9000) + ".png");
  await call("head-too-large", "/existing.png", {headers: {"X-Padding": "p".repeat(70000)}});
}

async function health() {
  await call("health", "/healthz");
}

({scenario: run, errors, health})[query.get("mode") || "scenario"]()
  .catch((error) => record("script", {ok: false, error: String(error)}))
  .finally(() => { document.body.dataset.done = "true"; });
"""

# Every step of FRONT_END_SCRIPT, in order (credentialed only when asked for).
FRONT_END_STEPS = ("list", "upload", "get", "bad-digest-patch", "patch", "job", "stale-delete", "get-again", "delete", "gone")


class FrontEndHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's `files` ({path: (content type, bytes)}) to GET, and 404 otherwise."""

    def do_GET(self):
        found = self.server.files.get(urllib.parse.urlsplit(self.path).path)
        if found is None:
            self.send_error(404)
            return
        content_type, body = found
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@dataclasses.dataclass
class CorsTarget:
    """An ims.py the front end talks to: its origin, storage folder and log."""

    origin: str
    storage: str
    log_path: str

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def logged(self, method, path):
        """Return the statuses of its log lines of `method path`, in order."""
        return [int(status) for status in re.findall(rf'"{method} {re.escape(path)} HTTP/1\.1" (\d{{3}})', self.log())]


class TestCorsInBrowser(BrowserTestCase):
    """The front end on http://127.0.0.1:<another port> against ims.py with and without --cors-origin.

    Every scenario gets an ims.py of its own (so that no preflight Chromium cached for one can
    serve another); the class's own server, with --cors-origin naming the front end, shows the
    gallery page and its tiles' image facts.
    """

    UPLOADED = make_image("PNG", (64, 48))
    EXISTING = {"existing.png": make_image("PNG", (8, 6))}
    images = {
        "anim.gif": animation("GIF"),
        "IMG_X.jpeg": readme_photo(),
        "turned.jpg": make_image("JPEG", (64, 48), orientation=6),
        "plain.png": make_image("PNG", (30, 20)),
    }

    @classmethod
    def setUpClass(cls):
        front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FrontEndHandler)
        front.daemon_threads = True
        front.files = {
            "/": ("text/html; charset=utf-8", FRONT_END_PAGE.encode()),
            "/front.js": ("text/javascript; charset=utf-8", FRONT_END_SCRIPT.encode()),
            "/upload.png": ("image/png", cls.UPLOADED),
        }
        thread = threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        cls.addClassCleanup(front.server_close)
        cls.addClassCleanup(front.shutdown)
        cls.front_port = front.server_address[1]
        cls.front_origin = f"http://127.0.0.1:{cls.front_port}"
        cls.server_arguments = ("--cors-origin", cls.front_origin)
        cls.targets = 0
        super().setUpClass()

    def start_target(self, *arguments):
        """Start an ims.py of this test's own with `arguments`, its folder holding EXISTING; return its CorsTarget."""
        type(self).targets += 1
        folder = os.path.join(self.tempdir, f"target-{self.targets}")
        storage = os.path.join(folder, "storage")
        os.makedirs(storage)
        for name, data in self.EXISTING.items():
            with open(os.path.join(storage, name), "wb") as file:
                file.write(data)
        log_path = os.path.join(folder, "ims.log")
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        # Unbuffered: a request's log line is in the file once it is answered, on every Python.
        process, port = start_ims(self, "--storage", storage, *arguments, env={"PYTHONUNBUFFERED": "1"}, log=log)
        return CorsTarget(f"http://127.0.0.1:{port}", storage, log_path)

    def run_front_end(self, target, name, credentialed=False):
        """Open the front end against `target`, uploading as `name`; return {step: what it saw} once its script ends."""
        query = {"name": name}
        if credentialed:
            query["credentialed"] = "1"
        return self.open_front_end(target, FRONT_END_STEPS + (("credentialed",) if credentialed else ()), **query)

    def open_front_end(self, target, expected_steps, **query):
        """Open the front end against `target` with `query`; return {step: what it saw} once its script ends."""
        self.driver.get(f"{self.front_origin}/?{urllib.parse.urlencode(dict(query, ims=target.origin))}")
        self.wait_until(lambda: self.js("return document.body.dataset.done === 'true'"), "the front end's script ends",
                        lambda: self.find("#results").text)
        steps = self.js("return Array.from(document.querySelectorAll('#results li'), (item) => [item.dataset.step, item.textContent])")
        results = {step: json.loads(value) for step, value in steps}
        self.assertNotIn("script", results, f"the front end's script failed: {results}")
        self.assertEqual([step for step, value in steps], list(expected_steps), results)
        self.assertNotIn("Traceback", target.log(), f"the server logged a traceback:\n{target.log()[-3000:]}")
        return results

    def console_errors(self, shortened=False):
        """Return the messages of the SEVERE entries of the browser's console since it was last read
        (`shortened`: a run of 20 or more of one character, as in a long URL, said in a few)."""
        messages = [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]
        if shortened:
            messages = [re.sub(r"(.)\1{19,}", lambda run: f"{run.group(1)}…({len(run.group())} of them)", message)
                        for message in messages]
        return messages

    def assertRead(self, results, step, status):
        """The step's answer was readable from the script, and of `status`; return it."""
        result = results[step]
        with self.about(step):
            if not result["ok"]:
                self.fail(f"the script could not read the answer: {result}; the console says {self.console_errors(shortened=True)}")
            self.assertEqual(result["status"], status, result)
        return result

    def assertBlocked(self, results, step):
        """The browser kept the step's answer from the script: fetch() rejected with a TypeError."""
        result = results[step]
        with self.about(step):
            self.assertFalse(result["ok"], f"the script read the answer: {result}")
            self.assertTrue(result["error"].startswith("TypeError"), result)

    def assertEveryStepWorks(self, target, name, results):
        """What the front end saw when every read is allowed, and what the server did."""
        self.assertEqual(self.assertRead(results, "list", 200)["body"], sorted(self.EXISTING))
        upload = self.assertRead(results, "upload", 201)
        self.assertEqual(upload["headers"]["Location"], "/" + name, upload)
        self.assertEqual(upload["body"], "Image successfully uploaded")
        self.assertRegex(upload["headers"]["X-Request-Id"] or "", MADE_REQUEST_ID, upload)
        got = self.assertRead(results, "get", 200)
        sha256 = base64.b64encode(hashlib.sha256(self.UPLOADED).digest()).decode()
        self.assertEqual(got["body"], {"bytes": len(self.UPLOADED), "sha256": sha256}, got)
        self.assertIsNone(got["headers"]["Repr-Digest"], "Repr-Digest without Want-Repr-Digest")
        self.assertEqual(got["headers"]["Content-Type"], "image/png", got)
        self.assertTrue(got["headers"]["ETag"], f"the ETag cannot be read: {got}")
        self.assertTrue(got["headers"]["Last-Modified"], got)
        self.assertRegex(got["headers"]["X-Request-Id"] or "", MADE_REQUEST_ID, got)
        self.assertIn("x-request-id", got["visible"])
        refused = self.assertRead(results, "bad-digest-patch", 400)
        self.assertTrue(refused["body"]["message"], refused)
        patch = self.assertRead(results, "patch", 202)
        self.assertRegex(patch["headers"]["Location"] or "", r"^/jobs/[A-Za-z0-9_-]+$", patch)
        job = self.assertRead(results, "job", 200)["body"]
        self.assertEqual((job["state"], job["image"], job["width"], job["height"]), ("done", name, 20, 10), job)
        stale = self.assertRead(results, "stale-delete", 412)
        self.assertIn(name, stale["body"]["message"], stale)
        self.assertRegex(stale["headers"]["X-Request-Id"] or "", MADE_REQUEST_ID, stale)
        again = self.assertRead(results, "get-again", 200)
        self.assertNotEqual(again["headers"]["ETag"], got["headers"]["ETag"], "the resize made no new version")
        self.assertEqual(again["headers"]["Repr-Digest"], f"sha-256=:{again['body']['sha256']}:", again)
        deleted = self.assertRead(results, "delete", 204)
        self.assertEqual(deleted["headers"]["X-Request-Id"], "front-end-delete-1", deleted)
        gone = self.assertRead(results, "gone", 404)
        self.assertIn(name, gone["body"]["message"], gone)
        self.assertRegex(gone["headers"]["X-Request-Id"] or "", MADE_REQUEST_ID, gone)
        self.assertNotIn(name, folder_files(target.storage))
        # The preflights: of the PATCH and of each DELETE (its If-Match, then X-Request-Id too).
        path = "/" + name
        self.wait_until(lambda: target.logged("DELETE", path), "the DELETE is in the log", target.log)
        preflights = target.logged("OPTIONS", path)
        self.assertGreaterEqual(len(preflights), 2, f"the preflights are not in the log:\n{target.log()}")
        self.assertEqual(set(preflights), {204}, target.log())
        self.assertEqual(target.logged("PATCH", path), [400, 202])
        self.assertEqual(target.logged("DELETE", path), [412, 204])

    def assertEveryReadIsBlocked(self, target, name, results, preflight_status):
        """What the front end saw when the browser allows no read, and that nothing preflighted was sent."""
        for step in ("list", "get", "bad-digest-patch", "patch", "stale-delete", "get-again", "delete", "gone"):
            self.assertBlocked(results, step)
        self.assertFalse(results["upload"]["ok"], results["upload"])
        self.assertEqual(results["upload"]["status"], 0, results["upload"])
        self.assertEqual(results["job"], {"ok": False, "error": "no job to follow"})
        # A form's POST needs no preflight: the browser sent it, and the server stored the file (CORS
        # keeps answers from scripts; it does not stop simple requests).
        self.wait_until(lambda: target.logged("POST", "/"), "the upload reached the server", target.log)
        self.assertEqual(target.logged("POST", "/"), [201])
        # The preflighted PATCH and DELETEs never left the browser: the file is still there, unchanged.
        self.assertIn(name, folder_files(target.storage))
        with open(os.path.join(target.storage, name), "rb") as file:
            self.assertEqual(file.read(), self.UPLOADED)
        path = "/" + name
        preflights = target.logged("OPTIONS", path)
        self.assertTrue(preflights, f"no preflight is in the log:\n{target.log()}")
        self.assertEqual(set(preflights), {preflight_status}, target.log())
        self.assertEqual(target.logged("PATCH", path), [])
        self.assertEqual(target.logged("DELETE", path), [])
        # The console says why, for the reads and for the preflights.
        errors = self.console_errors()
        blocked = [message for message in errors if "blocked by CORS policy" in message]
        self.assertTrue(blocked, f"no CORS error in the console: {errors}")
        for step, url in (("list", target.origin + "/"), ("get", target.origin + path)):
            with self.about(step):
                self.assertTrue(any(f"at '{url}' from origin '{self.front_origin}'" in message for message in blocked), blocked)
        self.assertTrue(any("XMLHttpRequest" in message for message in blocked), f"the upload's is not there: {blocked}")
        self.assertTrue(any("preflight" in message for message in blocked), f"no preflight's: {blocked}")
        return blocked

    def test_with_the_front_ends_origin_allowed_every_step_works_and_headers_are_exposed(self):
        target = self.start_target("--cors-origin", "http://other.test:8000", "--cors-origin", self.front_origin)
        name = "from-afar.png"
        results = self.run_front_end(target, name)
        self.assertEveryStepWorks(target, name, results)
        # Only the answers of 4xx the script asked for (400, 412, 404) are in the console.
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)
        # A 503, and its JSON, are readable too: /healthz while the storage folder is gone.
        os.rename(target.storage, target.storage + ".away")
        self.addCleanup(os.rename, target.storage + ".away", target.storage)
        health = self.assertRead(self.open_front_end(target, ("health",), mode="health"), "health", 503)
        self.assertEqual(health["body"]["status"], "unavailable", health)
        self.assertTrue(health["body"]["message"], health)
        self.assertRegex(health["headers"]["X-Request-Id"] or "", MADE_REQUEST_ID, health)
        self.assertNothingBlockedOrThrown(allow_failed_requests=True)

    def test_errors_answered_early_are_readable_too(self):
        # "on every answer, errors included": an upload refused by its Content-Length, a request
        # line too long and a request head too large (the last two refused before IMS has parsed
        # the headers, Origin among them). Each is checked, and every failure told at once.
        target = self.start_target("--cors-origin", self.front_origin, "--max-upload", "100000")
        results = self.open_front_end(target, ("too-big", "too-long", "head-too-large"), mode="errors", big=200000)
        console = self.console_errors(shortened=True)
        failures = []
        for step, status, words in (("too-big", 413, "100000"), ("too-long", 414, "8192"), ("head-too-large", 431, "65536")):
            result = results[step]
            if not result["ok"]:
                failures.append(f"{step}: the script could not read the answer ({status} expected): {result}")
                continue
            try:
                self.assertEqual(result["status"], status, result)
                self.assertIn(words, result["body"]["message"], result)
                self.assertRegex(result["headers"]["X-Request-Id"] or "", MADE_REQUEST_ID, result)
            except AssertionError as error:
                failures.append(f"{step}: {error}")
        if failures:
            self.fail("\n".join(failures) + f"\nThe console says: {console}\nThe server's log: {target.log()[-2000:]}")
        self.assertEqual(folder_files(target.storage), sorted(self.EXISTING))
        self.assertEqual(self.watched(), {"violations": [], "errors": [], "alerts": []})
        self.assertEqual([message for message in console if "CORS" in message], [])

    def test_without_cors_origin_the_browser_blocks_every_read_and_every_preflighted_request(self):
        target = self.start_target()
        name = "no-cors.png"
        results = self.run_front_end(target, name)
        # Without --cors-origin nothing changes: OPTIONS stays 405.
        blocked = self.assertEveryReadIsBlocked(target, name, results, 405)
        self.assertTrue(any("No 'Access-Control-Allow-Origin' header" in message for message in blocked), blocked)

    def test_with_another_origin_allowed_the_browser_blocks_every_read(self):
        # The same port on another host name is another origin.
        target = self.start_target("--cors-origin", f"http://localhost:{self.front_port}")
        name = "elsewhere.png"
        results = self.run_front_end(target, name)
        # The preflights of an origin not allowed: 204 without any Access-Control-* header.
        self.assertEveryReadIsBlocked(target, name, results, 204)
        reply = self.request_to(target, "OPTIONS", "/existing.png",
                                {"Origin": self.front_origin, "Access-Control-Request-Method": "DELETE"})
        self.assertEqual(reply.status, 204, reply.body)
        self.assertEqual([header for header in reply.headers if header.lower().startswith("access-control-")], [])

    def test_with_any_origin_allowed_every_request_without_credentials_works(self):
        target = self.start_target("--cors-origin", "*")
        name = "anyone.png"
        results = self.run_front_end(target, name, credentialed=True)
        self.assertEveryStepWorks(target, name, results)
        # A request with credentials cannot be answered with `*` (the browser blocks it), and the
        # console says so, its one CORS error.
        self.assertBlocked(results, "credentialed")
        cors_errors = [message for message in self.console_errors() if "CORS" in message]
        self.assertEqual(len(cors_errors), 1, cors_errors)
        self.assertIn("'*'", cors_errors[0])
        self.assertIn("credentials", cors_errors[0])

    def request_to(self, target, method, path, headers):
        """Send one request straight to `target` (not from the browser); return the whole Reply."""
        address = urllib.parse.urlsplit(target.origin)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=DEADLINE_SECONDS)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()

    def assertBytesShown(self, text, size):
        """`text` gives the file's size, `size` bytes, rounded to the digits it shows."""
        units = {"bytes": (1,), "B": (1,), "kB": (1000,), "KB": (1000, 1024), "KiB": (1024,),
                 "MB": (1000 ** 2,), "MiB": (1024 ** 2,)}
        match = re.search(r"(\d+(?:[.,]\d+)?)\s*(bytes|B|kB|KB|KiB|MB|MiB)\b", text)
        self.assertIsNotNone(match, f"no size in bytes in {text!r}")
        shown = match.group(1).replace(",", ".")
        last_digit = 10 ** -len(shown.partition(".")[2])
        self.assertTrue(any(abs(float(shown) * unit - size) <= (last_digit / 2 + 1e-9) * unit for unit in units[match.group(2)]),
                        f"{text!r} does not give {size} bytes")

    def test_the_gallery_tiles_show_the_image_facts(self):
        # name: (format, upright size, frames shown, ICC shown)
        expected = {
            "anim.gif": ("GIF", "64×48", 3, False),
            "IMG_X.jpeg": ("JPEG", "1200×1600", None, True),
            "turned.jpg": ("JPEG", "48×64", None, False),
            "plain.png": ("PNG", "30×20", None, False),
        }
        self.open_page()
        self.assertEqual(self.tile_names(), sorted(expected))
        for name, (image_format, upright, frames, icc) in expected.items():
            with self.about(name):
                facts = self.request("GET", "/" + urllib.parse.quote(name) + "?facts")
                self.assertEqual(facts.status, 200, facts.body)
                facts = facts.json
                self.assertEqual((facts["format"], "{}×{}".format(facts["upright_width"], facts["upright_height"]),
                                  facts["frames"], facts["animated"], facts["icc_profile"], facts["bytes"]),
                                 (image_format, upright, frames or 1, bool(frames), icc, len(self.images[name])), facts)
                text = self.tile_state(name)["facts"]
                self.assertRegex(text, rf"(?i)\b{image_format}\b")
                self.assertIn(upright, text)
                self.assertBytesShown(text, len(self.images[name]))
                if frames:
                    self.assertRegex(text, rf"(?i)\b{frames}\s*frames\b")
                else:
                    self.assertNotRegex(text, r"(?i)frame")
                if icc:
                    self.assertIn("ICC", text)
                else:
                    self.assertNotIn("ICC", text)
        self.assertThumbnailsDecode()
        self.assertNothingBlockedOrThrown()

# Issue 12: metrics with their real consumers
# ====
# GET /metrics read as Prometheus reads it: by a strict reader of the text format (below), by
# prometheus_client's parser and promtool's linter, across the workers of a real `python3 ims.py
# --workers 3`, and by a real Prometheus (Debian's) that scrapes a real ims.py with the README's
# config and answers queries on what it scraped. prometheus_client (requirements-dev.txt) and
# Debian's prometheus (which brings promtool) are installed by .ci/run; the tests that need them
# skip, saying why, without them.

try:
    from prometheus_client import parser as prometheus_parser
except ImportError:
    prometheus_parser = None

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The families spec12 lists, and the type each is declared with (`# TYPE <name> <type>`).
METRIC_FAMILIES = {
    "ims_info": "gauge",
    "ims_workers": "gauge",
    "ims_http_requests_total": "counter",
    "ims_http_request_duration_seconds": "histogram",
    "ims_http_received_bytes_total": "counter",
    "ims_http_sent_bytes_total": "counter",
    "ims_http_open_connections": "gauge",
    "ims_uploads_total": "counter",
    "ims_upload_bytes_total": "counter",
    "ims_images": "gauge",
    "ims_image_bytes": "gauge",
    "ims_resize_jobs_total": "counter",
    "ims_resize_queue_jobs": "gauge",
    "ims_resize_running": "gauge",
    "ims_resize_duration_seconds": "histogram",
    "ims_rendition_cache_hits_total": "counter",
    "ims_rendition_cache_misses_total": "counter",
    "ims_rendition_cache_evictions_total": "counter",
    "ims_rendition_cache_bytes": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
}

# The families without labels in spec12: each has its one sample from the start.
UNLABELLED_FAMILIES = tuple(
    name for name in METRIC_FAMILIES if METRIC_FAMILIES[name] != "histogram" and name not in (
        "ims_info", "ims_http_requests_total", "ims_resize_jobs_total",
    )
)

# Every value each label may take (spec12: label values are bounded, never an image name).
LABEL_VALUES = {
    "method": {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"},
    "route": {"/", "/{name}", "/jobs/{id}", "/healthz", "/metrics", "none"},
    "state": set(ENDED_STATES),
    "kind": {"job", "rendition"},
}

METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # colons are for recording rules, not exporters
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
SAMPLE_LINE = re.compile(r"([^\s{]+)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+(-?\d+))?")
LABEL_PAIR = re.compile(r'\s*([^\s=,]+)\s*=\s*"((?:[^"\\\n]|\\[\\"n])*)"\s*(?:,|$)')


@dataclasses.dataclass
class Metrics:
    """One scrape of GET /metrics: the declared types, and the samples as (name, labels, value)."""

    text: str
    types: dict
    helps: dict
    samples: list

    def value(self, name, **labels):
        """Return the sum of the samples `name` whose labels include `labels`; 0 when there is none."""
        return sum(value for sample, sample_labels, value in self.samples
                   if sample == name and all(sample_labels.get(key) == wanted for key, wanted in labels.items()))

    def series(self, name):
        """Return the (labels, value) of every sample called `name`."""
        return [(labels, value) for sample, labels, value in self.samples if sample == name]

    def requests(self):
        """Return ims_http_requests_total as a Counter of (method, route, status)."""
        return collections.Counter({
            (labels.get("method"), labels.get("route"), labels.get("status")): value
            for labels, value in self.series("ims_http_requests_total")
        })

    def family_of(self, name):
        """Return the declared family a sample belongs to (a histogram's _bucket/_sum/_count too), or None."""
        if name in self.types:
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and self.types.get(name[:-len(suffix)]) in ("histogram", "summary"):
                return name[:-len(suffix)]
        return None


def parse_metrics(test, text):
    """Read Prometheus' text format 0.0.4 strictly; fail `test` at the first line it does not allow."""
    test.assertTrue(text.endswith("\n"), "the text does not end with a line feed")
    types, helps, samples, seen, sampled = {}, {}, [], set(), set()
    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}: {line!r}"
        if not line.strip():
            continue
        if line.startswith("#"):
            words = line.split(None, 3)
            if len(words) >= 3 and words[1] == "TYPE":
                test.assertEqual(len(words), 4, where)
                test.assertRegex(words[2], METRIC_NAME, where)
                test.assertNotIn(words[2], types, f"a second TYPE for one family, {where}")
                test.assertFalse({words[2], *(words[2] + suffix for suffix in ("_bucket", "_sum", "_count"))} & sampled,
                                 f"a TYPE after its family's samples, {where}")
                test.assertIn(words[3], ("counter", "gauge", "histogram", "summary", "untyped"), where)
                types[words[2]] = words[3]
            elif len(words) >= 3 and words[1] == "HELP":
                test.assertNotIn(words[2], helps, f"a second HELP for one family, {where}")
                helps[words[2]] = words[3] if len(words) == 4 else ""
            continue
        match = SAMPLE_LINE.fullmatch(line)
        test.assertIsNotNone(match, f"not a sample, {where}")
        name, label_text, value_text, _ = match.groups()
        test.assertRegex(name, f"^{METRIC_NAME.pattern}$", where)
        labels, position = {}, 0
        label_text = label_text or ""
        while position < len(label_text.rstrip()):
            pair = LABEL_PAIR.match(label_text, position)
            test.assertIsNotNone(pair, f"bad labels at {label_text[position:]!r}, {where}")
            key, raw = pair.groups()
            test.assertRegex(key, f"^{LABEL_NAME.pattern}$", where)
            test.assertFalse(key.startswith("__"), f"a label name reserved to Prometheus, {where}")
            test.assertNotIn(key, labels, f"a label twice, {where}")
            labels[key] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw)
            position = pair.end()
        try:
            value = float(value_text)
        except ValueError:
            test.fail(f"not a number, {where}")
        identity = (name, tuple(sorted(labels.items())))
        test.assertNotIn(identity, seen, f"a series twice, {where}")
        seen.add(identity)
        sampled.add(name)
        samples.append((name, labels, value))
    return Metrics(text, types, helps, samples)


class MetricsAssertions:
    """Scraping GET /metrics and the checks every scrape must pass. Mixed into ServerTestCases."""

    def scrape(self, connection=None):
        """GET /metrics (on a new connection, closed after, unless given one); check it; return its Metrics."""
        own = self.connect() if connection is None else None
        try:
            reply = self.request("GET", "/metrics", connection=connection or own)
        finally:
            if own is not None:
                own.close()
        self.assertEqual(reply.status, 200, reply.body[:300])
        self.assertEqual(reply.headers["Content-Type"], METRICS_CONTENT_TYPE)
        metrics = parse_metrics(self, reply.body.decode("utf-8"))
        self.assertWellFormed(metrics)
        return metrics

    def assertWellFormed(self, metrics):
        """The spec's families with their types, Prometheus' naming rules, bounded labels, sane histograms."""
        for name, kind in METRIC_FAMILIES.items():
            self.assertEqual(metrics.types.get(name), kind, f"# TYPE {name} {kind} is missing")
        for name in UNLABELLED_FAMILIES:
            self.assertEqual([labels for labels, _ in metrics.series(name)], [{}], f"{name}: not one unlabelled sample")
        info = metrics.series("ims_info")
        self.assertEqual(info, [({"version": ims.__version__, "pillow": Image.__version__}, 1.0)])
        for name, kind in metrics.types.items():
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), f"the counter {name} does not end with _total")
            else:
                self.assertFalse(name.endswith("_total"), f"the {kind} {name} ends with _total")
        for name, labels, value in metrics.samples:
            family = metrics.family_of(name)
            if family is not None and metrics.types[family] == "counter":
                self.assertGreaterEqual(value, 0, f"{name}{labels}")
            for key, allowed in LABEL_VALUES.items():
                if key in labels:
                    self.assertIn(labels[key], allowed, f"{name}{labels}")
            if "status" in labels:
                self.assertRegex(labels["status"], r"^[1-5]\d\d$", f"{name}{labels}")
            self.assertTrue(family is not None or not name.startswith(("ims_", "process_")),
                            f"{name} belongs to no family declared with # TYPE")
        for labels, _ in metrics.series("ims_http_requests_total"):
            self.assertEqual(set(labels), {"method", "route", "status"}, labels)
        for labels, _ in metrics.series("ims_resize_jobs_total"):
            self.assertEqual(set(labels), {"state"}, labels)
        for name, kind in metrics.types.items():
            if kind == "histogram":
                self.assertHistogram(metrics, name)

    def assertHistogram(self, metrics, name):
        """Every series of the histogram `name`: buckets by rising `le`, cumulative, +Inf == _count, a _sum."""
        groups = collections.defaultdict(list)
        for labels, value in metrics.series(f"{name}_bucket"):
            self.assertIn("le", labels, f"{name}_bucket{labels}")
            rest = tuple(sorted((key, value) for key, value in labels.items() if key != "le"))
            groups[rest].append((float(labels["le"]), value))
        counts = {tuple(sorted(labels.items())): value for labels, value in metrics.series(f"{name}_count")}
        sums = {tuple(sorted(labels.items())): value for labels, value in metrics.series(f"{name}_sum")}
        self.assertEqual(set(groups), set(counts), f"{name}: buckets and _count of other series")
        self.assertEqual(set(groups), set(sums), f"{name}: buckets and _sum of other series")
        for rest, buckets in groups.items():
            bounds = [bound for bound, _ in buckets]
            self.assertEqual(bounds, sorted(bounds), f"{name}{dict(rest)}: buckets not in rising order")
            self.assertEqual(len(set(bounds)), len(bounds), f"{name}{dict(rest)}: one bound twice")
            self.assertEqual(bounds[-1], float("inf"), f'{name}{dict(rest)}: no le="+Inf" bucket')
            values = [value for _, value in buckets]
            self.assertEqual(values, sorted(values), f"{name}{dict(rest)}: buckets not cumulative: {buckets}")
            self.assertEqual(values[-1], counts[rest], f'{name}{dict(rest)}: le="+Inf" is not _count')
            self.assertGreaterEqual(sums[rest], 0, f"{name}{dict(rest)}: a negative _sum of durations")

    def settled_scrape(self, condition):
        """Scrape until `condition(metrics)` holds; return that scrape.

        A request is counted once its answer has been sent, a moment after the client has it, so a
        scrape at once may miss the last one: tests wait for what they expect at least, then check
        it is exact (counters never go back, so a count past the expected one shows).
        """
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            metrics = self.scrape()
            if condition(metrics):
                return metrics
            if time.monotonic() > deadline:
                self.fail(f"no scrape within {DEADLINE_SECONDS} s shows what the test expects; the last one counts "
                          f"requests {dict(metrics.requests())}, jobs {metrics.series('ims_resize_jobs_total')}, "
                          f"rendition cache hits {metrics.value('ims_rendition_cache_hits_total')}, misses "
                          f"{metrics.value('ims_rendition_cache_misses_total')}")
            threading.Event().wait(0.01)


class TestMetricsText(MetricsAssertions, RenditionTestCase, HTTPTestCase):
    """GET /metrics of an in-process server: the text, the families, exact counts after known requests."""

    def test_the_text_is_prometheus_format_with_every_family_of_the_spec(self):
        metrics = self.scrape()  # the checks of assertWellFormed
        self.assertEqual(metrics.value("ims_workers"), 1)
        self.assertEqual(metrics.value("ims_images"), 0)
        self.assertEqual(metrics.value("ims_resize_running"), 0)
        self.assertEqual(metrics.value("ims_resize_queue_jobs"), 0)
        self.assertGreater(metrics.value("process_resident_memory_bytes"), 10_000_000)
        self.assertGreaterEqual(metrics.value("process_virtual_memory_bytes"), metrics.value("process_resident_memory_bytes"))
        self.assertGreater(metrics.value("process_open_fds"), 0)
        self.assertGreaterEqual(metrics.value("process_max_fds"), metrics.value("process_open_fds"))
        self.assertLessEqual(metrics.value("process_start_time_seconds"), time.time())
        self.assertGreater(metrics.value("process_cpu_seconds_total"), 0)

    @unittest.skipUnless(prometheus_parser, "prometheus_client is not installed (python3 -m pip install -r requirements-dev.txt)")
    def test_prometheus_client_parses_every_family_with_its_type(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        self.assertEqual(self.request("GET", "/a.png?width=10").status, 200)
        text = self.scrape().text
        families = {family.name: family for family in prometheus_parser.text_string_to_metric_families(text)}
        for name, kind in METRIC_FAMILIES.items():
            # The parser names a counter's family without _total (OpenMetrics' way), its samples with it.
            family = families.get(name[:-len("_total")] if kind == "counter" else name)
            self.assertIsNotNone(family, f"{name} is not among the parsed families: {sorted(families)}")
            self.assertEqual(family.type, kind, name)
            names = {sample.name for sample in family.samples}
            if kind == "histogram":
                self.assertEqual(names, {f"{name}_bucket", f"{name}_sum", f"{name}_count"}, name)
            else:
                self.assertEqual(names, {name}, name)
        requests = families["ims_http_requests"].samples
        self.assertIn({"method": "POST", "route": "/", "status": "201"}, [sample.labels for sample in requests])

    @unittest.skipUnless(shutil.which("promtool"), "promtool is not installed (Debian: apt-get install prometheus, as .ci/run does)")
    def test_promtool_check_metrics_finds_no_problem(self):
        self.assertEqual(self.upload("a.png", make_image("PNG")).status, 201)
        text = self.scrape().text
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                                timeout=DEADLINE_SECONDS)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_counters_move_by_exactly_the_requests_made(self):
        images = {f"count-{index}.png": make_image("PNG", (64 + index, 48)) for index in range(3)}
        before = self.scrape()
        expected = collections.Counter()
        sent_bodies = received_bodies = 0

        def ask(method, path, status, route, body=None, headers=None):
            nonlocal sent_bodies, received_bodies
            reply = self.request(method, path, body, headers)
            self.assertEqual(reply.status, status, (method, path, reply.body[:300]))
            expected[(method, route, str(status))] += 1
            sent_bodies += len(body or b"")
            received_bodies += len(reply.body)
            return reply

        for name, data in images.items():
            body, content_type = multipart_body(files=[("file", name, data)])
            ask("POST", "/", 201, "/", body, {"Content-Type": content_type})
        for name in [*images, "count-0.png"]:
            ask("GET", f"/{name}", 200, "/{name}")
        ask("HEAD", "/count-1.png", 200, "/{name}")
        ask("GET", "/", 200, "/")
        ask("GET", "/", 200, "/")
        ask("GET", "/missing.png", 404, "/{name}")
        ask("GET", "/missing.png", 404, "/{name}")
        ask("GET", "/no/such/path", 404, "none")
        location = ask("PATCH", "/count-0.png?width=32&height=24", 202, "/{name}").headers["Location"]
        self.assertEqual(ask("GET", f"{location}?wait={DEADLINE_SECONDS}", 200, "/jobs/{id}").json["state"], "done")
        ask("GET", "/jobs/nosuchjob", 404, "/jobs/{id}")
        ask("GET", "/count-1.png?width=20", 200, "/{name}")  # rendered: a miss
        ask("GET", "/count-1.png?width=20", 200, "/{name}")  # from the cache: a hit

        def delta(metrics, name, **labels):
            return metrics.value(name, **labels) - before.value(name, **labels)

        def requests_delta(metrics):
            counts = metrics.requests()
            counts.subtract(before.requests())
            return collections.Counter({key: value for key, value in counts.items() if value and key[1] != "/metrics"})

        def timed_as_counted(metrics):
            return all(metrics.value("ims_http_request_duration_seconds_count", route=route)
                       == metrics.value("ims_http_requests_total", route=route)
                       for route in LABEL_VALUES["route"] - {"/metrics"})

        after = self.settled_scrape(lambda metrics: (
            all(requests_delta(metrics)[key] >= count for key, count in expected.items())
            and delta(metrics, "ims_resize_jobs_total", state="done") >= 1
            and delta(metrics, "ims_rendition_cache_hits_total") >= 1
            and timed_as_counted(metrics)
        ))
        self.assertEqual(requests_delta(after), expected)
        self.assertEqual(delta(after, "ims_uploads_total"), 3)
        self.assertEqual(delta(after, "ims_upload_bytes_total"), sum(len(data) for data in images.values()))
        self.assertEqual(delta(after, "ims_resize_jobs_total", state="done"), 1)
        self.assertEqual(delta(after, "ims_resize_jobs_total", state="failed"), 0)
        self.assertEqual(delta(after, "ims_resize_jobs_total", state="cancelled"), 0)
        self.assertEqual(delta(after, "ims_rendition_cache_misses_total"), 1)
        self.assertEqual(delta(after, "ims_rendition_cache_hits_total"), 1)
        self.assertEqual(delta(after, "ims_rendition_cache_evictions_total"), 0)
        self.assertEqual(delta(after, "ims_resize_duration_seconds_count", kind="job"), 1)
        self.assertEqual(delta(after, "ims_resize_duration_seconds_count", kind="rendition"), 1)
        self.assertGreater(after.value("ims_rendition_cache_bytes"), 0)
        self.assertGreaterEqual(delta(after, "ims_http_received_bytes_total"), sent_bodies)
        self.assertGreaterEqual(delta(after, "ims_http_sent_bytes_total"), received_bodies)
        # Every answered request is in the duration histogram of its route, once (waited for above).
        self.assertTrue(timed_as_counted(after))
        self.assertEqual(after.value("ims_images"), len(self.stored_files()))
        self.assertEqual(after.value("ims_image_bytes"),
                         sum(os.path.getsize(os.path.join(self.storage, name)) for name in self.stored_files()))

    def test_scrapes_count_themselves_as_get_metrics(self):
        key = ("GET", "/metrics", "200")
        first = self.scrape().requests()[key]
        for _ in range(3):
            self.scrape()
        # Counted after its answer, a scrape may or may not see itself; the three before it, it must.
        last = self.settled_scrape(lambda metrics: metrics.requests()[key] >= first + 3)
        self.assertLessEqual(last.requests()[key], first + 5)

    def test_no_label_value_is_an_image_name_a_job_id_or_a_path(self):
        words = ["quokka", "narwhal", "wombat", "axolotl", "capybara", "okapi"]
        self.assertEqual(self.upload("quokka-4711.png", make_image("PNG")).status, 201)
        self.assertEqual(self.upload("narwhal 5309.jpg", make_image("JPEG")).status, 201)
        self.assertEqual(self.request("GET", "/quokka-4711.png").status, 200)
        self.assertEqual(self.request("GET", "/narwhal_5309.jpg?width=10").status, 200)
        self.assertEqual(self.request("GET", "/wombat-8128.png").status, 404)
        self.assertEqual(self.request("GET", "/axolotl/2718").status, 404)
        self.assertEqual(self.request("DELETE", "/okapi.gif").status, 404)
        location = self.submit("quokka-4711.png", "width=10&height=10")
        words.append(location.rsplit("/", 1)[1])
        self.wait_job(location)
        # A method of no route and no standard: counted as "other", with the status sent.
        answer = self.raw_exchange(b"BREW /capybara-1414.png HTTP/1.1\r\nHost: ims.test\r\nConnection: close\r\n\r\n")
        self.assertRegex(answer, rb"^HTTP/1\.[01] [45]\d\d ")
        metrics = self.settled_scrape(lambda metrics: any(
            labels["method"] == "other" for labels, _ in metrics.series("ims_http_requests_total")
        ))
        for word in words:
            self.assertNotIn(word, metrics.text)
        for labels, _ in metrics.series("ims_http_requests_total"):
            self.assertIn(labels["route"], LABEL_VALUES["route"], labels)

    def test_open_connections_counts_those_open_now(self):
        idle = [self.connect() for _ in range(3)]
        for connection in idle:
            self.assertEqual(self.request("GET", "/", connection=connection).status, 200)
        scraper = self.connect()
        # Connections of the requests before are counted until the server has seen them close.
        wait_for(lambda: self.scrape(scraper).value("ims_http_open_connections") == 4)
        for connection in idle:
            connection.close()
        wait_for(lambda: self.scrape(scraper).value("ims_http_open_connections") == 1)

    def test_a_running_resize_shows_and_a_cancelled_one_is_counted(self):
        before = self.scrape()
        location = self.start_slow_resize()
        running = self.settled_scrape(lambda metrics: metrics.value("ims_resize_running") == 1)
        self.assertEqual(running.value("ims_resize_queue_jobs"), 1)
        self.assertEqual(self.request("DELETE", "/slow.png").status, 204)
        self.assertEqual(self.wait_job(location)["state"], "cancelled")
        after = self.settled_scrape(lambda metrics: metrics.value("ims_resize_jobs_total", state="cancelled") >= 1)
        self.assertEqual(after.value("ims_resize_jobs_total", state="cancelled")
                         - before.value("ims_resize_jobs_total", state="cancelled"), 1)
        self.assertEqual(after.value("ims_resize_jobs_total", state="done"), 0)
        self.settled_scrape(lambda metrics: metrics.value("ims_resize_running") == 0
                            and metrics.value("ims_resize_queue_jobs") == 0)

    def test_head_has_the_headers_of_get_and_no_body(self):
        reply = self.request("HEAD", "/metrics")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["Content-Type"], METRICS_CONTENT_TYPE)
        self.assertEqual(reply.body, b"")
        self.assertGreater(int(reply.headers["Content-Length"]), 0)

    def test_other_methods_are_405(self):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            with self.subTest(method=method):
                reply = self.request(method, "/metrics", b"x=1" if method in ("POST", "PUT", "PATCH") else None,
                                     {"Content-Type": FORM})
                self.assertError(reply, 405, None)
                allowed = {word.strip() for word in (reply.headers["Allow"] or "").split(",")}
                self.assertLessEqual({"GET", "HEAD"}, allowed, reply.headers["Allow"])
                self.assertNotIn(method, allowed)

    def test_with_metrics_off_metrics_is_404(self):
        server = start_server(self, os.path.join(self.tempdir.name, "off"), metrics=False)
        connection = self.connect(server.server_address[:2])
        for method in ("GET", "HEAD"):
            with self.subTest(method=method):
                self.assertEqual(self.request(method, "/metrics", connection=connection).status, 404)
        self.assertEqual(self.request("GET", "/", connection=connection).status, 200)


class TestMetricsAcrossWorkers(MetricsAssertions, RealProcessTestCase):
    """`python3 ims.py --workers 3`: whichever worker answers a scrape, it counts for all of them."""

    def scrape_on_new_connection(self, instance):
        """Scrape on a new connection; return the Metrics and the worker that answered."""
        connection = self.connect()
        metrics = self.scrape(connection)
        pid = serving_pid(connection, instance.workers())
        connection.close()
        return metrics, pid

    def start_time_of(self, pid):
        """Return when process `pid` started, in seconds since the epoch (from /proc)."""
        with open("/proc/stat") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith("btime "))
        with open(f"/proc/{pid}/stat") as file:
            ticks = int(file.read().rpartition(")")[2].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")

    def test_every_worker_answers_for_all_and_nothing_goes_down_when_one_is_killed(self):
        instance = self.start_instance("--workers", "3")
        self.port = instance.port
        workers = instance.workers()
        self.assertEqual(len(workers), 3, f"the supervisor's workers: {workers}")
        key = dict(method="GET", route="/", status="200")
        base = self.scrape().value("ims_http_requests_total", **key)
        answered = collections.Counter()
        for _ in range(60):
            connection = self.connect()
            self.assertEqual(self.request("GET", "/", connection=connection).status, 200)
            answered[serving_pid(connection, workers)] += 1
            connection.close()
        self.assertEqual(set(answered), set(workers), f"who answered: {answered}")
        self.settled_scrape(lambda metrics: metrics.value("ims_http_requests_total", **key) >= base + 60)

        # Scrapes on new connections until each worker has answered some: every one shows all 60.
        scraped = collections.Counter()
        for _ in range(100):
            metrics, pid = self.scrape_on_new_connection(instance)
            self.assertEqual(metrics.value("ims_http_requests_total", **key), base + 60, f"as worker {pid} counts")
            self.assertEqual(metrics.value("ims_workers"), 3)
            scraped[pid] += 1
            if set(scraped) == set(workers) and sum(scraped.values()) >= 6:
                break
        self.assertEqual(set(scraped), set(workers), f"who answered the scrapes: {scraped}")
        self.assertAlmostEqual(metrics.value("process_start_time_seconds"), self.start_time_of(instance.process.pid),
                               delta=1.0, msg="not the supervisor's start time")
        cpu_before = metrics.value("process_cpu_seconds_total")
        counters_before = {(name, tuple(sorted(labels.items()))): value for name, labels, value in metrics.samples
                           if metrics.types.get(metrics.family_of(name)) == "counter"}

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{victim}") and len(instance.workers()) == 3)
        replacement = set(instance.workers()) - set(workers)
        self.assertEqual(len(replacement), 1, instance.workers())
        scraped = collections.Counter()

        def scrape_after_the_kill():
            metrics, pid = self.scrape_on_new_connection(instance)
            self.assertEqual(metrics.value("ims_http_requests_total", **key), base + 60, f"as worker {pid} counts")
            self.assertGreaterEqual(metrics.value("process_cpu_seconds_total"), cpu_before,
                                    f"process_cpu_seconds_total went down, as worker {pid} counts")
            for name, labels, value in metrics.samples:
                identity = (name, tuple(sorted(labels.items())))
                if identity in counters_before:
                    self.assertGreaterEqual(value, counters_before[identity], f"{name}{labels} went down")
            scraped[pid] += 1
            return replacement <= set(scraped) and len(scraped) >= 2

        # Until the new worker (listening a moment after it starts) and another have answered.
        wait_for(scrape_after_the_kill)

    def test_metrics_off_from_the_command_line_or_the_environment(self):
        for arguments, env in ((("--workers", "2", "--metrics", "off"), {}), ((), {"IMS_METRICS": "off"}),
                               (("--metrics", "on"), {"IMS_METRICS": "off"})):
            with self.subTest(arguments=arguments, env=env):
                self.port = self.start_instance(*arguments, env=env).port
                status = self.request("GET", "/metrics").status
                self.assertEqual(status, 200 if "on" in arguments else 404)


PROMETHEUS = shutil.which("prometheus", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
PROMTOOL = shutil.which("promtool", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))


def readme_block(fence, holding):
    """Return the README's first ```<fence> block that holds `holding`."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        blocks = [block.split("```", 1)[0] for block in file.read().split(f"```{fence}\n")[1:]]
    found = [block for block in blocks if holding in block]
    if not found:
        raise AssertionError(f"no ```{fence} block of the README holds {holding!r}")
    return found[0]


@unittest.skipUnless(PROMETHEUS, "prometheus is not installed (Debian: apt-get install prometheus, as .ci/run does)")
class TestPrometheus(RealProcessTestCase):
    """A real Prometheus scraping a real `python3 ims.py` every second, with the README's config."""

    def setUp(self):
        super().setUp()
        self.port = self.start_instance().port
        self.prometheus_port = self.start_prometheus(self.port)

    def readme_config(self, target_port):
        """The README's prometheus.yml, scraping `target_port` every second instead of every 15 s."""
        config = readme_block("yaml", "scrape_configs:")
        for old in ("127.0.0.1:5000", "scrape_interval: 15s"):
            self.assertIn(old, config, "the README's Prometheus config has changed: change this test too")
        return config.replace("127.0.0.1:5000", f"127.0.0.1:{target_port}").replace(
            "scrape_interval: 15s", "scrape_interval: 1s")

    def start_prometheus(self, target_port):
        """Start Prometheus in a temporary folder; return its port once it is ready."""
        self.folder = tempfile.mkdtemp(prefix="ims-prometheus-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        config = os.path.join(self.folder, "prometheus.yml")
        with open(config, "w") as file:
            file.write(self.readme_config(target_port))
        port = free_port()
        self.prometheus_log = os.path.join(self.folder, "prometheus.log")
        output = open(self.prometheus_log, "wb")
        self.addCleanup(output.close)
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(self.folder, 'data')}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=output, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True,
        )
        self.addCleanup(self.stop_prometheus, process)
        self.prometheus = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
        self.addCleanup(self.prometheus.close)

        def is_ready():
            if process.poll() is not None:
                self.fail(f"prometheus exited with status {process.returncode}: {self.prometheus_output()}")
            try:
                return self.prometheus_get("/-/ready")[0] == 200
            except OSError:
                self.prometheus.close()
                return False

        wait_for(is_ready)
        return port

    def stop_prometheus(self, process):
        process.terminate()
        try:
            self.assertEqual(process.wait(timeout=DEADLINE_SECONDS), 0, self.prometheus_output())
        finally:
            self.end_session(process.pid)
            process.wait()

    def prometheus_output(self):
        with open(self.prometheus_log, errors="replace") as file:
            return file.read()[-3000:]

    def prometheus_get(self, path):
        self.prometheus.request("GET", path)
        response = self.prometheus.getresponse()
        return response.status, response.read()

    def query(self, expression):
        """Return the result of an instant query through Prometheus' HTTP API (a list of vector samples)."""
        status, body = self.prometheus_get("/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        answer = json.loads(body)
        self.assertEqual((status, answer["status"]), (200, "success"), answer)
        return answer["data"]["result"]

    def query_value(self, expression):
        """Return the one value an instant query gives, or None when it gives none."""
        result = self.query(expression)
        self.assertLessEqual(len(result), 1, result)
        return float(result[0]["value"][1]) if result else None

    def targets(self):
        status, body = self.prometheus_get("/api/v1/targets")
        return json.loads(body)["data"]["activeTargets"]

    def wait_for_query(self, expression, predicate, timeout=60):
        """Wait until `predicate(value of expression)` holds; fail saying what Prometheus saw of IMS."""
        try:
            wait_for(lambda: predicate(self.query_value(expression)), timeout)
        except AssertionError:
            self.fail(f"{expression} is {self.query_value(expression)} after {timeout} s; "
                      f"targets: {self.targets()}; log: {self.prometheus_output()}")

    def test_prometheus_scrapes_ims_and_sees_its_requests(self):
        self.wait_for_query('up{job="ims"}', lambda value: value == 1)
        target, = self.targets()
        self.assertEqual((target["health"], target["lastError"]), ("up", ""), target)
        self.assertEqual(target["scrapeUrl"], f"http://127.0.0.1:{self.port}/metrics")
        info, = self.query('ims_info{job="ims"}')
        self.assertEqual((info["metric"]["version"], info["metric"]["pillow"]), (ims.__version__, Image.__version__))
        expression = 'sum(ims_http_requests_total{job="ims",route="/"})'
        before = self.query_value(expression) or 0
        for _ in range(10):
            self.assertEqual(self.request("GET", "/").status, 200)
        self.wait_for_query(expression, lambda value: (value or 0) >= before + 10)
        # A histogram that PromQL can read: the rate of requests to / answered within +Inf.
        self.wait_for_query('sum(ims_http_request_duration_seconds_bucket{job="ims",route="/",le="+Inf"})',
                            lambda value: (value or 0) >= before + 10)

    @unittest.skipUnless(PROMTOOL, "promtool is not installed (Debian: apt-get install prometheus)")
    def test_promtool_accepts_the_readme_config_as_written(self):
        config = os.path.join(self.folder, "readme.yml")
        with open(config, "w") as file:
            file.write(readme_block("yaml", "scrape_configs:"))
        result = subprocess.run([PROMTOOL, "check", "config", config], capture_output=True, text=True,
                                timeout=DEADLINE_SECONDS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_prometheus_accepts_every_query_the_readme_offers(self):
        queries = [line for line in readme_block("promql", "ims_").splitlines() if line.strip()]
        self.assertGreaterEqual(len(queries), 3)
        for query in queries:
            with self.subTest(query=query):
                self.query(query)  # a query Prometheus cannot parse or run is status 400 "error"


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


class TestOperationsExamples(RealProcessTestCase):
    """The README's systemd unit and container health check, as written, against a real `python3 ims.py`."""

    def healthcheck_command(self, port):
        """Return the argv of the Dockerfile's HEALTHCHECK, its python3 this one, asking `port`."""
        dockerfile = readme_block("dockerfile", "HEALTHCHECK").replace("\\\n", " ")
        line, = [line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK ")]
        argv = json.loads(line.split(" CMD ", 1)[1])
        self.assertEqual(argv[0], "python3")
        self.assertIn("127.0.0.1:5000/healthz", argv[-1])
        return [sys.executable, *argv[1:-1], argv[-1].replace("127.0.0.1:5000", f"127.0.0.1:{port}")]

    def test_the_container_health_check_passes_while_healthy_and_fails_while_the_folder_is_unusable(self):
        self.port = self.start_instance().port
        command = self.healthcheck_command(self.port)
        healthy = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
        self.assertEqual((healthy.returncode, healthy.stderr), (0, ""))
        for case in ("gone", "a file"):
            with self.subTest(storage=case):
                moved = os.path.join(self.tempdir.name, "moved")
                os.rename(self.storage, moved)
                if case == "a file":
                    open(self.storage, "w").close()
                reply = self.request("GET", "/healthz")
                self.assertEqual(reply.status, 503, reply.body)
                self.assertEqual(reply.json["status"], "unavailable", reply.body)
                failed = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
                self.assertEqual(failed.returncode, 1, failed.stderr)
                self.assertIn("503", failed.stderr)
                if case == "a file":
                    os.remove(self.storage)
                os.rename(moved, self.storage)
                again = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
                self.assertEqual((again.returncode, again.stderr), (0, ""))
        with self.subTest(storage="read-only"):
            # A read-only bind mount of the folder on itself, as a volume mounted read-only. Root
            # passes any permission check, so a mount is the one way to show it as root.
            mounted = subprocess.run(["mount", "--bind", self.storage, self.storage], capture_output=True, text=True)
            if mounted.returncode != 0:
                self.skipTest(f"cannot bind-mount the folder here (needs root): {mounted.stderr.strip()}")
            self.addCleanup(subprocess.run, ["umount", self.storage], capture_output=True)
            remounted = subprocess.run(["mount", "-o", "remount,ro,bind", self.storage], capture_output=True, text=True)
            self.assertEqual(remounted.returncode, 0, remounted.stderr)
            self.assertEqual(self.request("GET", "/healthz").status, 503)
            failed = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
            self.assertEqual(failed.returncode, 1, failed.stderr)
            self.assertIn("503", failed.stderr)
            self.assertEqual(subprocess.run(["umount", self.storage], capture_output=True).returncode, 0)
            again = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
            self.assertEqual((again.returncode, again.stderr), (0, ""))
        self.end_session(self.instances[0].process.pid)
        stopped = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
        self.assertEqual(stopped.returncode, 1, stopped.stderr)

    def readme_unit(self):
        return readme_block("ini", "[Service]")

    @unittest.skipUnless(SYSTEMD_ANALYZE, "systemd-analyze is not installed (Debian: the systemd package)")
    def test_systemd_analyze_verify_finds_nothing_to_say_of_the_unit(self):
        path = os.path.join(self.tempdir.name, "ims.service")
        with open(path, "w") as file:
            file.write(self.readme_unit())
        result = subprocess.run([SYSTEMD_ANALYZE, "verify", path], capture_output=True, text=True,
                                timeout=DEADLINE_SECONDS)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_the_unit_runs_ims_with_options_it_takes(self):
        lines = dict(line.split("=", 1) for line in self.readme_unit().splitlines() if "=" in line and not line.startswith("#"))
        for key, value in (("Restart", "on-failure"), ("KillSignal", "SIGTERM"), ("NoNewPrivileges", "yes"),
                           ("ProtectSystem", "strict"), ("ReadWritePaths", "/var/lib/ims"), ("User", "ims")):
            self.assertEqual(lines.get(key), value, key)
        argv = shlex.split(lines["ExecStart"])
        self.assertEqual(argv[:2], ["/usr/bin/python3", "/opt/ims/ims.py"])
        arguments = argv[2:]
        for option, value in (("--host", "0.0.0.0"), ("--storage", "/var/lib/ims"), ("--port", "5000")):
            self.assertEqual(arguments[arguments.index(option) + 1], value, option)
        # Here: this folder, this host only, a free port; every other option as written.
        arguments[arguments.index("--host") + 1] = "127.0.0.1"
        arguments[arguments.index("--storage") + 1] = self.storage
        arguments[arguments.index("--port") + 1] = "0"
        instance = self.start_instance(*arguments)
        self.port = instance.port
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        instance.process.send_signal(signal.SIGTERM)
        self.assertEqual(instance.process.wait(timeout=DEADLINE_SECONDS), 0)


if __name__ == "__main__":
    unittest.main()
