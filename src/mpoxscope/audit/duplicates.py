"""Exact and near-duplicate image pairs.

Exact: same SHA-256 of the file bytes (``identical-file``) or of the decoded RGB pixels (``identical-pixels``, e.g.
the same picture saved again as PNG). Near: the pHash distance, minimised over flips and crop windows (see
:mod:`mpoxscope.audit.hashing`), is at most ``threshold`` bits of 64, *and* the dHash (128 bits, horizontal and
vertical gradients) of the best-aligned variant is at most ``dhash_threshold`` bits. The second hash is a
cheap check on the few candidate pairs: minimising over 140 variants lets some distinct photos with similar
low-frequency layout reach a low pHash distance, and dHash measures something else (local gradient signs), so
both agreeing by chance is much rarer than either alone.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mpoxscope.audit.hashing import ImageRecord, crop_variant, dhash_bits, image_records, pack_bits, variant_windows
from mpoxscope.errors import MpoxscopeError

#: Default near-duplicate threshold in pHash bits (of 64), chosen by measurement (see AuditConfig).
DEFAULT_THRESHOLD = 10
#: Default dHash confirmation threshold in bits (of 128).
DEFAULT_DHASH_THRESHOLD = 30

KINDS = ("identical-file", "identical-pixels", "near")


@dataclass(frozen=True)
class DuplicatePair:
    """Two images (indices ``a < b`` into the audited list) that show the same picture.

    ``distance`` is the pHash Hamming distance in bits (0-64; 0 for exact copies), ``dhash_distance`` the dHash
    distance of the aligned pair (0-128), ``match`` says which flip/crop of which image lined them up."""

    a: int
    b: int
    kind: str
    distance: int
    dhash_distance: int
    match: str = "as is"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NearMatrix:
    """Pairwise pHash distances over variants. ``dist[i, j]`` = min over variants v of d(base_i, variant_v(j)),
    (N, N) uint8, not symmetric; ``arg[i, j]`` = the v reaching it. Rows/columns of unreadable images are 255."""

    dist: np.ndarray
    arg: np.ndarray

    def symmetric(self) -> np.ndarray:
        """(N, N) distance with either image allowed to be the flipped/cropped one."""
        return np.minimum(self.dist, self.dist.T)


def near_matrix(records: Sequence[ImageRecord], chunk: int = 32) -> NearMatrix:
    """All-pairs pHash distances, vectorised: packed 64-bit hashes, XOR, popcount; O(N^2 * variants)."""
    n = len(records)
    ok = np.array([r.ok for r in records], dtype=bool)
    n_var = next((len(r.phash) for r in records if r.ok and r.phash is not None), 1)
    variants = np.zeros((n, n_var), dtype=np.uint64)
    for i, r in enumerate(records):
        if r.ok and r.phash is not None:
            variants[i] = r.phash
    base = variants[:, 0]
    dist = np.full((n, n), 255, dtype=np.uint8)
    arg = np.zeros((n, n), dtype=np.int16)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        bits = np.bitwise_count(base[rows, None, None] ^ variants[None, :, :])  # (c, N, V)
        arg[rows] = bits.argmin(axis=2)
        dist[rows] = bits.min(axis=2)
    dist[~ok, :] = 255
    dist[:, ~ok] = 255
    return NearMatrix(dist, arg)


def _dhash_check(records: Sequence[ImageRecord], i: int, j: int, variant: int) -> int:
    """dHash distance between image i as is and the variant of image j that matched it (bits of 128)."""
    window = variant_windows()[variant]
    ri, rj = records[i], records[j]
    assert ri.dhash is not None and rj.thumb is not None
    if window.is_identity:
        other = rj.dhash
    else:
        other = pack_bits(dhash_bits(crop_variant(rj.thumb, window)))
    assert other is not None
    return int(np.bitwise_count(ri.dhash ^ other).sum())


def exact_groups(records: Sequence[ImageRecord]) -> dict[tuple[int, int], str]:
    """Pairs with identical file bytes or identical decoded pixels -> their kind."""
    pairs: dict[tuple[int, int], str] = {}
    for kind, key in (("identical-file", "sha256"), ("identical-pixels", "pixel_sha256")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            digest = getattr(r, key)
            if digest:
                groups[digest].append(i)
        for members in groups.values():
            for x, a in enumerate(members):
                for b in members[x + 1:]:
                    pairs.setdefault((a, b), kind)
    return pairs


def find_duplicates(records: Sequence[ImageRecord], threshold: int = DEFAULT_THRESHOLD,
                    dhash_threshold: int = DEFAULT_DHASH_THRESHOLD) -> list[DuplicatePair]:
    """Exact and near-duplicate pairs among ``records``, sorted by distance then index."""
    if not 0 <= threshold <= 64:
        raise MpoxscopeError(f"--threshold: must be between 0 and 64 bits (got {threshold})")
    if not 0 <= dhash_threshold <= 128:
        raise MpoxscopeError(f"dhash threshold: must be between 0 and 128 bits (got {dhash_threshold})")
    exact = exact_groups(records)
    matrix = near_matrix(records)
    sym = matrix.symmetric()
    windows = variant_windows()
    out = [DuplicatePair(a, b, kind, 0, 0) for (a, b), kind in exact.items()]
    ii, jj = np.nonzero(np.triu(sym <= threshold, k=1))
    for a, b in zip(ii.tolist(), jj.tolist()):
        if (a, b) in exact:
            continue
        # which image is the flipped/cropped one: the direction with the smaller distance
        i, j = (a, b) if matrix.dist[a, b] <= matrix.dist[b, a] else (b, a)
        variant = int(matrix.arg[i, j])
        d2 = _dhash_check(records, i, j, variant)
        if d2 > dhash_threshold:
            continue
        match = windows[variant].describe()
        match = "as is" if match == "as is" else f"{records[i].path.name} ~ {match} of {records[j].path.name}"
        out.append(DuplicatePair(a, b, "near", int(sym[a, b]), d2, match))
    return sorted(out, key=lambda p: (p.distance, p.dhash_distance, p.a, p.b))


def find_near_duplicates(paths: Sequence[str | os.PathLike], threshold: int = DEFAULT_THRESHOLD,
                         dhash_threshold: int = DEFAULT_DHASH_THRESHOLD) -> list[DuplicatePair]:
    """Exact and near-duplicate pairs among image files (indices into ``paths``); unreadable files are skipped
    for the near check. Hashes are cached in memory, so a second call on the same files is fast."""
    return find_duplicates(image_records(paths), threshold, dhash_threshold)
