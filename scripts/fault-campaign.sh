#!/usr/bin/env bash
# Fault campaign for eslm-train (issue 12): SIGKILL at random moments during training and checkpoint writes,
# concurrent trainers on one --out, a full disk (a small tmpfs, when this user may mount one), and corrupt files
# of every kind. Prints one count line per scenario; docs/reliability.md records a run.
#
#   scripts/fault-campaign.sh [KILLS] [CONCURRENT]     (defaults 40 and 10; about 3 minutes on 2 cores)
#
# Needs a built binary: `cargo build -p eslm-train -p eslm-data` (CARGO_TARGET_DIR honoured), or set BIN / DATA_BIN.
set -u
KILLS=${1:-40}
CONC=${2:-10}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/debug/eslm-train}
DATA_BIN=${DATA_BIN:-$TARGET/debug/eslm-data}
WORK=$(mktemp -d /tmp/eslm-faults.XXXXXX)
# Private copies: a concurrent cargo build must not replace the binaries under test.
cp "$BIN" "$WORK/eslm-train" && cp "$DATA_BIN" "$WORK/eslm-data" || { echo "build eslm-train and eslm-data first"; exit 2; }
BIN=$WORK/eslm-train
DATA_BIN=$WORK/eslm-data
# synth-tiny (about 2 MB of weights + 4 MB of optimizer state) checkpointed every step: most of the wall-clock is
# checkpoint writing, so random kills land inside writes, renames and pruning.
SMALL=(--model synth-tiny --synthetic-documents 256 -b 2 -t 32 --eval-every 0 --eval-batches 1 --no-progress
       --checkpoint-every 1 --keep-last 2)
panics=0
note_panic() { if grep -q "panicked" "$1"; then panics=$((panics + 1)); echo "PANIC: $1"; fi; }

