"""CPU cost of the per-request log line (proxy/logs.py), text and JSON, written to stderr.

    python bench/log_line.py 2>/dev/null

Logs N finished-request lines through the logging setup `euroute serve` uses and prints, per
format, the process CPU time per line (CPU time, not wall time, so a busy machine inflates it
less), and the cost when the request logger is turned off. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import logging.config
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import logs
from proxy.ledger.record import RequestRecord
from proxy.settings import Settings


def record() -> RequestRecord:
    now = dt.datetime.now(dt.UTC)
    return RequestRecord(
        request_id="req_" + "a" * 24, created_at=now, app="support-bot", key_id="key_x",
        endpoint="chat", policy="eu-standard", policy_version="0" * 64,
        decision_id="dec_" + "b" * 24, retain_until=now.date(), model="magistral-small-2509",
        route="mistral-eu-magistral-small", latency_us=12345, ttfb_us=2345, prompt_tokens=12,
        completion_tokens=345)


def per_line_us(n: int) -> float:
    finished = record()
    for _ in range(min(n, 1000)):
        logs.log_request(finished)
    start = time.process_time()
    for _ in range(n):
        logs.log_request(finished)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=50_000)
    n = parser.parse_args().n
    out = {}
    for fmt in ("text", "json"):
        logging.config.dictConfig(logs.config(Settings(log_format=fmt)))  # type: ignore[arg-type]
        out[f"{fmt}_us_cpu_per_line"] = round(per_line_us(n), 2)
    logging.getLogger("euroute.request").setLevel(logging.WARNING)
    out["off_us_cpu_per_line"] = round(per_line_us(n), 2)
    print(json.dumps(out), file=sys.__stdout__)


if __name__ == "__main__":
    main()
