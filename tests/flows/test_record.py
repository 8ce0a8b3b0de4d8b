"""Worker-side helpers that need no Ray."""

from __future__ import annotations

import numpy as np

from ops.engine import attention_mask


def test_attention_mask_keeps_bos_and_drops_right_padding() -> None:
    mask = np.array([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(
        attention_mask(mask), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    )
