"""TrueNAS tests/api2/test_account_ssh_key.py, against keyhaven.

Each test runs for both places keyhaven writes keys (``keys_location``):
``data`` (its default, ``<data>/sshd/authorized_keys/<user>``, root-owned) and
``home`` (``ssh.authorized_keys_location = home``: ``~/.ssh/authorized_keys``,
TrueNAS's layout) -- and for both account modes.

keyhaven differs, for every test here:
* ``sshpubkey`` is validated line by line (key type, base64, options), so the
  tests store real public keys where TrueNAS stores the strings "old" and "new";
* ``home`` is the home itself; TrueNAS makes ``<home>/<username>`` when
  ``home_create`` is set, keyhaven ignores ``home_create``.
TrueNAS reads files back over ssh as root (``ssh("cat ...")``); these tests run
on the system itself and read them directly.
"""

from __future__ import annotations

import grp
import os
import stat

import pytest

from pytruenas import ValidationErrors

from truenas_assets import free_uid, generate_key_files, os_account, sh

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two real key pairs standing in for TrueNAS's "old" and "new"."""
    directory = tmp_path_factory.mktemp("account-keys")
    return {label: generate_key_files(directory, label) for label in ("old", "new")}


@pytest.fixture(params=["data", "home"], ids=["keys=data", "keys=home"])
def system(request, truenas_systems, manage_os):
    return truenas_systems.get(manage_os=manage_os, keys_in_home=request.param == "home")


@pytest.fixture
def accounts(system, accounts_on):
    return accounts_on(system)


def _assert_keys_file(system, username: str, home: str, text: str) -> None:
    path = system.keys_file(username, home)
    assert path.read_text() == text
    st = path.stat()
    if system.keys_in_home:
        # TrueNAS: ~/.ssh 0700 and authorized_keys 0600, both owned by the user.
        uid = os_account(username).pw_uid
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o600)
        ssh_dir = path.parent.stat()
        assert (ssh_dir.st_uid, stat.S_IMODE(ssh_dir.st_mode)) == (uid, 0o700)
    else:
        # keyhaven differs: root-owned 0644 in its data dir, which sshd's
        # AuthorizedKeysFile names; the account cannot change its own keys.
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)


def _assert_matches_os(entry: dict) -> None:
    account = os_account(entry["username"])
    group = grp.getgrgid(account.pw_gid)
    assert (entry["uid"], entry["home"], entry["shell"]) == (account.pw_uid, account.pw_dir, account.pw_shell)
    assert (entry["group"]["bsdgrp_gid"], entry["group"]["bsdgrp_group"]) == (group.gr_gid, group.gr_name)


def test_account_create_update_ssh_key_in_existing_dir(system, accounts, keys):
    """tests/api2/test_account_ssh_key.py::test_account_create_update_ssh_key_in_existing_dir"""
    old, new = keys["old"][1], keys["new"][1]
    ds = accounts.dataset()
    name = accounts.name()
    homedir = f"{ds}/{name}"
    with accounts.user({
        "username": name,
        "full_name": "Test",
        "home": homedir,
        "password": "test1234",
        "group_create": True,
        "sshpubkey": old,
    }) as u:
        system.call("user.delete", u["id"])
        # The home (and, in TrueNAS's layout, its .ssh) is still there.
        assert os.path.isdir(homedir)

        with accounts.user({
            "username": name,
            "full_name": "Test",
            "home": homedir,
            "password": "test1234",
            "group_create": True,
            "sshpubkey": new,
        }) as u:
            u = system.call("user.get_instance", u["id"])
            assert u["sshpubkey"] == new
            _assert_keys_file(system, name, homedir, new)


