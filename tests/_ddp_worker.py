"""Worker for the multi-process tests: ``torchrun ... tests/_ddp_worker.py RECIPE OUT [STOP]``.

Trains ``RECIPE`` into ``OUT`` (resuming from its newest checkpoint), stopping after step ``STOP``
if given, then leaves the process group cleanly and ends the rank as the CLI does
(:func:`hybridkit.train.distributed.exit_rank`). The CLI cannot stop early, which the resume
tests under FSDP need.
"""

from __future__ import annotations

import sys

from hybridkit.recipe import load_recipe
from hybridkit.train import distributed as dist_utils
from hybridkit.train.trainer import Trainer


def main(argv: list[str]) -> None:
    recipe_path, out = argv[0], argv[1]
    stop = int(argv[2]) if len(argv) > 2 else None
    trainer = Trainer(load_recipe(recipe_path), out, resume="auto", progress=False, stop_after=stop)
    trainer.fit()
    dist_utils.shutdown(trainer.dist)
    dist_utils.exit_rank(0)


if __name__ == "__main__":
    main(sys.argv[1:])
