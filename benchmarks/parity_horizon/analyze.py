"""Inspect a trained 1-layer Mamba-3 parity run: per-token-type angles, decays, trapezoid gate,
and accuracy vs length under eval-time interventions (monkeypatched scan inputs).

usage: python analyze.py RUN_DIR [--lengths 8,16,...] [--n 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

torch.set_num_threads(1)

from hybridkit.kernels.mamba3 import reference  # noqa: E402
from hybridkit.rundir import load_run  # noqa: E402
from hybridkit.tasks.parity import BOS, EQ, EVEN, ODD, ONE, ZERO  # noqa: E402

NAMES = {BOS: "BOS", ZERO: "ZERO", ONE: "ONE", EQ: "EQ"}
PI = math.pi


def wrap_pm(x):
    """wrap to (-pi, pi]"""
    return x - 2 * PI * torch.round(x / (2 * PI))


def token_params(model):
    """per token type: dt (H,), adt (H,), alpha (H,), lam (H,), omega (H,S), |x|, |k| per head"""
    blk = model.blocks[0]
    mix = blk.mixer
    out = {}
    with torch.no_grad():
        toks = torch.tensor([[BOS, ZERO, ONE, EQ]])
        u = blk.norm1(model.embedding(toks))
        proj = mix.in_proj(u)
        z, x, bk, cq, dd_dt, dd_a, trap, ang = proj.split(mix.split_sizes, dim=-1)
        dt, adt = mix.gates(dd_dt, dd_a)
        h, p = mix.nheads, mix.headdim
        for i, t in enumerate(toks[0].tolist()):
            omega = PI * torch.tanh(ang[0, i])[None, :] * dt[0, i][:, None]  # (H, S)
            out[NAMES[t]] = dict(
                dt=dt[0, i],
                adt=adt[0, i],
                alpha=torch.exp(adt[0, i]),
                lam=torch.sigmoid(trap[0, i]) if mix.spec.trapezoid else torch.ones(h),
                omega=omega,
                xnorm=x[0, i].reshape(h, p).norm(dim=-1),
                tanh=torch.tanh(ang[0, i]),
            )
    return out


MODE = {
    "snap": False,
    "nodecay": False,
    "decay_scale": None,
    "angle_scale": None,
    "snap_pair": None,
}


def install_patch():
    orig = reference.prepare_scan_inputs

    def patched(*args, **kwargs):
        inp, bounds = orig(*args, **kwargs)
        rep = {}
        if MODE["snap"] and inp.omega is not None:
            rep["omega"] = PI * torch.round(inp.omega / PI)
        if MODE.get("snap_bits") and inp.omega is not None:
            om = inp.omega.clone()  # (B, L, H, S); positions 1..L-2 are the bits
            om[:, 1:-1] = PI * torch.round(om[:, 1:-1] / PI)
            rep["omega"] = om
        if MODE["snap_pair"] is not None and inp.omega is not None:
            om = inp.omega.clone()  # one angle pair of the bit tokens only, every head
            j = MODE["snap_pair"]
            om[:, 1:-1, :, j] = PI * torch.round(om[:, 1:-1, :, j] / PI)
            rep["omega"] = om
        if MODE["angle_scale"] is not None and inp.omega is not None:
            rep["omega"] = inp.omega * MODE["angle_scale"]
        if MODE["nodecay"]:
            rep["adt"] = torch.zeros_like(inp.adt)
        if MODE["decay_scale"] is not None:
            rep["adt"] = inp.adt * MODE["decay_scale"]
        return (inp._replace(**rep) if rep else inp), bounds

    reference.prepare_scan_inputs = patched


def accuracy(model, lengths, n, seed=1234, backend_note=None):
    rng = np.random.default_rng(seed)
    res = {}
    for L in lengths:
        bits = rng.integers(0, 2, size=(n, L))
        inp = np.empty((n, L + 2), dtype=np.int64)
        inp[:, 0], inp[:, -1] = BOS, EQ
        inp[:, 1:-1] = ZERO + bits
        tgt = np.where(bits.sum(1) % 2 == 1, ODD, EVEN)
        with torch.no_grad():
            logits = model(torch.from_numpy(inp))[:, -1]
        pred = logits.argmax(-1).numpy()
        res[L] = dict(
            acc=float((pred == tgt).mean()),
            frac_odd_pred=float((pred == ODD).mean()),
            margin=float((logits[:, ODD] - logits[:, EVEN]).abs().mean()),
        )
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--lengths", default="8,16,24,32,48,64,96,128,256")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--arms", default=None)
    a = ap.parse_args()
    lengths = [int(s) for s in a.lengths.split(",")]
    recipe, model = load_run(a.run)
    model.eval()
    install_patch()
    tp = token_params(model)
    report = {"run": a.run, "tokens": {}}
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=160)
    e0 = wrap_pm(tp["ZERO"]["omega"])  # error vs 0
    e1 = wrap_pm(tp["ONE"]["omega"] - PI)  # error vs pi (same as vs -pi)
    if not a.quiet:
        for name, d in tp.items():
            print(f"== {name}")
            print("  dt    ", d["dt"])
            print("  alpha ", d["alpha"], " (-adt", -d["adt"], ")")
            print("  lam   ", d["lam"])
            print("  |x|   ", d["xnorm"])
            print("  tanh(a)", d["tanh"])
            print("  omega/pi (wrapped to (-1,1])\n", wrap_pm(d["omega"]) / PI)
        print("ZERO error (rad):\n", e0)
        print("ONE error vs pi (rad):\n", e1)
    # phase drift: for a string with n1 ones and n0 zeros the relative angle between EQ and BOS
    # is omega_EQ + n0*w0 + n1*w1; ideal: omega_EQ + pi*n1. Error = n0*e0 + n1*e1.
    mean_err = (e0 + e1) / 2  # per bit on average
    diff_err = (e1 - e0) / 2  # std of error ~ sqrt(L) * |diff|
    summ = {}
    for L in lengths:
        drift = (L * mean_err).abs()
        spread = math.sqrt(L) * diff_err.abs()
        # decay of the BOS contribution over L bits + EQ (half ones)
        logdec = L / 2 * (tp["ZERO"]["adt"] + tp["ONE"]["adt"]) + tp["EQ"]["adt"]
        summ[L] = dict(
            drift_rad_median=float(drift.median()),
            drift_rad_min=float(drift.min()),
            spread_rad_median=float(spread.median()),
            bos_decay_per_head=[float(v) for v in torch.exp(logdec)],
        )
    report["per_bit_err"] = dict(
        zero=e0.tolist(),
        one=e1.tolist(),
        mean=mean_err.tolist(),
        alpha0=tp["ZERO"]["alpha"].tolist(),
        alpha1=tp["ONE"]["alpha"].tolist(),
        alphaEQ=tp["EQ"]["alpha"].tolist(),
        alphaBOS=tp["BOS"]["alpha"].tolist(),
        lam={k: v["lam"].tolist() for k, v in tp.items()},
        xnorm={k: v["xnorm"].tolist() for k, v in tp.items()},
        dt={k: v["dt"].tolist() for k, v in tp.items()},
    )
    report["predicted"] = summ
    if not a.quiet:
        print(
            "\nL  | median |L*mean_err| rad | min over heads/pairs | "
            "median sqrt(L)*|diff| | BOS->EQ decay per head"
        )
        for L, s in summ.items():
            dec = " ".join(f"{v:.2e}" for v in s["bos_decay_per_head"])
            print(
                f"{L:4d} | {s['drift_rad_median']:.3f} | {s['drift_rad_min']:.3f} | "
                f"{s['spread_rad_median']:.3f} | {dec}"
            )
    arms = {
        "base": dict(),
        "snap_angles": dict(snap=True),
        "no_decay": dict(nodecay=True),
        "snap+no_decay": dict(snap=True, nodecay=True),
        "snap_bits": dict(snap_bits=True),
        "snap_bits+no_decay": dict(snap_bits=True, nodecay=True),
    }
    if a.arms:
        arms = {k: v for k, v in arms.items() if k in a.arms.split(",")}
    report["acc"] = {}
    for arm, m in arms.items():
        MODE.update(
            {
                "snap_bits": False,
                "snap": False,
                "nodecay": False,
                "decay_scale": None,
                "angle_scale": None,
            }
        )
        MODE.update(m)
        r = accuracy(model, lengths, a.n)
        report["acc"][arm] = r
        print(f"{arm:14s} " + " ".join(f"{L}:{100 * v['acc']:.1f}" for L, v in r.items()))
        print(
            f"{'':14s} odd%" + " ".join(f"{L}:{100 * v['frac_odd_pred']:.0f}" for L, v in r.items())
        )
        print(f"{'':14s} margin " + " ".join(f"{L}:{v['margin']:.2f}" for L, v in r.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
