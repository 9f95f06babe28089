"""Rater accounts: password hashing, login with per-account backoff, and server-issued login sessions.

Passwords are stored as versioned scrypt strings (``scrypt$<log2 n>$<r>$<p>$<salt>$<hash>``, salt per
account); a login session is a random token the browser keeps in an HttpOnly cookie, of which the
database holds only the sha256. No IP address is read or stored. The caller passes the policy
(``AuthPolicy``, built from ``mmapp.config.AuthConfig`` by the app); this module imports no config.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Optional

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import read_only_engine, retry_on_busy
from feedback_db.models import RATER_ROLES, utcnow

log = logging.getLogger("mmapp.accounts")

HASH_SCHEME = "scrypt"
MIN_PASSWORD_CHARS = 10


@dataclass(frozen=True)
class AuthPolicy:
    """Knobs of accounts and sessions (``mmapp.config.AuthConfig`` has the defaults and comments)."""

    scrypt_log2_n: int = 14
    session_idle_minutes: float = 30.0
    session_max_hours: float = 12.0
    lockout_after: int = 5
    lockout_base_s: float = 30.0
    lockout_max_s: float = 900.0

    def __post_init__(self) -> None:
        if not 10 <= self.scrypt_log2_n <= 20:
            raise ValueError(f"scrypt_log2_n must be in 10..20, got {self.scrypt_log2_n}")
        if self.session_idle_minutes <= 0 or self.session_max_hours <= 0:
            raise ValueError("session_idle_minutes and session_max_hours must be > 0, got "
                             f"{self.session_idle_minutes} and {self.session_max_hours}")
        if self.lockout_after < 1 or self.lockout_base_s < 0 or self.lockout_max_s < self.lockout_base_s:
            raise ValueError(f"bad lockout settings: after={self.lockout_after}, base={self.lockout_base_s}, "
                             f"max={self.lockout_max_s}")

    @classmethod
    def from_config(cls, auth: object) -> "AuthPolicy":
        """From ``mmapp.config.AuthConfig`` (read by attribute; this package imports no config)."""
        return cls(**{f: getattr(auth, f) for f in ("scrypt_log2_n", "session_idle_minutes", "session_max_hours",
                                                     "lockout_after", "lockout_base_s", "lockout_max_s")})

    def lock_for_s(self, failed_logins: int) -> float:
        """Seconds an account stays locked after its ``failed_logins``-th failure in a row (0 = not locked):
        ``lockout_base_s`` at the ``lockout_after``-th, doubling with each further one, capped."""
        if failed_logins < self.lockout_after:
            return 0.0
        return min(self.lockout_base_s * 2.0 ** (failed_logins - self.lockout_after), self.lockout_max_s)


# --- password hashes --------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, log2_n: int = 14, r: int = 8, p: int = 1) -> str:
    """``scrypt$<log2 n>$<r>$<p>$<salt>$<hash>`` with a fresh 16-byte salt (base64, no padding)."""
    if not isinstance(password, str) or not password:
        raise ValueError("a password must be a non-empty string")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2 ** log2_n, r=r, p=p, dklen=32,
                            maxmem=2 ** (log2_n + 11))
    return f"{HASH_SCHEME}${log2_n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a stored hash; ValueError on a malformed or unknown scheme."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != HASH_SCHEME:
        raise ValueError(f"unknown password hash scheme {parts[0]!r}; this version reads {HASH_SCHEME!r}")
    log2_n, r, p = (int(x) for x in parts[1:4])
    if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError(f"scrypt parameters out of range: log2 n={log2_n}, r={r}, p={p}")
    expected = _unb64(parts[5])
    digest = hashlib.scrypt((password or "").encode(), salt=_unb64(parts[4]), n=2 ** log2_n, r=r, p=p,
                            dklen=len(expected), maxmem=2 ** (log2_n + r.bit_length() + 8))
    return hmac.compare_digest(digest, expected)


def check_new_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return password


def generate_password() -> str:
    """A random password to hand to a new rater once (about 120 bits)."""
    return secrets.token_urlsafe(15)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- the service ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Who a request is, decided by the server from its login cookie."""

    name: str
    role: str  # one of RATER_ROLES

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    message: str  # for the person logging in; never says whether the name exists
    identity: Optional[Identity] = None
    token: Optional[str] = None  # the cookie value; only on success
    max_age_s: int = 0  # cookie lifetime (the session's absolute expiry)
    retry_after_s: float = 0.0  # > 0 when the account is locked


