#!/usr/bin/env bash
# One device call's worth of GPU measurements, logs under $OUT (see ../shared/gpu/README.md):
#   source .gpu/b/setup.sh && bash bench/gpu_session.sh [steps...]
# Steps (default all, in this order): env vit 2b e2e2b 7b e2e7b; also: prep lm q25 e2e3b25 q25_7b cmp2b first
# coldfirst e2e2b1080 mem newsize png decab head plans still e2eformats e2eall e2ecache tail e2ecache7b
# agent agent7b pause varlen e2ebusy body evict imports quant quant7b e2eq firstload qtail replicas (2 GPUs) replicas4 (4 GPUs) agentreplicas (2 GPUs)
# towerops wattn split (2 GPUs) tpprobe (2 GPUs) split4 (4 GPUs) split7b (2 GPUs) splitfaults (2 GPUs) splitcmp (2 GPUs) splitcmp7b (2 GPUs) q25split (2 GPUs) q25split7b (2 GPUs) nccl (2 GPUs) rows (2 GPUs) idlehops energy fp8 finishing finishing8 awake direct
# The worker decodes PNGs with imagecodecs, whose wheel (26 MB) does not fit beside .gpu/b in one
# call's carry. Here: pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/ic imagecodecs
# (and pybase64, the frontend's base64 decoder, the same way)
# Between calls 1 and 2 of ../shared/gpu/README.md, one more call, carry [".gpu/ic"]:
#   mkdir -p /root/icw && cp .gpu/ic/*.whl /root/icw/
# The whole-stack steps (e2e*, agent*, replicas*) start the Procfile under honcho, which the GPU image
# lacks: pip download --no-deps --only-binary=:all: -d .gpu/h honcho, carry [".gpu/b", ".gpu/h"] and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site .gpu/h/*.whl
# after sourcing setup.sh. The replicas steps need a machine with 2 (replicas) or 4 (replicas4) GPUs.
set -u
python3 -c "import imagecodecs, pybase64" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site \
  /root/icw/*.whl 2>&1 | grep -v "^WARNING" || true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# The C PNG unfilterer (workers/_png_unfilter.abi3.so) and spinner (workers/_keep_awake.abi3.so) are
# built by the install and ignored by git, so they travel only when carried: carry [".gpu/b", ".gpu/h",
# "workers/_png_unfilter.abi3.so", "workers/_keep_awake.abi3.so"] (one abi3 build serves the GPU
# image's Python 3.12). Without the first the worker unfilters PNGs with libpng: a plain
# 1080p screenshot's preprocessing 5.2-5.8 ms instead of ~2.8 (twenty-third session).
python3 -c "from workers import _png_unfilter, _keep_awake" 2>/dev/null || python3 setup.py -q build_ext --inplace >/dev/null 2>&1 ||
  echo "WARNING: C extensions missing (carry workers/_png_unfilter.abi3.so, workers/_keep_awake.abi3.so)" | tee -a "$OUT/session.txt"
steps=${*:-env vit 2b e2e2b 7b e2e7b}
# Everything goes to one file: the device call brings back only a few files.
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*" | tee -a "$OUT/session.txt"
        local t0=$SECONDS; timeout "$limit" "$@" >> "$OUT/session.txt" 2>&1
        echo "== $name rc=$? $((SECONDS - t0))s" | tee -a "$OUT/session.txt"; }
for s in $steps; do case $s in
  prep)  run prep 120 python3 -m bench.prep_profile ;;
  env)   run env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; python3 -c "import PIL, mlx.core as mx; print(PIL.__version__, mx.__version__, mx.default_device())"' ;;
  vit)   run vit_ops 120 python3 -m bench.vit_ops 1920 1080 ;;
  towerops) run towerops3b25 240 python3 -m bench.tower_ops --shape 3b-qwen2.5
         run towerops2b 240 python3 -m bench.tower_ops --shape 2b ;;
  wattn) run wattn1080 120 python3 -m bench.window_attention_kernel --size 1920x1080
         run wattn720 120 python3 -m bench.window_attention_kernel --size 1280x720 ;;
  lm)    run lm2b 120 python3 -m bench.lm_ops
         run lm7b 180 python3 -m bench.lm_ops --shape 7b ;;
  2b)    [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run ground2b 300 python3 -m bench.gpu_ground --checkpoint /tmp/ga2b --torch-baseline .gpu/b/prefill_floor.py \
             --sizes 1280x720,1920x1080 --batches 1,8 --quantize '' ;;
  e2e2b) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2e2b 400 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080,1280x720 \
             --concurrency 1,8 --requests 32 --torch-baseline .gpu/b/prefill_floor.py ;;
  7b)    [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b
         run ground7b 300 python3 -m bench.gpu_ground --shape 7b --checkpoint /tmp/ga7b --torch-baseline bench/torch_forward.py \
             --sizes 1920x1080 --batches 1,4 --quantize '' ;;
  q25)   [ -d /tmp/ga3b25 ] || run ckpt3b25 300 python3 -m bench.write_checkpoint /tmp/ga3b25 --shape 3b-qwen2.5
         run cmp3b25 300 python3 -m bench.vision_compare /tmp/ga3b25
         run ground3b25 300 python3 -m bench.gpu_ground --shape 3b-qwen2.5 --checkpoint /tmp/ga3b25 \
             --torch-baseline bench/torch_forward.py --sizes 1280x720,1920x1080 --batches 1,8 --quantize '' ;;
  e2e3b25) run e2e3b25 400 python3 -m bench.e2e --model-path /tmp/ga3b25 --dtype bfloat16 --sizes 1920x1080,1280x720 \
             --concurrency 1,8 --requests 24 --torch-baseline bench/torch_forward.py --shape 3b-qwen2.5 ;;
  q25_7b) [ -d /tmp/ga7b25 ] || run ckpt7b25 300 python3 -m bench.write_checkpoint /tmp/ga7b25 --shape 7b-qwen2.5
         run ground7b25 300 python3 -m bench.gpu_ground --shape 7b-qwen2.5 --checkpoint /tmp/ga7b25 \
             --torch-baseline bench/torch_forward.py --sizes 1920x1080 --batches 1,4 --quantize '' ;;
  mem)   [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run mem2b 300 python3 -m bench.memory_profile /tmp/ga2b --sizes 1280x720,1920x1080 ;;
  cmp2b) run cmp2b 300 python3 -m bench.vision_compare /tmp/ga2b ;;
  first) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run first 300 python3 -m bench.first_request /tmp/ga2b ;;
  newsize) run newsize 300 python3 -m bench.new_size ;;
  head)  run head 120 python3 -m bench.head_precision
         run head_fp32 120 env MLX_ENABLE_TF32=0 python3 -m bench.head_precision ;;
  plans) run plans_mlx_defaults 200 python3 -m bench.attention_plans --mlx-defaults
         run plans 200 python3 -m bench.attention_plans ;;
  png)   run png 300 python3 -m bench.png_decoders --reps 11 ;;
  still) run still 300 python3 -m bench.still_decoders --reps 15 ;;
  e2eall) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2eall 560 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 2560x1440,1920x1080,1280x720 \
             --concurrency 1,8 --requests 32 --torch-baseline .gpu/b/prefill_floor.py ;;
  tail)  [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run tail 300 python3 -m bench.cached_tail /tmp/ga2b ;;
  e2ecache7b) [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b
         run e2ecache7b 450 python3 -m bench.e2e --model-path /tmp/ga7b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --torch-baseline bench/torch_forward.py --shape 7b ;;
  e2ecache) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2ecache 560 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080,1280x720 \
             --concurrency 1,8 --requests 32 --torch-baseline .gpu/b/prefill_floor.py ;;
  e2eformats) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2eformats 300 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080,1280x720 \
             --formats png,jpeg,webp --concurrency 1 --requests 32 ;;
  decab) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run decab 300 python3 -m bench.decoder_ab /tmp/ga2b ;;
  coldfirst) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # empty kernel cache
         run coldfirst 300 env MLX_PTX_CACHE_DIR=/tmp/cold-kernels-$RANDOM python3 -m bench.first_request /tmp/ga2b ;;
  e2e2b1080) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2e2b1080 400 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 32 ;;
  e2e7b) [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b
         run e2e7b 400 python3 -m bench.e2e --model-path /tmp/ga7b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --torch-baseline bench/torch_forward.py --shape 7b ;;
  agent) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run agent 500 python3 -m bench.agent_loop --model-path /tmp/ga2b --dtype bfloat16 --size 1920x1080 \
             --agents 1,4 --steps 16 --think-ms 0,50,150,500 ;;
  agent7b) [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b
         run agent7b 400 python3 -m bench.agent_loop --model-path /tmp/ga7b --dtype bfloat16 --size 1920x1080 \
             --agents 1 --steps 16 --think-ms 0,150,500 ;;
  e2ebusy) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2ebusy 500 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --content plain,busy --concurrency 1,8 --requests 48 --no-repeat --torch-baseline .gpu/b/prefill_floor.py ;;
  body)  run body 180 python3 -m bench.body_cost ;;
  imports) run imports 200 python3 -m bench.worker_imports --runs 5 ;;
  evict) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b
         run evict 450 python3 -m bench.eviction --skip-fake --mlx-models /tmp/ga2b,/tmp/ga7b --dtype bfloat16 ;;
  varlen) run varlen_vit 120 python3 -m bench.varlen_attention --case vit
         run varlen_lm 120 python3 -m bench.varlen_attention --case lm
         run varlen_long 120 python3 -m bench.varlen_attention --case vit --lengths 19136,12544,12012 --layouts views,dense_tm ;;
  pause) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run pause150 200 python3 -m bench.after_pause /tmp/ga2b --pause-ms 150
         run pause500 200 python3 -m bench.after_pause /tmp/ga2b --pause-ms 500 ;;
  quant) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run quant2b 450 python3 -m bench.quantized_lm /tmp/ga2b --reps 6 --rows "" ;;
  e2eq)  [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run e2eq4 420 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --quantize 4 --sizes 1920x1080 \
             --concurrency 1,8 --requests 32 ;;
  qtail) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run qtail 300 python3 -m bench.quantized_lm /tmp/ga2b --bits 4 --reps 6 --rows "" ;;
  firstload) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run firstload 590 python3 -m bench.first_load /tmp/ga2b ;;
  replicas) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         # one kernel cache for both runs: the first fills it, the replicas' loads then read it
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-replicas
         run e2e_one_gpu 300 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8,16 --requests 32 --no-repeat
         run e2e_two_gpus 240 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,2,8,16 --requests 32 --devices 0,1 ;;
  replicas4) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # 4 GPUs, empty kernel cache
         run e2e_four_gpus 420 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,4,8,16,32 --requests 32 --no-repeat --devices 0,1,2,3 ;;
  agentreplicas) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-replicas
         run agent_one_gpu 260 python3 -m bench.agent_loop --model-path /tmp/ga2b --dtype bfloat16 --size 1920x1080 \
             --agents 4,8 --steps 16 --think-ms 150
         run agent_two_gpus 200 python3 -m bench.agent_loop --model-path /tmp/ga2b --dtype bfloat16 --size 1920x1080 \
             --agents 4,8 --steps 16 --think-ms 150 --devices 0,1 ;;
  tpprobe) run tp_probe 200 python3 -m bench.tp_probe --ranks 2 --size 1920x1080 --reps 10 ;;
  split) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run e2e_one_gpu 300 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080,1280x720 \
             --concurrency 1,8 --requests 32 --torch-baseline .gpu/b/prefill_floor.py
         run e2e_split_two_gpus 300 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080,1280x720 \
             --concurrency 1,8 --requests 32 --devices 0,1 --gpus-per-replica 2 ;;
  split4) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # 4 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run e2e_split_four_gpus 300 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 32 --devices 0,1,2,3 --gpus-per-replica 4 --torch-baseline .gpu/b/prefill_floor.py
         run e2e_two_split_replicas 300 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 32 --devices 0,1,2,3 --gpus-per-replica 2 ;;
  split7b) [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run e2e7b_one_gpu 300 python3 -m bench.e2e --model-path /tmp/ga7b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --torch-baseline bench/torch_forward.py --shape 7b
         run e2e7b_split_two_gpus 240 python3 -m bench.e2e --model-path /tmp/ga7b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --devices 0,1 --gpus-per-replica 2 ;;
  splitfaults) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run split_faults 330 python3 -m bench.split_faults --model-path /tmp/ga2b --dtype bfloat16 \
             --devices 0,1 --gpus-per-replica 2 ;;
  splitcmp) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run split_compare 300 python3 -m bench.split_compare --model-path /tmp/ga2b ;;
  splitcmp7b) [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run split_compare_7b 400 python3 -m bench.split_compare --model-path /tmp/ga7b --screens 6 ;;
  q25split) [ -d /tmp/ga3b25 ] || run ckpt3b25 300 python3 -m bench.write_checkpoint /tmp/ga3b25 --shape 3b-qwen2.5   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run split_compare_3b25 300 python3 -m bench.split_compare --model-path /tmp/ga3b25 --screens 6
         run e2e3b25_split_two_gpus 300 python3 -m bench.e2e --model-path /tmp/ga3b25 --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --no-repeat --devices 0,1 --gpus-per-replica 2 \
             --torch-baseline bench/torch_forward.py --shape 3b-qwen2.5 ;;
  q25split7b) [ -d /tmp/ga7b25 ] || run ckpt7b25 300 python3 -m bench.write_checkpoint /tmp/ga7b25 --shape 7b-qwen2.5   # 2 GPUs
         export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split
         run e2e7b25_one_gpu 300 python3 -m bench.e2e --model-path /tmp/ga7b25 --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --no-repeat --torch-baseline bench/torch_forward.py --shape 7b-qwen2.5
         run e2e7b25_split_two_gpus 240 python3 -m bench.e2e --model-path /tmp/ga7b25 --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1,8 --requests 24 --no-repeat --devices 0,1 --gpus-per-replica 2 ;;
  nccl)  export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split   # 2 GPUs: links, NCCL's transport, settings, overlap
         run gpu_links 30 bash -c 'nvidia-smi topo -m; nvidia-smi nvlink --status -i 0 | head -6'
         run tp_overlap 240 python3 -m bench.tp_probe --ranks 2 --reps 10 --parts alone,heads,heads_local,overlap2,overlap4
         run nccl_transport 200 bash -c 'NCCL_DEBUG=INFO python3 -m bench.tp_probe --ranks 2 --reps 5 --parts collectives 2>&1 \
             | sed -E "s/^.*NCCL INFO //; s/Channel [0-9]+/Channel N/g; s/0x[0-9a-f]+/0x./g" | sort | uniq -c | sort -rn | head -50'
         run torch_collectives 150 python3 -m bench.torch_collectives --ranks 2
         for cfg in "" NCCL_PROTO=Simple NCCL_PROTO=LL128 NCCL_MIN_NCHANNELS=16 NCCL_MIN_NCHANNELS=32 NCCL_P2P_DISABLE=1; do
           run "nccl_setting_${cfg:-default}" 150 env $cfg python3 -m bench.tp_probe --ranks 2 --reps 10 --parts collectives,heads,heads_local
         done ;;
  rows)  export MLX_PTX_CACHE_DIR=/tmp/mlx-kernels-split   # 2 GPUs: the post-attention half by rows
         run tp_rows 150 python3 -m bench.tp_probe --ranks 2 --reps 10 --parts alone,heads,rows,megatron
         run tp_rows_1440 150 python3 -m bench.tp_probe --ranks 2 --reps 5 --size 2560x1440 --parts alone,heads,rows
         run tp_rows_720 150 python3 -m bench.tp_probe --ranks 2 --reps 10 --size 1280x720 --parts alone,heads,rows ;;
  energy) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         run energy1080 300 python3 -m bench.energy --checkpoint /tmp/ga2b --torch-baseline bench/torch_forward.py
         run energy720 200 python3 -m bench.energy --checkpoint /tmp/ga2b --size 1280x720 --torch-baseline bench/torch_forward.py ;;
  fp8)   run fp8_energy 120 python3 bench/fp8_energy.py ;;
  finishing) [ -n "${FINISHING:-}" ] || run idle_hops_finishing 200 python3 -m bench.idle_hops --n 60 --transports tcp \
             --forward-ms 100 --finishing off,on,off,on
         [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         for f in ${FINISHING:-on off on off on off}; do   # the stack restarted each time: the kernel cache warm after the first
           run "e2e_finishing_$f" 200 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1 --requests 40 --no-repeat --finishing $f
         done ;;
  finishing8) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         for f in ${FINISHING8:-on off on off}; do   # does FINISHING cost anything under load?
           run "e2e8_finishing_$f" 200 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 8 --requests 64 --no-repeat --finishing $f
         done ;;
  awake) [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         half="$(( $(nproc) / 2 ))-$(( $(nproc) - 1 ))"   # the stack pinned to the upper half of the CPUs
         for r in ${AWAKE_ROUNDS:-1 2 3}; do   # keep_cpus_awake_ms off and on, alternating
           for a in "off 0" "on 100" "on_pinned 100 taskset -c $half"; do
             set -- $a
             run "e2e_awake_$1_$r" 200 ${@:3} python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 \
               --sizes 1920x1080 --concurrency 1 --requests 40 --no-repeat --keep-cpus-awake-ms $2
           done
         done ;;
  direct) [ "${DIRECT_HOPS:-on}" = off ] || run idle_hops_direct 200 python3 -m bench.idle_hops --n 60 --transports tcp \
           --forward-ms 90 --finishing on --direct-answers off,on,off,on,off,on
         [ -d /tmp/ga2b ] || run ckpt2b 180 python3 -m bench.write_checkpoint /tmp/ga2b
         for d in ${DIRECT:-off on off on off on}; do   # the frontend's direct_answers, alternating
           run "e2e_direct_$d" 200 python3 -m bench.e2e --model-path /tmp/ga2b --dtype bfloat16 --sizes 1920x1080 \
             --concurrency 1 --requests 40 --no-repeat --direct-answers $d ${DIRECT_EXTRA:-}
         done ;;
  idlehops) run idle_hops 200 python3 -m bench.idle_hops
         run idle_hops_cpu_latency_held 200 python3 -m bench.idle_hops --hold-cpu-latency ;;
  quant7b) [ -d /tmp/ga7b ] || run ckpt7b 300 python3 -m bench.write_checkpoint /tmp/ga7b --shape 7b
         run quant7b 480 python3 -m bench.quantized_lm /tmp/ga7b --bits 4 --reps 5 --rows 16,256,1024,2816 ;;
esac; done
