#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU (no Rust or network needed
# there): given a release binary built with `--features cuda`, it
#   1. writes the Qwen3-8B-shaped Q4_K_M file (`bench-model`, random weights, real vocabulary)
#      and the tiny 2-layer Qwen3 of the test suite;
#   2. checks that the tiny Qwen3 and SmolLM2 give the same greedy tokens on CUDA as on our
#      CPU kernels (`device-check`);
#   3. runs `--bench --device cuda` on the 8B file: prefill at 512 and 2048 tokens, decode at
#      an empty context and at depth 4096, peak device memory, and 1/2/4 parallel streams,
#      with the fused decode step on our own matrix kernels and one-pass RMSNorm
#      (GPU_DECODE=fused-own, the default), the same launched as programmatic dependents
#      (GPU_DECODE=fused-own-pdl), and on candle's `mmvq` (GPU_DECODE=fused);
#      GPU_CHECK_PATHS="fused-own ops" etc. picks others;
#   4. serves on the GPU: `my-claw serve` with the 8B file answers one WebChat message and
#      `/api/health` names the GPU; a model whose KV bound cannot fit is refused at load;
#   5. prints one summary table (and writes summary.md and the JSON files to $OUT or
#      target/gpu-check).
# Sized to finish in well under 8 minutes on an H100-class GPU.
#
#   scripts/gpu-check.sh                 # binary: target/release/my-claw, or .gpu/ (below)
#   MY_CLAW=path/to/my-claw scripts/gpu-check.sh
#   scripts/gpu-check.sh device-check    # only step 2 (e.g. once SmolLM2's second half came)
#   scripts/gpu-check.sh bench           # only step 3
#   scripts/gpu-check.sh serve           # only step 4
#   scripts/gpu-check.sh profile         # one decode step under Nsight Compute (ncu): each
#                                        # kernel's time and DRAM bytes, summed by kernel,
#                                        # then our matrix kernels' occupancy and stall reasons
#   GPU_DECODE=fused scripts/gpu-check.sh profile   # the same with candle's matrix kernels
#
# On a machine without Rust, `scripts/gpu-bundle.sh` (run where the binary was built) packs
# the binary, the tokenizer and SmolLM2 into .gpu/ (and .gpu-b/, the second half of SmolLM2
# for a second call when one call may carry only 64 MiB); this script unpacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
only=${1:-all}
out=${OUT:-target/gpu-check}
work=${GPU_CHECK_WORK:-/tmp/my-claw-gpu-check}
stash=/tmp/my-claw-gpu-stash
mkdir -p "$out" "$work" "$stash"
export DATA_DIR="$work/data" LOG=${LOG:-warn}
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started ))s] $*"; }

# --- the binary and its files ------------------------------------------------------------
bin=${MY_CLAW:-}
if [ -z "$bin" ]; then
  if [ -f .gpu/my-claw.gz ]; then
    gzip -dc .gpu/my-claw.gz > "$work/my-claw" && chmod +x "$work/my-claw"
    bin="$work/my-claw"
  elif [ -x "$work/my-claw" ]; then
    bin="$work/my-claw"
  else
    bin=target/release/my-claw
  fi
fi
[ -x "$bin" ] || { echo "no my-claw binary (build with --features cuda, or run scripts/gpu-bundle.sh)"; exit 1; }
tokenizer=tests/assets/qwen3/tokenizer.json
if [ ! -f "$tokenizer" ] && [ -f .gpu/tokenizer.json.gz ]; then
  gzip -dc .gpu/tokenizer.json.gz > "$work/tokenizer.json"
fi
[ -f "$tokenizer" ] || tokenizer="$work/tokenizer.json"

# SmolLM2: the real file when present, else the bundle's halves (the first half may have
# come in an earlier call and been stashed).
[ -f .gpu/smollm2.gz.part-a ] && cp .gpu/smollm2.gz.part-a "$stash/"
smollm2=$(ls models/SmolLM2-*.gguf 2>/dev/null | head -1)
if [ -z "$smollm2" ] && [ -f "$stash/smollm2.gz.part-a" ] && [ -f .gpu-b/smollm2.gz.part-b ]; then
  cat "$stash/smollm2.gz.part-a" .gpu-b/smollm2.gz.part-b | gzip -dc > "$work/smollm2.gguf" \
    && smollm2="$work/smollm2.gguf"
