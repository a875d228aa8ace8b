"""Where things are: local paths and URIs, a manifest ``uri`` resolved against its image
root, locations joined and shown (secrets redacted), and values made safe as file names.
The one home of these helpers; no I/O here.

A URI's query (``?endpoint_override=127.0.0.1:9000&scheme=http``) belongs to the whole
location: every location derived from a URI (its folder, a file under it) keeps it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import PurePath
from urllib.parse import quote, urlsplit, urlunsplit

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_HASH_CHARS = 16


def has_scheme(uri: str) -> bool:
    """True for ``scheme://...`` URIs (s3://, gs://, file://, ...), False for plain paths."""
    return bool(_SCHEME.match(uri))


def default_image_root(manifest: str) -> str:
    """The folder relative uris resolve against unless --image-root says otherwise: the
    manifest file's folder, the manifest itself when it is a directory of Parquet files,
    or the folder a glob starts in. Local folders are made absolute; a URI keeps its query
    (``?`` starts the query there, it is a glob character only in local paths)."""
    if has_scheme(manifest):
        parts = urlsplit(manifest)
        return urlunsplit(parts._replace(path=_glob_folder(parts.path, "*["), fragment=""))
    return os.path.abspath(_glob_folder(manifest, "*?[") or ".")


def _glob_folder(path: str, glob_characters: str) -> str:
    """The folder of a Parquet file, a directory or the start of a glob."""
    head = re.split(f"[{re.escape(glob_characters)}]", path, maxsplit=1)[0]
    if head.endswith(".parquet"):
        return os.path.dirname(head)
    if head != path:
        return head.rsplit("/", 1)[0] if "/" in head else ""
    return path.rstrip("/")


def join_location(location: str, *names: str) -> str:
    """``location/name/...`` for a local path or a URI; a URI keeps its query after the path
    (``s3://b/run?endpoint_override=h:9000`` + ``results`` -> ``s3://b/run/results?endpoint_override=h:9000``)."""
    if not has_scheme(location):
        return os.path.join(location, *names)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *names])))


def location_name(location: str) -> str:
    """The last name of a local path or of a URI's path (its query left out); "" for none."""
    if has_scheme(location):
        return urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1]
    return PurePath(location).name


def resolve_uri(uri: str, image_root: str | None) -> str:
    """The absolute local path or URI of a manifest ``uri``.

    URIs with a scheme and absolute local paths pass through unchanged. A relative path is
    joined to ``image_root``: a local directory (made absolute here, on the driver) or a URI
    prefix (the relative path is then percent-encoded). Raises ValueError for an empty uri
    or a relative one without a root.
    """
    if not uri:
        raise ValueError("empty uri")
    if has_scheme(uri) or os.path.isabs(uri):
        return uri
    if not image_root:
        raise ValueError(f"relative uri {uri!r} needs an image root (none given)")
    while uri.startswith("./"):
        uri = uri[2:]
    if has_scheme(image_root):  # the path goes before the root's query (?endpoint_override=...)
        parts = urlsplit(image_root)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + quote(uri, safe="/")))
    return os.path.join(os.path.abspath(os.path.expanduser(image_root)), uri)


# --- secrets -------------------------------------------------------------------------------

REDACTED = "***"
CREDENTIALS_REFUSED = "credentials in a manifest uri are refused: configure the filesystem"
# query parameters that carry a secret: AWS/GCS signed URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token, X-Goog-Signature), Azure SAS (sig), keys, tokens, passwords
_SECRET_PARAMETER = re.compile(r"secret|token|passw|pwd|signature|credential|access_?key|api_?key|"
                               r"private_?key|^sig$|^key$|^auth", re.IGNORECASE)
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")
_PARAMETER = re.compile(r"(?<=[?&;])([^=&#\s]+)=([^&#\s'\"]*)")


class CredentialsInUri(ValueError):
    """A manifest uri names credentials (user info, or a secret in its query)."""


def redact(text: str) -> str:
    """``text`` with the secrets of every URI in it replaced by ``***``: user info
    (``s3://KEY:SECRET@bucket/x`` -> ``s3://***@bucket/x``) and the values of credential-like
    query parameters (``?X-Amz-Signature=...``, ``token=``, ``password=``, ...). Works on a
    URI or on a message that quotes one; anything else is returned unchanged."""
    text = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    return _PARAMETER.sub(lambda m: f"{m.group(1)}={REDACTED}"
                          if _SECRET_PARAMETER.search(m.group(1)) and m.group(2) else m.group(0), text)


def check_no_credentials(uri: str) -> None:
    """Raise CredentialsInUri when a manifest ``uri`` carries credentials: data never chooses
    them (pyarrow would use an s3:// URI's user info as the keys)."""
    if has_scheme(uri) and redact(uri) != uri:  # a local path names no credentials
        raise CredentialsInUri(CREDENTIALS_REFUSED)


def resolve_manifest_uri(uri: str, image_root: str | None) -> str:
    """:func:`resolve_uri` of a uri read from a manifest, refused (CredentialsInUri) when it
    carries credentials."""
    check_no_credentials(uri)
    return resolve_uri(uri, image_root)


def safe_name(value: str, max_length: int = 100) -> str:
    """``value`` made safe as a file name: only ``[A-Za-z0-9._-]``, never empty or dot-led.

    Unchanged when already safe and at most ``max_length`` long. Otherwise unsafe
    characters become ``_``, a leading ``.`` becomes ``_``, the name is cut to fit and a
    hash of the original value is appended (``name_<16 hex>``), so distinct values keep
    distinct names.
    """
    if max_length < 2 * (_HASH_CHARS + 1):
        raise ValueError(f"max_length must be at least {2 * (_HASH_CHARS + 1)}, got {max_length}")
    name = _UNSAFE_CHARS.sub("_", value)
    if name.startswith("."):
        name = "_" + name[1:]
    if name and name == value and len(name) <= max_length:
        return name
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{name[:max_length - _HASH_CHARS - 1]}_{digest}"
