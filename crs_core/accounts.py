"""Studio accounts, roles and the one permission check every action goes through.

Roles, from most to least trusted:

- **owner**: users, workspaces, settings, API keys — and everything below;
- **curator**: actions that spend compute or money (selection, synthesis, augmentation,
  training, evaluation, budget curves), assigning review work, bulk review, settling disputes;
- **annotator**: judging the dialogues assigned to them (crs_core.judging);
- **viewer**: read-only (map, charts, results).

`require(user, action)` is the check: crs_core entry points call it, so a hidden button is never
the only guard. The studio runs in one of two modes (`studio_mode()`):

- ``single`` (the default of ``bash studio.sh`` on 127.0.0.1): no sign-in, the person at the
  machine is the local owner (`LOCAL_OWNER`), and the pages say so;
- ``team`` (``CRS_STUDIO_MODE=team``): every visitor signs in with an account made by
  ``python -m crs_core users add NAME --role ROLE``.

Accounts live in one JSON file (``data/accounts.json``, or ``$CRS_ACCOUNTS``), written atomically
with mode 0600. Passwords are kept only as salted scrypt hashes (``hashlib.scrypt``, a
memory-hard KDF from Python's standard library: n=2^14, r=8, p=1, 16-byte salt, 32-byte key,
~50 ms per check), compared in constant time. A failed sign-in says the same thing whether the
name or the password was wrong.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import CRSError

ROLES: tuple[str, ...] = ("owner", "curator", "annotator", "viewer")

# action -> the roles allowed to do it; the one table of who may do what.
PERMISSIONS: dict[str, frozenset[str]] = {
    "manage_users": frozenset({"owner"}),
    "settings": frozenset({"owner"}),
    "api_keys": frozenset({"owner"}),
    **{action: frozenset({"owner", "curator"}) for action in (
        "ingest", "embed", "cluster", "select", "synthesize", "augment", "train", "evaluate",
        "budget_curve", "assign_review", "review_directly", "bulk_review", "settle_dispute",
        "export", "background_work")},
    "judge": frozenset({"owner", "curator", "annotator"}),
    "view": frozenset(ROLES),
}

ACTION_LABELS = {
    "manage_users": "manage users", "settings": "change settings", "api_keys": "manage API keys",
    "ingest": "import data", "embed": "compute embeddings", "cluster": "cluster",
    "select": "run a selection", "synthesize": "start synthesis", "augment": "start label augmentation",
    "train": "launch training", "evaluate": "run an evaluation", "budget_curve": "run budget curves",
    "assign_review": "assign review work", "bulk_review": "change many dialogues at once",
    "review_directly": "approve, reject or edit dialogues outside an assignment",
    "background_work": "start work that spends compute or money",
    "settle_dispute": "settle a disputed dialogue", "export": "export data",
    "judge": "judge dialogues", "view": "view the studio",
}

MIN_PASSWORD = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
DEFAULT_ACCOUNTS = Path(__file__).resolve().parent.parent / "data" / "accounts.json"
MODE_ENV = "CRS_STUDIO_MODE"


class AccountError(CRSError):
    """A bad account request: unknown role, taken name, short password, unreadable file."""


class SignInError(CRSError):
    """A failed sign-in (one message for a wrong name or a wrong password)."""


class PermissionDenied(CRSError):
    """The signed-in user's role does not allow the action."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def may(self, action: str) -> bool:
        return self.role in _allowed(action)


LOCAL_OWNER = User("local", "owner")  # single-user mode: the person at the machine (and the CLI)

# Who the current thread acts for: set by the studio for each page run and carried into its
# background threads (pages._shared.start_background), read by the writers that stamp
# `created_by` on selections, synthetic queries, jobs and runs. Unset: the local owner.
_ACTING: contextvars.ContextVar[User | None] = contextvars.ContextVar("crs_acting_user", default=None)


def set_acting(user: User | None) -> None:
    """Act for `user` in this thread from now on (None: the local owner)."""
    _ACTING.set(user)


def acting_name() -> str:
    """The name every write records: the signed-in user of this thread, else the local owner."""
    return (_ACTING.get() or LOCAL_OWNER).name


