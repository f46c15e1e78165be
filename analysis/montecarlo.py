"""Monte Carlo estimates of the loss terms, with standard errors, through the training ELBO's traces."""
import math

import torch

from infer.elbo import ClosedFormELBO
from infer.fit import weighted


def monte_carlo(model, guide, data, samples: int = 10000, chunk: int = 2000, closed_form: bool = True) -> dict:
    """Estimate loss, recon, recon/dim and the KL per latent site from `samples` draws per data point.

    Terms with a valid closed form (see ClosedFormELBO) are exact given the sampled parents; the rest are
    sampled. Returns nats per data point, with the standard error of the loss over the draws."""
    totals, sizes = [], []
    with torch.no_grad():
        for start in range(0, samples, chunk):
            size = min(chunk, samples - start)
            elbo = ClosedFormELBO(num_particles=max(size, 2), closed_form=closed_form)
            totals.append(elbo.particle_terms(weighted(model, data), weighted(guide, data), data.x))
            sizes.append(size)
    terms = {k: torch.cat([t[k][:s] for t, s in zip(totals, sizes)]).double() for k in totals[0]}
    loss = sum(terms.values())
    kl = {k[3:]: float(v.mean()) for k, v in terms.items() if k.startswith("kl_")}
    recon = float(terms["recon"].mean())
    return {
        "loss": float(loss.mean()),
        "loss_se": float(loss.std() / math.sqrt(samples)),
        "recon": recon,
        "recon_se": float(terms["recon"].std() / math.sqrt(samples)),
        "recon_per_dim": recon / data.n,
        "kl": kl,
        "kl_total": sum(kl.values()),
        "estimator": f"Monte Carlo, {samples} samples per data point"
                     + (" (closed-form entropy/KL where valid)" if closed_form else ""),
    }
