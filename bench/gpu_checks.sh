#!/usr/bin/env bash
# The README's GPU figures in one short run on one GPU (a few minutes on an H100):
#   recorder  the recorder's cost: SD-1.5 shape at 512 px fp16 batch 8 (as generate runs it, and without the
#             self-attention), SDXL 1.0 shape at 1024 px;
#   dit       the joint-attention recorder's cost, full depth, bf16, 1024 px: SD3-medium and FLUX.1 shapes,
#             and which fused kernel the twins call (with its log-sum-exp; checked against the stock call);
#   generate  `diffumask generate` at 512 px on a saved SD-1.5-shaped pipeline (its defaults: 50 steps), 96
#             items (6 per worker of a 16-core refine), and the soft maps' bytes per item; then generate's time
#             per image against the bare pipeline's and the GPU's wait between batches (bench_generate_host.py);
#   refine    `diffumask refine` per image on that dataset, each method (bench/bench_refine_gpu.py);
#   train     the r50 Mask2Former's training throughput at crop 512, batch 16, bf16, on that dataset;
#   shapes    a larger shapes generator (SHAPES_ARGS, default --channels 64,128,128 --batch-size 64) trained for
#             about SHAPES_MINUTES (default 6): a 50-step probe sizes the run, whose cosine schedule then ends
#             on time; the pipeline comes back packed in parts of at most 15 MiB (a device call returns at most
#             8 files of 16 MiB): `cat OUT/shapes-model.tgz.part-* | tar xzf - -C DIR` unpacks DIR/shapes-model,
#             then score it here: `python bench/bench_shapes.py --weights DIR/shapes-model` and
#             `python bench/bench_downstream.py --model DIR/shapes-model --work DIR/work --rows c`. Not a cost:
#             the one part that trains something to keep; about 8 minutes, so run it alone
#             (`bash bench/gpu_checks.sh OUT shapes`).
# Weights are random (nothing can be downloaded), so the figures are costs, not mask quality.
#
#   bash bench/gpu_checks.sh OUT [PARTS]   # PARTS: any of "recorder dit generate refine train shapes" (default:
#                                          # all but shapes);
#                                          # refine and train need generate. Needs diffusers, transformers,
#                                          # kornia (the CLI imports augment) and open_clip_torch (CLIP's
#                                          # tokenizer file) importable, pydensecrf2 for
#                                          # the CRF rows. Each part's figures go to OUT/<part>.txt, logs to
#                                          # OUT/stderr.log.
set -uo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUT [PARTS]}
parts=${2:-recorder dit generate refine train}  # shapes only when named
mkdir -p "$out"
work=${WORK:-$(mktemp -d)}  # WORK: keep generate's dataset for a later call
mkdir -p "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
stamp() { echo "== $(date +%T) $*"; }
want() { [[ " $parts " == *" $1 "* ]]; }
exec 2>>"$out/stderr.log"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cpus', len(__import__('os').sched_getaffinity(0)))" | tee -a "$out/gpu.txt"

if want recorder; then
    stamp "recorder, SD-1.5 shape, 512 px, fp16, batch 8, 20 steps"
    python3 bench/bench_recorder.py --device cuda --dtype float16 --sizes 512 --batch 8 --steps 20 --pairs 4 --profile \
        | tee "$out/recorder_sd15.txt"
    stamp "recorder without self-attention, SD-1.5 shape, 512 px, fp16, batch 8, 20 steps"
    python3 bench/bench_recorder.py --device cuda --dtype float16 --sizes 512 --batch 8 --steps 20 \
        --self-attention none --no-memory --pairs 3 | tee "$out/recorder_sd15_no_self.txt"
    stamp "recorder, SDXL shape, 1024 px, fp16, batch 2, 20 steps"
    python3 bench/bench_recorder.py --model sdxl --device cuda --dtype float16 --sizes 1024 --batch 2 --steps 20 \
        --pairs 3 --profile | tee "$out/recorder_sdxl.txt"
fi

if want dit; then
    stamp "the joint-attention twins' kernel: the fused call's own, with its log-sum-exp"
    python3 - <<'PY' | tee "$out/dit_kernel.txt"
