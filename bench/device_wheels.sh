#!/usr/bin/env bash
# Builds .whl/: what `dvc repro` needs on the device image (Python 3.12, torch, numpy, PyYAML, sentencepiece,
# huggingface_hub) and the image lacks: DVC and its dependencies, the codecs. The versions are this environment's
# (`pip install -e .` first), so the device runs what the tests ran. Carry it with `carry: [".whl", ...]`; the
# sessions install it with bench/device_setup.sh or bench/gpu_session.sh. About 32 MB: with the CaseOps mirror
# (27 MB) it stays under a call's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pins=()
for pkg in dvc zpaq pyppmd brotli zstandard ruamel.yaml.clib; do
  v=$(version "$pkg"); [ -n "$v" ] || { echo "bench/device_wheels.sh: $pkg is not installed here (pip install -e . first)" >&2; exit 1; }
  pins+=("$pkg==$v")
done
MARK=.whl/.built-by-device_wheels  # only a folder this script made is replaced: never a user's wheels or a link
if [ -e .whl ] || [ -L .whl ]; then
  [ -d .whl ] && [ ! -L .whl ] && [ -f "$MARK" ] || {
    echo "bench/device_wheels.sh: .whl exists and was not made by this script; move it away first" >&2; exit 1; }
  rm -rf .whl
fi
mkdir .whl && touch "$MARK"
# two of DVC's dependencies publish no wheel: built here, pure Python
python3 -m pip wheel -q --no-deps -w .whl nanotime "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
platforms=()
for n in 2_5 2_17 2_24 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --find-links .whl -d .whl "${pins[@]}"
# the image's own (torch's and huggingface_hub's needs): one version of each, or the install stops
for have in pyyaml networkx setuptools filelock typing_extensions packaging tqdm; do
  rm -f .whl/"$have"-[0-9]*.whl
done
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
