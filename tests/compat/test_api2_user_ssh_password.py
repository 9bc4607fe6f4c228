"""TrueNAS tests/api2/test_user_ssh_password.py, against keyhaven.

Password logins go through OpenSSH's ``ssh`` to the sshd keyhaven supervises
(the password comes from ``SSH_ASKPASS``; TrueNAS's helper uses sshpass).

keyhaven differs, for every test here:
* ``ssh.passwordauth`` (the master switch for per-user and per-group password
  login) is off on a fresh keyhaven (TrueNAS ships it on), so the module turns
  it on and back off;
* with ``accounts.manage_os = false`` an account's ``password`` is its API
  password only: the OS (PAM) password sshd checks is set by the administrator
  (here ``chpasswd``, in the ``accounts.user`` helper);
* ``home`` is the home itself (TrueNAS makes ``<home>/<username>`` with
  ``home_create``); HOME_DIR (TrueNAS: the pool's root) is a fresh directory.
"""

from __future__ import annotations

import shutil
import types

import pytest

from pytruenas import ValidationErrors

from truenas_assets import Accounts, NO_LOGIN_SHELL, sh, temporary_update

@pytest.fixture(scope="module", autouse=True)
def password_login(truenas):
    # keyhaven differs: passwordauth is off by default (see the module docstring).
    truenas.ensure_sshd()
    truenas.call("ssh.update", {"passwordauth": True})
    yield
    truenas.call("ssh.update", {"passwordauth": False, "password_login_groups": []})


@pytest.mark.parametrize("ssh_password_enabled", [True, False])
def test_user_ssh_password_enabled(truenas, accounts, ssh_password_enabled):
    """tests/api2/test_user_ssh_password.py::test_user_ssh_password_enabled"""
    name = accounts.name()
    with accounts.user({
        "username": name,
        "full_name": "Test",
        "group_create": True,
        "password": "test1234",
        "home": f"{accounts.dataset()}/{name}",
        "ssh_password_enabled": ssh_password_enabled,
    }):
        result = truenas.ssh("whoami", user=name, password="test1234")
        if ssh_password_enabled:
            assert name in result["output"]
        else:
            assert "Permission denied" in result["stderr"]


@pytest.fixture(scope="module")
def group1_with_user(truenas):
    accounts = Accounts(truenas)
    try:
        # keyhaven differs: it has no group.* API; groups are the OS's.
        g1 = accounts.os_group()
        name = accounts.name()
        with accounts.user({
            "username": name,
            "full_name": "Test",
            "group_create": True,
            "groups": [g1],
            "password": "test1234",
        }):
            if truenas.manage_os:
                # keyhaven differs: `groups` is accepted and ignored; membership is the OS's.
                sh("usermod", "-a", "-G", g1, name)
            yield types.SimpleNamespace(group=g1, username=name)
    finally:
        accounts.cleanup()


@pytest.mark.parametrize("ssh_password_enabled", [True, False])
def test_group_ssh_password_enabled(truenas, group1_with_user, ssh_password_enabled):
    """tests/api2/test_user_ssh_password.py::test_group_ssh_password_enabled"""
    truenas.call("ssh.update", {"password_login_groups": [group1_with_user.group] if ssh_password_enabled else []})

    result = truenas.ssh("whoami", user=group1_with_user.username, password="test1234")
    if ssh_password_enabled:
        assert group1_with_user.username in result["output"]
    else:
        assert "Permission denied" in result["stderr"]


HOME_DIR = "<a fresh directory>"  # TrueNAS: f"/mnt/{pool_name}"


