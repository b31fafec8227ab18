"""The compiled loops (pipelines/classifiers/kernels.py) give the same bits as the NumPy passes they
replaced, written out here as they were, on real points (the IGN block's dense 0.25 m grid, a
sparse ISPRS sample) and on rasters one cell wide; and their cache works where the installed
package cannot be written to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.classifiers import kernels
from pipelines.classifiers.base import PointBlock
from pipelines.classifiers.geometry import box_sum, local_planes
from pipelines.classifiers.grid import Grid
from tests.test_classifiers import load

REPO = Path(__file__).resolve().parents[1]


def numpy_window_sums(grid: Grid, flat: np.ndarray, weights: list, window: int = 3) -> list[np.ndarray]:
    """geometry.window_sums as it was: a bincount per weight, then box_sum over the whole raster."""
    size = grid.nx * grid.ny
    layers = (np.asarray(np.bincount(flat, w, minlength=size), dtype=np.float64) for w in weights)
    return [box_sum(layer.reshape(1, grid.ny, grid.nx), window).ravel() for layer in layers]


def numpy_sample(grid: Grid, raster: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Grid.sample as it was."""
    flat = np.pad(raster, 1, mode="edge").ravel()
    width = grid.nx + 2
    u = x * (1.0 / grid.cell) - (grid.i0 - 0.5)
    v = y * (1.0 / grid.cell) - (grid.j0 - 0.5)
    c0, r0 = u.astype(np.intp), v.astype(np.intp)
    fu, fv = u - c0, v - r0
    i = r0 * width + c0
    a, b = flat[i], flat[1:][i]
    top = a + (b - a) * fu
    a, b = flat[width:][i], flat[width + 1 :][i]
    bottom = a + (b - a) * fu
    return top + (bottom - top) * fv


def numpy_symmetric_eigen(xx, xy, xz, yy, yz, zz) -> tuple[np.ndarray, np.ndarray]:
    """geometry.symmetric_eigen as it was: eigenvalues (3, n) ascending and the unit eigenvector of
    the smallest, by the trigonometric method, in NumPy."""
    q = (xx + yy + zz) / 3.0
    p1 = xy * xy + xz * xz + yz * yz
    p2 = (xx - q) ** 2 + (yy - q) ** 2 + (zz - q) ** 2 + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe = np.where(p > 0, p, 1.0)
    b00, b11, b22 = (xx - q) / safe, (yy - q) / safe, (zz - q) / safe
    b01, b02, b12 = xy / safe, xz / safe, yz / safe
    det = b00 * (b11 * b22 - b12 * b12) - b01 * (b01 * b22 - b12 * b02) + b02 * (b01 * b12 - b11 * b02)
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    largest = q + 2.0 * p * np.cos(phi)
    smallest = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    middle = 3.0 * q - largest - smallest
    values = np.stack([smallest, middle, largest])
    a00, a11, a22 = xx - smallest, yy - smallest, zz - smallest
    crosses = (
        (xy * yz - xz * a11, xz * xy - a00 * yz, a00 * a11 - xy * xy),
        (xy * a22 - xz * yz, xz * xz - a00 * a22, a00 * yz - xy * xz),
        (a11 * a22 - yz * yz, yz * xz - xy * a22, xy * yz - a11 * xz),
    )
    norms = np.stack([cx * cx + cy * cy + cz * cz for cx, cy, cz in crosses])
    pick = np.argmax(norms, axis=0)
    normal = np.stack([np.choose(pick, [c[k] for c in crosses]) for k in range(3)])
    length = np.sqrt(np.take_along_axis(norms, pick[None], axis=0)[0])
    degenerate = length <= 1e-12 * np.maximum(np.abs(values).max(axis=0), 1e-300) ** 2
    normal /= np.where(degenerate, 1.0, length)
    normal[:, degenerate] = np.array([[0.0], [0.0], [1.0]])
    return values, normal


