"""keyhaven through aiotruenas-client 0.10.0 (legacy DDP-style ``/websocket``).

The library's public surface is ``CachingMachine``: ``create()`` (connect,
log in, then set up its caches), or ``connect()`` on a bare instance (the
``WebsocketMachine`` interface method that only connects and logs in),
``invoke_method()``, ``closed`` and ``close()``.

What the library does on the wire (websockets 11.0.1, meteor-ejson 1.1.0):

* ``ws://<host>/websocket``, then ``{"msg": "connect", "version": "1", "support": ["1"]}``
  and it requires ``{"msg": "connected", ...}`` back;
* password login: ``auth.login(username, password)``; API key login:
  ``auth.login_with_api_key(key)``; a reply other than true raises
  ``websockets.exceptions.SecurityError("Unable to authenticate.")``;
* ``invoke_method`` returns ``reply["result"]``: an error reply (which has no
  ``result`` key on TrueNAS) surfaces as ``KeyError('result')``;
* ``create()`` additionally sends ``{"msg": "sub", "name": "core.get_jobs", "id": ...}``
  and waits for ``{"msg": "ready", "subs": [id]}``; ``close()`` sends
  ``{"msg": "unsub", "id": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import pytest
from websockets.exceptions import SecurityError

from aiotruenas_client import CachingMachine

TIMEOUT = 10.0


def run(coro, timeout: float = TIMEOUT):
    """Run one test body on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def connected(keyhaven, **credentials):
    if not credentials:
        credentials = {"username": "admin", "password": keyhaven.password}
    machine = CachingMachine()
    await machine.connect(
        host=keyhaven.host,
        api_key=credentials.get("api_key"),
        password=credentials.get("password"),
        username=credentials.get("username"),
        secure=False,
    )
    try:
        yield machine
    finally:
        if not machine.closed:
            await machine.close()


# -- connect + login ----------------------------------------------------------


