"""Host-side checks of the in-dom0 runner: scenario discovery, outcomes, timeouts, reporting."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import labkit
import labproto
import labrunner
import pytest
from labproto import FAILED, PASSED, Console

SCENARIOS = Path(labrunner.__file__).resolve().parent / "scenarios"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, labkit.Scenario]]:
    """An empty scenario registry for the test (the real one is process-wide)."""
    fresh: dict[str, labkit.Scenario] = {}
    monkeypatch.setattr(labkit, "REGISTRY", fresh)
    yield fresh


def test_project_scenarios_load_with_infrastructure_first(
    registry: dict[str, labkit.Scenario],
) -> None:
    scenarios, broken = labrunner.load_scenarios(SCENARIOS)
    assert broken == []
    names = [s.name for s in scenarios]
    assert {"lab-boot", "pvh-guest-console", "xen-list"} <= set(names)
    infra = [s.infra for s in scenarios]
    assert infra == sorted(infra, reverse=True)  # every infra scenario before the others
    assert names.index("lab-boot") < names.index("xen-list")


def test_broken_module_is_reported_not_dropped(
    tmp_path: Path, registry: dict[str, labkit.Scenario]
) -> None:
    (tmp_path / "good.py").write_text(
        "from labkit import scenario\n@scenario('good-one')\ndef f() -> None:\n    pass\n"
    )
    (tmp_path / "bad.py").write_text("import no_such_module_xenlab\n")
    (tmp_path / "_helper.py").write_text("raise RuntimeError('not a scenario module')\n")
    scenarios, broken = labrunner.load_scenarios(tmp_path)
    assert [s.name for s in scenarios] == ["good-one"]
    assert [(b.name, b.outcome) for b in broken] == [("import:bad", FAILED)]
    assert "no_such_module_xenlab" in broken[0].detail


def test_duplicate_scenario_name_is_an_error(registry: dict[str, labkit.Scenario]) -> None:
    labkit.scenario("twice")(lambda: None)
    with pytest.raises(ValueError, match="twice"):
        labkit.scenario("twice")(lambda: None)


def _sleep() -> None:
    time.sleep(5)


def _fail() -> None:
    labkit.check(False, "counter did not move")


def _crash() -> None:
    raise KeyError("rip")


def _lab() -> None:
    raise labkit.LabError("xl: not installed in dom0")


def test_outcomes_timeouts_cleanup_and_console_round_trip() -> None:
    scenarios = [
        labkit.Scenario("ok", lambda: None, 5.0, True),
        labkit.Scenario("fails", _fail, 5.0, False),
        labkit.Scenario("crashes", _crash, 5.0, False),
        labkit.Scenario("slow", _sleep, 0.3, False),
        labkit.Scenario("lab-broke", _lab, 5.0, False),
    ]
    lines: list[str] = []
    cleaned: list[int] = []
    broken = [labproto.Result("import:bad", FAILED, 0.0, "Traceback …\nImportError: x")]
    start = time.monotonic()
    results = labrunner.run_all(scenarios, lines.append, lambda: cleaned.append(1), broken)
    assert time.monotonic() - start < 3  # the 5 s sleep was cut at 0.3 s
    outcome = {r.name: (r.outcome, r.detail) for r in results}
    assert outcome["ok"] == (PASSED, "")
    assert outcome["fails"] == (FAILED, "counter did not move")
    assert outcome["crashes"] == (FAILED, "KeyError: 'rip'")
    assert outcome["slow"][0] == FAILED and outcome["slow"][1].startswith("timeout")
    assert outcome["lab-broke"] == (FAILED, "lab: xl: not installed in dom0")
    assert outcome["import:bad"][0] == FAILED
    assert len(cleaned) == len(scenarios)
    con = Console()
    for text in lines:
        for line in text.splitlines():
            con.feed(line)
    assert con.ended and con.garbled == []
    assert con.final_results() == results
    assert list(con.results.values()) == results


def test_select_keeps_named_and_fails_unknown() -> None:
    scenarios = [labkit.Scenario(n, lambda: None, 1.0, False) for n in ("a", "b", "c")]
    assert labrunner.select(scenarios, []) == (scenarios, [])
    selected, unknown = labrunner.select(scenarios, ["c", "a", "d", "d"])
    assert [s.name for s in selected] == ["a", "c"]
    assert [(r.name, r.outcome) for r in unknown] == [("d", FAILED)]
    assert "known: a, b, c" in unknown[0].detail


def test_guest_line_matches_xen_debug_port_prefixes() -> None:
    import re

    rx = re.compile(labkit.guest_line(3, "vcpu 0 up"))
    assert rx.search("(d3) xendbg test guest: vcpu 0 up")
    assert rx.search("(XEN) d3: xendbg test guest: vcpu 0 up")
    assert not rx.search("(d13) xendbg test guest: vcpu 0 up")
    assert not rx.search("(d3) xendbg test guest: vcpu 1 up")
