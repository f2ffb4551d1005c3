"""Model updates under a backlog: paced so that draining it keeps the cores, never paced otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.settings import Settings
from streams.worker import create_app


def test_fits_are_paced_only_while_an_input_is_behind(tmp_path: Path) -> None:
    _, w = create_app(Settings(data_dir=tmp_path, backlog_messages=1000, backlog_fit_share=0.25), "127.0.0.1:9")
    assert not w.behind() and w._pace(0.1) == 0.0  # nothing measured yet
    w.lag[("labloop.readings", 0)] = 5000
    assert w.behind()
    assert w._pace(0.1) == pytest.approx(0.3)  # the fit took 0.1 s: at most a quarter of the time
    w.lag[("labloop.readings", 0)] = 1000  # caught up to the threshold
    assert not w.behind() and w._pace(0.1) == 0.0


def test_a_share_of_one_never_paces(tmp_path: Path) -> None:
    _, w = create_app(Settings(data_dir=tmp_path, backlog_fit_share=1.0), "127.0.0.1:9")
    w.lag[("labloop.plates", 2)] = 10**6
    assert w.behind() and w._pace(0.5) == 0.0
