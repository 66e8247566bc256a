"""`ckpt-agent verify`: re-check a download folder against the manifests it was loaded from.

It takes no Context: it reads only the folder, so no store or other setting has to be valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.errors import IntegrityError
from ckpt_agent.load.readback import render_verify, summary, verify_folder
from ckpt_agent.report import Reporter


@dataclass(frozen=True)
class VerifyOptions:
    folder: Path
    as_json: bool = False


def verify(reporter: Reporter, options: VerifyOptions) -> int:
    report = verify_folder(options.folder, workers=os.cpu_count() or 2)
    print(render_verify(report, as_json=options.as_json), flush=True)
    if report.problems:
        raise IntegrityError(f"{summary(report)}; run `ckpt-agent load` to restore missing or changed "
                             "files, and remove extra ones before training from this folder")
    reporter.info(f"verified {summary(report)}", event="verified", download_folder=str(options.folder),
                  **report.counts())
    return 0