fi

# cuBLAS, cuRAND and the CUDA runtime: from the system, the toolchain cache
# (scripts/cuda-toolchain.sh), a CUDA install, or Python's NVIDIA wheels (PyTorch brings them).
findable() {
  ldconfig -p 2>/dev/null | grep -q "$1" && return 0
  local dir
  for dir in ${LD_LIBRARY_PATH//:/ }; do [ -e "$dir/$1" ] && return 0; done
  return 1
}
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
  findable "$lib" && continue
  found=$(find "${XDG_CACHE_HOME:-$HOME/.cache}/my-claw" /usr/local/cuda*/lib64 /usr/local/lib /opt /usr/lib \
    -name "$lib" -print -quit 2>/dev/null)
  [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -1)"
"$bin" --version
status=0
# Programmatic dependent launch needs compute capability 9.0: older GPUs run fused-own-pdl
# as fused-own (and say so), so it is checked and benched only where it exists.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
pdl=$([ "${cap%%.*}" -ge 9 ] 2>/dev/null && echo fused-own-pdl || true)

# --- 1. files --------------------------------------------------------------------------------
model8b="$work/qwen3-8b-q4_k_m.gguf"
if [ ! -f "$model8b" ] && [ "$only" != device-check ]; then
  say "writing the Qwen3-8B-shaped Q4_K_M file"
  "$bin" bench-model --shape qwen3-8b --quant q4_k_m --out "$model8b" --tokenizer "$tokenizer" 2>/dev/null || status=1
fi
tiny="$work/tiny-qwen3.gguf"
[ -f "$tiny" ] || "$bin" bench-model --tiny --out "$tiny" --tokenizer "$tokenizer" 2>/dev/null || status=1
tiny_llama="$work/tiny-llama.gguf"
[ -f "$tiny_llama" ] || "$bin" bench-model --tiny-llama --out "$tiny_llama" --tokenizer "$tokenizer" \
  2>/dev/null || status=1

# --- 2. same greedy tokens on CUDA as on the CPU --------------------------------------------
: > "$out/device-check.jsonl"
case $only in serve | bench | profile) tiny="" tiny_llama="" smollm2="" ;; esac
for model in $tiny $tiny_llama $smollm2; do
  # f32 keys and values through candle's ops: the strict comparison; f16 through the fused
  # decode step on our own matrix kernels: what runs in production; f16 through the fused
  # step on candle's; f16 through candle's ops: the numbers the fused step replaces; and
  # our matrix kernels launched as programmatic dependents (not yet the default).
  for variant in f32:ops f16:fused-own ${pdl:+f16:$pdl} f16:fused f16:ops; do
    kv=${variant%%:*} path=${variant##*:}
    say "device-check $(basename "$model") (KV $kv, decode $path)"
    line=$(GPU_DECODE=$path "$bin" device-check --device cuda --model "$model" --tokens 24 \
      --kv-type "$kv") || status=1
    echo "$line" >> "$out/device-check.jsonl"
    # f16 must have run the path asked for (f32 always runs the ops): with fused-own, a
    # step whose matrix kernels disagreed with candle's at load reports fused, and fails.
    want=$([ "$kv" = f16 ] && echo "$path" || echo ops)
    grep -q "\"decode_path\":\"$want\"" <<< "$line" || { say "  decode path is not $want"; status=1; }
  done
done
# Long contexts on the tiny Qwen3: about 300 and 5,000 prompt tokens put the fused
# attention's positions into several splits, and then several chunks per split.
if [ -n "$tiny" ]; then
  for repeat in 30 500; do
    prompt=$(python3 -c "print('The quick brown fox jumps over the lazy dog. ' * $repeat)")
    for path in fused-own $pdl ops; do
      say "device-check $(basename "$tiny") with a long prompt (x$repeat, KV f16, decode $path)"
      GPU_DECODE=$path "$bin" device-check --device cuda --model "$tiny" --tokens 24 \
        --kv-type f16 --prompt "$prompt" >> "$out/device-check.jsonl" || status=1
    done
  done
fi
if [ -z "$smollm2" ] && { [ "$only" = all ] || [ "$only" = device-check ]; }; then
  say "SmolLM2 not here (models/ or the bundle's two halves): checked on the tiny models only"
fi

# --- 3. the bench ----------------------------------------------------------------------------
if [ "$only" = all ] || [ "$only" = bench ]; then
# The fused step on our own matrix kernels (production), with them launched as programmatic
# dependents (to decide whether that becomes the default), and on candle's `mmvq`, one after
# the other on the same GPU, so that they can be compared.
for path in ${GPU_CHECK_PATHS:-fused-own $pdl fused}; do
  suffix=$([ $path = fused-own ] && echo "" || echo "-$path")
  say "bench on CUDA ($path decode): prefill 512/2048/4096, decode at empty context and after each prompt"
  # The load's log too: with fused-own it says how closely our kernels agreed with the
  # measured ones (or why they were not used).
  if ! GPU_DECODE=$path LOG=info timeout 300 "$bin" --bench --device cuda --model "$model8b" \
    --prompt-tokens 512,2048,4096 --n-ctx 8192 --gen-tokens 64 --runs 3 --turns 2 --json \
    > "$out/bench-cuda$suffix.json" 2> "$out/bench-cuda$suffix.log"; then
    status=1
  fi
  grep -q "\"decode_path\": \"$path\"" "$out/bench-cuda$suffix.json" \
    || { say "  the bench's decode path is not $path"; status=1; }
  say "bench on CUDA ($path decode): 1, 2 and 4 parallel streams"
  GPU_DECODE=$path timeout 120 "$bin" --bench --device cuda --model "$model8b" --parallel 1,2,4 \
    --gen-tokens 64 --runs 2 --json > "$out/bench-cuda-parallel$suffix.json" || status=1
done
fi

# --- 4. the server on the GPU ---------------------------------------------------------------
if [ "$only" = all ] || [ "$only" = serve ]; then
  say "serve on the GPU: one WebChat answer from the 8B file, then /api/health"
  port=39217
  token=gpu-check-token-0123456789abcdef
  rm -rf "$work/serve-data"
  DATA_DIR="$work/serve-data" WEBCHAT_TOKEN=$token MODEL_MAIN="$model8b" MODEL_FAST="$model8b" \
    MODEL_SMART="$model8b" DEVICE=${GPU_CHECK_DEVICE:-cuda} BIND=127.0.0.1:$port LOG=info \
    "$bin" serve > "$out/serve.log" 2>&1 &
  server=$!
  python3 - "$port" "$token" > "$out/serve-check.json" <<'EOF' || status=1
import json, sys, time, urllib.request
port, token = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
auth = {"Authorization": f"Bearer {token}"}
for _ in range(300):  # at most 60 s for the server to listen
    try:
        urllib.request.urlopen(base + "/api/health", timeout=2)
        break
    except Exception:
        time.sleep(0.2)
body = json.dumps({"message": "Say hello in five words.", "tier": "main"}).encode()
request = urllib.request.Request(base + "/api/chat", body, {**auth, "Content-Type": "application/json"})
tokens, done, error = 0, None, None
with urllib.request.urlopen(request, timeout=120) as response:
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if event.get("type") == "token":
            tokens += 1
        elif event.get("type") == "done":
            done = event
            break
        elif event.get("type") == "error":
            error = event
            break
health = json.load(urllib.request.urlopen(urllib.request.Request(base + "/api/health", headers=auth)))
main = next(t for t in health["models"] if t["tier"] == "main")
print(json.dumps({"tokens": tokens, "done": done is not None, "error": error, "main_state": main["state"], "device": main.get("device")}))
ok = done and tokens > 0 and (main.get("device") or {}).get("device", "").startswith("cuda")
sys.exit(0 if ok else 1)
EOF
  kill "$server" 2>/dev/null; wait "$server" 2>/dev/null
  grep -m1 "model loaded" "$out/serve.log" | sed 's/^.*INFO //' > "$out/serve-loaded.txt"
  say "a model whose KV bound cannot fit is refused at load"
  echo hi | GPU_MEMORY_BUDGET=1000GiB KV_CACHE_MEMORY=200GiB timeout 60 "$bin" chat --device cuda \
    --model "$model8b" > "$out/over-budget.txt" 2>&1 && status=1
  grep -q "needs .* of GPU memory" "$out/over-budget.txt" || status=1
fi

# --- profile: where a decode step's time goes ---------------------------------------------
# The first decode step of a shape runs without a graph (later ones replay it), so ncu sees
# that step's kernels one by one: each is timed alone (no cache flush, clocks left alone),
# then they are summed by kernel. With the graph the step is GPU-bound, so these sums are
# what a step takes. The plan's first step is bracketed by cuProfilerStart/Stop, so with
# collection off from the start ncu sees that step only, not the load's check and timing of
# our kernels (tens of thousands of launches).
if [ "$only" = profile ]; then
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { say "no ncu here"; exit 1; }
  # Clocks and caches left alone; a prefill of 16 tokens, then decode steps.
  ncu_run=(timeout 300 "$ncu" --clock-control none --cache-control none --profile-from-start off)
  one_step=("$bin" --bench --device cuda --model "$model8b" --prompt-tokens 16 --gen-tokens 2 --runs 1)
  say "one decode step of the 8B shape under $ncu"
  "${ncu_run[@]}" \
    --kernel-name regex:'mmvq_gguf|mv_q|rms_norm_q8|attn_|silu_mul_q8' --launch-count 2000 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --page raw \
    "${one_step[@]}" \
    > "$out/ncu.csv" 2> "$out/ncu.err" || { tail -5 "$out/ncu.err"; exit 1; }
  python3 - "$out/ncu.csv" <<'EOF' | tee "$out/profile.md"
import collections, csv, io, sys
text = open(sys.argv[1]).read()
rows = list(csv.reader(io.StringIO(text[text.index('"ID"'):])))
head, units = rows[0], rows[1]
name, t, b = (head.index(k) for k in ("Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum"))
to_s = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "nsecond": 1e-9, "usecond": 1e-6}[units[t]]
to_b = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}[units[b]]
data = [r for r in rows[2:] if len(r) == len(head)]
names = [r[name].split("(")[0] for r in data]
# One step: from its first norm to the output head. With fused-own the load's check of our
# kernels against candle's (every matrix, then the norms) comes first and has no attention:
# the step's first norm is the last one before the first attention kernel. The output head
# is the product that follows a norm and precedes no product, attention or SwiGLU (q/k/v
# and gate/up follow a norm too, then attention or SwiGLU; the others follow attention or
# SwiGLU). Grids say nothing: our kernels' are capped at what fits on the GPU.
is_product = lambda n: n.startswith(("mmvq_gguf_q", "mv_q")) and not n.startswith("mmvq_gguf_quantize")
attn = next(i for i, n in enumerate(names) if n.startswith("attn_partial"))
first = max(i for i, n in enumerate(names[:attn]) if n.startswith("rms_norm_q8"))
last = next(i for i in range(attn, len(names)) if is_product(names[i])
            and names[i - 1].startswith("rms_norm_q8")
            and (i + 1 == len(names) or not (is_product(names[i + 1]) or names[i + 1]
                                             .startswith(("attn_partial", "silu_mul_q8")))))
