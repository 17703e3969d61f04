"""The gateway's own overhead: the same load sent straight to a fast backend and through `fl-gateway`, in one run.

The backend stands in for a model replica and answers /v1/classify at once, so what differs between the two paths
is the gateway's work alone: JWT check, rate limit, routing, the proxied call, audit record (committed before the
answer leaves) and metrics. Two loads, each on both paths, rotating the tokens of many users as a ward's clients
would: saturation (wrk, Debian package `wrk`, a fixed number of connections as fast as they are answered), then a
fixed rate of half the gateway's own capacity as just measured (an open-loop asyncio client: requests leave on
schedule whether or not earlier ones were answered, so a slow answer is not hidden by the next one waiting).

Usage: `python scripts/bench_gateway.py [--seconds 15] [--connections 32] [--users 200]`.
Writes docs/benchmarks.md between the markers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.auth import mint_token  # noqa: E402
from scripts.bench_dp_step import write_section  # noqa: E402

BEGIN, END = "<!-- gateway:begin -->", "<!-- gateway:end -->"
SECRET = "benchmark-secret-0123456789abcdef"
FAST_BACKEND = textwrap.dedent("""
    import sys
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    ANSWER = {"label": "Injury (S00-T88)", "probabilities": {"Injury (S00-T88)": 0.9, "Neoplasms (C00-D49)": 0.1}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": "fast-backend", "task": "classification", "hospital": None,
                "provenance": {"run_id": "benchmark", "guarantees": []}}

    @app.post("/v1/classify")
    async def classify(body: dict):
        return ANSWER

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
""")
WRK_SCRIPT = """
local tokens = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
                    ["Authorization"] = "Bearer " .. tokens[(n %% #tokens) + 1]},
                    '{"text": "Displaced fracture of shaft of left femur"}')
end
done = function(summary, latency, requests)
  io.write(string.format('RESULT {"p50_ms": %%f, "p95_ms": %%f, "p99_ms": %%f, "rps": %%f, "errors": %%d, ' ..
    '"non2xx": %%d}\\n', latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, summary.requests / (summary.duration / 1e6),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def load(wrk: str, url: str, script: Path, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return result


def fixed_rate(url: str, tokens: list[str], rate: float, seconds: int) -> dict[str, float]:
    """Open loop at `rate` requests a second: each request's latency counts from when it was due to leave, so a slow
    answer is not hidden by the next request waiting for it. Latencies are of 200s only; failures and errors are
    counted apart; `rps` is what was answered 200 over the time taken."""
    body = {"text": "Displaced fracture of shaft of left femur"}

    async def run() -> tuple[list[float], int, int, float]:
        latencies: list[float] = []
        non2xx = errors = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.1

            async def one(i: int) -> None:
                nonlocal non2xx, errors
                due = start + i / rate
                await asyncio.sleep(max(due - loop.time(), 0))
                headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
                try:
                    async with session.post(url, json=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            non2xx += 1
                            return
                except aiohttp.ClientError:
                    errors += 1
                    return
                latencies.append(loop.time() - due)

            await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
            return latencies, non2xx, errors, loop.time() - start

    latencies, non2xx, errors, elapsed = asyncio.run(run())
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "rps": len(latencies) / elapsed, "errors": errors,
            "non2xx": non2xx}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("bench_gateway: wrk is not installed (Debian: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FL_GATEWAY_JWT_SECRET": SECRET,
           "FL_AUDIT_CHAIN_KEY": Fernet.generate_key().decode(), "FL_AUDIT_TEXT_KEY": Fernet.generate_key().decode()}
    backend_port, gateway_port = free_port(), free_port()
    (work / "backend.py").write_text(FAST_BACKEND)
    token_list = [mint_token(SECRET, f"user-{i}", "clinician", 30, "federated-dp-llm") for i in range(args.users)]
    script = work / "load.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f'"{t}"' for t in token_list))
    processes = [
        subprocess.Popen([sys.executable, str(work / "backend.py"), str(backend_port)], env=env,
                         start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", f"port={gateway_port}",
                          f"routing.backends=[http://127.0.0.1:{backend_port}]", "limits.requests_per_hour=1000000",
                          f"audit.path={work / 'audit.sqlite'}", f"limits.sqlite_path={work / 'limits.sqlite'}"],
                         env=env, cwd=work, start_new_session=True),
    ]
    try:
        wait_ready(f"http://127.0.0.1:{backend_port}/health")
        wait_ready(f"http://127.0.0.1:{gateway_port}/ready")
        paths = (("direct to the backend", backend_port), ("through the gateway", gateway_port))
        results = {}
        for name, port in paths:
            load(wrk, f"http://127.0.0.1:{port}/v1/classify", script, 3, args.connections)  # warm-up
            results[name] = load(wrk, f"http://127.0.0.1:{port}/v1/classify", script, args.seconds,
                                 args.connections)
            print(name, results[name], flush=True)
        rate = round(results["through the gateway"]["rps"] / 2)  # half of the gateway's own capacity
        paced = {}
        for name, port in paths:
            paced[name] = fixed_rate(f"http://127.0.0.1:{port}/v1/classify", token_list, rate, args.seconds)
            print(name, f"at {rate}/s", paced[name], flush=True)
    finally:
        for proc in processes:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    def table(measured: dict[str, dict[str, float]]) -> list[str]:
        return ["| path | p50 (ms) | p95 (ms) | p99 (ms) | requests/s | errors |", "|---|---|---|---|---|---|",
                *(f"| {name} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps']:.0f} | "
                  f"{r['errors'] + r['non2xx']:.0f} |" for name, r in measured.items())]

    direct, gateway = results["direct to the backend"], results["through the gateway"]
    paced_direct, paced_gateway = paced["direct to the backend"], paced["through the gateway"]
    markdown = "\n".join([
        f"Saturation: wrk, 1 thread, {args.connections} connections, {args.seconds} s per path after a 3 s warm-up, "
        f"POST /v1/classify rotating {args.users} users' tokens; gateway with SQLite limits and audit, one process.",
        "",
        *table(results),
        "",
        f"Gateway against direct: p95 {gateway['p95_ms'] / direct['p95_ms']:.2f}x, throughput "
        f"{gateway['rps'] / direct['rps']:.2f}x; the gateway adds {gateway['p50_ms'] - direct['p50_ms']:.2f} ms "
        "at the median.",
        "",
        f"Half load: {rate} requests/s on each path for {args.seconds} s (half the gateway's capacity above), open "
        "loop, latency from when each request was due.",
        "",
        *table(paced),
        "",
        f"The gateway adds {paced_gateway['p50_ms'] - paced_direct['p50_ms']:.2f} ms at the median and "
        f"{paced_gateway['p95_ms'] - paced_direct['p95_ms']:.2f} ms at p95.",
    ])
    print(markdown)
    print(f"wrote {write_section(markdown, BEGIN, END, 'Inference gateway overhead')}")


if __name__ == "__main__":
    main()
