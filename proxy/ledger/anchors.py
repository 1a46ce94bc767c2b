"""Chain heads published outside the database, and the check of a database against them.

Each writer appends its head (writer, seq, hash, time, key id, HMAC over those) to a JSON
Lines file of its own in EUROUTE_ANCHOR_DIR (a volume the database administrator does not
control) and to the log (logger `euroute.anchor`): when it starts, every `anchor_s` and when
it stops. Whoever rewrites the database cannot rewrite what was published before: a head
rewound, a tail or a whole chain deleted, a wiped ledger all contradict some anchor.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from proxy.ledger.chain import Keyring, LedgerKey, anchor_mac
from proxy.ledger.tables import chains, ledger, tombstones

log = logging.getLogger("euroute.anchor")


class AnchorSink:
    def __init__(self, directory: Path | None, key: LedgerKey) -> None:
        self.directory = directory
        self.key = key
        self.published = 0
        self.failures = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def publish(self, writer_id: str, seq: int, last_hash: str) -> dict[str, Any]:
        anchor: dict[str, Any] = {"writer_id": writer_id, "seq": seq, "hash": last_hash,
                                  "at": dt.datetime.now(dt.UTC).isoformat(),
                                  "key_id": self.key.id}
        anchor["mac"] = anchor_mac(self.key, anchor)
        line = orjson.dumps(anchor)
        log.info("anchor %s", line.decode())
        if self.directory is not None:
            try:
                # O_APPEND: one write per line, never a rewrite of what is there.
                fd = os.open(self.directory / f"{writer_id}.jsonl",
                             os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.failures += 1
                log.error("anchor: cannot append to %s (%s)", self.directory, exc)
                return anchor
        self.published += 1
        return anchor


def read(path: Path) -> list[dict[str, Any]]:
    """Every anchor in a file, or in the *.jsonl files of a directory."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    out = []
    for file in files:
        for number, line in enumerate(file.read_bytes().splitlines(), 1):
            if line.strip():
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    raise ValueError(f"{file}:{number}: not a JSON anchor") from None
    return out


def _latest(anchors: Iterable[dict[str, Any]], keyring: Keyring
            ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The newest valid anchor per writer, and what is wrong with the invalid ones."""
    latest: dict[str, dict[str, Any]] = {}
    problems = []
    for a in anchors:
        try:
            key = keyring.get(a["key_id"])
            valid = key is not None and anchor_mac(key, a) == a["mac"]
            writer, seq = str(a["writer_id"]), int(a["seq"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"bad_anchor: {str(a)[:120]}")
            continue
        if not valid:
            problems.append(f"bad_anchor: writer {writer} seq {seq} (unknown key or bad mac)")
        elif writer not in latest or seq >= latest[writer]["seq"]:
            latest[writer] = a
    return latest, problems


async def check(conn: AsyncConnection, anchors: list[dict[str, Any]], keyring: Keyring
                ) -> list[str]:
    """What the database contradicts in the anchors; each finding names the writer."""
    latest, findings = _latest(anchors, keyring)
    heads = {h.writer_id: h for h in (await conn.execute(select(chains))).all()}
    if not heads and latest:
        return [*findings, f"wiped: the database holds no chain; the anchors name "
                f"{len(latest)} writers and {sum(a['seq'] for a in latest.values())} rows"]
    for writer, a in sorted(latest.items()):
        head, seq = heads.get(writer), a["seq"]
        if head is None:
            findings.append(f"deleted_chain: writer {writer} (anchored at seq {seq}) has no "
                            "chain head")
            continue
        if head.last_seq < seq:
            findings.append(f"rewound_head: writer {writer} head at seq {head.last_seq}, "
                            f"anchored at seq {seq}")
        if seq == 0:
            continue
        found = (await conn.execute(select(ledger.c.row_hash).where(
            ledger.c.writer_id == writer, ledger.c.seq == seq))).scalar()
        if found is None:
            found = (await conn.execute(select(tombstones.c.row_hash).where(
                tombstones.c.writer_id == writer, tombstones.c.seq == seq))).scalar()
        if found is None:
            findings.append(f"missing_tail: writer {writer} seq {seq} was anchored and is gone")
        elif found != a["hash"]:
            findings.append(f"rewritten: writer {writer} seq {seq} differs from its anchor")
    if latest:
        first = min(dt.datetime.fromisoformat(a["at"]) for a in anchors if "at" in a)
        last = max(dt.datetime.fromisoformat(a["at"]) for a in anchors if "at" in a)
        for writer, head in sorted(heads.items()):
            if writer not in latest and first <= head.started_at <= last:
                findings.append(f"unanchored_chain: writer {writer} started "
                                f"{head.started_at.isoformat()} while anchors were kept")
    return findings
