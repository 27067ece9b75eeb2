"""Scale-out benchmark: the 400M and 1.4B hybrids on 1..N GPUs, and a checkpoint-reshard check.

For every GPU count N in 1, 2, 4, 8 up to the GPUs present (``nvidia-smi -L``), runs

    torchrun --nproc-per-node N -m hybridkit bench train RECIPE --set train.parallel=MODE ...

for the 1.4B recipe with FSDP2 and the 400M recipe with FSDP2 and DDP, at 4,096 tokens per
sequence and a fixed batch **per GPU** (weak scaling), and then checks that a sharded checkpoint
written on N ranks resumes on N/2 with the same next-step loss. Results are written after every
run to ``OUT/scale_out.json`` and ``OUT/scale_out.md`` (tokens/s total and per GPU, MFU, peak
memory per GPU, scaling efficiency ``tokens/s(N) / (N x tokens/s(1))``), so a run stopped
early still leaves every finished number.

Time: the whole script fits a budget (``--budget-s``, default 530 s, under the 10-minute limit
of one device call): each run gets its own timeout, the runs that decide the targets go first
(1 GPU and the most GPUs, 1.4B before 400M, then the reshard check, then the GPU counts in
between), and a run that no longer fits is recorded as skipped instead of started.

    python benchmarks/scale_out.py --out $OUT          # on the GPU machine
    python benchmarks/scale_out.py --out /tmp/s --dry-run   # print the plan, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "1.4B": ROOT / "benchmarks" / "recipes" / "hybrid_1p4b.yaml",
    "400M": ROOT / "benchmarks" / "recipes" / "hybrid_400m.yaml",
}
#: NCCL for one host: NVLink multicast (NVLS) off, as the lent machines require; asynchronous
#: error handling so that a rank that dies ends the job instead of hanging the others.
NCCL_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "OMP_NUM_THREADS": "4",
}

#: Largest relative difference of the step-3 losses that counts as "identical" in the reshard
#: check: the same step on another rank count sums bf16 partial results in another order
#: (the 2-GPU DDP/FSDP2 demo agreed with one GPU to 6e-5 at step 10), so 1e-3 is generous for
#: one step and far below what a wrongly loaded shard does (a changed loss at the 1e-1 level).
RESHARD_TOLERANCE = 1e-3


@dataclass
class Run:
    """One ``bench train`` job: model, data-parallel mode, GPU count."""

    model: str
    mode: str
    gpus: int
    batch: int
    record: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.mode}-{self.gpus}gpu"


def gpus_present() -> int:
    """GPUs ``nvidia-smi -L`` lists (at least 1, so a machine without it plans the baselines)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    except OSError:
        return 1
    return max(1, sum(1 for line in listed.splitlines() if line.startswith("GPU")))


def gpu_counts(available: int) -> list[int]:
    """1, 2, 4, 8 up to ``available``."""
    return [n for n in (1, 2, 4, 8) if n <= available]


def plan(counts: list[int], batch: dict[str, int], models: list[str]) -> list[Run]:
    """The runs in priority order (see the module docstring). One GPU is a plain single-process
    run (``torchrun`` with one process shards nothing), shared as the baseline of both modes."""
    series = [(m, mode) for m, mode in (("1.4B", "fsdp"), ("400M", "fsdp"), ("400M", "ddp"))
              if m in models]  # fmt: skip
    most = max(counts)
    first: list[Run] = []
    for model in models:
        first.append(Run(model, "single", 1, batch[model]))
        if most > 1:
            first += [Run(m, mode, most, batch[m]) for m, mode in series if m == model]
    middle = [Run(m, mode, n, batch[m]) for m, mode in series for n in counts if 1 < n < most]
    return first + middle


def torchrun(gpus: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(gpus), *args]  # fmt: skip


