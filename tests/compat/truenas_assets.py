"""What TrueNAS's API tests import, rebuilt for keyhaven.

TrueNAS's ``tests/api2`` run against a live TrueNAS through helpers from
``middlewared.test.integration``: ``utils.call`` (a middleware call),
``utils.ssh`` / ``legacy_functions.SSH_TEST`` (real ``ssh`` to the system),
``assets.account.user`` / ``group`` / ``temporary_update``,
``assets.keychain.ssh_keypair`` and ``assets.pool.dataset``. This module gives
the ported tests (``test_api2_*.py``) the same helpers over a keyhaven daemon:

* calls go through pytruenas (JSON-RPC 2.0 at ``/api/current``), a client
  nobody here wrote;
* ``ssh`` is OpenSSH's own client against the sshd keyhaven supervises, with
  the host keys pinned from ``ssh.config`` (TrueNAS's helper turns host-key
  checking off);
* accounts are real OS accounts. With ``accounts.manage_os = false`` keyhaven
  never changes OS accounts, so the helper creates the OS account first
  (``useradd``, names ``tn<hex>``) as an administrator would; with ``true``
  keyhaven runs useradd/usermod/userdel itself. Everything made here is
  removed again (``userdel``, then the home only when it lies below the
  daemon's own directory or is ``/home/tn<hex>``).

Ported: test_keychain_key_pair.py, test_keychain_ssh.py,
test_account_ssh_key.py, test_user_ssh_password.py and the SSH parts of
test_001_ssh.py. Not ported: test_rsync_ssh_authentication.py (it needs
``rsynctask.*``, which keyhaven does not have yet), test_keychain_replication.py
(replication tasks) and the non-SSH checks of test_001_ssh.py (pools,
datasets, builtin groups).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pytruenas import TrueNASClient, ValidationErrors

SAFE_BASE = pathlib.Path("/var/lib/keyhaven-test")
# TrueNAS's home for an account created without one (DEFAULT_HOME_PATH).
DEFAULT_HOME_PATH = "/var/empty"
NO_LOGIN_SHELL = "/usr/sbin/nologin"
# The shell semi-automatic setup gives a nologin account (TrueNAS's choice);
# also keyhaven's default shell for accounts it creates.
LOGIN_SHELL = "/usr/bin/bash"
ESSLCERTVERIFICATIONERROR = 208
SSH_TIMEOUT = 30.0
# sshd re-executes itself on SIGHUP; keyhaven waits for it to listen again, so
# this only covers a refused connection in a window keyhaven did not see.
SSH_RETRY_FOR = 5.0


def unavailable_reason() -> str | None:
    """Why the TrueNAS tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "TrueNAS API tests need root (sshd, useradd)"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "useradd", "userdel", "usermod", "groupadd", "chpasswd"):
        if not (shutil.which(tool) or os.access(tool, os.X_OK)):
            return f"TrueNAS API tests need {tool} (Debian packages openssh-server, openssh-client, passwd)"
    return None


def free_wildcard_port() -> int:
    """A TCP port free on the wildcard address (where sshd will listen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def sh(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def os_account(name: str) -> pwd.struct_passwd | None:
    """The OS account as NSS (getpwnam) has it."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def free_uid(start: int = 20000) -> int:
    """A uid no OS account has."""
    taken = {p.pw_uid for p in pwd.getpwall()}
    return next(uid for uid in range(start, start + 100000) if uid not in taken)


def os_group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def is_enoent(e: Exception) -> bool:
    """InstanceNotFound: a ValidationError without attribute, errno ENOENT."""
    return isinstance(e, ValidationErrors) and any(code == errno.ENOENT for _a, _m, code in e.errors)


