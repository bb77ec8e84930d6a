"""Self-contained bundles: the runtime travels in the bundle as one deterministic zip archive, and launch.sh
checks the package versions the bundle was resolved for before training.

The acceptance test trains a bundle in a fresh virtual environment that holds torch, transformers, peft,
accelerate and datasets but not tunefile, inside a network namespace with no network (`unshare -n`). Installing
the ML stack afresh would take minutes, so the environment is built the fast honest way: `python -m venv
--without-pip`, its site-packages filled with links to every entry of the site-packages torch was installed in,
except tunefile's own (its dist-info and its editable-install finder). Python processes that site-packages as
its own (.pth files included), and the test asserts that `import tunefile` fails there while torch imports.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest

from helpers import REPO, require_tool, run_cli, run_process_tree, write
from runtime_bundles import compile_bundle, launch, metrics, workspace, write_config
from tunefile.compiler import __version__
from tunefile.compiler.bundle import read_bundle
from tunefile.compiler.stack import MINIMUM_VERSIONS, parse_freeze, requirement
from tunefile.compiler.vendor import archive_name, build_archive, runtime_archive, runtime_sources
from tunefile.runtime.stack_check import satisfies

ARCHIVE = archive_name(__version__)
CONFIG = """\
base_model: tiny-model
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
adapter: lora
lora_r: 4
lora_alpha: 8
output_dir: out
"""


def compile_to(tmp_path: Path, *flags: str, config: str = CONFIG) -> Path:
    path = write(tmp_path / "cfg.yml", config)
    code, out, err = run_cli("compile", str(path), "--target", "cpu", "--output", str(tmp_path / "bundle"), *flags)
    assert code == 0, out + err
    return tmp_path / "bundle"


# --- the archive -------------------------------------------------------------------------------------------


def test_the_archive_is_deterministic_and_holds_only_the_runtime() -> None:
    first = build_archive(runtime_sources())
    assert first == build_archive(dict(reversed(list(runtime_sources().items()))))  # order of reading: irrelevant
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.external_attr >> 16 for info in infos if not info.is_dir()} == {0o100644}
    assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}
    files = {name for name in names if not name.endswith("/")}
    assert "tunefile/runtime/__main__.py" in files and "tunefile/runtime/data/build.py" in files
    assert "tunefile/schemas/run_plan.py" in files and "tunefile/schemas/tunefile.schema.json" in files
    assert {"tunefile/", "tunefile/runtime/", "tunefile/runtime/data/", "tunefile/schemas/"} <= set(names)
    assert not [name for name in files if "compiler" in name or "templates" in name or name.endswith(".pyc")]
    # Every runtime module of the repository is in it, byte for byte.
    for path in sorted((REPO / "runtime").rglob("*.py")):
        member = "tunefile/runtime/" + path.relative_to(REPO / "runtime").as_posix()
        assert runtime_sources()[member] == path.read_bytes(), member


def test_the_archived_sources_import_no_tunefile_module_outside_runtime_and_schemas() -> None:
    """Statically, every import statement (lazy ones inside functions too): what the probe of the acceptance
    test cannot reach by importing a few modules."""
    outside = []
    for name, data in runtime_sources().items():
        if not name.endswith(".py"):
            continue
        package = name.split("/")[:-1]  # a module's package; for __init__.py, the package itself
        for node in ast.walk(ast.parse(data, filename=name)):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                targets = [".".join([*base, *(node.module.split(".") if node.module else [])])]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            outside += [f"{name}:{node.lineno}: {target}" for target in targets if target.startswith("tunefile")
                        and not target.startswith(("tunefile.runtime", "tunefile.schemas"))]
    assert not outside, outside


def test_the_bundle_carries_the_archive_with_its_hash_in_manifest_and_readme(tmp_path: Path) -> None:
    bundle = compile_to(tmp_path)
    data = (bundle / ARCHIVE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert data == runtime_archive(__version__).data
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"][ARCHIVE] == digest
    assert manifest["runtime"] == {"vendored": True, "archive": ARCHIVE, "sha256": digest,
                                   "tunefile_version": __version__}
    assert "tunefile" not in manifest["required_packages"] and "tunefile" not in manifest["stack"]["packages"]
    readme = (bundle / "README.md").read_text()
    assert f"`{ARCHIVE}` (tunefile {__version__}, sha256 `{digest}`)" in readme
    script = (bundle / "launch.sh").read_text()
    assert f'export PYTHONPATH="$BUNDLE_DIR"/{ARCHIVE}"${{PYTHONPATH:+:$PYTHONPATH}}"' in script
    assert script.index("export PYTHONPATH") < script.index("TUNEFILE_SKIP_STACK_CHECK=1") \
        < script.rindex("-m tunefile.runtime.launcher")
    assert run_cli("verify", str(bundle))[0] == 0
    (bundle / ARCHIVE).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit
    assert "changed: " + ARCHIVE in run_cli("verify", str(bundle))[2]


def test_two_compiles_give_identical_bytes_and_diffs_list_the_archive_members(tmp_path: Path) -> None:
    one, two = compile_to(tmp_path / "a"), compile_to(tmp_path / "b")
    for name in sorted(path.name for path in one.iterdir()):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    listing = read_bundle(one)[ARCHIVE]  # what `tunefile diff` and golden comparisons see instead of bytes
    assert listing.startswith("zip archive, ") and re.search(r"^[0-9a-f]{64}  tunefile/runtime/train\.py$", listing,
                                                            re.M)


def test_no_vendor_uses_the_installed_runtime(tmp_path: Path) -> None:
    bundle = compile_to(tmp_path, "--no-vendor")
    assert not (bundle / ARCHIVE).exists()
    script = (bundle / "launch.sh").read_text()
    assert "PYTHONPATH" not in script and "Compiled with --no-vendor" in script
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["runtime"] == {"vendored": False, "tunefile_version": __version__}
    assert ARCHIVE not in manifest["files"] and "tunefile" in manifest["required_packages"]
    major_minor = ".".join(__version__.split(".")[:2])
    assert manifest["stack"]["packages"]["tunefile"] == {"requires": f"=={major_minor}.*",
                                                         "resolved_for": __version__}
    assert run_cli("verify", str(bundle))[0] == 0


def test_the_scripts_pass_shellcheck_vendored_or_not(tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck")
    for flags in ((), ("--no-vendor",)):
        bundle = compile_to(tmp_path / ("n" if flags else "v"), *flags)
        result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(bundle / "launch.sh")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


# --- the stack ---------------------------------------------------------------------------------------------


def test_the_default_stack_is_tunefiles_declared_minimums(tmp_path: Path) -> None:
    stack = json.loads((compile_to(tmp_path) / "manifest.json").read_text())["stack"]
    assert stack["packages"]["torch"] == {"requires": ">=2.4", "resolved_for": None}
    assert stack["packages"]["peft"] == {"requires": ">=0.12", "resolved_for": None}
    assert stack["packages"]["safetensors"] == {"requires": "any", "resolved_for": None}
    assert "minimum versions" in stack["resolved_for"]


def test_minimum_versions_agree_with_pyproject() -> None:
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)[a-z0-9]*"', (REPO / "pyproject.toml").read_text()))
    assert {name: declared[name] for name in MINIMUM_VERSIONS} == MINIMUM_VERSIONS


def test_stack_file_records_exact_versions_and_the_rule(tmp_path: Path) -> None:
    freeze = write(tmp_path / "stack.txt", "# pip freeze of the image\ntorch==2.13.0+cu128\ntransformers==5.24.0\n"
                   "Peft==0.21.2\naccelerate==1.15.0\ndatasets==5.2.0\nsafetensors==0.8.0\ntokenizers==0.23.3\n"
                   "-e git+https://example.org/x.git#egg=x\nlocal @ file:///opt/local\n")
    stack = json.loads((compile_to(tmp_path, "--stack", str(freeze)) / "manifest.json").read_text())["stack"]
    assert stack["packages"]["torch"] == {"requires": "==2.13.*", "resolved_for": "2.13.0+cu128"}
    assert stack["packages"]["transformers"] == {"requires": "==5.24.*", "resolved_for": "5.24.0"}
    assert stack["packages"]["peft"] == {"requires": ">=0.21.2", "resolved_for": "0.21.2"}
    assert stack["resolved_for"] == "stack.txt (compile --stack)"


def test_stack_detect_reads_the_compiling_environment(tmp_path: Path) -> None:
    stack = json.loads((compile_to(tmp_path, "--stack", "detect") / "manifest.json").read_text())["stack"]
    assert stack["packages"]["accelerate"]["resolved_for"] == installed_version("accelerate")


def test_stack_problems_are_located_and_nothing_is_written(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg.yml", CONFIG)
    bad = write(tmp_path / "bad.txt", "torch==2.13.0\ntransformers 5\n")
    code, _, err = run_cli("compile", str(path), "--target", "cpu", "-o", str(tmp_path / "b"), "--stack", str(bad))
    assert code == 2 and f"{bad}:2:1: error: stack: expected NAME==VERSION" in err, err
    short = write(tmp_path / "short.txt", "torch==2.13.0\n")
    code, _, err = run_cli("compile", str(path), "--target", "cpu", "-o", str(tmp_path / "b"), "--stack", str(short))
    assert code == 2 and f"--stack {short}: accelerate is not listed in {short}, and the plan needs it" in err, err
    assert not (tmp_path / "b").exists()


def test_parse_freeze_and_requirement() -> None:
    versions, problems = parse_freeze("Flash_Attn==2.7.4.post1\nfoo===1.0\nbar[extra]==3\n\n# c\nbaz>=1\n")
    assert versions == {"flash-attn": "2.7.4.post1", "foo": "1.0", "bar": "3"}
    assert problems == [(6, "expected NAME==VERSION (as `pip freeze` prints it), not 'baz>=1'")]
    assert requirement("torch", "2.13.0+cpu") == "==2.13.*" and requirement("flash-attn", "2.7.4.post1") == ">=2.7.4"


@pytest.mark.parametrize(("installed", "requires", "ok"), [
    ("2.13.0+cpu", "==2.13.*", True), ("2.13.1", "==2.13.*", True), ("2.14.0", "==2.13.*", False),
    ("2.12.9", "==2.13.*", False), ("2.13.0rc1", "==2.13.*", True), ("0.21.2", ">=0.21.2", True),
    ("0.21", ">=0.21.2", False), ("1.0", ">=0.21.2", True), ("0.21.2", ">=0.21", True), ("weird", ">=1", False),
    ("anything", "any", True),
])
def test_satisfies(installed: str, requires: str, ok: bool) -> None:
    assert satisfies(installed, requires) is ok


def test_check_stack_alone_and_its_skip(tmp_path: Path) -> None:
    freeze = write(tmp_path / "stack.txt", "torch==1.13.1\ntransformers==5.24.0\npeft==0.21.2\naccelerate==1.15.0\n"
                   "datasets==5.2.0\nsafetensors==0.8.0\ntokenizers==0.23.3\n")
    bundle = compile_to(tmp_path, "--stack", str(freeze))
    env = {name: value for name, value in os.environ.items() if name != "TUNEFILE_SKIP_STACK_CHECK"}
    command = [sys.executable, str(bundle / ARCHIVE), "check-stack", str(bundle / "manifest.json")]  # a zipapp too
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"torch {installed_version('torch')} is installed; the bundle needs torch ==1.13.* (resolved for 1.13.1)" \
        in result.stderr
    result = subprocess.run(command, env={**env, "TUNEFILE_SKIP_STACK_CHECK": "1"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "TUNEFILE_SKIP_STACK_CHECK is set" in result.stderr


def test_launch_stops_in_one_line_on_an_incompatible_stack(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real launcher: the ranks' runtime checks before it reads data or loads the model."""
    work = workspace(tmp_path, tiny_model_dir)
    freeze = write(work / "stack.txt", "torch==2.12.1\ntransformers==5.24.0\npeft==0.21.2\naccelerate==1.15.0\n"
                   "datasets==5.2.0\nsafetensors==0.8.0\ntokenizers==0.23.3\n")
    config = write_config(work, max_steps=2, adapter="lora", lora_r=4, lora_alpha=8)
    code, out, err = run_cli("compile", str(config), "--target", "cpu", "-o", str(work / "bundle"),
                             "--stack", str(freeze))
    assert code == 0, out + err
    result = launch(work / "bundle", env={"TUNEFILE_SKIP_STACK_CHECK": ""}, check=False, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"tunefile runtime: torch {installed_version('torch')} is installed; the bundle needs torch "
                     "==2.12.* (resolved for 2.12.1) (install those versions, recompile with --stack, or set "
                     "TUNEFILE_SKIP_STACK_CHECK=1 to run anyway)"], result.stderr
    assert not (work / "prepared").exists() and not (work / "out" / "metrics.jsonl").exists()


