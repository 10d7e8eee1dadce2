"""crs_core.accounts: roles and the permission table, password hashes, the accounts file."""

from __future__ import annotations

import os
import stat

import pytest

from crs_core import accounts
from crs_core.accounts import (LOCAL_OWNER, AccountError, Accounts, PermissionDenied, SignInError, User,
                               require)


@pytest.fixture()
def book(tmp_path):
    book = Accounts(tmp_path / "accounts.json")
    owner = book.add("olga", "owner", "correct horse battery")
    book.add("cura", "curator", "curator-pass-1", actor=owner)
    book.add("ann", "annotator", "annotator-pass-1", actor=owner)
    book.add("vic", "viewer", "viewer-pass-1", actor=owner)
    return book


def test_roles_allow_what_the_table_says():
    viewer, annotator, curator = User("v", "viewer"), User("a", "annotator"), User("c", "curator")
    for action in ("synthesize", "train", "select", "augment", "budget_curve", "evaluate", "bulk_review"):
        with pytest.raises(PermissionDenied, match="may not"):
            require(viewer, action)
        with pytest.raises(PermissionDenied):
            require(annotator, action)
        assert require(curator, action) is curator
    assert require(annotator, "judge") is annotator
    with pytest.raises(PermissionDenied):
        require(viewer, "judge")
    with pytest.raises(PermissionDenied):
        require(curator, "manage_users")
    assert all(LOCAL_OWNER.may(action) for action in accounts.PERMISSIONS)
    with pytest.raises(PermissionDenied, match="sign in"):
        require(None, "view")
    with pytest.raises(ValueError):
        require(curator, "launch_rockets")


def test_passwords_are_stored_only_as_salted_slow_hashes(book):
    text = book.path.read_text()
    for password in ("correct horse battery", "curator-pass-1", "annotator-pass-1"):
        assert password not in text
    assert text.count("scrypt$16384$8$1$") == 4
    assert stat.S_IMODE(os.stat(book.path).st_mode) == 0o600
    h1, h2 = accounts.hash_password("same password"), accounts.hash_password("same password")
    assert h1 != h2 and accounts.verify_password("same password", h1) and accounts.verify_password("same password", h2)
    assert not accounts.verify_password("other password", h1)
    assert not accounts.verify_password("x", "not-a-hash")


def test_sign_in_gives_one_message_for_a_wrong_name_or_password(book):
    assert book.sign_in("ann", "annotator-pass-1") == User("ann", "annotator")
    with pytest.raises(SignInError) as wrong_password:
        book.sign_in("ann", "annotator-pass-2")
    with pytest.raises(SignInError) as wrong_name:
        book.sign_in("nobody", "annotator-pass-1")
    assert str(wrong_password.value) == str(wrong_name.value) == "wrong name or password"


def test_only_owners_manage_accounts_and_the_last_owner_stays(book):
    cura = book.get("cura")
    with pytest.raises(PermissionDenied):
        book.add("eve", "owner", "eve-password", actor=cura)
    with pytest.raises(PermissionDenied):
        book.set_role("ann", "curator", actor=cura)
    owner = book.get("olga")
    with pytest.raises(AccountError, match="last owner"):
        book.set_role("olga", "viewer", actor=owner)
    with pytest.raises(AccountError, match="last owner"):
        book.remove("olga", actor=owner)
    book.set_role("ann", "curator", actor=owner)
    assert book.get("ann").role == "curator"
    book.set_password("ann", "a-new-password", actor=book.get("ann"))  # anyone may change their own
    assert book.sign_in("ann", "a-new-password").name == "ann"
    book.remove("vic", actor=owner)
    assert [u.name for u in book.users()] == ["ann", "cura", "olga"]


def test_bad_requests_get_clear_errors(tmp_path):
    book = Accounts(tmp_path / "a.json")
    with pytest.raises(AccountError, match="first account must be an owner"):
        book.add("ann", "annotator", "long enough")
    owner = book.add("olga", "owner", "long enough")
    with pytest.raises(AccountError, match="at least 8"):
        book.add("bob", "viewer", "short", actor=owner)
    with pytest.raises(AccountError, match="unknown role"):
        book.add("bob", "admin", "long enough", actor=owner)
    with pytest.raises(AccountError, match="not a usable name"):
        book.add("<script>", "viewer", "long enough", actor=owner)
    with pytest.raises(AccountError, match="already"):
        book.add("olga", "viewer", "long enough", actor=owner)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AccountError, match="unreadable"):
        Accounts(tmp_path / "broken.json").users()


def test_studio_mode(monkeypatch):
    monkeypatch.delenv(accounts.MODE_ENV, raising=False)
    assert accounts.studio_mode() == "single"
    monkeypatch.setenv(accounts.MODE_ENV, "team")
    assert accounts.studio_mode() == "team"
    monkeypatch.setenv(accounts.MODE_ENV, "open")
    with pytest.raises(AccountError):
        accounts.studio_mode()


def test_writes_are_stamped_with_the_acting_user_of_the_thread():
    import threading

    assert accounts.acting_name() == "local"  # the CLI and scripts act as the local owner
    seen = []
    worker = threading.Thread(target=lambda: (accounts.set_acting(User("ann", "annotator")),
                                              seen.append(accounts.acting_name())))
    worker.start()
    worker.join()
    assert seen == ["ann"] and accounts.acting_name() == "local"  # per thread, never leaked
