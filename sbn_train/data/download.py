"""Source files of a dataset under ``<data_dir>/<name>/raw/``: used if present (after verification),
downloaded if missing.  A user without network access can place the files there by hand."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import urllib.request
from typing import Mapping

from .cache import create_temp_beside, file_digest
from .common import DataError, one_line

log = logging.getLogger(__name__)


def ensure_raw_files(
    dataset: str,
    raw_dir: str,
    files: Mapping[str, tuple[str, str | None]],
    algorithm: str,
    timeout: float,
) -> dict[str, str]:
    """Make sure each ``filename -> (url, expected digest or None)`` is in ``raw_dir``.

    Files already present are verified, never re-downloaded: a mismatch is a
    :class:`DataError`.  Missing files are downloaded (to a temporary name,
    verified, then renamed); a failed download raises at once, naming every
    file still missing and the directory to put it in.
    """
    os.makedirs(raw_dir, exist_ok=True)
    paths = {f: os.path.join(raw_dir, f) for f in files}
    missing = [f for f, p in paths.items() if not os.path.exists(p)]
    for filename in list(missing):
        url, expected = files[filename]
        try:
            download_file(url, paths[filename], timeout, algorithm, expected)
        except OSError as exc:
            raise DataError(
                f"{dataset}: cannot download {url} ({type(exc).__name__}: {one_line(exc)}). "
                f"Missing file(s): {', '.join(missing)}. Download them by hand and put them "
                f"in {raw_dir}"
            ) from exc
        missing.remove(filename)
    for filename, (_, expected) in files.items():
        if expected is None:
            continue
        got = file_digest(paths[filename], algorithm)
        if got != expected:
            raise DataError(
                f"{dataset}: {algorithm} checksum mismatch for {paths[filename]}: expected "
                f"{expected}, got {got}. The file is corrupt or not the official one; delete "
                "it to download it again, or replace it with the official file"
            )
    return paths


def download_file(url: str, dest: str, timeout: float, algorithm: str, expected: str | None) -> None:
    """Download ``url`` to ``dest`` through a temporary file, checking its digest before the rename."""
    directory = os.path.dirname(dest)
    fd, tmp = create_temp_beside(dest, ".part")
    try:
        with os.fdopen(fd, "wb") as out:
            log.info("downloading %s", url)
            # Looked up on the module at call time, so that tests can stand in for the network.
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
        if expected is not None:
            got = file_digest(tmp, algorithm)
            if got != expected:
                raise DataError(
                    f"downloaded {url} has {algorithm} {got}, expected {expected}; the server "
                    f"sent a different file. Retry later or place the official file in {directory}"
                )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
