"""The container packaging: Dockerfile, .dockerignore and entrypoint.sh, and `pip install ckpt-agent`.

There is no Docker engine here, so the image is checked by construction: both files are linted and
the Dockerfile's instructions are read. tests/test_bundle.py builds the image's /opt/ckpt-agent as
the Dockerfile does and runs entrypoint.sh on it; here `pip install` of the sources into a fresh
venv proves the package still installs the ordinary way.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "entrypoint.sh"
DOCKERIGNORE = REPO / ".dockerignore"


def _tool(name: str) -> str:
    """A binary from the test extras: beside this interpreter first (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{proc.args!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# --- Dockerfile parsing (the subset this Dockerfile uses) ----------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def _shell_commands(run_args: str) -> list[list[str]]:
    """A RUN's shell form split into simple commands at && and ; (no subshells here)."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    for token in lexer:
        if token in ("&&", ";", "||"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _command_args(keyword: str, prefix: tuple[str, ...]) -> list[list[str]]:
    """The arguments after `prefix` of every command starting with it in RUN instructions."""
    found = []
    for kw, rest in _instructions():
        if kw != keyword:
            continue
        for command in _shell_commands(rest):
            if tuple(command[: len(prefix)]) == prefix:
                found.append(command[len(prefix) :])
    return found


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip().lstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `rel` (a context-relative path) or a folder above it."""
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        assert not pat.startswith("!"), "negated .dockerignore patterns are not emulated"
        tail = pat.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pat):
                return True
            if tail != pat and fnmatch.fnmatchcase(PurePosixPath(prefix).name, tail):
                return True
    return False


def test_every_copy_source_exists_and_is_not_excluded_by_dockerignore() -> None:
    patterns = _dockerignore_patterns()
    for keyword, rest in _instructions():
        words = shlex.split(rest)
        if keyword != "COPY" or any(w.startswith("--from=") for w in words):
            continue
        for src in words[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} is missing from the repo (the build would fail)"
            assert not _ignored(src.rstrip("/"), patterns), f"COPY source {src} is excluded by .dockerignore"


# --- lint -----------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    proc = _run([_tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert proc.returncode == 0, _explain(proc)


def test_entrypoint_is_executable_posix_sh_and_passes_shellcheck() -> None:
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK), "entrypoint.sh must be executable"
    proc = _run([_tool("shellcheck"), "--shell=sh", str(ENTRYPOINT)])
    assert proc.returncode == 0, _explain(proc)


def test_image_enters_through_tini_and_entrypoint_as_non_root_user() -> None:
    instructions = _instructions()
    entrypoints = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["tini", "--", "/entrypoint.sh"]]
    assert ("COPY", "entrypoint.sh /entrypoint.sh") in instructions
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, "the image must switch away from root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is root: {users[-1]}"
    keywords = [kw for kw, _ in instructions]
    last = {kw: len(keywords) - 1 - keywords[::-1].index(kw) for kw in ("USER", "RUN")}
    assert last["USER"] > last["RUN"], "USER must come after the root-only install steps"
    assert not any(kw == "CMD" for kw, _ in instructions), "a default CMD would shadow BT_START_COMMANDS"


def _default_base_image() -> str:
    """FROM's image with the default of the BASE_IMAGE build argument filled in."""
    instructions = _instructions()
    args = dict(rest.partition("=")[::2] for kw, rest in instructions[: _first("FROM")] if kw == "ARG")
    image = [rest for kw, rest in instructions if kw == "FROM"][-1]
    return image.replace("${BASE_IMAGE}", args.get("BASE_IMAGE", "${BASE_IMAGE}"))


def _first(keyword: str) -> int:
    return next(i for i, (kw, _) in enumerate(_instructions()) if kw == keyword)


def test_base_image_is_a_build_argument_with_a_pinned_default() -> None:
    froms = [rest for kw, rest in _instructions() if kw == "FROM"]
    assert froms == ["${BUNDLE_BUILDER} AS bundle", "${BASE_IMAGE}"]
    assert _default_base_image() == "python:3.11.14-slim-bookworm"


