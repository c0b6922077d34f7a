# Shared by part1.sh, part2.sh and part3.sh (sourced, not run): stages, their time limits, the log and the JSON.
#
# A stage is one command under its own time limit (`timeout`). Its output is appended to a log under $OUT; its
# record (limit, seconds taken, exit status, ok / failed / timed out) goes to $OUT/partN.json, which is rewritten
# after every stage, so a part cut off keeps what it measured. A stage that fails or times out is recorded and the
# next one still runs. Stages started with `stage_bg` run side by side until `stage_wait`.
#
# Environment:
#   OUT        the folder whose files come back (required, except with DRY_RUN=1)
#   DRY_RUN=1  print each stage with its limit and the part's bound (the sum of the limits, plus GRACE_S each,
#              along the stages run one after another; side-by-side stages count once, the longest), run nothing
#   STAGES     comma-separated stage names: run only these (e.g. STAGES=bench_d to rerun one stage)
#   BUILD=0    parts 2 and 3: neither check nor build the extension (part 1: leave out its build stage with STAGES)
#   DEVICE     cuda (default); cpu rehearses the same commands on small sizes on a machine without a GPU, each
#              stage given LIMIT_SCALE (default 5 there) times its limit: a rehearsal proves the commands and files,
#              not the limits (the bounds printed stay the GPU's)
#   PYTHON     the interpreter (default python3)
# shellcheck shell=bash

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
# A part must fit a 4-minute slot of the lent GPU's 15 minutes (docs/gpu-check.md).
PART_LIMIT_S=240
# The in-place build of the extension, when a part finds none for these sources (benchmarks/gpu/build.sh).
BUILD_LIMIT_S=120
CHECK_LIMIT_S=30
# A stage still running GRACE_S after its limit is killed (timeout -k); the bound counts it for every stage.
GRACE_S=2
# shellcheck disable=SC2034  # PY: used by the parts that source this file
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-}
if [ "$DRY_RUN" = 1 ]; then
  # shellcheck disable=SC2016  # the name itself, printed in the commands
  OUT=${OUT:-'$OUT'}
fi
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "$DEVICE" = cuda ]; then
  LIMIT_SCALE=${LIMIT_SCALE:-1}
  export POF_FAST_REQUIRE_EXT=1  # a benchmark never falls back silently to the torch backend
else
  LIMIT_SCALE=${LIMIT_SCALE:-5}
fi

# part_begin N TITLE: start part N (its log partN.log and its JSON partN.json under $OUT).
part_begin() {
  PART=$1 TITLE=$2 CLOCK=0 BG_END=0 BUILD_EXTRA=0 BG_PIDS=() PART_START=$SECONDS
  STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  if [ "$DRY_RUN" = 1 ]; then
    echo "part $PART: $TITLE"
    return
  fi
  OUT=${OUT:?set OUT to the folder whose files come back}
  mkdir -p "$OUT"
  LOG=part$PART.log
  RECORDS=$(mktemp)
  say "part $PART ($DEVICE): $TITLE; started $STARTED"
  write_json false
}

# say LINE: to stdout (the device tool's output tail) and to the part's log.
say() {
  echo "$*"
  [ "$DRY_RUN" = 1 ] || echo "$*" >> "$OUT/$LOG"
}

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}

# write_json FINISHED: partN.json from the records so far (written aside, then renamed: never half a file).
write_json() {
  local tmp="$OUT/part$PART.json.$BASHPID"
  {
    printf '{"part": %s, "title": %s, "device": %s, "started_utc": %s, "bound_s": %s, "finished": %s,' \
      "$PART" "$(json_str "$TITLE")" "$(json_str "$DEVICE")" "$(json_str "$STARTED")" "$((CLOCK + BUILD_EXTRA))" "$1"
    printf ' "seconds": %s, "stages": [' "$((SECONDS - PART_START))"
    paste -sd, "$RECORDS"
    printf ']}\n'
  } > "$tmp" && mv -f "$tmp" "$OUT/part$PART.json"
}

quoted() {  # the command as one would type it
  # shellcheck disable=SC2016  # sed's $OUT is the printed name
  printf '%q ' "$@" | sed 's/ $//; s/\\\$OUT/$OUT/g; s/\\,/,/g'
}

selected() {
  [ -z "$STAGES" ] || [[ ",$STAGES," == *",$1,"* ]]
}

