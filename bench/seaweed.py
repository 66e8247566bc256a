"""Starts a real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 for tests and the benchmark.

It lives in bench/ and needs no pytest, so the benchmark never imports tests/; the test
fixtures (tests/conftest.py) import it from here. Every port is chosen free on loopback and the
server binds 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "ckptagenttestkey"
SECRET_KEY = "ckptagenttestsecret"
BUCKET = "checkpoints"
_FOREIGN = ("AWS_", "BT_", "CKPT_AGENT_")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any AWS_*/BT_*/CKPT_AGENT_* (a stray AWS_PROFILE must
    never reach a real account, a stray BT_* never change a test or a benchmark), plus `extra`."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
    return {**keep, **extra}


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("weed not found: install the test extras (pip install -e '.[test]')")
    return found


def _free_port(taken: set[int]) -> int:
    """A port p such that p and p+10000 (weed's gRPC port) are both free on loopback and neither is
    one of the other services' ports or gRPC ports (`taken`, which this adds to): weed refuses to
    start when one service's port is another's gRPC port."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        taken |= {port, port + 10000}
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


@dataclass
class SeaweedServer:
    workdir: Path
    process: subprocess.Popen
    s3_port: int
    bucket: str = BUCKET

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment for a process that talks to this server (and to nothing else)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self):
        import boto3

        env = self.env()
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_seaweed(workdir: Path, bucket: str = BUCKET, timeout: float = 60,
                  extra_args: Sequence[str] = ()) -> SeaweedServer:
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    taken: set[int] = set()
    ports = {name: _free_port(taken) for name in ("s3", "master", "volume", "filer", "admin")}
    args = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={bucket}", *extra_args,
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    server = SeaweedServer(workdir, process, ports["s3"], bucket)
    deadline = time.monotonic() + timeout
    client = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}; see {workdir / 'weed.log'}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=1)
        except urllib.error.HTTPError:
            client = client or server.client()
            try:
                client.head_bucket(Bucket=bucket)
                return server
            except Exception:
                pass
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"weed mini did not become ready in {timeout}s; see {workdir / 'weed.log'}")
