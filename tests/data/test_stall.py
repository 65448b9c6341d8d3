"""Remote shards that stop sending: a data server that accepts the connection and never answers, one that sends
the HTTP headers (or half a shard) and then nothing, a `pipe:` command that never writes. Each must end as a
counted, warned skip within the stall limit, kill its reader process, and a source where every shard stalls must
fail the run with the error that names the pattern, in bounded time. Good http and pipe: shards must read exactly
as local ones."""
from __future__ import annotations

import contextlib
import functools
import gc
import http.server
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from testkit import ids_of, take, write_shards

from dbot_ds.data import shard_reader as data

STALL_S = 1.0
# How long a reader may take to go after its test: a DataLoader worker inside a stall kills its reader within one
# stall limit, and DataLoader's shutdown waits up to 5 s (MP_STATUS_CHECK_INTERVAL) for a worker; on a loaded
# 2-core machine process exits lag further. A leaked reader (one that outlives the test) still fails.
READER_EXIT_S = STALL_S + 9


class StallingServer:
    """A TCP server on 127.0.0.1 that accepts and then never finishes. `prefix=None`: it never sends a byte (not
    even HTTP headers); bytes: it answers an HTTP 200 whose body starts with `prefix` and never ends."""

    def __init__(self, prefix: bytes | None = None):
        self.prefix, self.conns = prefix, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:                      # closed: the test is over
                return
            self.conns.append(conn)              # held open, so the client sees no end of data
            if self.prefix is not None:
                request = b""
                while b"\r\n\r\n" not in request and (chunk := conn.recv(4096)):
                    request += chunk
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.prefix) + 10**8}\r\n\r\n".encode()
                conn.sendall(head + self.prefix)

    def close(self) -> None:
        # A bare close leaves the thread blocked in accept, and that thread went on to take connections meant for
        # the next test's http server (curl: "Empty reply from server"). shutdown wakes it; join before closing.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=5)
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def fresh_counters(monkeypatch):
    """Each test starts with no earlier skips or stalls in a row and an open warning window."""
    for name, value in (("_consecutive_skips", 0), ("_consecutive_stalls", 0), ("_last_warning", 0.0)):
        monkeypatch.setattr(data, name, value)


def readers_left(marker: str, within_s: float | None = None) -> list[str]:
    """Shard reader processes still there (running or unreaped) after up to `within_s` seconds (default
    READER_EXIT_S): descendants of this test process named like a reader, and any process
    whose command line holds `marker` (a pipe: command's children, which would be orphans if only the shell had
    been killed). Each poll first collects garbage and lets subprocess reap what it holds: a reader an earlier
    test abandoned (webdataset's Pipe reaps it in __del__, a dropped Popen on the next Popen) must not count as
    this test's."""
    deadline = time.monotonic() + (READER_EXIT_S if within_s is None else within_s)
    while True:
        gc.collect()
        getattr(subprocess, "_cleanup", lambda: None)()      # CPython reaps dropped Popen objects here
        left = [_describe(p) for p in psutil.Process().children(recursive=True)
                if _describe(p).split()[1:2] in (["curl"], ["sleep"], ["sh"], ["cat"])]
        left += [_describe(p) for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or ())]
        left = [d for d in left if d]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _describe(p: psutil.Process) -> str:
    """'pid name status', or '' for a process that has ended meanwhile (gone is what we want)."""
    try:
        return f"{p.pid} {p.name()} {p.status()}"
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("source, workers", [("silent_tcp", 2), ("http_headers_only", 0), ("pipe_sleep", 0)])
def test_every_shard_stalling_fails_naming_the_pattern_in_bounded_time(source, workers, fresh_counters, caplog):
    server = StallingServer(None if source == "silent_tcp" else b"")
    try:
        if source == "pipe_sleep":                # a pipeline: the shell's children must die with it
            pattern, marker = "pipe:sleep 97.3{1..3} | cat", "97.3"
        else:
            pattern, marker = f"http://127.0.0.1:{server.port}/shard-{{000000..000003}}.tar", f":{server.port}/"
        before = data.skipped_samples()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            take(pattern, 1, num_workers=workers, stall_timeout_s=STALL_S)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    msg = str(err.value)
    assert pattern in msg and "3 shards in a row stalled" in msg and "data.stall_timeout_s" in msg
    # 3 stalls of 1 s each, plus process start-up: far from the hang it was (slack for a busy shared CPU).
    assert elapsed < data._MAX_CONSECUTIVE_STALLS * STALL_S + 10, elapsed
    if workers == 0:                              # the counter and the warnings live in this process
        assert data.skipped_samples() - before == data._MAX_CONSECUTIVE_STALLS
        stalls = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
        assert len(stalls) == 3 and all("for 1 s (data.stall_timeout_s)" in m for m in stalls)
        assert all(("97.3" if source == "pipe_sleep" else f"127.0.0.1:{server.port}/shard-") in m for m in stalls)
    # With 2 workers the other worker may be inside its own third stall when the first one's error arrives: it
    # kills that reader within one stall limit. The grace also covers a loaded machine's slow process exits.
    assert readers_left(marker) == []


