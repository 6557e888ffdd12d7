"""Module-level task functions for tests/test_executor.py (tasks are pickled by reference)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def setup(context: dict) -> dict:
    return {**context, "pid": os.getpid()}


def run(state: dict, item: int):
    """item * item; 7 always fails; 5 fails once (a marker file in state["folder"] remembers)."""
    if item == 7:
        raise ValueError("seven is refused")
    if item == 5:
        marker = Path(state["folder"]) / f"flaky-{state['name']}"
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("flaky once")
    return item * item, state["pid"]


def die_once(state: dict, item: int):
    """The worker process dies (no exception) on item 2's first try."""
    marker = Path(state["folder"]) / "died"
    if item == 2 and not marker.exists():
        marker.write_text("died")
        os._exit(3)
    return item


def slow(state: dict, item: int):
    """Item 0 at once; the others sleep long (what Ctrl-C must not wait for)."""
    if item:
        time.sleep(60)
    return item


class Counted:
    """A context that notes each time it is pickled (a line in `log`): it must travel once per sweep."""

    def __init__(self, log: str):
        self.log = log

    def __getstate__(self) -> dict:
        with open(self.log, "a") as f:
            f.write("pickled\n")
        return {"log": self.log}


def pid(state, item):
    return os.getpid()
