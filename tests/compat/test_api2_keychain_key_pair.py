"""TrueNAS tests/api2/test_keychain_key_pair.py, against keyhaven.

Each test keeps the original's name, calls and assertions; calls go through
pytruenas (``truenas.call`` is TrueNAS's ``utils.call``). Run once per account
mode (``manage_os``), although key pairs do not depend on it.
"""

from __future__ import annotations

import pathlib
import subprocess
import tempfile

import pytest

from pytruenas import ValidationErrors

from truenas_assets import sh


def _generate_private_key(passphrase=""):
    with tempfile.TemporaryDirectory() as tmpdir:
        key = pathlib.Path(tmpdir) / "key"
        subprocess.run(
            ["ssh-keygen", "-t", "rsa", "-f", str(key), "-N", passphrase, "-q"], check=True
        )
        return key.read_text()


def _create_key_pair(truenas, attributes):
    return truenas.call(
        "keychaincredential.create",
        {
            "name": "keychain-key-pair-test",
            "type": "SSH_KEY_PAIR",
            "attributes": attributes,
        },
    )


def _assert_error(ve, attribute, message):
    assert any(
        attr == attribute and message in errmsg for attr, errmsg, _code in ve.value.errors
    ), ve.value.errors


def _public_key_of(private_key: str, passphrase: str, tmp_path: pathlib.Path) -> str:
    """``ssh-keygen -y``: the public key OpenSSH derives from a private key."""
    path = tmp_path / "derive"
    path.write_text(private_key)
    path.chmod(0o600)
    return sh("ssh-keygen", "-y", "-P", passphrase, "-f", str(path)).stdout


def test_create_key_pair_with_passphrase(truenas, tmp_path):
    """tests/api2/test_keychain_key_pair.py::test_create_key_pair_with_passphrase"""
    private_key = _generate_private_key("passphrase")
    with pytest.raises(ValidationErrors) as ve:
        _create_key_pair(truenas, {"private_key": private_key})

    _assert_error(
        ve,
        "keychain_credential_create.attributes.private_key",
        "Encrypted private keys are not allowed",
    )

    # keyhaven differs: given its passphrase (attributes.passphrase, a keyhaven
    # extension) an encrypted key is imported; TrueNAS refuses every encrypted key.
    with pytest.raises(ValidationErrors) as ve:
        _create_key_pair(truenas, {"private_key": private_key, "passphrase": "not-the-passphrase"})
    _assert_error(ve, "keychain_credential_create.attributes.passphrase", "passphrase")

    keypair = _create_key_pair(truenas, {"private_key": private_key, "passphrase": "passphrase"})
    try:
        stored = keypair["attributes"]["private_key"]
        assert "passphrase" not in keypair["attributes"]
        # Stored decrypted: OpenSSH reads it without a passphrase, and it is the same key.
        original = _public_key_of(private_key, "passphrase", tmp_path)
        assert _public_key_of(stored, "", tmp_path).split()[:2] == original.split()[:2]
        assert keypair["attributes"]["public_key"].split()[:2] == original.split()[:2]
    finally:
        truenas.call("keychaincredential.delete", keypair["id"])


def test_create_key_pair_with_broken_private_key(truenas):
    """tests/api2/test_keychain_key_pair.py::test_create_key_pair_with_broken_private_key"""
    with pytest.raises(ValidationErrors) as ve:
        _create_key_pair(
            truenas,
            {
                "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nbroken\n-----END OPENSSH PRIVATE KEY-----\n",
            },
        )

    assert any(
        attr == "keychain_credential_create.attributes.private_key"
        for attr, _errmsg, _code in ve.value.errors
    ), ve.value.errors


def test_create_key_pair_without_keys(truenas):
    """tests/api2/test_keychain_key_pair.py::test_create_key_pair_without_keys"""
    with pytest.raises(ValidationErrors) as ve:
        _create_key_pair(truenas, {})

    _assert_error(
        ve, "keychain_credential_create.attributes.public_key", "You must specify a key"
    )


def test_create_key_pair_with_non_matching_keys(truenas):
    """tests/api2/test_keychain_key_pair.py::test_create_key_pair_with_non_matching_keys"""
    pair1 = truenas.call("keychaincredential.generate_ssh_key_pair")
    pair2 = truenas.call("keychaincredential.generate_ssh_key_pair")

    with pytest.raises(ValidationErrors) as ve:
        _create_key_pair(
            truenas, {"private_key": pair1["private_key"], "public_key": pair2["public_key"]}
        )

    _assert_error(
        ve,
        "keychain_credential_create.attributes.public_key",
        "Private key and public key do not match",
    )


def test_create_key_pair_with_invalid_public_key_only(truenas):
    """tests/api2/test_keychain_key_pair.py::test_create_key_pair_with_invalid_public_key_only"""
    with pytest.raises(ValidationErrors) as ve:
        _create_key_pair(truenas, {"public_key": "this is not a valid public key"})

    _assert_error(
        ve, "keychain_credential_create.attributes.public_key", "Invalid public key"
    )


def test_create_key_pair_derives_public_key_from_private_key(truenas):
    """tests/api2/test_keychain_key_pair.py::test_create_key_pair_derives_public_key_from_private_key"""
    generated = truenas.call("keychaincredential.generate_ssh_key_pair")

    keypair = _create_key_pair(truenas, {"private_key": generated["private_key"]})
    try:
        # The public key is not supplied, so it must be derived from the private key. Compare the key material
        # (second field) because the derived key carries no comment.
        assert (
            keypair["attributes"]["public_key"].split()[1]
            == generated["public_key"].split()[1]
        )
    finally:
        truenas.call("keychaincredential.delete", keypair["id"])
