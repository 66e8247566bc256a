"""Baseten's public training API as a read-only store (BT_CHECKPOINT_STORE=baseten): the only
module that knows the API's shapes.

The endpoints and fields are the ones the truss CLI calls (truss/remote/baseten/api.py):
`GET v1/training_projects`, `POST v1/training_jobs/search`,
`GET v1/training_projects/{p}/jobs/{j}/checkpoints` and `.../checkpoint_files?page_size=&page_token=`,
whose pages of presigned URLs are followed to the end. The key goes in `Authorization: Api-Key
<key>` and nowhere else: no message, log line or record names it. Answers are parsed into small
dataclasses; an answer of another shape is an IntegrityError naming the endpoint.

File bytes come from the presigned URLs with ranged GETs. A URL that storage refuses with 403 has
expired: the job's files are listed again (once for all the workers that saw it) and the request
is sent again to the new URL.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn
from urllib.parse import quote, urlencode

from ckpt_agent.config.baseten import API_KEY_VAR, BasetenSettings
from ckpt_agent.errors import ConfigError, IntegrityError, NotFoundError, StoreError, TransientError
from ckpt_agent.runtime.retry import retry
from ckpt_agent.stores.base import MAX_LISTING_ENTRIES, Listing, RangeReader, Store, check_listing_size
from ckpt_agent.stores.httpconn import ANSWER_LIMIT, Answer, Connections, split_url
from ckpt_agent.stores.objectcheck import StorageCheck, storage_check
from ckpt_agent.stores.s3common import REQUEST_BACKOFF, EmptyReader, store_error

PAGE_SIZE = 1000
SAVE_REFUSED = ("BT_CHECKPOINT_STORE=baseten is read-only: the platform uploads a job's checkpoints itself; "
                "to save or sync, set BT_CHECKPOINT_STORE to s3://bucket/prefix or a folder")


@dataclass(frozen=True)
class Project:
    id: str
    name: str


@dataclass(frozen=True)
class Job:
    id: str
    created_at: str
    project: Project


@dataclass(frozen=True)
class Checkpoint:
    checkpoint_id: str
    created_at: str
    size_bytes: int | None


@dataclass(frozen=True)
class RemoteFile:
    """`name`: relative_file_name as listed: `<checkpoint_id>/<path>`, or `rank-<n>/<checkpoint_id>/<path>`."""

    name: str
    size: int


def file_key(project_id: str, job_id: str, name: str) -> str:
    """The store key of a listed file: what open_range takes."""
    return f"{project_id}/{job_id}/{name}"


class _Reader:
    """A ranged GET's body, with what storage said about the object."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.object_size = answer.object_size
        self.storage_check: StorageCheck = storage_check({k.lower(): v for k, v in answer.response.getheaders()})

    def readinto(self, buffer: memoryview) -> int:
        return self._answer.readinto(buffer)

    def close(self) -> None:
        self._answer.close()


def _field(obj: object, key: str, kind: type, where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IntegrityError(f"Baseten API: {where}: answered without {key!r} of the expected type; "
                             "upgrade ckpt-agent or check BASETEN_API_URL")
    return value


class BasetenApi:
    """The JSON calls, each retried on 5xx, 429 and connection failures."""

    def __init__(self, settings: BasetenSettings, conns: Connections) -> None:
        if not settings.api_key:
            raise ConfigError(f"{API_KEY_VAR}: not set; BT_CHECKPOINT_STORE=baseten needs a Baseten API key "
                              "(Settings > API keys in the Baseten app)")
        self._origin, base = split_url(settings.api_url)
        self._base = base.rstrip("/")
        self._headers = {"Authorization": f"Api-Key {settings.api_key}", "Accept": "application/json"}
        self._conns = conns

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        where = f"{method} {path.split('?')[0]}"
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers if data is None else {**self._headers, "Content-Type": "application/json"}

        def attempt() -> bytes:
            try:
                answer = self._conns.send(self._origin, method, f"{self._base}/{path}", headers, data)
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"Baseten API: {where} failed ({type(exc).__name__}); "
                                     "check BASETEN_API_URL and the network") from None
            if answer.status >= 300:
                answer.discard()
                _api_error(answer.status, where)
            try:
                return answer.read_all(ANSWER_LIMIT, f"Baseten API: {where}")
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"Baseten API: {where}: answer cut short ({type(exc).__name__})") from None
            finally:
                answer.close()

        raw = retry(attempt, REQUEST_BACKOFF)
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise IntegrityError(f"Baseten API: {where}: answer is not JSON; check BASETEN_API_URL") from None
        if not isinstance(obj, dict):
            raise IntegrityError(f"Baseten API: {where}: answer is not a JSON object")
        return obj

    def projects(self) -> list[Project]:
        where = "GET v1/training_projects"
        answer = _field(self._call("GET", "v1/training_projects"), "training_projects", list, where)
        return [Project(_field(p, "id", str, where), _field(p, "name", str, where)) for p in answer]

    def search_jobs(self, project_id: str | None = None, job_id: str | None = None) -> list[Job]:
        """Newest first, as the API orders them."""
        where = "POST v1/training_jobs/search"
        body = {"project_id": project_id, "job_id": job_id, "order_by": [{"field": "created_at", "order": "desc"}]}
        jobs = _field(self._call("POST", "v1/training_jobs/search", body), "training_jobs", list, where)
        found = []
        for job in jobs:
            project = _field(job, "training_project", dict, where)
            found.append(Job(_field(job, "id", str, where), _field(job, "created_at", str, where),
                             Project(_field(project, "id", str, where), _field(project, "name", str, where))))
        return found

    def checkpoints(self, project_id: str, job_id: str) -> list[Checkpoint]:
        path = f"v1/training_projects/{quote(project_id, safe='')}/jobs/{quote(job_id, safe='')}/checkpoints"
        where = "GET .../checkpoints"
        listed = _field(self._call("GET", path), "checkpoints", list, where)
        return [Checkpoint(_field(c, "checkpoint_id", str, where), _field(c, "created_at", str, where),
                           c.get("size_bytes") if isinstance(c.get("size_bytes"), int) else None) for c in listed]

    def files(self, project_id: str, job_id: str) -> dict[str, tuple[RemoteFile, str]]:
        """Every file of the job's checkpoints: relative name -> (the file, its presigned URL); every page."""
        base = f"v1/training_projects/{quote(project_id, safe='')}/jobs/{quote(job_id, safe='')}/checkpoint_files"
        where = "GET .../checkpoint_files"
        found: dict[str, tuple[RemoteFile, str]] = {}
        token: str | None = None
        for pages in range(1, MAX_LISTING_ENTRIES + 2):
            query = {"page_size": str(PAGE_SIZE), **({"page_token": token} if token else {})}
            page = self._call("GET", f"{base}?{urlencode(query)}")
            for entry in _field(page, "presigned_urls", list, where):
                name, size = _field(entry, "relative_file_name", str, where), _field(entry, "size_bytes", int, where)
                found[name] = (RemoteFile(name, size), _field(entry, "url", str, where))
            check_listing_size(f"Baseten API: {where} of job {job_id}", len(found) + pages)
            token = page.get("next_page_token") or None
            if token is None:
                break
            if not isinstance(token, str):
                raise IntegrityError(f"Baseten API: {where}: next_page_token is not a string")
        return found


