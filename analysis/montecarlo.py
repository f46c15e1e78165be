"""Monte Carlo estimates of the loss terms, with standard errors, through the training ELBO's traces."""
import math

import torch

from infer.elbo import ClosedFormELBO
from infer.fit import weighted


def monte_carlo(model, guide, data, samples: int = 16384, replicates: int = 16, noise: str = "qmc",
                closed_form: bool = True) -> dict:
    """Estimate loss, recon, recon/dim and the KL per latent site from `samples` draws per data point.

    The draws come in `replicates` independent batches. With noise="qmc" each batch is a freshly scrambled Sobol
    set (randomised quasi-Monte Carlo: unbiased, and it covers the rare, costly tail of z evenly), and the standard
    error is that of the batch means; with noise="mc" draws are i.i.d. and the standard error is that of the draws.
    Terms with a valid closed form (see ClosedFormELBO) are exact given the sampled parents. Nats per data point."""
    size = max(samples // replicates, 2)
    batches = []
    with torch.no_grad():
        for _ in range(replicates):
            elbo = ClosedFormELBO(num_particles=size, closed_form=closed_form, noise=noise)
            batches.append({k: v.double() for k, v in
                            elbo.particle_terms(weighted(model, data), weighted(guide, data), data.x).items()})
    terms = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}  # (replicates, size)
    loss = sum(terms.values())

    def se(t):
        return float(t.mean(1).std() / math.sqrt(replicates)) if noise == "qmc" else float(t.std() / math.sqrt(t.numel()))

    kl = {k[3:]: float(v.mean()) for k, v in terms.items() if k.startswith("kl_")}
    recon = float(terms["recon"].mean())
    kind = ("randomised quasi-Monte Carlo (scrambled Sobol)" if noise == "qmc" else "Monte Carlo")
    return {
        "loss": float(loss.mean()),
        "loss_se": se(loss),
        "recon": recon,
        "recon_se": se(terms["recon"]),
        "recon_per_dim": recon / data.n,
        "kl": kl,
        "kl_total": sum(kl.values()),
        "samples": replicates * size,
        "estimator": f"{kind}, {replicates} x {size} samples per data point"
                     + (", closed-form entropy/KL where valid" if closed_form else ""),
    }