def numpy_local_planes(grid: Grid, flat, x, y, z, min_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """geometry.local_planes as it was: (mean, eigenvalues, normal), each (3, cells of the raster)."""
    n, sx, sy, sz, sxx, sxy, sxz, syy, syz, szz = numpy_window_sums(
        grid, flat, [None, x, y, z, x * x, x * y, x * z, y * y, y * z, z * z]
    )
    occupied = np.zeros(n.size, dtype=bool)
    occupied[flat] = True
    cells = np.flatnonzero(occupied & (n >= min_points))
    cnt = n[cells]
    mx, my, mz = sx[cells] / cnt, sy[cells] / cnt, sz[cells] / cnt
    values, normals = numpy_symmetric_eigen(
        sxx[cells] / cnt - mx * mx,
        sxy[cells] / cnt - mx * my,
        sxz[cells] / cnt - mx * mz,
        syy[cells] / cnt - my * my,
        syz[cells] / cnt - my * mz,
        szz[cells] / cnt - mz * mz,
    )
    size = grid.nx * grid.ny
    mean, eigenvalues, normal = np.zeros((3, size)), np.full((3, size), np.nan), np.zeros((3, size))
    normal[2] = 1.0
    for k, row in enumerate((mx, my, mz)):
        mean[k, cells] = row
        eigenvalues[k, cells] = np.maximum(values[k], 0.0)
        normal[k, cells] = normals[k]
    return mean, eigenvalues, normal


@pytest.fixture(scope="module", params=["ign_st_barth_100m.laz", "isprs/samp51.las"])
def points(request) -> PointBlock:
    block, _ = load(request.param)
    return block


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, signed zeros included; NaN where NaN (whatever its sign bit)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":
        return a.tobytes() == b.tobytes()
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and a[~nan].tobytes() == b[~nan].tobytes()


@pytest.mark.parametrize("cell", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("min_points", [3, 4])
def test_plane_sums_are_the_window_sums_at_occupied_cells(points: PointBlock, cell: float, min_points: int) -> None:
    grid = Grid.covering(points.x, points.y, cell)
    flat = grid.flat_index(points.x, points.y)
    x, y, z = points.x - grid.x0, points.y - grid.y0, points.z - points.z.min()
    expected = numpy_window_sums(grid, flat, [None, x, y, z, x * x, x * y, x * z, y * y, y * z, z * z])
    occupied = np.zeros(grid.nx * grid.ny, dtype=bool)
    occupied[flat] = True
    cells = np.flatnonzero(occupied & (expected[0] >= min_points))
    found_cells, sums = kernels.plane_sums(flat, x, y, z, grid.nx, grid.ny, min_points)
    assert same(found_cells, cells.astype(np.int64))
    for layer in range(10):
        assert same(np.ascontiguousarray(sums[layer]), expected[layer][cells])


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (2, 3)])
def test_plane_sums_on_rasters_one_cell_wide(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    ny, nx = shape
    grid = Grid(0, 0, 1.0, nx, ny)
    x, y = rng.uniform(0, nx, 200), rng.uniform(0, ny, 200)
    z = rng.normal(5.0, 2.0, 200)
    flat = grid.flat_index(x, y)
    expected = numpy_window_sums(grid, flat, [None, x, y, z, x * x, x * y, x * z, y * y, y * z, z * z])
    cells, sums = kernels.plane_sums(flat, x, y, z, nx, ny, 3)
    assert same(cells, np.unique(flat).astype(np.int64))
    for layer in range(10):
        assert same(np.ascontiguousarray(sums[layer]), expected[layer][cells])


@pytest.mark.parametrize("cell", [0.25, 0.5, 2.0])
def test_local_planes_are_numpys(points: PointBlock, cell: float) -> None:
    grid = Grid.covering(points.x, points.y, cell)
    flat = grid.flat_index(points.x, points.y)
    x, y, z = points.x - grid.x0, points.y - grid.y0, points.z - points.z.min()
    planes = local_planes(grid, flat, x, y, z, min_points=4)
    mean, eigenvalues, normal = numpy_local_planes(grid, flat, x, y, z, 4)
    assert same(planes.mean, mean) and same(planes.eigenvalues, eigenvalues) and same(planes.normal, normal)


def test_local_planes_of_degenerate_neighbourhoods_are_numpys() -> None:
    """Points on a line, on a plane, all in one spot, and a plane tilted every way: isotropic and
    rank-deficient covariances take the degenerate branch and the eigenvector's ties."""
    rng = np.random.default_rng(8)
    t = rng.uniform(0, 4, 400)
    x = np.concatenate([t, t, np.full(100, 2.0), rng.uniform(0, 4, 400)])
    y = np.concatenate([t, rng.uniform(0, 4, 400), np.full(100, 2.0), rng.uniform(0, 4, 400)])
    z = np.concatenate([t, np.zeros(400), np.full(100, 1.0), x[900:] * 0.3 - y[900:] * 0.2])
    # The four groups side by side, 8 m apart.
    x = x + np.repeat([0.0, 8.0, 16.0, 24.0], [400, 400, 100, 400])
    grid = Grid(0, 0, 1.0, 28, 4)
    flat = grid.flat_index(np.minimum(x, 27.99), np.minimum(y, 3.99))
    planes = local_planes(grid, flat, x, y, z, min_points=3)
    mean, eigenvalues, normal = numpy_local_planes(grid, flat, x, y, z, 3)
    assert same(planes.mean, mean) and same(planes.eigenvalues, eigenvalues) and same(planes.normal, normal)


@pytest.mark.parametrize("weighted", [False, True])
def test_moment_sums_are_the_bincounts_of_the_surface_fit(points: PointBlock, weighted: bool) -> None:
    rng = np.random.default_rng(5)
    grid = Grid.covering(points.x, points.y, 1.0)
    flat = grid.flat_index(points.x, points.y)
    h = points.z - points.z.min() - 0.5
    index = np.sort(rng.choice(len(points), len(points) // 3, replace=False))
    xs, ys, hs = points.x[index] - grid.x0, points.y[index] - grid.y0, h[index]
    products = [xs, ys, hs, xs * xs, xs * ys, ys * ys, xs * hs, ys * hs]
    weight = rng.uniform(0.0, 1.0, index.size) if weighted else np.empty(0)
    layers = [weight, *(weight * p for p in products)] if weighted else [None, *products]
    sums = kernels.moment_sums(index, flat, points.x, points.y, h, grid.x0, grid.y0, weight, grid.nx * grid.ny)
    for layer, w in enumerate(layers):
        expected = np.asarray(np.bincount(flat[index], w, minlength=grid.nx * grid.ny), dtype=np.float64)
        assert same(sums[layer], expected)


def test_weights_and_corrections_are_the_surface_fits(points: PointBlock) -> None:
    rng = np.random.default_rng(11)
    grid = Grid.covering(points.x, points.y, 1.0)
    flat = grid.flat_index(points.x, points.y)
    size = grid.nx * grid.ny
    h = points.z - points.z.min() - 0.5
    intercept, gx, gy = rng.normal(0.0, 1.0, size), rng.normal(0.0, 0.1, size), rng.normal(0.0, 0.1, size)
    intercept[::97] = np.nan  # a cell whose plane is undefined keeps NaN, as np.maximum does
    n = np.where(rng.uniform(size=size) < 0.2, 0.0, rng.uniform(0.5, 20.0, size))
    index = np.flatnonzero(rng.uniform(size=len(points)) < 0.5)
    x, y = points.x - grid.x0, points.y - grid.y0
    cells, xs, ys, hs = flat[index], x[index], y[index], h[index]
    above = hs - (intercept[cells] + gx[cells] * xs + gy[cells] * ys)
    expected = -np.square(np.maximum(above, 0.0) * (1.0 / 0.15))
    found = kernels.weight_exponents(index, flat, points.x, points.y, h, grid.x0, grid.y0, intercept, gx, gy, 1 / 0.15)
    assert same(found, expected)
    correction = intercept[flat] + gx[flat] * x + gy[flat] * y
    expected = np.where(n[flat] > 1e-9, h - correction, h)
    assert same(kernels.plane_corrected(flat, points.x, points.y, h, grid.x0, grid.y0, n, intercept, gx, gy), expected)


@pytest.mark.parametrize("cell", [0.25, 1.0, 3.0])
def test_bilinear_is_the_grids_sample(points: PointBlock, cell: float) -> None:
    grid = Grid.covering(points.x, points.y, cell)
    raster = np.random.default_rng(2).normal(10.0, 3.0, grid.shape)
    assert same(grid.sample(raster, points.x, points.y), numpy_sample(grid, raster, points.x, points.y))


CALL_ONE = """
import numpy as np, numba
from pipelines import compiled
from pipelines.classifiers import kernels
out = kernels.bilinear(np.arange(16.0), 4, np.array([0.75]), np.array([1.25]), 1.0, -0.5, -0.5)
assert out[0] == 8.25, out
print(compiled.jit().keywords["cache"], numba.config.CACHE_DIR, sum(kernels.bilinear.dispatcher.stats.cache_hits.values()))
"""


def read_only_copy(tmp_path: Path) -> Path:
    """The pipelines package where no `__pycache__` folder can be made (a file holds each name):
    what an installation owned by another user is to numba, even to root, who may write anywhere."""
    root = tmp_path / "site"
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in (root / "pipelines", root / "pipelines" / "classifiers"):
        (folder / "__pycache__").write_text("")
    return root


def fresh(root: Path, env: dict[str, str]) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-c", CALL_ONE],
        cwd=root,
        env={**{k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.split()


def test_a_read_only_installation_caches_in_the_users_cache_folder(tmp_path: Path) -> None:
    root = read_only_copy(tmp_path)
    cache = tmp_path / "cache"
    first = fresh(root, {"XDG_CACHE_HOME": str(cache)})
    assert first == ["True", str(cache / "pointflow" / "numba"), "0"]
    assert any((cache / "pointflow" / "numba").rglob("*bilinear*.nbi")), "nothing cached"
    # A second process, as the next run's Dask worker: loaded from the cache, not compiled.
    assert fresh(root, {"XDG_CACHE_HOME": str(cache)}) == ["True", str(cache / "pointflow" / "numba"), "1"]


def test_without_a_user_cache_folder_the_cache_goes_to_the_temp_folder(tmp_path: Path) -> None:
    root = read_only_copy(tmp_path)
    (tmp_path / "no-cache").write_text("")  # a file: no folder can be made under it
    temp = tmp_path / "tmp"
    temp.mkdir()
    found = fresh(root, {"XDG_CACHE_HOME": str(tmp_path / "no-cache"), "TMPDIR": str(temp)})
    assert found == ["True", str(temp / f"pointflow-numba-{os.getuid()}"), "0"]


@pytest.mark.parametrize(("compiled", "ufunc"), [(kernels.maximum_at, np.maximum), (kernels.minimum_at, np.minimum)])
def test_extremes_at_are_numpys_ufunc_at(points: PointBlock, compiled, ufunc) -> None:
    """Real heights per 0.5 m cell, and NaN, signed zeros and ties, where NumPy's choice shows."""
    grid = Grid.covering(points.x, points.y, 0.5)
    flat = grid.flat_index(points.x, points.y)
    values = points.z - np.median(points.z)
    values[::1000] = np.nan
    values[1::1000] = -0.0
    values[2::1000] = 0.0
    for start in (-np.inf, np.inf, 0.0, -0.0):
        expected = np.full(grid.nx * grid.ny, start)
        with np.errstate(invalid="ignore"):  # NaN meets NaN
            ufunc.at(expected, flat, values)
        found = np.full(grid.nx * grid.ny, start)
        compiled(found, flat, values)
        assert same(found, expected)
    zeros = np.array([0.0, -0.0, 0.0, -0.0, -0.0, 0.0])
    expected, found = np.zeros(2), np.zeros(2)
    ufunc.at(expected, np.array([0, 0, 0, 1, 1, 1]), zeros)
    compiled(found, np.array([0, 0, 0, 1, 1, 1]), zeros)
    assert expected.tobytes() == found.tobytes()


def test_plane_distances_are_numpys(points: PointBlock) -> None:
    grid = Grid.covering(points.x, points.y, 0.5)
    flat = grid.flat_index(points.x, points.y)
    x, y, z = points.x - grid.x0, points.y - grid.y0, points.z - points.z.min()
    planes = local_planes(grid, flat, x, y, z, min_points=4)
    normal, mean = np.take(planes.normal, flat, axis=1), np.take(planes.mean, flat, axis=1)
    expected = np.abs(normal[0] * (x - mean[0]) + normal[1] * (y - mean[1]) + normal[2] * (z - mean[2]))
    assert same(kernels.plane_distances(planes.normal, planes.mean, flat, x, y, z), expected)


@pytest.mark.parametrize("cell", [0.25, 1.0, 8.0])
def test_flat_index_is_cols_rows(points: PointBlock, cell: float) -> None:
    grid = Grid.covering(points.x, points.y, cell)
    col, row = grid.cols_rows(points.x, points.y)
    assert same(grid.flat_index(points.x, points.y), row * grid.nx + col)


@pytest.mark.parametrize("window", [3, 5, 9, 13])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uniform_box_is_scipys_uniform_filter(points: PointBlock, window: int, dtype) -> None:
    """SciPy 1.17's running sums, bit for bit: the roof votes (float32 counts) and the sparse data's
    surface fit (float64 sums) were tuned on them. A SciPy that sums otherwise fails here: the
    kernel keeps the classes, only this comparison would need its reference frozen."""
    from scipy import ndimage

    grid = Grid.covering(points.x, points.y, 0.5)
    flat = grid.flat_index(points.x, points.y)
    stack = np.zeros((2, grid.ny, grid.nx), dtype=dtype)
    stack[0].ravel()[:] = np.bincount(flat, minlength=grid.nx * grid.ny)
    stack[1].ravel()[:] = np.bincount(flat, points.z - points.z.min(), minlength=grid.nx * grid.ny)
    expected = ndimage.uniform_filter(stack, size=(1, window, window), mode="constant")
    assert same(kernels.uniform_box(stack, window), expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 4)])
def test_uniform_box_on_rasters_smaller_than_the_window(shape: tuple[int, int]) -> None:
    from scipy import ndimage

    stack = np.random.default_rng(4).integers(0, 9, (1, *shape)).astype(np.float32)
    assert same(kernels.uniform_box(stack, 9), ndimage.uniform_filter(stack, size=(1, 9, 9), mode="constant"))


def test_add_counts_is_bincount_in_float32(points: PointBlock) -> None:
    grid = Grid.covering(points.x, points.y, 0.25)
    flat = grid.flat_index(points.x, points.y)
    multi = (points.number_of_returns > 1).astype(np.float32)
    for weight in (np.empty(0, dtype=np.float32), multi):
        layer = np.zeros(grid.nx * grid.ny, dtype=np.float32)
        kernels.add_counts(layer, flat, weight)
        expected = np.bincount(flat, None if weight.size == 0 else weight, minlength=grid.nx * grid.ny)
        assert same(layer, expected.astype(np.float32))


WARM_UP = """
from pipelines.classifiers import buildings, filters, ground, kernels, warm
from pipelines.compiled import Compiled
warm.warm()
loops = [getattr(m, name) for m in (kernels, buildings, ground, filters) for name in dir(m) if isinstance(getattr(m, name), Compiled)]
print(len(loops), [loop.__name__ for loop in loops if not loop.dispatcher.signatures])
"""


def test_the_workers_warm_up_loads_every_compiled_loop() -> None:
    """In a fresh process, as a worker starts: after the warm-up no loop is left to load on a tile."""
    found = subprocess.run([sys.executable, "-c", WARM_UP], cwd=REPO, capture_output=True, text=True, check=True)
    count, missing = found.stdout.split(" ", 1)
    assert int(count) >= 13 and missing.strip() == "[]"
    config = (REPO / "pipelines" / "data" / "dask-local.yaml").read_text()
    assert "pipelines.classifiers.warm" in config


def numpy_within_reach(mask: np.ndarray, reach: float, cell: float) -> np.ndarray:
    """grid.within_reach as it was: a separable maximum filter per rectangle of the disc."""
    from scipy import ndimage

    radius = int(reach / cell) + 1
    offsets = np.arange(radius + 1)
    inside = np.sqrt((offsets[:, None] ** 2 + offsets[None, :] ** 2).astype(np.float64)) * cell <= reach
    widths = np.where(inside.any(axis=1), radius - np.argmax(inside[:, ::-1], axis=1), -1)
    out = np.zeros(mask.shape, dtype=bool)
    for width in sorted(set(widths[widths >= 0].tolist())):
        height = int(np.flatnonzero(widths >= width).max())
        rows = ndimage.maximum_filter1d(mask, 2 * height + 1, axis=0, mode="constant")
        out |= ndimage.maximum_filter1d(rows, 2 * width + 1, axis=1, mode="constant")
    return out


def numpy_closed(mask: np.ndarray) -> np.ndarray:
    """close_and_fill's closing as it was: maximum then minimum filter with the cross, on the mask
    padded by two cells, or-ed with the mask."""
    from scipy import ndimage

    padded = np.pad(mask, 2).astype(np.uint8)
    cross = ndimage.generate_binary_structure(2, 1)
    closed = ndimage.minimum_filter(ndimage.maximum_filter(padded, footprint=cross), footprint=cross)
    return closed[2:-2, 2:-2].astype(bool) | mask


def masks() -> list[np.ndarray]:
    """Sparse and dense random masks, a roof-like blob, one-cell-wide and empty ones."""
    rng = np.random.default_rng(6)
    blob = np.zeros((60, 80), dtype=bool)
    blob[10:30, 20:50] = True
    blob[15:20, 30:35] = False
    return [
        rng.uniform(size=(90, 70)) < 0.01,
        rng.uniform(size=(50, 50)) < 0.4,
        blob,
        rng.uniform(size=(1, 40)) < 0.2,
        rng.uniform(size=(40, 1)) < 0.2,
        np.zeros((5, 7), dtype=bool),
        np.ones((3, 3), dtype=bool),
    ]


@pytest.mark.parametrize(("reach", "cell"), [(1.5, 0.25), (1.5, 0.5), (2.0, 1.0), (0.3, 0.25), (3.7, 0.5)])
def test_within_reach_is_the_union_of_maximum_filters(reach: float, cell: float) -> None:
    from pipelines.classifiers.grid import within_reach

    for mask in masks():
        assert same(within_reach(mask, reach, cell), numpy_within_reach(mask, reach, cell))


def test_closed_cross_is_the_filters_closing() -> None:
    for mask in masks():
        assert same(kernels.closed_cross(mask), numpy_closed(mask))
