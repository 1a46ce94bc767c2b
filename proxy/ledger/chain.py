"""The hash chain: what each row's hash covers, and how an auditor re-checks it.

Each writer instance appends to its own chain (writer_id, seq 1, 2, ...), so replicas never
contend for a global lock. `row_hash = sha256(prev_hash || canonical(row))`, where the canonical
form is sorted-key JSON of every column but the row id, the erasable end-user pseudonym and its
salt, and the hash itself. The chain covers a salted commitment to the pseudonym instead, so
erasing a subject keeps every hash valid.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.ledger.record import RequestRecord
from proxy.ledger.tables import ledger

GENESIS = "0" * 64
UNHASHED = frozenset({"id", "end_user", "end_user_salt", "row_hash"})
# Sorted once here: the dict built in this order serialises exactly as with OPT_SORT_KEYS.
HASHED = tuple(sorted(str(c.name) for c in ledger.columns if c.name not in UNHASHED))


_hashed_of = operator.attrgetter(*HASHED)


def canonical(row: Mapping[str, Any]) -> bytes:
    return orjson.dumps({k: row[k] for k in HASHED})


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(row)).hexdigest()


def record_hash(prev_hash: str, record: RequestRecord) -> str:
    """`row_hash` of a record before it is a row: the same canonical bytes."""
    values = orjson.dumps(dict(zip(HASHED, _hashed_of(record), strict=True)))
    return hashlib.sha256(prev_hash.encode() + values).hexdigest()


def commitment(salt: str, pseudonym: str) -> str:
    return hashlib.sha256(f"{salt}:{pseudonym}".encode()).hexdigest()


def pseudonym(key: bytes, subject: str) -> str:
    return hmac.new(key, subject.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Finding:
    writer_id: str
    seq: int
    request_id: str | None
    problem: str  # altered | missing | reordered | broken_link | commitment

    def __str__(self) -> str:
        where = f"writer {self.writer_id} seq {self.seq}"
        if self.request_id:
            where += f" (request {self.request_id})"
        return f"{self.problem}: {where}"


@dataclass(slots=True)
class ChainCheck:
    """Feeds one writer's rows in seq order; finds the first fault.

    A seq gap not covered by a tombstone is a missing row; a row id smaller than the one
    before it means rows were moved (ids grow with seq, since each writer inserts in order).
    """

    writer_id: str
    tombstones: dict[int, str]
    expected_seq: int = 1
    prev_hash: str = GENESIS
    last_id: int = 0
    rows: int = 0

    def feed(self, row: Mapping[str, Any]) -> Finding | None:
        while self.expected_seq in self.tombstones:
            self.prev_hash = self.tombstones[self.expected_seq]
            self.expected_seq += 1
        seq, rid = row["seq"], row["request_id"]
        if seq != self.expected_seq:
            return Finding(self.writer_id, self.expected_seq, None, "missing")
        if row["id"] < self.last_id:
            return Finding(self.writer_id, seq, rid, "reordered")
        if row_hash(row["prev_hash"], row) != row["row_hash"]:
            return Finding(self.writer_id, seq, rid, "altered")
        if row["prev_hash"] != self.prev_hash:
            return Finding(self.writer_id, seq, rid, "broken_link")
        if row["end_user"] is not None and (
            row["end_user_salt"] is None
            or commitment(row["end_user_salt"], row["end_user"]) != row["end_user_commitment"]
        ):
            return Finding(self.writer_id, seq, rid, "altered")
        self.prev_hash = row["row_hash"]
        self.last_id = row["id"]
        self.expected_seq += 1
        self.rows += 1
        return None


async def first_fault(rows: AsyncIterator[Mapping[str, Any]], writer_id: str,
                      tombstones: dict[int, str], last_seq: int, last_hash: str
                      ) -> tuple[int, Finding | None]:
    """Check one chain, rows in seq order, against its recorded head (last_seq, last_hash)."""
    check = ChainCheck(writer_id, tombstones)
    async for row in rows:
        found = check.feed(row)
        if found:
            return check.rows, found
    while check.expected_seq in tombstones:
        check.prev_hash = tombstones[check.expected_seq]
        check.expected_seq += 1
    if check.expected_seq - 1 != last_seq or check.prev_hash != last_hash:
        return check.rows, Finding(writer_id, check.expected_seq, None, "missing")
    return check.rows, None
