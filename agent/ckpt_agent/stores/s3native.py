"""The native S3 engine's store: the Store protocol, listings and multipart uploads over S3Http.

Selected by CKPT_AGENT_S3_ENGINE=http (the default); s3http.py carries the requests.
"""

from __future__ import annotations

import contextlib
import itertools
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from ckpt_agent.errors import NotFoundError, TransientError
from ckpt_agent.runtime.retry import retry
from ckpt_agent.stores.base import Listing, RangeReader, check_listing_size
from ckpt_agent.stores.s3common import (
    CHECKSUM_MODE,
    REQUEST_BACKOFF,
    EmptyReader,
    FileSlice,
    S3StoreBase,
)
from ckpt_agent.stores.s3http import S3Http
from ckpt_agent.stores.sigv4 import uri_encode

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _text(element: ET.Element, tag: str) -> str:
    found = element.find(_NS + tag)
    return found.text or "" if found is not None else ""


class NativeS3Store(S3StoreBase):
    """The default S3 engine (CKPT_AGENT_S3_ENGINE=http): the Store protocol over S3Http."""

    def __init__(self, bucket: str, root: str, env: Mapping[str, str], read_timeout: float = 20) -> None:
        super().__init__(bucket, root)
        self._http = S3Http(bucket, env, read_timeout)

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        return self._http.call("GET", self._key(key), "GET", limit=limit)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._http.call("PUT", self._key(key), "PUT", body=data)

    def list_dir(self, prefix: str) -> Listing:
        full = self._list_prefix(prefix)
        files: list[str] = []
        dirs: list[str] = []
        params = {"list-type": "2", "prefix": full, "delimiter": "/"}
        for pages in itertools.count(1):
            body = self._http.call("GET", "", "LIST", params=params)
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                raise TransientError(f"{self._http.where(full)}: LIST answer is not XML") from None
            files.extend(_text(c, "Key")[len(full):] for c in root.iter(_NS + "Contents"))
            dirs.extend(_text(p, "Prefix")[len(full):].rstrip("/") for p in root.iter(_NS + "CommonPrefixes"))
            check_listing_size(full, len(files) + len(dirs) + pages)  # pages: empty ones must end too
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                break
            params = {**params, "continuation-token": token}
        return Listing(tuple(sorted(f for f in files if f)), tuple(sorted(d for d in dirs if d)))

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        if length <= 0:
            self._http.call("HEAD", self._key(key), "HEAD")
            return EmptyReader()
        return self._http.request("GET", self._key(key), "GET",
                                  headers={"range": f"bytes={start}-{start + length - 1}"})

    def head(self, key: str) -> dict[str, str]:
        def attempt() -> dict[str, str]:
            answer = self._http.request("HEAD", self._key(key), "HEAD", headers=CHECKSUM_MODE)
            answer.close()
            return {k.lower(): v for k, v in answer.response.getheaders()}

        return retry(attempt, REQUEST_BACKOFF)

    def _put_object(self, key: str, body: FileSlice, length: int) -> None:
        self._http.call("PUT", self._key(key), "PUT", body=body, length=length)

    def _create_multipart(self, key: str) -> str:
        return _text(ET.fromstring(self._http.call("POST", self._key(key), "upload", params={"uploads": ""})),
                     "UploadId")

    def _upload_part(self, key: str, upload_id: str, number: int, body: FileSlice, length: int) -> str:
        params = {"partNumber": str(number), "uploadId": upload_id}
        _, etag = self._http.call_with_etag("PUT", self._key(key), "upload part", params=params, body=body,
                                            length=length)
        return etag

    def _upload_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int, length: int) -> str:
        params = {"partNumber": str(number), "uploadId": upload_id}
        headers = {"x-amz-copy-source": self._copy_source(src_key),
                   "x-amz-copy-source-range": f"bytes={start}-{start + length - 1}"}
        answer = self._http.call("PUT", self._key(key), "copy part", params=params, headers=headers, body=b"")
        try:  # with S3's namespace or (SeaweedFS) without
            return next((e.text or "" for e in ET.fromstring(answer).iter() if e.tag.rpartition("}")[2] == "ETag"), "")
        except ET.ParseError:
            return ""

    def _complete_multipart(self, key: str, upload_id: str, etags: Sequence[tuple[int, str]]) -> None:
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in etags)
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        answer = self._http.call("POST", self._key(key), "complete upload", params={"uploadId": upload_id}, body=body)
        if b"<Error>" in answer:
            raise TransientError(f"{self._where(key)}: completing the upload failed")

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        self._http.call("DELETE", self._key(key), "abort upload", params={"uploadId": upload_id})

    def delete(self, key: str) -> None:
        with contextlib.suppress(NotFoundError):
            self._http.call("DELETE", self._key(key), "DELETE")

    def _copy_source(self, key: str) -> str:
        """The x-amz-copy-source of an object of this store: its bucket and URL-encoded key."""
        return f"/{self.bucket}/{uri_encode(self._key(key), safe='/')}"

    def copy(self, src_key: str, dst_key: str) -> None:
        self._http.call("PUT", self._key(dst_key), "COPY", headers={"x-amz-copy-source": self._copy_source(src_key)},
                        body=b"")