def bench_command(run: Run, args: argparse.Namespace, result: Path) -> list[str]:
    """The ``torchrun ... bench train`` command of ``run`` (a one-GPU run keeps the recipe's
    ``train.parallel``: with one process nothing is wrapped)."""
    cmd = torchrun(
        run.gpus, "-m", "hybridkit", "bench", "train", str(RECIPES[run.model]),
        "--batch", str(run.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--no-profile", "--out", str(result),
    )  # fmt: skip
    if run.mode != "single":
        cmd += ["--set", f"train.parallel={run.mode}"]
    if args.compile:
        cmd.append("--compile")
    return cmd


def run_bench(run: Run, args: argparse.Namespace, out: Path, timeout: float) -> dict:
    """One ``bench train`` job under ``timeout``; its JSON record, or why there is none."""
    result = out / "runs" / run.name
    done = _call(bench_command(run, args, result), out / "logs" / f"{run.name}.log", timeout)
    if done != "ok":
        return {"status": done}
    return {"status": "ok", **json.loads(result.with_suffix(".json").read_text())}


def _call(cmd: list[str], log: Path, timeout: float) -> str:
    """Run ``cmd`` (stdout and stderr to ``log``); "ok", "timeout after N s" or "failed (rc)".

    The job runs in its own process group, and a timeout ends the whole group: killing only
    ``torchrun`` could leave its workers holding the GPUs for the next run."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return f"timeout after {timeout:.0f} s"
    return "ok" if rc == 0 else f"failed (rc {rc}, see logs/{log.name})"


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (torchrun passes it on), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def reshard_check(gpus: int, target: int, out: Path, timeout: float) -> dict:
    """Train the 400M model on ``gpus`` ranks (FSDP2, sharded checkpoint after step 2, then step
    3), resume that checkpoint on ``target`` ranks and run step 3 again: the two step-3 losses
    must agree within bf16 reduction noise."""
    from hybridkit.recipe import dump_recipe, load_recipe

    work = Path(tempfile.mkdtemp(prefix="reshard-"))
    data = load_recipe(RECIPES["400M"]).model_dump(mode="json")
    data["task"] = {"kind": "niah", "variant": "mixed", "seq_len": 1024, "uuid_length": 16,
                    "eval_lengths": [1024], "eval_examples": 16}  # fmt: skip
    data["train"].update(steps=3, batch_size=8, checkpoint_every=2, parallel="fsdp", log_every=1,
                         tensorboard=False, lr=3e-4)  # fmt: skip
    data["eval"].update(decode_examples=0)
    recipe = load_recipe(data)
    dump_recipe(recipe, work / "recipe.yaml")
    start = time.time()
    first, second = work / "written", work / "resumed"
    train = ("-m", "hybridkit", "train", str(work / "recipe.yaml"), "--no-progress")
    status = _call(torchrun(gpus, *train, "-o", str(first)), out / "logs" / "reshard_write.log",
                   timeout)  # fmt: skip
    if status == "ok":
        ckpt = first / "checkpoints" / "step_0000002"
        shutil.copytree(ckpt, second / "checkpoints" / ckpt.name)
        (second / "checkpoints" / "latest").write_text(ckpt.name)
        left = timeout - (time.time() - start)
        status = _call(torchrun(target, *train, "-o", str(second)),
                       out / "logs" / "reshard_resume.log", left)  # fmt: skip
    record: dict = {"written_on": gpus, "resumed_on": target, "status": status}
    if status == "ok":
        a, b = _loss_at(first, 3), _loss_at(second, 3)
        rel = abs(a / b - 1)
        record.update(step=3, loss_written=a, loss_resumed=b, rel_diff=rel)
        record.update(tolerance=RESHARD_TOLERANCE, passed=rel <= RESHARD_TOLERANCE)
        record["checkpoint_world_size"] = json.loads((ckpt / "trainer.json").read_text())[
            "world_size"
        ]
    shutil.rmtree(work, ignore_errors=True)
    return record


def _loss_at(run_dir: Path, step: int) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step") == step and "loss" in rec:
            return float(rec["loss"])
    raise ValueError(f"no loss for step {step} in {run_dir}")


def efficiency(runs: list[Run]) -> None:
    """Scaling efficiency of every finished run against the 1-GPU run of its model."""
    base = {r.model: r for r in runs if r.gpus == 1 and r.record.get("status") == "ok"}
    for r in runs:
        one = base.get(r.model)
        if r.record.get("status") == "ok" and one is not None:
            r.record["scaling_efficiency"] = r.record["tokens_per_s"] / (
                r.gpus * one.record["tokens_per_s"]
            )


def write(out: Path, runs: list[Run], reshard: dict | None, args: argparse.Namespace) -> None:
    """``scale_out.json`` and ``scale_out.md`` with everything finished so far."""
    efficiency(runs)
    data = {
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "compiled": args.compile,
        "nccl_env": NCCL_ENV,
        "runs": [
            {
                "name": r.name,
                "model": r.model,
                "mode": r.mode,
                "gpus": r.gpus,
                "batch_per_gpu": r.batch,
                **r.record,
            }
            for r in runs
            if r.record
        ],  # fmt: skip
        "reshard": reshard,
    }
    (out / "scale_out.json").write_text(json.dumps(data, indent=1))
    lines = [
        "# Scale-out: tokens/s per GPU, MFU, memory and scaling efficiency",
        "",
        f"`python benchmarks/scale_out.py` ({'compiled' if args.compile else 'eager'}, "
        f"{args.seq_len} tokens per sequence, batch per GPU fixed; median of {args.steps} steps "
        f"after {args.warmup}). Efficiency = tokens/s(N) / (N x tokens/s(1)); the 1-GPU run is "
        "a plain single-process run (no sharding).",
        "",
        "| model | mode | GPUs | batch/GPU | tokens/s total | tokens/s per GPU | MFU "
        "(datasheet) | peak memory per GPU | efficiency | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    done = [r for r in runs if r.record]
    for r in sorted(done, key=lambda r: (r.model, r.mode != "single", r.mode, r.gpus)):
        rec = r.record
        if rec.get("status") != "ok":
            lines.append(f"| {r.model} | {r.mode} | {r.gpus} | {r.batch} | | | | | | "
                         f"{rec.get('status')} |")  # fmt: skip
            continue
        mfu = f"{rec['mfu_datasheet']:.1%}" if rec.get("mfu_datasheet") is not None else "n/a"
        mem = f"{rec['peak_memory_gb']:.1f} GB" if rec.get("peak_memory_gb") else "n/a"
        eff = f"{rec['scaling_efficiency']:.1%}" if "scaling_efficiency" in rec else "-"
        lines.append(
            f"| {r.model} | {r.mode} | {r.gpus} | {r.batch} | {rec['tokens_per_s']:,.0f} | "
            f"{rec['tokens_per_s_per_gpu']:,.0f} | {mfu} | {mem} | {eff} | ok |"
        )
    if reshard:
        lines += ["", "## Checkpoint reshard", ""]
        if reshard.get("status") == "ok":
            lines.append(
                f"400M + NIAH, FSDP2: sharded checkpoint after step 2 written on "
                f"{reshard['written_on']} GPUs, resumed on {reshard['resumed_on']}: step-3 loss "
                f"{reshard['loss_written']:.6f} vs {reshard['loss_resumed']:.6f} (relative "
                f"difference {reshard['rel_diff']:.2e}; "
                f"{'within' if reshard['passed'] else 'OUTSIDE'} the {reshard['tolerance']:.0e} "
                "allowed for bf16 reductions in another order)."
            )
        else:
            lines.append(f"Not completed: {reshard.get('status')}.")
    (out / "scale_out.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="results folder ($OUT)")
    p.add_argument("--gpus", type=int, default=None, help="largest GPU count (default: all)")
    p.add_argument("--counts", default=None, help="GPU counts, e.g. 2,4 (default 1,2,4,8 <= gpus)")
    p.add_argument("--models", default="1.4B,400M", help="which of 1.4B,400M (in this order)")
    p.add_argument("--skip-reshard", action="store_true", help="no checkpoint-reshard check")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-400m", type=int, default=4, help="sequences per GPU")
    p.add_argument("--batch-1p4b", type=int, default=2, help="sequences per GPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile (slow to start)")
    p.add_argument("--budget-s", type=float, default=530.0, help="wall-clock budget, seconds")
    p.add_argument("--run-timeout-s", type=float, default=100.0, help="cap per bench run")
    p.add_argument("--reshard-timeout-s", type=float, default=150.0)
    p.add_argument("--reshard-to", type=int, default=None, help="GPUs to resume on (default N/2)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = p.parse_args(argv)
    start = time.time()
    if args.gpus is None:
        args.gpus = gpus_present()
    counts = gpu_counts(args.gpus)
    if args.counts:
        counts = sorted({int(n) for n in args.counts.split(",")})
    models = [m for m in args.models.split(",") if m in RECIPES]
    runs = plan(counts, {"400M": args.batch_400m, "1.4B": args.batch_1p4b}, models)
    reshard_on = counts[-1] if counts[-1] > 1 and not args.skip_reshard else 0
    if args.dry_run:
        for r in runs:
            print(r.name, f"batch {r.batch}/GPU")
        print(f"reshard check {reshard_on} -> {_target(reshard_on, args)} GPUs" if reshard_on
              else "no reshard check")  # fmt: skip
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reshard: dict | None = None
    # the reshard check goes after the runs at the ends (1 GPU and the most GPUs)
    at = sum(1 for r in runs if r.gpus in (1, counts[-1]))
    for i, run in enumerate(runs):
        if i == at and reshard_on:
            reshard = _budgeted_reshard(reshard_on, out, args, start)
            write(out, runs, reshard, args)
        left = args.budget_s - (time.time() - start)
        if left < 30:
            run.record = {"status": "skipped (time budget)"}
        else:
            run.record = run_bench(run, args, out, min(args.run_timeout_s, left))
        print(f"{run.name}: {run.record.get('status')}", flush=True)
        write(out, runs, reshard, args)
    if reshard is None and reshard_on:
        reshard = _budgeted_reshard(reshard_on, out, args, start)
    write(out, runs, reshard, args)
    print((out / "scale_out.md").read_text())
    return 0


def _target(gpus: int, args: argparse.Namespace) -> int:
    """Where the reshard check resumes: ``--reshard-to``, else half the GPUs."""
    return args.reshard_to or gpus // 2


def _budgeted_reshard(gpus: int, out: Path, args: argparse.Namespace, start: float) -> dict:
    target = _target(gpus, args)
    left = args.budget_s - (time.time() - start)
    if left < 60:
        return {"written_on": gpus, "resumed_on": target, "status": "skipped (time budget)"}
    record = reshard_check(gpus, target, out, min(args.reshard_timeout_s, left))
    print(f"reshard {gpus} -> {target}: {record.get('status')}", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(main())
