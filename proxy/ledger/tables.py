"""SQLAlchemy tables. Alembic owns the schema (migrations/); these must match it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stored as naive UTC on every database, handed back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: euroute stores UTC only")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


# SQLite only autoincrements an INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

ledger = Table(
    "ledger", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("request_id", String(40), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("writer_id", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("app", String(100), nullable=False),
    Column("key_id", String(40), nullable=True),
    # HMAC pseudonym of the end user and the salt of its commitment: erasable, not hashed.
    Column("end_user", String(64), nullable=True),
    Column("end_user_salt", String(32), nullable=True),
    Column("end_user_commitment", String(64), nullable=True),
    Column("endpoint", String(40), nullable=False),
    Column("model", String(200), nullable=False),
    Column("route", String(100), nullable=True),
    Column("provider", String(100), nullable=True),
    Column("upstream_model", String(200), nullable=True),
    Column("inference_location", String(2), nullable=True),
    Column("storage_location", String(2), nullable=True),
    Column("transfer_mechanism", String(20), nullable=True),
    Column("zdr_reference", String(200), nullable=True),
    Column("dpa_reference", String(200), nullable=True),
    Column("policy", String(100), nullable=False),
    Column("policy_version", String(64), nullable=False),
    Column("enforcement", String(10), nullable=False),
    Column("decision_id", String(40), nullable=False, unique=True),
    Column("decision", Text, nullable=False),
    Column("failed_requirements", String(400), nullable=True),
    Column("outcome", String(30), nullable=False),
    Column("status", Integer, nullable=False),
    Column("latency_us", BigInteger, nullable=False),
    Column("ttfb_us", BigInteger, nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("usage_missing", Boolean, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("currency", String(3), nullable=True),
    Column("provider_retention_days", Integer, nullable=True),
    Column("provider_copy_gone_on", Date, nullable=True),
    Column("retain_until", Date, nullable=False),
    Column("content_stored", Boolean, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("row_hash", String(64), nullable=False),
    # Which ledger key made row_hash; NULL: an unkeyed row from before keyed chains.
    Column("hash_key_id", String(16), nullable=True),
    UniqueConstraint("writer_id", "seq"),
    Index(None, "created_at"),
    Index(None, "app", "created_at"),
    Index(None, "outcome", "created_at"),
    Index(None, "retain_until"),
    Index(None, "end_user"),
)

# A purged row leaves its place in the chain, so `audit verify` still passes on what remains.
tombstones = Table(
    "ledger_tombstones", metadata,
    Column("writer_id", String(32), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("row_hash", String(64), nullable=False),
    Column("purged_at", UTCDateTime(), nullable=False),
    # Keyed like rows (NULL on tombstones from before keyed chains): why, and the deleted
    # row's retain-until date, so verify rejects a purge inside the retention period.
    Column("reason", String(20), nullable=True),
    Column("retain_until", Date, nullable=True),
    Column("hash_key_id", String(16), nullable=True),
    Column("mac", String(64), nullable=True),
)

# Each writer's chain head, updated with every batch, so a cut-off tail is noticed too.
chains = Table(
    "ledger_chains", metadata,
    Column("writer_id", String(32), primary_key=True),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
    # Also the writer's heartbeat: recovery leaves alone the intents of a writer seen lately.
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("hash_key_id", String(16), nullable=True),
    Column("head_mac", String(64), nullable=True),
    # The last erasure request this writer applies to every row it writes from then on.
    Column("erasure_seen", BigInteger, nullable=False, server_default="0"),
    # Set when the writer stopped cleanly (nothing buffered, no intent open): nobody waits for it.
    Column("stopped_at", UTCDateTime(), nullable=True),
)

# Written (group commit) before a request is forwarded, deleted in the transaction that writes
# its ledger row: what a crash leaves here becomes an `outcome_unknown` row at recovery.
intents = Table(
    "ledger_intents", metadata,
    Column("request_id", String(40), primary_key=True),
    Column("writer_id", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("facts", Text, nullable=False),  # the row as known before forwarding, JSON
    Index(None, "writer_id"),
)

# Rows the database refused (a value out of a column's range, ...): kept with the error
# instead of blocking every row behind them; `audit verify` lists them.
dead_letters = Table(
    "ledger_dead_letters", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("request_id", String(40), nullable=True),
    Column("writer_id", String(32), nullable=False),
    Column("failed_at", UTCDateTime(), nullable=False),
    Column("error", String(500), nullable=False),
    Column("record", Text, nullable=False),
)

# Subjects to erase (GDPR Art. 17): each writer applies them to rows it still holds.
erasures = Table(
    "ledger_erasures", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("end_user", String(64), nullable=False),
    Column("requested_at", UTCDateTime(), nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(40), primary_key=True),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("app", String(100), nullable=False),
    Column("role", String(10), nullable=False),
    Column("policy", String(100), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
)

# Every key created or revoked, and by whom: the acting admin key's id, or `cli` for the
# command line (which needs database access, not a key). Auditors read it; nothing updates it.
key_events = Table(
    "key_events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", String(40), nullable=False),
    Column("action", String(10), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("role", String(10), nullable=False),
    Column("app", String(100), nullable=False),
    Index(None, "at"),
)
