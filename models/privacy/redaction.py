"""Credentials out of anything fedrec logs: a URI keeps its scheme, user, host, path and query
keys, but never a password or a secret-looking query value.

A tracking URI such as ``postgresql://fedrec:s3cret@db/mlflow`` or an object-store URL with
``?X-Amz-Signature=...`` would otherwise end up in MLflow params, ``config.json``, the Prefect
artifact and log lines, where every reader of those sees it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query keys whose values are secrets, matched as substrings of the lower-cased key
# (token, access_token, X-Amz-Signature, sig, password, client_secret, api_key, sas, ...).
_SECRET_KEYS = ("token", "passw", "pwd", "secret", "key", "sig", "auth", "credential", "sas")

# user:password@ after a scheme, for strings urlsplit cannot parse.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@?#\s]*):[^@/?#\s]*@")


def _is_secret(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEYS)


def redact_uri(uri: str) -> str:
    """The URI with its password and secret query values replaced by ``***``.

    Parameters
    ----------
    uri : str
        Any string that may be a URI (a plain path comes back unchanged).

    Returns
    -------
    str
        ``scheme://user:***@host/path?token=***&other=value``: the password in the authority,
        and the value of every query parameter whose key names a secret (``token``, ``password``,
        ``secret``, ``key``, ``sig``, ``auth``, ``credential``, ``sas``), are masked; everything
        else is kept so the URI still says where the store is.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. a malformed IPv6 host: fall back to masking the userinfo alone
        return _USERINFO.sub(rf"\g<head>:{MASK}@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if has_password else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _is_secret(k) else v) for k, v in pairs], safe="*")
    redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # urlunsplit normalises some spellings (e.g. an empty query "?"): keep the original when
    # there was nothing to mask.
    return uri if (netloc == parts.netloc and query == parts.query) else redacted


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it redacted as
    :func:`redact_uri` does."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+", lambda m: redact_uri(m.group(0)), text)