# --- the acceptance test: no tunefile, no network ----------------------------------------------------------


def _site_packages_of(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed"
    return Path(spec.origin).parent.parent


def _is_tunefile(name: str) -> bool:
    return name.lower().startswith(("tunefile", "__editable__.tunefile", "__editable___tunefile"))


def tunefile_free_venv(directory: Path) -> Path:
    """A new virtual environment with the ML stack of this one and no tunefile; its bin/ directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True, timeout=120)
    site_packages = next((directory / "lib").glob("python*/site-packages"))
    source = _site_packages_of("torch")
    for entry in sorted(source.iterdir()):
        if not _is_tunefile(entry.name):
            (site_packages / entry.name).symlink_to(entry)
    # The console script launch.sh calls, pointing at the new interpreter (as pip would have written it).
    accelerate = Path(sys.executable).parent / "accelerate"
    script = accelerate.read_text().split("\n", 1)[1]
    write(directory / "bin" / "accelerate", f"#!{directory / 'bin' / 'python'}\n{script}").chmod(0o755)
    return directory / "bin"


def no_network_command() -> list[str]:
    """`unshare -n`: a new network namespace, in which only a loopback interface (down) exists."""
    unshare = require_tool("unshare")
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        message = f"unshare -n does not work here ({probe.stderr.strip()}); it needs root or user namespaces"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return [unshare, "-n"]


PROBE = """\
import json, socket, sys
ARCHIVE = sys.argv[1]
report = {}
try:
    import tunefile
    report["tunefile"] = str(getattr(tunefile, "__path__", tunefile))
except ImportError as exc:
    report["tunefile"] = None
    report["tunefile_error"] = f"{type(exc).__name__}: {exc}"
import accelerate, datasets, peft, torch, transformers
report["torch"] = torch.__version__
sys.path.insert(0, ARCHIVE)  # as launch.sh's PYTHONPATH does
import tunefile.runtime.__main__, tunefile.runtime.train, tunefile.runtime.stack_check, tunefile.schemas.run_plan
report["runtime_from"] = tunefile.runtime.__file__
report["tunefile_modules"] = sorted(name for name in sys.modules if name.startswith("tunefile"))
try:
    socket.create_connection(("1.1.1.1", 443), timeout=3)
    report["network"] = "reachable"
except OSError as exc:
    report["network"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(report))
"""


def test_a_bundle_trains_without_tunefile_and_without_network(tmp_path: Path, tiny_model_dir: Path) -> None:
    isolate = no_network_command()
    work = workspace(tmp_path / "project", tiny_model_dir)
    config = write_config(work, offline=True, max_steps=3, adapter="lora", lora_r=4, lora_alpha=8,
                          auto_resume_from_checkpoints=False)
    bundle = compile_bundle(config)  # with the tunefile of this environment, as on a login node
    assert (bundle / ARCHIVE).is_file()

    bin_dir = tunefile_free_venv(tmp_path / "venv")
    env = {name: value for name, value in os.environ.items()
           if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "TUNEFILE_SKIP_STACK_CHECK")}
    env.update({"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                "HF_HOME": str(tmp_path / "hf-home")})

    probe = subprocess.run([*isolate, str(bin_dir / "python"), "-c", PROBE, str(bundle / ARCHIVE)], env=env, cwd=work,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["tunefile"] is None, f"tunefile is importable in the test environment: {report}"
    assert report["tunefile_error"] == "ModuleNotFoundError: No module named 'tunefile'"
    assert report["network"] != "reachable" and "unreachable" in report["network"].lower(), report
    # The archive's runtime imports there, and nothing of the compiler comes with it.
    assert report["runtime_from"] == str(bundle / ARCHIVE / "tunefile" / "runtime" / "__init__.py")
    assert not [name for name in report["tunefile_modules"]
                if not name.startswith(("tunefile.runtime", "tunefile.schemas")) and name != "tunefile"], report

    result = run_process_tree([*isolate, "bash", str(bundle / "launch.sh")], cwd=work, env=env, timeout=300)
    assert result.returncode == 0, f"launch.sh exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-5000:]}"
    steps = [record for record in metrics(work / "out") if "loss" in record]
    assert len(steps) == 3 and all(record["loss"] == record["loss"] for record in steps)
    assert (work / "out" / "adapter_model.safetensors").is_file() or any((work / "out").glob("**/*.safetensors"))
