"""Credentials never belong in a config: URIs that carry them are refused up front
(:func:`credential_problems`), and every persisted copy of a config goes through
:func:`redact` as a second line of defence (config.yaml, the run card, checkpoints'
trainer_state.json, data manifests, W&B).
"""
from __future__ import annotations

import re
from typing import Any, List

# scheme://user[:password]@host/...  (s3://KEY:SECRET@bucket, https://token@host)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# query parameters that are credentials (presigned URLs, SAS tokens, API keys)
_SECRET_PARAMS = re.compile(
    r"(?P<key>[?&](?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
    r"|signature|sig|token|access_?token|api_?key|secret|password|awsaccesskeyid))=(?P<value>[^&#\s]*)",
    re.IGNORECASE)
MASK = "***"


def redact_text(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m.group('key')}={MASK}", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with credentials in URIs masked."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def credential_problems(obj: Any, prefix: str = "") -> List[str]:
    """One message per config value (dotted key) that carries credentials."""
    out: List[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += credential_problems(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += credential_problems(v, f"{prefix}[{i}]")
    elif isinstance(obj, str) and redact_text(obj) != obj:
        out.append(f"{prefix}: '{redact_text(obj)}' carries credentials in the URI, which would be "
                   "written to config.yaml, run cards, checkpoints and W&B; pass them through the "
                   "environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                   "GOOGLE_APPLICATION_CREDENTIALS) or an instance profile / service account")
    return out