def test_create_connects_and_closes(keyhaven):
    """The documented entry point: ``await CachingMachine.create(host, ...)``."""
    outcome: dict = {}

    async def body():
        machine = await CachingMachine.create(
            keyhaven.host, username="admin", password=keyhaven.password, secure=False
        )
        assert not machine.closed
        assert await machine.invoke_method("core.ping") == "pong"
        await machine.close()  # sends {'msg': 'unsub', 'id': <id>}
        assert machine.closed

    def target():
        try:
            asyncio.run(body())
        except BaseException as exc:  # reported on the test's thread
            outcome["error"] = exc

    # On its own thread: if create() hangs, the connection it holds cannot be
    # cancelled cleanly (websockets then waits out its 10 s close timeout), so
    # the thread is abandoned instead; it ends with the process.
    thread = threading.Thread(target=target, name="aiotruenas-create", daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        pytest.fail(
            "CachingMachine.create() did not return within 5 s. After logging in it sends "
            "{'msg': 'sub', 'name': 'core.get_jobs', 'id': <id>} and waits for "
            "{'msg': 'ready', 'subs': [<id>]}, which is how TrueNAS answers every authorised "
            "sub; any other answer (such as 'nosub') leaves it waiting forever"
        )
    if "error" in outcome:
        raise outcome["error"]


def test_password_login_and_ping(keyhaven):
    async def body():
        async with connected(keyhaven) as machine:
            assert not machine.closed
            assert await machine.invoke_method("core.ping") == "pong"
        assert machine.closed

    run(body())


def test_auth_me_fields(keyhaven):
    async def body():
        async with connected(keyhaven) as machine:
            me = await machine.invoke_method("auth.me")
            assert me["pw_name"] == "admin"
            assert isinstance(me["pw_uid"], int) and not isinstance(me["pw_uid"], bool)

    run(body())


# Failed logins go to a daemon of their own: see conftest.fresh_keyhaven.


def test_wrong_password(fresh_keyhaven):
    async def body():
        with pytest.raises(SecurityError):
            async with connected(fresh_keyhaven, username="admin", password="definitely-wrong"):
                pass

    run(body())


def test_unknown_user(fresh_keyhaven):
    async def body():
        with pytest.raises(SecurityError):
            async with connected(fresh_keyhaven, username="no-such-user", password="whatever"):
                pass

    run(body())


def test_api_key_login(keyhaven, api_key):
    async def body():
        async with connected(keyhaven, api_key=api_key) as machine:
            me = await machine.invoke_method("auth.me")
            assert me["pw_name"] == "admin"

    run(body())


def test_wrong_api_key(fresh_keyhaven):
    key = fresh_keyhaven.cli("api_key.create", {"name": "wrong-key-test", "username": "admin"})["key"]
    bogus = key.split("-", 1)[0] + "-" + "A" * 64
    assert bogus != key

    async def body():
        with pytest.raises(SecurityError):
            async with connected(fresh_keyhaven, api_key=bogus):
                pass

    run(body())


# -- errors -------------------------------------------------------------------
# aiotruenas reads reply["result"] unconditionally, so every server error reaches
# its user as KeyError('result'). These tests pin that (a reply that carried an
# error *and* a "result" key would be silently taken for success) and that the
# connection survives the error.


def test_unknown_method(keyhaven):
    async def body():
        async with connected(keyhaven) as machine:
            with pytest.raises(KeyError, match="result"):
                await machine.invoke_method("nosuchservice.nosuchmethod")
            assert await machine.invoke_method("core.ping") == "pong"

    run(body())


def test_validation_error(keyhaven):
    async def body():
        async with connected(keyhaven) as machine:
            with pytest.raises(KeyError, match="result"):
                await machine.invoke_method("api_key.create", [{"name": 5, "username": "admin"}])
            assert await machine.invoke_method("core.ping") == "pong"

    run(body())


def test_call_error(keyhaven):
    async def body():
        async with connected(keyhaven) as machine:
            with pytest.raises(KeyError, match="result"):
                await machine.invoke_method("api_key.delete", [987654])
            assert await machine.invoke_method("core.ping") == "pong"

    run(body())


# -- keychaincredential (server side in progress) -----------------------------


@pytest.mark.keychain
def test_keychain_ssh_key_pair_lifecycle(keyhaven):
    async def body():
        async with connected(keyhaven) as machine:
            pair = await machine.invoke_method("keychaincredential.generate_ssh_key_pair")
            assert {"private_key", "public_key"} <= set(pair), pair.keys()
            assert pair["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
            # TrueNAS makes RSA keys, keyhaven Ed25519 by default (shared/DESIGN.md)
            assert pair["public_key"].split()[0] in (
                "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"
            ), pair["public_key"]

            name = f"compat-aiotruenas-{uuid.uuid4().hex[:8]}"
            entry = await machine.invoke_method(
                "keychaincredential.create",
                [{"name": name, "type": "SSH_KEY_PAIR", "attributes": pair}],
            )
            assert isinstance(entry["id"], int)
            assert entry["name"] == name
            assert entry["type"] == "SSH_KEY_PAIR"
            assert entry["attributes"]["private_key"] == pair["private_key"].strip() + "\n"
            assert entry["attributes"]["public_key"].split()[:2] == pair["public_key"].split()[:2]
            try:
                found = await machine.invoke_method(
                    "keychaincredential.query", [[["name", "=", name]]]
                )
                assert found == [entry]
                got = await machine.invoke_method(
                    "keychaincredential.query", [[["name", "=", name]], {"get": True}]
                )
                assert got == entry
            finally:
                await machine.invoke_method("keychaincredential.delete", [entry["id"]])
            assert (
                await machine.invoke_method("keychaincredential.query", [[["name", "=", name]]])
                == []
            )

    run(body())


# -- jobs through the core.get_jobs subscription ------------------------------


def test_job_state_arrives_through_the_subscription(keyhaven):
    """``create()`` subscribes to ``core.get_jobs``; the library keeps each
    job's state from the ``added``/``changed`` messages it receives, which is
    what ``get_job()`` and ``wait_for_job()`` read."""

    async def body():
        machine = await CachingMachine.create(
            keyhaven.host, username="admin", password=keyhaven.password, secure=False
        )
        try:
            job_id = await machine.invoke_method("service.control", ["STOP", "ssh"])
            assert isinstance(job_id, int)
            # Only events fill the library's job cache without a query (get_job
            # queries core.get_jobs for an unknown id), so the cache itself --
            # private, there is no public view of it -- shows the events arrived.
            fetcher = machine._job_fetcher
            for _ in range(100):
                if fetcher._state.get(job_id, {}).get("state") == "SUCCESS":
                    break
                await asyncio.sleep(0.05)
            assert fetcher._state.get(job_id, {}).get("state") == "SUCCESS", (
                "no core.get_jobs 'changed' message reached the library"
            )
            job = await machine.get_job(job_id)
            assert job.method == "service.control"
            assert job.status.name == "SUCCESS", job.status
            assert job.error is None
        finally:
            await machine.close()

    run(body())
