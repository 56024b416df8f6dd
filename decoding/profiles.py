"""User profiles of the decode API: one JSON document per user id in an embedded SQLite database.

    store = Profiles("runs/serve/users.sqlite")
    store.put("u1", {"persona": "the user likes jokes .", "attribute_weights": {"humour": 1.0}})
    store.get("u1")        # {"user_id": "u1", "persona": ..., "created": ..., "updated": ...}
    store.delete("u1")     # True if it existed

Durability: the database runs in write-ahead-log mode (readers never block the single writer) with
`synchronous=FULL`, so a write that returned is on disk before the call returns: a profile survives the server
being killed with SIGKILL, and a power cut, at the cost of one fsync of the WAL per write (~1 ms on an SSD;
profile writes are rare next to completions). Every write is one transaction, so a crash mid-write leaves the
old document or the new one, never half of either; `update` reads and writes inside one transaction (PATCH).
The file is owner-only (0600), as the run's files are. A single connection is shared by the server's threads
behind a lock (SQLite serializes writers anyway; reads are sub-millisecond).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = """CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,      -- JSON document: persona, attribute_weights, pairs, fit
    created REAL NOT NULL,      -- unix seconds
    updated REAL NOT NULL
)"""


class Profiles:
    """A user-id -> profile-document store on one SQLite file (WAL mode, synchronous=FULL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # personas are personal data: owner-only, like the run's files (SQLite gives its -wal and -shm files
            # the database file's mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(path) != ":memory:" and mode.lower() != "wal":
            raise RuntimeError(f"profiles: {path}: SQLite refused WAL mode (got {mode}); use a local filesystem")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")  # a second server process on the same file waits, not fails
        self.db.execute(SCHEMA)

    def get(self, user_id: str) -> dict[str, Any] | None:
        """The stored document with user_id, created and updated added; None when absent."""
        with self.lock:
            row = self.db.execute("SELECT profile, created, updated FROM users WHERE user_id = ?",
                                  (user_id,)).fetchone()
        if row is None:
            return None
        return {"user_id": user_id, **json.loads(row[0]), "created": row[1], "updated": row[2]}

    def put(self, user_id: str, profile: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or replace a user's document in one transaction; returns (stored profile, created?)."""
        return self.update(user_id, lambda old: profile)

    def update(self, user_id: str, change: Callable[[dict | None], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Read, change and write a user's document in one transaction (`change(old or None) -> new`), so two
        concurrent PATCHes cannot lose one; returns (stored profile, created?). `change` may raise to abort."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT profile, created, updated FROM users WHERE user_id = ?",
                                      (user_id,)).fetchone()
                old = None if row is None else {"user_id": user_id, **json.loads(row[0]), "created": row[1],
                                                "updated": row[2]}
                doc = json.dumps({k: v for k, v in change(old).items() if k not in ("user_id", "created", "updated")})
                now = time.time()
                self.db.execute("INSERT INTO users (user_id, profile, created, updated) VALUES (?, ?, ?, ?) "
                                "ON CONFLICT(user_id) DO UPDATE SET profile = excluded.profile, "
                                "updated = excluded.updated", (user_id, doc, now, now))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.get(user_id), row is None

    def delete(self, user_id: str) -> bool:
        """Remove a user's document; True when it existed."""
        with self.lock:
            return self.db.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount > 0

    def count(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
