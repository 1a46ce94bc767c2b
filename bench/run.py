"""The euroute benchmark: one command, from a clean checkout.

    python bench/run.py                      # full: workers 1,2 x transports aiohttp,httpx
    python bench/run.py --smoke              # seconds; CI runs this to keep the script working
    python bench/run.py --workers 1 --transport aiohttp --requests 50000
    python bench/run.py --tls                # the same over TLS to the upstream (trustme CA)
    python bench/run.py --workers 1 --transport aiohttp --durable both [--ledger postgresql]
                                             # what the ledger's durability costs

It starts the sandbox upstream (uvicorn + uvloop + httptools, its own process) and
`euroute serve` (ledger on, SQLite or `--ledger postgresql`), drives them with wrk (installed with apt-get when missing)
and a raw-socket time-to-first-event client (bench/ttfb.py), and reports per configuration
and per mode (non-streamed JSON, 20-chunk SSE stream):

- proxy CPU ms per request: utime+stime of every process of the server (from /proc), over
  the run, divided by the requests it served (ledger rows written, cross-checked with wrk's
  count and with euroute_ledger_written_total);
- latency added over calling the upstream directly, p50/p99, at concurrency 1 and 32 (wrk);
- time to first streamed event added over the upstream directly, p50/p99 (concurrency 1);
- requests/s at concurrency 32, and per worker;
- peak RSS (VmHWM) and RSS growth over the throughput run (after warm-up).

Results: bench/results/<timestamp>.json, bench/results/latest.md (also printed); a smoke run
writes to bench/results/smoke/ instead (git-ignored), so it never replaces the full results.
Exit status: 0 when every request succeeded and the ledger holds every request, 1 otherwise
(non-2xx, socket errors, missing ledger rows, a crashed process); with --check-targets, 2 when
a one-worker target of issue 6 is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MODEL = "magistral-small-2509"
UPSTREAM_KEY = "sk-bench-upstream"

# Targets of issue 6 (one worker, ledger on).
TARGETS = {"cpu_ms_json": 0.8, "cpu_ms_stream": 1.5, "added_p50_c1_ms": 0.5,
           "added_ttfe_p50_ms": 0.5, "rps_c32": 1000.0, "rss_growth_mb": 5.0}
# A measured run during which other processes used more than this share of the machine is
# flagged as noisy in the report (the numbers stand, but say so).
NOISY_PERCENT = 5.0


@dataclass
class Sizes:
    warmup: int
    latency_c1: int
    direct_c32: int
    throughput: int
    ttfb: int


FULL = Sizes(warmup=10_000, latency_c1=5_000, direct_c32=20_000, throughput=100_000, ttfb=2_000)
SMOKE = Sizes(warmup=200, latency_c1=200, direct_c32=300, throughput=500, ttfb=100)


class BenchError(Exception):
    pass


# -- the machine --------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    versions = {}
    from importlib import metadata
    for name in ("uvicorn", "uvloop", "httptools", "starlette", "httpx", "sqlalchemy",
                 "aiosqlite", "orjson"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "proxy"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "ram_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "wrk": (wrk.stdout + wrk.stderr).splitlines()[0] if (wrk.stdout + wrk.stderr) else "",
            "commit": commit + ("+dirty proxy/" if dirty else ""), "versions": versions}


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError("wrk is not installed and cannot be installed here (needs root and "
                         "apt-get): install it with `apt-get install wrk` and run again")
    print("installing wrk with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise BenchError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    if not shutil.which("wrk"):
        raise BenchError("apt-get installed no wrk binary")


# -- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def own_children_seconds() -> float:
    """CPU of this process and the children it has waited for (wrk, the ttfb client)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def status_kb(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Server:
    """A process we started, its log, and the processes below it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path,
                 cpus: str | None) -> None:
        self.name, self.log_path = name, log
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[int]:
        return descendants(self.pid)

    def workers(self) -> list[int]:
        """The serving processes: the root when it has no children, else its children
        (uvicorn's supervisor spawns the workers), minus multiprocessing helpers."""
        tree = self.tree()
        below = [p for p in tree[1:] if "resource_tracker" not in cmdline(p)]
        return below or tree[:1]

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def wait_http(url: str, server: Server, timeout: float = 30.0,
              context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n"
                             f"{server.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{server.name} did not answer {url} within {timeout}s:\n{server.tail()}")


# -- wrk --------------------------------------------------------------------------------------------

LUA = r"""
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
local limit = %(limit)d
local count = 0
function response(status, headers, body)
  count = count + 1
  if count == limit then
    -- Stop after `limit` responses: SIGINT makes wrk's main thread report at once.
    -- (io.popen, not os.execute: system() ignores SIGINT while it runs.) A SIGINT that
    -- lands before the main thread sleeps is lost, so the marker file lets bench/run.py
    -- repeat it until wrk exits.
    wrk.thread:stop()
    io.open("%(marker)s", "w"):close()
    local f = io.open("/proc/self/stat"); local pid = f:read("*n"); f:close()
    io.popen("kill -INT " .. pid):close()
  end
end
function done(s, lat, req)
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,' ..
    '"write":%%d,"timeout":%%d,"non2xx":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"p999":%%d,' ..
    '"max":%%d,"mean":%%.1f}\n',
    s.requests, s.duration, s.bytes, s.errors.connect, s.errors.read, s.errors.write,
    s.errors.timeout, s.errors.status, lat:percentile(50), lat:percentile(90),
    lat:percentile(99), lat:percentile(99.9), lat.max, lat.mean))
end
"""


def body(stream: bool) -> str:
    extra = ',"stream":true' if stream else ""
    return f'{{"model":"{MODEL}"{extra},"messages":[{{"role":"user","content":"hi"}}]}}'


@dataclass
class Wrk:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict[str, int]
    raw: str = field(repr=False)

    def failures(self) -> int:
        return sum(self.errors.values())


def run_wrk(url: str, key: str, stream: bool, conns: int, n: int, tmp: Path,
            cpus: str | None) -> Wrk:
    script = tmp / f"wrk-{'sse' if stream else 'json'}-{key[-6:]}-{n}.lua"
    marker = script.with_suffix(".done")
    marker.unlink(missing_ok=True)
    script.write_text(LUA % {"body": body(stream), "key": key, "limit": n,
                             "marker": str(marker)})
    limit_s = max(30, int(n / 100))  # a safety net: never reached unless the server stalls
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{limit_s}s", "--timeout", "10s", "--latency",
            "-s", str(script), url]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + limit_s + 60
            while proc.poll() is None:
                if marker.exists():
                    proc.send_signal(signal.SIGINT)
                if time.monotonic() > deadline:
                    proc.kill()
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{stdout}\n{stderr}")
    d = json.loads(line[len("WRKJSON "):])
    errors = {k: d[k] for k in ("connect", "read", "write", "timeout", "non2xx")}
    if d["requests"] < n:
        errors["incomplete"] = n - d["requests"]
    secs = d["duration_us"] / 1e6
    return Wrk(requests=d["requests"], seconds=secs, rps=d["requests"] / secs,
               p50_ms=d["p50"] / 1e3, p90_ms=d["p90"] / 1e3, p99_ms=d["p99"] / 1e3,
               p999_ms=d["p999"] / 1e3, max_ms=d["max"] / 1e3, errors=errors,
               raw=stdout)


def run_ttfb(url: str, key: str, n: int, cpus: str | None) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "ttfb.py"), "--url", url, "--key", key, "-n", str(n),
            "--warmup", str(min(50, n))]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"ttfb client failed:\n{done.stdout}\n{done.stderr}") from None


