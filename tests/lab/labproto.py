"""The Xen lab's console protocol: marker lines dom0 prints and the host parses.

dom0's output reaches the host through hvc0 -> Xen's console -> QEMU's serial port, mixed with
Xen's own messages (``(XEN) …``) and guest debug-port output (``(d1) …``). Every line that
matters carries ``@@XENLAB:<kind>``; the parser looks for it anywhere in a line so a prefix
that Xen interleaves does not hide it. lab/init prints the first markers from the shell, so
their spellings are mirrored there (a host test checks they agree).

Markers, in the order they appear:

=================================  =============================================================
``@@XENLAB:init``                  dom0's /init started (kernel and initramfs are fine)
``@@XENLAB:toolstack``             xenstored, xen-init-dom0 and xenconsoled are up
``@@XENLAB:lab-error <text>``      the lab broke (not the project): /init could not go on
``@@XENLAB:info <json>``           facts about the lab, e.g. ``{"xen_version": "4.17.7"}``
``@@XENLAB:begin <name>``          a scenario starts; its output follows as plain lines
``@@XENLAB:result <json>``         ``{"name", "outcome", "seconds", "detail"}`` of one scenario
``@@XENLAB:summary <json>``        every result again, once all domUs are gone (quiet console)
``@@XENLAB:end``                   the suite finished; dom0 powers off next
=================================  =============================================================
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MARK = "@@XENLAB:"
INIT = "init"
TOOLSTACK = "toolstack"
LAB_ERROR = "lab-error"
INFO = "info"
BEGIN = "begin"
RESULT = "result"
SUMMARY = "summary"
END = "end"

PASSED = "passed"
FAILED = "failed"
OUTCOMES = (PASSED, FAILED)

_LINE = re.compile(re.escape(MARK) + r"([a-z-]+)(?: (.*))?$")


def marker(kind: str, payload: str | dict[str, Any] | list[Any] | None = None) -> str:
    """One marker line (no newline); dict and list payloads are compact JSON."""
    if payload is None:
        return MARK + kind
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"{MARK}{kind} {text}"


@dataclass
class Result:
    name: str
    outcome: str
    seconds: float = 0.0
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "seconds": self.seconds,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Result:
        """Validate a decoded result; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"result is not an object: {data!r}")
        name, outcome = data.get("name"), data.get("outcome")
        if not isinstance(name, str) or not name or outcome not in OUTCOMES:
            raise ValueError(f"bad result: {data!r}")
        seconds = data.get("seconds", 0.0)
        detail = data.get("detail", "")
        return cls(
            name,
            str(outcome),
            float(seconds) if isinstance(seconds, int | float) else 0.0,
            detail if isinstance(detail, str) else str(detail),
        )


@dataclass
class Console:
    """What the host learnt from dom0's console; fed line by line, so it also tracks progress."""

    reached_init: bool = False
    toolstack_up: bool = False
    ended: bool = False
    lab_errors: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    summary: list[Result] | None = None
    current: str | None = None
    garbled: list[str] = field(default_factory=list)

    def feed(self, line: str) -> str | None:
        """Take one console line; return the marker kind it carried, if any."""
        pos = line.find(MARK)
        if pos < 0:
            return None
        m = _LINE.match(line.rstrip("\r\n"), pos)
        if m is None:
            self.garbled.append(line)
            return None
        kind, payload = m.group(1), m.group(2) or ""
        try:
            self._apply(kind, payload)
        except ValueError:
            self.garbled.append(line)
            return None
        return kind

    def _apply(self, kind: str, payload: str) -> None:
        if kind == INIT:
            self.reached_init = True
        elif kind == TOOLSTACK:
            self.toolstack_up = True
        elif kind == LAB_ERROR:
            self.lab_errors.append(payload)
        elif kind == INFO:
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise ValueError("info is not an object")
            self.info.update(data)
        elif kind == BEGIN:
            self.current = payload
        elif kind == RESULT:
            result = Result.from_dict(json.loads(payload))
            self.results[result.name] = result
            self.current = None
        elif kind == SUMMARY:
            data = json.loads(payload)
            if not isinstance(data, list):
                raise ValueError("summary is not a list")
            self.summary = [Result.from_dict(item) for item in data]
        elif kind == END:
            self.ended = True
        else:
            raise ValueError(f"unknown marker {kind}")

    def final_results(self) -> list[Result]:
        """The summary when it arrived intact, else the per-scenario results seen."""
        if self.summary is not None:
            return list(self.summary)
        return list(self.results.values())
