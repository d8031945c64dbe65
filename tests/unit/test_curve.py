"""Unit tests for inferd.curve: key files, their permissions, and what is never printed."""

from __future__ import annotations

import os

import pytest

from inferd import curve


def test_generate_writes_a_public_file_and_a_private_secret_file(tmp_path):
    public, secret = curve.generate(tmp_path / "keys", "server")
    assert public.name == "server.key" and secret.name == "server.key_secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600
    pub, sec = curve.load_secret(secret)
    assert curve.load_public(public) == pub and len(pub) == 40 and len(sec) == 40
    with pytest.raises(curve.CurveKeyError, match="not overwriting"):
        curve.generate(tmp_path / "keys", "server")


def test_a_secret_key_readable_by_others_is_refused(tmp_path):
    _, secret = curve.generate(tmp_path, "s")
    os.chmod(secret, 0o640)
    with pytest.raises(curve.CurveKeyError, match="accessible to other users"):
        curve.load_secret(secret)


def test_a_public_key_file_is_not_a_secret_key_and_garbage_is_not_a_key(tmp_path):
    public, _ = curve.generate(tmp_path, "s")
    os.chmod(public, 0o600)
    with pytest.raises(curve.CurveKeyError, match="no secret key"):
        curve.load_secret(public)
    bad = tmp_path / "bad.key_secret"
    bad.write_text("not a certificate")
    bad.chmod(0o600)
    with pytest.raises(curve.CurveKeyError):
        curve.load_secret(bad)
    with pytest.raises(curve.CurveKeyError, match="No such file"):
        curve.load_secret(tmp_path / "missing")
    with pytest.raises(curve.CurveKeyError, match="neither a key file"):
        curve.load_public("~" * 40)


def test_the_allowed_clients_directory_must_hold_a_key(tmp_path):
    (tmp_path / "clients").mkdir()
    with pytest.raises(curve.CurveKeyError, match="holds no public key"):
        curve.allowed_clients(tmp_path / "clients")
    curve.generate(tmp_path / "clients", "alice")
    assert [p.name for p in curve.allowed_clients(tmp_path / "clients")] == ["alice.key"]
    with pytest.raises(curve.CurveKeyError, match="not a directory"):
        curve.allowed_clients(tmp_path / "nope")


def test_client_keys_never_show_the_secret(tmp_path):
    server_public, _ = curve.generate(tmp_path, "server")
    _, client_secret = curve.generate(tmp_path, "client")
    keys = curve.ClientKeys.load(server_public, client_secret)
    assert keys.secret.decode() not in repr(keys) and keys.public.decode() in repr(keys)
    inline = curve.ClientKeys.load(keys.server_public.decode(), client_secret)
    assert inline == keys
