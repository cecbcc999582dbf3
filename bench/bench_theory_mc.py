"""Monte-Carlo check of hessfast.theory against the printed paper: the numbers in docs/theory.md.

    OMP_NUM_THREADS=1 python bench/bench_theory_mc.py [--reps 10] [--seed 0]

Prints markdown tables: each closed form (derived default and, where it differs, the printed
"paper" variant) beside the mean and standard error of ``--reps`` seeded draws of the model it
assumes, plus the Hessian-variance normalisation of Algorithm 1 (Section 8.2). About a minute on one idle core.
"""
from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np

from hessfast import rmt_sim as sim
from hessfast import theory as T


def _ms(x):
    x = np.asarray(x, dtype=float)
    return x.mean(), x.std(ddof=1) / np.sqrt(x.size)


def wigner_table(reps, rng, P=2000):
    print(f"\n### Theorem 4 / Theorem 10 (spiked Wigner, P = {P}, s^2 = P sigma2 / b = 1, {reps} draws)\n")
    print("| lam_1 / s | sim lam'_1 | Thm 4 | sim overlap | Thm 10 | Lemma 11 as printed (threshold 2s) |")
    print("|---|---|---|---|---|---|")
    for lam in (0.5, 1.2, 1.5, 2.0, 3.0):
        draws = [sim.spiked_wigner(P, [lam], 1.0 / P, rng) for _ in range(reps)]
        top, top_se = _ms([d[0] for d in draws])
        ov, ov_se = _ms([d[2][0, 0] for d in draws])
        pred = T.batch_extremes(lam, 0.0, 1.0, P, P).lam_max
        lemma11 = 1 - 1 / lam ** 2 if lam > 2 else 0.0
        print(f"| {lam} | {top:.4f} +- {top_se:.4f} | {pred:.4f} | {ov:.4f} +- {ov_se:.4f} | "
              f"{T.eigvec_overlap(lam, 1.0, P, P):.4f} | {lemma11:.4f} |")


def hessian_regime_table(reps, rng, P=2000):
    lam, sigma2 = 1.0, 0.2                      # critical batch P sigma2 / lam^2 = 400
    print(f"\n### Section 10.1 under Theorem 4: lam_1 = {lam}, sigma2 = {sigma2}, P = {P}, "
          f"B* = {T.critical_batch_size(lam, sigma2, P):.0f} ({reps} draws)\n")
    print("| B | sim lam'_1 | Thm 4 | lam_1 + P sigma2 / (B lam_1) (Sec. 10.1 outside its branch) |")
    print("|---|---|---|---|")
    for B in (25, 100, 400, 1600, 6400):
        top, se = _ms([sim.spiked_wigner(P, [lam], sigma2 / B, rng)[0] for _ in range(reps)])
        print(f"| {B} | {top:.3f} +- {se:.3f} | {T.batch_extremes(lam, 0.0, sigma2, P, B).lam_max:.3f} | "
              f"{lam + P * sigma2 / (B * lam):.3f} |")


def ggn_table(reps, rng):
    print(f"\n### Theorem 7 (spiked information-plus-noise, sigma2 = 1, {reps} draws)\n")
    print("| P | B | c = P/B | lam_1 | sim lam'_1 | derived (BGN 2012) | printed Eq. 16 | sim - printed |")
    print("|---|---|---|---|---|---|---|---|")
    for P, B in ((2000, 500), (2000, 250), (1000, 1000), (200, 20000)):
        c = P / B
        for lam in (0.5 * np.sqrt(c), 3 * np.sqrt(c), 2 * (1 + c), 10 * (1 + c)):
            m, se = _ms([sim.spiked_information_plus_noise(P, B, lam, 1.0, rng) for _ in range(reps)])
            d, p = T.ggn_batch_max(lam, 1.0, P, B), T.ggn_batch_max(lam, 1.0, P, B, variant="paper")
            print(f"| {P} | {B} | {c:g} | {lam:.3g} | {m:.3f} +- {se:.3f} | {d:.3f} | {p:.3f} | {m - p:+.3f} |")


