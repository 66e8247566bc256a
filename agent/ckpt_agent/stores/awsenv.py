"""The standard AWS environment, read as botocore reads it, for the native S3 engine.

Region (AWS_REGION, AWS_DEFAULT_REGION, then the config file's), endpoint, proxies
(HTTPS_PROXY/HTTP_PROXY/NO_PROXY), the CA bundle and credentials. botocore is imported only when the
credentials are not plain environment variables.
"""

from __future__ import annotations

import base64
import configparser
import os
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ckpt_agent.config.settings import PROXY_VARS
from ckpt_agent.errors import ConfigError, StoreError
from ckpt_agent.stores.s3common import credentials_error
from ckpt_agent.stores.sigv4 import Credentials


def host_header(host: str, port: int) -> str:
    """The Host a request names (and SigV4 signs): the port only when it is not a default one."""
    return host if port in (80, 443) else f"{host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path_style: bool
    region: str

    @property
    def host_header(self) -> str:
        return host_header(self.host, self.port)


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    headers: dict[str, str]  # Proxy-Authorization, when the proxy URL carries a user


def _config_file_region(env: Mapping[str, str]) -> str | None:
    """botocore takes the region from the config file's default profile even when the keys are in
    the environment; so must we, or we sign for the wrong region."""
    path = env.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser.get("default", "region", fallback=None) or None


def credentials_provider(env: Mapping[str, str]) -> tuple[Callable[[], Credentials], str]:
    """(a callable giving current credentials, the region), without botocore when env has both keys."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    if key and secret and not env.get("AWS_PROFILE"):
        static = Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
        return (lambda: static), region or _config_file_region(env) or "us-east-1"
    import botocore.session
    from botocore.exceptions import BotoCoreError, NoCredentialsError

    try:
        session = botocore.session.Session()
        found = session.get_credentials()
        region = region or session.get_config_variable("region")
    except BotoCoreError as exc:
        raise credentials_error(exc) from None
    if found is None:
        raise credentials_error(NoCredentialsError())

    def current() -> Credentials:
        try:
            frozen = found.get_frozen_credentials()
        except BotoCoreError as exc:  # a refresh: credential_process, SSO, IMDS
            raise credentials_error(exc) from None
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    return current, region or "us-east-1"


def ca_bundle(env: Mapping[str, str]) -> str | None:
    """AWS_CA_BUNDLE, the certificates to trust for an HTTPS endpoint (None: the system's)."""
    return env.get("AWS_CA_BUNDLE") or None


def resolve_endpoint(env: Mapping[str, str], bucket: str, region: str) -> Endpoint:
    """A custom endpoint (AWS_ENDPOINT_URL[_S3]) is path-style; AWS itself is virtual-hosted."""
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError("AWS_ENDPOINT_URL: expected http(s)://host[:port]")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Endpoint(parts.scheme, parts.hostname, port, True, region)
    if "." in bucket:
        return Endpoint("https", f"s3.{region}.amazonaws.com", 443, True, region)
    return Endpoint("https", f"{bucket}.s3.{region}.amazonaws.com", 443, False, region)


def proxy_for(env: Mapping[str, str], endpoint: Endpoint) -> Proxy | None:
    """The proxy botocore would use for this endpoint: `<scheme>_proxy` unless NO_PROXY exempts the host."""
    # Sorted, upper case comes first, so the lower-case variable wins as it does in urllib and botocore.
    found = {k.lower(): v for k, v in sorted(env.items()) if k.lower() in PROXY_VARS}
    url = found.get(f"{endpoint.scheme}_proxy")
    if not url or urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]  # missing from typeshed
            endpoint.host_header, {"no": found.get("no_proxy", "")}):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"{endpoint.scheme.upper()}_PROXY: expected http://host:port "
                          "(or use CKPT_AGENT_S3_ENGINE=boto3 for other proxies)")
    headers = {}
    if parts.username is not None:
        user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, headers)
