"""The self-contained agent, /opt/ckpt-agent (docs/containers.md), built here the way the Dockerfile builds it.

There is no Docker engine here, so the `bundle` stage's `packaging/build_bundle.py` lines are taken
from the Dockerfile and run with this interpreter standing in for the build image's python3, into
a temporary folder (with this host's glibc as the limit, since the interpreter was built here).
Then the bundle is used as a user's image uses it: its `bin/ckpt-agent` loads and runs a trainer,
in an environment whose PYTHONPATH puts a user's conflicting boto3 first, and the trainer's own
Python, every one from 3.9 on that this machine has, imports ckpt_agent from the bundle.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_agent.version import __version__
from tests.support.helpers import clean_env, s3_store
from tests.support.specs import latest, spec
from tests.test_packaging import ENTRYPOINT, REPO, _explain, _instructions, _shell_commands

sys.path.insert(0, str(REPO / "packaging"))
import build_bundle  # noqa: E402 - packaging/ is not a package: the Dockerfile runs the file

USERS_BOTO3 = "1.20.0"


def build_steps() -> list[list[str]]:
    """The argv of every `build_bundle.py` command the Dockerfile RUNs, in order."""
    return [c for kw, rest in _instructions() if kw == "RUN" for c in _shell_commands(rest)
            if c[1:2] == ["packaging/build_bundle.py"]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("opt") / "ckpt-agent"
    glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[1]  # e.g. "glibc 2.36"
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    for step in build_steps():
        argv = [sys.executable, *(str(dest) if a == "/opt/ckpt-agent" else a for a in step[1:])]
        if "--max-glibc" in argv:
            argv[argv.index("--max-glibc") + 1] = glibc
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, _explain(proc)
    return dest


@pytest.fixture(scope="module")
def users_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's boto3, first on PYTHONPATH: too old for the agent (no `boto3.session`), theirs to keep."""
    folder = tmp_path_factory.mktemp("users-site")
    (folder / "boto3").mkdir()
    (folder / "boto3" / "__init__.py").write_text(f"__version__ = {USERS_BOTO3!r}\n")
    return folder


def agent(bundle: Path, args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bundle / "bin" / "ckpt-agent"), *args], env=env, capture_output=True, text=True,
                          timeout=60, **kwargs)


def hostile_env(users_path: Path, **extra: str) -> dict[str, str]:
    """What a training image may set for its own Python; none of it may reach the agent's."""
    env = clean_env(PYTHONPATH=str(users_path), PYTHONHOME="/nonexistent", PYTHONSTARTUP="/nonexistent", **extra)
    env.pop("VIRTUAL_ENV", None)
    return env


def test_the_dockerfile_builds_the_bundle_in_two_steps_around_the_sources_for_glibc_2_31():
    """Interpreter and dependencies first (a change to agent/ redoes only the last step), for old images."""
    steps = build_steps()
    assert [s[2] for s in steps] == ["base", "package"], steps
    assert steps[0][steps[0].index("--max-glibc") + 1] == "2.31"
    instructions = _instructions()
    at = {kw + rest: i for i, (kw, rest) in enumerate(instructions)}
    runs = [i for i, (kw, rest) in enumerate(instructions) if kw == "RUN" and "build_bundle.py" in rest]
    assert runs[0] < at["COPYagent/ ./agent/"] < runs[1]
    copied_before = [rest for i, (kw, rest) in enumerate(instructions) if kw == "COPY" and i < runs[0]]
    assert copied_before == ["packaging/ ./packaging/", "pyproject.toml ./"]
    assert ("COPY", "--from=bundle /opt/ckpt-agent /opt/ckpt-agent") in instructions


def test_bundle_holds_pyprojects_dependencies_and_is_at_most_80_mb(bundle):
    code = ("import json, importlib.metadata as m, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    names = [r.split(">")[0].split("=")[0].split("<")[0].strip() for r in build_bundle.requirements(
        REPO / "pyproject.toml")]
    proc = subprocess.run([str(bundle / "python" / "bin" / "python3"), "-I", "-c", code, *names],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, _explain(proc)
    assert sorted(json.loads(proc.stdout)) == sorted(names)
    size = sum(p.lstat().st_size for p in bundle.rglob("*"))
    assert size <= 80_000_000, f"the bundle is {size / 1e6:.1f} MB"


def test_bundle_needs_no_newer_glibc_than_the_build_was_told(bundle):
    version, _ = build_bundle.glibc_needed(bundle)
    host = tuple(int(p) for p in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))
    assert (2, 2) <= version <= host
    with pytest.raises(SystemExit, match="needs glibc .* newer than 2.0; build from an image with an older glibc"):
        build_bundle.check_glibc(bundle, "2.0")


