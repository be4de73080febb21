"""ms per token of HOPE's compiled greedy decoding after a 512-token context (the model
defaults, 2 threads): the token reader of ``set_compile(True)``, warmed by two runs of 64
tokens, then five timed runs of 64; prints the median, the range and the graphs compiled.
Run with ``PYTHONPATH=<tree>/src`` (and ``TORCH_LOGS=recompiles`` to see the recompiles)."""

import argparse
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

from nestlearn.benchmarks import layers
from nestlearn.models.generation import token_reader
from nestlearn.ops import set_compile

CHUNKS = ["--chunk-size", "16", "--inner-chunk-size", "16", "--cms-chunk-sizes", "16", "64"]

torch.set_num_threads(2)
parser = argparse.ArgumentParser()
layers.add_arguments(parser)
config = layers._model_configs(parser.parse_args(["--archs", "hope", *CHUNKS]))["hope", 16]
torch.manual_seed(0)
model = layers.build_model(config).eval()
ids = torch.randint(0, 256, (1, 512))
set_compile(True)
read = token_reader(model)


def decode(first: torch.Tensor, state: object, tokens: int = 64) -> None:
    token = first
    for _ in range(tokens):
        out, state = read(token, state)
        token = out[:, -1:].argmax(-1)


with torch.no_grad():
    state = None
    for start in range(0, 512, 64):
        logits, state = model(ids[:, start:start + 64], state)
    first = logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    decode(first, state)
    decode(first, state)
    print("warm-up s", round(time.perf_counter() - started, 1))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        decode(first, state)
        times.append((time.perf_counter() - started) / 64 * 1e3)
print(sys.argv[1] if len(sys.argv) > 1 else "", "compiled ms/token median",
      round(statistics.median(times), 2), "range", round(min(times), 2), round(max(times), 2),
      "graphs", counters["stats"]["unique_graphs"])
