#!/usr/bin/env bash
# The GPU paths in one short run (for a machine with CUDA; see README "Scaling"): embedding
# throughput at fp32 and bf16 autocast with channels-last, the nearest-key search on the GPU,
# a torchrun-launched embed, and a whole tiny `dkvb run` with the encoder on cuda.
# Expects the Fashion-MNIST test idx files in $DKVB_FASHION_MNIST (or the Debian package).
# Writes JSON and logs to ${OUT:-results/gpu}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg DKVB_CACHE=$(mktemp -d) DKVB_DATA=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
for amp in none bf16; do
  a=(); [ "$amp" != none ] && a=(--amp "$amp")
  python3 benchmarks/bench_embedding.py --device cuda "${a[@]}" --split test --images 8192 --batch-size 512 \
    --num-workers 8 --image-size 64 224 --repeats 3 --out "$OUT/embedding_cuda_$amp.json" 2>&1 | tail -8
done
python3 benchmarks/bench_lookup.py --device cuda --methods dkvb-torch torch-cdist matmul --embeddings 16384 \
  --repeats 5 --out "$OUT/lookup_cuda.json" 2>&1 | tail -8
cfg=experiments/tiny_synthetic.yaml
torchrun --standalone --nproc_per_node=1 -m dkvb embed $cfg --set encoder.device=cuda --set encoder.amp=bf16 \
  --set output_dir="$OUT/runs" 2>&1 | tail -3
python3 -m dkvb run $cfg --set encoder.device=cuda --set output_dir="$OUT/runs" 2>&1 | tail -25
