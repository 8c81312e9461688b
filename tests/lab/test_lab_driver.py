"""Host-side checks of the Xen lab driver: cache keys, overlay, QEMU command, console watching
(with a stand-in process for QEMU, so no Xen boot is needed here)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import labcpio
import labkit
import labproto
import pytest
import xenlab
from labproto import FAILED, PASSED, Result

POLICY = """\
xen-utils-4.17:
  Installed: (none)
  Candidate: 4.17.7+13-g2445b30a44-0+deb12u1
  Version table:
     4.17.7+13-g2445b30a44-0+deb12u1 500
python3:
  Installed: 3.11.2-1+b1
  Candidate: 3.11.2-1+b1
no-such-package:
  Installed: (none)
  Candidate: (none)
"""


def test_parse_candidates() -> None:
    assert xenlab.parse_candidates(POLICY) == {
        "xen-utils-4.17": "4.17.7+13-g2445b30a44-0+deb12u1",
        "python3": "3.11.2-1+b1",
        "no-such-package": "(none)",
    }


def test_image_key_follows_every_input() -> None:
    base = xenlab.image_key(b"script", {"xen-utils-4.17": "4.17.7"}, "sources")
    assert base == xenlab.image_key(b"script", {"xen-utils-4.17": "4.17.7"}, "sources")
    assert len({
        base,
        xenlab.image_key(b"script2", {"xen-utils-4.17": "4.17.7"}, "sources"),
        xenlab.image_key(b"script", {"xen-utils-4.17": "4.17.8"}, "sources"),
        xenlab.image_key(b"script", {"xen-utils-4.17": "4.17.7", "gdb": "13"}, "sources"),
        xenlab.image_key(b"script", {"xen-utils-4.17": "4.17.7"}, "other sources"),
    }) == 5  # fmt: skip


def test_packages_list_and_dom0_requirements() -> None:
    packages = xenlab.read_packages(xenlab.LAB / "packages.txt")
    for needed in ("xen-hypervisor-4.17-amd64", "xen-utils-4.17", "linux-image-amd64", "python3"):
        assert needed in packages
    assert not any(p.startswith("#") for p in packages)
    reqs = xenlab.runtime_requirements(xenlab.REPO / "pyproject.toml")
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in reqs}
    assert "unicorn" not in names
    assert {"capstone", "pyelftools", "prompt_toolkit", "rich"} <= names


def test_overlay_holds_init_code_guests_and_config(guests: Path, tmp_path: Path) -> None:
    path = tmp_path / "overlay.cpio"
    xenlab.write_overlay(path, ["lab-boot", "xen-list"])
    entries = {name: (mode, data) for name, mode, data in labcpio.read_names(path.read_bytes())}
    assert entries["init"][0] == stat.S_IFREG | 0o755
    assert entries["init"][1] == (xenlab.LAB / "init").read_bytes()
    root = labkit.ROOT.relative_to("/")
    for rel in ("src/xendbg/__init__.py", "tests/lab/labrunner.py", "tests/lab/labproto.py",
                "tests/lab/scenarios/infra.py", "guests/longmode.elf"):  # fmt: skip
        assert f"{root}/{rel}" in entries, rel
    assert not any("__pycache__" in name for name in entries)
    assert json.loads(entries[f"{root}/lab.json"][1]) == {"only": ["lab-boot", "xen-list"]}
    # The xl config boots the guest where the overlay puts it.
    cfg = entries[f"{labkit.CONFIGS.relative_to('/')}/longmode-pvh.cfg"][1].decode()
    kernel = cfg.split('kernel = "', 1)[1].split('"', 1)[0]
    assert kernel.lstrip("/") in entries
    assert entries[kernel.lstrip("/")][1] == (guests / "longmode.elf").read_bytes()


def test_qemu_command_uses_the_measured_recipe(tmp_path: Path) -> None:
    cmd = xenlab.qemu_command(tmp_path / "img", tmp_path / "initrd.cpio")
    text = " ".join(cmd)
    for flag in ("-accel tcg", "-machine q35", "-cpu max,-smap,-rdtscp", "-smp 2", "-m 4G",
                 "-serial stdio", "-monitor none", "-no-reboot"):  # fmt: skip
        assert flag in text
    assert cmd[cmd.index("-kernel") + 1] == str(tmp_path / "img" / "xen")
    modules = cmd[cmd.index("-initrd") + 1]
    assert modules.count(",") == 1  # two multiboot modules: the kernel (with args), the initrd
    kernel, initrd = modules.split(",")
    assert kernel.split()[0].endswith("vmlinuz") and "rdinit=/init" in kernel
    assert initrd == str(tmp_path / "initrd.cpio")
    assert "dom0_mem=1536M,max:1536M" in cmd[cmd.index("-append") + 1]


def fake_qemu(script: str) -> subprocess.Popen[bytes]:
    """A stand-in for QEMU: a Python process writing a console transcript."""
    return subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )


FAST = xenlab.Timeouts(to_init=5, to_toolstack=5, per_scenario=5, to_poweroff=5, total=20)


def _print(lines: list[str], then: str = "") -> str:
    body = "".join(f"print({line!r} + '\\r', flush=True)\n" for line in lines)
    return "import time\n" + body + then


def test_watch_complete_run(tmp_path: Path) -> None:
    r1, r2 = Result("lab-boot", PASSED, 1.0), Result("xen-list", FAILED, 2.0, "exit status 2")
    lines = ["(XEN) Xen version 4.17.7", labproto.marker(labproto.INIT),
             labproto.marker(labproto.TOOLSTACK),
             labproto.marker(labproto.INFO, {"xen_version": "4.17.7"})]  # fmt: skip
    for r in (r1, r2):
        lines += [labproto.marker(labproto.BEGIN, r.name), labproto.marker("result", r.as_dict())]
    lines += [labproto.marker(labproto.SUMMARY, [r1.as_dict(), r2.as_dict()]), "@@XENLAB:end"]
    log = tmp_path / "console.log"
    run = xenlab.watch(fake_qemu(_print(lines)), log, FAST)
    assert run.lab_error is None
    assert xenlab.collect(run) == [r1, r2]
    data = xenlab.report(run, tmp_path / "image-x", tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert data["xen_version"] == "4.17.7"
    assert [(t["name"], t["outcome"]) for t in data["tests"]] == [
        ("lab-boot", PASSED),
        ("xen-list", FAILED),
    ]
    assert xenlab.exit_status(data) == 1
    assert b"@@XENLAB:end" in log.read_bytes()


def test_watch_times_out_before_init(tmp_path: Path) -> None:
    timeouts = xenlab.Timeouts(to_init=0.5, total=20)
    proc = fake_qemu(_print(["(XEN) booting"], "time.sleep(30)\n"))
    run = xenlab.watch(proc, tmp_path / "log", timeouts)
    assert proc.returncode is not None  # the stand-in was killed
    assert run.lab_error is not None and run.lab_error.startswith("dom0 did not reach /init")
    data = xenlab.report(run, tmp_path / "image-x", tmp_path / "r.json")
    assert xenlab.exit_status(data) == 2


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (["(XEN) Xen version 4.17.7 (Debian)", "(XEN) Panic on CPU 0:"],
         "crash on the console: (XEN) Panic on CPU 0:"),
        ([], "QEMU exited (status 0) before dom0 reached /init"),
        (["(XEN) Xen version 4.17.7", labproto.marker(labproto.INIT),
          "@@XENLAB:lab-error xenstored did not start"],
         "dom0: xenstored did not start"),
    ],
)  # fmt: skip
def test_watch_lab_failures(tmp_path: Path, lines: list[str], error: str) -> None:
    run = xenlab.watch(fake_qemu(_print(lines)), tmp_path / "log", FAST)
    assert run.lab_error == error
    assert run.console.info.get("xen_version") == ("4.17.7" if lines else None)


def test_scenario_cut_short_by_a_dying_lab_is_a_failure(tmp_path: Path) -> None:
    lines = [labproto.marker(k) for k in (labproto.INIT, labproto.TOOLSTACK)]
    lines.append(labproto.marker(labproto.BEGIN, "pvh-attach"))
    run = xenlab.watch(fake_qemu(_print(lines)), tmp_path / "log", FAST)
    assert run.lab_error == "QEMU exited (status 0) before the suite ended"
    (result,) = xenlab.collect(run)
    assert (result.name, result.outcome) == ("pvh-attach", FAILED)
    assert "QEMU exited" in result.detail
