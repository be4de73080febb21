"""Loss by position of every arch, one line each: the better training mode of each arch.

Reads the stream-evaluation JSON files beside this script (``nestlearn eval --stream`` writes
them as RUN_DIR/eval_stream_validation.json), keeps for each line the run with the lower
loss over whole documents, and writes all-archs.png and all-archs.md here. The transformer
gets two lines: global attention (its KV cache carried over the whole document) and a
128-token sliding window (the context it was trained on).

    PYTHONPATH=src python docs/results/long-context/all_archs.py
"""

from __future__ import annotations

import json
from pathlib import Path

from nestlearn.evaluate.report import markdown_table, plot_loss_by_position
from nestlearn.evaluate.stream import StreamEvalResult

HERE = Path(__file__).resolve().parent

# line -> its runs (training mode -> JSON file); the transformer has no memory to carry
# between training segments, so it was trained on windows only.
RUNS: dict[str, dict[str, str]] = {
    "transformer (global)": {"windows": "transformer-windows.json"},
    "transformer (window 128)": {"windows": "transformer-w128.json"},
    "titans": {"windows": "titans-windows.json", "stream": "titans-stream.json"},
    "titans-mag": {"windows": "titans-mag-windows.json", "stream": "titans-mag-stream.json"},
    "hope": {"windows": "hope-windows.json", "stream": "hope-stream.json"},
    "hope-attention": {"windows": "hope-attention-windows.json",
                       "stream": "hope-attention-stream.json"},
}


def best_runs() -> dict[str, StreamEvalResult]:
    """``"LINE, MODE-trained (N docs)"`` -> the line's result with the lowest overall loss."""
    chosen: dict[str, StreamEvalResult] = {}
    for line, modes in RUNS.items():
        results = {mode: StreamEvalResult.from_dict(json.loads((HERE / name).read_text()))
                   for mode, name in modes.items()}
        mode = min(results, key=lambda m: results[m].loss)
        result = results[mode]
        chosen[f"{line}, {mode}-trained ({result.documents} docs)"] = result
    return chosen


def main() -> None:
    results = best_runs()
    plot_loss_by_position(results, HERE / "all-archs.png",
                          title="loss by position, state carried (300 steps, seed 0)")
    (HERE / "all-archs.md").write_text(markdown_table(results))


if __name__ == "__main__":
    main()
