"""The paper pipeline's geometric transforms (flips, rot90, affine, then one of elastic/grid/optical distortion) as ONE
sampling grid per sample, applied to image and mask with a single grid_sample each.

Coordinates are in pixels, (x, y) = (column, row), pixel centres at integers. For an output pixel p the pipeline reads
image0(S_H · S_V · S_R · S_A · D(p)): D is the distortion's map (identity when none fires), S_A the inverse of
albumentations' affine matrix (cv2.warpAffine inverts it too), S_R, S_V, S_H the inverse quarter turns and flips. The
three last map the square onto itself, so mirroring at the affine stage can be left to grid_sample's reflection at the
end; the distortion stage's own border (cv2.remap's) is applied to D(p) here. grid_sample with align_corners=True
puts pixel centres at -1 and +1, and its 'reflection' padding then mirrors about the edge pixels: BORDER_REFLECT_101.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from hpc_drseg.config.choices import AugmentBorder
from hpc_drseg.data import augment as paper
from hpc_drseg.data.device_augment.params import Params


def _eye(batch: int, device: torch.device) -> torch.Tensor:
    return torch.eye(3, dtype=torch.float64, device=device).expand(batch, 3, 3).clone()


def quarter_turns(n: int, device: torch.device) -> torch.Tensor:
    """(4, 3, 3): source-from-output matrices of np.rot90(image, k), k = 0..3 (counter-clockwise, square n×n):
    np.rot90(img)[r, c] = img[c, n - 1 - r], i.e. x_source = n - 1 - y, y_source = x."""
    once = torch.tensor([[0.0, -1.0, n - 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64, device=device)
    turns = [torch.eye(3, dtype=torch.float64, device=device)]
    for _ in range(3):
        turns.append(turns[-1] @ once)
    return torch.stack(turns)


def affine_matrix(params: Params, n: int) -> torch.Tensor:
    """(B, 3, 3) float64: albumentations' forward affine matrix (create_affine_transformation_matrix about the
    centre (n/2 - 0.5, n/2 - 0.5), no shear): shift_back @ translate @ rotate @ scale @ shift_to_origin."""
    batch, device = params.angle_deg.shape[0], params.angle_deg.device
    theta = torch.deg2rad(params.angle_deg.double().remainder(360.0))
    cos, sin, scale = torch.cos(theta), torch.sin(theta), params.scale.double()
    centre = n / 2 - 0.5
    matrix = _eye(batch, device)
    matrix[:, 0, 0], matrix[:, 0, 1] = cos * scale, sin * scale
    matrix[:, 1, 0], matrix[:, 1, 1] = -sin * scale, cos * scale
    # translation part: centre + shift - R·S·centre
    shift = params.shift_px.double()
    matrix[:, 0, 2] = centre + shift[:, 0] - (matrix[:, 0, 0] + matrix[:, 0, 1]) * centre
    matrix[:, 1, 2] = centre + shift[:, 1] - (matrix[:, 1, 0] + matrix[:, 1, 1]) * centre
    return matrix


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) inverse of affine matrices (last row 0 0 1), in closed form: torch.linalg.inv checks for singular
    input, which on a GPU waits for the device."""
    a, b, c, d = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1]
    det = a * d - b * c
    inverse = torch.zeros_like(matrix)
    inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 1, 0], inverse[:, 1, 1] = d / det, -b / det, -c / det, a / det
    inverse[:, :2, 2] = -(inverse[:, :2, :2] @ matrix[:, :2, 2:3])[..., 0]
    inverse[:, 2, 2] = 1.0
    return inverse