def _allowed(action: str) -> frozenset[str]:
    try:
        return PERMISSIONS[action]
    except KeyError:
        raise ValueError(f"unknown action {action!r}") from None


def require(user: User | None, action: str) -> User:
    """Return ``user`` if their role allows ``action``; else raise `PermissionDenied`."""
    allowed = _allowed(action)
    if user is None:
        raise PermissionDenied(f"sign in to {ACTION_LABELS[action]}")
    if user.role not in allowed:
        who = " or ".join(r for r in ROLES if r in allowed)
        raise PermissionDenied(f"{user.name} ({user.role}) may not {ACTION_LABELS[action]}; ask a {who}")
    return user


def studio_mode() -> str:
    """``single`` (no sign-in, local owner) or ``team`` (sign-in required)."""
    mode = os.environ.get(MODE_ENV, "single").strip().lower() or "single"
    if mode not in ("single", "team"):
        raise AccountError(f"{MODE_ENV} must be 'single' or 'team', not {mode!r}")
    return mode


# -- password hashes -----------------------------------------------------------------------------
def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt)}${b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), dklen=len(expected),
                             n=int(n), r=int(r), p=int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


# -- the accounts file ---------------------------------------------------------------------------
class Accounts:
    """The studio's accounts (one JSON file; every call reads it, writes replace it atomically)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path or os.environ.get("CRS_ACCOUNTS") or DEFAULT_ACCOUNTS)

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AccountError(f"{self.path} is unreadable: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
            raise AccountError(f"{self.path} is not an accounts file")
        return data["users"]

    def _save(self, users: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".accounts-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"format": 1, "users": users}, fh, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def users(self) -> list[User]:
        return [User(name, rec["role"]) for name, rec in sorted(self._load().items())]

    def get(self, name: str) -> User | None:
        rec = self._load().get(name)
        return User(name, rec["role"]) if rec else None

    def add(self, name: str, role: str, password: str, *, actor: User | None = None) -> User:
        """Create an account. The first account must be an owner and needs no actor (it is made
        from the CLI by whoever runs the studio); later ones need an owner."""
        users = self._load()
        if users:
            require(actor, "manage_users")
        elif role != "owner":
            raise AccountError("the first account must be an owner (--role owner)")
        if not _NAME.match(name or ""):
            raise AccountError(f"{name!r} is not a usable name: letters, digits and . _ @ -, up to 64")
        _check_role(role)
        if name in users:
            raise AccountError(f"there is already an account named {name!r}")
        users[name] = {"role": role, "password": hash_password(password),
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._save(users)
        return User(name, role)

    def set_role(self, name: str, role: str, *, actor: User | None) -> User:
        require(actor, "manage_users")
        _check_role(role)
        users = self._load()
        if name not in users:
            raise AccountError(f"no account named {name!r}")
        if users[name]["role"] == "owner" and role != "owner" and _owners(users) == 1:
            raise AccountError(f"{name} is the last owner; make another owner first")
        users[name]["role"] = role
        self._save(users)
        return User(name, role)

    def set_password(self, name: str, password: str, *, actor: User | None) -> None:
        if actor is None or actor.name != name:
            require(actor, "manage_users")
        users = self._load()
        if name not in users:
            raise AccountError(f"no account named {name!r}")
        users[name]["password"] = hash_password(password)
        self._save(users)

    def remove(self, name: str, *, actor: User | None) -> None:
        require(actor, "manage_users")
        users = self._load()
        if name not in users:
            raise AccountError(f"no account named {name!r}")
        if users[name]["role"] == "owner" and _owners(users) == 1:
            raise AccountError(f"{name} is the last owner; make another owner first")
        del users[name]
        self._save(users)

    def sign_in(self, name: str, password: str) -> User:
        rec = self._load().get((name or "").strip())
        # hash even for an unknown name, so timing does not tell which names exist
        stored = rec["password"] if rec else _DUMMY_HASH
        if not verify_password(password or "", stored) or rec is None:
            raise SignInError("wrong name or password")
        return User(name.strip(), rec["role"])


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")


def _owners(users: dict[str, dict]) -> int:
    return sum(rec["role"] == "owner" for rec in users.values())


_DUMMY_HASH = hash_password(secrets.token_hex(16))
