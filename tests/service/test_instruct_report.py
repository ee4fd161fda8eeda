"""An eval report's next-token agreement reaches the report page's comparison rows and the
batch comparison table's figures (the model's own; a baseline has none)."""

from __future__ import annotations

from service.api.routes.report import eval_rows
from service.batches import COLUMNS, _eval_figures

REPORT = {
    "model": {"params": 10, "perplexity": {"t.txt": {"ppl": 12.0}}},
    "baseline": {"params": 20, "perplexity": {"t.txt": {"ppl": 10.0}}},
    "agreement": {"top1": 0.8125, "mean_kl": 0.25, "positions": 64, "prompts": 4},
}


def test_report_page_shows_agreement_beside_the_parents_own() -> None:
    rows = {row["key"]: row for row in eval_rows(REPORT)}
    assert rows["agreement:top1"]["pruned"] == "81.2%"
    assert rows["agreement:top1"]["parent"] == "100.0%"
    assert "4 prompts, 64 positions" in rows["agreement:top1"]["label"]
    assert rows["agreement:kl"]["pruned"] == "0.2500"
    assert "agreement:top1" not in {row["key"] for row in eval_rows({**REPORT, "agreement": None})}


def test_batch_figures_carry_the_models_agreement_only() -> None:
    figures = _eval_figures(REPORT)
    assert (figures["agreement_top1"], figures["agreement_kl"]) == (0.8125, 0.25)
    assert "agreement_top1" not in _eval_figures(REPORT, "baseline")
    assert {"agreement_top1", "agreement_kl"} <= set(COLUMNS)