def generate_key_files(directory: pathlib.Path, name: str, *, key_type: str = "ed25519",
                       passphrase: str = "") -> tuple[pathlib.Path, str]:
    """``ssh-keygen`` a key pair into ``directory``; returns (private key path, public key line)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    sh("ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", f"compat-{name}", "-f", str(path))
    return path, (directory / f"{name}.pub").read_text()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_of(uid: int) -> list[int]:
    """PIDs whose real uid is ``uid``."""
    pids = []
    for status in pathlib.Path("/proc").glob("[0-9]*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("Uid:"):
                    if int(line.split()[1]) == uid:
                        pids.append(int(status.parent.name))
                    break
        except (OSError, ValueError):
            continue
    return pids


def wait_sessions_closed(username: str, timeout: float = 5.0) -> None:
    """Wait until no process runs as ``username``.

    After ``ssh`` returns, sshd's session process for the account can take a
    second or two to exit (PAM session close). ``userdel`` refuses an account
    that still has processes -- and with accounts.manage_os = true
    ``user.delete`` runs it, failing where TrueNAS's would not.
    """
    account = os_account(username)
    if account is None or account.pw_uid == 0:
        return
    deadline = time.monotonic() + timeout
    while processes_of(account.pw_uid) and time.monotonic() < deadline:
        time.sleep(0.02)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """TCP sockets in LISTEN state held by ``pid``: (address, port)."""
    inodes = set()
    fd_dir = pathlib.Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = TCP_LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
            found.append((str(addr), int(port_hex, 16)))
    return found


@dataclass
class TrueNASSystem:
    """One keyhaven daemon standing in for "the TrueNAS under test"."""

    kh: object  # conftest.Keyhaven
    base: pathlib.Path  # root-owned 0755, holds the data dir, test homes and ssh files
    manage_os: bool
    keys_in_home: bool
    tls: bool
    ssh_port: int
    initial_services: list
    client: TrueNASClient
    _sshd_pids: set = field(default_factory=set)

    @property
    def url(self) -> str:
        """The URL semi-automatic setup pairs with: this system itself."""
        return self.kh.url

    def call(self, method: str, *params, job: bool = False):
        """``middlewared.test.integration.utils.call`` through pytruenas."""
        ns = self.client.api
        for part in method.split("."):
            ns = getattr(ns, part)
        if job:
            return ns(*params, job=True, _timeout=60)
        return ns(*params)

    def new_client(self, **credentials) -> TrueNASClient:
        options = {"verify": False} if self.tls else {}
        return TrueNASClient(self.kh.target, **credentials, **options)

    # -- sshd -------------------------------------------------------------

    def remember_sshd(self) -> None:
        st = self.call("service.query", [["service", "=", "ssh"]], {"get": True})
        self._sshd_pids.update(st.get("pids") or [])

    def ensure_sshd(self) -> int:
        """Start the SSH service (on its free wildcard port) unless it runs."""
        st = self.call("service.query", [["service", "=", "ssh"]], {"get": True})
        if st["state"] != "RUNNING":
            self.call("service.control", "START", "ssh", job=True)
        self.remember_sshd()
        return self.ssh_port

    def known_hosts(self) -> pathlib.Path:
        """A known_hosts file from the host keys ``ssh.config`` reports."""
        keys = self.call("ssh.config")["host_keys"]
        path = self.base / "ssh" / "known_hosts"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text("".join(f"[127.0.0.1]:{self.ssh_port} {k['public_key']}\n" for k in keys))
        return path

    def ssh(self, command: str, *, user: str = "root", password: str | None = None,
            key_path: pathlib.Path | None = None) -> dict:
        """``legacy_functions.SSH_TEST``: real ``ssh`` to this system's sshd.

        Returns ``{stdout, stderr, output, returncode, result}`` like TrueNAS's
        helper. A password is given through ``SSH_ASKPASS`` (no sshpass).
        """
        known_hosts = self.known_hosts()
        args = [
            "ssh", "-F", "/dev/null", "-p", str(self.ssh_port),
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=error", "-o", "IdentitiesOnly=yes",
        ]
        env = dict(os.environ)
        if password is None:
            args += ["-o", "BatchMode=yes", "-o", "PreferredAuthentications=publickey"]
            if key_path is not None:
                args += ["-i", str(key_path)]
        else:
            secret = self.base / "ssh" / f"password-{secrets.token_hex(4)}"
            secret.write_text(password + "\n")
            secret.chmod(0o600)
            askpass = self.base / "ssh" / f"askpass-{secrets.token_hex(4)}"
            askpass.write_text(f"#!/bin/sh\ncat '{secret}'\n")
            askpass.chmod(0o700)
            env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=env.get("DISPLAY", ":0"))
            args += [
                "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
                "-o", "PreferredAuthentications=password,keyboard-interactive",
            ]
        args += [f"{user}@127.0.0.1", command]
        deadline = time.monotonic() + SSH_RETRY_FOR
        while True:
            p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=SSH_TIMEOUT, env=env)
            transient = p.returncode == 255 and ("Connection refused" in p.stderr or "Connection reset" in p.stderr)
            if not transient or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return {
            "stdout": p.stdout,
            "stderr": p.stderr,
            "output": p.stdout + p.stderr,
            "returncode": p.returncode,
            "result": p.returncode == 0,
        }

    def keys_file(self, username: str, home: str) -> pathlib.Path:
        """Where keyhaven writes an account's authorized keys."""
        if self.keys_in_home:
            return pathlib.Path(home) / ".ssh" / "authorized_keys"
        return self.kh.data_dir / "sshd" / "authorized_keys" / username

    # -- lifecycle --------------------------------------------------------

    def stop(self, stop_process: Callable) -> None:
        with contextlib.suppress(Exception):
            self.remember_sshd()
        with contextlib.suppress(Exception):
            self.call("service.control", "STOP", "ssh", job=True)
        with contextlib.suppress(Exception):
            self.client.close()
        stop_process(self.kh.proc)
        # keyhaven stops its sshd when it exits; kill by PID any that is left
        # (only an sshd started with this daemon's own configuration).
        config = str(self.kh.data_dir / "sshd" / "sshd_config")
        for pid in self._sshd_pids:
            if _pid_alive(pid) and config in _cmdline(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def start_system(start: Callable, *, manage_os: bool, keys_in_home: bool, tls: bool) -> TrueNASSystem:
    """A fresh daemon in its own directory below /var/lib/keyhaven-test.

    sshd (StrictModes) refuses keys below a group- or world-writable
    directory such as /tmp, so daemons that run sshd live on a root-owned path.
    """
    SAFE_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    base = SAFE_BASE / f"compat-{secrets.token_hex(4)}"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    env = {
        "KEYHAVEN_ACCOUNTS_MANAGE_OS": "true" if manage_os else "false",
        "KEYHAVEN_SSH_AUTHORIZED_KEYS_LOCATION": "home" if keys_in_home else "data",
        "KEYHAVEN_TLS": "true" if tls else "false",
    }
    try:
        kh = start(base, env, make_data_dir=False)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    client = None
    try:
        options = {"verify": False} if tls else {}
        client = TrueNASClient(kh.target, username="admin", password=kh.password, **options)
        # What a fresh system runs, before any test touches it (test_002_firstboot_checks).
        initial_services = client.api.service.query()
        # sshd must never take this machine's port 22.
        port = free_wildcard_port()
        client.api.ssh.update({"tcpport": port})
    except BaseException:
        if client is not None:
            client.close()
        kh.proc.terminate()
        kh.proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
        raise
    return TrueNASSystem(kh, base, manage_os, keys_in_home, tls, port, initial_services, client)


class TrueNASSystems:
    """Daemons started on first use, one per (manage_os, keys location, TLS)."""

    def __init__(self, start: Callable, stop: Callable):
        self._start = start
        self._stop = stop
        self._systems: dict[tuple[bool, bool, bool], TrueNASSystem] = {}

    def get(self, *, manage_os: bool, keys_in_home: bool = False, tls: bool = False) -> TrueNASSystem:
        key = (manage_os, keys_in_home, tls)
        if key not in self._systems:
            self._systems[key] = start_system(self._start, manage_os=manage_os, keys_in_home=keys_in_home, tls=tls)
        return self._systems[key]

    def stop_all(self) -> None:
        for system in self._systems.values():
            system.stop(self._stop)
        self._systems.clear()


class Accounts:
    """``assets.account`` and ``assets.pool.dataset`` for one system, with cleanup."""

    def __init__(self, system: TrueNASSystem):
        self.system = system
        self._users: list[str] = []
        self._groups: list[str] = []
        self._paths: list[pathlib.Path] = []

    @staticmethod
    def name(prefix: str = "tn") -> str:
        return f"{prefix}{secrets.token_hex(4)}"

    def dataset(self) -> str:
        """``assets.pool.dataset``: a fresh directory "on a data pool" (root, 0755)."""
        path = self.system.base / "mnt" / secrets.token_hex(4)
        path.mkdir(mode=0o755, parents=True)
        path.chmod(0o755)
        self._paths.append(path)
        return str(path)

    def os_group(self) -> str:
        name = self.name("tng")
        self._groups.append(name)
        sh("groupadd", name)
        return name

    def os_user(self, name: str, *, home: str = DEFAULT_HOME_PATH, shell: str = LOGIN_SHELL,
                make_home: bool = True, groups: list[str] | tuple = ()) -> None:
        """``useradd``: what an administrator does before keyhaven (manage_os = false) can use an account."""
        self._users.append(name)
        args = ["useradd", "-s", shell, "-d", home, "-m" if make_home else "-M"]
        if groups:
            args += ["-G", ",".join(groups)]
        sh(*args, name)

    def set_os_password(self, name: str, password: str) -> None:
        sh("chpasswd", input=f"{name}:{password}\n")

    @contextlib.contextmanager
    def user(self, data: dict) -> Iterator[dict]:
        """``assets.account.user``: ``user.create``, then ``user.delete`` at the end."""
        data = dict(data)
        data.setdefault("home_create", True)
        name = data["username"]
        self._users.append(name)
        home = data.get("home", DEFAULT_HOME_PATH)
        if not self.system.manage_os:
            if os_account(name) is None:
                # keyhaven differs: with accounts.manage_os = false the OS account
                # must exist first; keyhaven maps to it by name.
                self.os_user(name, home=home, shell=data.get("shell", LOGIN_SHELL),
                             make_home=bool(data["home_create"]) and home != DEFAULT_HOME_PATH,
                             groups=[g for g in data.get("groups", []) if isinstance(g, str)])
                if data.get("password"):
                    # keyhaven differs: without manage_os its password is for its
                    # API only; the OS (PAM, sshd) password is the OS's business.
                    self.set_os_password(name, data["password"])
        # keyhaven (manage_os = true) makes the home, /home/<name> when none is given;
        # userdel leaves it behind. Removed at cleanup when it is ours.
        self._paths.append(pathlib.Path(data["home"]) if "home" in data else pathlib.Path("/home") / name)
        entry = self.system.call("user.create", data)
        try:
            yield entry
        finally:
            self.delete(entry["id"])

    def delete(self, user_id: int) -> None:
        if self.system.manage_os:
            with contextlib.suppress(Exception):
                wait_sessions_closed(self.system.call("user.get_instance", user_id)["username"])
        try:
            self.system.call("user.delete", user_id)
        except ValidationErrors as e:
            if not is_enoent(e):
                raise

    def _removable(self, path: pathlib.Path) -> bool:
        path = pathlib.Path(os.path.normpath(path))
        if self.system.base in path.parents:
            return True
        return path.parent == pathlib.Path("/home") and path.name in self._users

    def cleanup(self) -> None:
        names = list(dict.fromkeys(self._users))
        if names:
            with contextlib.suppress(Exception):
                for entry in self.system.call("user.query", [["username", "in", names]]):
                    with contextlib.suppress(Exception):
                        self.delete(entry["id"])
        for name in names:
            account = os_account(name)
            if account is not None:
                self._paths.append(pathlib.Path(account.pw_dir))
                wait_sessions_closed(name)
                # Never `userdel -r`: the home is removed below, and only when it is ours.
                sh("userdel", name, check=False)
            if os_group_exists(name):
                sh("groupdel", name, check=False)
        for group in self._groups:
            if os_group_exists(group):
                sh("groupdel", group, check=False)
        for path in self._paths:
            if self._removable(path):
                shutil.rmtree(path, ignore_errors=True)
        self._users.clear()
        self._groups.clear()
        self._paths.clear()


@contextlib.contextmanager
def temporary_update(system: TrueNASSystem, user: dict, data: dict) -> Iterator[dict]:
    """``assets.account.temporary_update``: ``user.update``, rolled back afterwards."""
    try:
        yield system.call("user.update", user["id"], data)
    finally:
        system.call("user.update", user["id"], {k: user[k] for k in data.keys() if k in user})


@contextlib.contextmanager
def ssh_keypair(system: TrueNASSystem, name: str | None = None) -> Iterator[dict]:
    """``assets.keychain.ssh_keypair``: a stored, generated key pair."""
    keypair = system.call("keychaincredential.create", {
        "name": name or f"key-{secrets.token_hex(4)}",
        "type": "SSH_KEY_PAIR",
        "attributes": system.call("keychaincredential.generate_ssh_key_pair"),
    })
    try:
        yield keypair
    finally:
        try:
            # cascade: a connection a failed test left behind goes too
            system.call("keychaincredential.delete", keypair["id"], {"cascade": True})
        except ValidationErrors as e:
            if not is_enoent(e):
                raise
