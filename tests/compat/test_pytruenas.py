"""keyhaven through pytruenas 0.7.1 (JSON-RPC 2.0 at ``/api/current``).

Everything here goes through pytruenas' public surface: ``TrueNASClient``,
its ``login()``/``me()``/``ping()`` helpers, the ``client.api.<ns>.<method>()``
namespace and the exceptions exported from ``pytruenas``.
"""

from __future__ import annotations

import errno
import re
import uuid

import pytest

import pytruenas
from pytruenas import (
    APIKeyAuth,
    AuthenticationError,
    ClientException,
    Credentials,
    TrueNASClient,
    ValidationErrors,
)

ENOTAUTHENTICATED = 207  # truenas_api_client.exc.ENOTAUTHENTICATED


@pytest.fixture
def clients(keyhaven):
    """Factory for clients that are closed when the test ends.

    ``on=`` names another daemon (``fresh_keyhaven``) than the shared one.
    """
    made: list[TrueNASClient] = []

    def make(on=None, **options) -> TrueNASClient:
        client = TrueNASClient((on or keyhaven).target, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def admin(keyhaven):
    """A password-authenticated admin client shared by the module."""
    client = TrueNASClient(keyhaven.target, username="admin", password=keyhaven.password)
    yield client
    client.close()


def _assert_admin(me: dict) -> None:
    assert me["pw_name"] == "admin"
    assert isinstance(me["pw_uid"], int) and not isinstance(me["pw_uid"], bool)


# -- connect, ping, password login -------------------------------------------


def test_password_login_then_ping(clients, keyhaven):
    client = clients(username="admin", password=keyhaven.password)
    # First use opens the websocket and logs in (legacy auth.login path).
    assert client.ping() == "pong"


def test_auth_me_fields(admin):
    me = admin.me()
    _assert_admin(me)


def test_password_login_ex(clients, keyhaven):
    client = clients(username="admin", password=keyhaven.password, autologin=False)
    response = client.login(login_ex=True)
    assert response["response_type"] == "SUCCESS"
    assert response["authenticator"] in ("LEVEL_1", "LEVEL_2")
    _assert_admin(response["user_info"])
    assert client.ping() == "pong"


def test_wrong_password_legacy_login(clients, fresh_keyhaven):
    client = clients(on=fresh_keyhaven, username="admin", password="definitely-not-the-password")
    with pytest.raises(AuthenticationError) as info:
        client.ping()  # autologin -> auth.login answers False
    assert info.value.response_type == "AUTH_ERR"


def test_wrong_password_login_ex(clients, fresh_keyhaven):
    client = clients(
        on=fresh_keyhaven, username="admin", password="definitely-not-the-password", autologin=False
    )
    with pytest.raises(AuthenticationError) as info:
        client.login(login_ex=True)
    assert info.value.response_type == "AUTH_ERR"


def test_unknown_user_login_ex(clients, fresh_keyhaven):
    client = clients(on=fresh_keyhaven, username="no-such-user", password="whatever", autologin=False)
    with pytest.raises(AuthenticationError) as info:
        client.login(login_ex=True)
    assert info.value.response_type == "AUTH_ERR"


# -- API keys ---------------------------------------------------------------


def test_api_key_string_is_recognised_as_api_key(api_key):
    # pytruenas tells an API key from a token by its shape: <id>-<64 alphanumerics>.
    # A key of any other shape would be sent to auth.login_with_token instead.
    assert isinstance(Credentials(api_key), APIKeyAuth)


def test_api_key_login_legacy(clients, api_key):
    client = clients(api_key=api_key)  # auth.login_with_api_key
    _assert_admin(client.me())


def test_api_key_login_from_credentials_string(clients, api_key):
    client = clients(credentials=api_key)
    assert client.ping() == "pong"
    _assert_admin(client.me())


def test_api_key_login_ex(clients, api_key):
    client = clients(username="admin", api_key=api_key, autologin=False)
    response = client.login(login_ex=True)  # API_KEY_PLAIN
    assert response["response_type"] == "SUCCESS"
    _assert_admin(client.me())


def test_wrong_api_key(clients, fresh_keyhaven):
    key = fresh_keyhaven.cli("api_key.create", {"name": "wrong-key-test", "username": "admin"})["key"]
    key_id = key.split("-", 1)[0]
    bogus = f"{key_id}-{'A' * 64}"
    assert bogus != key
    client = clients(on=fresh_keyhaven, api_key=bogus)
    with pytest.raises(AuthenticationError):
        client.ping()
    client2 = clients(on=fresh_keyhaven, username="admin", api_key=bogus, autologin=False)
    with pytest.raises(AuthenticationError) as info:
        client2.login(login_ex=True)
    assert info.value.response_type == "AUTH_ERR"


# -- tokens -----------------------------------------------------------------


def test_token_login(admin, clients):
    token = admin.api.auth.generate_token(600, {}, False, False)
    assert isinstance(token, str) and token
    client = clients(token=token)  # auth.login_with_token
    _assert_admin(client.me())


def test_token_login_ex(admin, clients):
    token = admin.api.auth.generate_token(600, {}, False, False)
    client = clients(token=token, autologin=False)
    response = client.login(login_ex=True)  # TOKEN_PLAIN
    assert response["response_type"] == "SUCCESS"
    _assert_admin(client.me())


def test_single_use_token(clients, fresh_keyhaven):
    admin = clients(on=fresh_keyhaven, username="admin", password=fresh_keyhaven.password)
    token = admin.api.auth.generate_token(600, {}, False, True)
    first = clients(on=fresh_keyhaven, token=token)
    _assert_admin(first.me())
    second = clients(on=fresh_keyhaven, token=token)
    with pytest.raises(AuthenticationError):
        second.me()


def test_bogus_token(clients, fresh_keyhaven):
    client = clients(on=fresh_keyhaven, token="not-a-real-token")
    with pytest.raises(AuthenticationError):
        client.ping()


# -- errors -----------------------------------------------------------------


def test_validation_error_names_the_attribute(admin):
    with pytest.raises(ValidationErrors) as info:
        admin.api.api_key.create({"name": 5, "username": "admin"})
    err = info.value
    assert isinstance(err, ValueError)  # pytruenas' ValidationErrors is also a ValueError
    by_attr = {attr: (msg, code) for attr, msg, code in err.errors}
    assert "api_key_create.name" in by_attr, err.errors
    msg, code = by_attr["api_key_create.name"]
    assert code == errno.EINVAL
    assert msg
    assert "api_key_create.name" in str(err)


def test_delete_missing_api_key_is_enoent(admin):
    # TrueNAS: do_delete -> get_instance -> InstanceNotFound, a ValidationError
    # with errno ENOENT, sent as -32602 "Invalid params".
    with pytest.raises(ClientException) as info:
        admin.api.api_key.delete(987654)
    err = info.value
    assert isinstance(err, ValidationErrors), f"{type(err).__name__}: {err}"
    assert len(err.errors) == 1, err.errors
    _attr, msg, code = err.errors[0]
    assert code == errno.ENOENT
    assert "987654 does not exist" in msg
    # pytruenas maps the "[ENOENT] ..." text onto the matching OSError on request.
    with pytest.raises(FileNotFoundError):
        admin.api.api_key.delete(987654, _ioerror=True)


def test_delete_missing_api_key_attribute_is_null(admin):
    # InstanceNotFound(errmsg) is ValidationError(None, errmsg, ENOENT): no
    # attribute, so pytruenas renders it as "[ENOENT] ALL: ...".
    with pytest.raises(ValidationErrors) as info:
        admin.api.api_key.delete(987654)
    assert info.value.errors[0][0] is None, info.value.errors
    assert str(info.value).startswith("[ENOENT] ALL: ")


def test_call_error_carries_errno(clients):
    # An unauthenticated call is a CallError (-32001) with errno ENOTAUTHENTICATED.
    client = clients(autologin=False)
    with pytest.raises(ClientException) as info:
        client.api.api_key.query()
    err = info.value
    assert not isinstance(err, ValidationErrors)
    assert err.errno == ENOTAUTHENTICATED, (err.errno, str(err))
    assert str(err) == "[ENOTAUTHENTICATED] Not authenticated"


def test_unknown_method(admin):
    with pytest.raises(ClientException) as info:
        admin.api.nosuchservice.nosuchmethod()
    err = info.value
    assert type(err) is ClientException
    assert str(err) == "Method does not exist"
    # The connection stays usable after an error.
    assert admin.ping() == "pong"


def test_errors_are_truenas_errors(admin):
    with pytest.raises(pytruenas.TrueNASError):
        admin.api.nosuchservice.nosuchmethod()


# -- keychaincredential (server side in progress) ---------------------------


def _same_public_key(a: str, b: str) -> bool:
    return a.split()[:2] == b.split()[:2]


# TrueNAS generates RSA (`ssh-keygen -t rsa`); keyhaven defaults to Ed25519
# (shared/DESIGN.md). Clients only need a valid OpenSSH key pair.
PUBLIC_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) AAAA[0-9A-Za-z+/]+=*( .*)?\n?$")


