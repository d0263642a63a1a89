"""Model references to local directories: a path as is, a Hub id through `huggingface_hub` (the only network use)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergelib.errors import InputModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin"]


def is_hub_id(ref: str) -> bool:
    """True for `org/name` (no `..`, not absolute, not an existing local path)."""
    return bool(HUB_ID.match(ref)) and ".." not in ref and not Path(ref).exists()


def resolve_model(ref: str, revision: str | None = None) -> Path:
    """The local directory holding model `ref` (downloading a Hub id into the HF cache if needed)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if not is_hub_id(ref):
        raise InputModelError(f"model '{ref}': no such directory, and not a Hub id of the form org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except LocalEntryNotFoundError:
        where = f"@{revision}" if revision else ""
        if offline:
            raise InputModelError(
                f"model '{ref}{where}': not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it once with network access or point to a local directory"
            ) from None
        raise InputModelError(f"model '{ref}{where}': cannot reach the Hub and it is not cached") from None
    except RepositoryNotFoundError:
        raise InputModelError(f"model '{ref}': no such repository on the Hub (or it is private: log in)") from None
    except HfHubHTTPError as exc:
        raise InputModelError(f"model '{ref}': Hub request failed ({exc})") from None
