"""Where euroute's CPU goes under load: py-spy on one worker, summarised.

    python bench/hotspots.py                       # json and stream, aiohttp transport
    python bench/hotspots.py --mode stream --transport httpx --requests 30000
    python bench/hotspots.py --connections 1 --requests 10000   # where concurrency-1 latency goes

Starts the same upstream and proxy as bench/run.py (one worker, SQLite ledger on, pinned the
same way), drives `--requests` requests at `--connections` (default 32) with wrk while `py-spy record`
samples the proxy (all threads, so the aiosqlite thread shows too), then prints the top
frames by own time and by inclusive time, and the share of samples per area of the code.
Raw collapsed stacks are kept in bench/results/profile-<mode>-<transport>[-c<N>].txt (flamegraph.pl
or speedscope read them). Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

AREAS = [  # first match wins, tested against each frame of a stack, innermost first
    ("ledger writer (SQLAlchemy, aiosqlite, sqlite3)",
     re.compile(r"proxy/ledger/|sqlalchemy|aiosqlite|sqlite3|greenlet")),
    ("upstream client (aiohttp, httpx-aiohttp, httpx, httpcore)",
     re.compile(r"(?:^|[(/])(?:aiohttp|httpx_aiohttp|httpx|httpcore|anyio|yarl|multidict)/")),
    ("euroute request path", re.compile(r"proxy/(gateway|surfaces|dialects?|scrub|keys|limits|"
                                        r"policy|metrics|logs|app|serving|upstream|relay|sse|"
                                        r"asgi|errors)")),
    ("uvicorn + starlette", re.compile(r"(?:^|[(/])(?:uvicorn|starlette)/")),
    ("asyncio / uvloop", re.compile(r"asyncio|uvloop")),
]


def frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    func, path, _line = m.groups()
    short = re.sub(r".*/site-packages/", "", path)
    short = re.sub(r".*/(proxy|bench)/", r"\1/", short)
    return f"{func} ({short})"


def summarise(raw: Path, top: int) -> str:
    lines = raw.read_text().splitlines()
    loop = [ln for ln in lines if "Thread._bootstrap" not in ln]
    return ("== all threads (the aiosqlite worker threads run SQLite; runnable-but-waiting "
            "counts as active) ==\n" + _summary(lines, top)
            + "\n\n== event loop thread only ==\n" + _summary(loop, top))


def _summary(lines: list[str], top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        # py-spy prefixes "process ..." / "thread ..." pseudo-frames: keep only code frames
        frames = [f for f in frames if re.search(r"\(.*:\d+\)$", f)]
        if not frames:
            continue
        total += n
        names = [frame_name(f) for f in frames]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
        areas[next((label for f in reversed(frames) for label, pattern in AREAS
                     if pattern.search(f)), "other")] += n
    out = [f"samples: {total}", "", f"top {top} by own time:", ""]
    out += [f"  {n / total * 100:5.1f}%  {name}" for name, n in own.most_common(top)]
    out += ["", f"top {top} by inclusive time:", ""]
    out += [f"  {n / total * 100:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out += ["", "by area (innermost matching frame):", ""]
    out += [f"  {n / total * 100:5.1f}%  {label}" for label, n in areas.most_common()]
    return "\n".join(out)


def profile(mode: str, transport: str, requests: int, rate: int, top: int, conns: int,
            name: str, gil: bool) -> str:
    spy = shutil.which("py-spy")
    if spy is None:
        raise bench.BenchError("py-spy is not installed: pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="euroute-profile-"))
    cfg = bench.Config(transport, 1, bench.SMOKE, tmp, True, 1, 20)
    cfg.up_port, cfg.px_port = bench.free_port(), bench.free_port()
    env = cfg.env()
    up = bench.Server("upstream", [sys.executable, "-m", "uvicorn", "sandbox_app:create",
                                   "--factory", "--app-dir", str(bench.BENCH), "--host",
                                   "127.0.0.1", "--port", str(cfg.up_port), "--loop", "uvloop",
                                   "--http", "httptools", "--lifespan", "off",
                                   "--no-access-log", "--log-level", "warning"],
                      env, tmp / "upstream.log", cfg.layout.others)
    proxy = None
    try:
        bench.wait_http(f"http://127.0.0.1:{cfg.up_port}/v1/models", up)
        cli = [sys.executable, "-m", "proxy"]
        subprocess.run([*cli, "migrate"], env=env, cwd=bench.REPO, check=True,
                       capture_output=True)
        key = subprocess.run([*cli, "keys", "create", "--app", "bench", "--policy",
                              "eu-standard"], env=env, cwd=bench.REPO, check=True,
                             capture_output=True, text=True).stdout.strip()
        proxy = bench.Server("euroute", [*cli, "serve", "--host", "127.0.0.1", "--port",
                                         str(cfg.px_port), "--workers", "1"],
                             env, tmp / "euroute.log", cfg.layout.proxy)
        bench.wait_http(f"http://127.0.0.1:{cfg.px_port}/healthz", proxy, timeout=60)
        url = f"http://127.0.0.1:{cfg.px_port}/v1/chat/completions"
        stream = mode == "stream"
        bench.run_wrk(url, key, stream, 32, 5000, tmp, cfg.layout.others)  # warm-up
        raw = bench.RESULTS / f"{name}.txt"
        bench.RESULTS.mkdir(parents=True, exist_ok=True)
        # py-spy runs on the load generator's CPU, so it does not steal the proxy's core.
        argv = [spy, "record", "--pid", str(proxy.pid), "--rate", str(rate), "--format", "raw",
                "--output", str(raw), "--nonblocking", *(["--gil"] if gil else [])]
        if cfg.layout.others is not None:
            argv = ["taskset", "-c", cfg.layout.others, *argv]
        recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        w = bench.run_wrk(url, key, stream, conns, requests, tmp, cfg.layout.others)
        recorder.send_signal(2)
        _, err = recorder.communicate(timeout=60)
        if not raw.exists():
            raise bench.BenchError(f"py-spy wrote nothing: {err.decode(errors='replace')}")
        head = (f"# profile: {mode}, transport {transport}, {w.requests} requests at "
                f"concurrency {conns}, {w.rps:.0f} req/s under py-spy ({rate} Hz, non-blocking"
                f"{', GIL holder only' if gil else ''})\n"
                f"# raw stacks: {raw.relative_to(bench.REPO)}\n")
        return head + summarise(raw, top)
    finally:
        if proxy is not None:
            proxy.stop()
        up.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="profile euroute under load with py-spy")
    parser.add_argument("--mode", default="json,stream")
    parser.add_argument("--transport", default="aiohttp")
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32, help="wrk concurrency")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL: where Python time goes, "
                        "without threads waiting for the GIL (SQLite's C work is not counted)")
    parser.add_argument("--summarise", type=Path, default=None,
                        help="only summarise an existing raw py-spy file")
    args = parser.parse_args()
    if args.summarise:
        print(summarise(args.summarise, args.top))
        return 0
    if os.geteuid() != 0:
        print("note: py-spy needs ptrace rights (root or CAP_SYS_PTRACE)", file=sys.stderr)
    for mode in args.mode.split(","):
        for transport in args.transport.split(","):
            name = f"profile-{mode}-{transport}" + (
                f"-c{args.connections}" if args.connections != 32 else "") + (
                "-gil" if args.gil else "")
            report = profile(mode, transport, args.requests, args.rate, args.top,
                             args.connections, name, args.gil)
            print(report + "\n")
            (bench.RESULTS / f"{name}.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
