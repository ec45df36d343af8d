"""Where a NoProp-CT run learns and where it does not: per-t accuracy and loss weight.

For a finished CT run (``noprop-dist train --variant=ct ...``), at a few times ``t`` this
draws ``z_t ~ q(z_t | y)`` with the run's learned schedule (from the **label**: for diagnosis
only, never for evaluation) and reports, on the test split:

* ``alpha_bar(t)``, ``SNR(t)`` and ``SNR'(t)`` of the learned (averaged) schedule;
* the network's accuracy at ``t`` (argmax of its logits given ``z_t``, ``x`` and ``t``);
* the mean denoising error ``||u_hat - u_y||^2`` and the Eq. 9 loss weight times it,
  ``0.5 eta SNR'(t) ||u_hat - u_y||^2`` (what one example at ``t`` contributes to the loss);
* the share of the loss weight ``SNR'`` that falls in each band of ``t`` under the run's
  time sampling (uniform: the integral of ``SNR'`` over the band / ``SNR(1) - SNR(0)``).

The head's accuracy on ``z_1 ~ q(z_1 | y)`` and the chain's (with and without the step
noise) are printed beside them.

    python benchmarks/ct_diagnostic.py RUN_DIR [--t 0.05 0.2 0.4 0.6 0.8 0.95 1.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from noprop_dist.core.continuous import sample_ct_marginal
from noprop_dist.core.schedule import denoised_embedding
from noprop_dist.data import load_dataset, normalize
from noprop_dist.nets.time_conditioned import evaluate_continuous
from noprop_dist.rundir import RunDir
from noprop_dist.variants.base import load_run_units

DEFAULT_T = [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0]


@torch.no_grad()
def per_t(run_dir: Path, times: list[float], seed: int = 0) -> dict:
    setup, cfg, _, states, embedding = load_run_units(RunDir(run_dir))
    if setup.variant != "ct":
        raise SystemExit(f"{run_dir} is a {setup.variant} run; the diagnostic reads CT runs")
    objective = setup.objective
    test = load_dataset(cfg.data).test
    sched = objective.averaged_schedule(setup, states).double()
    chain = objective.chain(setup, states, embedding, run_dir)
    x = normalize(np.asarray(test.x), setup.mean, setup.std)                      # (N, C, H, W)
    y = torch.from_numpy(np.array(test.y))
    u_y = embedding[y].double()                                                   # (N, d)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(u_y.shape, generator=gen, dtype=torch.float64)              # (N, d)
    rows = []
    for t in times:
        k = min(int(t * len(chain.nets)), len(chain.nets) - 1)
        net = chain.nets[k]
        tt = torch.full((len(y),), float(t), dtype=torch.float64)
        ab = sched.alpha_bar(tt)
        z_t = sample_ct_marginal(u_y, ab, eps)                                    # (N, d)
        logits = torch.cat([net(z_t[i:i + 500].float(), x[i:i + 500], tt[i:i + 500].float())
                            for i in range(0, len(y), 500)])                     # (N, m)
        err = (denoised_embedding(logits.double(), embedding.double()) - u_y).pow(2).sum(-1)   # (N,)
        snr_prime = sched.snr_derivative(tt)
        rows.append({"t": t, "net": k + 1, "alpha_bar": float(ab[0]), "snr": float(sched.snr(tt)[0]),
                     "snr_prime": float(snr_prime[0]),
                     "accuracy": float((logits.argmax(-1) == y).double().mean()),
                     "z_nearest_accuracy": float((torch.cdist(z_t, embedding.double()).argmin(-1) == y).double().mean()),
                     "error": float(err.mean()),
                     "weighted_error": float((0.5 * setup.continuous.eta * snr_prime * err).mean())})
    # Share of SNR' (the loss weight) per band of t under uniform t: (SNR(b) - SNR(a)) / (SNR(1) - SNR(0)).
    edges = torch.tensor([0.0, 0.5, 0.7, 0.9, 0.99, 1.0], dtype=torch.float64)
    snr_edges = sched.snr(edges)
    total = float(snr_edges[-1] - snr_edges[0])
    bands = [{"band": f"[{float(a):.2f}, {float(b):.2f}]", "weight_share": float(sb - sa) / total}
             for a, b, sa, sb in zip(edges[:-1], edges[1:], snr_edges[:-1], snr_edges[1:])]
    head_z1 = sample_ct_marginal(u_y, sched.alpha_bar(torch.ones(len(y), dtype=torch.float64)), eps).float()
    head_acc = float((chain.head(head_z1).argmax(-1) == y).double().mean())
    noisy = evaluate_continuous(chain, test, cfg.eval.batch_size, cfg.eval.seed, "cpu", True)
    clean = evaluate_continuous(chain, test, cfg.eval.batch_size, cfg.eval.seed, "cpu", False)
    return {"run": str(run_dir), "rows": rows, "bands": bands, "head_accuracy_on_z1": head_acc,
            "chain_accuracy_noise": noisy["accuracy"], "chain_accuracy_no_noise": clean["accuracy"],
            "gamma_0": float(sched.gamma(torch.zeros(1, dtype=torch.float64))[0]),
            "gamma_1": float(sched.gamma(torch.ones(1, dtype=torch.float64))[0])}


def markdown(result: dict) -> str:
    lines = [f"CT diagnostic of {result['run']}: chain {result['chain_accuracy_noise']:.3f} with the step noise, "
             f"{result['chain_accuracy_no_noise']:.3f} without; head on z_1 ~ q(z_1|y) {result['head_accuracy_on_z1']:.3f}; "
             f"gamma(0) = {result['gamma_0']:.2f}, gamma(1) = {result['gamma_1']:.2f}", "",
             "| t | net | alpha_bar | SNR | SNR' | net accuracy | nearest(z_t) | error | 0.5 eta SNR' error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['t']:.2f} | {r['net']} | {r['alpha_bar']:.4g} | {r['snr']:.3g} | {r['snr_prime']:.3g} | "
                     f"{r['accuracy']:.3f} | {r['z_nearest_accuracy']:.3f} | {r['error']:.3g} | {r['weighted_error']:.3g} |")
    lines += ["", "| band of t | share of the loss weight SNR' (uniform t) |", "|---|---|"]
    lines += [f"| {b['band']} | {b['weight_share']:.4f} |" for b in result["bands"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--t", type=float, nargs="+", default=DEFAULT_T)
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = per_t(args.run_dir, args.t)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
