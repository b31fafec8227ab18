"""The SciPy raster filters the classifiers use, compiled (`pipelines.compiled`), each giving what
SciPy gives, in a third of its time or less: square minimum and maximum filters (`minimum_filter`,
`maximum_filter`) and the nearest-feature transform (`nearest_feature`, what
`ndimage.distance_transform_edt` returns as indices).

The minimum and maximum filters (square, odd `size`) are the van Herk / Gil-Werman running
extremes: three comparisons a cell whatever the window, where SciPy keeps a list of candidates per
line. A minimum or maximum takes one of the values it compares, so the result is the same bits as
SciPy's. Every mode the classifiers use comes to the same thing for an extreme: the window cut at
the raster's edge. `nearest`, `reflect` and `mirror` only repeat values already in that window, and
`constant` adds a value that never wins (+inf to a minimum, -inf or False to a maximum). The rasters
hold no NaN (filled surfaces, infinities for empty cells); a zero's sign could differ where +0.0
and -0.0 tie, which no comparison downstream can tell apart.
"""

from __future__ import annotations

import numpy as np

from pipelines.compiled import compiled

# Rows filtered side by side (see `_extreme`): 16 float64 fill two cache lines.
BAND = 16


def minimum_filter(raster: np.ndarray, size: int) -> np.ndarray:
    """ndimage.minimum_filter(raster, size) of a 2-D raster, `size` odd, the window cut at the edges."""
    return _extreme(np.ascontiguousarray(raster), size, False)


def maximum_filter(raster: np.ndarray, size: int) -> np.ndarray:
    """ndimage.maximum_filter(raster, size) of a 2-D raster, as `minimum_filter`. A mask is filtered
    as bytes: numba compares booleans several times slower."""
    if raster.dtype == np.bool_:
        return _extreme(np.ascontiguousarray(raster).view(np.uint8), size, True).view(np.bool_)
    return _extreme(np.ascontiguousarray(raster), size, True)


@compiled
def _extreme(raster, size, largest):
    """The minimum filter (`largest`: the maximum). Each line, padded with `size // 2` copies of its
    end cells (as `nearest` pads it), is cut into blocks of `size` cells, with the running minimum
    from each block's start and from its end; a window spans at most two blocks, so its minimum is
    the smaller of the second's from its start and the first's to its end. Along the rows, then down
    the columns. Each running minimum waits for the one before it, so lines are done side by side:
    along the rows, BAND rows at a time (copied across, a column of the band to a row of `padded`);
    down the columns, a block of whole rows at a time (the raster read in order, the running minima
    of two blocks kept)."""
    ny, nx = raster.shape
    half = size // 2
    across = np.empty_like(raster)
    length = nx + 2 * half
    padded = np.empty((length, BAND), dtype=raster.dtype)
    forward = np.empty((length, BAND), dtype=raster.dtype)
    backward = np.empty((length, BAND), dtype=raster.dtype)
    for top in range(0, ny, BAND):
        band = min(BAND, ny - top)
        for j in range(length):
            column = min(max(j - half, 0), nx - 1)
            for r in range(band):
                padded[j, r] = raster[top + r, column]
        for start in range(0, length, size):
            end = min(start + size, length)
            forward[start] = padded[start]
            for j in range(start + 1, end):
                for r in range(band):
                    a, b = forward[j - 1, r], padded[j, r]
                    forward[j, r] = a if (a > b if largest else a < b) else b
            backward[end - 1] = padded[end - 1]
            for j in range(end - 2, start - 1, -1):
                for r in range(band):
                    a, b = backward[j + 1, r], padded[j, r]
                    backward[j, r] = a if (a > b if largest else a < b) else b
        for r in range(band):
            for j in range(nx):
                a, b = backward[j, r], forward[j + size - 1, r]
                across[top + r, j] = a if (a > b if largest else a < b) else b
    # Row i of the padded raster is row min(max(i - half, 0), ny - 1).
    length = ny + 2 * half
    down = np.empty((size, nx), dtype=raster.dtype)
    up = np.empty((size, nx), dtype=raster.dtype)
    up_before = np.empty((size, nx), dtype=raster.dtype)
    out = np.empty_like(raster)
    for start in range(0, length, size):
        rows = min(size, length - start)
        down[0] = across[min(max(start - half, 0), ny - 1)]
        for k in range(1, rows):
            source = across[min(max(start + k - half, 0), ny - 1)]
            for j in range(nx):
                a, b = down[k - 1, j], source[j]
                down[k, j] = a if (a > b if largest else a < b) else b
        up_before, up = up, up_before
        up[rows - 1] = across[min(max(start + rows - 1 - half, 0), ny - 1)]
        for k in range(rows - 2, -1, -1):
            source = across[min(max(start + k - half, 0), ny - 1)]
            for j in range(nx):
                a, b = up[k + 1, j], source[j]
                up[k, j] = a if (a > b if largest else a < b) else b
        # The windows that end in this block: the one that fills it, and those that start in the
        # block before.
        for k in range(rows):
            i = start + k - size + 1
            if i < 0 or i >= ny:
                continue
            if k == size - 1:
                out[i] = down[k]
            else:
                for j in range(nx):
                    a, b = up_before[k + 1, j], down[k, j]
                    out[i, j] = a if (a > b if largest else a < b) else b
    return out


