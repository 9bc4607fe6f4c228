"""Fixtures for the TrueNAS client compatibility suite.

One keyhaven daemon is started per test session (fresh data dir, random
admin password, port chosen by the OS) and stopped with SIGTERM by PID at the
end. The binary is ``$KEYHAVEN_BIN`` (default ``target/debug/keyhaven``,
relative to the repository root).

Clients under test, each used through its public API:

* pytruenas 0.7.1         -- JSON-RPC 2.0 at ``/api/current`` (test_pytruenas.py)
* aiotruenas-client 0.10.0 -- legacy DDP-style ``/websocket`` (test_aiotruenas.py)

TrueNAS's own API tests (test_api2_*.py) run against daemons of their
own, one per account mode (``accounts.manage_os`` false and true), each with
a real sshd: see the ``truenas`` fixtures at the end and truenas_assets.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
READY_LINE = re.compile(r"^keyhaven listening on (https?)://127\.0\.0\.1:(\d+)\s*$")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# pytruenas reads its per-call timeout from here (documented in
# pytruenas.connection.default_call_timeout); 60 s by default is too long for
# a suite that should fail fast.
os.environ.setdefault("PYTRUENAS_CALL_TIMEOUT", "10")


def keyhaven_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("KEYHAVEN_BIN") or "target/debug/keyhaven")
    if not path.is_absolute():
        path = ROOT / path
    return path


@dataclass
class Keyhaven:
    """A running daemon."""

    bin: pathlib.Path
    data_dir: pathlib.Path
    password: str
    port: int
    proc: subprocess.Popen
    stderr_path: pathlib.Path
    _keys: list = field(default_factory=list)
    scheme: str = "http"

    username = "admin"

    @property
    def host(self) -> str:
        """``host:port``, the form aiotruenas-client takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        """A pytruenas connection string (it appends ``/api/current`` itself)."""
        ws = "wss" if self.scheme == "https" else "ws"
        return f"{ws}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The base URL another system pairs with (``http(s)://127.0.0.1:port``)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def cli(self, method: str, *params) -> object:
        """Call a method through ``keyhaven call`` (the local socket), for setup."""
        args = [str(self.bin), "call", "--data-dir", str(self.data_dir), method]
        args += [json.dumps(p) for p in params]
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(
                f"keyhaven call {method} failed ({out.returncode}): {out.stderr.strip()}"
            )
        text = out.stdout.strip()
        return json.loads(text) if text else None

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _start(tmp: pathlib.Path, env: dict[str, str] | None = None, *, make_data_dir: bool = True) -> Keyhaven:
    """Start a daemon with its data dir in ``tmp/data``.

    ``env`` adds settings (``KEYHAVEN_*``). With ``make_data_dir`` false the
    daemon creates the data dir itself (0711: sshd must reach the per-user
    keys files below it as each user, see shared/DESIGN.md section 2).
    """
    binary = keyhaven_bin()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.exit(
            f"keyhaven binary not found at {binary}: build it with `cargo build -p keyhaven` "
            "or point $KEYHAVEN_BIN at it",
            returncode=3,
        )
    data_dir = tmp / "data"
    if make_data_dir:
        data_dir.mkdir()
        data_dir.chmod(0o700)  # keyhaven refuses a data dir that group or others can read
    stdout_path = tmp / "stdout.log"
    stderr_path = tmp / "stderr.log"
    password = "compat-" + secrets.token_urlsafe(12)
    env = dict(os.environ, **(env or {}), KEYHAVEN_ADMIN_PASSWORD=password)
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [str(binary), "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp,
        )
    deadline = time.monotonic() + START_TIMEOUT
    port = None
    scheme = "http"
    while time.monotonic() < deadline:
        for line in stdout_path.read_text(errors="replace").splitlines():
            m = READY_LINE.match(line)
            if m:
                scheme, port = m.group(1), int(m.group(2))
                break
        if port is not None or proc.poll() is not None:
            break
        time.sleep(0.05)
    kh = Keyhaven(binary, data_dir, password, port or 0, proc, stderr_path, scheme=scheme)
    if port is None:
        _stop(proc)
        pytest.exit(
            f"keyhaven did not print its ready line within {START_TIMEOUT:.0f} s "
            f"(exit status {proc.returncode}); stderr:\n{kh.stderr_tail()}",
            returncode=3,
        )
    return kh


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="session")
def keyhaven(tmp_path_factory) -> Keyhaven:
    kh = _start(tmp_path_factory.mktemp("keyhaven"))
    yield kh
    _stop(kh.proc)


