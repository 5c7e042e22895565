"""``llmc eval`` prints numbers rounded for reading; ``--json`` keeps them whole."""

from __future__ import annotations

from llmc.cli.eval import format_result


def test_eval_text_is_rounded() -> None:
    text = format_result({"tokens": 200, "mean_nll": 0.123456789, "perplexity": 1.1314021114911006,
                          "kl_mean": 0.000123456, "top1_agreement": 0.98765, "other": None})
    assert text.splitlines() == ["          tokens: 200", "        mean_nll: 0.1235", "      perplexity: 1.1314",
                                 "         kl_mean: 0.0001235", "  top1_agreement: 98.77%"]
