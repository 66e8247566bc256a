"""Reading S3's answers, shared by both S3 engines: error codes -> our error family, object sizes."""

from __future__ import annotations

from agent.errors import AgentError, IntegrityError, NotFoundError, StoreError, ThrottledError, TransientError

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "TokenRefreshRequired", "Forbidden"}
_RETRYABLE = {"RequestTimeout", "InternalError"}
# botocore's throttling codes that S3-compatible stores use; S3 answers 503 (with no body on HEAD)
# for both SlowDown and ServiceUnavailable, and its advice for both is "reduce your request rate".
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "ServiceUnavailable", "RequestLimitExceeded",
              "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded"}
_THROTTLED_STATUS = {429, 503}


def store_error(code: str, status: int, where: str, action: str, bucket: str) -> AgentError:
    """One mapping from an S3 error code to our error family, shared by both S3 engines."""
    if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
        return NotFoundError(f"{where}: not found")
    if code == "NoSuchBucket":
        return StoreError(f"s3://{bucket}: bucket does not exist; check BT_CHECKPOINT_STORE")
    if code == "InvalidRange" or status == 416:
        return IntegrityError(f"{where}: shorter than the range asked for; the object changed after it was committed")
    if code in _DENIED or status == 403:
        return StoreError(
            f"{where}: access denied ({code or status}) on {action}; check the AWS credentials and their permissions"
        )
    kind: type[StoreError] = StoreError
    if code in _THROTTLED or status in _THROTTLED_STATUS:
        kind = ThrottledError
    elif status >= 500 or code in _RETRYABLE:
        kind = TransientError
    return kind(f"{where}: {action} failed with {code or status}")


def credentials_error(exc: Exception) -> StoreError:
    """botocore's credential errors quote config files and a credential_process's stderr, which may
    hold a secret: only the error's class is kept."""
    if type(exc).__name__ == "NoCredentialsError":
        return StoreError("no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    return StoreError(f"AWS credentials could not be loaded ({type(exc).__name__}); check AWS_PROFILE, "
                      "the AWS config and credentials files and any credential_process they name")


def content_range_size(header: str | None) -> int | None:
    """`bytes 0-99/1234` -> 1234; None when absent or the size is unknown (`*`)."""
    total = (header or "").rpartition("/")[2].strip()
    return int(total) if total.isdecimal() else None
