"""Workers that the Ray cluster cannot place fail at once with the field named (or scale
down when asked), instead of leaving the stage waiting at 0 shards."""

from __future__ import annotations

import pytest

from ops.errors import ConfigError


def test_placeable_against_the_real_cluster(ray_cluster) -> None:
    from flows.engine import placeable

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    assert placeable(cpus, gpus=False, scale_down=False) == cpus
    with pytest.raises(ConfigError, match=rf"resources.workers.*{cpus + 3} workers need "
                                          rf"{cpus + 3} CPUs but the Ray cluster has {cpus}"):  # fmt: skip
        placeable(cpus + 3, gpus=False, scale_down=False)
    assert placeable(cpus + 3, gpus=False, scale_down=True) == cpus
    if not ray_cluster.cluster_resources().get("GPU"):
        with pytest.raises(ConfigError, match="GPUs but the Ray cluster has 0"):
            placeable(1, gpus=True, scale_down=True)  # nothing fits: no scaling down to 0
