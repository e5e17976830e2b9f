"""Hub ids (``user/repo``) for checkpoints and models, resolved through huggingface_hub's cache.

A path that exists locally is always a path. Otherwise an id of the form ``owner/name`` is fetched with
``snapshot_download`` into (or, offline — ``HF_HUB_OFFLINE=1`` — read from) the cache, and the folder it gives
is used as a local one; ``subfolder`` and ``revision`` are as on the hub.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from .errors import CheckpointError

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(reference: str) -> bool:
    return bool(_ID.match(reference)) and ".." not in reference and not reference.endswith((".json", ".safetensors"))


def resolve(
    reference: str,
    local: Path,
    field: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
) -> Path:
    """``local`` when it exists (and no revision is asked), else the hub id ``reference`` from the cache."""
    if revision is None and local.exists():
        return local / subfolder if subfolder else local
    if not is_hub_id(reference):
        return local / subfolder if subfolder else local
    offline = bool(constants.HF_HUB_OFFLINE)
    at = f"{reference!r}" + (f" at revision {revision!r}" if revision else "")
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    try:
        folder = Path(
            snapshot_download(reference, revision=revision, allow_patterns=patterns, local_files_only=offline)
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{field}: hub id {at} is not in the cache ({constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE is set" if offline else " and the hub cannot be reached")
            + f"; download it there first, or give a local path (no local {str(local)!r} either)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise CheckpointError(f"{field}: hub id {at}: {error}") from None
    target = folder / subfolder if subfolder else folder
    if not target.exists():
        raise CheckpointError(f"{field}: hub id {at} has no subfolder {subfolder!r} in its snapshot ({folder})")
    return target