step = data[first:last + 1]
agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
for r in step:
    k = agg[r[name].split("(")[0]]
    k[0] += 1
    k[1] += float(r[t].replace(",", "")) * to_s
    k[2] += float(r[b].replace(",", "")) * to_b
print("| kernel | launches | time | DRAM read | rate |\n| --- | --- | --- | --- | --- |")
for k, (n, sec, byt) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"| {k} | {n} | {sec * 1e3:.3f} ms | {byt / 1e6:.1f} MB | {byt / sec / 1e12:.2f} TB/s |")
print(f"| all ({len(step)} kernels) | | {sum(v[1] for v in agg.values()) * 1e3:.3f} ms | | |")
EOF
  # Why our matrix kernels wait: one step's worth of their launches with the warp state
  # statistics (what the average warp is stalled on per issued instruction) and occupancy,
  # grouped by kernel and matrix size. Not fatal: the table above stands alone.
  say "our matrix kernels' stall reasons under $ncu"
  if "${ncu_run[@]}" --kernel-name regex:'mv_q' \
    --launch-count 400 --section WarpStateStats --section Occupancy --section LaunchStats \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,smsp__issue_active.avg.pct_of_peak_sustained_active \
    --csv --page raw \
    "${one_step[@]}" \
    > "$out/ncu-stalls.csv" 2> "$out/ncu-stalls.err"; then
    python3 - "$out/ncu-stalls.csv" <<'EOF' | tee "$out/stalls.md"
