#!/usr/bin/env bash
# A/B of torch's THP allocator flag on the 1.5B LoRA trainer (SFT steps: the trainer alone), then B/A again.
cd "$(dirname "$0")/../.."  # the repository root; results under bench_results/thp/
out=bench_results/thp; mkdir -p $out
lscpu | grep "Model name"
cpu() { awk '/^cpu /{print $2+$3, $4, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
run() {  # $1 tag, rest: env
  tag=$1; shift
  a=($(cpu))
  env "$@" sdft-ray bench --config configs/v3_qwen1.5b_lora.yaml --steps 4 --out $out/$tag \
    train.algo=sft eval.every=0 data.train=docs/results/v3_qwen1.5b/data/train.jsonl > $out/$tag.log 2>&1
  b=($(cpu))
  python - "$tag" "${a[@]}" "${b[@]}" <<'PY'
import json, sys
tag = sys.argv[1]; u0, s0, t0, u1, s1, t1 = map(int, sys.argv[2:])
r = json.load(open(f"bench_results/thp/{tag}/bench.json"))["results"][0]
print(f"{tag}: step {r['wall_s']/r['steps']:.1f} s (mean of {r['steps']}), forward {r['mean_forward_s']:.1f}, backward {r['mean_backward_s']:.1f}, "
      f"whole bench user {100*(u1-u0)/(t1-t0):.0f}% sys {100*(s1-s0)/(t1-t0):.0f}%, peak rss {r['peak_rss_gb']}")
PY
}
run sft_default
run sft_thp THP_MEM_ALLOC_ENABLE=1
run sft_thp2 THP_MEM_ALLOC_ENABLE=1
run sft_default2