def test_a_shard_that_stalls_midway_keeps_its_whole_samples_and_counts_one_skip(tmp_path, fresh_counters):
    write_shards(tmp_path / "d", counts=[10])
    whole = (tmp_path / "d/part-000.tar").read_bytes()
    server = StallingServer(whole[: len(whole) // 2])            # about half of the samples, then silence
    url = f"http://127.0.0.1:{server.port}/part-000.tar"
    try:
        before, t0 = data.skipped_samples(), time.monotonic()
        got = list(data._raw_samples(url, stall_s=STALL_S))
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert 2 <= len(got) < 10 and [s["__key__"] for s in got] == [f"{i:05d}" for i in range(len(got))]
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in got)
    assert data.skipped_samples() - before == 1 and data._consecutive_stalls == 1
    assert STALL_S <= elapsed < STALL_S + 5
    assert readers_left(f":{server.port}/") == []


@pytest.fixture
def http_folder(tmp_path):
    """(folder with 6 shards + manifest, base url of an http server that serves it)."""
    write_shards(tmp_path / "d")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "d"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path / "d", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:         # no access log on the test output
        pass


def test_good_http_and_pipe_shards_read_exactly_like_local_ones(http_folder, fresh_counters):
    folder, base = http_folder
    manifest = str(folder / "manifest.json")
    local = [ids_of(x) for x, _ in take(f"{folder}/part-{{000..005}}.tar", 15, resampled=False)]
    via_http = take(f"{base}/part-{{000..005}}.tar", 15, resampled=False, manifest=manifest, stall_timeout_s=STALL_S)
    via_pipe = take("::".join(f"pipe:cat {folder}/part-{s:03d}.tar" for s in range(6)), 15, resampled=False,
                    manifest=manifest, stall_timeout_s=STALL_S)
    assert [n.skipped for _, n in via_http] == [0] * 15 and [n.skipped for _, n in via_pipe] == [0] * 15
    assert [ids_of(x) for x, _ in via_http] == local and [ids_of(x) for x, _ in via_pipe] == local
    assert readers_left(base.rsplit(":", 1)[1] + "/") == []


def test_http_error_is_a_quick_skip_not_a_stall(http_folder, fresh_counters):
    _, base = http_folder
    before, t0 = data.skipped_samples(), time.monotonic()
    assert list(data._raw_samples(f"{base}/missing.tar", stall_s=30.0)) == []    # curl -f: 404 is exit 22
    assert data.skipped_samples() - before == 1 and data._consecutive_stalls == 0
    assert time.monotonic() - t0 < 10


def test_stall_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="stall_timeout_s"):
        take(write_shards(Path(tmp_path) / "d"), 1, stall_timeout_s=0)
