"""Sessions in SQLite, one row per session (its JSON), so conversations survive a restart. Each save is
one transaction: a crash leaves the previous version, never half a session (WAL journal: readers
never wait for a writer)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from r1kit.apps.support.dialogue import Session
from r1kit.errors import R1kitError


class SessionNotFound(R1kitError):
    """No session with this id (the HTTP API answers 404)."""


class SessionStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, created REAL, body TEXT NOT NULL)")

    def save(self, session: Session) -> None:
        body = json.dumps(session.to_dict(), ensure_ascii=False)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO sessions (id, created, body) VALUES (?, ?, ?)", (session.id, session.created, body))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load(self, session_id: str) -> Session:
        with self._lock:
            row = self._db.execute("SELECT body FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionNotFound(f"no support session {session_id!r}; create one with POST /v1/support/sessions", param="session_id")
        return Session.from_dict(json.loads(row[0]))

    def create(self) -> Session:
        session = Session()
        self.save(session)
        return session

    def close(self) -> None:
        with self._lock:
            self._db.close()
