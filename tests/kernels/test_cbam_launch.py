"""Launch sizes and the launch counter of the fused CBAM (hpc_drseg.kernels.cbam_launch); no kernel runs here."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from hpc_drseg.kernels import bench, cbam_launch  # noqa: E402

SHAPES = bench.PAPER_SHAPES + ((40, 9, 11), (8, 5, 7), (1, 1, 1), (48, 1024, 1024), (2048, 8, 8))


@pytest.mark.parametrize("programs", [1, 64, 4 * 132])
def test_launch_config_invariants(programs):
    for c, h, w in SHAPES:
        for batch in (1, 4, 16):
            cfg = cbam_launch.launch_config(batch, c, h * w, programs)
            grids = cfg.grids(batch, c, h * w)
            for block in (cfg.block_c, cfg.block_hw):
                assert block & (block - 1) == 0, cfg  # powers of two
            assert cfg.block_c * cfg.block_hw <= cbam_launch.MAX_TILE, cfg
            for chunk, block in (
                (cfg.pool_chunk, cfg.block_hw),
                (cfg.grad_chunk, cfg.block_hw),
                (cfg.c_chunk, cfg.block_c),
            ):
                assert chunk % block == 0, cfg
            # every pixel and channel covered, no program left without work
            assert (grids.pool[2] - 1) * cfg.pool_chunk < h * w <= grids.pool[2] * cfg.pool_chunk, cfg
            assert (grids.grad[0] - 1) * cfg.grad_chunk < h * w <= grids.grad[0] * cfg.grad_chunk, cfg
            assert (grids.chunks[2] - 1) * cfg.c_chunk < c <= grids.chunks[2] * cfg.c_chunk, cfg
            assert (grids.pixels[0] - 1) * cfg.block_hw < h * w <= grids.pixels[0] * cfg.block_hw, cfg
            axes_1_2 = grids.pool[1:] + grids.pixels[1:] + grids.chunks[1:] + grids.grad[1:]
            assert max(axes_1_2) <= 65535, cfg  # CUDA's limit on grid axes 1 and 2


def test_backward_partials_stay_few_per_image():
    """B3 sums P partial rows per image in one program: P stays near the programs a launch aims for, not H·W."""
    for c, h, w in bench.PAPER_SHAPES:
        for batch in (4, 16):
            programs = 4 * 132
            grids = cbam_launch.launch_config(batch, c, h * w, programs).grids(batch, c, h * w)
            assert grids.grad[0] <= max(1, -(-programs // batch)), (c, h, w, batch, grids)


def test_mlp_tiles_fit():
    for channels, hidden in ((256, 16), (48, 3), (8, 1), (2048, 128), (4096, 4096)):
        blocks = cbam_launch._mlp_blocks(channels, hidden)
        assert blocks["BLOCK_H"] >= hidden and blocks["BLOCK_C"] >= 1
        assert blocks["BLOCK_H"] * blocks["BLOCK_C"] <= max(cbam_launch.MAX_TILE, blocks["BLOCK_H"])


def test_count_launches_counts_only_inside_the_block():
    cbam_launch.LAUNCHES["outside"] += 1
    with cbam_launch.count_launches() as counted:
        cbam_launch.LAUNCHES["k1"] += 2
        cbam_launch.LAUNCHES["k2"] += 1
    cbam_launch.LAUNCHES["k1"] += 5
    assert counted == {"k1": 2, "k2": 1}
