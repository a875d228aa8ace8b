"""Where things are: local paths and URIs, a manifest ``uri`` resolved against its image
root, and values made safe as file names. The one home of these helpers; no I/O here.
"""

from __future__ import annotations

import hashlib
import os
import re
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
    or the folder a glob starts in. Local folders are made absolute."""
    head = manifest.split("*")[0].split("?")[0].split("[")[0]  # up to the first glob character
    if head.endswith(".parquet"):
        folder = os.path.dirname(head)
    elif head != manifest:
        folder = head.rsplit("/", 1)[0] if "/" in head else ""
    else:
        folder = manifest.rstrip("/")
    return folder if has_scheme(manifest) else os.path.abspath(folder or ".")


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