def test_image_has_oci_labels_and_the_version_label_matches_pyproject() -> None:
    instructions = _instructions()
    labels = dict(
        (key, value.strip('"'))
        for kw, rest in instructions if kw == "LABEL"
        for key, _, value in (word.partition("=") for word in shlex.split(rest, posix=False))
    )
    for name in ("title", "description", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{name}" in labels, f"missing OCI label {name}: {labels}"
    args = dict(rest.partition("=")[::2] for kw, rest in instructions if kw == "ARG")
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    # pyproject's version is dynamic: it reads ckpt_agent/version.py, the one place the number lives
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dynamic"] == ["version"]
    version_py = ast.parse((REPO / "agent" / "ckpt_agent" / "version.py").read_text())
    version = next(ast.literal_eval(n.value) for n in version_py.body if isinstance(n, ast.Assign))
    assert args["VERSION"] == version, "the VERSION build argument's default must follow pyproject.toml"
    last_run = max(i for i, (kw, _) in enumerate(instructions) if kw == "RUN")
    late = [i for i, (kw, _) in enumerate(instructions) if kw == "ARG" and i > _first("FROM")]
    assert late and min(late) > last_run, "a RUN after a per-build ARG (REVISION) would miss the build cache"


def test_pinned_tini_resolves_on_debian_bookworm_like_the_base_image() -> None:
    """The apt pin is checked against the same Debian release as the base image, if this is it."""
    base = _default_base_image()
    assert base.startswith("python:3.11") and "-slim" in base, base
    os_release = Path("/etc/os-release")
    if "bookworm" not in base or not os_release.exists():
        pytest.skip("apt pin can only be checked on a host of the base image's Debian release")
    if "VERSION_CODENAME=bookworm" not in os_release.read_text() or not shutil.which("apt-get"):
        pytest.skip("host is not Debian bookworm")
    installs = _command_args("RUN", ("apt-get", "install"))
    assert len(installs) == 1, installs
    args = installs[0]
    assert "--no-install-recommends" in args
    packages = [a for a in args if not a.startswith("-")]
    assert packages and all("=" in p for p in packages), f"apt packages must be pinned: {packages}"
    names = [p.split("=")[0] for p in packages]
    policy = _run(["apt-cache", "policy", *names]).stdout
    if not policy.strip() or "Candidate: (none)" in policy:
        pytest.skip("this host has no apt package lists (run apt-get update)")
    # -s: simulate only, installs nothing; --reinstall: the same answer on a host that has tini already.
    proc = _run(["apt-get", "install", "-s", "--reinstall", *args])
    assert proc.returncode == 0, _explain(proc)
    for name in names:
        assert f"Inst {name} " in proc.stdout, _explain(proc)


# --- `pip install ckpt-agent` ---------------------------------------------------------------------


@dataclass(frozen=True)
class InstalledVenv:
    bin: Path
    python: Path
    site_packages: Path
    neutral_cwd: Path  # not the repo, so `python -m ckpt_agent` cannot pick up the source tree


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> InstalledVenv:
    """A fresh venv with `pip install --no-deps REPO`: the ordinary install, for those who want it.

    The runtime dependencies are not fetched again but made visible from the test interpreter's
    site-packages through a .pth line (appended after the venv's own site-packages, and without
    running that folder's .pth files, so the editable install of the repo stays out of the picture).
    The build keeps pip's build isolation, so it fetches the `[build-system]` requirements.
    """
    base = tmp_path_factory.mktemp("packaging")
    venv = base / "venv"
    proc = _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    assert proc.returncode == 0, _explain(proc)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_outer_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_USER", "VIRTUAL_ENV")}
    source = base / "source"  # a copy, so the build leaves nothing in the repo
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build"))
    proc = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)], env=env, timeout=180)
    assert proc.returncode == 0, _explain(proc)
    neutral = base / "elsewhere"
    neutral.mkdir()
    return InstalledVenv(venv / "bin", python, site, neutral)


def _clean_env(installed: InstalledVenv) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BT_LOAD_CHECKPOINT_CONFIG", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed.bin}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin"
    return env


def test_pip_install_gives_working_ckpt_agent_and_python_m_ckpt_agent(installed: InstalledVenv) -> None:
    env = _clean_env(installed)
    where = _run(
        [str(installed.python), "-c", "import ckpt_agent; print(ckpt_agent.__file__)"],
        cwd=installed.neutral_cwd,
        env=env,
    )
    assert where.returncode == 0, _explain(where)
    assert Path(where.stdout.strip()).is_relative_to(installed.site_packages), (
        f"ckpt_agent was imported from {where.stdout.strip()}, not from the installed copy"
    )
    # pyproject lists the subpackages by hand (agent/ installs as ckpt_agent): none may be missed
    installed_package = Path(where.stdout.strip()).parent
    for sub in sorted(p.parent.name for p in (REPO / "agent" / "ckpt_agent").glob("*/__init__.py")):
        assert (installed_package / sub / "__init__.py").exists(), f"agent/{sub} is not in pyproject's packages"

    script = installed.bin / "ckpt-agent"
    assert script.exists(), "the install did not create the ckpt-agent console script"
    for cmd in ([str(script), "--help"], [str(installed.python), "-m", "ckpt_agent", "--help"]):
        proc = _run(cmd, cwd=installed.neutral_cwd, env=env)
        assert proc.returncode == 0, _explain(proc)
        assert "run" in proc.stdout, _explain(proc)