def test_account_update_ssh_key_and_set_homedir(system, accounts, keys, request):
    """tests/api2/test_account_ssh_key.py::test_account_update_ssh_key_and_set_homedir"""
    new = keys["new"][1]
    # As on TrueNAS, the new home is an existing directory (the dataset itself).
    homedir = accounts.dataset()
    name = accounts.name()

    with accounts.user({
        "username": name,
        "full_name": "Test",
        "password": "test1234",
        "group_create": True,
    }) as u:
        if system.manage_os:
            system.call("user.update", u["id"], {
                "home": homedir,
                "sshpubkey": new,
            })
        else:
            # keyhaven differs: with accounts.manage_os = false it never changes
            # the OS account, so it refuses to change the home ...
            with pytest.raises(ValidationErrors) as ve:
                system.call("user.update", u["id"], {"home": homedir, "sshpubkey": new})
            assert any(
                attr == "user_update.home" and "accounts.manage_os" in msg for attr, msg, _c in ve.value.errors
            ), ve.value.errors
            # ... the administrator changes the account in the OS (home, and
            # here also uid, primary group and shell), and keyhaven follows:
            # user.query shows the account as NSS has it, not a stored copy.
            group = accounts.os_group()
            uid = free_uid()
            sh("usermod", "-d", homedir, "-u", str(uid), "-g", group, "-s", "/bin/sh", name)
            # keyhaven differs: a uid changed behind its back may be another
            # person; keys are refused until the admin adopts the new uid.
            with pytest.raises(ValidationErrors) as ve:
                system.call("user.update", u["id"], {"sshpubkey": new})
            assert any(
                attr == "user_update.sshpubkey" and f"now has uid {uid}" in msg for attr, msg, _c in ve.value.errors
            ), ve.value.errors
            assert system.call("user.get_instance", u["id"])["os_account"]["state"] == "UID_CHANGED"
            system.call("user.update", u["id"], {"uid": uid, "sshpubkey": new})
            _assert_matches_os(system.call("user.get_instance", u["id"]))

        u = system.call("user.get_instance", u["id"])
        assert u["sshpubkey"] == new
        # The account, in keyhaven and in the OS, has the new home, and the key is where sshd reads it.
        assert u["home"] == homedir
        assert os_account(name).pw_dir == homedir
        _assert_keys_file(system, name, homedir, new)


def test_account_sets_ssh_key_on_user_create(system, accounts, keys):
    """tests/api2/test_account_ssh_key.py::test_account_sets_ssh_key_on_user_create"""
    key_path, old = keys["old"]
    ds = accounts.dataset()
    name = accounts.name()
    homedir = f"{ds}/{name}"
    data = {
        "username": name,
        "full_name": "Test",
        "home": homedir,
        "password": "test1234",
        "group_create": True,
    }

    # keyhaven differs: TrueNAS stores any text ("old"); keyhaven refuses what is not an authorized_keys line.
    with pytest.raises(ValidationErrors) as ve:
        with accounts.user({**data, "sshpubkey": "old"}):
            pass
    assert any(attr == "user_create.sshpubkey" for attr, _m, _c in ve.value.errors), ve.value.errors
    if system.manage_os:
        assert os_account(name) is None  # refused before useradd

    with accounts.user({**data, "sshpubkey": old}):
        _assert_keys_file(system, name, homedir, old)
        if not system.keys_in_home:
            # And the key lets the account in through keyhaven's sshd.
            system.ensure_sshd()
            result = system.ssh("whoami", user=name, key_path=key_path)
            assert result["result"], result["output"]
            assert result["stdout"].strip() == name


def test_account_delete_ssh_key_on_user_delete(system, accounts, keys):
    """tests/api2/test_account_ssh_key.py::test_account_delete_ssh_key_on_user_delete"""
    old = keys["old"][1]
    ds = accounts.dataset()
    name = accounts.name()
    homedir = f"{ds}/{name}"

    with accounts.user({
        "username": name,
        "full_name": "Test",
        "home": homedir,
        "password": "test1234",
        "group_create": True,
        "sshpubkey": old,
    }) as u:
        system.call("user.delete", u["id"])

        # TrueNAS: `cat <home>/.ssh/authorized_keys` prints nothing.
        assert not system.keys_file(name, homedir).exists()
