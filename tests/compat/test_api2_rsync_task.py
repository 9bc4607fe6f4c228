"""TrueNAS tests/api2/test_rsync_ssh_authentication.py (the keychain-credentials
case), against keyhaven: pytruenas drives ``rsynctask.create``/``query``/``run``
and waits on the run's job, unchanged.

keyhaven differs: there are no pools, so ``path`` is any absolute directory
outside keyhaven's data dir, and the remote is keyhaven's own supervised sshd.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from pytruenas import ValidationErrors


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rsync_task_over_a_keychain_connection(truenas, accounts):
    port = truenas.ensure_sshd()
    kp = truenas.call("keychaincredential.create", {
        "name": accounts.name("rsync"),
        "type": "SSH_KEY_PAIR",
        "attributes": truenas.call("keychaincredential.generate_ssh_key_pair"),
    })
    try:
        name = accounts.name()
        home = f"{accounts.dataset()}/{name}"
        with accounts.user({"username": name, "full_name": "rsync target", "home": home, "password": "test1234",
                            "group_create": True, "sshpubkey": kp["attributes"]["public_key"]}) as user:
            dst = pathlib.Path(home) / "backup"
            dst.mkdir()
            os.chown(dst, user["uid"], os.stat(home).st_gid)
            src = pathlib.Path(accounts.dataset())
            (src / "sub dir").mkdir()
            (src / "sub dir" / "a.txt").write_text("hello from pytruenas\n")
            (src / "b.bin").write_bytes(os.urandom(100_000))

            conn = truenas.call("keychaincredential.create", {
                "name": accounts.name("conn"),
                "type": "SSH_CREDENTIALS",
                "attributes": {
                    "host": "127.0.0.1", "port": port, "username": name, "private_key": kp["id"],
                    "remote_host_key": truenas.call("keychaincredential.remote_ssh_host_key_scan",
                                                    {"host": "127.0.0.1", "port": port}),
                },
            })
            task = truenas.call("rsynctask.create", {
                "path": str(src), "user": "root", "mode": "SSH", "direction": "PUSH",
                "remotepath": str(dst), "ssh_credentials": conn["id"],
            })
            try:
                assert task["ssh_credentials"]["id"] == conn["id"]
                assert task["schedule"] == {"minute": "00", "hour": "*", "dom": "*", "month": "*", "dow": "*"}
                truenas.call("rsynctask.run", task["id"], job=True)
                assert _tree(dst) == _tree(src)
                again = truenas.call("rsynctask.query", [["id", "=", task["id"]]], {"get": True})
                assert again["job"]["state"] == "SUCCESS", again
                used = truenas.call("keychaincredential.used_by", conn["id"])
                assert [u["unbind_method"] for u in used] == ["disable"], used
            finally:
                truenas.call("rsynctask.delete", task["id"])
                truenas.call("keychaincredential.delete", conn["id"])
    finally:
        truenas.call("keychaincredential.delete", kp["id"], {"cascade": True})


def test_rsync_task_validation(truenas, accounts):
    src = accounts.dataset()
    with pytest.raises(ValidationErrors) as ve:
        truenas.call("rsynctask.create", {"path": src, "user": "root", "mode": "MODULE", "remotemodule": "m"})
    assert any(attr == "rsync_task_create.remotehost" for attr, _msg, _code in ve.value.errors), ve.value.errors
    with pytest.raises(ValidationErrors) as ve:
        truenas.call("rsynctask.create", {"path": src, "user": "root", "mode": "SSH", "remotehost": "h",
                                          "remotepath": "/x", "extra": ["--rsh=ssh -i /tmp/key"]})
    assert any(attr == "rsync_task_create.extra" for attr, _msg, _code in ve.value.errors), ve.value.errors
    assert truenas.call("rsynctask.query") == []
