"""Replacing a bundle cannot lose it: at every instant the output path holds the old bundle or the new one, a
killed write leaves nothing the next write does not clean, and a path that cannot hold a bundle (`-o .`, a path
under a file or under /proc, a name past the file-name limit) is a located exit 2 with nothing written. `train`
replaces <output_dir>/bundle only when it is a tunefile bundle."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import MINIMAL, run_cli, write
from tunefile.compiler import bundle as bundle_module
from tunefile.compiler.bundle import read_bundle, verify_bundle, write_bundle
from tunefile.compiler.render.manifest import MANIFEST

OLD = {"launch.sh": "old\n", "config.yaml": "old: 1\n", MANIFEST: '{"files": {}}\n'}
NEW = {"launch.sh": "new\n", "config.yaml": "new: 1\n", MANIFEST: '{"files": {}}\n'}


def hidden_siblings(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


# --- leftovers of an interrupted write ---------------------------------------------------------------

def test_leftovers_of_a_killed_write_are_removed_by_the_next(tmp_path: Path) -> None:
    write_bundle(OLD, tmp_path / "b", force=False)
    half_written = tmp_path / ".b.new-abc_1234"  # killed while writing: its manifest is written first
    write(half_written / MANIFEST, "{")
    write(tmp_path / ".b.old-zz99zz99" / MANIFEST, OLD[MANIFEST])  # an older tunefile's moved-aside bundle
    write(tmp_path / ".b.old-zz99zz99" / "launch.sh", "old\n")
    (tmp_path / ".b.new-emptyemp").mkdir()  # killed right after mkdtemp
    write_bundle(NEW, tmp_path / "b", force=True)
    assert hidden_siblings(tmp_path) == []
    assert read_bundle(tmp_path / "b") == dict(sorted(NEW.items()))


def test_only_tunefiles_own_leftovers_are_removed(tmp_path: Path) -> None:
    mine = write(tmp_path / ".b.new-abcd1234" / "notes.txt", "no manifest: not a bundle of tunefile's\n")
    other_name = write(tmp_path / ".b.new-abcd12345" / MANIFEST, "{}")  # 9 characters: not tempfile's name
    other_bundle = write(tmp_path / ".c.new-abcd1234" / MANIFEST, "{}")  # another bundle's sibling
    a_file = write(tmp_path / ".b.old-abcd1234", "a file, not a directory")
    write_bundle(NEW, tmp_path / "b", force=True)
    for kept in (mine, other_name, other_bundle, a_file):
        assert kept.exists(), kept


def test_a_sibling_that_a_live_write_holds_is_left_alone(tmp_path: Path) -> None:
    busy = tmp_path / ".b.new-busy0000"
    write(busy / MANIFEST, "{")
    descriptor = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # as write_bundle holds its staging directory
        write_bundle(NEW, tmp_path / "b", force=True)
        assert (busy / MANIFEST).exists()
    finally:
        os.close(descriptor)
    write_bundle(NEW, tmp_path / "b", force=True)  # the write that held it is gone: now it is a leftover
    assert hidden_siblings(tmp_path) == []


def test_a_failed_exchange_keeps_the_old_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_bundle(OLD, tmp_path / "b", force=False)

    def refuse(new: Path, current: Path) -> Path:
        raise OSError("exchange failed")

    monkeypatch.setattr(bundle_module, "_exchange", refuse)
    with pytest.raises(OSError, match="exchange failed"):
        write_bundle(NEW, tmp_path / "b", force=True)
    assert read_bundle(tmp_path / "b") == dict(sorted(OLD.items()))
    assert hidden_siblings(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_linux_replaces_in_one_exchange_that_keeps_the_old_directory_at_the_path(tmp_path: Path) -> None:
    # renameat2(RENAME_EXCHANGE) is found, and the replacement is an exchange: the old directory's inode moves to
    # the hidden name in the same step that puts the new one at the path (a two-rename swap would free the path).
    assert bundle_module._renameat2() is not None
    write_bundle(OLD, tmp_path / "b", force=False)
    old_inode = (tmp_path / "b").stat().st_ino
    staging = tmp_path / ".b.new-test0000"
    write(staging / MANIFEST, NEW[MANIFEST])
    holder = bundle_module._exchange(staging, tmp_path / "b")
    assert holder == staging and staging.stat().st_ino == old_inode
    assert (tmp_path / "b").stat().st_ino != old_inode and read_bundle(tmp_path / "b") == {MANIFEST: NEW[MANIFEST]}


# --- paths that cannot hold a bundle: located exit 2, nothing written ---------------------------------

@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write(tmp_path / "c.yml", MINIMAL)
    write(tmp_path / "afile", "a file\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("output", "says"), [
    (".", "is a directory named by '.'"),
    ("..", "is a directory named by '.'"),
    ("CWD", "is the current directory or contains it"),
    ("afile/sub", "afile is a file, not a directory"),
    ("afile/sub/deeper", "afile is a file, not a directory"),
    ("/proc/tunefile-bundle", "under /proc, a kernel file system"),
    ("/proc/self/bundle", "under /proc, a kernel file system"),
    ("/sys/tunefile-bundle", "under /sys, a kernel file system"),
    ("x" * 300, "is 300 bytes long; file names here are at most"),
    ("new/" + "y" * 300 + "/bundle", "is 300 bytes long; file names here are at most"),
    ("/".join(["z" * 200] * 22), "the bundle's file paths would be"),
])
def test_an_output_path_that_cannot_hold_a_bundle_is_a_located_exit_2(workdir: Path, output: str,
                                                                       says: str) -> None:
    output = str(workdir) if output == "CWD" else output
    before = listing(workdir)
    for force in ((), ("--force",)):
        code, out, err = run_cli("compile", "c.yml", "-o", output, *force)
        lines = err.splitlines()
        assert code == 2, err
        assert lines[0].startswith("tunefile: error: -o: ") and says in lines[0], err
        assert lines[1:] == ["1 error; nothing was written."], err
        assert len(lines[0]) < 300 and "internal error" not in err and "Traceback" not in err
        assert listing(workdir) == before


def test_an_output_dir_under_a_file_is_located_in_the_config(workdir: Path) -> None:
    config = write(workdir / "d.yml", MINIMAL + "output_dir: afile\n")
    code, _, err = run_cli("compile", str(config))
    assert code == 2
    assert err.splitlines() == [f"{config}:5:13: error: output_dir: afile/bundle: afile is a file, not a directory",
                                "1 error; nothing was written."]


def test_the_bundle_name_may_use_the_whole_file_name_limit(workdir: Path) -> None:
    # The hidden sibling's name is the bundle's plus 14 characters: cut, so it fits beside a 255-byte name.
    code, _, err = run_cli("compile", "c.yml", "-o", "w" * 255)
    assert code == 0, err
    assert verify_bundle(workdir / ("w" * 255)) == [] and hidden_siblings(workdir) == []


# --- train replaces <output_dir>/bundle only when it is a tunefile bundle -------------------------------

@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands `train` would run (launch.sh), recorded instead of run."""
    calls: list[list[str]] = []

    def record(command: list[str], env: dict[str, str] | None = None, *, own_process_group: bool = False) -> int:
        calls.append(command)
        return 0

    monkeypatch.setattr("tunefile.compiler.runtime_commands._run", record)
    return calls


