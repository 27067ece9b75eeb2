"""CPU pilot of one MQAR capacity cell (issue #18): does a variant of
``hybridkit/recipes/studies/mqar_capacity.yaml`` leave the 1/D plateau, trained as the study does
or after a warm-up on easier cells?

``--warmup`` trains the first steps on shorter inputs with fewer pairs, through the task's length
curriculum and ``kv_pairs_by_length`` (64 tokens with D/8 pairs, 128 with D/4, then 256 with D/2,
``--stage`` steps each), then the cell itself (256 tokens, D pairs) for the rest. Without it the
whole run is the cell, as in the study. Prints the token accuracy at the cell every
``--eval-every`` steps and at the end as JSON lines. Results:
``benchmarks/results/mqar_capacity/NOTES.md``.

    python benchmarks/mqar_pilot.py attention-D32 --lr 3e-3 --steps 3000 --warmup -o /tmp/p
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybridkit.study import plan_study
from hybridkit.tasks.base import CurriculumStage
from hybridkit.train.trainer import Trainer

STUDY = "hybridkit/recipes/studies/mqar_capacity.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", help="e.g. attention-D32, mamba3-D32, hybrid-D16")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--warmup", action="store_true")
    ap.add_argument("--stage", type=int, default=300, help="steps per warm-up stage")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key of every run (e.g. a smaller cell for the CPU)",
    )
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = plan_study(STUDY, args.overrides, []).recipe(args.variant, args.lr, args.seed)
    train, task = recipe.train, recipe.task
    train.device, train.compile, train.deterministic = "cpu", False, False
    train.batch_size, train.steps, train.log_every = args.batch, args.steps, 100
    train.checkpoint_every, train.eval_every = 1000, args.eval_every
    task.eval_examples, task.eval_lengths = 300, [task.seq_len]
    d, n = task.num_kv_pairs, task.seq_len
    if args.warmup:
        easy = ((n // 4, max(1, d // 8)), (n // 2, max(1, d // 4)), (n, max(1, d // 2)))
        task.kv_pairs_by_length = dict(easy[:2])
        # the 256-token stage with D/2 pairs cannot share the cell's length in one mapping, so it
        # runs as its own length just below the cell's (both even, both hold D/2 pairs)
        task.kv_pairs_by_length[n - 2] = easy[2][1]
        lengths = (easy[0][0], easy[1][0], n - 2)
        stages = [CurriculumStage(steps=args.stage, min_len=m, max_len=m) for m in lengths]
        rest = args.steps - len(stages) * args.stage
        if rest <= 0:
            raise SystemExit(f"--steps {args.steps} leaves no step for the cell after 3 x --stage")
        stages.append(CurriculumStage(steps=rest, min_len=n, max_len=n))
        task.curriculum = stages
    start = time.time()
    trainer = Trainer(recipe, args.out, resume="auto", progress=False)
    last = trainer.fit()
    res = {r["length"]: r["tok_acc"] for r in last.get("final_eval", [])}
    record = dict(variant=args.variant, lr=args.lr, seed=args.seed, batch=args.batch,
                  steps=args.steps, warmup=args.warmup, seconds=round(time.time() - start),
                  tok_acc=res)  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
