"""The keyed hash chain: what each row's hash covers, and how an auditor re-checks it.

Each writer instance appends to its own chain (writer_id, seq 1, 2, ...), so replicas never
contend for a global lock. `row_hash = HMAC-SHA256(ledger key, prev_hash || canonical(row))`,
where the canonical form is sorted-key JSON of every column but the row id, the erasable
end-user pseudonym and its salt, the hash and the key id. The chain covers a salted commitment
to the pseudonym instead, so erasing a subject keeps every hash valid.

The ledger key lives outside the database (EUROUTE_LEDGER_KEY), so whoever can only write to
the database cannot make a row, a chain head or a tombstone that verifies. Each of them names
the key it was made with (`hash_key_id`, the first 8 bytes of HMAC(key, "key-id")), so retired
keys (EUROUTE_LEDGER_KEYS_OLD) keep verifying what they made. Rows from before keyed chains
(key id NULL) verify with plain SHA-256 and are reported as unkeyed.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.ledger.record import RequestRecord
from proxy.ledger.tables import ledger

GENESIS = "0" * 64
UNHASHED = frozenset({"id", "end_user", "end_user_salt", "row_hash", "hash_key_id"})
# Public on purpose: development chains verify across restarts, and say they protect nothing.
DEV_SECRET = b"euroute-development-ledger-key (public: protects nothing)"
TOMBSTONE_REASONS = frozenset({"retention_purge", "erasure"})
# Sorted once here: the dict built in this order serialises exactly as with OPT_SORT_KEYS.
HASHED = tuple(sorted(str(c.name) for c in ledger.columns if c.name not in UNHASHED))


_hashed_of = operator.attrgetter(*HASHED)


def canonical(row: Mapping[str, Any]) -> bytes:
    return orjson.dumps({k: row[k] for k in HASHED})


@dataclass(frozen=True, slots=True)
class LedgerKey:
    secret: bytes = field(repr=False)
    id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", hmac.new(self.secret, b"key-id", hashlib.sha256)
                           .hexdigest()[:16])

    def mac(self, *parts: object) -> str:
        """HMAC over fields joined unambiguously (each part's text, length-prefixed)."""
        text = b"".join(b"%d:%s|" % (len(p), p) for p in (str(x).encode() for x in parts))
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()


DEV_KEY = LedgerKey(DEV_SECRET)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The key new chains are written with, and every key an auditor may meet."""

    current: LedgerKey
    retired: tuple[LedgerKey, ...] = ()

    def get(self, key_id: str | None) -> LedgerKey | None:
        for key in (self.current, *self.retired):
            if key.id == key_id:
                return key
        return None

    @classmethod
    def of(cls, current: str | bytes, retired: str = "") -> Keyring:
        raw = current.encode() if isinstance(current, str) else current
        return cls(LedgerKey(raw), tuple(LedgerKey(k.strip().encode())
                                         for k in retired.split(",") if k.strip()))


DEV_KEYRING = Keyring(DEV_KEY)


def _link(prev_hash: str, canonical_row: bytes, key: LedgerKey | None) -> str:
    """HMAC under `key`; plain SHA-256 for unkeyed rows from before keyed chains."""
    if key is None:
        return hashlib.sha256(prev_hash.encode() + canonical_row).hexdigest()
    return hmac.new(key.secret, prev_hash.encode() + canonical_row, hashlib.sha256).hexdigest()


def row_hash(prev_hash: str, row: Mapping[str, Any], key: LedgerKey | None = DEV_KEY) -> str:
    """A stored row's place in the chain."""
    return _link(prev_hash, canonical(row), key)


def head_mac(key: LedgerKey, writer_id: str, last_seq: int, last_hash: str) -> str:
    return key.mac("head", writer_id, last_seq, last_hash)


def tombstone_mac(key: LedgerKey, stone: Mapping[str, Any]) -> str:
    return key.mac("tombstone", stone["writer_id"], stone["seq"], stone["row_hash"],
                   stone["reason"], stone["retain_until"], stone["purged_at"].isoformat())


def anchor_mac(key: LedgerKey, anchor: Mapping[str, Any]) -> str:
    return key.mac("anchor", anchor["writer_id"], anchor["seq"], anchor["hash"], anchor["at"])


def record_hash(prev_hash: str, record: RequestRecord, key: LedgerKey | None = DEV_KEY) -> str:
    """`row_hash` of a record before it is a row: the same canonical bytes."""
    return _link(prev_hash, orjson.dumps(dict(zip(HASHED, _hashed_of(record), strict=True))),
                 key)


def commitment(salt: str, pseudonym: str) -> str:
    return hashlib.sha256(f"{salt}:{pseudonym}".encode()).hexdigest()


# Public on purpose, like DEV_SECRET: development pseudonyms stay the same across workers and
# restarts, so `erase` finds them; whoever reads the ledger can test a guessed id against them.
DEV_PSEUDONYM_SECRET = b"euroute-development-pseudonym-key (public: hides nothing)"


def pseudonym(key: bytes, subject: str) -> str:
    return hmac.new(key, subject.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Finding:
    writer_id: str
    seq: int
    request_id: str | None
    # altered | missing | reordered | broken_link | unkeyed_row | unknown_key | forged_head
    problem: str

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
    In a chain whose head is keyed every row must be keyed: an unkeyed row there was forged
    with plain SHA-256 by someone without the key.
    """

    writer_id: str
    tombstones: dict[int, str]
    keyring: Keyring = DEV_KEYRING
    keyed: bool = True
    expected_seq: int = 1
    prev_hash: str = GENESIS
    last_id: int = 0
    rows: int = 0
    unkeyed: int = 0

    def feed(self, row: Mapping[str, Any]) -> Finding | None:
        while self.expected_seq in self.tombstones:
            self.prev_hash = self.tombstones[self.expected_seq]
            self.expected_seq += 1
        seq, rid = row["seq"], row["request_id"]
        if seq != self.expected_seq:
            return Finding(self.writer_id, self.expected_seq, None, "missing")
        if row["id"] < self.last_id:
            return Finding(self.writer_id, seq, rid, "reordered")
        key = None
        if (key_id := row.get("hash_key_id")) is not None:
            if (key := self.keyring.get(key_id)) is None:
                return Finding(self.writer_id, seq, rid, "unknown_key")
        elif self.keyed:
            return Finding(self.writer_id, seq, rid, "unkeyed_row")
        else:
            self.unkeyed += 1
        if row_hash(row["prev_hash"], row, key) != row["row_hash"]:
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

    def end(self, last_seq: int, last_hash: str) -> Finding | None:
        """After the last row: the recorded head must sit where the chain ends."""
        while self.expected_seq in self.tombstones:
            self.prev_hash = self.tombstones[self.expected_seq]
            self.expected_seq += 1
        if self.expected_seq - 1 != last_seq or self.prev_hash != last_hash:
            return Finding(self.writer_id, self.expected_seq, None, "missing")
        return None
