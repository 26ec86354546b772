"""What a plain `pip install` (not editable, run from any folder) carries: the migrations, the bundled
personas, every package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_list_holds_every_package_under_bot() -> None:
    """pyproject lists packages by hand (one is mapped from personas/), so a new one must be added there."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(find_packages(str(ROOT), include=["bot*"])) <= set(listed)


def test_an_installed_wheel_upgrades_a_database_and_has_the_bundled_personas_and_the_kernel_source(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for name in ("bot", "personas"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("hermes_bot-*.whl")
    site, run_dir = tmp_path / "site", tmp_path / "elsewhere"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what pip install puts in site-packages
    run_dir.mkdir()
    db = tmp_path / "hermes.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env |= {"HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{db}", "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=run_dir, env=env, capture_output=True, text=True,
                              timeout=120)

    check = run("-c", "import bot; print(bot.__file__)")
    assert check.stdout.startswith(str(site))  # it runs the wheel's copy, not the checkout
    upgraded = run("-m", "bot", "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "database at head" in upgraded.stdout
    listed = run("-m", "bot", "personas", "list")  # no personas/ here: the wheel's own
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()} == {
        path.stem for path in (ROOT / "personas").glob("*.yaml")}
    assert (site / "bot" / "bundled_personas" / "hermes.yaml").read_text() == (ROOT / "personas" / "hermes.yaml").read_text()
    assert (site / "bot" / "engine" / "batched_linear.c").read_text() == (ROOT / "bot" / "engine" / "batched_linear.c").read_text()
