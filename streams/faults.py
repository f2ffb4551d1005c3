"""Fault injection for the tests and ``labloop bench faults``: a sink that dies on purpose.

Not a production setting: the normal ``labloop sink`` has no such hook. Run as
``python -m labloop.streams.faults sink [--crash-after-inserts N] [--kill-during-insert N]``
with the same ``LABLOOP_*`` environment as the sink it replaces.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from labloop.consumers.sink import InsertHook

__all__ = ["sink_faults"]

log = logging.getLogger("labloop.faults")


def sink_faults(crash_after_inserts: int = 0, kill_during_insert: int = 0) -> InsertHook:
    """A sink hook that exits (code 17) right after insert ``crash_after_inserts``, before its
    offsets are committed, and SIGKILLs the process 2 ms into insert ``kill_during_insert``
    (0 = never)."""

    def hook(n: int, phase: str) -> None:
        if phase == "before" and kill_during_insert and n == kill_during_insert:
            log.error("fault injection: SIGKILL during insert %d", n)
            threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if phase == "after" and crash_after_inserts and n >= crash_after_inserts:
            log.error("fault injection: exiting after insert %d, before committing its offsets", n)
            os._exit(17)

    return hook


def main(argv: list[str]) -> None:
    from labloop.streams.services import run_sink
    from labloop.streams.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m labloop.streams.faults")
    p.add_argument("service", choices=["sink"])
    p.add_argument("--crash-after-inserts", type=int, default=0)
    p.add_argument("--kill-during-insert", type=int, default=0)
    a = p.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level={"warn": "WARNING"}.get(settings.log_level, settings.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_sink(settings, sink_faults(a.crash_after_inserts, a.kill_during_insert))


if __name__ == "__main__":  # pragma: no cover - a child process of the tests and the fault bench
    main(sys.argv[1:])
