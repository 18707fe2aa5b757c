"""Tests for ims.py: python3 -m unittest -v

Unit tests of the pure parts first, then one class per endpoint against an in-process server,
then the real `python3 ims.py` process. Every fixture image is made here with Pillow.
"""
from __future__ import annotations

import dataclasses
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

from PIL import Image

import ims

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240501


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


def wait_for(predicate, timeout=5.0):
    """Return once `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        threading.Event().wait(0.01)


class ServerTestCase(unittest.TestCase):
    """Each test gets its own storage folder and an in-process server on a free port."""

    server_options = {}

    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "storage")
        self.server = ims.make_server(self.storage, host="127.0.0.1", port=0, quiet=True, **self.server_options)
        # serve_forever() checks for shutdown() every poll_interval; 0.5 s would slow every test.
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.host, self.port = self.server.server_address[:2]

    def connect(self):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
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

    def raw_exchange(self, data, read_until_close=True, timeout=10):
        """Send raw bytes and return everything the server answers until it closes (or times out)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except socket.timeout:
                if read_until_close:
                    raise
            return b"".join(chunks)

    def stored_files(self):
        return sorted(os.listdir(self.storage))

    def assertNoTempFiles(self):
        leftovers = [name for name in os.listdir(self.storage) if name.startswith(ims.TEMP_PREFIX)]
        self.assertEqual(leftovers, [])

    def assertError(self, reply, status, words=""):
        """The reply has `status` and a JSON message (containing `words`)."""
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.headers["Content-Type"], "application/json")
        self.assertIn(words, reply.message)

    def wait_job(self, location, seconds=30):
        reply = self.request("GET", f"{location}?wait={seconds}")
        self.assertEqual(reply.status, 200, reply.body)
        return reply.json


# ====
# The real process
# ====


def start_ims(test, *arguments, env=None):
    """Start `python3 ims.py --port 0 ...` and return (process, port) once it has said it listens."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "ims.py"), "--port", "0", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, **(env or {})),
        cwd=HERE,
        text=True,
    )

    def stop():
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()

    test.addCleanup(stop)
    line = process.stdout.readline()
    test.assertRegex(line, r"^IMS serving .+ on http://127\.0\.0\.1:\d+\n$")
    return process, int(line.rsplit(":", 1)[1])


class TestCommandLine(unittest.TestCase):
    def setUp(self):
        self.tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(self.tempdir.cleanup)
        self.storage = os.path.join(self.tempdir.name, "images")

    def test_start_up_line_names_the_absolute_storage_and_the_real_port(self):
        process, port = start_ims(self, "--storage", self.storage)
        self.assertTrue(os.path.isdir(self.storage))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")
        self.assertEqual(connection.getresponse().read(), b"[]\n")
        connection.close()

    def test_environment_variables_are_the_fallback_for_flags(self):
        process, port = start_ims(self, env={"IMS_STORAGE": self.storage, "IMS_MAX_UPLOAD": "1000"})
        body, content_type = multipart_body(files=[("file", "a.png", bytes(range(256)) * 8)])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
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
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body, content_type = multipart_body(files=[("file", "kept.png", make_image("PNG"))])
        connection.request("POST", "/", body, {"Content-Type": content_type})
        self.assertEqual(connection.getresponse().read(), b'"Image successfully uploaded"\n')
        # The idle keep-alive connection must not hold the stop up.
        process.send_signal(signal_number)
        self.assertEqual(process.wait(timeout=20), 0)
        connection.close()
        self.assertEqual(os.listdir(self.storage), ["kept.png"])

    def test_sigterm_stops_cleanly_with_status_0(self):
        self.check_clean_stop(signal.SIGTERM)

    def test_sigint_stops_cleanly_with_status_0(self):
        self.check_clean_stop(signal.SIGINT)

    def test_leftovers_of_a_killed_upload_are_removed_at_start_up(self):
        os.makedirs(self.storage)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        leftover = os.path.join(self.storage, f"{ims.TEMP_PREFIX}{dead.stdout.strip()}-abc.jpg")
        with open(leftover, "wb") as file:
            file.write(b"half an upload")
        start_ims(self, "--storage", self.storage)
        self.assertEqual(os.listdir(self.storage), [])


@unittest.skipUnless(shutil.which("curl"), "curl is not installed")
class TestReadmeExamples(unittest.TestCase):
    def test_every_curl_example_in_the_readme_works_as_written(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            readme = file.read()
        blocks = [block.split("```", 1)[0] for block in readme.split("```sh\n")[1:]]
        self.assertGreaterEqual(len(blocks), 6)
        tempdir = tempfile.TemporaryDirectory()
        self.addCleanup(tempdir.cleanup)
        process, port = start_ims(self, "--storage", os.path.join(tempdir.name, "storage"))
        outputs = []
        for block in blocks:
            script = block.replace("127.0.0.1:5000", f"127.0.0.1:{port}").replace("downloaded.jpeg", os.path.join(tempdir.name, "downloaded.jpeg"))
            result = subprocess.run(["bash", "-e", "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, (block, result.stderr))
            outputs.append(result.stdout)
        self.assertEqual(outputs[0], "[]\n")
        self.assertEqual(outputs[1], '"Image successfully uploaded"\n')
        with open(os.path.join(HERE, "IMG_X.jpeg"), "rb") as original, open(os.path.join(tempdir.name, "downloaded.jpeg"), "rb") as copy:
            self.assertEqual(original.read(), copy.read())
        self.assertEqual(outputs[3], '"Image resize command received"\n')
        job = json.loads(outputs[4])
        self.assertEqual((job["state"], job["width"], job["height"], job["fit"]), ("done", 200, 200, "cover"))
        self.assertIn("HTTP/1.1 204", outputs[5])


class TestSampleImage(unittest.TestCase):
    def test_img_x_is_a_photo_with_orientation_and_colour_profile(self):
        path = os.path.join(HERE, "IMG_X.jpeg")
        self.assertLess(os.path.getsize(path), 400_000)
        with Image.open(path) as image:
            self.assertEqual(image.format, "JPEG")
            self.assertNotIn(image.getexif().get(0x0112), (None, 1))
            self.assertTrue(image.info.get("icc_profile"))