@pytest.fixture
def fresh_keyhaven(tmp_path) -> Keyhaven:
    """A daemon of the test's own, for tests that fail logins on purpose.

    keyhaven counts failed logins per client address: after 3 it delays every
    login from that address (250 ms doubling to 4 s), after 10 it refuses them
    for 5 minutes, and a successful login does not clear the address's count.
    Every client here connects from 127.0.0.1, so failures made on the shared
    daemon would slow down, and eventually lock out, the rest of the suite.
    """
    kh = _start(tmp_path)
    yield kh
    _stop(kh.proc)


@pytest.fixture(scope="session")
def api_key(keyhaven: Keyhaven) -> str:
    """A full-admin API key string (``<id>-<secret>``), created out of band."""
    created = keyhaven.cli("api_key.create", {"name": "compat-suite", "username": "admin"})
    return created["key"]


# -- make the pending keychaincredential tests easy to spot --------------------

_KEYCHAIN_OUTCOMES: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("keychain") is None:
        return
    if report.when == "call" or report.outcome != "passed":
        previous = _KEYCHAIN_OUTCOMES.get(item.nodeid)
        if previous in (None, "passed"):
            _KEYCHAIN_OUTCOMES[item.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _KEYCHAIN_OUTCOMES:
        return
    terminalreporter.section(
        "keychaincredential.* tests (marker 'keychain'; server side newly landed)"
    )
    for nodeid, outcome in _KEYCHAIN_OUTCOMES.items():
        terminalreporter.write_line(f"{outcome.upper():8} {nodeid}")


# -- TrueNAS's own API tests (test_api2_*.py) ----------------------------------
#
# A daemon per account mode (and, on first use, per keys location and for
# TLS), each in its own directory below /var/lib/keyhaven-test, with sshd on a
# free port of the wildcard address. See truenas_assets.py.

from truenas_assets import Accounts, TrueNASSystem, TrueNASSystems, unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def truenas_systems() -> TrueNASSystems:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    systems = TrueNASSystems(_start, _stop)
    yield systems
    systems.stop_all()


@pytest.fixture(scope="session", params=[False, True], ids=["manage_os=false", "manage_os=true"])
def manage_os(request) -> bool:
    """``accounts.manage_os``: false (default: OS accounts must exist and are
    never changed by keyhaven) or true (keyhaven runs useradd/usermod/userdel)."""
    return request.param


@pytest.fixture(scope="session")
def truenas(truenas_systems: TrueNASSystems, manage_os: bool) -> TrueNASSystem:
    """The system under test: keys in keyhaven's data dir (its default), plain
    HTTP on loopback."""
    return truenas_systems.get(manage_os=manage_os)


@pytest.fixture
def accounts(truenas: TrueNASSystem) -> Accounts:
    """Accounts (OS and keyhaven) and homes on ``truenas``, removed after the test."""
    made = Accounts(truenas)
    yield made
    made.cleanup()


@pytest.fixture
def accounts_on():
    """``accounts`` for another system: ``accounts_on(system)``."""
    made: dict[int, Accounts] = {}

    def on(system: TrueNASSystem) -> Accounts:
        return made.setdefault(id(system), Accounts(system))

    yield on
    for a in made.values():
        a.cleanup()
