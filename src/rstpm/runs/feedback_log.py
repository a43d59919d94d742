"""RUN/feedback.jsonl: the operator's verdict corrections, an append-only, verified log.

Each line is one image an operator judged: ``verdict`` (``good``: e.g. a false alarm confirmed
good; ``defect``: e.g. a missed defect), the image's name and the sha256 of its bytes, the
run's scores of it per calibrated variant and what the run had said (``predicted``), where it
came from (``cli`` or ``serve``) and when. Lines are only ever appended (under an exclusive file
lock, so the CLI and a server can write to one run), never rewritten.

Verification: every line carries ``chain``, the sha256 of the previous line's chain and of this
line's content, and ``RUN/feedback.head`` (written atomically after each append) holds the
number of lines and the last chain. Reading checks both, so a line that was edited, removed,
reordered or cut off is a one-line error naming the line; what the log cannot show is a forger
who rewrites the log and the head consistently (there is no signature).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rstpm.runs.files import RunError, atomic_write_json

FEEDBACK_FILE = "feedback.jsonl"
HEAD_FILE = "feedback.head"
VERDICTS = ("good", "defect")
GENESIS = "0" * 64
"""The chain value before the first line."""
ENTRY_FIELDS = ("verdict", "image", "sha256", "scores", "predicted", "source", "time")


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps({k: entry[k] for k in ENTRY_FIELDS}, sort_keys=True).encode()


def chain_of(previous: str, entry: dict[str, Any]) -> str:
    """The chain value of ``entry`` after a line whose chain is ``previous``."""
    return hashlib.sha256(previous.encode() + b"\n" + _canonical(entry)).hexdigest()


def make_entry(
    verdict: str,
    image: str,
    digest: str,
    scores: dict[str, float],
    predicted: dict[str, str | None],
    source: str,
) -> dict[str, Any]:
    """One line's content (without its chain).

    Raises:
        ValueError: a verdict other than good or defect.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    return {
        "verdict": verdict,
        "image": image,
        "sha256": digest,
        "scores": scores,
        "predicted": predicted,
        "source": source,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def image_digest(data: bytes) -> str:
    """The sha256 of an image's bytes, as the log records it."""
    return hashlib.sha256(data).hexdigest()


def _parse(run_dir: Path, text: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / FEEDBACK_FILE
    entries, previous = [], GENESIS
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
            expected = chain_of(previous, entry)
        except (ValueError, KeyError, TypeError) as error:
            raise RunError(
                f"{path} line {number} is damaged ({error}); the log is append-only: restore it"
            ) from error
        if entry.get("chain") != expected:
            raise RunError(
                f"{path} line {number} was edited, removed or reordered (its chain does not "
                "follow the line before); the log is append-only: restore it"
            )
        entries.append(entry)
        previous = expected
    return entries


def _check_head(run_dir: Path, entries: Sequence[dict[str, Any]]) -> None:
    head_path = Path(run_dir) / HEAD_FILE
    if not head_path.is_file():
        if entries:
            raise RunError(f"{head_path} is missing beside a non-empty log; restore it")
        return
    try:
        head = json.loads(head_path.read_text())
        count, last = int(head["lines"]), str(head["chain"])
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(f"{head_path} is damaged ({error}); restore it") from error
    actual = entries[-1]["chain"] if entries else GENESIS
    if count != len(entries) or last != actual:
        raise RunError(
            f"{Path(run_dir) / FEEDBACK_FILE} has {len(entries)} verified lines but "
            f"{head_path} records {count}: lines were removed or cut off; restore the log"
        )


def read_feedback(run_dir: Path) -> list[dict[str, Any]]:
    """Every entry of the run's log, verified ([] when the run has none).

    Raises:
        RunError: a damaged, edited or truncated log (one line naming the line).
    """
    path = Path(run_dir) / FEEDBACK_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    entries = _parse(run_dir, text)
    _check_head(run_dir, entries)
    return entries


def append_feedback(run_dir: Path, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append ``entries`` (from :func:`make_entry`) to the run's log; returns them with their
    chains. The log is verified first, under an exclusive lock held until the head is written.

    Raises:
        RunError: the existing log does not verify (nothing is appended).
    """
    run_dir = Path(run_dir)
    path = run_dir / FEEDBACK_FILE
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            existing = _parse(run_dir, handle.read())
            _check_head(run_dir, existing)
            previous = existing[-1]["chain"] if existing else GENESIS
            written = []
            for entry in entries:
                line = {k: entry[k] for k in ENTRY_FIELDS}
                line["chain"] = previous = chain_of(previous, line)
                handle.write(json.dumps(line, sort_keys=True) + "\n")
                written.append(line)
            handle.flush()
            os.fsync(handle.fileno())
            count = len(existing) + len(written)
            atomic_write_json(run_dir / HEAD_FILE, {"lines": count, "chain": previous})
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return written