def algorithm1_table(rng, P=400, N=60, probes=200):
    """Per-sample Hessians H_i = M + Z_i (M a fixed mean with ||M||_F^2 / P^2 ~ the noise variance)."""
    print(f"\n### Algorithm 1 normalisation (P = {P}, N = {N}, {probes} unit probes)\n")
    mean = rng.standard_normal((P, P)) * 0.05
    mean = mean + mean.T + np.diag(np.linspace(0, 3, P))
    hs = []
    for _ in range(N):
        z = rng.standard_normal((P, P)) * 0.1
        hs.append(mean + z + z.T)
    hs = np.stack(hs)
    hbar = hs.mean(axis=0)
    exact = ((hs - hbar) ** 2).sum(axis=(1, 2)).mean() / P ** 2     # per-element variance, 1/N
    v = rng.standard_normal((probes, P))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    hv = (hs.reshape(N * P, P) @ v.T).reshape(N, P, probes).transpose(2, 0, 1)   # (probes, N, P)
    hbar_v = v @ hbar                                                 # hbar symmetric
    centred = ((hv - hbar_v[:, None, :]) ** 2).sum(axis=2).mean(axis=1)   # mean_i ||(H_i - Hbar) v||^2
    printed_sum = (hv ** 2).sum(axis=(1, 2)) - np.einsum("kp,kp->k", v, hbar_v) ** 2   # as printed: no 1/N
    printed_mean = (hv ** 2).sum(axis=2).mean(axis=1) - np.einsum("kp,kp->k", v, hbar_v) ** 2
    rows = [("exact mean_i ||H_i - Hbar||_F^2 / P^2", exact, 0.0),
            ("centred estimate / P (hessfast sigma2)", *_ms(centred / P)),
            ("centred estimate (no /P)", *_ms(centred)),
            ("printed Alg. 1 with 1/N, / P", *_ms(printed_mean / P)),
            ("printed Alg. 1 as printed (no 1/N), / P", *_ms(printed_sum / P)),
            ("uncentred second moment mean_i ||H_i||_F^2 / P^2", (hs ** 2).sum(axis=(1, 2)).mean() / P ** 2, 0.0)]
    print("| quantity | value | std. error |")
    print("|---|---|---|")
    for name, val, se in rows:
        print(f"| {name} | {val:.5g} | {se:.2g} |")


def ggn_variance_table(rng, P=1000, N=4000):
    print(f"\n### Per-element variance of a per-sample GGN vs the Jacobian-entry variance (P = {P}, N = {N})\n")
    print("| tau^2 | lam_1 = ||mu||^2 | per-element var of G_i | tau^4 + 2 tau^2 lam_1 / P | tau^4 |")
    print("|---|---|---|---|---|")
    for tau2, lam in ((1.0, 10.0), (1.0, 500.0), (0.1, 50.0)):
        mu = rng.standard_normal(P)
        mu *= np.sqrt(lam) / np.linalg.norm(mu)
        j = mu + np.sqrt(tau2) * rng.standard_normal((N, P))       # per-sample Jacobian rows (d_y = 1)
        gbar = j.T @ j / N
        # ||j j^T - Gbar||_F^2 = ||j||^4 - 2 j^T Gbar j + ||Gbar||_F^2, averaged over samples
        var = (np.mean(np.sum(j * j, 1) ** 2) - 2 * np.mean(np.einsum("np,pq,nq->n", j, gbar, j))
               + np.sum(gbar * gbar)) / P ** 2
        print(f"| {tau2} | {lam} | {var:.5g} | {tau2 ** 2 + 2 * tau2 * lam / P:.5g} | {tau2 ** 2:.5g} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"hessfast.theory Monte-Carlo check; numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}, reps={args.reps}, seed={args.seed}")
    wigner_table(args.reps, rng)
    hessian_regime_table(args.reps, rng)
    ggn_table(args.reps, rng)
    algorithm1_table(rng)
    ggn_variance_table(rng)


if __name__ == "__main__":
    main()
