"""Evaluation (RQMC, exact quadrature, IWAE, ELBO surgery, PSIS k-hat, the Gaussian-family optimum), ArviZ data,
seaborn figures and sweep summaries. Importable without Hydra."""
