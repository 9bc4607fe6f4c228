"""TrueNAS tests/api2/test_keychain_ssh.py, against keyhaven.

As on TrueNAS, the system pairs with itself: semi-automatic setup logs in to
its own API (``truenas.url``, plain HTTP on loopback; TrueNAS's tests use
``http://localhost``), ``ssh_pair`` authorizes the key on the account, starts
the real sshd keyhaven supervises and reports its host keys.

keyhaven differs here in three ways that every test meets:
* pairing over ``http://`` is refused unless ``allow_insecure_http: true``
  (the remote admin password or token would cross the network in clear), so
  the tests that pair over HTTP pass it;
* keyhaven's API administrator is ``admin``; ``root`` is the OS account keys
  go to and has no API password (TrueNAS's ``password()`` is root's);
* keyhaven has no replication, so where TrueNAS proves the connection with
  ``replication.list_datasets`` keyhaven's ``keychaincredential.test_ssh_connection``
  logs in with the key (pinned host keys) and runs a command.
"""

from __future__ import annotations

import shutil

import pytest

from pytruenas import ClientException, ValidationErrors

from truenas_assets import (
    ESSLCERTVERIFICATIONERROR,
    LOGIN_SHELL,
    NO_LOGIN_SHELL,
    os_account,
    ssh_keypair,
)

@pytest.fixture(scope="module")
def credential(truenas):
    credential = truenas.call("keychaincredential.create", {
        "name": "key",
        "type": "SSH_KEY_PAIR",
        "attributes": truenas.call("keychaincredential.generate_ssh_key_pair"),
    })
    try:
        yield credential
    finally:
        truenas.call("keychaincredential.delete", credential["id"], {"cascade": True})


@pytest.fixture(autouse=True)
def no_connection_left(truenas):
    """A failed test must not leave its "localhost" connection to the next one."""
    yield
    for c in truenas.call("keychaincredential.query", [["name", "=", "localhost"]]):
        truenas.call("keychaincredential.delete", c["id"])


def _localhost(system) -> str:
    # keyhaven differs: http:// needs allow_insecure_http (see the module docstring).
    return system.url


def _no_connection(system) -> bool:
    return system.call("keychaincredential.query", [["name", "=", "localhost"]]) == []


@pytest.mark.parametrize("keys_location", ["home", "data"])
def test_remote_ssh_semiautomatic_setup_invalid_homedir(truenas_systems, manage_os, keys_location, accounts_on):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_invalid_homedir"""
    system = truenas_systems.get(manage_os=manage_os, keys_in_home=keys_location == "home")
    accounts = accounts_on(system)
    name = accounts.name()
    data = {
        "username": name,
        "full_name": "admin",
        "group_create": True,
        "home_create": False,
        "password": "test1234",
    }
    if system.manage_os:
        # keyhaven differs: it ignores home_create and always makes the home
        # (useradd -m), /home/<name> by default. The home is removed below so
        # that, as on TrueNAS, the account has none.
        data["home"] = f"{accounts.dataset()}/{name}"
    with ssh_keypair(system) as credential, accounts.user(data):
        if system.manage_os:
            shutil.rmtree(data["home"])
        token = system.call("auth.generate_token", 600, {}, False)
        args = {
            "name": "localhost",
            "url": _localhost(system),
            "allow_insecure_http": True,
            "token": token,
            "username": name,
            "private_key": credential["id"],
        }
        if keys_location == "home":
            # ssh.authorized_keys_location = home: keys go to ~/.ssh as on TrueNAS.
            with pytest.raises(ClientException) as ve:
                system.call("keychaincredential.remote_ssh_semiautomatic_setup", args)

            assert f"make sure that home directory for {name} user on the remote system exists" in str(ve.value)
            assert _no_connection(system)
        else:
            # keyhaven differs: by default keys live in <data>/sshd/authorized_keys/<user>,
            # so an account without a home can be paired, and the key logs in.
            connection = system.call("keychaincredential.remote_ssh_semiautomatic_setup", args)
            try:
                result = system.call("keychaincredential.test_ssh_connection", connection["id"])
                assert result["ok"] is True, result
            finally:
                system.call("keychaincredential.delete", connection["id"])


def test_remote_ssh_semiautomatic_setup_sets_user_attributes(truenas, credential, accounts, request):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_sets_user_attributes"""
    homedir = accounts.dataset()
    name = accounts.name()
    with accounts.user({
        "username": name,
        "full_name": "unpriv",
        "group_create": True,
        # keyhaven: `home` is the home itself (TrueNAS puts <home>/<username> there).
        "home": f"{homedir}/{name}",
        "password_disabled": True,
        "smb": False,
        "shell": NO_LOGIN_SHELL,
    }) as user:
        token = truenas.call("auth.generate_token", 600, {}, False)
        args = {
            "name": "localhost",
            "url": _localhost(truenas),
            "allow_insecure_http": True,
            "token": token,
            "username": name,
            "private_key": credential["id"],
        }
        if truenas.manage_os:
            connection = truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", args)
            try:
                # replication.list_datasets("SSH", id) on TrueNAS: a login with the key that runs a command.
                result = truenas.call("keychaincredential.test_ssh_connection", connection["id"])
                assert result["ok"] is True, result
            finally:
                truenas.call("keychaincredential.delete", connection["id"])
            # The nologin shell was replaced by a login shell, in keyhaven and in the OS.
            assert truenas.call("user.get_instance", user["id"])["shell"] == LOGIN_SHELL
            assert os_account(name).pw_shell == LOGIN_SHELL
        else:
            # keyhaven differs: with accounts.manage_os = false keyhaven cannot
            # give the account a login shell, so setup fails, naming the shell,
            # before it changes anything.
            with pytest.raises(ClientException) as ve:
                truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", args)
            assert "shell" in str(ve.value).lower(), str(ve.value)
            assert _no_connection(truenas)
            after = truenas.call("user.get_instance", user["id"])
            assert after["shell"] == NO_LOGIN_SHELL
            assert after["sshpubkey"] == user["sshpubkey"]
            assert os_account(name).pw_shell == NO_LOGIN_SHELL
            assert not truenas.keys_file(name, after["home"]).exists()


