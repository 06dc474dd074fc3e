"""The cost model behind reorder="auto", explain's order table and tile-map PNG.

Counts are exact (interval classification, checked against brute force in
tests/test_classify_blocks.py) at 64 x 64 tiles, batch 0, head 0.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.passes.choose_reorder import best, cost_table, order_costs


def _visited(costs) -> dict[str, int]:
    return {c.name: c.visited for c in costs}


def test_m12_7x7_tiles_visited_per_order(record_property):
    """M12 7x7 at 64-token tiles. On the 64x64 grid a row-major tile is one whole grid row, so a
    query tile needs exactly the 7 rows of its window (448 tiles), while an aligned 8x8 Hilbert
    square needs a 14x14 window that straddles up to 3x3 squares (484): row-major is cheaper
    there. On the 128x128 grid a row-major tile is half a row and its window straddles two
    tiles per row (14 per query tile, 3584), and Hilbert order visits 2116."""
    small = _visited(order_costs(attncc.Attention(mask=attncc.neighbourhood_2d(64, 64, 7, 7)),
                                 (64, 64)))
    large = _visited(order_costs(attncc.Attention(
        mask=attncc.neighbourhood_2d(128, 128, 7, 7)), (128, 128)))
    record_property("m12_7x7_64x64", small)
    record_property("m12_7x7_128x128", large)
    assert small["row-major"] == 448 and small["hilbert"] == 484
    assert small["row-major"] < small["hilbert"]
    assert large["row-major"] == 3584 and large["hilbert"] == 2116
    assert large["hilbert"] < large["row-major"]


def test_auto_picks_the_order_that_visits_fewest_tiles():
    for side, expected in ((64, None), (128, attncc.Hilbert2D(128, 128))):
        spec = attncc.Attention(mask=attncc.neighbourhood_2d(side, side, 7, 7), reorder="auto")
        attn = attncc.compile(spec)
        assert attn.plan.spec.reorder == expected


def test_hilberta_is_cheapest_in_hilbert_order():
    for shift in (0, 32):
        spec = attncc.Attention(mask=attncc.hilberta(64, 64, 64, shift, 8))
        costs = order_costs(spec, (64, 64))
        chosen = best(costs)
        assert chosen.name == "hilbert", cost_table(costs)
        assert chosen.visited < _visited(costs)["row-major"] / 2
        assert len({c.allowed for c in costs}) == 1  # allowed pairs do not depend on the order


def test_cost_table_lists_every_candidate():
    costs = order_costs(attncc.Attention(mask=attncc.neighbourhood_2d(16, 12, 5, 3)), (16, 12),
                        (32, 32))
    table = cost_table(costs)
    for name in ("row-major", "hilbert", "morton", "tiles-"):
        assert name in table
    assert table.count("<- chosen") == 1
    for c in costs:
        assert 0 < c.efficiency <= 1 and c.visited == c.full + c.partial


def test_auto_3d_grid_and_explicit_grid():
    spec = attncc.Attention(mask=attncc.neighbourhood_3d(8, 8, 8, (3, 3, 3)), reorder="auto")
    assert attncc.compile(spec).plan.spec.reorder in (None, attncc.Hilbert3D(8, 8, 8),
                                                      attncc.TileMajor((8, 8, 8), (4, 4, 4)))
    with pytest.raises(ValueError, match="reads no token grid"):
        attncc.compile(attncc.Attention(mask=attncc.causal(), reorder="auto"))
    spec = attncc.Attention(mask=attncc.sliding_window(8), reorder=attncc.auto((16, 16)))
    assert attncc.compile(spec).plan.spec.reorder is None  # a 1-D window: row-major is best


def test_auto_reorder_runs_correctly(device):
    spec = attncc.Attention(mask=attncc.neighbourhood_2d(16, 16, 5, 5), reorder="auto",
                            schedule=attncc.Schedule(block_m=16, block_n=16))
    attn = attncc.compile(spec)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 256, 16, generator=g) for _ in range(3))
    o = attn(q.to(device), k.to(device), v.to(device), backend="triton")
    ro, _ = attention_reference(attn.plan.spec, q.double(), k.double(), v.double(),
                                params={p.name: p.value for p in attn.plan.spec.params})
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-5, rtol=2e-5)


def test_explain_prints_the_order_table_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    spec = attncc.Attention(mask=attncc.neighbourhood_2d(32, 32, 7, 7),
                            reorder=attncc.hilbert((32, 32)))
    path = tmp_path / "tiles.png"
    text = attncc.explain(spec, shape=(1024, 1024), png=str(path))
    assert "== token orders on grid 32x32" in text and "<- chosen" in text
    assert "block map (analytic" in text
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="png= needs shape"):
        attncc.explain(spec, png=str(path))