def _api_error(status: int, where: str) -> NoReturn:
    if status in (401, 403):
        raise StoreError(f"Baseten API: {where} refused the key ({status}); check {API_KEY_VAR}")
    raise store_error("", status, f"Baseten API: {where}", "the call", "")


class BasetenStore(Store):
    """Reads a job's checkpoint files through their presigned URLs; writes nothing (SAVE_REFUSED)."""

    def __init__(self, settings: BasetenSettings, env: Mapping[str, str], read_timeout: float = 20) -> None:
        self._conns = Connections(env, read_timeout)
        self.api = BasetenApi(settings, self._conns)
        self._urls: dict[tuple[str, str], tuple[int, dict[str, str]]] = {}  # (project, job) -> (generation, urls)
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()

    def describe(self) -> str:
        return "baseten"

    def listed(self, project_id: str, job_id: str) -> list[RemoteFile]:
        """The job's files; their URLs are kept for open_range."""
        files = self.api.files(project_id, job_id)
        with self._lock:
            generation = self._urls.get((project_id, job_id), (0, {}))[0]
            self._urls[(project_id, job_id)] = (generation, {n: url for n, (_, url) in files.items()})
        return [f for f, _ in files.values()]

    def _url(self, key: str) -> tuple[tuple[str, str], str, int, str]:
        project_id, job_id, name = key.split("/", 2)
        with self._lock:
            generation, urls = self._urls.get((project_id, job_id), (0, {}))
        if name not in urls:
            raise NotFoundError(f"{name}: no longer listed by the Baseten API for job {job_id}")
        return (project_id, job_id), name, generation, urls[name]

    def _refresh(self, job: tuple[str, str], seen: int) -> None:
        """List the job's files again, unless another worker already did since generation `seen`: the
        workers that meet expired URLs together wait for one listing."""
        with self._refreshing:
            with self._lock:
                if self._urls.get(job, (0, {}))[0] != seen:
                    return
            files = self.api.files(*job)
            with self._lock:
                self._urls[job] = (seen + 1, {n: url for n, (_, url) in files.items()})

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        if length <= 0:
            return EmptyReader()
        for refreshed in (False, True):
            job, name, generation, url = self._url(key)
            origin, target = split_url(url)
            try:
                answer = self._conns.send(origin, "GET", target, {"Range": f"bytes={start}-{start + length - 1}"})
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{name}: GET failed ({type(exc).__name__})") from None
            if answer.status == 206 or (answer.status == 200 and start == 0 and answer.response.length == length):
                return _Reader(answer)
            if answer.status == 200:  # the whole object from its first byte: not the range asked for
                answer.discard()
                raise StoreError(f"{name}: storage ignored the byte range asked for; cannot load from it")
            answer.discard()
            if answer.status == 403 and not refreshed:
                self._refresh(job, generation)  # the presigned URL expired: ask for new ones
                continue
            if answer.status == 403:
                raise StoreError(f"{name}: storage refused its presigned URL (403) even after listing the files "
                                 f"again; check {API_KEY_VAR} and that the job's checkpoints still exist")
            raise store_error("", answer.status, name, "GET", "")
        raise AssertionError("unreachable")

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        raise NotFoundError(f"{key}: the Baseten API serves checkpoint files, not store records")

    def list_dir(self, prefix: str) -> Listing:
        raise StoreError("BT_CHECKPOINT_STORE=baseten has no folders to list; `ckpt-agent ls` asks the API")

    def write_bytes(self, key: str, data: bytes) -> None:
        raise ConfigError(SAVE_REFUSED)

    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        raise ConfigError(SAVE_REFUSED)

    def start_upload(self, key: str, size: int, lengths: Sequence[int] | None = None) -> NoReturn:
        raise ConfigError(SAVE_REFUSED)

    def delete(self, key: str) -> None:
        raise ConfigError(SAVE_REFUSED)
