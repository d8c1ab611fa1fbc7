"""The original how-to's receiver, as the benchmark baseline: Flask's built-in server with an ssl_context,
gunzip when needed, append the body to one file under a lock.  The same app runs under gunicorn
(`gunicorn flask_baseline:app`, the output file then from $BENCH_OUTPUT)."""

import argparse
import gzip
import os
import threading

from flask import Flask, request

app = Flask(__name__)
lock = threading.Lock()
OUTPUT = os.environ.get("BENCH_OUTPUT", "Data.txt")


@app.route("/", defaults={"path": ""}, methods=["POST", "PUT"])
@app.route("/<path:path>", methods=["POST", "PUT"])
def push(path: str) -> str:
    data = request.get_data()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with lock:
        with open(OUTPUT, "ab") as handle:
            handle.write(data)
    return "ok"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--output", required=True)
    options = parser.parse_args()
    OUTPUT = options.output
    app.run(host="127.0.0.1", port=options.port, ssl_context=(options.cert, options.key), threaded=True)
