"""How grids.tuned was chosen: Karras rho and the last noise level per NFE budget, on held-out
exact Gaussian mixtures (dims 2, 16, 64 with seeds 5, 6, 7; the sampler benchmark uses other
seeds). Prints, per NFE and sampler, the default grid's RMSE and the best settings by geometric
mean gain over the three problems.

    .venv/bin/python benchmarks/tune_grid.py            # about 4 minutes on 2 cores
"""
import itertools
import math

import torch

import unifusion as uf
from unifusion.evaluation.mixture import GaussianMixture

PROBLEMS = [(2, 6, 5, 200), (16, 6, 6, 128), (64, 10, 7, 96)]  # dim, components, seed, batch
NFES = (5, 8, 10, 15, 20, 50)
SAMPLERS = ("ipndm", "unipc", "dpmpp_2m")
RHOS = (7, 10, 15)
LAST = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def main():
    probs = []
    for dim, K, seed, B in PROBLEMS:
        gm = GaussianMixture.random(dim, K, seed=seed)
        noise = torch.randn(B, dim, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64) * 80.0
        probs.append((gm, noise, gm.pf_ode(noise, 80.0, 0.0)))
    print(f"{'NFE':>4} {'sampler':9s} {'RMSE at rho 7, last 0.002 (dims 2/16/64)':>42}   best (gain, rho, last level); 1/NFE = rule")
    for nfe, name in itertools.product(NFES, SAMPLERS):
        res = {}
        for rho, last in itertools.product(RHOS, LAST):
            res[rho, last] = [float(((uf.sample(gm.denoise, noise, name, nfe=nfe, sigma_min=last,
                                                grid_options={"rho": rho}) - ref) ** 2).mean().sqrt())
                              for gm, noise, ref in probs]
        base = res[7, 0.002]
        gain = {k: math.exp(-sum(math.log(e / b) for e, b in zip(v, base)) / len(v)) for k, v in res.items()}
        top = sorted(gain, key=gain.get, reverse=True)[:3]
        print(f"{nfe:>4} {name:9s} {'  '.join(f'{b:.2e}' for b in base):>42}   "
              + "  ".join(f"x{gain[k]:.2f} (rho {k[0]}, {k[1]})" for k in top) + f"   1/NFE = {1 / nfe:.3f}")


if __name__ == "__main__":
    main()
