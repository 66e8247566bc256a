"""A fake of Baseten's public training API on 127.0.0.1, built from the truss client's calls and the
fields it reads (truss/remote/baseten/api.py, truss/cli/train/; docs: shared/reference/platform.md):

    GET  v1/training_projects                                  -> training_projects[{id, name}]
    POST v1/training_jobs/search {project_id, job_id, order_by} -> training_jobs[{id, created_at,
                                                                   current_status, training_project{id, name}}]
    GET  v1/training_projects/{p}/jobs/{j}/checkpoints          -> checkpoints[{checkpoint_id, checkpoint_type,
                                                                   base_model, size_bytes, created_at}]
    GET  v1/training_projects/{p}/jobs/{j}/checkpoint_files?page_size=&page_token=
                                                                -> presigned_urls[{url, relative_file_name,
                                                                   size_bytes}], next_page_token

Every call needs `Authorization: Api-Key <key>` (401, or `deny_status`, otherwise). The URLs are real S3 presigned
GETs minted by boto3 against the suite's SeaweedFS (or a fault proxy in front of it), so the agent
downloads through real presigned requests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

Mint = Callable[[str, int], str]  # (S3 key, seconds valid) -> presigned GET URL


@dataclass
class FakeFile:
    relative_file_name: str  # <checkpoint_id>/<path>, or rank-<n>/<checkpoint_id>/<path>
    s3_key: str
    size_bytes: int  # what the listing says (a test may make it lie)


@dataclass
class FakeJob:
    id: str
    project_id: str
    created_at: str
    checkpoints: list[dict] = field(default_factory=list)  # {checkpoint_id, created_at, size_bytes}
    files: list[FakeFile] = field(default_factory=list)


@dataclass
class Served:
    method: str
    path: str
    authorized: bool


class FakeBasetenApi:
    """`max_page`: the most entries the fake puts on one page whatever page_size asks; `expired_first`:
    the first file listing of each job hands out URLs that have already expired."""

    def __init__(self, key: str, mint: Mint, *, max_page: int = 1000, expired_first: bool = False) -> None:
        self.key, self.mint, self.max_page, self.expired_first = key, mint, max_page, expired_first
        self.projects: dict[str, str] = {}  # id -> name
        self.jobs: list[FakeJob] = []
        self.served: list[Served] = []
        self.deny_status = 401  # the answer to a wrong key (Baseten answers 401 or 403)
        self._expired_once: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeBasetenApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_listings(self, job_id: str) -> int:
        """How many times the job's files were listed (the first page of each listing)."""
        return sum(1 for s in self.served if s.path.endswith(f"/jobs/{job_id}/checkpoint_files") and s.authorized
                   and "first" in s.method)

    def pages(self, job_id: str) -> int:
        return sum(1 for s in self.served if s.path.endswith(f"/jobs/{job_id}/checkpoint_files") and s.authorized)

    # --- answers ------------------------------------------------------------------------------------

    def _job_json(self, job: FakeJob) -> dict:
        return {"id": job.id, "created_at": job.created_at, "current_status": "TRAINING_JOB_COMPLETED",
                "training_project": {"id": job.project_id, "name": self.projects[job.project_id]}}

    def _search(self, body: dict) -> dict:
        jobs = [j for j in self.jobs if body.get("project_id") in (None, j.project_id)
                and body.get("job_id") in (None, j.id)]
        order = (body.get("order_by") or [{"field": "created_at", "order": "desc"}])[0]
        jobs.sort(key=lambda j: j.created_at, reverse=order.get("order") == "desc")
        return {"training_jobs": [self._job_json(j) for j in jobs]}

    def _files(self, job: FakeJob, query: dict[str, list[str]]) -> tuple[dict, bool]:
        size = min(int(query.get("page_size", ["100"])[0]), self.max_page)
        start = int(query.get("page_token", ["0"])[0])
        first = start == 0
        with self._lock:
            expired = first and self.expired_first and job.id not in self._expired_once
            if expired:
                self._expired_once.add(job.id)
        page = job.files[start:start + size]
        urls = [{"url": self.mint(f.s3_key, 1 if expired else 3600), "relative_file_name": f.relative_file_name,
                 "size_bytes": f.size_bytes} for f in page]
        if expired:
            time.sleep(1.5)  # minted for one second: expired by the time the agent has them
        following = start + size if start + size < len(job.files) else None
        return {"presigned_urls": urls, "next_page_token": None if following is None else str(following)}, first

    def _answer(self, method: str, path: str, query: dict[str, list[str]], body: dict) -> tuple[int, dict, str]:
        parts = path.strip("/").split("/")
        if method == "GET" and parts == ["v1", "training_projects"]:
            return 200, {"training_projects": [{"id": i, "name": n} for i, n in self.projects.items()]}, method
        if method == "POST" and parts == ["v1", "training_jobs", "search"]:
            return 200, self._search(body), method
        if method == "GET" and len(parts) == 6 and parts[:2] == ["v1", "training_projects"] and parts[3] == "jobs":
            job = next((j for j in self.jobs if j.id == parts[4] and j.project_id == parts[2]), None)
            if job is None:
                return 404, {"message": "not found"}, method
            if parts[5] == "checkpoints":
                return 200, {"checkpoints": [{"checkpoint_type": "full", "base_model": None, **c}
                                             for c in job.checkpoints]}, method
            if parts[5] == "checkpoint_files":
                answer, first = self._files(job, query)
                return 200, answer, method + (" first" if first else "")
        return 404, {"message": "no such endpoint"}, method

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                """Quiet."""

            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                authorized = self.headers.get("Authorization") == f"Api-Key {api.key}"
                if authorized:
                    status, answer, label = api._answer(self.command, url.path, parse_qs(url.query), body)
                else:
                    status, answer, label = api.deny_status, {"message": "Unauthorized"}, self.command
                with api._lock:
                    api.served.append(Served(label, url.path, authorized))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

        return Handler
