"""The pre-rendered synthetic atlas that training reads equals on-the-fly rendering exactly."""

import numpy as np

from mobilenet_embed.data.synthetic import SyntheticTables


def test_atlas_equals_render_and_respects_its_budget():
    tables = SyntheticTables(5, 4, seed=3, nuisance=1.0)
    atlas = tables.atlas(32).numpy()
    assert atlas.shape == (20, 32, 32, 3) and atlas.dtype == np.uint8
    for identity in range(5):
        for image in range(4):
            rendered = tables.render(identity, image, 32).numpy()
            np.testing.assert_array_equal(atlas[identity * 4 + image].astype(np.float32), rendered)
    assert tables.atlas(32, max_bytes=20 * 32 * 32 * 3 - 1) is None
