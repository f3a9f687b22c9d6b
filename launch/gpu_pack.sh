#!/usr/bin/env bash
# Packs what launch/gpu_stage_hf.py needs on a GPU machine with no network and no Ray or DeepSpeed, into .gpu/
# (git-ignored): Ray and DeepSpeed with the needs its Python lacks, unpacked for CPython 3.12 and compressed (the
# Ray wheel alone is 79 MB; without its Java jar, dashboard bundle and libraries sdft-ray never imports it packs
# to ~31 MB), and a model's config and tokenizer (the weights are drawn there).
#   bash launch/gpu_pack.sh models/qwen2.5-coder-0.5b-instruct
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: gpu_pack.sh MODEL_DIR}
py=${PYVER:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .gpu/shape "$work/whl"
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${plat[@]}" \
  -d "$work/whl" ray==2.60.0 jsonschema referencing rpds-py jsonschema-specifications pydantic pydantic-core \
  annotated-types typing-inspection hjson
# DeepSpeed is an sdist: a pure-Python wheel, its ops left to build at run time (sdft-ray uses torch's AdamW)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$work/whl"
python3 -m pip install -q --no-deps --no-compile --target "$work/site" --python-version "$py" --implementation cp \
  "${plat[@]}" --only-binary=:all: "$work"/whl/*.whl
rm -rf "$work"/site/bin "$work"/site/ray/jars "$work"/site/ray/dashboard/client/build
rm -rf "$work"/site/ray/{tests,rllib,tune,serve,data,train,air}
tar -cf - -C "$work/site" . | xz -T0 -6 >.gpu/site.tar.xz
find "$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .gpu/shape/ \;
du -sh .gpu/site.tar.xz .gpu/shape