def test_bundles_python_reads_only_the_bundle_whatever_the_environment_says(bundle, users_path, tmp_path):
    (tmp_path / "ckpt_agent").mkdir()  # a stray package in the current folder
    (tmp_path / "ckpt_agent" / "__init__.py").write_text("raise SystemExit('the wrong ckpt_agent')\n")
    result = agent(bundle, ["--version"], hostile_env(users_path), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"ckpt-agent {__version__}", _explain(result)
    code = "import json, sys, boto3, ckpt_agent; print(json.dumps([sys.path, boto3.__file__, ckpt_agent.__file__]))"
    proc = subprocess.run([str(bundle / "python" / "bin" / "python3"), "-I", "-c", code],
                          env=hostile_env(users_path), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, _explain(proc)
    paths, boto3_at, package_at = json.loads(proc.stdout)
    for path in [*paths, boto3_at, package_at]:
        assert Path(path).resolve().is_relative_to(bundle.resolve()), (path, paths)


@pytest.mark.seaweed
def test_bundle_saves_and_loads_through_its_own_boto3_with_the_users_first_on_pythonpath(
        bundle, users_path, seaweed, s3_prefix, tmp_path):
    store = s3_store(seaweed, s3_prefix)
    env = hostile_env(users_path, **store.env, CKPT_AGENT_S3_ENGINE="boto3")
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "model.bin").write_bytes(os.urandom(300_000))
    result = agent(bundle, ["save", str(folder), "--project", "proj", "--job-id", "job-b", "--name", "checkpoint-3"],
                   env)
    assert result.returncode == 0, _explain(result)
    dl = tmp_path / "dl"
    result = agent(bundle, ["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))})
    assert result.returncode == 0, _explain(result)
    assert (dl / "rank-0" / "checkpoint-3" / "model.bin").read_bytes() == (folder / "model.bin").read_bytes()


def _trainer_pythons() -> list[str]:
    """This interpreter, Debian's python3 and any other CPython 3.9+ here (pyenv's), each binary once."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found: dict[str, str] = {}
    for exe in [sys.executable, "/usr/bin/python3", *sorted(glob.glob(f"{pyenv}/3.*/bin/python3"))]:
        try:
            version = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            continue
        if version and tuple(map(int, version.split("."))) >= (3, 9):
            found.setdefault(os.path.realpath(exe), exe)
    return sorted(found.values(), key=lambda e: e != sys.executable)


TRAINER_CODE = """
import json, os, sys, boto3, ckpt_agent
print(json.dumps({"latest": ckpt_agent.latest_local_checkpoint(), "boto3": boto3.__version__,
                  "helper": ckpt_agent.__file__, "launcher_var": os.environ.get("CKPT_AGENT_PYTHONPATH"),
                  "modules": sorted(m for m in sys.modules if m.startswith("ckpt_agent"))}))
"""


@pytest.mark.parametrize("python", _trainer_pythons())
def test_run_gives_the_trainers_own_python_import_ckpt_agent_and_leaves_it_the_users_boto3(
        bundle, users_path, local_store, tmp_path, python):
    env = hostile_env(users_path, **local_store.env)
    env.pop("PYTHONHOME")  # the trainer's Python needs its own home
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"w" * 1000)
    result = agent(bundle, ["save", str(folder), "--project", "proj", "--job-id", "job-r"], env)
    assert result.returncode == 0, _explain(result)
    dl = tmp_path / "dl"
    result = agent(bundle, ["run", "--", python, "-c", TRAINER_CODE],
                   {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))})
    assert result.returncode == 0, _explain(result)
    seen = json.loads(result.stdout)
    assert seen["latest"] == str(dl.absolute() / "rank-0" / "checkpoint-5"), seen
    assert seen["boto3"] == USERS_BOTO3 and seen["launcher_var"] is None, seen
    assert Path(seen["helper"]).resolve().is_relative_to((bundle / "pythonpath").resolve()), seen
    assert "ckpt_agent.load" not in " ".join(seen["modules"]), seen  # the helper alone, no agent machinery


def test_bundle_as_sidecar_and_init_container_and_the_one_line_for_a_trainer_it_did_not_start(
        bundle, local_store, tmp_path):
    """`sync` commits what a trainer wrote; `load` fills a shared folder; a trainer started by someone
    else, on another Python, finds it with PYTHONPATH=/opt/ckpt-agent/pythonpath alone."""
    ckpts = tmp_path / "ckpts"
    (ckpts / "checkpoint-8").mkdir(parents=True)
    (ckpts / "checkpoint-8" / "model.bin").write_bytes(b"m" * 5000)
    (ckpts / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8}')
    env = clean_env(**local_store.env, BT_TRAINING_PROJECT_NAME="proj", BT_TRAINING_JOB_ID="job-s",
                    BT_CHECKPOINT_DIR=str(ckpts), CKPT_AGENT_QUIET_SECONDS="0")
    result = agent(bundle, ["sync", "--once"], env)
    assert result.returncode == 0 and "committed checkpoint-8" in result.stderr, _explain(result)
    shared = tmp_path / "shared"
    result = agent(bundle, ["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(shared, latest("proj"))})
    assert result.returncode == 0, _explain(result)
    python = _trainer_pythons()[-1]  # another Python than the suite's, where the machine has one
    code = "import ckpt_agent; print(ckpt_agent.latest_local_checkpoint())"
    trainer_env = {**clean_env(), "BT_LOAD_CHECKPOINT_DIR": str(shared), "PYTHONPATH": str(bundle / "pythonpath")}
    proc = subprocess.run([python, "-c", code], env=trainer_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.strip() == str(shared / "rank-0" / "checkpoint-8")


# --- entrypoint.sh on the bundle, as the image runs it (PATH=/opt/ckpt-agent/bin:...) ----------------


def _image_env(bundle: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in clean_env(**extra).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bundle / 'bin'}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin"
    return env


def test_entrypoint_execs_command_in_place_keeping_pid_and_exit_status(bundle, tmp_path):
    """PID equality proves every hop (sh -> launcher -> the agent's python -> command) exec'd, none forked."""
    proc = subprocess.Popen(
        [str(ENTRYPOINT), sys.executable, "-c", "import os; print(os.getpid()); raise SystemExit(7)"],
        cwd=tmp_path, env=_image_env(bundle), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert out.split() == [str(proc.pid)], f"stdout:\n{out}\nstderr:\n{err}"


def test_entrypoint_passes_arguments_through_verbatim(bundle, tmp_path):
    awkward = ["two words", "", "--", "$HOME", "it's", "*", "-x"]
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    proc = subprocess.run([str(ENTRYPOINT), sys.executable, "-c", code, *awkward], cwd=tmp_path,
                          env=_image_env(bundle), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, _explain(proc)
    assert json.loads(proc.stdout) == awkward, _explain(proc)


def test_entrypoint_accepts_a_leading_double_dash(bundle, tmp_path):
    proc = subprocess.run([str(ENTRYPOINT), "--", "sh", "-c", "echo hi"], cwd=tmp_path, env=_image_env(bundle),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "hi\n", _explain(proc)


def test_entrypoint_without_a_command_or_start_commands_is_a_one_line_error_exit_2(bundle, tmp_path):
    env = {k: v for k, v in _image_env(bundle).items() if k != "BT_START_COMMANDS"}
    proc = subprocess.run([str(ENTRYPOINT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, _explain(proc)
    assert proc.stderr.count("\n") == 1 and "BT_START_COMMANDS" in proc.stderr, _explain(proc)


def test_entrypoint_runs_start_commands_when_no_command_is_given(bundle, tmp_path):
    env = _image_env(bundle, BT_START_COMMANDS='["echo from-start-commands"]')
    proc = subprocess.run([str(ENTRYPOINT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "from-start-commands\n", _explain(proc)


def test_launcher_is_posix_sh_and_passes_shellcheck():
    launcher = REPO / "packaging" / "ckpt-agent"
    assert launcher.read_text().startswith("#!/bin/sh\n") and os.access(launcher, os.X_OK)
    proc = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), "--shell=sh", str(launcher)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, _explain(proc)
