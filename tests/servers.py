"""Pytest fixtures that start real servers for the store tests: redis-server and moto's S3 server.

Both listen on a free loopback port and are stopped at the end of the session.  A missing
redis-server (or redis package) FAILS the tests that need it; it never skips them.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc=None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The URL base of a fresh redis-server (redis://127.0.0.1:PORT), killed at the end."""
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server); the redis store tests need it")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.fail("the 'redis' package is not installed (pip install redis); the redis store tests need it")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
    except RuntimeError as exc:
        proc.kill()
        proc.wait()
        pytest.fail(f"redis-server did not start: {exc}")
    yield f"redis://127.0.0.1:{port}"
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    """(endpoint_url, bucket, client options) of a moto S3 server (a subprocess) on a free loopback port.

    A subprocess rather than moto's in-process thread, so that tests may fork writer processes safely.
    """
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            _wait_port(port, proc, timeout=60.0)
        except RuntimeError as exc:
            pytest.fail(f"the moto S3 server did not start: {exc}")
        endpoint = f"http://127.0.0.1:{port}"
        options = {"endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                   "region_name": "us-east-1"}
        bucket = f"seqkv-test-{uuid.uuid4().hex[:8]}"
        boto3.session.Session().client("s3", **options).create_bucket(Bucket=bucket)
        yield endpoint, bucket, options
    finally:
        proc.kill()
        proc.wait(timeout=10)
