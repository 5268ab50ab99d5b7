"""The ``learn:`` config section: per recipe, whether a proposal from labels is applied without a
technician (runtime/line/proposals.py), and within which bounds. Off by default.

Kept apart from ``proposals.py`` so that reading a config does not import the engines.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict

from anomalygpt_edge.runtime.values import Between, Flag

#: At most this many labelled parts in one proposal (runtime/recipes/proposal.py's MAX_PARTS).
MAX_LABELS = 1000


class LearnPolicy(BaseModel):
    """``learn: {<recipe>: {...}}``: auto-apply of proposals from labels, and its bounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    auto_apply: Flag = False
    every_labels: Annotated[int, Between(1, MAX_LABELS)] = 20  # propose after every this many new labels of the recipe
    # never auto-apply from fewer labelled parts (with images) than this
    min_labels: Annotated[int, Between(1, MAX_LABELS)] = 10
    max_new_goldens: Annotated[int, Between(0, MAX_LABELS)] = 16  # never auto-add more golden parts than this at once
    # never move the threshold by more than this share of its value
    max_threshold_change: Annotated[float, Between(0, 1000)] = 0.25