def test_train_refuses_to_replace_a_folder_that_is_not_a_bundle(workdir: Path, launches: list) -> None:
    config = write(workdir / "t.yml", MINIMAL + "output_dir: .\n")
    notes = write(workdir / "bundle" / "notes.txt", "the user's own\n")
    code, _, err = run_cli("train", str(config), "--target", "cpu")
    assert code == 2 and launches == []
    assert err.splitlines()[-2:] == [
        f"{config}:5:13: error: output_dir: bundle exists and is not a tunefile bundle (it has no tunefile "
        "manifest.json); train writes its bundle there: move it away or choose another output_dir",
        "1 error; nothing was written."]
    assert notes.read_text() == "the user's own\n" and listing(workdir / "bundle") == ["notes.txt"]


def test_train_replaces_its_own_bundle(workdir: Path, launches: list) -> None:
    config = write(workdir / "t.yml", MINIMAL + "output_dir: .\n")
    assert run_cli("compile", str(config), "-o", "bundle")[0] == 0
    (workdir / "bundle" / "launch.sh").write_text("edited\n")  # a tunefile bundle, changed since: still replaced
    code, _, err = run_cli("train", str(config), "--target", "cpu")
    assert code == 0, err
    assert launches == [["bash", "bundle/launch.sh"]]
    assert verify_bundle(workdir / "bundle") == [] and hidden_siblings(workdir) == []


def test_train_writes_into_an_empty_folder(workdir: Path, launches: list) -> None:
    config = write(workdir / "t.yml", MINIMAL + "output_dir: .\n")
    (workdir / "bundle").mkdir()
    assert run_cli("train", str(config), "--target", "cpu")[0] == 0
    assert verify_bundle(workdir / "bundle") == []


