"""The paper's coordinate key encoder: secret points in R^d -> one key vector."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CoordinateKeyEncoder"]


class CoordinateKeyEncoder(nn.Module):
    """Encode ``M`` secret coordinates into a key vector ``k`` (``scheme="infl"``).

    ``Linear(d, hidden) - SiLU - Linear(hidden, key_dim) - SiLU - LayerNorm(key_dim)`` applied to every
    point, then the mean over the points. Its weights are trained and shared like any others; only the
    coordinates are secret. The mean over many random points is the scheme's known weakness: keys drawn
    from the same generator give nearly the same ``k`` (measured by :mod:`scinfl.privacy`).
    """

    def __init__(self, *, coordinate_dim: int = 2, hidden: int = 64, key_dim: int = 16) -> None:
        super().__init__()
        self.coordinate_dim = coordinate_dim
        self.key_dim = key_dim
        self.point_mlp = nn.Sequential(
            nn.Linear(coordinate_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, key_dim),
            nn.SiLU(),
            nn.LayerNorm(key_dim),
        )

    def forward(self, coordinates: Tensor) -> Tensor:
        if coordinates.ndim != 2 or coordinates.shape[1] != self.coordinate_dim:
            raise ValueError(
                f"Expected key coordinates of shape (n_points, {self.coordinate_dim}), "
                f"got {tuple(coordinates.shape)}: is this key for another scheme?"
            )
        weight = self.point_mlp[0].weight
        return self.point_mlp(coordinates.to(device=weight.device, dtype=weight.dtype)).mean(dim=0)
