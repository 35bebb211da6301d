"""Model cards: a Markdown summary of a run (model, data, metrics, calibration, intended use, limitations)."""

from mpoxscope.card.card import CARD_FILE, DISCLAIMER, build_card, count_parameters, write_card

__all__ = ["CARD_FILE", "DISCLAIMER", "build_card", "count_parameters", "write_card"]
