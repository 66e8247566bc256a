"""A fault-injecting HTTP/1.1 proxy for tests: client (boto3) -> FaultProxy -> S3 server.

Standalone (no pytest import). Listens on 127.0.0.1 only, on a free port, and forwards to an
upstream on 127.0.0.1 only. One daemon thread per client connection. Modules: wire (HTTP
framing), conn (one client connection), ledger (rules and accounting), proxy (accept, forward).

HTTP handling:
  * Client side keeps HTTP/1.1 keep-alive: request line + headers + body (Content-Length, or
    Transfer-Encoding: chunked passed through raw). ``Expect: 100-continue`` is answered by the
    proxy itself (and the header is dropped upstream), so botocore does not wait a second.
  * Upstream side: a NEW connection per request, sent with ``Connection: close`` (no stale
    keep-alive to upstream, and a restart of upstream never poisons a pooled connection). All
    other request headers, including Host, go unchanged, so SigV4 signatures (which cover
    Host=127.0.0.1:PROXYPORT) still verify.
  * Response bodies are decoded to payload bytes: Content-Length bodies are forwarded as they
    are; chunked bodies are re-chunked (one chunk per piece received; trailers dropped); bodies
    delimited by EOF are forwarded and the client connection is then closed. Offsets, byte
    counts and faults below always refer to payload bytes, never to chunk framing.

Faults are rules (``add_rule``), matched in the order added against method, a substring of
the request target (raw or percent-decoded) and optionally "GET with a Range header". Every
matching rule counts the request as ``seen``; the first matching rule with fires left fires
(at most one fault per request) and uses up one of its ``count`` fires (``count=None``: forever;
``count=0``: never fires, a pure per-rule counter). A rule fires on match even if the body turns
out shorter than its offset; the response then passes through intact. Kinds:

  reset     RST the client connection (SO_LINGER 0) once ``offset`` payload bytes were sent;
            ``offset=0``: reset right after reading the request head, before contacting
            upstream (so e.g. a PUT never reaches the server).
  truncate  Send the headers (original Content-Length) and ``offset`` payload bytes, then FIN.
  stall     Send the headers and ``offset`` payload bytes, then send nothing for ``seconds``
            with the socket open, then FIN.
  status    Answer ``status`` (default 503) with an S3 XML error body without contacting
            upstream: 503 -> SlowDown, 500 -> InternalError, others need ``error_code``.
  corrupt   XOR 0xFF the payload byte at ``offset``; Content-Length and headers unchanged.

``pause_upstream(seconds)`` simulates a restarted server: connections in flight (and idle
keep-alive ones) are reset, and for ``seconds`` every new connection or request is reset too
(botocore reports EndpointConnectionError / ConnectionClosedError, both retryable). If the real
upstream is unreachable the client connection is reset as well.

Every blocking socket call wakes every 0.2 s to notice stop()/pause and gives up after
``timeout`` (default 30 s); stop() ends all threads within about a second.

Usage::

    server = start_seaweed(tmp)
    with FaultProxy("127.0.0.1", server.s3_port) as proxy:
        env = {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
        proxy.add_rule("reset", method="GET", path="ckpt/shard-0", offset=1 << 20)
        proxy.add_rule("status", path="ckpt/", status=503, count=2)
        ...run the agent with env...
        assert proxy.body_bytes("GET", "ckpt/shard-0") < 2 * SHARD_SIZE

Accounting: ``stats`` (overall), ``rule.seen / fired / body_bytes`` (per rule), and the
``exchanges`` log with ``body_bytes(method, path)`` / ``requests(method, path)`` helpers.
``body_bytes`` counts payload bytes of upstream responses written to the client
socket (synthetic ``status`` bodies are not counted); ``sent_bytes(method, path)`` the request
body bytes forwarded upstream (uploads).
"""

from tests.support.faultproxy.ledger import KINDS, Exchange, ProxyStats, Rule
from tests.support.faultproxy.proxy import LOOPBACK, FaultProxy
from tests.support.faultproxy.wire import ProtocolError

__all__ = ["KINDS", "LOOPBACK", "Exchange", "FaultProxy", "ProtocolError", "ProxyStats", "Rule"]
