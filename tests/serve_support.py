"""Starting a real `vllm serve` for tests: a free port on 127.0.0.1, wait for /health."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM = str(Path(sys.executable).parent / "vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return r.status


def metrics(port: int) -> dict[str, float]:
    """``/metrics`` as {series with labels: value} (comment lines dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One JSON request; (status, decoded body) for 2xx and errors alike."""
    import urllib.error

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


@contextmanager
def serve(argv: list[str], log: Path, env: dict | None = None
          ) -> Iterator[tuple[subprocess.Popen, int]]:
    """``argv + [--host 127.0.0.1 --port P]`` (a server command) on a free port until
    /health answers, in its own process group; stopped on exit (SIGTERM, then SIGKILL of
    the group; nothing when the test killed it already). ``env`` None: this environment
    without the vLLM variables the tests set for in-process engines (the server runs as a
    user runs it)."""
    port = free_port()
    if env is None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    cmd = [*argv, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited:\n{log.read_text()[-4000:]}")
            try:
                if health(port) == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError(f"{argv[0]} did not start:\n{log.read_text()[-4000:]}")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def vllm_serve(model: Path, args: list[str], log: Path, env: dict | None = None):
    """The literal ``vllm serve MODEL ARGS`` (see :func:`serve`)."""
    return serve([VLLM, "serve", str(model), *args], log, env)


def openai_client(port: int, timeout: float = 300):
    """The official client, no retries (a retried request would hide a failure)."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                         max_retries=0, timeout=timeout)
