"""Resident memory of a one-model-per-task server: a fresh process loads N copies of a fused
(backbone + side network) ONNX model as N ONNX Runtime sessions, runs each once, and prints
its RSS at each step as JSON. Run by benches/run.py, one process per N."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import onnxruntime as ort

from servers import rss_bytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    before = rss_bytes(os.getpid())
    sessions = [ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
                for _ in range(args.count)]
    loaded = rss_bytes(os.getpid())
    for s in sessions:
        feeds = {i.name: np.zeros([1 if isinstance(d, str) or d is None else d for d in i.shape], np.float32)
                 for i in s.get_inputs()}
        s.run(None, feeds)
    warm = rss_bytes(os.getpid())
    print(json.dumps({"count": args.count, "runtime_only": before, "loaded": loaded, "warm": warm}))


if __name__ == "__main__":
    main()
