"""The load-spec JSON the tests hand to `ckpt-agent`, in the shapes truss_train writes."""

from __future__ import annotations

import json
from pathlib import Path


def spec(folder: Path, *refs: dict) -> str:
    return json.dumps({"enabled": True, "checkpoints": list(refs), "download_folder": str(folder)})


def latest(project: str | None = None, job_id: str | None = None) -> dict:
    return {"typ": "baseten_latest_checkpoint", "project_name": project, "job_id": job_id}


def named(name: str, job_id: str) -> dict:
    return {"typ": "baseten_named_checkpoint", "checkpoint_name": name, "job_id": job_id}