class Accounts:
    """Logins and sessions over the feedback database. Thread-safe: every call is its own transaction."""

    def __init__(self, engine: Engine, policy: AuthPolicy = AuthPolicy(), *,
                 clock: Callable[[], datetime] = utcnow):
        self.engine = engine
        self.policy = policy
        self.clock = clock
        self._dummy_hash = hash_password(secrets.token_urlsafe(16), log2_n=policy.scrypt_log2_n)
        self._name_locks = [threading.Lock() for _ in range(64)]  # striped by name: one attempt per name at a time

    def _tx(self, fn):
        def run():
            with Session(self.engine) as s, s.begin():
                return fn(s)
        return retry_on_busy(run)

    # -- accounts --
    def create(self, name: str, role: str, password: str | None = None, *,
               created_by: str | None = None) -> tuple[Identity, str]:
        """A new account; returns it and its password (generated when none is given: show it once)."""
        if role not in RATER_ROLES:
            raise ValueError(f"role must be one of {RATER_ROLES}, got {role!r}")
        password = check_new_password(password) if password else generate_password()
        hashed = hash_password(password, log2_n=self.policy.scrypt_log2_n)
        self._tx(lambda s: repo.create_rater(s, name=name, role=role, password_hash=hashed,
                                            created_by=created_by))
        log.info("account %r created with role %r by %r", name, role, created_by)
        return Identity(name, role), password

    def ensure_operator(self, name: str, password: str) -> None:
        """The bootstrap operator from MMAPP_OPERATOR_USER/PASSWORD: created, or its password and role
        brought in line with the environment (which stays authoritative for this one account)."""
        def sync(s: Session) -> None:
            row = repo.get_rater(s, name)
            if row is None:
                repo.create_rater(s, name=name, role="operator", created_by="environment",
                                  password_hash=hash_password(password, log2_n=self.policy.scrypt_log2_n))
                return
            fresh = verify_password(password, row.password_hash)
            if not fresh or row.role != "operator" or row.disabled_at is not None:
                repo.update_rater(s, name, role="operator", disabled=False, now=self.clock(),
                                  password_hash=None if fresh else hash_password(
                                      password, log2_n=self.policy.scrypt_log2_n))
        self._tx(sync)

    def update(self, name: str, *, role: str | None = None, password: str | None = None,
               disabled: bool | None = None) -> None:
        hashed = hash_password(check_new_password(password), log2_n=self.policy.scrypt_log2_n) if password else None
        self._tx(lambda s: repo.update_rater(s, name, role=role, password_hash=hashed, disabled=disabled,
                                             now=self.clock()))

    def unlock(self, name: str) -> None:
        self._tx(lambda s: repo.unlock_rater(s, name))

    def list_accounts(self) -> list[dict]:
        def rows(s: Session) -> list[dict]:
            return [{"name": r.name, "role": r.role, "disabled": r.disabled_at is not None,
                     "failed_logins": r.failed_logins, "locked_until": r.locked_until,
                     "last_login_at": r.last_login_at, "created_by": r.created_by, "created_at": r.created_at}
                    for r in repo.list_raters(s)]
        return self._tx(rows)

    # -- login --
    def login(self, name: str, password: str) -> LoginResult:
        """Check a password under the per-account backoff; on success open a session.

        A locked account is refused before any hashing, with the time left; a wrong password adds one
        failure and may lock the account. Unknown names cost the same hashing as known ones. The hash
        is computed outside any database transaction (it never holds SQLite's write lock), and
        attempts on one name run one at a time in this process, so a burst of guesses at one account
        gets ``lockout_after`` hashes, not one per guess.
        """
        name = (name or "").strip()[:64]
        with self._name_locks[zlib.crc32(name.encode()) % len(self._name_locks)]:
            return self._login(name, password or "")

    def _login(self, name: str, password: str) -> LoginResult:
        now = self.clock()
        wrong = LoginResult(False, "Wrong user or password.")

        def snapshot(s: Session):
            row = repo.get_rater(s, name) if name else None
            return None if row is None else (row.password_hash, row.locked_until)

        found = retry_on_busy(lambda: self._read(snapshot))
        if found is not None and found[1] is not None and found[1] > now:
            left = (found[1] - now).total_seconds()
            self._tx(lambda s: repo.record_login_attempt(s, name=name, outcome="locked", rater=repo.get_rater(s, name),
                                                         now=now))
            log.warning("login refused for account name %r: locked for %.0f s more", name, left)
            return LoginResult(False, f"Too many failed logins for this account: try again in {left:.0f} s.",
                               retry_after_s=left)
        ok = verify_password(password, found[0] if found is not None else self._dummy_hash) and found is not None

        def record(s: Session) -> LoginResult:
            row = repo.get_rater(s, name) if name else None
            if row is None:
                repo.record_login_attempt(s, name=name, outcome="unknown_user", now=now)
                return wrong
            if not ok:
                lock_s = self.policy.lock_for_s(row.failed_logins + 1)
                until = now + timedelta(seconds=lock_s) if lock_s else None
                repo.record_login_attempt(s, name=name, outcome="wrong_password", rater=row, locked_until=until,
                                          now=now)
                return wrong
            if row.disabled_at is not None:
                repo.record_login_attempt(s, name=name, outcome="disabled", rater=row, now=now)
                return LoginResult(False, "This account is disabled.")
            repo.record_login_attempt(s, name=name, outcome="ok", rater=row, now=now)
            repo.purge_auth_sessions(s, before=now - timedelta(days=1))  # ended sessions do not pile up
            token = secrets.token_urlsafe(32)
            max_age = self.policy.session_max_hours * 3600
            repo.create_auth_session(s, token_sha256=token_sha256(token), rater=row,
                                     expires_at=now + timedelta(seconds=max_age), now=now)
            return LoginResult(True, f"Logged in as {row.name} ({row.role}).", Identity(row.name, row.role),
                               token, int(max_age))

        result = self._tx(record)
        if not result.ok:
            log.warning("failed login for account name %r: %s", name, result.message)
        return result

    def identity(self, token: str | None) -> Optional[Identity]:
        """The account behind a session cookie, or None (no cookie, unknown, expired, idle, logged out).
        A read-only check (it never holds SQLite's write lock); the session's idle clock is written at
        most every ``min(30 s, idle / 4)``."""
        if not token or len(token) > 128:
            return None
        now, digest = self.clock(), token_sha256(token)
        idle_s = self.policy.session_idle_minutes * 60

        def look(s: Session):
            found = repo.session_rater(s, digest, idle_s=idle_s, now=now)
            return None if found is None else (Identity(found[0].name, found[0].role), found[1].last_seen_at)

        found = retry_on_busy(lambda: self._read(look))
        if found is None:
            return None
        who, last_seen = found
        if (now - last_seen).total_seconds() >= min(30.0, idle_s / 4):
            self._tx(lambda s: repo.touch_auth_session(s, digest, now=now))
        return who

    def _read(self, fn):
        with Session(read_only_engine(self.engine)) as s, s.begin():
            return fn(s)

    def logout(self, token: str | None) -> bool:
        if not token or len(token) > 128:
            return False
        return self._tx(lambda s: repo.revoke_auth_session(s, token_sha256(token), now=self.clock()))
