"""Writes, quickly, an output folder as a receiver that has run for a long time leaves it.

Every hour before the current one holds, for each stream and worker, a finished data file (gzip'd, as
--compress-rotated leaves it) with its manifest, its ledger summary (its batch index pruned long ago) and a line
in the seal list of its day; the answers files of each day are there, and the listed mark.  The current hour holds
each worker's file as a run that was killed left it: written, indexed, journalled, not finished.  Records are
small and alike (the files' count matters here, not their size), but every manifest agrees with its file.

    python3 bench/aged_folder.py DIR --files 20000 --streams 14          # a month of 14 streams, 2 workers
    python3 bench/aged_folder.py DIR --files 1000000 --streams 100       # about 7 months of 100 streams
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dsreceiver  # noqa: E402

RECORD = b'{"version":"2","streamId":"%d","cp":"123456","reqId":"aged-%d-%d","reqTimeSec":"%d","statusCode":"200"}\n'


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def make_aged_folder(root: Path, files: int, streams: int = 14, workers: int = 2, now: Optional[float] = None,
                     records: int = 20, first_stream: int = 70000) -> Dict[str, int]:
    """Writes the folder (see the module's docstring) with `files` finished data files; returns what it wrote."""
    now = time.time() if now is None else now
    layout = dsreceiver.Layout(root)
    layout.create()
    tags = [dsreceiver.worker_tag(index) for index in range(workers)]
    per_hour = streams * len(tags)
    hours = -(-files // per_hour)
    current = int(now // 3600 * 3600)
    written = 0
    lists: Dict[str, List[str]] = {}
    answers: Dict[str, List[bytes]] = {}
    for stream_number in range(streams):
        stream = first_stream + stream_number
        folder = "stream=%d" % stream
        (root / folder).mkdir(exist_ok=True)
        (layout.ledger_dir / folder).mkdir(parents=True, exist_ok=True)
        body = b"".join(RECORD % (stream, stream, line, current - 7200) for line in range(records))
        packed = gzip.compress(body, mtime=0)
        digest = hashlib.sha256(packed).hexdigest()
        for hour in range(hours, 0, -1):
            start = current - hour * 3600
            period = time.strftime("%Y-%m-%dT%HZ", time.gmtime(start))
            day = period[:10]
            for tag in tags:
                if written >= files:
                    break
                name = "%s%s.log" % (period, tag)
                data = root / folder / (name + ".gz")
                write(data, packed)
                manifest = {"format": dsreceiver.MANIFEST_FORMAT, "file": data.name, "stream": str(stream),
                            "records": records, "bytes": len(packed), "sha256": digest,
                            "first_received": start + 60.0, "last_received": start + 3540.0,
                            "first_event": float(current - 7200), "last_event": float(current - 7200),
                            "sealed_at": start + 3601.0}
                write(dsreceiver.Layout.manifest_path(data), json.dumps(manifest, indent=1).encode() + b"\n")
                window = int((start + 60) // 300 * 300)
                row = {"window": dsreceiver.iso_window(window), "stream": str(stream), "records": records,
                       "batches": 1, "bytes": len(body), "duplicates": 0, "refused": {}}
                summary = {"format": dsreceiver.LEDGER_FORMAT, "index": name + ".idx", "folder": folder, "rows": [row]}
                write(layout.ledger_dir / folder / (name + ".json"), json.dumps(summary).encode() + b"\n")
                lists.setdefault(day + tag, []).append("%s/%s" % (folder, data.name))
                written += 1
    for day_tag, paths in lists.items():
        layout.make_folder(layout.seal_lists_dir)
        write(layout.seal_lists_dir / (day_tag + ".list"), "".join(path + "\n" for path in paths).encode())
        answers.setdefault(day_tag, []).append(json.dumps({"window": day_tag[:10] + "T00:00:00Z", "stream": "unknown",
                                                           "duplicates": 0, "refused": {"401": 1}}).encode() + b"\n")
    layout.make_folder(layout.answers_dir)
    for day_tag, lines in answers.items():
        write(layout.answers_dir / (day_tag + ".jsonl"), b"".join(lines))
    current_files = write_killed_runs(layout, tags, streams, first_stream, now, records)
    write(layout.listed_mark, dsreceiver.LISTED_MARK)
    return {"finished": written, "current": current_files, "hours": hours}


def write_killed_runs(layout: dsreceiver.Layout, tags: Sequence[str], streams: int, first_stream: int, now: float,
                      records: int) -> int:
    """This hour's files of each worker, as runs killed mid-hour leave them: written and indexed batch by batch,
    journalled, not finished (the lock files are free: the runs are gone)."""
    period = layout.period_name(now)
    count = 0
    for tag in tags:
        run = "%s.%d.%x" % (tag[1:], 4000000 + len(tag) + count, time.time_ns())
        journal = []
        for stream_number in range(streams):
            stream = first_stream + stream_number
            folder = "stream=%d" % stream
            data = layout.root / folder / ("%s%s.log" % (period, tag))
            index = layout.index_path(data)
            index.parent.mkdir(parents=True, exist_ok=True)
            entries = []
            content = b""
            for batch in range(10):
                lines = b"".join(RECORD % (stream, batch, line, int(now) - 30) for line in range(records))
                content += lines
                entries.append(dsreceiver.IndexEntry(len(content), now - 600 + batch * 30,
                                                     hashlib.sha256(lines).digest(), str(stream), records))
            write(data, content)
            write(index, dsreceiver.index_bytes(entries))
            journal.append("+%s/%s\n" % (folder, data.name))
            count += 1
        layout.make_folder(layout.runs_dir)
        write(layout.run_lock_path(run), b"")
        write(layout.run_journal_path(run), "".join(journal).encode())
    return count


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--files", type=int, default=20000, help="finished data files (default: %(default)s)")
    parser.add_argument("--streams", type=int, default=14, help="streams (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="workers whose files they are (default: %(default)s)")
    options = parser.parse_args(argv)
    started = time.monotonic()
    made = make_aged_folder(options.root, options.files, options.streams, options.workers)
    print("wrote %(finished)d finished files over %(hours)d hours and %(current)d current ones" % made,
          "in %.1f s" % (time.monotonic() - started))
    return 0


if __name__ == "__main__":
    os.umask(0o027)
    sys.exit(main())