def _assert_generated_pair(pair: dict) -> None:
    assert {"private_key", "public_key"} <= set(pair), pair.keys()
    assert pair["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert pair["private_key"].rstrip().endswith("-----END OPENSSH PRIVATE KEY-----")
    assert PUBLIC_KEY.match(pair["public_key"]), pair["public_key"]


@pytest.mark.keychain
def test_keychain_generate_ssh_key_pair(admin):
    pair = admin.api.keychaincredential.generate_ssh_key_pair()
    _assert_generated_pair(pair)
    # Nothing is stored.
    assert admin.api.keychaincredential.query([["attributes.public_key", "=", pair["public_key"]]]) == []


@pytest.mark.keychain
def test_keychain_ssh_key_pair_create_query_delete(admin):
    kc = admin.api.keychaincredential
    pair = kc.generate_ssh_key_pair()
    name = f"compat-pytruenas-{uuid.uuid4().hex[:8]}"

    entry = kc.create({"name": name, "type": "SSH_KEY_PAIR", "attributes": pair})
    assert isinstance(entry["id"], int)
    assert entry["name"] == name
    assert entry["type"] == "SSH_KEY_PAIR"
    assert entry["attributes"]["private_key"] == pair["private_key"].strip() + "\n"
    assert _same_public_key(entry["attributes"]["public_key"], pair["public_key"])

    try:
        found = kc.query([["name", "=", name]])
        assert [e["id"] for e in found] == [entry["id"]]
        assert found[0] == entry
        # pytruenas' own lookup helper (what install_sshcreds uses): query(filters, {"limit": 1})
        assert kc._get(type="SSH_KEY_PAIR", name=name)["id"] == entry["id"]
        assert kc.query([["name", "=", name + "-missing"]]) == []
    finally:
        kc.delete(entry["id"])

    assert kc.query([["name", "=", name]]) == []


@pytest.mark.keychain
def test_keychain_duplicate_name_is_validation_error(admin):
    kc = admin.api.keychaincredential
    pair = kc.generate_ssh_key_pair()
    name = f"compat-dup-{uuid.uuid4().hex[:8]}"
    entry = kc.create({"name": name, "type": "SSH_KEY_PAIR", "attributes": pair})
    try:
        with pytest.raises(ValidationErrors) as info:
            kc.create({"name": name, "type": "SSH_KEY_PAIR", "attributes": pair})
        assert (
            "keychain_credential_create.name",
            "Object with this name already exists",
            errno.EINVAL,
        ) in info.value.errors
    finally:
        kc.delete(entry["id"])


@pytest.mark.keychain
def test_keychain_delete_missing_id_is_enoent(admin):
    with pytest.raises(ValidationErrors) as info:
        admin.api.keychaincredential.delete(987654)
    assert info.value.errors == [(None, "KeychainCredential 987654 does not exist", errno.ENOENT)]


# -- event subscriptions -----------------------------------------------------


def test_job_events_through_a_subscription(admin):
    """``client.api.core.get_jobs.subscribe()`` (``core.subscribe``) delivers a
    job's life as ``collection_update`` events: added, then changed to SUCCESS."""
    with admin.api.core.get_jobs.subscribe() as sub:
        assert isinstance(sub.id, str) and sub.id
        job_id = admin.api.service.control("STOP", "ssh")
        seen = []
        for event in sub.events(timeout=5):
            if event.id != job_id:
                continue
            seen.append(event)
            if event.fields["state"] != "RUNNING":
                break
    assert seen, "no core.get_jobs event for the job"
    assert seen[0].collection == "core.get_jobs"
    assert seen[0].msg == "added"
    assert seen[0].fields["method"] == "service.control"
    assert seen[-1].msg == "changed"
    assert seen[-1].fields["state"] == "SUCCESS"
    assert seen[-1].fields["progress"]["percent"] == 100