@pytest.fixture(scope="module")
def truenas_tls(truenas_systems, manage_os):
    """The system serving its API over TLS with its generated self-signed
    certificate (``tls: true``), as TrueNAS does on https://localhost."""
    return truenas_systems.get(manage_os=manage_os, tls=True)


def test_ssl_certificate_error(truenas_tls):
    """tests/api2/test_keychain_ssh.py::test_ssl_certificate_error"""
    with ssh_keypair(truenas_tls, "key") as credential:
        token = truenas_tls.call("auth.generate_token", 600, {}, False)
        with pytest.raises(ClientException) as ve:
            truenas_tls.call("keychaincredential.remote_ssh_semiautomatic_setup", {
                "name": "localhost",
                # Should fail on default self-signed certificate
                "url": truenas_tls.url,
                "token": token,
                "private_key": credential["id"],
            })

        assert ve.value.errno == ESSLCERTVERIFICATIONERROR
        assert _no_connection(truenas_tls)


def test_ignore_ssl_certificate_error(truenas_tls):
    """tests/api2/test_keychain_ssh.py::test_ignore_ssl_certificate_error"""
    with ssh_keypair(truenas_tls, "key") as credential:
        token = truenas_tls.call("auth.generate_token", 600, {}, False)
        args = {
            "name": "localhost",
            "url": truenas_tls.url,
            "verify_ssl": False,
            "token": token,
            "private_key": credential["id"],
        }
        connection = truenas_tls.call("keychaincredential.remote_ssh_semiautomatic_setup", args)
        truenas_tls.call("keychaincredential.delete", connection["id"])

        # keyhaven differs: tokens are single-use unless asked otherwise
        # (TrueNAS's default is reusable until the TTL ends).
        with pytest.raises(ClientException) as ve:
            truenas_tls.call("keychaincredential.remote_ssh_semiautomatic_setup", args)
        assert "Invalid token" in str(ve.value)
        assert _no_connection(truenas_tls)


def test_remote_ssh_semiautomatic_setup_invalid_ip(truenas, credential):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_invalid_ip"""
    with pytest.raises(ClientException) as ve:
        truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", {
            "name": "localhost",
            # Nothing listens on port 1, so the connection is refused
            "url": "http://127.0.0.1:1",
            "allow_insecure_http": True,
            "token": truenas.call("auth.generate_token", 600, {}, False),
            "private_key": credential["id"],
        })

    assert "Unable to connect to remote system" in str(ve.value)


def test_remote_ssh_semiautomatic_setup_invalid_keypair(truenas):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_invalid_keypair"""
    with pytest.raises(ClientException) as ve:
        truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", {
            "name": "localhost",
            "url": _localhost(truenas),
            "allow_insecure_http": True,
            "token": truenas.call("auth.generate_token", 600, {}, False),
            "private_key": 99999999,
        })

    assert "key pair not found" in str(ve.value).lower()


def test_remote_ssh_semiautomatic_setup_with_password(truenas, credential):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_with_password"""
    args = {
        "name": "localhost",
        "url": _localhost(truenas),
        # keyhaven differs: the API administrator is admin, not root.
        "admin_username": "admin",
        "password": truenas.kh.password,
        "private_key": credential["id"],
    }
    # keyhaven differs: the password would cross plain HTTP, so http:// is
    # refused (before any connection) unless allow_insecure_http is given.
    with pytest.raises(ValidationErrors) as ve:
        truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", args)
    assert any(
        attr.endswith(".url") and "allow_insecure_http" in msg for attr, msg, _code in ve.value.errors
    ), ve.value.errors
    assert _no_connection(truenas)

    connection = truenas.call(
        "keychaincredential.remote_ssh_semiautomatic_setup", {**args, "allow_insecure_http": True}
    )
    truenas.call("keychaincredential.delete", connection["id"])


def test_remote_ssh_semiautomatic_setup_with_invalid_password(truenas, credential):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_with_invalid_password"""
    with pytest.raises(ClientException):
        truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", {
            "name": "localhost",
            "url": _localhost(truenas),
            "allow_insecure_http": True,
            "admin_username": "admin",
            "password": "invalid-password",
            "private_key": credential["id"],
        })


def test_remote_ssh_semiautomatic_setup_without_password_or_token(truenas, credential):
    """tests/api2/test_keychain_ssh.py::test_remote_ssh_semiautomatic_setup_without_password_or_token"""
    with pytest.raises(ClientException) as ve:
        truenas.call("keychaincredential.remote_ssh_semiautomatic_setup", {
            "name": "localhost",
            "url": _localhost(truenas),
            "allow_insecure_http": True,
            "private_key": credential["id"],
        })

    assert "specify either remote system password or temporary authentication token" in str(ve.value)