# --- kills timed into the write ----------------------------------------------------------------------

# The kills land inside the write, not in the second of imports and compiling before it: a server process imports
# tunefile once and forks a child per compile; the child runs the `tunefile compile ... --force` command line and
# writes "writing" to the pipe when it creates the hidden staging directory, and the test kills it a chosen delay
# later. Every file-system write is slowed (file writes, renames, unlinks, rmdir: what any way of writing a bundle
# calls, none of tunefile's own functions), which widens the write to a window a timer can aim into.
KILL_SERVER = """
import json, os, sys, tempfile, time
from pathlib import Path

def slowed(function, pause):
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        time.sleep(pause)
        return result
    return call

real_mkdtemp = tempfile.mkdtemp
def mkdtemp(*args, **kwargs):
    path = real_mkdtemp(*args, **kwargs)
    if ".new-" in os.path.basename(path):
        os.write(1, b"writing\\n")
    return path

from tunefile.compiler.cli import cli
from tunefile.compiler import bundle, pipeline  # noqa: F401 - imported here, not in every child
tempfile.mkdtemp = mkdtemp
Path.write_text = slowed(Path.write_text, 0.012)
Path.write_bytes = slowed(Path.write_bytes, 0.012)
os.rename = slowed(os.rename, 0.03)
os.unlink = slowed(os.unlink, 0.012)
os.rmdir = slowed(os.rmdir, 0.012)
os.write(1, b"ready\\n")
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        try:
            cli.main(args=json.loads(line), prog_name="tunefile")
        except SystemExit as exit:
            os._exit(exit.code if isinstance(exit.code, int) else 1)
        os._exit(0)
    os.write(1, f"pid {pid}\\n".encode())
    _, status = os.waitpid(pid, 0)
    os.write(1, f"status {status}\\n".encode())
"""

KILLS = 30
WINDOW_S = 0.3  # the slowed write of a bundle takes about 0.2 s (sleeps, mostly); delays spread past it, and at
# least half of the kills must land inside it


def test_a_kill_at_any_instant_of_compile_force_leaves_a_complete_bundle(tmp_path: Path) -> None:
    configs = [write(tmp_path / "a.yml", MINIMAL + "seed: 1\n"), write(tmp_path / "b.yml", MINIMAL + "seed: 2\n")]
    out = tmp_path / "out" / "bundle"
    assert run_cli("compile", str(configs[0]), "-o", str(out))[0] == 0
    bundles = {read_bundle(out)["config.yaml"]}  # the two configs' bundles, as they are seen
    killed_while_writing = 0
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-c", KILL_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, bufsize=1)
    try:
        assert server.stdout.readline() == "ready\n"
        for kill in range(KILLS):
            delay = WINDOW_S * kill / (KILLS - 1)
            command = ["compile", str(configs[(kill + 1) % 2]), "-o", str(out), "--force"]
            server.stdin.write(json.dumps(command) + "\n")
            lines = [server.stdout.readline().split() for _ in range(2)]  # the child's pid and "writing", any order
            assert sorted(line[0] for line in lines) == ["pid", "writing"], lines
            child = int(next(line[1] for line in lines if line[0] == "pid"))
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            status = int(server.stdout.readline().split()[1])
            if os.WIFSIGNALED(status):
                killed_while_writing += 1
            else:
                assert os.WEXITSTATUS(status) == 0, f"kill {kill}: the compile failed on its own"
            # Old or new, complete: the manifest verifies, and it is one of the two configs' bundles.
            assert out.is_dir(), f"kill {kill} ({delay:.3f} s into the write) left no bundle at {out}"
            assert verify_bundle(out) == [], f"kill {kill} ({delay:.3f} s into the write)"
            bundles.add(read_bundle(out)["config.yaml"])
            assert len(bundles) <= 2
    finally:
        server.kill()
        server.wait()
    assert killed_while_writing >= KILLS // 2, "the kills missed the write: WINDOW_S needs retiming"
    result = subprocess.run([sys.executable, "-m", "tunefile.compiler", "compile", str(configs[0]), "-o", str(out),
                             "--force"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    verified = subprocess.run([sys.executable, "-m", "tunefile.compiler", "verify", str(out)], capture_output=True,
                              text=True)
    assert verified.returncode == 0, verified.stderr
    assert hidden_siblings(out.parent) == []
    assert time.monotonic() - started < 60
