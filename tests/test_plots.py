"""The decode-order PNG is written and shows every committed position."""

from __future__ import annotations

import matplotlib.image

import paradec
from paradec.api import build_layout
from paradec.plots import decode_order_png

from tiny import tiny_checkpoint



def test_decode_order_png(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path / "model", "dream", seed=31)
    model = paradec.load(root)
    config = paradec.GenerationConfig(blocks=3, block_len=10, summary_len=5, tokens_per_step=2)
    result = paradec.generate(model, "a b c", config)
    layout = build_layout(model, config)
    path = decode_order_png(result.trace, layout.groups.tolist(), tmp_path / "order.png", "test",
                            layout.summary_group)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600
    # not a blank canvas: some pixels are far from white
    assert (image[..., :3].sum(-1) < 1.5).sum() > 100