import torch
from diffumask.joint_attention import _KERNEL_CHECKED, _kernel_with_logsumexp, attention_with_logsumexp
torch.manual_seed(0)
for heads, tokens, width in ((24, 4096 + 333, 64), (24, 4096 + 512, 128)):  # SD3-medium, FLUX.1 at 1024 px
    q, k, v = (torch.randn(1, heads, tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernel = _kernel_with_logsumexp(q, k, v)
    out, lse = attention_with_logsumexp(q, k, v)
    error = float("nan")
    if lse is not None:
        error = ((q.double() @ k.double().transpose(-1, -2) * width ** -0.5).logsumexp(-1) - lse).abs().max().item()
    print(f"heads {heads} width {width}: kernel {kernel[0] if kernel else None}, its log-sum-exp used: "
          f"{lse is not None} (checks: {_KERNEL_CHECKED}), max error against float64 {error:.2e}")
PY
    for model in sd3 flux; do
        stamp "recorder, $model shape, full depth, 1024 px, bf16, 10 steps"
        python3 bench/bench_recorder.py --model $model --device cuda --dtype bfloat16 --sizes 1024 --steps 10 \
            --pairs 3 | tee "$out/recorder_$model.txt"
    done
fi

if want generate; then
    stamp "generate, 512 px, 96 items, batch 8, the pipeline's default 50 steps"
    python3 bench/bench_recorder.py --save-pipeline "$work/sd15" --device cuda --dtype float16
    start=$(date +%s.%N)
    python3 -m diffumask generate --model "$work/sd15" --classes dog,cat --images-per-class 48 --batch-size 8 \
        --size 512 --device cuda --out "$work/ds512" --quiet
    end=$(date +%s.%N)
    python3 - "$work/ds512" "$start" "$end" <<'PY' | tee "$out/generate.txt"
import sys
from pathlib import Path
root, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
items = len((root / "manifest.jsonl").read_text().splitlines())
soft = sum(p.stat().st_size for p in (root / "SoftMaps").glob("*.npz"))
print(f"generate: {items} items in {end - start:.1f} s including loading ({(end - start) / items:.3f} s/image); "
      f"soft maps {soft / items / 1e6:.3f} MB per item")
PY
    stamp "generate against the bare pipeline, SD-1.5 shape, 512 px, fp16, batch 8, 20 steps"
    python3 bench/bench_generate_host.py --model sd15 --device cuda --dtype float16 --batches 6 --steps 20 \
        | tee -a "$out/generate.txt"
fi

if want refine; then
    stamp "refine per image"
    python3 bench/bench_refine_gpu.py "$work/ds512" ${REFINE_METHODS:+--methods "$REFINE_METHODS"} | tee "$out/refine.txt"
fi

if want train; then
    stamp "train r50, crop 512, batch 16, bf16"
    python3 -m diffumask train "$work/ds512" --preset r50 --crop 512 --batch-size 16 --steps 60 --device cuda \
        --workers 8 --out "$work/r50" --quiet
    python3 - "$work/r50/train_log.jsonl" <<'PY' | tee "$out/train.txt"
import json, statistics, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
times = [line["seconds_per_step"] for line in lines if "seconds_per_step" in line][1:]  # the first holds warm-up
step = statistics.median(times)
print(f"r50 Mask2Former, crop 512, batch 16, bf16: {step:.3f} s/step, {16 / step:.1f} images/s "
      f"(median of {len(times)} logged intervals after the first)")
PY
fi
if want shapes; then
    device=${SHAPES_DEVICE:-cuda}
    minutes=${SHAPES_MINUTES:-6}
    read -r -a shape_args <<< "${SHAPES_ARGS:---channels 64,128,128 --batch-size 64}"
    workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 0 ))
    stamp "shapes generator: a probe of 50 steps, then a run sized to $minutes minutes (${shape_args[*]})"
    rm -rf "$work/shapes-probe" "$work/shapes-model"  # a kept WORK's earlier run: shapes train writes only new folders
    python3 -m diffumask.shapes.train --out "$work/shapes-probe" --steps 50 --device "$device" \
        --loader-workers "$workers" "${shape_args[@]}" > "$work/shapes_probe.log"
    steps=$(python3 - "$work/shapes-probe/train_log.jsonl" "$minutes" <<'PY'
import json, sys
log = [json.loads(line) for line in open(sys.argv[1])]  # entries at step 1 and every 25 steps
first, last = log[0], log[-1]  # the first entry holds start-up (model, loader processes)
per_step = (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])
print(max(50, int(60 * float(sys.argv[2]) / per_step)))
PY
)
    if [[ ! $steps =~ ^[0-9]+$ ]]; then
        stamp "shapes generator: the probe failed (see $out/stderr.log)"
    else
        stamp "shapes generator: $steps steps"
        python3 -m diffumask.shapes.train --out "$work/shapes-model" --steps "$steps" \
            --minutes "$(awk "BEGIN { print $minutes + 2 }")" --device "$device" --loader-workers "$workers" \
            "${shape_args[@]}" | tail -3 | tee "$out/shapes_train.log"
        tar czf - -C "$work" shapes-model | split -b 15M - "$out/shapes-model.tgz.part-"
    fi
fi
stamp done
