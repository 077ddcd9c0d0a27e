"""Skip Layer Guidance on a transformer shallower than the one its layers were named for (the
demo's): the same relative depth is skipped, and said — before, layers 7–9 of a 4-block model
skipped nothing, and SLG silently did nothing."""

from __future__ import annotations

import numpy as np
import pytest

from studio.engine import build_request


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("slg") / "data", demo=True, variant="sd3.5-medium")
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return Studio(config)


def test_slg_skips_the_same_depth_on_a_shallow_model_and_says_so(studio):
    def run(slg):
        return studio.generate(build_request(dict(prompt="a red fox", seed=5, steps=12, width=256, height=256,
                                                  slg=slg)))

    off, on = run(False), run(True)
    assert studio.current.pipe.transformer.config.num_layers == 4
    meta = on.images[0].metadata
    assert meta["slg"]["layers"] == [1]  # 7–9 of 24 blocks ≈ block 1 of 4 (not the first, not the last two)
    assert any("Skip Layer Guidance's layers 7–9" in n and "this model has 4" in n for n in on.notes)
    a, b = (np.asarray(r.images[0].image, dtype=np.int16) for r in (off, on))
    assert np.abs(a - b).mean() > 0.1  # it does something now (before: skipping no block, exactly nothing)
