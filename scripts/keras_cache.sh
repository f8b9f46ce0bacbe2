#!/usr/bin/env bash
# Make the offline Keras cache visible to Keras: copy ../shared/keras-cache (beside the checkout) into
# ~/.keras, without overwriting anything already there. tf_keras reads only ~/.keras (it ignores
# KERAS_HOME), and ../shared must never be written to, so this copies rather than links.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${IMGCLS_KERAS_CACHE_SOURCE:-$here/../shared/keras-cache}"
dest="$HOME/.keras"
if [ ! -d "$src" ]; then
  echo "keras-cache: no offline cache at $src; Keras will use $dest and download what is missing" >&2
  exit 0
fi
mkdir -p "$dest"
for sub in models datasets; do
  if [ -d "$src/$sub" ]; then
    mkdir -p "$dest/$sub"
    cp -rn "$src/$sub/." "$dest/$sub/"
  fi
done
echo "keras-cache: $src -> $dest ($(find "$dest/models" -name '*.h5' | wc -l) weight file(s), $(find "$dest/datasets" -type f | wc -l) dataset file(s))"
