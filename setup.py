"""Build hook for the native parts: CMake builds the vzero-sandbox launcher (CMakeLists.txt, sandbox/).

Everything else about the package lives in pyproject.toml; setup.py only adds a `build_ext` that runs
CMake, because setuptools stays the build backend (it maps the top-level kernels/ folder to
vzero_fast.kernels, which scikit-build-core does not do well).

Decisions:
  - The launcher is an executable, not an extension module. It is declared as an Extension without
    sources (`CMakeExecutable`) so that setuptools runs build_ext, marks the wheel as platform-specific,
    and runs it in place for editable installs; `CMakeBuild` replaces the compile step with CMake.
  - Where it goes: `vzero_fast/_bin/vzero-sandbox` in the source tree for `pip install -e .` (editable
    mode builds in place) and inside the wheel (build_lib/vzero_fast/_bin/) otherwise.
  - CMake comes from the PyPI `cmake` wheel ([build-system].requires), so no system cmake is needed; a
    C compiler is.
  - Elsewhere than Linux x86_64 (macOS, aarch64) nothing is built and the install still succeeds, with a
    warning: the launcher's seccomp list and namespaces are Linux x86_64 only, and everything but MM-Zero's
    renderer works without it (the renderer refuses to start with the reason). On Linux x86_64 a failed build
    fails the install (tests/test_sandbox.py also checks that the installed binary exists there).

Test: `pip install -e . --no-deps` or `pip wheel . --no-deps`, then `vzero-sandbox --probe`;
tests/test_sandbox.py checks the installed binary.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SUPPORTED = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


class CMakeExecutable(Extension):
    """A CMake target that is installed as an executable file inside the package."""

    def __init__(self, target: str, package_path: str):
        super().__init__(name=target, sources=[])
        self.target = target
        self.package_path = package_path  # relative to the vzero_fast package directory


def _cmake() -> str:
    try:
        import cmake  # the PyPI wheel from [build-system].requires

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if not exe:
        raise RuntimeError("vzero_fast needs CMake >= 3.18 to build vzero-sandbox: `pip install cmake`")
    return exe


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, then copies each CMakeExecutable into the package."""

    def run(self) -> None:
        if not SUPPORTED:  # the rest of vzero_fast works; MM-Zero's renderer refuses to start, naming why
            print(f"warning: vzero-sandbox is not built on {platform.system()} {platform.machine()} (it needs "
                  "Linux on x86_64): everything but model-written code (MM-Zero's renderer) works", file=sys.stderr)
            return
        for ext in self.extensions:
            self.build_executable(ext)

    def _dest(self, ext: CMakeExecutable) -> Path:
        if self.inplace or self.editable_mode:
            package_dir = self.get_finalized_command("build_py").get_package_dir("vzero_fast")
            return ROOT / package_dir / ext.package_path
        return Path(self.build_lib) / "vzero_fast" / ext.package_path

    def build_executable(self, ext: CMakeExecutable) -> None:
        cmake = _cmake()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"], check=True)
        jobs = str(self.parallel or os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)
        dest = self._dest(ext)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(build_dir / ext.target, tmp)
        tmp.chmod(0o755)
        tmp.replace(dest)  # atomic: a running launcher is never overwritten mid-read

    def get_outputs(self) -> list[str]:
        return [str(self._dest(ext)) for ext in self.extensions] if SUPPORTED else []

    def get_output_mapping(self) -> dict[str, str]:
        return {}


setup(
    ext_modules=[CMakeExecutable("vzero-sandbox", "_bin/vzero-sandbox")],
    cmdclass={"build_ext": CMakeBuild},
)
