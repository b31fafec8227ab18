"""The classifiers' per-point and per-cell loops, compiled (`pipelines.compiled`).

Each loop does the arithmetic of the NumPy passes it replaces in the same order, so the results
are the same bits (tests/test_kernels.py compares them): sums per cell accumulate point by point
in the points' order, as np.bincount does; a 3x3 window sum adds a cell's column neighbours
first, as `geometry.box_sum` does, and then the row sums left and right. What is gained is the
passes: one loop over the points instead of one NumPy pass per sum, and window sums only where
they are read instead of over every cell of a raster that is mostly empty.
"""

from __future__ import annotations

import numpy as np

from pipelines.compiled import compiled


@compiled
def plane_sums(
    flat: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, nx: int, ny: int, min_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """The cells holding points with at least `min_points` points in their 3x3-cell window (in
    increasing order), and their window sums of 1, x, y, z, xx, xy, xz, yy, yz, zz (10, cells)."""
    size = nx * ny
    ident = np.full(size, -1, dtype=np.int32)
    for p in range(flat.size):
        ident[flat[p]] = 0
    occupied = 0
    for c in range(size):
        if ident[c] == 0:
            ident[c] = occupied
            occupied += 1
    sums = np.zeros((occupied, 10))
    for p in range(flat.size):
        k = ident[flat[p]]
        xp, yp, zp = x[p], y[p], z[p]
        sums[k, 0] += 1.0
        sums[k, 1] += xp
        sums[k, 2] += yp
        sums[k, 3] += zp
        sums[k, 4] += xp * xp
        sums[k, 5] += xp * yp
        sums[k, 6] += xp * zp
        sums[k, 7] += yp * yp
        sums[k, 8] += yp * zp
        sums[k, 9] += zp * zp
    cells = np.empty(occupied, dtype=np.int64)
    window = np.empty((10, occupied))
    # The window's cells in box_sum's order of addition: down each column (centre, above, below),
    # then the column sums (centre, left, right). An empty cell or one off the raster adds nothing,
    # as its zero does there (a sum from +0.0 is never -0.0). Row by row, each column sum once (a
    # cell's columns are its neighbours' too): `column[j + 1]` for the columns beside the row's
    # occupied cells (`beside`; 0 and nx + 1 stand for the columns off the raster).
    column = np.zeros((nx + 2, 10))
    beside = np.zeros(nx + 2, dtype=np.bool_)
    kept = 0
    for row in range(ny):
        first = row * nx
        beside[:] = False
        for j in range(nx):
            if ident[first + j] >= 0:
                beside[j] = beside[j + 1] = beside[j + 2] = True
        beside[0] = beside[nx + 1] = False
        for j in range(nx):
            if not beside[j + 1]:
                continue
            column[j + 1] = 0.0
            for dr in (0, -1, 1):
                if 0 <= row + dr < ny:
                    k = ident[first + dr * nx + j]
                    if k >= 0:
                        for layer in range(10):
                            column[j + 1, layer] += sums[k, layer]
        for j in range(nx):
            if ident[first + j] < 0:
                continue
            count = 0.0 + column[j + 1, 0]
            if beside[j]:
                count += column[j, 0]
            if beside[j + 2]:
                count += column[j + 2, 0]
            if count < min_points:
                continue
            cells[kept] = first + j
            for layer in range(10):
                total = 0.0 + column[j + 1, layer]
                if beside[j]:
                    total += column[j, layer]
                if beside[j + 2]:
                    total += column[j + 2, layer]
                window[layer, kept] = total
            kept += 1
    return cells[:kept], window[:, :kept]


@compiled
def moment_sums(
    index: np.ndarray,
    flat: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    h: np.ndarray,
    x0: float,
    y0: float,
    weight: np.ndarray,
    size: int,
) -> np.ndarray:
    """Per cell, the sums of w, w x, w y, w h, w xx, w xy, w yy, w xh, w yh over the points `index`
    (x, y relative to x0, y0; w = weight[i] for the i-th of them, 1 when `weight` is empty): the
    surface fit's nine layers (9, size), as np.bincount sums the products `ground.refine` made."""
    sums = np.zeros((size, 9))
    weighted = weight.size > 0
    for i in range(index.size):
        p = index[i]
        c = flat[p]
        xp, yp, hp = x[p] - x0, y[p] - y0, h[p]
        if weighted:
            w = weight[i]
            sums[c, 0] += w
            sums[c, 1] += w * xp
            sums[c, 2] += w * yp
            sums[c, 3] += w * hp
            sums[c, 4] += w * (xp * xp)
            sums[c, 5] += w * (xp * yp)
            sums[c, 6] += w * (yp * yp)
            sums[c, 7] += w * (xp * hp)
            sums[c, 8] += w * (yp * hp)
        else:
            sums[c, 0] += 1.0
            sums[c, 1] += xp
            sums[c, 2] += yp
            sums[c, 3] += hp
            sums[c, 4] += xp * xp
            sums[c, 5] += xp * yp
            sums[c, 6] += yp * yp
            sums[c, 7] += xp * hp
            sums[c, 8] += yp * hp
    # Accumulated a row per cell (one cache line a point, where nine rows took nine), handed over
    # as nine layers.
    return np.ascontiguousarray(sums.T)


@compiled
def weight_exponents(
    index: np.ndarray,
    flat: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    h: np.ndarray,
    x0: float,
    y0: float,
    intercept: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    inverse_softness: float,
) -> np.ndarray:
    """-(max(above, 0) / softness)^2 per point of `index`, `above` its height over its cell's plane:
    the exponent of the surface fit's weights (np.exp takes it: NumPy's exp and numba's differ in
    the last bit)."""
    out = np.empty(index.size)
    for i in range(index.size):
        p = index[i]
        c = flat[p]
        above = h[p] - (intercept[c] + gx[c] * (x[p] - x0) + gy[c] * (y[p] - y0))
        # np.maximum keeps a NaN.
        scaled = (above if above > 0.0 or above != above else 0.0) * inverse_softness
        out[i] = -(scaled * scaled)
    return out


@compiled
def plane_corrected(
    flat: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    h: np.ndarray,
    x0: float,
    y0: float,
    n: np.ndarray,
    intercept: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
) -> np.ndarray:
    """Every point's height less its cell's plane, where the cell had support (n > 1e-9)."""
    out = np.empty(flat.size)
    for p in range(flat.size):
        c = flat[p]
        if n[c] > 1e-9:
            out[p] = h[p] - (intercept[c] + gx[c] * (x[p] - x0) + gy[c] * (y[p] - y0))
        else:
            out[p] = h[p]
    return out


@compiled
def flat_cells(x: np.ndarray, y: np.ndarray, inverse: float, i0: int, j0: int, nx: int) -> np.ndarray:
    """`Grid.flat_index`: each point's cell, row * nx + column, the column the truncation of
    x * inverse - i0 (never negative on the grid's own points), the row likewise."""
    out = np.empty(x.size, dtype=np.intp)
    for p in range(x.size):
        out[p] = int(y[p] * inverse - j0) * nx + int(x[p] * inverse - i0)
    return out


@compiled
def bilinear(padded: np.ndarray, width: int, x: np.ndarray, y: np.ndarray, inverse: float, u0: float, v0: float):
    """`Grid.sample`'s bilinear interpolation at every point, from the raster padded by one cell
    (flattened, `width` cells a row); u0, v0 the padded raster's origin in cells."""
    out = np.empty(x.size)
    for p in range(x.size):
        u = x[p] * inverse - u0
        v = y[p] * inverse - v0
        c0 = int(u)
        r0 = int(v)
        fu = u - c0
        fv = v - r0
        i = r0 * width + c0
        a = padded[i]
        top = a + (padded[i + 1] - a) * fu
        a = padded[i + width]
        bottom = a + (padded[i + width + 1] - a) * fu
        out[p] = top + (bottom - top) * fv
    return out


@compiled
def eigen_start(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From `plane_sums`' window sums: the means (3, cells), the covariances xx, xy, xz, yy, yz, zz
    (6, cells), and q, p and the clipped half determinant of (A - q I) / p (3, cells) of the
    trigonometric eigenvalue method, whose arccos and cosines NumPy takes (see `eigen_finish`)."""
    m = sums.shape[1]
    mean = np.empty((3, m))
    cov = np.empty((6, m))
    start = np.empty((3, m))
    for i in range(m):
        cnt = sums[0, i]
        mx, my, mz = sums[1, i] / cnt, sums[2, i] / cnt, sums[3, i] / cnt
        xx = sums[4, i] / cnt - mx * mx
        xy = sums[5, i] / cnt - mx * my
        xz = sums[6, i] / cnt - mx * mz
        yy = sums[7, i] / cnt - my * my
        yz = sums[8, i] / cnt - my * mz
        zz = sums[9, i] / cnt - mz * mz
        mean[0, i], mean[1, i], mean[2, i] = mx, my, mz
        cov[0, i], cov[1, i], cov[2, i], cov[3, i], cov[4, i], cov[5, i] = xx, xy, xz, yy, yz, zz
        q = (xx + yy + zz) / 3.0
        p1 = xy * xy + xz * xz + yz * yz
        p2 = (xx - q) * (xx - q) + (yy - q) * (yy - q) + (zz - q) * (zz - q) + 2.0 * p1
        p = np.sqrt(p2 / 6.0)
        safe = p if p > 0 else 1.0
        b00, b11, b22 = (xx - q) / safe, (yy - q) / safe, (zz - q) / safe
        b01, b02, b12 = xy / safe, xz / safe, yz / safe
        det = b00 * (b11 * b22 - b12 * b12) - b01 * (b01 * b22 - b12 * b02) + b02 * (b01 * b12 - b11 * b02)
        half = det / 2.0
        # np.clip keeps a NaN.
        start[0, i], start[1, i], start[2, i] = q, p, -1.0 if half < -1.0 else (1.0 if half > 1.0 else half)
    return mean, cov, start


@compiled
def eigen_finish(
    cells: np.ndarray,
    mean: np.ndarray,
    cov: np.ndarray,
    start: np.ndarray,
    cos_largest: np.ndarray,
    cos_smallest: np.ndarray,
    mean_out: np.ndarray,
    eigenvalues_out: np.ndarray,
    normal_out: np.ndarray,
) -> None:
    """The eigenvalues (ascending, at least 0) and the unit eigenvector of the smallest one of each
    covariance, written with the means at `cells` of the (3, raster) outputs. The eigenvector is the
    largest cross product of two rows of (A - smallest I), as np.argmax picks it (the first largest,
    or the first NaN); an isotropic or empty covariance gets (0, 0, 1)."""
    crosses = np.empty((3, 3))
    norms = np.empty(3)
    for i in range(cells.size):
        xx, xy, xz, yy, yz, zz = cov[0, i], cov[1, i], cov[2, i], cov[3, i], cov[4, i], cov[5, i]
        q, p = start[0, i], start[1, i]
        largest = q + 2.0 * p * cos_largest[i]
        smallest = q + 2.0 * p * cos_smallest[i]
        middle = 3.0 * q - largest - smallest
        a00, a11, a22 = xx - smallest, yy - smallest, zz - smallest
        crosses[0, 0], crosses[0, 1], crosses[0, 2] = xy * yz - xz * a11, xz * xy - a00 * yz, a00 * a11 - xy * xy
        crosses[1, 0], crosses[1, 1], crosses[1, 2] = xy * a22 - xz * yz, xz * xz - a00 * a22, a00 * yz - xy * xz
        crosses[2, 0], crosses[2, 1], crosses[2, 2] = a11 * a22 - yz * yz, yz * xz - xy * a22, xy * yz - a11 * xz
        pick = 0
        for k in range(3):
            norms[k] = crosses[k, 0] * crosses[k, 0] + crosses[k, 1] * crosses[k, 1] + crosses[k, 2] * crosses[k, 2]
        if not np.isnan(norms[0]):
            for k in range(1, 3):
                if np.isnan(norms[k]):
                    pick = k
                    break
                if norms[k] > norms[pick]:
                    pick = k
        length = np.sqrt(norms[pick])
        # np.max and np.maximum keep a NaN.
        if np.isnan(smallest) or np.isnan(middle) or np.isnan(largest):
            scale = np.nan
        else:
            scale = max(abs(smallest), abs(middle), abs(largest))
            scale = scale if scale > 1e-300 else 1e-300
        degenerate = length <= 1e-12 * (scale * scale)
        c = cells[i]
        for k in range(3):
            mean_out[k, c] = mean[k, i]
            normal_out[k, c] = 0.0 if degenerate else crosses[pick, k] / length
        if degenerate:
            normal_out[2, c] = 1.0
        for k, value in enumerate((smallest, middle, largest)):
            eigenvalues_out[k, c] = value if value >= 0.0 or np.isnan(value) else 0.0


@compiled
def maximum_at(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """np.maximum.at(out, index, values): NumPy's maximum keeps a NaN and, on a tie, takes the value
    (which decides only the sign of a zero)."""
    for i in range(index.size):
        c = index[i]
        current, value = out[c], values[i]
        if current == current and (value != value or value >= current):
            out[c] = value


@compiled
def minimum_at(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """np.minimum.at(out, index, values), as `maximum_at`."""
    for i in range(index.size):
        c = index[i]
        current, value = out[c], values[i]
        if current == current and (value != value or value <= current):
            out[c] = value


@compiled
def plane_distances(
    normal: np.ndarray, mean: np.ndarray, cells: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """Each point's distance from the local plane of its cell in `cells` (normal and mean (3, raster))."""
    out = np.empty(cells.size)
    for p in range(cells.size):
        c = cells[p]
        out[p] = abs(
            normal[0, c] * (x[p] - mean[0, c]) + normal[1, c] * (y[p] - mean[1, c]) + normal[2, c] * (z[p] - mean[2, c])
        )
    return out


@compiled
def add_counts(layer: np.ndarray, flat: np.ndarray, weight: np.ndarray) -> None:
    """np.bincount(flat, weight) added into a zeroed float32 raster (weight empty: counts), without
    the float64 raster in between: small counts and sums of 0/1 weights are exact in float32."""
    if weight.size == 0:
        for p in range(flat.size):
            layer[flat[p]] += 1.0
    else:
        for p in range(flat.size):
            layer[flat[p]] += weight[p]


@compiled
def uniform_box(stack: np.ndarray, window: int) -> np.ndarray:
    """ndimage.uniform_filter(stack, size=(1, window, window), mode="constant") as SciPy (1.17)
    computes it: along the rows, then along the columns, each a running sum in double over the line
    padded with zeros (the window's first sum, then each step adding entering - leaving), divided by
    the window at each cell and rounded to the stack's type."""
    k, ny, nx = stack.shape
    half = window // 2
    between = np.empty((ny, nx), dtype=stack.dtype)
    out = np.empty_like(stack)
    # Down the columns (axis 1), all columns of a row at a time: the same additions per column.
    running = np.empty(nx)
    for layer in range(k):
        data = stack[layer]
        running[:] = 0.0
        for t in range(window):
            i = t - half
            if 0 <= i < ny:
                for j in range(nx):
                    running[j] += data[i, j]
        for j in range(nx):
            between[0, j] = running[j] / window
        for row in range(1, ny):
            entering, leaving = row + window - 1 - half, row - 1 - half
            for j in range(nx):
                e = data[entering, j] if entering < ny else 0.0
                f = data[leaving, j] if leaving >= 0 else 0.0
                running[j] += e - f
                between[row, j] = running[j] / window
        # Along the rows (axis 2).
        for row in range(ny):
            line = between[row]
            acc = 0.0
            for t in range(window):
                j = t - half
                if 0 <= j < nx:
                    acc += line[j]
            out[layer, row, 0] = acc / window
            for col in range(1, nx):
                entering, leaving = col + window - 1 - half, col - 1 - half
                e = line[entering] if entering < nx else 0.0
                f = line[leaving] if leaving >= 0 else 0.0
                acc += e - f
                out[layer, row, col] = acc / window
    return out


@compiled
def within_widths(mask: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Cells with a True cell of `mask` at a row offset dr (|dr| < widths.size) and a column offset
    of at most widths[|dr|] (-1: none at that row offset): `grid.within_reach`'s disc, from each
    row's distance to its nearest True cell instead of maximum filters over the whole raster."""
    ny, nx = mask.shape
    reach = widths.size - 1
    far = nx + reach + 1
    # Per row, the column distance from each cell to the nearest True cell of that row.
    gap = np.empty((ny, nx), dtype=np.int64)
    for i in range(ny):
        last = -far
        for j in range(nx):
            if mask[i, j]:
                last = j
            gap[i, j] = j - last
        last = nx + far
        for j in range(nx - 1, -1, -1):
            if mask[i, j]:
                last = j
            if last - j < gap[i, j]:
                gap[i, j] = last - j
    out = np.zeros((ny, nx), dtype=np.bool_)
    for i in range(ny):
        for dr in range(-reach, reach + 1):
            r = i + dr
            width = widths[abs(dr)]
            if r < 0 or r >= ny or width < 0:
                continue
            for j in range(nx):
                if gap[r, j] <= width:
                    out[i, j] = True
    return out


@compiled
def closed_cross(mask: np.ndarray) -> np.ndarray:
    """Morphological closing of `mask` with the 3x3 cross, the outside counting as False (as
    `grid.close_and_fill` pads it), or-ed with the mask: dilation (any of a cell and its four
    neighbours), then erosion (all of them)."""
    ny, nx = mask.shape
    grown = np.zeros((ny + 2, nx + 2), dtype=np.bool_)  # one cell of margin: the dilation reaches it
    for i in range(-1, ny + 1):
        for j in range(-1, nx + 1):
            hit = False
            for di, dj in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
                r, c = i + di, j + dj
                if 0 <= r < ny and 0 <= c < nx and mask[r, c]:
                    hit = True
                    break
            grown[i + 1, j + 1] = hit
    out = np.empty((ny, nx), dtype=np.bool_)
    for i in range(ny):
        for j in range(nx):
            out[i, j] = mask[i, j] or (
                grown[i + 1, j + 1]
                and grown[i, j + 1]
                and grown[i + 2, j + 1]
                and grown[i + 1, j]
                and grown[i + 1, j + 2]
            )
    return out
