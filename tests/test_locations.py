"""Locations: derived locations keep a URI's query; secrets are redacted wherever a uri is shown."""
import pytest

from embcam.data.locations import (
    CREDENTIALS_REFUSED,
    CredentialsInUri,
    check_no_credentials,
    default_image_root,
    join_location,
    location_name,
    redact,
    resolve_manifest_uri,
)
from embcam.job.stages import reason

Q = "?endpoint_override=127.0.0.1:9000&scheme=http"


@pytest.mark.parametrize("text, shown", [
    ("s3://AKIA:secret@bucket/x", "s3://***@bucket/x"),
    ("https://user:pass@host/x", "https://***@host/x"),
    ("gs://token@bucket/a/b.jpg", "gs://***@bucket/a/b.jpg"),
    (f"s3://KEY:SECRET@bucket/x.jpg{Q}", f"s3://***@bucket/x.jpg{Q}"),
    ("s3://b/k?access_key=AKIA&secret_key=s3cr3t&region=eu-west-1",
     "s3://b/k?access_key=***&secret_key=***&region=eu-west-1"),
    ("https://h/x.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101&X-Amz-Date=20240101T000000Z"
     "&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123&X-Amz-Security-Token=tok",
     "https://h/x.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z"
     "&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/x.jpg?sv=2022-11-02&sig=AbC%3D",
     "https://acct.blob.core.windows.net/c/x.jpg?sv=2022-11-02&sig=***"),
    ("https://h/x?token=t&password=p&session_token=s&Signature=g&AWSAccessKeyId=a&X-Goog-Signature=z",
     "https://h/x?token=***&password=***&session_token=***&Signature=***&AWSAccessKeyId=***&X-Goog-Signature=***"),
    # in a message, quoted or not, among other text
    ("cannot read 's3://k:s@b/x.jpg' (3 attempts): timed out",
     "cannot read 's3://***@b/x.jpg' (3 attempts): timed out"),
    ("image: FetchError: cannot read https://h/x?token=abc (403)",
     "image: FetchError: cannot read https://h/x?token=*** (403)"),
    # nothing secret: unchanged
    (f"s3://bucket/run{Q}", f"s3://bucket/run{Q}"),
    ("gs://bucket/someone@example.com.jpg", "gs://bucket/someone@example.com.jpg"),
    ("/data/images/a@b.jpg", "/data/images/a@b.jpg"),
    ("write to me@example.com", "write to me@example.com"),
    ("s3://b/k?token=", "s3://b/k?token="),
])
def test_redact(text, shown):
    assert redact(text) == shown


def test_credentials_in_a_manifest_uri_are_refused():
    for uri in ("s3://AKIAFAKE:supersecret@bucket/x.jpg", "https://user:pass@host/x.jpg",
                "s3://bucket/x.jpg?session_token=abc", "https://h/x.jpg?X-Amz-Signature=abc"):
        with pytest.raises(CredentialsInUri, match=CREDENTIALS_REFUSED):
            resolve_manifest_uri(uri, "/root")
        # an error row's reason says why, and never the secret
        try:
            check_no_credentials(uri)
        except CredentialsInUri as exc:
            assert reason("image", exc) == f"image: CredentialsInUri: {CREDENTIALS_REFUSED}"
    assert resolve_manifest_uri("a/b.jpg", f"s3://bucket/img{Q}") == f"s3://bucket/img/a/b.jpg{Q}"
    assert resolve_manifest_uri("s3://bucket/x@y.jpg", None) == "s3://bucket/x@y.jpg"
    assert resolve_manifest_uri("x&token=1.jpg", "/root") == "/root/x&token=1.jpg"  # a local name, no query


def test_error_reasons_are_redacted_before_they_are_cut():
    message = "cannot read s3://KEY:" + "s" * 400 + "@bucket/x.jpg"
    assert reason("image", OSError(message)) == "image: OSError: cannot read s3://***@bucket/x.jpg"


def test_derived_locations_keep_the_query():
    assert default_image_root(f"s3://bucket/cat/manifest.parquet{Q}") == f"s3://bucket/cat{Q}"
    assert default_image_root(f"s3://bucket/cat/{Q}") == f"s3://bucket/cat{Q}"
    assert default_image_root(f"s3://bucket/cat/*.parquet{Q}") == f"s3://bucket/cat{Q}"
    assert default_image_root(f"gs://bucket/cat/part-[0-9].parquet{Q}") == f"gs://bucket/cat{Q}"
    assert default_image_root("s3://bucket/cat/manifest.parquet") == "s3://bucket/cat"
    assert default_image_root("/data/m?.parquet") == "/data"  # ? is a glob character in a local path
    assert join_location(f"s3://bucket/run{Q}", "results") == f"s3://bucket/run/results{Q}"
    assert join_location(f"s3://bucket/run/{Q}", "sanity", "a.png") == f"s3://bucket/run/sanity/a.png{Q}"
    assert join_location("runs/r1", "results") == "runs/r1/results"
    assert location_name(f"s3://bucket/runs/r1/{Q}") == "r1"
    assert location_name("runs/r1/") == "r1" and location_name(".") == ""
