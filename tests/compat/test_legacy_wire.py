"""The legacy ``/websocket`` dialect, one level below the clients.

aiotruenas-client hides every error behind ``KeyError('result')``, so the
error *shapes* of the legacy dialect cannot be seen through it. They matter
to TrueNAS's own ``truenas_api_client``, which speaks this dialect whenever a
URI ends in ``/websocket`` (the semi-automatic SSH setup does exactly that):
it raises ``ValidationErrors(error["extra"])`` when ``error["type"] ==
"VALIDATION"`` and ``ClientException(error["reason"], error["error"], ...)``
otherwise. These checks use the ``websockets`` package aiotruenas-client
itself pins, speaking the DDP-style messages as TrueNAS documents them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import uuid

import websockets

TIMEOUT = 10.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


class Legacy:
    def __init__(self, ws):
        self.ws = ws
        self.session = None

    async def send(self, message: dict) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self) -> dict:
        return json.loads(await self.ws.recv())

    async def reply_to(self, ident: str) -> dict:
        while True:
            message = await self.recv()
            if message.get("id") == ident or ident in (message.get("subs") or []):
                return message

    async def call_raw(self, method: str, *params) -> dict:
        ident = str(uuid.uuid4())
        await self.send({"id": ident, "msg": "method", "method": method, "params": list(params)})
        reply = await self.reply_to(ident)
        assert reply["msg"] == "result", reply
        return reply

    async def call(self, method: str, *params):
        reply = await self.call_raw(method, *params)
        assert "error" not in reply or reply["error"] is None, reply
        return reply["result"]


@contextlib.asynccontextmanager
async def legacy(keyhaven, login: bool = True):
    async with websockets.connect(f"ws://{keyhaven.host}/websocket") as ws:
        conn = Legacy(ws)
        await conn.send({"msg": "connect", "version": "1", "support": ["1"]})
        hello = await conn.recv()
        assert hello["msg"] == "connected", hello
        conn.session = hello.get("session")
        if login:
            assert await conn.call("auth.login", "admin", keyhaven.password) is True
        yield conn


def test_handshake_gives_a_session(keyhaven):
    async def body():
        async with legacy(keyhaven, login=False) as conn:
            assert isinstance(conn.session, str) and conn.session

    run(body())


def test_token_login_on_a_fresh_connection(keyhaven):
    """The remote half of TrueNAS's semi-automatic SSH setup: a token made with
    ``auth.generate_token(600, {}, False)`` logs in a new legacy connection."""

    async def body():
        async with legacy(keyhaven) as first:
            token = await first.call("auth.generate_token", 600, {}, False)
        async with legacy(keyhaven, login=False) as second:
            assert await second.call("auth.login_with_token", token) is True
            assert (await second.call("auth.me"))["pw_name"] == "admin"

    run(body())


def test_sub_is_answered_with_ready(keyhaven):
    """aiotruenas' CachingMachine.create() blocks on this answer."""

    async def body():
        async with legacy(keyhaven) as conn:
            ident = str(uuid.uuid4())
            await conn.send({"id": ident, "msg": "sub", "name": "core.get_jobs"})
            reply = await conn.reply_to(ident)
            assert reply == {"msg": "ready", "subs": [ident]}
            await conn.send({"id": ident, "msg": "unsub"})
            assert await conn.call("core.ping") == "pong"

    run(body())


def test_error_reply_shapes(keyhaven):
    async def body():
        async with legacy(keyhaven) as conn:
            # ValidationErrors
            reply = await conn.call_raw("api_key.create", {"name": 5, "username": "admin"})
            assert "result" not in reply, reply
            error = reply["error"]
            assert error["type"] == "VALIDATION", error
            attrs = {tuple(e)[0]: tuple(e) for e in error["extra"]}
            assert "api_key_create.name" in attrs, error
            assert attrs["api_key_create.name"][2] == errno.EINVAL
            assert isinstance(error["reason"], str) and error["reason"]

            # InstanceNotFound: a ValidationError with errno ENOENT
            reply = await conn.call_raw("api_key.delete", 987654)
            assert "result" not in reply, reply
            error = reply["error"]
            assert error["type"] == "VALIDATION", error
            assert [e[2] for e in error["extra"]] == [errno.ENOENT], error

            # unknown method: CallError ENOMETHOD (201)
            reply = await conn.call_raw("nosuchservice.nosuchmethod")
            assert "result" not in reply, reply
            assert reply["error"]["error"] == 201, reply
            assert reply["error"]["type"] is None, reply

    run(body())


def test_call_before_login_is_refused(keyhaven):
    async def body():
        async with legacy(keyhaven, login=False) as conn:
            reply = await conn.call_raw("api_key.query")
            assert "result" not in reply, reply
            assert "Not authenticated" in reply["error"]["reason"], reply

    run(body())
