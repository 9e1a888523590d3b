#!/usr/bin/env bash
# Makes Fashion-MNIST available offline through Debian's dataset-fashion-mnist package when
# it is missing and apt can install it. Without apt the program falls back to TFDS.
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -n "${JAXBN_DATA_DIR:-}" ]; then exit 0; fi
command -v apt-get >/dev/null || { echo "apt-get not found; train.lenet will try TFDS" >&2; exit 0; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
(as_root apt-get update -q && as_root apt-get install -y -q dataset-fashion-mnist) \
  || echo "could not install dataset-fashion-mnist; train.lenet will try TFDS" >&2