# -- one configuration ---------------------------------------------------------------------------

PG_ADMIN = os.environ.get("EUROUTE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg(dsn: str, sql: str) -> Any:
    import asyncio

    import asyncpg

    async def one() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()
    return asyncio.run(one())


class Ledger:
    """One configuration's ledger database: a fresh SQLite file, or a fresh PostgreSQL database
    on the server at EUROUTE_BENCH_PG (dropped afterwards)."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        if backend == "sqlite":
            self.path = tmp / "euroute.db"
            self.url = f"sqlite+aiosqlite:///{self.path}"
        else:
            name = f"euroute_bench_{secrets.token_hex(4)}"
            _pg(PG_ADMIN, f'CREATE DATABASE "{name}"')
            self.dsn = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
            self.url = self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    def count(self) -> int:
        if self.backend == "postgresql":
            return int(_pg(self.dsn, "SELECT count(*) FROM ledger"))
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute("SELECT count(*) FROM ledger").fetchone()[0]

    def drop(self) -> None:
        if self.backend == "postgresql":
            name = self.dsn.rsplit("/", 1)[1]
            _pg(PG_ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def settle(self, timeout: float = 60.0) -> int:
        """The row count once the writer has caught up (unchanged for 0.3 s)."""
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.count()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 0.3:
                return now
            time.sleep(0.05)
        return last


def metric(base: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pids: list[int], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def rss_kb(self) -> int:
        return sum(status_kb(p, "VmRSS") for p in self.pids)

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - t0, self.rss_kb()))
            self._halt.wait(self.every)

    def finish(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, self.rss_kb()))
        return self.samples


@dataclass
class Layout:
    proxy: str | None
    others: str | None

    def describe(self) -> str:
        if self.proxy is None:
            return "unpinned (proxy, upstream and load generator share all cores)"
        return f"proxy on CPU {self.proxy}; upstream, wrk and ttfb client on CPU {self.others}"


def layout(workers: int, pin: bool) -> Layout:
    n = os.cpu_count() or 1
    if not pin or n < workers + 1 or not shutil.which("taskset"):
        return Layout(None, None)
    return Layout(",".join(str(i) for i in range(workers)),
                  ",".join(str(i) for i in range(workers, n)))


class Tls:
    """A local CA and a certificate for 127.0.0.1 (trustme), as files uvicorn and euroute read."""

    def __init__(self, where: Path) -> None:
        import trustme  # a test dependency: only TLS runs need it

        where.mkdir(parents=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca, key, chain = where / "ca.pem", where / "key.pem", where / "cert.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        self.uvicorn = ["--ssl-keyfile", str(key), "--ssl-certfile", str(chain)]

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class Config:
    def __init__(self, transport: str, workers: int, sizes: Sizes, tmp: Path, pin: bool,
                 upstream_workers: int, chunks: int, ledger: str = "sqlite",
                 tls: bool = False, durable: bool = True) -> None:
        self.transport, self.workers, self.sizes, self.backend = transport, workers, sizes, ledger
        self.durable = durable
        # the name in reports: TLS runs are told apart from plaintext ones
        self.label = f"{transport}+tls" if tls else transport
        run_name = f"{self.label}-w{workers}-{'durable' if durable else 'buffered'}"
        self.tls = Tls(tmp / f"{run_name}-tls") if tls else None
        self.scheme = "https" if tls else "http"
        self.tmp = tmp / run_name
        self.tmp.mkdir(parents=True)
        self.ledger = Ledger(ledger, self.tmp)
        self.layout = layout(workers, pin)
        self.upstream_workers, self.chunks = upstream_workers, chunks
        self.problems: list[str] = []
        self.noise: list[str] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO),
                "EUROUTE_DATABASE_URL": self.ledger.url,
                "EUROUTE_POLICY_DIR": str(REPO / "policies"),
                "EUROUTE_UPSTREAM_TRANSPORT": self.transport,
                "EUROUTE_LEDGER_DURABLE": "true" if self.durable else "false",
                "EUROUTE_LOG_LEVEL": "warning",
                "MISTRAL_BASE_URL": f"{self.scheme}://127.0.0.1:{self.up_port}/v1",
                **({"SSL_CERT_FILE": str(self.tls.ca)} if self.tls else {}),
                "MISTRAL_API_KEY": UPSTREAM_KEY,
                "BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "BENCH_CHUNKS": str(self.chunks)}

    def check(self, what: str, w: Wrk) -> None:
        bad = {k: v for k, v in w.errors.items() if v}
        if bad:
            self.problems.append(f"{what}: {bad}")

    def run(self) -> dict[str, Any]:
        self.up_port, self.px_port = free_port(), free_port()
        env = self.env()
        up = Server("upstream", [sys.executable, "-m", "uvicorn", "sandbox_app:create",
                                 "--factory", "--app-dir", str(BENCH), "--host", "127.0.0.1",
                                 "--port", str(self.up_port), "--workers",
                                 str(self.upstream_workers), "--loop", "uvloop", "--http",
                                 "httptools", "--lifespan", "off", "--no-access-log",
                                 "--log-level", "warning", *(self.tls.uvicorn if self.tls else [])],
                    env, self.tmp / "upstream.log", self.layout.others)
        self.upstream = up
        proxy: Server | None = None
        self.floor: Server | None = None
        try:
            wait_http(f"{self.scheme}://127.0.0.1:{self.up_port}/v1/models", up,
                      context=self.tls.client() if self.tls else None)
            if self.workers == 1:
                self.floor_port = free_port()
                self.floor = Server("pass-through", [
                    sys.executable, "-m", "uvicorn", "passthrough_app:create", "--factory",
                    "--app-dir", str(BENCH), "--host", "127.0.0.1", "--port",
                    str(self.floor_port), "--loop", "uvloop", "--http", "httptools",
                    "--lifespan", "off", "--no-access-log", "--log-level", "warning"],
                    env, self.tmp / "passthrough.log", self.layout.proxy)
                wait_http(f"http://127.0.0.1:{self.floor_port}/", self.floor)
            cli = [sys.executable, "-m", "proxy"]
            subprocess.run([*cli, "migrate"], env=env, cwd=REPO, check=True,
                           capture_output=True)
            made = subprocess.run([*cli, "keys", "create", "--app", "bench", "--policy",
                                   "eu-standard"], env=env, cwd=REPO, capture_output=True,
                                  text=True)
            if made.returncode != 0:
                raise BenchError(f"euroute keys create failed:\n{made.stderr}")
            self.key = made.stdout.strip()
            proxy = Server("euroute", [*cli, "serve", "--host", "127.0.0.1", "--port",
                                       str(self.px_port), "--workers", str(self.workers)],
                           env, self.tmp / "euroute.log", self.layout.proxy)
            wait_http(f"http://127.0.0.1:{self.px_port}/healthz", proxy, timeout=60)
            if self.workers > 1:  # every worker must be up, not just the first
                deadline = time.monotonic() + 60
                while len(proxy.workers()) < self.workers and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(2)
            self.proxy = proxy
            modes = {mode: self.mode(mode == "stream") for mode in ("json", "stream")}
            if not proxy.alive():
                self.problems.append(f"euroute died:\n{proxy.tail()}")
            return {"transport": self.label, "workers": self.workers, "ledger": self.backend,
                    "durable": self.durable,
                    "upstream_workers": self.upstream_workers, "layout": self.layout.describe(),
                    "modes": modes, "problems": self.problems, "noise": self.noise}
        finally:
            for server in (proxy, self.floor):
                if server is not None:
                    server.stop()
            up.stop()
            self.ledger.drop()

    def mode(self, stream: bool) -> dict[str, Any]:
        label = "stream" if stream else "json"
        s, tmp, lo = self.sizes, self.tmp, self.layout
        proxy_url = f"http://127.0.0.1:{self.px_port}/v1/chat/completions"
        direct_url = f"{self.scheme}://127.0.0.1:{self.up_port}/v1/chat/completions"
        base = f"http://127.0.0.1:{self.px_port}"
        print(f"  [{self.label} w={self.workers} {label}] warm-up {s.warmup} ...",
              file=sys.stderr, flush=True)
        w = run_wrk(proxy_url, self.key, stream, 32, s.warmup, tmp, lo.others)
        self.check(f"{label} warm-up", w)

        def measured(conns: int, n: int, rss: bool) -> dict[str, Any]:
            rows0 = self.ledger.settle()
            tree = self.proxy.tree()
            workers = self.proxy.workers()
            written0 = metric(base, "euroute_ledger_written_total") if self.workers == 1 else None
            sampler = RssSampler(workers) if rss else None
            busy0, own0, up0 = system_busy_seconds(), own_children_seconds(), \
                cpu_seconds(self.upstream.tree())
            cpu0 = cpu_seconds(tree)
            if sampler:
                sampler.start()
            w = run_wrk(proxy_url, self.key, stream, conns, n, tmp, lo.others)
            rows1 = self.ledger.settle()
            cpu1 = cpu_seconds(self.proxy.tree())
            busy1, own1, up1 = system_busy_seconds(), own_children_seconds(), \
                cpu_seconds(self.upstream.tree())
            # CPU that neither euroute, the upstream nor the load generator used: other
            # work on the machine, which makes the numbers of this run less trustworthy.
            foreign = (busy1 - busy0) - (cpu1 - cpu0) - (up1 - up0) - (own1 - own0)
            window = w.seconds + 0.5
            foreign_pct = max(0.0, foreign) / (window * (os.cpu_count() or 1)) * 100
            if foreign_pct > NOISY_PERCENT:
                self.noise.append(f"{label} c={conns}: other processes used {foreign_pct:.0f}% "
                                  "of the machine during the run")
            samples = sampler.finish() if sampler else []
            written1 = metric(base, "euroute_ledger_written_total") if self.workers == 1 else None
            served = rows1 - rows0
            self.check(f"{label} proxy c={conns}", w)
            # wrk stops mid-flight: the proxy may have served up to `conns` requests more.
            if not w.requests <= served <= w.requests + conns:
                self.problems.append(f"{label} c={conns}: wrk counted {w.requests} responses, "
                                     f"the ledger gained {served} rows")
            if written0 is not None and written1 is not None and written1 - written0 != served:
                self.problems.append(f"{label} c={conns}: euroute_ledger_written_total grew by "
                                     f"{written1 - written0:.0f}, the ledger table by {served}")
            out = {"wrk": _wrk_dict(w), "served": served, "cpu_s": cpu1 - cpu0,
                   "cpu_ms_per_request": (cpu1 - cpu0) * 1000 / max(served, 1),
                   "cpu_percent": (cpu1 - cpu0) / w.seconds * 100,
                   "upstream_cpu_percent": (up1 - up0) / w.seconds * 100,
                   "foreign_cpu_percent_of_machine": round(foreign_pct, 1)}
            if rss:
                kb = [k for _, k in samples]
                half = kb[len(kb) // 2]
                out["rss"] = {
                    "workers": len(workers),
                    "start_mb": kb[0] / 1024, "end_mb": kb[-1] / 1024,
                    "growth_mb": (kb[-1] - kb[0]) / 1024,
                    "growth_second_half_mb": (kb[-1] - half) / 1024,
                    "peak_hwm_mb": sum(status_kb(p, "VmHWM") for p in workers) / 1024,
                    "peak_hwm_per_worker_mb": max(status_kb(p, "VmHWM") for p in workers) / 1024,
                    "trace_mb": [round(k / 1024, 1) for k in kb[:: max(1, len(kb) // 40)]],
                }
            return out

        print(f"  [{self.label} w={self.workers} {label}] concurrency 1 ...",
              file=sys.stderr, flush=True)
        d1 = run_wrk(direct_url, UPSTREAM_KEY, stream, 1, s.latency_c1, tmp, lo.others)
        self.check(f"{label} direct c=1", d1)
        p1 = measured(1, s.latency_c1, rss=False)
        floor = None
        if self.floor is not None:
            floor_url = f"http://127.0.0.1:{self.floor_port}/"
            self.check(f"{label} pass-through warm-up", run_wrk(
                floor_url, UPSTREAM_KEY, stream, 32, s.warmup // 5, tmp, lo.others))
            floor = run_wrk(floor_url, UPSTREAM_KEY, stream, 1, s.latency_c1, tmp, lo.others)
            self.check(f"{label} pass-through c=1", floor)
        d32 = run_wrk(direct_url, UPSTREAM_KEY, stream, 32, s.direct_c32, tmp, lo.others)
        self.check(f"{label} direct c=32", d32)
        print(f"  [{self.label} w={self.workers} {label}] concurrency 32, "
              f"{s.throughput} requests ...", file=sys.stderr, flush=True)
        p32 = measured(32, s.throughput, rss=True)
        result: dict[str, Any] = {
            "direct_c1": _wrk_dict(d1), "proxy_c1": p1, "direct_c32": _wrk_dict(d32),
            "proxy_c32": p32,
            "added_ms": {"p50_c1": p1["wrk"]["p50_ms"] - d1.p50_ms,
                         "p99_c1": p1["wrk"]["p99_ms"] - d1.p99_ms,
                         "p50_c32": p32["wrk"]["p50_ms"] - d32.p50_ms,
                         "p99_c32": p32["wrk"]["p99_ms"] - d32.p99_ms},
            "rps_c32": p32["wrk"]["rps"], "rps_c32_per_worker": p32["wrk"]["rps"] / self.workers,
        }
        if floor is not None:
            result["floor_c1"] = _wrk_dict(floor)
            result["added_ms"]["floor_p50_c1"] = floor.p50_ms - d1.p50_ms
        if stream:
            print(f"  [{self.label} w={self.workers} {label}] time to first event ...",
                  file=sys.stderr, flush=True)
            td = run_ttfb(direct_url, UPSTREAM_KEY, s.ttfb, lo.others)
            tp = run_ttfb(proxy_url, self.key, s.ttfb, lo.others)
            for what, t in (("direct", td), ("proxy", tp)):
                if t["errors"] or t["requests"] < s.ttfb:
                    self.problems.append(f"ttfb {what}: {t['errors']} errors "
                                         f"{t['error_samples']}")
            result["ttfe_direct"], result["ttfe_proxy"] = td, tp
            if floor is not None:
                tf = run_ttfb(f"http://127.0.0.1:{self.floor_port}/", UPSTREAM_KEY, s.ttfb,
                              lo.others)
                result["ttfe_floor"] = tf
                result["added_ms"]["floor_ttfe_p50"] = tf["ttfe_ms"]["p50"] - td["ttfe_ms"]["p50"]
            result["added_ms"]["ttfe_p50"] = tp["ttfe_ms"]["p50"] - td["ttfe_ms"]["p50"]
            result["added_ms"]["ttfe_p99"] = tp["ttfe_ms"]["p99"] - td["ttfe_ms"]["p99"]
        return result


def _wrk_dict(w: Wrk) -> dict[str, Any]:
    return {"requests": w.requests, "seconds": round(w.seconds, 3), "rps": round(w.rps, 1),
            "p50_ms": w.p50_ms, "p90_ms": w.p90_ms, "p99_ms": w.p99_ms, "p999_ms": w.p999_ms,
            "max_ms": w.max_ms, "errors": w.errors}


# -- report ---------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# euroute benchmark ({report['mode']}, {report['started']})",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['ram_gb']} GB RAM, Linux "
        f"{m['kernel']}, Python {m['python']}, {m['wrk']}; euroute {m['commit']}.",
        f"Sizes: warm-up {report['sizes']['warmup']}, concurrency-1 runs "
        f"{report['sizes']['latency_c1']} requests, concurrency-32 throughput run "
        f"{report['sizes']['throughput']} requests, time to first event "
        f"{report['sizes']['ttfb']} streams. One {report.get('ledger', 'sqlite')} ledger row per "
        "request.",
        "",
        "| transport | workers | mode | CPU ms/req c=32 | CPU ms/req c=1 | req/s c=32 | "
        "req/s/worker | +p50 c=1 ms | +p99 c=1 ms | +p50 c=32 ms | +p99 c=32 ms | "
        "+TTFE p50 ms | +TTFE p99 ms | peak RSS MB | RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        for mode, r in c["modes"].items():
            a = r["added_ms"]
            rss = r["proxy_c32"]["rss"]
            lines.append(
                f"| {c['transport']} | {c['workers']} | {mode} | "
                f"{_f(r['proxy_c32']['cpu_ms_per_request'], 3)} | "
                f"{_f(r['proxy_c1']['cpu_ms_per_request'], 3)} | {r['rps_c32']:.0f} | "
                f"{r['rps_c32_per_worker']:.0f} | {_f(a['p50_c1'])} | {_f(a['p99_c1'])} | "
                f"{_f(a['p50_c32'], 1)} | {_f(a['p99_c32'], 1)} | "
                f"{_f(a.get('ttfe_p50'))} | {_f(a.get('ttfe_p99'))} | "
                f"{rss['peak_hwm_per_worker_mb']:.0f} | {rss['growth_mb']:+.1f} "
                f"({rss['growth_second_half_mb']:+.1f}) |")
    lines += ["", "Upstream called directly (the baseline the `+` columns subtract):", "",
              "| transport | workers | mode | p50 c=1 ms | p99 c=1 ms | p50 c=32 ms | "
              "p99 c=32 ms | req/s c=32 | TTFE p50 ms | TTFE p99 ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["configs"]:
        for mode, r in c["modes"].items():
            d1, d32, t = r["direct_c1"], r["direct_c32"], r.get("ttfe_direct")
            lines.append(
                f"| {c['transport']} | {c['workers']} | {mode} | {_f(d1['p50_ms'])} | "
                f"{_f(d1['p99_ms'])} | {_f(d32['p50_ms'])} | {_f(d32['p99_ms'])} | "
                f"{d32['rps']:.0f} | {_f(t['ttfe_ms']['p50'] if t else None)} | "
                f"{_f(t['ttfe_ms']['p99'] if t else None)} |")
    floors = [(c, mode, r) for c in report["configs"] for mode, r in c["modes"].items()
              if "floor_c1" in r]
    if floors:
        lines += ["", "The floor: a bare pass-through on the same stack (uvicorn, uvloop, httptools, "
                  "euroute's `Upstream` over the same transport; no policy, translation or ledger; "
                  "bench/passthrough_app.py), pinned like euroute, at concurrency 1. euroute's own "
                  "work is the difference.", "",
                  "| transport | mode | floor +p50 c=1 ms | euroute +p50 c=1 ms | euroute's own ms | "
                  "floor +TTFE p50 ms | euroute +TTFE p50 ms |",
                  "|---|---|---|---|---|---|---|"]
        for c, mode, r in floors:
            a = r["added_ms"]
            lines.append(
                f"| {c['transport']} | {mode} | {_f(a['floor_p50_c1'])} | {_f(a['p50_c1'])} | "
                f"{_f(a['p50_c1'] - a['floor_p50_c1'])} | {_f(a.get('floor_ttfe_p50'))} | "
                f"{_f(a.get('ttfe_p50'))} |")
    lines += durability(report["configs"])
    lines += ["", "Layout: " + "; ".join(f"{c['transport']} w={c['workers']}: {c['layout']}"
                                         for c in report["configs"])]
    if report["targets"]:
        lines += ["", "Targets (issue 6, one worker, ledger on):", ""]
        lines += [f"- {'PASS' if ok else 'MISS'} {text}" for text, ok in report["targets"]]
    noise = [f"{c['transport']} w={c['workers']} {n}" for c in report["configs"]
             for n in c.get("noise", ())]
    if noise:
        lines += ["", "Noisy runs (other processes were busy; rerun for clean numbers):"]
        lines += [f"- {n}" for n in noise]
    problems = [p for c in report["configs"] for p in c["problems"]]
    lines += ["", "Problems: " + ("none" if not problems else "")]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def durability(configs: list[dict[str, Any]]) -> list[str]:
    """What the intent committed before forwarding costs: the same configuration with
    EUROUTE_LEDGER_DURABLE off and on (`--durable both`)."""
    runs = {(c["transport"], c["workers"], c.get("durable", True)): c for c in configs}
    pairs = [(off, runs[(t, w, True)]) for (t, w, d), off in runs.items()
             if not d and (t, w, True) in runs]
    if not pairs:
        return []
    lines = ["", "Durability (an intent committed before forwarding; README, Ledger): the same "
             "configuration without and with it.", "",
             "| transport | workers | mode | CPU ms/req c=1 off / on | CPU ms/req c=32 off / on "
             "| +p50 c=1 ms off / on | +p99 c=1 ms off / on | +p50 c=32 ms off / on | "
             "req/s c=32 off / on |", "|---|---|---|---|---|---|---|---|---|"]
    for off, on in pairs:
        for mode in on["modes"]:
            a, b = off["modes"][mode], on["modes"][mode]
            lines.append(
                f"| {on['transport']} | {on['workers']} | {mode} | "
                f"{_f(a['proxy_c1']['cpu_ms_per_request'], 3)} / "
                f"{_f(b['proxy_c1']['cpu_ms_per_request'], 3)} | "
                f"{_f(a['proxy_c32']['cpu_ms_per_request'], 3)} / "
                f"{_f(b['proxy_c32']['cpu_ms_per_request'], 3)} | "
                f"{_f(a['added_ms']['p50_c1'])} / {_f(b['added_ms']['p50_c1'])} | "
                f"{_f(a['added_ms']['p99_c1'])} / {_f(b['added_ms']['p99_c1'])} | "
                f"{_f(a['added_ms']['p50_c32'], 1)} / {_f(b['added_ms']['p50_c32'], 1)} | "
                f"{a['rps_c32']:.0f} / {b['rps_c32']:.0f} |")
    return lines


def targets(configs: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    out = []
    for c in configs:
        if c["workers"] != 1 or not c.get("durable", True):  # targets hold for the default
            continue
        t, j, s = c["transport"], c["modes"]["json"], c["modes"]["stream"]
        checks = [
            (f"json CPU {j['proxy_c32']['cpu_ms_per_request']:.3f} ms/req <= "
             f"{TARGETS['cpu_ms_json']}", j["proxy_c32"]["cpu_ms_per_request"]
             <= TARGETS["cpu_ms_json"]),
            (f"stream CPU {s['proxy_c32']['cpu_ms_per_request']:.3f} ms/req <= "
             f"{TARGETS['cpu_ms_stream']}", s["proxy_c32"]["cpu_ms_per_request"]
             <= TARGETS["cpu_ms_stream"]),
            (f"json added p50 at c=1 {j['added_ms']['p50_c1']:.2f} ms <= "
             f"{TARGETS['added_p50_c1_ms']}", j["added_ms"]["p50_c1"]
             <= TARGETS["added_p50_c1_ms"]),
            (f"stream added p50 at c=1 {s['added_ms']['p50_c1']:.2f} ms <= "
             f"{TARGETS['added_p50_c1_ms']}", s["added_ms"]["p50_c1"]
             <= TARGETS["added_p50_c1_ms"]),
            (f"added p50 time to first event {s['added_ms']['ttfe_p50']:.2f} ms <= "
             f"{TARGETS['added_ttfe_p50_ms']}", s["added_ms"]["ttfe_p50"]
             <= TARGETS["added_ttfe_p50_ms"]),
            (f"json {j['rps_c32']:.0f} req/s at c=32 >= {TARGETS['rps_c32']:.0f}",
             j["rps_c32"] >= TARGETS["rps_c32"]),
            (f"stream {s['rps_c32']:.0f} req/s at c=32 >= {TARGETS['rps_c32']:.0f}",
             s["rps_c32"] >= TARGETS["rps_c32"]),
        ]
        for mode, r in (("json", j), ("stream", s)):
            g = r["proxy_c32"]["rss"]["growth_second_half_mb"]
            checks.append((f"{mode} RSS growth over the second half of the throughput run "
                           f"{g:+.1f} MB <= {TARGETS['rss_growth_mb']}",
                           g <= TARGETS["rss_growth_mb"]))
        out += [(f"[{t}] {text}", ok) for text, ok in checks]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="euroute benchmark (see bench/README.md)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run (seconds) that checks the benchmark and proxy work")
    parser.add_argument("--workers", default=None,
                        help="comma list of proxy worker counts (default 1,2; smoke 1)")
    parser.add_argument("--transport", default=None,
                        help="comma list of aiohttp,httpx (default both; smoke aiohttp)")
    parser.add_argument("--tls", action="store_true",
                        help="the upstream speaks HTTPS (a local trustme CA that euroute trusts "
                             "through SSL_CERT_FILE), as the real upstream does")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests in each concurrency-32 throughput run (default 100000)")
    parser.add_argument("--upstream-workers", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=20, help="SSE data events per stream")
    parser.add_argument("--ledger", choices=("sqlite", "postgresql"), default="sqlite",
                        help="ledger database (postgresql: a fresh database on the server at "
                             "EUROUTE_BENCH_PG, default 127.0.0.1:5432 user postgres)")
    parser.add_argument("--durable", choices=("on", "off", "both"), default="on",
                        help="intents before forwarding (EUROUTE_LEDGER_DURABLE); both: each "
                             "configuration without and with, and what it costs")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin processes to CPUs with taskset")
    parser.add_argument("--check-targets", action="store_true",
                        help="exit 2 when a one-worker target is missed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # Turn SIGTERM into SystemExit, so the servers started below are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sizes = SMOKE if args.smoke else FULL
    if args.requests:
        sizes = Sizes(**{**sizes.__dict__, "throughput": args.requests})
    workers = [int(w) for w in (args.workers or ("1" if args.smoke else "1,2")).split(",")]
    transports = (args.transport or ("aiohttp" if args.smoke else "aiohttp,httpx")).split(",")
    for t in transports:
        if t not in ("aiohttp", "httpx"):
            parser.error(f"unknown transport {t!r}")
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    try:
        ensure_wrk()
        report: dict[str, Any] = {"mode": "smoke" if args.smoke else "full",
                                  "started": started.strftime("%Y-%m-%d %H:%M UTC"),
                                  "machine": machine(), "sizes": sizes.__dict__,
                                  "ledger": args.ledger,
                                  "targets_definition": TARGETS, "configs": []}
        with tempfile.TemporaryDirectory(prefix="euroute-bench-") as tmp:
            durables = {"on": [True], "off": [False], "both": [False, True]}[args.durable]
            for t in transports:
                for w in workers:
                    for d in durables:
                        print(f"== transport={t} workers={w} durable={d}", file=sys.stderr,
                              flush=True)
                        cfg = Config(t, w, sizes, Path(tmp), not args.no_pin,
                                     args.upstream_workers, args.chunks, args.ledger, args.tls,
                                     d)
                        report["configs"].append(cfg.run())
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    report["targets"] = targets(report["configs"])
    report["duration_s"] = round(time.monotonic() - t0, 1)
    out = args.out / "smoke" if args.smoke and args.out == RESULTS else args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (out / f"{stamp}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "latest.md").write_text(md)
    print(md)
    print(f"wrote {out / (stamp + '.json')} in {report['duration_s']} s", file=sys.stderr)
    if any(c["problems"] for c in report["configs"]):
        return 1
    if args.check_targets and not all(ok for _, ok in report["targets"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
