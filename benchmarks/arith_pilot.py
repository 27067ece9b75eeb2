"""CPU pilot of the state-tracking study's arithmetic arms (issue #18): does a variant learn at
all at the study's model size, before GPU time goes into it?

Trains one variant of ``hybridkit/recipes/studies/state_tracking.yaml`` on the CPU at a smaller
batch, either on the study's own first curriculum stages (``--stages K``) or on a warm-up
curriculum (3..5, 3..11, 3..21 tokens, 300 steps each) followed by 900 steps at 3..40
(``--warmup``), then prints ex_match at a few lengths as one JSON line. Results:
``benchmarks/results/state_tracking_cpu/arith_curriculum_check.md``.

    python benchmarks/arith_pilot.py arith_mamba3 --lr 1e-3 --warmup -o /tmp/pilot/arith
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybridkit.study import plan_study
from hybridkit.tasks.base import CurriculumStage
from hybridkit.train.trainer import Trainer

STUDY = "hybridkit/recipes/studies/state_tracking.yaml"
WARMUP = ((300, 5), (300, 11), (300, 21), (900, 40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", help="a variant of the state-tracking study, e.g. arith_mamba3")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", action="store_true", help="the warm-up curriculum (see above)")
    ap.add_argument("--stages", type=int, default=2, help="without --warmup: the study's first K")
    ap.add_argument("-o", "--out", required=True, help="run directory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = plan_study(STUDY, [], []).recipe(args.variant, args.lr, args.seed)
    train = recipe.train
    train.device, train.log_every, train.batch_size = "cpu", 100, args.batch
    train.checkpoint_every, train.deterministic = 600, False
    if args.warmup:
        stages = [CurriculumStage(steps=s, min_len=3, max_len=m) for s, m in WARMUP]
    else:
        stages = recipe.task.curriculum[: args.stages]
    recipe.task.curriculum = stages
    train.steps, train.warmup_steps = sum(s.steps for s in stages), 100
    start = time.time()
    trainer = Trainer(recipe, args.out, resume="auto", progress=False)
    trainer.fit()
    top = stages[-1].max_len
    lengths = sorted({5, 11, 21, top - (top % 2 == 0 and not recipe.task.brackets)})
    results = trainer.evaluate(lengths)
    record = {
        "variant": args.variant,
        "lr": args.lr,
        "seed": args.seed,
        "batch": args.batch,
        "curriculum": [s.model_dump() for s in stages],
        "seconds": round(time.time() - start),
        "ex_match": {r["length"]: r["ex_match"] for r in results},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
