"""The signer against the examples AWS publishes in "Signature Calculations for the Authorization
Header: Transferring Payload in a Single Chunk" (Amazon S3 API Reference,
https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html, "Examples:
Signature Calculations"). Every expected string below is copied from that page, not computed here.
"""

from datetime import UTC, datetime

from ckpt_agent.stores.sigv4 import EMPTY_SHA256, Credentials, canonical_query, sign, uri_encode

EXAMPLE_CREDENTIALS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_HOST = "examplebucket.s3.amazonaws.com"
EXAMPLE_TIME = datetime(2013, 5, 24, tzinfo=UTC)
SCOPE = "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"
# sha256("Welcome to Amazon S3."), as the page gives it for the PUT example
WELCOME_SHA256 = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"


def signed(method: str, path: str, query: str = "", payload_hash: str = EMPTY_SHA256,
           headers: dict[str, str] | None = None) -> str:
    return sign(method, EXAMPLE_HOST, path, query, EXAMPLE_CREDENTIALS, "us-east-1",
                payload_hash=payload_hash, now=EXAMPLE_TIME, extra_headers=headers)["authorization"]


def test_get_object_with_a_range_matches_the_published_signature():
    assert signed("GET", "/test.txt", headers={"Range": "bytes=0-9"}) == (
        f"AWS4-HMAC-SHA256 {SCOPE}, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_put_object_with_an_encoded_key_and_signed_payload_matches_the_published_signature():
    headers = {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"}
    path = "/" + uri_encode("test$file.text", safe="/")
    assert signed("PUT", path, payload_hash=WELCOME_SHA256, headers=headers) == (
        f"AWS4-HMAC-SHA256 {SCOPE}, "
        "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class, "
        "Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
    )


def test_get_bucket_lifecycle_with_a_valueless_query_parameter_matches_the_published_signature():
    assert signed("GET", "/", canonical_query({"lifecycle": ""})) == (
        f"AWS4-HMAC-SHA256 {SCOPE}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, "
        "Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    )


def test_list_objects_with_query_parameters_sorted_matches_the_published_signature():
    assert signed("GET", "/", canonical_query({"prefix": "J", "max-keys": "2"})) == (
        f"AWS4-HMAC-SHA256 {SCOPE}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, "
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_a_session_token_is_signed_so_it_cannot_be_swapped_in_flight():
    with_token = Credentials(EXAMPLE_CREDENTIALS.access_key, EXAMPLE_CREDENTIALS.secret_key, "token")
    headers = sign("GET", EXAMPLE_HOST, "/test.txt", "", with_token, "us-east-1", now=EXAMPLE_TIME)
    assert headers["x-amz-security-token"] == "token"
    assert "x-amz-security-token" in headers["authorization"].split("SignedHeaders=")[1].split(",")[0]


def test_the_secret_never_appears_in_the_credentials_repr():
    assert EXAMPLE_CREDENTIALS.secret_key not in repr(EXAMPLE_CREDENTIALS)
