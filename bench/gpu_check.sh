#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md ("GPU: measured on one H200"), run from the repository
# root on a machine with one CUDA GPU. Its parts:
#   parity          float64 parity of the chunkwise ops against their references on CUDA
#                   (bench/gpu_parity.py)
#   compile-parity  the same for the deep memory's inductor-compiled chunk step
#   streaming       float64 streaming parity of every model arch on CUDA: segments, token by
#                   token and gradients against one pass, and one pass against CPU
#                   (bench/gpu_streaming.py)
#   profile         CUDA kernels, host syncs and GPU busy time of one training step per
#                   arch, B=8 T=2048 bf16 (bench/gpu_profile.py; the aten-op counts of
#                   `nestlearn bench ops-count` are the same on any device, taken on CPU)
#   graph           the whole step captured as one CUDA graph against eager (bench/gpu_graph.py)
#   train-graph     the library's Trainer with train.cuda_graph on and off: step time and
#                   losses (bench/gpu_train_graph.py)
#   models          forward+backward, B=8 T=2048 bf16 on CUDA, compile off and on, each
#                   eager and replayed from a CUDA graph (`nestlearn bench layers
#                   --cuda-graph off on`; an estimated 10 minutes, so not in the default
#                   PARTS: e.g. PARTS=models)
#   decode          ms per token of greedy decoding after contexts of 512, 2048 and 8192
#                   tokens, B=1 fp32 on CUDA, compile off and on, HOPE first (`nestlearn
#                   bench layers --sections decode`; up to 7 minutes, not in the default
#                   PARTS either)
# PARTS names the parts to run, in the order above (default: all but models and decode, at
# most about 11.5 minutes with the default limits); e.g. PARTS="profile models".
# CHUNKS: chunk options added to the profile, graph, train-graph, models and decode parts
# (default none: the benches' chunk of 64 and CMS chunks 64 512, as the earlier GPU runs);
# the models as `nestlearn train` builds them: CHUNKS="--chunk-size 16 --inner-chunk-size 16
# --cms-chunk-sizes 16 64" (4x the chunk steps: allow the parts more time).
# Each part runs under `timeout` (seconds from PARITY_S, COMPILE_PARITY_S, STREAMING_S,
# PROFILE_S, GRAPH_S, TRAIN_GRAPH_S, MODELS_S, DECODE_S), so one slow part cannot use up the
# others' time; the table parts write their JSON after every row, so a part cut short keeps
# what it finished.
# Into $OUT (default results/gpu): environment.txt, summary.txt (each part's exit code and
# seconds), parts.log (every part's output, in order) and one JSON per table part: at most
# eight files. Nothing is downloaded: nestlearn is installed from this tree (no dependencies,
# no build isolation) if it is not importable. Exit code 0 when every part passed, 1
# otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-results/gpu}"
PARITY_S="${PARITY_S:-30}"
COMPILE_PARITY_S="${COMPILE_PARITY_S:-150}"
STREAMING_S="${STREAMING_S:-120}"
PROFILE_S="${PROFILE_S:-100}"
GRAPH_S="${GRAPH_S:-180}"
TRAIN_GRAPH_S="${TRAIN_GRAPH_S:-110}"
MODELS_S="${MODELS_S:-580}"
DECODE_S="${DECODE_S:-420}"
PARTS="${PARTS:-parity compile-parity streaming profile graph train-graph}"
CHUNKS="${CHUNKS:-}"
# shellcheck disable=SC2206  # the options are meant to split into words
chunk_options=($CHUNKS)
for name in $PARTS; do
    case "$name" in
        parity|compile-parity|streaming|profile|graph|train-graph|models|decode) ;;
        *) echo "gpu_check: error: PARTS: got '$name'; allowed: parity compile-parity" \
                "streaming profile graph train-graph models decode" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"

if ! "$PY" -c "import nestlearn" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import nestlearn"

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    nvidia-smi -L 2>/dev/null || true
} | tee "$OUT/environment.txt"

started=$SECONDS
: > "$OUT/summary.txt"
: > "$OUT/parts.log"

# part NAME LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, its output added to
# parts.log; a part not named in PARTS is skipped
part() {
    local name=$1 limit=$2 rc=0
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/parts.log"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/parts.log" || rc=$?
    local took=$((SECONDS - begin))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name: stopped at the ${limit}s limit (exit $rc) after ${took}s" | tee -a "$OUT/summary.txt"
    else
        echo "$name: exit $rc after ${took}s" | tee -a "$OUT/summary.txt"
    fi
}

part parity "$PARITY_S" "$PY" bench/gpu_parity.py --device cuda
part compile-parity "$COMPILE_PARITY_S" "$PY" bench/gpu_parity.py --device cuda \
    --compile inductor
part streaming "$STREAMING_S" "$PY" bench/gpu_streaming.py --device cuda
part profile "$PROFILE_S" "$PY" bench/gpu_profile.py --length 2048 --batch 8 \
    --repeats 3 --out "$OUT" ${chunk_options[@]+"${chunk_options[@]}"}
part graph "$GRAPH_S" "$PY" bench/gpu_graph.py --length 2048 --batch 8 --repeats 3 \
    --out "$OUT" ${chunk_options[@]+"${chunk_options[@]}"}
part train-graph "$TRAIN_GRAPH_S" "$PY" bench/gpu_train_graph.py --length 2048 --batch 8 \
    --out "$OUT" ${chunk_options[@]+"${chunk_options[@]}"}
# cheapest archs first, so a run cut short has the most cells
part models "$MODELS_S" "$PY" -m nestlearn bench layers --sections models \
    --archs transformer titans titans-mag hope-attention hope \
    --device cuda --autocast bf16 --batch 8 --lengths 2048 --compile off on --cuda-graph off on \
    --no-memory --repeats 3 --out "$OUT" ${chunk_options[@]+"${chunk_options[@]}"}
part decode "$DECODE_S" "$PY" -m nestlearn bench layers --sections decode \
    --archs hope titans transformer --device cuda \
    --decode-contexts 512 2048 8192 --compile off on --no-memory --repeats 3 --out "$OUT" \
    ${chunk_options[@]+"${chunk_options[@]}"}

echo "total $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
if grep -q -e 'stopped at' -e ': exit [1-9]' "$OUT/summary.txt"; then
    echo "some parts failed or were stopped: see $OUT/summary.txt and $OUT/parts.log"
    exit 1
fi
echo "all parts passed"
