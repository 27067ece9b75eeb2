"""Find which head and which angle pair carry parity in a trained 1-layer run.

1. head ablation: zero head h's channels at the out_proj input, accuracy at 16 / 32 bits.
2. per-pair snap: snap only pair j of the bit tokens to the nearest multiple of pi (all heads),
   with and without removing the decay, accuracy at several lengths.
3. per (head, pair): per-bit angle errors e0 (ZERO vs 0), e1 (ONE vs pi), predicted flip length.

usage: python carrier.py RUN_DIR
"""

from __future__ import annotations

import math
import sys

import torch

torch.set_num_threads(1)

from analyze import MODE, PI, accuracy, install_patch, token_params, wrap_pm  # noqa: E402

from hybridkit.rundir import load_run  # noqa: E402


def main():
    run = sys.argv[1]
    _, model = load_run(run)
    model.eval()
    mix = model.blocks[0].mixer
    h, p, s = mix.nheads, mix.headdim, mix.n_angles
    tp = token_params(model)
    e0 = wrap_pm(tp["ZERO"]["omega"])
    e1 = wrap_pm(tp["ONE"]["omega"] - PI)
    lam_log = (tp["ZERO"]["adt"] + tp["ONE"]["adt"]) / 2  # mean log-decay per bit, per head

    print("head ablation (acc % at 16 / 32 bits):")
    base = accuracy(model, [16, 32], 400)
    abl = []
    print(f"  none: {100 * base[16]['acc']:.1f} / {100 * base[32]['acc']:.1f}")
    for hd in range(h):

        def hook(mod, args, hd=hd):
            x = args[0].clone()
            x[..., hd * p : (hd + 1) * p] = 0
            return (x,)

        hnd = mix.out_proj.register_forward_pre_hook(hook)
        r = accuracy(model, [16, 32], 400)
        hnd.remove()
        abl.append(r[16]["acc"] + r[32]["acc"])
        print(
            f"  head {hd}: {100 * r[16]['acc']:.1f} / {100 * r[32]['acc']:.1f}   "
            f"mean log-decay/bit {lam_log[hd]:.3f}"
            f"  |x_BOS| {tp['BOS']['xnorm'][hd]:.2f}"
        )

    hc = min(range(h), key=lambda i: abl[i])
    score = e0[hc].abs() + e1[hc].abs()
    jc = int(score.argmin())
    m = float((e0[hc, jc] + e1[hc, jc]) / 2)
    print(
        f"SUMMARY carrier head {hc} (ablated acc16+32 {100 * abl[hc] / 2:.1f}%), "
        f"log-decay/bit {float(lam_log[hc]):.3f}, "
        f"alpha0 {float(tp['ZERO']['alpha'][hc]):.3f} alpha1 {float(tp['ONE']['alpha'][hc]):.3f}; "
        f"best pair {jc}: ZERO {float(tp['ZERO']['omega'][hc, jc]) / PI:+.4f} pi, "
        f"ONE {float(tp['ONE']['omega'][hc, jc]) / PI:+.4f} pi, "
        f"e0 {float(e0[hc, jc]):+.3f} e1 {float(e1[hc, jc]):+.3f} mean {m:+.4f} rad/bit"
    )
    install_patch()
    lengths = [16, 32, 64, 128]
    print("per-pair snap of bit angles (acc % at " + "/".join(map(str, lengths)) + "):")
    for nd in (False, True):
        for j in [None] + list(range(s)):
            MODE.update(snap_pair=j, nodecay=nd)
            r = accuracy(model, lengths, 300)
            tag = f"pair {j}" if j is not None else "no snap"
            print(
                f"  {'no_decay ' if nd else ''}{tag}: "
                + " ".join(f"{100 * r[L]['acc']:.1f}" for L in lengths)
            )
    MODE.update(snap_pair=None, nodecay=False)

    print(
        "per (head, pair) bit-angle errors, rad: e0 (ZERO vs 0), e1 (ONE vs pi), mean, "
        "(pi/2)/|mean|"
    )
    for hd in range(h):
        row = []
        for j in range(s):
            m = (e0[hd, j] + e1[hd, j]) / 2
            if abs(e0[hd, j]) < 0.3 and abs(e1[hd, j]) < 0.3:
                row.append(
                    f"p{j}: e0={e0[hd, j]:+.3f} e1={e1[hd, j]:+.3f} mean={m:+.3f} "
                    f"Lq={math.pi / 2 / abs(float(m)):.0f}"
                )
        print(
            f"  head {hd} (alpha0 {tp['ZERO']['alpha'][hd]:.3f}, "
            f"alpha1 {tp['ONE']['alpha'][hd]:.3f}): " + ("; ".join(row) or "no pair within 0.3 rad")
        )


if __name__ == "__main__":
    main()
