# Sourced by the one-call GPU scripts (gpu_mimo_output.sh, gpu_launches.sh) after they set
# WORK: results go to $WORK and are archived into $OUT/session.tar.gz, the only file under $OUT,
# after every step (`pack`), so a call cut short still brings back what finished.
#   show FILE LOG [ROWS]: FILE's table rows and headings (at most ROWS, default 60), or the tail
#   of LOG when the table was never written.
OUT=${OUT:-${WORK}_out}
mkdir -p "$OUT" "$WORK"
pack() { tar -czf "$OUT/session.tar.gz" -C "$WORK" . ; }
show() {
  if grep -q "^| " "$1" 2>/dev/null; then grep "^| \|^###" "$1" | head -"${3:-60}"
  else tail -8 "$2"; fi
}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$WORK/device.txt"
