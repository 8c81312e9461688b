"""Runs the Xen lab scenarios inside dom0 and reports them on the console (see labproto).

    python3 labrunner.py [--scenarios DIR] [--config FILE] [NAME ...]

Imports every module of tests/lab/scenarios/ (each registers scenarios with labkit.scenario),
runs the infrastructure scenarios first and then the rest in registration order, each under its
own timeout, destroying every domU after each. A module that fails to import is reported as a
failed scenario ``import:<module>``, so a broken test module cannot vanish from the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType, ModuleType

import labkit
import labproto
from labproto import FAILED, PASSED, Result

HERE = Path(__file__).resolve().parent
Emit = Callable[[str], None]


class ScenarioTimeout(Exception):
    pass


def emit_line(line: str) -> None:
    print(line, flush=True)


def load_scenarios(directory: Path) -> tuple[list[labkit.Scenario], list[Result]]:
    """Import the scenario modules of ``directory``; return the scenarios they registered (in
    run order) and a failed Result per module that could not be imported."""
    broken: list[Result] = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            _import(path)
        except Exception:
            broken.append(Result(f"import:{path.stem}", FAILED, 0.0, traceback.format_exc()))
    ordered = sorted(labkit.REGISTRY.values(), key=lambda s: not s.infra)  # stable sort
    return ordered, broken


def _import(path: Path) -> ModuleType:
    name = f"xenlab_scenarios_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise ScenarioTimeout


def run_one(scenario: labkit.Scenario, emit: Emit) -> Result:
    """Run one scenario under its timeout (SIGALRM interrupts waits; subprocess.run kills its
    child when the exception passes through it)."""
    emit(labproto.marker(labproto.BEGIN, scenario.name))
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, scenario.timeout)
    try:
        scenario.func()
        outcome, detail = PASSED, ""
    except ScenarioTimeout:
        outcome, detail = FAILED, f"timeout: no result within {scenario.timeout:.0f} s"
    except labkit.LabError as exc:
        outcome, detail = FAILED, f"lab: {exc}"
    except AssertionError as exc:
        outcome, detail = FAILED, str(exc) or "assertion failed"
        emit(traceback.format_exc().rstrip("\n"))
    except Exception as exc:
        outcome, detail = FAILED, f"{type(exc).__name__}: {exc}"
        emit(traceback.format_exc().rstrip("\n"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    result = Result(scenario.name, outcome, round(time.monotonic() - start, 1), detail[-400:])
    emit(labproto.marker(labproto.RESULT, result.as_dict()))
    return result


def run_all(
    scenarios: Iterable[labkit.Scenario],
    emit: Emit,
    cleanup: Callable[[], None],
    broken: Sequence[Result] = (),
) -> list[Result]:
    """Run the scenarios, cleaning up after each; report everything, ``broken`` (import
    failures, unknown names) first."""
    results = list(broken)
    for result in broken:
        emit(labproto.marker(labproto.BEGIN, result.name))
        emit(result.detail.rstrip("\n"))
        emit(labproto.marker(labproto.RESULT, result.as_dict()))
    for scenario in scenarios:
        results.append(run_one(scenario, emit))
        try:
            cleanup()
        except Exception as exc:
            emit(f"cleanup after {scenario.name} failed: {exc}")
    emit(labproto.marker(labproto.SUMMARY, [r.as_dict() for r in results]))
    emit(labproto.marker(labproto.END))
    return results


def select(
    scenarios: list[labkit.Scenario], only: Sequence[str]
) -> tuple[list[labkit.Scenario], list[Result]]:
    """The named scenarios (all when ``only`` is empty), and a failed Result per unknown name
    (a typo must not pass as an empty run)."""
    if not only:
        return scenarios, []
    known = {s.name for s in scenarios}
    unknown = [
        Result(name, FAILED, 0.0, f"no such scenario; known: {', '.join(sorted(known))}")
        for name in dict.fromkeys(only)
        if name not in known
    ]
    return [s for s in scenarios if s.name in only], unknown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=Path, default=HERE / "scenarios")
    parser.add_argument("--config", type=Path, help="JSON: {'only': [names]}")
    parser.add_argument("names", nargs="*", help="run only these scenarios")
    args = parser.parse_args(argv)
    only = list(args.names)
    if args.config is not None and args.config.is_file():
        only += json.loads(args.config.read_text()).get("only", [])
    try:
        emit_line(labproto.marker(labproto.INFO, {"xen_version": labkit.xen_version()}))
    except Exception as exc:
        emit_line(labproto.marker(labproto.LAB_ERROR, f"xl info failed: {exc}"))
    scenarios, broken = load_scenarios(args.scenarios)
    selected, unknown = select(scenarios, only)
    results = run_all(selected, emit_line, labkit.destroy_domus, [*broken, *unknown])
    return 0 if all(r.outcome == PASSED for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
