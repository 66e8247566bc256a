"""The native S3 engine's transport: SigV4-signed requests over per-thread keep-alive
`http.client` connections (the store on top of it is s3native.py).

botocore spends CPU per request in its event machinery and copies every body through urllib3;
on a small node that shares its CPU with the network stack, that costs throughput (the engines
compared: docs/benchmarks.md). Here a request is one signature and one `readinto` straight from the socket into
our buffer. The AWS environment (credentials, region, endpoint, proxies) is read in awsenv.py.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Mapping
from typing import Any, BinaryIO

from ckpt_agent.errors import TransientError
from ckpt_agent.runtime.retry import retry
from ckpt_agent.stores.awsenv import ca_bundle, credentials_provider, resolve_endpoint
from ckpt_agent.stores.httpconn import ANSWER_LIMIT, Answer, Connections, Origin
from ckpt_agent.stores.s3common import REQUEST_BACKOFF, store_error
from ckpt_agent.stores.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, canonical_query, sign, uri_encode

_CODE = re.compile(rb"<Code>([^<]+)</Code>")
__all__ = ["ANSWER_LIMIT", "S3Http"]


class S3Http:
    """Signed requests over keep-alive connections (httpconn.py); small requests are retried here."""

    def __init__(self, bucket: str, env: Mapping[str, str], timeout: float) -> None:
        self._credentials, region = credentials_provider(env)
        self.bucket, self._env = bucket, env
        self._conns = Connections(env, timeout, ca_bundle(env))
        self._moved(region)

    def _moved(self, region: str) -> None:
        """Point at the bucket's region (first, or after S3 said the bucket lives elsewhere)."""
        self.endpoint = resolve_endpoint(self._env, self.bucket, region)

    def _path(self, key: str) -> str:
        encoded = uri_encode(key, safe="/")
        return f"/{self.bucket}/{encoded}" if self.endpoint.path_style else f"/{encoded}"

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def request(self, method: str, key: str, action: str, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: bytes | BinaryIO | None = None,
                length: int | None = None) -> Answer:
        """Send one request; raise our error for any non-2xx answer, leaving the body to the caller.

        S3 answers a request signed for the wrong region with the bucket's region in a header
        (301 PermanentRedirect, 400): botocore follows it once, and so do we."""
        for redirected in (False, True):
            signed_for = self.endpoint.region
            response = self._send(method, key, action, params, headers, body, length)
            region = response.header("x-amz-bucket-region") or None
            if redirected or response.status not in (301, 307, 400) or region in (None, signed_for):
                break
            response.discard(0)
            assert region is not None
            if region != self.endpoint.region:
                self._moved(region)
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
        if response.status >= 300:
            match = _CODE.search(response.discard())
            code = match.group(1).decode(errors="replace") if match else ""
            raise store_error(code, response.status, self.where(key), action, self.bucket)
        return response

    def _send(self, method: str, key: str, action: str, params: dict[str, str] | None,
              headers: dict[str, str] | None, body: bytes | BinaryIO | None,
              length: int | None) -> Answer:
        query = canonical_query(params or {})
        path = self._path(key)
        signed = sign(method, self.endpoint.host_header, path, query, self._credentials(), self.endpoint.region,
                      payload_hash=UNSIGNED_PAYLOAD if body is not None else EMPTY_SHA256,
                      extra_headers={k: v for k, v in (headers or {}).items() if k.startswith("x-amz-")})
        all_headers = {**signed, **(headers or {})}
        if isinstance(body, bytes):
            all_headers["content-length"] = str(len(body))
        elif body is not None:  # a stream: its caller knows the length
            all_headers["content-length"] = str(length)
        try:
            return self._conns.send(Origin.of(self.endpoint), method, f"{path}?{query}" if query else path,
                                    all_headers, body)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{self.where(key)}: {action} failed ({type(exc).__name__}); "
                                 "check AWS_ENDPOINT_URL, the proxy variables and the network") from None

    def call(self, method: str, key: str, action: str, **kw: Any) -> bytes:
        """A whole small request with its body read, retried with backoff on transient errors."""
        return self.call_with_etag(method, key, action, **kw)[0]

    def call_with_etag(self, method: str, key: str, action: str, limit: int | None = ANSWER_LIMIT,
                       **kw: Any) -> tuple[bytes, str]:
        def attempt() -> tuple[bytes, str]:
            response = self.request(method, key, action, **kw)
            try:
                return response.read_all(limit, key or self.where("")), response.header("ETag")
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{self.where(key)}: {action} body failed ({type(exc).__name__})") from None
            finally:
                response.close()

        def rewind() -> None:
            body = kw.get("body")
            if body is not None and not isinstance(body, bytes):
                body.seek(0)

        return retry(attempt, REQUEST_BACKOFF, before_retry=rewind)