# 1. SIGKILL at random moments; then --resume must work (or, before any checkpoint exists, a fresh --overwrite).
resumed=0; fresh=0; failed=0
out=$WORK/kill
for i in $(seq 1 "$KILLS"); do
  if [ -d "$out/checkpoints" ] && ls "$out"/checkpoints/step_*/COMPLETE >/dev/null 2>&1; then mode=(--resume); else mode=(--overwrite); fi
  "$BIN" "${SMALL[@]}" --steps 1000000 --out "$out" "${mode[@]}" >/dev/null 2>"$WORK/kill-$i.err" &
  pid=$!
  sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.3f", 0.3 + rand() * 1.2 }')"
  kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  note_panic "$WORK/kill-$i.err"
  # Verify: a short resumed run from whatever the kill left behind.
  last=$(ls -d "$out"/checkpoints/step_* 2>/dev/null | grep -v diverged | sort | tail -1)
  if [ -n "$last" ] && ls "$out"/checkpoints/step_*/COMPLETE >/dev/null 2>&1; then
    step=$((10#${last##*step_}))
    if "$BIN" "${SMALL[@]}" --steps $((step + 1)) --out "$out" --resume >/dev/null 2>"$WORK/verify-$i.err"; then
      resumed=$((resumed + 1))
    else
      failed=$((failed + 1)); echo "RESUME FAILED after kill $i:"; cat "$WORK/verify-$i.err"
    fi
    note_panic "$WORK/verify-$i.err"
  else
    fresh=$((fresh + 1))
  fi
done
leftovers=$(ls -a "$out/checkpoints" 2>/dev/null | grep -c '^\.step_' || true)
# Kills that landed inside a checkpoint write or re-save: the next trainer reported cleaning up after them.
midwrite=$(cat "$WORK"/verify-*.err 2>/dev/null | grep -c "removed leftover\|recovered" || true)
echo "sigkill: $KILLS kills, $resumed resumed cleanly, $fresh had no checkpoint yet, $failed resume failures, $midwrite interrupted checkpoint writes cleaned up, $leftovers hidden leftovers after the last recovery"

# 2. Two trainers on one --out at the same moment: exactly one may run.
one=0; both=0; none=0
for i in $(seq 1 "$CONC"); do
  o=$WORK/conc-$i
  "$BIN" "${SMALL[@]}" --steps 30 --out "$o" >/dev/null 2>"$WORK/conc-$i-a.err" & a=$!
  "$BIN" "${SMALL[@]}" --steps 30 --out "$o" >/dev/null 2>"$WORK/conc-$i-b.err" & b=$!
  wait $a; ra=$?; wait $b; rb=$?
  note_panic "$WORK/conc-$i-a.err"; note_panic "$WORK/conc-$i-b.err"
  ok=$(( (ra == 0) + (rb == 0) ))
  refused=$(cat "$WORK/conc-$i-a.err" "$WORK/conc-$i-b.err" | grep -c "another eslm-train process\|is not empty" || true)
  if [ $ok -eq 1 ] && [ "$refused" -ge 1 ]; then one=$((one + 1)); elif [ $ok -eq 2 ]; then both=$((both + 1)); else none=$((none + 1)); fi
done
echo "concurrent: $CONC pairs, $one with exactly one run and the other refused, $both with both succeeding, $none other"

# 3. Full disk: a 3 MiB tmpfs; the first checkpoint (about 6 MB) cannot fit.
full=$WORK/full
mkdir -p "$full"
if mount -t tmpfs -o size=3m tmpfs "$full" 2>/dev/null; then
  "$BIN" "${SMALL[@]}" --steps 3 --out "$full/run" >/dev/null 2>"$WORK/full.err"; rc=$?
  note_panic "$WORK/full.err"
  tmp=$(ls -a "$full/run/checkpoints" 2>/dev/null | grep -c '^\.step_' || true)
  free=$(df -k "$full" | awk 'NR==2 { print $4 }')
  named=$(grep -c "No space left" "$WORK/full.err" || true)
  echo "full disk: exit $rc, error names ENOSPC: $named, temporary checkpoints left: $tmp, free KiB after: $free"
  umount "$full"
else
  echo "full disk: skipped (cannot mount a tmpfs here)"
fi

# 4. Corrupt files: each file of a checkpoint altered or truncated; --resume must refuse naming it, never panic.
base=$WORK/corrupt-base
"$BIN" "${SMALL[@]}" --steps 2 --out "$base" >/dev/null 2>&1
refused=0; named=0; accepted=0; total=0
for f in model.safetensors config.json optimizer_m.bin optimizer_v.bin optimizer.json trainer.json COMPLETE; do
  for how in flip truncate; do
    total=$((total + 1))
    o=$WORK/corrupt-$f-$how
    cp -r "$base" "$o"
    ck=$(ls -d "$o"/checkpoints/step_* | sort | tail -1)
    if [ $how = flip ]; then
      size=$(stat -c %s "$ck/$f")
      printf '\x5a' | dd of="$ck/$f" bs=1 seek=$((size / 2)) conv=notrunc 2>/dev/null
    else
      truncate -s $(( $(stat -c %s "$ck/$f") / 2 )) "$ck/$f"
    fi
    if "$BIN" "${SMALL[@]}" --steps 4 --out "$o" --resume >/dev/null 2>"$o.err"; then
      accepted=$((accepted + 1)); echo "ACCEPTED corrupt $f ($how)"
    else
      refused=$((refused + 1))
      grep -q "$f\|COMPLETE\|no complete checkpoint" "$o.err" && named=$((named + 1))
    fi
    note_panic "$o.err"
  done
done
# Other corrupt inputs: a TOML config with NaN, a partial metrics line for plot, a truncated shard for info.
other=0; other_ok=0
printf 'steps = 1\nlr = nan\n' > "$WORK/bad.toml"
other=$((other + 1))
if ! "$BIN" --config "$WORK/bad.toml" --out "$WORK/toml" 2>"$WORK/toml.err" >/dev/null; then
  grep -q '`lr`' "$WORK/toml.err" && other_ok=$((other_ok + 1))
fi
cp -r "$base" "$WORK/plotrun"; printf '{"kind":"eval","step":9,"tok' >> "$WORK/plotrun/metrics.jsonl"
other=$((other + 1)); "$BIN" plot "$WORK/plotrun" --out "$WORK/p.svg" 2>"$WORK/plot.err" >/dev/null && grep -q "skipped line" "$WORK/plot.err" && other_ok=$((other_ok + 1))
"$DATA_BIN" synthetic --out "$WORK/data" --train-documents 8 --val-documents 2 >/dev/null 2>&1
shard=$(ls "$WORK"/data/train_*.bin | head -1); truncate -s 100 "$shard"
other=$((other + 1))
if ! "$DATA_BIN" info "$shard" 2>"$WORK/info.err" >/dev/null; then
  grep -q "$(basename "$shard")" "$WORK/info.err" && other_ok=$((other_ok + 1))
fi
for e in "$WORK"/toml.err "$WORK"/plot.err "$WORK"/info.err; do note_panic "$e"; done
echo "corrupt checkpoints: $total cases, $refused refused ($named naming the file), $accepted accepted"
echo "corrupt other inputs: $other cases, $other_ok handled with a message naming the file/key"
echo "panics: $panics"
rm -rf "$WORK"
