"""Dense accuracy-vs-length sweep of one run (plain forward, or with decay removed), to compare
with the phase-drift prediction. usage: python sweep.py RUN [no_decay]"""

import sys

import torch

torch.set_num_threads(1)
from analyze import MODE, accuracy, install_patch  # noqa: E402

from hybridkit.rundir import load_run  # noqa: E402

run = sys.argv[1]
_, model = load_run(run)
model.eval()
install_patch()
MODE["nodecay"] = len(sys.argv) > 2 and sys.argv[2] == "no_decay"
lengths = list(range(8, 329, 8))
r = accuracy(model, lengths, 200, seed=7)
print(run, "no_decay" if MODE["nodecay"] else "plain")
print(" ".join(f"{L}:{100 * v['acc']:.0f}" for L, v in r.items()))
