"""Mixing synthetic rows into the train split, by a ratio to the real train rows.

Synthetic rows only ever join train: validation and test stay real, so held-out numbers measure the
tenant's own data. At most floor(ratio * real train rows kept) synthetic rows are kept; which ones is
decided by a seeded hash of each row's content, so the choice is deterministic, does not depend on
the order of the synthetic file, and a different seed draws a different sample. Rows beyond the
quota are rejected as over_mix_ratio, so every synthetic row is still accounted for.
"""

from __future__ import annotations

import hashlib
import math


def quota(real_train_rows: int, ratio: float) -> int:
    """Most synthetic rows allowed next to `real_train_rows` real ones (1e-9 absorbs float error in ratio*n)."""
    return max(0, math.floor(ratio * real_train_rows + 1e-9))


def draw_key(seed: int, content_hash: str, row: int) -> tuple[str, int]:
    """Sort key of a synthetic row in the seeded draw (ties, i.e. exact duplicates: file order)."""
    return hashlib.sha256(f"{seed}\0{content_hash}".encode()).hexdigest(), row
