"""Remote shards (http(s), `pipe:`, and every other scheme webdataset's gopen runs a reader process for) read with a
stall limit: a shard whose reader sends no byte for the limit raises :class:`ShardStalled`, and its reader process
(for `pipe:`, every process of the command) is killed and reaped.

Separate because it is process and pipe handling, with nothing of images or batches in it: shard_reader.py opens
non-local shards through :func:`_open_remote` and counts a :class:`ShardStalled` as a stalled shard.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import subprocess
import weakref
from collections.abc import Iterable

from webdataset import utils as wds_utils
from webdataset.gopen import Pipe, gopen, rewrite_url

_LIVE: weakref.WeakSet = weakref.WeakSet()       # this process's open reader pipes (see kill_readers_on_sigterm)


class ShardStalled(TimeoutError):
    """A remote shard sent no byte within the stall limit; its reader process was killed."""


class _StallLimitedPipe:
    """The stdout of a shard's reader process (curl for http(s), the shell of a `pipe:` command, ...) with a stall
    limit: `read` raises :class:`ShardStalled`, after killing the process, when no byte arrives for `stall_s`
    seconds. Only time spent waiting inside `read` counts, so a slow consumer never looks like a stalled server.
    Reads are short (at most `size` bytes of what has arrived), which tarfile's stream reader expects."""

    _CHUNK = 1 << 20    # bytes per os.read: tarfile asks for 10 KiB at a time; a poll per 10 KiB costs 40% speed

    def __init__(self, url: str, proc: subprocess.Popen, ok_status: Iterable[int], own_group: bool, stall_s: float,
                 pipe: Pipe | None = None):
        self.url, self.proc, self.ok_status = url, proc, set(ok_status)
        self.own_group, self.stall_s = own_group, stall_s
        # gopen's own wrapper, if it started the process: held so that its __del__, which closes the pipe and
        # then waits up to 2 h for the process, runs only after `close` has killed and reaped it.
        self.pipe = pipe
        self.fd = proc.stdout.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.eof = False
        self.buf, self.pos = b"", 0       # bytes read from the pipe and not yet returned: buf[pos:]
        _LIVE.add(self)

    def __repr__(self) -> str:           # webdataset puts the stream into its error messages
        return f"<shard stream {self.url}>"

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(functools.partial(self.read, 1 << 20), b""))
        if self.pos == len(self.buf):
            if self.eof or size == 0:
                return b""
            if not self.poller.poll(self.stall_s * 1000):
                self._stall("sent no bytes")
            self.buf, self.pos = os.read(self.fd, self._CHUNK), 0   # raw fd: a buffered read would wait, unwatched
            if not self.buf:
                self._end()
                return b""
        out = self.buf[self.pos:self.pos + size]
        self.pos += len(out)
        return out

    def _stall(self, what: str) -> None:
        self.close()
        raise ShardStalled(f"{self.url} {what} for {self.stall_s:g} s (data.stall_timeout_s); its reader was killed")

    def _end(self) -> None:
        """End of output: the process must exit soon, with a good status (curl -f reports HTTP errors as 22)."""
        self.eof = True
        try:
            status = self.proc.wait(timeout=self.stall_s)
        except subprocess.TimeoutExpired:
            self._stall("closed its output but did not exit")
        if status not in self.ok_status:
            raise OSError(f"{self.url}: reader exited with status {status}")

    def close(self) -> None:
        """Kill the reader unless it has exited (for `pipe:`, every process of the command), and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self.own_group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        _LIVE.discard(self)


def kill_readers_on_sigterm(_worker_id: int | None = None) -> None:
    """A DataLoader worker's init: when the DataLoader terminates the worker (its shutdown sends SIGTERM to a worker
    that does not exit in time, e.g. one waiting out a stalled shard), kill the worker's reader processes first.
    Without this a curl connected to a silent server outlives its worker as an orphan that never exits."""
    def on_sigterm(signum, _frame):
        for pipe in list(_LIVE):
            with contextlib.suppress(Exception):
                pipe.close()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    signal.signal(signal.SIGTERM, on_sigterm)


def _open_remote(url: str, stall_s: float):
    """A non-local shard opened as webdataset's gopen opens it, but read with a stall limit.

    A `pipe:` command starts in a session of its own, so that a stall kills the whole command (the shell and the
    `aws`/`curl`/... it started), not only the shell. Every other scheme webdataset knows (http(s) and sftp via
    curl, gs, ais, hf, ...) runs one reader process, which gopen starts; that process is watched and killed."""
    url = rewrite_url(url)
    if url.startswith("pipe:"):
        if wds_utils.enforce_security:
            raise ValueError("pipe: urls are disabled (WDS_SECURE is set)")
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        return _StallLimitedPipe(url, proc, (0, 141), True, stall_s)   # 141: the shell's SIGPIPE status
    stream = gopen(url, "rb")
    if isinstance(stream, Pipe):
        return _StallLimitedPipe(url, stream.proc, stream.ignore_status, False, stall_s, pipe=stream)
    return stream                        # a user-registered gopen handler's own stream object: read as it is