@compiled
def nearest_feature(feature):
    """Per cell of a 2-D mask, the row and column (int32) of the True cell nearest to it, as
    `ndimage.distance_transform_edt(~feature, return_indices=True)` picks it among equally near ones:
    the exact transform of Maurer, Qi and Raghavan (2003) in SciPy's order (the nearest True cell of
    each column, the one above on a tie; then per row the lower envelope of those columns'
    distances, built and walked left to right, an earlier column kept on a tie), in integers, which
    SciPy's doubles hold exactly. The mask holds at least one True cell."""
    ny, nx = feature.shape
    rows = np.empty((ny, nx), dtype=np.int32)
    # Down and up the columns, all columns at a time: the nearest True cell above and below.
    above = np.full(nx, -1, dtype=np.int32)
    for i in range(ny):
        for j in range(nx):
            if feature[i, j]:
                above[j] = i
            rows[i, j] = above[j]
    below = np.full(nx, -1, dtype=np.int32)
    for i in range(ny - 1, -1, -1):
        for j in range(nx):
            if feature[i, j]:
                below[j] = i
            if below[j] >= 0 and (rows[i, j] < 0 or below[j] - i < i - rows[i, j]):
                rows[i, j] = below[j]
    out_rows = np.empty((ny, nx), dtype=np.int32)
    out_cols = np.empty((ny, nx), dtype=np.int32)
    sites = np.empty(nx, dtype=np.int64)  # the envelope's columns
    heights = np.empty(nx, dtype=np.int64)  # their squared row distances
    for i in range(ny):
        top = -1
        for j in range(nx):
            if rows[i, j] < 0:
                continue
            d = np.int64(rows[i, j] - i)
            w = d * d
            # The last column leaves the envelope when the one before it and this one hide it.
            while top >= 1:
                a = sites[top] - sites[top - 1]
                b = j - sites[top]
                c = a + b
                if c * heights[top] - b * heights[top - 1] - a * w - a * b * c <= 0:
                    break
                top -= 1
            top += 1
            sites[top] = j
            heights[top] = w
        k = 0
        for j in range(nx):
            d = sites[k] - j
            nearest = d * d + heights[k]
            while k < top:
                d = sites[k + 1] - j
                following = d * d + heights[k + 1]
                if nearest <= following:
                    break
                nearest = following
                k += 1
            out_rows[i, j] = rows[i, sites[k]]
            out_cols[i, j] = sites[k]
    return out_rows, out_cols
