"""What `prepare --anonymize` changes: subject ids become salted hashes, and no source path or folder name
reaches a shard or the manifest. The key from subject to id is written for the user outside the shards.

Without a salt, an id derived from a subject's name or files could be recomputed by anyone holding them;
a random salt per `prepare` (kept by the user with the key, or given with --salt) prevents that.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from hpcgan.data.inputs import Volume
from hpcgan.data.labels import is_table


def default_on(volumes: list[Volume], labels: str | None) -> bool:
    """On for DICOM (headers name patients) and for label tables (they list subjects or paths)."""
    return any(v.kind == "dicom" for v in volumes) or (labels is not None and is_table(labels))


def salt_for(work: Path, given: str | None) -> str:
    """The salt of this build: the given one, or a random one kept in the work folder for a resume."""
    path = work / "salt"
    if given is not None:
        return given
    if path.is_file():
        return path.read_text()
    salt = secrets.token_hex(16)
    path.write_text(salt)
    return salt


def subject_ids(volumes: list[Volume], salt: str) -> dict[str, str]:
    """Subject key -> "subj-" + a salted hash of it."""
    return {v.subject_key: "subj-" + hashlib.sha256(f"{salt}\0{v.subject_key}".encode()).hexdigest()[:12]
            for v in volumes}


def key_path(out: Path) -> Path:
    """Where the subject key goes: beside the shard folder, never in it (the shards may be shared)."""
    return out.parent / f"{out.name}.subjects.json"


def write_key(out: Path, salt: str, volumes: list[Volume], ids: dict[str, str]) -> Path:
    """subject (as the data names it: sub-01, a PatientID, else the file) -> its id, readable by the owner only."""
    subjects = {v.subject_name or v.display: ids[v.subject_key] for v in volumes}
    path = key_path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"salt": salt, "subjects": dict(sorted(subjects.items()))}, handle, indent=1)
    os.replace(tmp, path)
    return path
