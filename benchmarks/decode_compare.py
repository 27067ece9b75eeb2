"""Compare ``benchmarks/decode.py`` results of several kernel settings from one GPU session.

Each input is a ``decode.py`` JSON (``--out X`` writes ``X.json``), made with one
``HYBRIDKIT_KERNELS`` setting (recorded in the file as ``kernels``; older files without it read
as ``defaults``). Prints, and with ``--out`` writes as ``.md`` / ``.json``, one table per level:

* the layer step (d_model 2048, fp32 and bf16 state): the fused kernel's and the whole layer's
  microseconds per batch size, each setting's ratio to the first file's, and the issue's target;
* the 400M model: tokens/s and the ratio to the byte floor per batch size (fp32 state), against
  the first file and the 1.5x-floor target;

so the defaults of the decode settings can be chosen from numbers measured in the same session.

    python benchmarks/decode_compare.py OUT/decode_none.json OUT/decode_skinny*.json ... \
        [--out benchmarks/results/decode_settings_h200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET_X_FLOOR = 1.5  # issue #16: whole-model generation within 1.5x of the byte floor


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.setdefault("kernels", "defaults")
    data["file"] = path.name
    return data


def _layer_rows(runs: list[dict]) -> list[str]:
    # the baseline: the first run with a layer table (a run may have measured the model only)
    base_run = next((run for run in runs if run.get("layer")), runs[0])
    base = {(r["batch"], r["ssm_dtype"]): r for r in base_run.get("layer", [])}
    lines = [
        "| settings | state | batch | kernel us | layer us | layer vs first | target us |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for row in run.get("layer", []):
            first = base.get((row["batch"], row["ssm_dtype"]))
            ratio = f"{row['layer_us'] / first['layer_us']:.2f}x" if first else "n/a"
            lines.append(
                f"| {run['kernels']} | {row['ssm_dtype']} | {row['batch']} | "
                f"{row['kernel_us']:.1f} | {row['layer_us']:.1f} | {ratio} | "
                f"{row.get('target_layer_us', float('nan')):.0f} |"
            )
    return lines


def _model_rows(runs: list[dict], name: str) -> list[str]:
    def rows(run: dict) -> dict[int, dict]:
        return {r["batch"]: r for r in run.get("model", {}).get(name, {}).get("rows", [])}

    base = next((rows(run) for run in runs if rows(run)), {})  # the first run with a model table
    lines = [
        "| settings | batch | tokens/s | ms per step | x floor | vs first | target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for batch, row in sorted(rows(run).items()):
            first = base.get(batch)
            speedup = f"{row['tokens_per_s'] / first['tokens_per_s']:.2f}x" if first else "n/a"
            met = "yes" if row["ratio_to_floor"] <= TARGET_X_FLOOR else "no"
            lines.append(
                f"| {run['kernels']} | {batch} | {row['tokens_per_s']:,.0f} | "
                f"{row['ms_per_step']:.3f} | {row['ratio_to_floor']:.2f} | {speedup} | {met} |"
            )
    return lines


def compare(runs: list[dict]) -> str:
    """The markdown report of ``runs`` (the first is the baseline)."""
    head = runs[0]
    lines = [
        f"# Decode settings compared ({head.get('device', '?')})",
        "",
        f"Versions {head.get('versions', {})}. Files: "
        + ", ".join(f"`{r['file']}` ({r['kernels']})" for r in runs)
        + ". Ratios are against the first file with that table.",
        "",
        "## One Mamba-3 layer step (d_model 2048, H 64, P 64, N 128)",
        "",
        *_layer_rows(runs),
    ]
    # the fp32-state table, whichever file measured it (a run may have measured bf16 only)
    measured = {n for run in runs for n in run.get("model", {})}
    names = sorted(n for n in measured if n.startswith("fp32 state"))[:1]
    for name in names:
        lines += ["", f"## Whole model ({name})", "", *_model_rows(runs, name)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="decode.py JSON files, baseline first")
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = ap.parse_args()
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise SystemExit(f"decode_compare: no such file: {', '.join(missing)}")
    runs = [load(f) for f in args.files]
    report = compare(runs)
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