def source_matrix(params: Params, n: int, turns: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) float64: S_H · S_V · S_R · S_A, the source-from-output map of flips, quarter turns (`turns`:
    quarter_turns(n)) and affine. Built with torch.where, not boolean indexing, which would wait for the device."""
    batch, device = params.hflip.shape[0], params.hflip.device
    flip_x, flip_y = _eye(batch, device), _eye(batch, device)
    scalar = {"dtype": torch.float64, "device": device}
    one, zero, edge = torch.ones((), **scalar), torch.zeros((), **scalar), torch.full((), n - 1.0, **scalar)
    flip_x[:, 0, 0], flip_x[:, 0, 2] = torch.where(params.hflip, -one, one), torch.where(params.hflip, edge, zero)
    flip_y[:, 1, 1], flip_y[:, 1, 2] = torch.where(params.vflip, -one, one), torch.where(params.vflip, edge, zero)
    return flip_x @ flip_y @ turns[params.rot90] @ invert_affine(affine_matrix(params, n))


class Geometry:
    """Sampling grids for square images of side `n` on `device`; holds what every batch reuses (pixel coordinates,
    the grid distortion's segments, the elastic blur's matrices)."""

    def __init__(self, n: int, device: torch.device, border: AugmentBorder = "reflect_101") -> None:
        self.n, self.device, self.border = n, torch.device(device), border
        axis = torch.arange(n, dtype=torch.float32, device=self.device)
        self.pixels = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)  # (n, n, 2): (x, y) at [y, x]
        self.segment, self.fraction = self._grid_segments()
        self.turns = quarter_turns(n, self.device)
        scale = n / paper._PAPER_PX
        self.elastic_alpha = paper.ELASTIC_ALPHA_PX * scale
        self.elastic_sigma = paper.ELASTIC_SIGMA_PX * scale
        self._blur: Optional[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = None

    # ------------------------------------------------------------------------------------------------ the grid
    def grid(self, params: Params) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, n, n, 2) grid for grid_sample (align_corners=True) and, with the constant border, the (B, 1, n, n)
        pixels whose distortion source lies inside the image (the others are 0: cv2.remap's constant fill)."""
        coords = self.distortion_map(params)
        valid = None
        if self.border == "reflect_101":
            coords = self._reflect_101(coords)
        else:
            inside = ((coords > -1.0) & (coords < float(self.n))).all(dim=-1)
            valid = inside[:, None].to(torch.float32)
        matrix = source_matrix(params, self.n, self.turns).to(torch.float32)
        source = coords @ matrix[:, None, :2, :2].transpose(-1, -2) + matrix[:, None, None, :2, 2]
        return source * (2.0 / max(self.n - 1, 1)) - 1.0, valid

    def _reflect_101(self, coords: torch.Tensor) -> torch.Tensor:
        last = float(self.n - 1)
        if last == 0:
            return torch.zeros_like(coords)
        folded = coords.remainder(2 * last)
        return last - (folded - last).abs()

    def warp(self, image: torch.Tensor, packed: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, n, n) float (bilinear) and packed mask (B, 1, n, n) float (nearest), moved alike."""
        grid, valid = self.grid(params)
        padding = "reflection" if self.border == "reflect_101" else "zeros"
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)
        packed = F.grid_sample(packed, grid, mode="nearest", padding_mode=padding, align_corners=True)
        if valid is not None:
            image, packed = image * valid, packed * valid
        return image, packed

    # ------------------------------------------------------------------------------------------------ distortions
    def distortion_map(self, params: Params) -> torch.Tensor:
        """(B, n, n, 2): D(p), the distortion stage's source of every output pixel (the identity where none fires)."""
        batch = params.distortion.shape[0]
        coords = self.pixels.expand(batch, -1, -1, -1)
        choice = params.distortion[:, None, None, None]
        if params.elastic_noise is not None:
            coords = torch.where(choice == 0, self.elastic_map(params.elastic_noise), coords)
        coords = torch.where(choice == 1, self.grid_map(params.grid_steps), coords)
        return torch.where(choice == 2, self.optical_map(params.optical_k), coords)

    def elastic_map(self, noise: torch.Tensor) -> torch.Tensor:
        """A.ElasticTransform (gaussian noise): the (dx, dy) noise divided by its largest |value|, blurred as ONE
        stacked (2n, n) image (OpenCV's 8σ+1 taps, replicate border: dx's last rows bleed into dy's first, as 2.x
        does), times alpha, added to the pixel coordinates."""
        batch, n = noise.shape[0], self.n
        peak = noise.abs().amax(dim=(1, 2, 3), keepdim=True)
        fields = torch.where(peak > 1e-6, noise / peak, noise).reshape(batch, 2 * n, n)
        rows, cols = self._blur_factors()
        blurred = fields
        for factor in reversed(rows):  # M_rows @ fields, M = left @ right (or the dense matrix alone)
            blurred = factor @ blurred
        for factor in reversed(cols):  # … @ M_cols^T
            blurred = blurred @ factor.T
        shift = (blurred * self.elastic_alpha).reshape(batch, 2, n, n).permute(0, 2, 3, 1)
        return self.pixels + shift

    def _blur_factors(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Rows (2n) and columns (n) blur as (left, right) low-rank factors where that is exact to 1e-4 (see
        augment.low_rank_blur_factors), else as the dense matrix alone; made once."""
        if self._blur is None:
            factors = []
            for size in (2 * self.n, self.n):
                low_rank = paper.low_rank_blur_factors(size, self.elastic_sigma)
                dense = (torch.from_numpy(paper.blur_matrix(size, self.elastic_sigma)).float(),)
                factors.append(tuple(t.to(self.device) for t in (low_rank or dense)))
            self._blur = (factors[0], factors[1])
        return self._blur

    def _grid_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pixel of an axis: its segment of generate_grid (GRID_STEPS + 1 runs of n // GRID_STEPS pixels, the
        last cut at the edge; -1 past them, where albumentations leaves 0) and its place in it (np.linspace with
        the end point: 0 at the first pixel, 1 at the last)."""
        n, steps = self.n, paper.GRID_STEPS
        step = n // steps
        segment, fraction = torch.full((n,), -1, dtype=torch.long), torch.zeros(n)
        for index in range(steps + 1):
            start, end = index * step, min(index * step + step, n)
            if end > start:
                segment[start:end] = index
                fraction[start:end] = torch.linspace(0.0, 1.0, end - start) if end - start > 1 else 0.0
        return segment.to(self.device), fraction.to(self.device)

    def grid_axis(self, steps: torch.Tensor) -> torch.Tensor:
        """(B, S + 1) raw steps of one axis → (B, n) source coordinates: normalize_grid_distortion_steps (the last,
        shorter run's step shrunk, then all scaled so the runs span n / floor(n / S) steps) and generate_grid."""
        n, count = self.n, paper.GRID_STEPS
        step = n // count
        last = min(n, (count + 1) * step) - count * step
        steps = torch.cat([steps[:, :-1], steps[:, -1:] * (last / step)], dim=1)
        steps = steps * ((n / math.floor(n / count)) / steps.sum(dim=1, keepdim=True))
        ends = torch.cumsum(step * steps, dim=1)
        starts = ends - step * steps
        index = self.segment.clamp(min=0)
        values = starts[:, index] + (ends - starts)[:, index] * self.fraction
        return torch.where(self.segment >= 0, values, torch.zeros_like(values))

    def grid_map(self, steps: torch.Tensor) -> torch.Tensor:
        """A.GridDistortion (normalized): x depends on the column only, y on the row only."""
        xs, ys = self.grid_axis(steps[:, 0]), self.grid_axis(steps[:, 1])
        n = self.n
        return torch.stack([xs[:, None, :].expand(-1, n, -1), ys[:, :, None].expand(-1, -1, n)], dim=-1)

    def optical_map(self, k: torch.Tensor) -> torch.Tensor:
        """A.OpticalDistortion(mode='camera'): cv2.initUndistortRectifyMap with camera matrix [[n, 0, n/2], [0, n,
        n/2]], distortion (k, k, 0, 0, 0) and OpenCV's default new camera matrix (principal point at the centre
        pixel (n - 1)/2): x = (p - (n - 1)/2)/n, r² = x² + y², source = n·x·(1 + k r² + k r⁴) + n/2."""
        n = self.n
        normalised = (self.pixels - (n - 1) / 2) / n
        r2 = (normalised**2).sum(dim=-1, keepdim=True)
        k = k[:, None, None, None]
        return n * normalised * (1 + k * r2 + k * r2 * r2) + n / 2
