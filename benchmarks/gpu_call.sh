# Sourced by the one-call GPU scripts (gpu_mimo_output.sh, gpu_launches.sh, gpu_qk_heads.sh,
# gpu_defaults_ab.sh, gpu_compile_ops.sh)
# after they set
# WORK: results go to $WORK and are archived into $OUT/session.tar.gz, the only file under $OUT,
# after every step (`pack`), so a call cut short still brings back what finished.
#   show FILE LOG [ROWS]: FILE's table rows and headings (at most ROWS, default 60), or the tail
#   of LOG when the table was never written.
#   budgeted MOST NEED CMD...: CMD under a timeout of MOST seconds or what is left of the call
#   (CALL_S, default 570: the device tool's 600 s less the start), whichever is less; skipped,
#   with a line saying so, when fewer than NEED seconds are left. `left` prints what is left.
OUT=${OUT:-${WORK}_out}
mkdir -p "$OUT" "$WORK"
pack() { tar -czf "$OUT/session.tar.gz" -C "$WORK" . ; }
show() {
  if grep -q "^| " "$1" 2>/dev/null; then grep "^| \|^###" "$1" | head -"${3:-60}"
  else tail -8 "$2"; fi
}
CALL=${CALL_S:-570}
START=$(date +%s)
left() { echo $(( CALL - ($(date +%s) - START) )); }
budgeted() {
  local most=$1 need=$2 t
  shift 2
  t=$(left)
  if [ "$t" -lt "$need" ]; then echo "skipped (${t} s of the call left): $*"; return 1; fi
  [ "$t" -gt "$most" ] && t=$most
  timeout -k 5 "$t" "$@"
}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$WORK/device.txt"
