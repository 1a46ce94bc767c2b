"""Time to first streamed event: one raw-socket client, used alike for the upstream and the proxy.

    python bench/ttfb.py --url http://127.0.0.1:8000/v1/chat/completions --key KEY -n 2000

Sends N streamed chat completions one after another (concurrency 1) on one keep-alive
connection and measures, per request, the time from writing the request to reading the first
body bytes that hold a `data:` event, and to the end of the stream (`data: [DONE]` and the
last chunk). Prints one JSON object. No HTTP library sits in the way: what differs between
two targets is the server side only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time
from urllib.parse import urlsplit

BODY = (b'{"model":"magistral-small-2509","stream":true,'
        b'"messages":[{"role":"user","content":"hi"}]}')


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), round(q / 100 * len(values) + 0.5)))
    return values[rank - 1]


class Failure(Exception):
    pass


async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              request: bytes) -> tuple[float, float]:
    """(seconds to first data event, seconds to end of stream) for one request."""
    started = time.perf_counter()
    writer.write(request)
    head = b""
    while b"\r\n\r\n" not in head:
        data = await reader.read(65536)
        if not data:
            raise Failure("connection closed before the response head")
        head += data
    head, body = head.split(b"\r\n\r\n", 1)
    status_line = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status_line + b" ":
        raise Failure(f"status {status_line.decode(errors='replace')}: {body[:300]!r}")
    if b"transfer-encoding: chunked" not in head.lower():
        raise Failure("expected a chunked event stream")
    first = time.perf_counter() if b"data:" in body else None
    while not (body.endswith(b"\r\n0\r\n\r\n") and b"data: [DONE]" in body):
        data = await reader.read(65536)
        if not data:
            raise Failure("connection closed mid-stream")
        body += data
        if first is None and b"data:" in body:
            first = time.perf_counter()
    done = time.perf_counter()
    assert first is not None
    return first - started, done - started


async def run(url: str, key: str | None, n: int, warmup: int) -> dict[str, object]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    headers = [f"POST {parts.path} HTTP/1.1", f"Host: {host}:{port}",
               "Content-Type: application/json", "Accept: text/event-stream",
               f"Content-Length: {len(BODY)}"]
    if key:
        headers.append(f"Authorization: Bearer {key}")
    request = ("\r\n".join(headers) + "\r\n\r\n").encode() + BODY
    # A benchmark client on loopback: the upstream's certificate is euroute's to check, not ours.
    tls = None
    if parts.scheme == "https":
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    firsts, totals, errors = [], [], []
    try:
        for i in range(warmup + n):
            try:
                first, total = await one(reader, writer, request)
            except Failure as exc:
                errors.append(str(exc))
                writer.close()
                reader, writer = await asyncio.open_connection(host, port, ssl=tls)
                if len(errors) > 10:
                    break
                continue
            if i >= warmup:
                firsts.append(first * 1000)
                totals.append(total * 1000)
    finally:
        writer.close()
    firsts.sort()
    totals.sort()
    return {
        "requests": len(firsts), "errors": len(errors), "error_samples": errors[:3],
        "ttfe_ms": {"p50": percentile(firsts, 50), "p90": percentile(firsts, 90),
                    "p99": percentile(firsts, 99),
                    "mean": statistics.fmean(firsts) if firsts else float("nan")},
        "total_ms": {"p50": percentile(totals, 50), "p99": percentile(totals, 99)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default=None)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    try:
        import uvloop
        result = uvloop.run(run(args.url, args.key, args.n, args.warmup))
    except ImportError:
        result = asyncio.run(run(args.url, args.key, args.n, args.warmup))
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