import collections, csv, io, re, sys
text = open(sys.argv[1]).read()
rows = list(csv.reader(io.StringIO(text[text.index('"ID"'):])))
head, units = rows[0], rows[1]
data = [r for r in rows[2:] if len(r) == len(head)]
col = {h: i for i, h in enumerate(head)}
name = lambda r: r[col["Kernel Name"]].split("(")[0]
step = [r for r in data if name(r).endswith("_n1")]  # one step of one row
def num(r, key):
    try:
        return float(r[col[key]].replace(",", ""))
    except (KeyError, ValueError):
        return 0.0
to_b = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}[units[col["dram__bytes_read.sum"]]]
stall = {m.group(1): h for h in head
         if (m := re.fullmatch(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio", h))}
groups = collections.defaultdict(list)
for r in step:
    groups[(name(r), round(num(r, "dram__bytes_read.sum") * to_b / 1e6))].append(r)
print("| kernel | MB | launches | registers | warps active | issue active | stalls per issued instruction (top 5) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for (k, mb), rs in sorted(groups.items(), key=lambda kv: -sum(num(r, "gpu__time_duration.sum") for r in kv[1])):
    mean = lambda key: sum(num(r, key) for r in rs) / len(rs)
    top = sorted(((mean(h), s) for s, h in stall.items()), reverse=True)[:5]
    print(f"| {k} | {mb} | {len(rs)} | {mean('launch__registers_per_thread'):.0f} "
          f"| {mean('sm__warps_active.avg.pct_of_peak_sustained_active'):.0f} % "
          f"| {mean('smsp__issue_active.avg.pct_of_peak_sustained_active'):.0f} % "
          f"| {', '.join(f'{s} {v:.2f}' for v, s in top)} |")
EOF
  else
    tail -5 "$out/ncu-stalls.err"
  fi
  exit 0
fi

# --- 5. summary ------------------------------------------------------------------------------
python3 - "$out" <<'EOF' | tee "$out/summary.md"
import json, sys, os
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception as e:
        return {"error": str(e)}
b = load("bench-cuda.json"); p = load("bench-cuda-parallel.json")
others = [(load(f"bench-cuda-{path}.json"), load(f"bench-cuda-parallel-{path}.json"))
          for path in ("fused-own-pdl", "fused", "ops") if os.path.exists(os.path.join(out, f"bench-cuda-{path}.json"))]
# Nominal memory bandwidth of the card (bytes/s), for the roofline.
bw = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12,
      "A100-SXM4-40GB": 1.56e12, "L40S": 0.864e12, "RTX 4090": 1.008e12}
name = b.get("device_name", "?")
bandwidth = next((v for k, v in bw.items() if k in name), None)
weights = b.get("weights_mb", 0) * 1e6
print(f"| GPU check | {name} ({b.get('device', '?')}) |")
print("| --- | --- |")
print(f"| model | {os.path.basename(str(b.get('model_file', '?')))} ({b.get('quantization')}, {b.get('weights_mb')} MB of weights on the device) |")
print(f"| load | {b.get('load_ms')} ms |")
pre = b.get("prefill_tok_s", {}); dec = b.get("decode_tok_s_by_prompt", {})
for n in ("512", "2048", "4096"):
    if n in pre:
        print(f"| prefill {n} tokens | {pre[n]} tok/s |")
for bench, par_bench in [(b, p)] + others:
    path = bench.get("decode_path", "?")
    dec = bench.get("decode_tok_s_by_prompt", {})
    for key, label in (("short", "empty context"), ("4096", "depth 4096")):
        if key in dec:
            roof = f", {dec[key] * weights / bandwidth * 100:.1f} % of the {bandwidth / 1e12:.2f} TB/s roofline" if bandwidth else ""
            print(f"| decode at {label} ({path}) | {dec[key]} tok/s{roof} |")
    par = par_bench.get("parallel_decode_tok_s", {})
    if par:
        print(f"| parallel decode, 1/2/4 streams ({par_bench.get('decode_path', '?')}) | {' / '.join(str(par.get(k, '-')) for k in ('1', '2', '4'))} tok/s |")
try:
    own_log = [l for l in open(os.path.join(out, "bench-cuda.log")) if "measured" in l]
    print(f"| fused-own load check | {own_log[0].strip()[-300:] if own_log else 'no line in the log'} |")
except OSError:
    pass
# Our matrix kernel families, timed at load on this GPU (`DecodePlan::tune`): per group of
# matrices, µs per matrix for 1 activation row (each family, registers-staged first) and
# which family took each count of rows.
import re
try:
    for l in open(os.path.join(out, "bench-cuda.log")):
        m = re.search(r"families timed matrices=(.*) families=(.*) micros_per_matrix_by_rows=(.*) chosen_by_rows=(.*)$", l)
        if m:
            one = m.group(3).split(", ")[0].split(": ")[-1]
            print(f"| kernel families, {m.group(1)} | {m.group(2)}: {one} µs at 1 row; chosen for 1-8 rows: {m.group(4)} |")
except OSError:
    pass
print(f"| peak device memory | {b.get('peak_device_memory_mb')} MB (bench), {p.get('peak_device_memory_mb')} MB (parallel) |")
print(f"| turn TTFT with KV reuse | {b.get('turn_ttft_ms')} ms |")
for line in open(os.path.join(out, "device-check.jsonl")):
    try:
        c = json.loads(line)
    except ValueError:
        continue
    verdict = "same greedy tokens" if c["same_tokens"] else "DIFFERENT greedy tokens"
    print(f"| {c['model']} CUDA vs CPU, {c['prompt_tokens']} prompt tokens, KV {c['kv_type']}, decode {c.get('decode_path', '?')} | {verdict} ({len(c['cpu_tokens'])}), max logit diff {c['max_abs_logit_diff']:.4f} ({c['max_rel_logit_diff'] * 100:.2f} % of spread), top-1 disagreements {c['top1_disagreements']} (unexplained {c['unexplained_disagreements']}) |")
if "error" in b:
    print(f"| bench error | {b['error']} |")
try:
    s = json.load(open(os.path.join(out, "serve-check.json")))
    d = s.get("device") or {}
    used = d.get("device_memory_used_bytes") or 0
    print(f"| serve on the GPU | {'answered' if s['done'] else 'NOT answered'} ({s['tokens']} tokens); /api/health main: {d.get('device')} {d.get('device_name')}, weights {d.get('weights_bytes', 0) / 1e6:.0f} MB, GPU memory in use {used / 1e6:.0f} MB |")
except Exception as e:
    print(f"| serve on the GPU | not run or failed ({e}) |")
try:
    refusal = [l for l in open(os.path.join(out, "over-budget.txt")) if "GPU memory" in l]
    print(f"| over the GPU's memory | {refusal[0].strip() if refusal else 'NOT refused'} |")
except Exception as e:
    print(f"| over the GPU's memory | not run ({e}) |")
EOF
say "done (status $status)"
exit $status