@pytest.mark.parametrize("args, errmsg", [
    (
        {"ssh_password_enabled": True},
        "SSH password login requires a valid home path."
    ),
    (
        {"ssh_password_enabled": True, "home": HOME_DIR, "shell": NO_LOGIN_SHELL},
        "SSH password login requires a login shell."
    ),
    (
        {"ssh_password_enabled": True, "home": HOME_DIR},
        None
    ),
], ids=["no-home", "nologin-shell", "valid"])
def test_user_create_ssh_password_login(truenas, accounts, request, args: dict, errmsg: str | None):
    """tests/api2/test_user_ssh_password.py::test_user_create_ssh_password_login"""
    name = accounts.name()
    if args.get("home") == HOME_DIR:
        args = {**args, "home": f"{accounts.dataset()}/{name}"}
    elif truenas.manage_os:
        # keyhaven differs: an account created without a home gets
        # /home/<name> (made by useradd), a valid home, so password login is
        # accepted. (TrueNAS's is /var/empty; passing that here would make
        # useradd create /var/empty on this machine.)
        errmsg = None
    if errmsg is None:
        with accounts.user({
            "username": name,
            "full_name": "bob",
            "group_create": True,
            "password": "canary",
            **args
        }):
            return
    with pytest.raises(ValidationErrors, match=errmsg):
        with accounts.user({
            "username": name,
            "full_name": "bob",
            "group_create": True,
            "password": "canary",
            **args
        }):
            pass


@pytest.fixture(scope="module")
def test_user(truenas):
    """``assets.account.test_user``: no valid home, a login shell, no SSH password login."""
    accounts = Accounts(truenas)
    name = accounts.name()
    data = {
        "username": name,
        "full_name": "testuser",
        "group_create": True,
        "password": "canary",
    }
    if truenas.manage_os:
        # keyhaven differs: it always makes a home (see test_user_create_ssh_password_login);
        # the home is removed so that, as on TrueNAS, the account has no valid one.
        data["home"] = f"{accounts.dataset()}/{name}"
    try:
        with accounts.user(data) as entry:
            if truenas.manage_os:
                shutil.rmtree(data["home"])
            yield entry
    finally:
        accounts.cleanup()


@pytest.mark.parametrize("args, errmsg", [
    # When test begins: ssh_password_enabled=False, home is invalid, shell is valid.
    (
        {"ssh_password_enabled": True},
        "Cannot be enabled without a valid home path and login shell."
    ),
    (
        {"ssh_password_enabled": True, "home": "/var/empty"},
        "SSH password login requires a valid home path."
    ),
    (
        {"ssh_password_enabled": True, "shell": NO_LOGIN_SHELL},
        "SSH password login requires a login shell."
    ),
    (
        {"ssh_password_enabled": True, "home": HOME_DIR, "home_create": True},
        None
    ),
], ids=["invalid-home", "var-empty", "nologin-shell", "valid-home"])
def test_user_update_ssh_password_login(truenas, accounts, test_user: dict, request, args: dict, errmsg: str | None):
    """tests/api2/test_user_ssh_password.py::test_user_update_ssh_password_login"""
    if args.get("home") == HOME_DIR:
        args = {**args, "home": f"{accounts.dataset()}/{test_user['username']}"}
    if not truenas.manage_os and "shell" in args:
        # keyhaven differs: with accounts.manage_os = false it never changes the
        # OS account, so a shell change is refused, naming the setting.
        with pytest.raises(ValidationErrors) as ve:
            with temporary_update(truenas, test_user, args):
                pass
        assert any(
            attr == "user_update.shell" and "accounts.manage_os" in msg for attr, msg, _c in ve.value.errors
        ), ve.value.errors
        return
    if not truenas.manage_os and args.get("home") not in (None, test_user["home"]):
        # keyhaven differs: likewise for a home change.
        with pytest.raises(ValidationErrors) as ve:
            with temporary_update(truenas, test_user, args):
                pass
        assert any(
            attr == "user_update.home" and "accounts.manage_os" in msg for attr, msg, _c in ve.value.errors
        ), ve.value.errors
        return
    if errmsg is None:
        with temporary_update(truenas, test_user, args):
            return
    with pytest.raises(ValidationErrors, match=errmsg):
        with temporary_update(truenas, test_user, args):
            pass
