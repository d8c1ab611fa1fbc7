"""The push pipeline alone, in one process: CPU time a push of scenario F's body (1 MB STRUCTURED, gzip'd,
converted to JSON and stored), for dsreceiver.py and a baseline file, in alternating runs.

No TLS, no HTTP, no workers: what the decoding, converting and storing of a push cost, so that a
server-level difference (bench.py's F) can be told from a pipeline one.

e.g. bench/pipeline.py --baseline /tmp/dsreceiver-old.py --runs 5 --pushes 60
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List

HERE = Path(__file__).resolve().parent
WARM_UP = 3


def load(script: Path) -> Any:
    """Imports a dsreceiver.py as a module of its own name."""
    spec = importlib.util.spec_from_file_location("dsreceiver_under_test", str(script))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def one_run(script: Path, pushes: int) -> float:
    """Milliseconds of CPU a push, over `pushes` unique F bodies into a fresh folder (in this process)."""
    sys.path.insert(0, str(HERE))
    import bench  # the bodies and the stream definition of scenario F

    ds = load(script)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        bodies = bench.write_bodies(folder)
        records = gzip.decompress(bodies["structured.gz"].read_bytes())
        tail = Path(str(bodies["structured.gz"]) + ".tail").read_bytes()
        settings = ds.parse_config(["--output-dir", str(folder / "data"), "--stream-config",
                                    str(bench.SAMPLE_DEFINITION), "--records", "json"])
        layout = ds.Layout(folder / "data")
        storage = ds.Storage(layout, dedupe=ds.prepare_output(layout, settings.dedupe_window))
        pipeline = ds.PushPipeline(settings, storage, ds.StreamCatalog(settings.stream_config, settings.records_as_json),
                                   ds.Metrics())
        facts = ds.PushFacts("/ds", "192.0.2.7", True)
        batches = [gzip.compress(records + tail.replace(b"{TAG}", b"%d" % number), 6)
                   for number in range(WARM_UP + pushes)]
        for batch in batches[:WARM_UP]:
            pipeline.accept(facts, bytearray(batch))
        started = time.process_time()
        for batch in batches[WARM_UP:]:
            outcome = pipeline.accept(facts, bytearray(batch))
            assert outcome.result.name == "STORED", outcome
        spent = time.process_time() - started
        storage.close()
    return 1000 * spent / pushes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", type=Path, default=HERE.parent / "dsreceiver.py",
                        help="the dsreceiver.py measured (default: the one beside bench/)")
    parser.add_argument("--baseline", type=Path, default=None, help="another dsreceiver.py, run alternately")
    parser.add_argument("--runs", type=int, default=5, help="runs of each file, each in a new process (default: 5)")
    parser.add_argument("--pushes", type=int, default=60, help="pushes a run, after 3 to warm up (default: 60)")
    parser.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one is not None:
        print("%.3f" % one_run(options.one, options.pushes))
        return 0
    scripts = [options.script] + ([options.baseline] if options.baseline else [])
    spent: List[List[float]] = [[] for _ in scripts]
    for run in range(options.runs):
        for place, script in (enumerate(scripts) if run % 2 == 0 else reversed(list(enumerate(scripts)))):
            answer = subprocess.run([sys.executable, __file__, "--one", str(script), "--pushes", str(options.pushes)],
                                    check=True, stdout=subprocess.PIPE, text=True).stdout
            spent[place].append(float(answer.split()[-1]))
    for script, times in zip(scripts, spent):
        print("%s: %.1f ms of CPU a push (median of %d runs: %s)" % (
            script, statistics.median(times), len(times), ", ".join("%.1f" % value for value in times)))
    if options.baseline:
        print("against the baseline: %.2fx the pushes a CPU second" % (statistics.median(spent[1])
                                                                       / statistics.median(spent[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
