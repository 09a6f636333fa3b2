"""`herd tenants` never takes a database password on its command line (any user of the machine reads argv
in the process list): the URL comes from --db without one, from a file (--db-file) or from the settings'
environment variable."""

from __future__ import annotations

import json

import pytest

from herd.cli import main

SECRET = "S3cret-pw"


def _run(capsys, *args):
    code = main(["tenants", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://herd:{SECRET}@127.0.0.1:1/herd",
    f"postgresql+psycopg://herd@127.0.0.1:1/herd?password={SECRET}",
    f"postgresql+psycopg://:{SECRET}@127.0.0.1:1/herd",
])
def test_a_password_in_db_is_refused_before_connecting(capsys, url):
    code, out, err = _run(capsys, "--db", url, "list")
    assert code == 2 and out is None
    assert "password" in err and "--db-file" in err and "HERD_TENANCY__DATABASE_URL" in err
    assert SECRET not in err, "the refusal must not repeat the password"


def test_the_url_from_a_file(tmp_path, capsys):
    url_file = tmp_path / "database-url"
    url_file.write_text(f"sqlite:///{tmp_path / 'herd.db'}\n")
    code, tenant, _ = _run(capsys, "--db-file", str(url_file), "create", "team-x")
    assert code == 0 and tenant["id"] == "team-x"
    code, tenants, _ = _run(capsys, "--db-file", str(url_file), "list")
    assert code == 0 and [t["id"] for t in tenants] == ["team-x"]


def test_a_password_in_the_file_is_fine(tmp_path, capsys):
    """The file is where a password belongs; it reaches the driver (here: refused by nobody at port 1)."""
    url_file = tmp_path / "database-url"
    url_file.write_text(f"postgresql+psycopg://herd:{SECRET}@127.0.0.1:1/herd?connect_timeout=2")
    code, _, err = _run(capsys, "--db-file", str(url_file), "list")
    assert code == 2 and "password" not in err and SECRET not in err and "database" in err


def test_the_url_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HERD_TENANCY__DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    code, tenant, _ = _run(capsys, "create", "team-y")
    assert code == 0 and tenant["id"] == "team-y" and (tmp_path / "env.db").is_file()


def test_db_and_db_file_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tenants", "--db", "sqlite://", "--db-file", str(tmp_path / "url"), "list"])
    assert info.value.code == 2
    capsys.readouterr()
