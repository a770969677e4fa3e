"""Child process that runs and times one library locally with a fixed thread count.

Started by :func:`canao.latency.measure.measure_local`; TVM_NUM_THREADS is set
in its environment before TVM starts. Isolating each measurement in a process
also means a crash in generated code cannot take the caller (a search with
finished trials) down with it.

Usage: ``python -m canao.latency.worker REQUEST.json``; writes the result
JSON to the path named in the request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    from canao.latency.protocol import Protocol
    from canao.latency.runner import local_runner

    runner = local_runner(Path(request["library"]), request.get("device_type", "cpu"))
    with np.load(request["inputs"]) as data:
        inputs = {name: data[name] for name in data.files}
    names = tuple(request["input_names"])
    result: dict[str, object] = {"threads": runner.threads()}
    if request.get("output"):
        np.save(request["output"], runner.run(inputs, names))
    if request.get("protocol"):
        protocol = Protocol(**request["protocol"])
        result["seconds"] = runner.time(inputs, names, protocol)
    Path(request["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
