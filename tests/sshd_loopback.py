"""A throwaway sshd on 127.0.0.1 for the multi-node launcher test: two hostfile "nodes" (localhost and 127.0.0.1)
that the deepspeed launcher reaches over its default pdsh + ssh path.

Nothing outside a temp folder is configured: ~/.ssh and /etc/ssh are never read or written. Everything lives in
`workdir`:
- host_key / client_key: fresh ed25519 keys;
- authorized_keys: the client key, accepted only from 127.0.0.1 (sshd's `AuthorizedKeysFile` points here);
- known_hosts: the host key for [localhost]:PORT and [127.0.0.1]:PORT, so host keys are still checked;
- sshd_config: loopback only, keys only, no PAM (`sshd -D -f sshd_config`, stopped by pid);
- ssh_config + bin/ssh: an `ssh` wrapper that runs the system ssh with `-F ssh_config`. Put bin/ first on PATH:
  DeepSpeed's own reachability check (`ssh -o PasswordAuthentication=no -p PORT localhost hostname`) and pdsh's
  ssh module both exec plain `ssh` from PATH, and neither takes an identity file or known_hosts from the
  environment. The port travels through DeepSpeed's `--ssh_port` (it appends `-p PORT` to PDSH_SSH_ARGS_APPEND).

The one system-wide effect: sshd refuses to start without its privilege-separation folder /run/sshd, which is
created (empty, as the Debian service would) when missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
# Debian package -> a file it installs (the check that it is there).
PACKAGES = {"openssh-server": SSHD, "openssh-client": "/usr/bin/ssh", "pdsh": "/usr/bin/pdsh"}


def ensure_packages(timeout: int = 600) -> None:
    """Install openssh-server, openssh-client and pdsh with apt-get when missing (idempotent, quiet).

    Raises RuntimeError with a clear message when they are missing and cannot be installed."""
    missing = [pkg for pkg, exe in PACKAGES.items() if not Path(exe).exists()]
    if not missing:
        return
    why = f"the multi-node launcher test needs Debian packages {missing} (sshd, ssh, pdsh)"
    if not shutil.which("apt-get"):
        raise RuntimeError(f"{why}, and there is no apt-get here: install them by hand")
    if os.geteuid() != 0:
        raise RuntimeError(f"{why}: run `sudo apt-get install -y openssh-server pdsh` or run the tests as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    deadline = time.monotonic() + timeout
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{why}; `{' '.join(cmd)}` did not finish within {timeout} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{why}; `{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
    still = [pkg for pkg, exe in PACKAGES.items() if not Path(exe).exists()]
    if still:
        raise RuntimeError(f"{why}; apt-get succeeded but {still} are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSshd:
    """`with LoopbackSshd(tmpdir) as sshd:` runs sshd on 127.0.0.1:sshd.port; `sshd.env(base)` is an environment
    in which `ssh -p PORT localhost CMD` (and pdsh) log in with the throwaway key."""

    HOSTS = ("localhost", "127.0.0.1")

    def __init__(self, workdir: str | os.PathLike):
        self.dir = Path(workdir).resolve()
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.bin = self.dir / "bin"
        self.log = self.dir / "sshd.log"

    # -- files -------------------------------------------------------------------------------------------------
    def _keygen(self, name: str) -> str:
        key = self.dir / name
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dbot-test-{name}", "-f", str(key)],
                           check=True, capture_output=True, timeout=30)
        return (self.dir / f"{name}.pub").read_text().strip()

    def _write_files(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        host_pub, client_pub = self._keygen("host_key"), self._keygen("client_key")
        (self.dir / "authorized_keys").write_text(f'from="127.0.0.1,::1" {client_pub}\n')
        key_type, key_b64 = host_pub.split()[:2]
        names = ",".join(f"[{h}]:{self.port}" for h in self.HOSTS)
        (self.dir / "known_hosts").write_text(f"{names} {key_type} {key_b64}\n")
        (self.dir / "sshd_config").write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.dir / 'host_key'}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",            # the temp folder's modes are whatever mktemp gave
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "MaxStartups 50",            # pdsh opens one connection per host at once
            "LogLevel ERROR",
            "",
        ]))
        (self.dir / "ssh_config").write_text("\n".join([
            "Host *",
            f"  IdentityFile {self.dir / 'client_key'}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.dir / 'known_hosts'}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
            "  LogLevel ERROR",
            "",
        ]))
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{self.dir / "ssh_config"}" "$@"\n')
        wrapper.chmod(0o755)

    # -- process -----------------------------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) with the ssh wrapper first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def ssh(self, host: str, *cmd: str, timeout: int = 20) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ssh"), "-p", str(self.port), host, *cmd],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, tries: int = 3) -> "LoopbackSshd":
        priv_sep = Path("/run/sshd")
        if not priv_sep.is_dir():
            try:
                priv_sep.mkdir(mode=0o755, parents=True)
            except OSError as e:
                raise RuntimeError(f"sshd needs its privilege-separation folder {priv_sep}: {e}") from None
        last = ""
        for _ in range(tries):                       # another process may take the free port first
            self.port = _free_port()
            self._write_files()
            test = subprocess.run([SSHD, "-t", "-f", str(self.dir / "sshd_config")],
                                  capture_output=True, text=True, timeout=30)
            if test.returncode != 0:
                raise RuntimeError(f"sshd rejected the test config: {test.stdout}{test.stderr}")
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                probe = self.ssh("localhost", "true", timeout=15)
                if probe.returncode == 0:
                    return self
                last = probe.stderr
                time.sleep(0.2)
            self.stop()
            last = f"{last}\nsshd log:\n{self.log.read_text()[-2000:]}"
        raise RuntimeError(f"could not log in to the loopback sshd on 127.0.0.1:{self.port}: {last}")

    def _children(self) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        """Let finished sessions be reaped by sshd, then end sshd (by its pid) and wait for it."""
        if self.proc is None:
            return
        deadline = time.monotonic() + 5
        while self.proc.poll() is None and self._children() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "LoopbackSshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
