"""Array sizes rounded up to a few buckets, so that per-shape compiled programs are few."""

from __future__ import annotations


def geometric_bucket(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3·2^k) that is >= n.

    Chunks of experts get different numbers of routed rows; padded to these sizes, their arrays
    take a few shapes per layer instead of one per chunk, so the per-shape compiled programs (which
    jit caches keep) are compiled and kept a few times, not once per chunk — at DeepSeek-V3 dims
    with 64 experts one per chunk grew the calibration forward's memory by 2 GiB. At most 1.5× the
    rows are computed."""
    if n <= 2:
        return max(n, 1)
    p = 1 << (n - 1).bit_length()  # the power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n else p


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (at least 1): coarser than `geometric_bucket`, for
    programs whose compilation costs more than up to 2× the rows."""
    return 1 << max(int(n) - 1, 0).bit_length()