# run_stage NAME LIMIT LOG CMD...: run CMD under timeout, append its output to $OUT/LOG, record it.
run_stage() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)) log=$3 start=$SECONDS rc status
  shift 3
  echo "=== stage $name (limit $limit s, $(date -u +%H:%M:%S) UTC): $(quoted "$@")" >> "$OUT/$log"
  timeout -k "$GRACE_S" "$limit" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out" ;;
    *) status=failed ;;
  esac
  printf '{"name": %s, "limit_s": %s, "seconds": %s, "exit": %s, "status": %s, "log": %s, "command": %s}\n' \
    "$(json_str "$name")" "$limit" "$((SECONDS - start))" "$rc" "$(json_str "$status")" "$(json_str "$log")" \
    "$(json_str "$(quoted "$@")")" >> "$RECORDS"
  write_json false
  say "stage $name: $status (exit $rc) after $((SECONDS - start)) s (limit $limit s; output in $log)"
  return "$rc"
}

# stage NAME LIMIT LOG CMD...: one stage, after the ones before it; returns CMD's exit status.
stage() {
  selected "$1" || return 0
  CLOCK=$((CLOCK + $2 + GRACE_S))
  if [ "$DRY_RUN" = 1 ]; then
    printf '  %-13s %4s s  %s\n' "$1" "$2" "$(quoted "${@:4}")"
    return 0
  fi
  run_stage "$@"
}

# stage_bg NAME LIMIT LOG CMD...: one stage started beside the others; stage_wait waits for all of them.
stage_bg() {
  selected "$1" || return 0
  local end=$((CLOCK + $2 + GRACE_S))
  [ "$end" -le "$BG_END" ] || BG_END=$end
  if [ "$DRY_RUN" = 1 ]; then
    printf '  %-13s %4s s  (side by side) %s\n' "$1" "$2" "$(quoted "${@:4}")"
    return 0
  fi
  run_stage "$@" &
  BG_PIDS+=("$!")
}

stage_wait() {
  local waits=$BG_END
  [ "$BG_END" -le "$CLOCK" ] || CLOCK=$BG_END
  BG_END=0
  if [ "$DRY_RUN" = 1 ]; then
    [ "$waits" = 0 ] || echo "  -- wait: $CLOCK s so far"
    return 0
  fi
  [ "${#BG_PIDS[@]}" -eq 0 ] || wait "${BG_PIDS[@]}"
  BG_PIDS=()
  write_json false
}

# ensure_build: parts 2 and 3 check for the extension's build (CHECK_LIMIT_S, on the part's bound) and build it only
# when the tree holds none of these sources (a fresh machine; DRY_RUN counts that build apart from the bound).
# STAGES does not skip them; BUILD=0 does (the extension is left as it is).
ensure_build() {
  [ "${BUILD:-1}" != 0 ] || return 0
  CLOCK=$((CLOCK + CHECK_LIMIT_S + GRACE_S))
  if [ "$DRY_RUN" = 1 ]; then
    BUILD_EXTRA=$((BUILD_LIMIT_S + GRACE_S))
    printf '  %-13s %4s s  bash benchmarks/gpu/build.sh --check (the machine and the build there)\n' check \
      "$CHECK_LIMIT_S"
    printf '  %-13s %4s s  only where the check finds no build: bash benchmarks/gpu/build.sh\n' build \
      "$BUILD_LIMIT_S"
    return 0
  fi
  if timeout -k "$GRACE_S" "$CHECK_LIMIT_S" bash benchmarks/gpu/build.sh --check >> "$OUT/$LOG" 2>&1; then
    say "check: the tree holds the extension built for these sources (details in $LOG)"
  else
    say "check: no build of these sources here: building"
    BUILD_EXTRA=$((BUILD_LIMIT_S + GRACE_S))
    run_stage build "$BUILD_LIMIT_S" build.log bash benchmarks/gpu/build.sh
  fi
}

# part_end: the part's bound (dry run) or its summary; the targets the stages printed.
part_end() {
  stage_wait
  if [ "$DRY_RUN" = 1 ]; then
    local fits=fits
    [ "$CLOCK" -lt "$PART_LIMIT_S" ] || fits=OVER
    echo "part $PART bound: $CLOCK s (limit $PART_LIMIT_S s: $fits; the limits plus $GRACE_S s each to kill)"
    [ "$BUILD_EXTRA" = 0 ] || echo "part $PART bound with the build: $((CLOCK + BUILD_EXTRA)) s"
    return 0
  fi
  write_json true
  grep -h '^target ' "$OUT/$LOG" 2>/dev/null
  say "part $PART done after $((SECONDS - PART_START)) s (bound $((CLOCK + BUILD_EXTRA)) s); records in part$PART.json"
  rm -f "$RECORDS"
}
