"""The quadrature's coordinates: the scalars it integrates over, one or two per data point, and the latent site
values they make.

Exact quadrature integrates at most two scalars per data point, u outside and v inside (analysis.exact). They are
either the model's latent sites of one scalar each (the VAE's z at latent_dim=1; the DLGM's z1 and z2), named as
the sites, or the two coordinates of ONE site of two scalars (the VAE's z at latent_dim=2), named '<site>[0]' and
'<site>[1]' and fed to the model and guide stacked as that site's (..., 2) event. Anything else is refused here, in
one line. Unlike the DLGM's, the likelihood of a split site depends on both coordinates: p(x|u, v).
"""
import torch


def coordinate_names(sizes: dict) -> list:
    """The coordinates of latent sites {site: scalars per data point} (model order, top first), or ValueError: the
    sites themselves where each has one scalar and there are at most two, '<site>[0]', '<site>[1]' for one site of
    two scalars."""
    if len(sizes) == 1 and next(iter(sizes.values())) == 2:
        site = next(iter(sizes))
        return [f"{site}[0]", f"{site}[1]"]
    if sum(sizes.values()) > 2 or any(s != 1 for s in sizes.values()):
        raise ValueError(f"exact quadrature handles at most 2 scalar latents per data point, as 2 sites of one "
                         f"scalar each or one site of two; this model has "
                         f"{', '.join(f'{n}: {s}' for n, s in sizes.items())} scalars per data point "
                         "(analysis.iwae.iwae bounds its likelihood)")
    return list(sizes)


class Coordinates:
    """The coordinates of a model's latent sites {site: scalars per data point} (coordinate_names) and the maps
    between coordinate values and site values: `names` (top first: the outer u is names[-1], the inner v names[0]
    when there are two) and `split`, the site whose two scalars are the coordinates (None where the coordinates
    are the sites)."""

    def __init__(self, sizes: dict):
        self.names = coordinate_names(sizes)
        self.split = next(iter(sizes)) if self.names != list(sizes) else None

    def sites(self, values: dict) -> dict:
        """{site: value (..., N, event)} from coordinate values {name: (..., N)}: a scalar site's value with its
        event dim, a split site's coordinates broadcast and stacked as its (..., N, 2) event."""
        if self.split is None:
            return {k: v.unsqueeze(-1) for k, v in values.items()}
        first, second = torch.broadcast_tensors(*(values[n] for n in self.names))
        return {self.split: torch.stack([first, second], -1)}

    def draws(self, site: str, value: torch.Tensor, count: int) -> dict:
        """{name: (count, N)}: the coordinates of `count` draws of a site (value (count, N, event) or, for a prior
        draw shared by the data points, (count, 1, event)), expanded over N = 2 data points."""
        if site != self.split:
            return {site: value.reshape(count, -1).expand(count, 2)}
        return {name: value.reshape(count, -1, 2)[..., k].expand(count, 2) for k, name in enumerate(self.names)}
