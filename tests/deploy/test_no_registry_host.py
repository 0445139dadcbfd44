"""The repository names no package registry's host: the Docker test image takes its Debian mirror from the
machine's own apt sources (tests/docker/build_image.sh `apt_mirror`)."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "docker" / "build_image.sh"
HOSTS = ("deb" + ".debian.org", "pypi" + ".org", "files." + "pythonhosted", "archive." + "ubuntu.com")


def apt_mirror(suite: str, *files: Path) -> subprocess.CompletedProcess[str]:
    quoted = " ".join(f"'{f}'" for f in files)
    return subprocess.run(["bash", "-c", f"source '{SCRIPT}' && apt_mirror {suite} {quoted}"],
                          capture_output=True, text=True, timeout=30)


def test_the_mirror_comes_from_the_machines_sources_deb822_or_one_line(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("# a comment\nTypes: deb-src\nURIs: http://src.mirror.test/debian\nSuites: bookworm\n\n"
                      "Types: deb\nURIs: http://off.mirror.test/debian\nSuites: bookworm\nEnabled: no\n\n"
                      "Types: deb\nURIs: http://mirror.test/debian http://second.test/debian\n"
                      "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert apt_mirror("bookworm", deb822).stdout.strip() == "http://mirror.test/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("# deb http://commented.test/debian bookworm main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://list.mirror.test/debian bookworm main\n")
    assert apt_mirror("bookworm", tmp_path / "missing.list", one_line).stdout.strip() == \
        "http://list.mirror.test/debian"


def test_no_source_for_the_suite_is_an_error_not_a_guess(tmp_path: Path) -> None:
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb http://list.mirror.test/debian trixie main\n")
    found = apt_mirror("bookworm", one_line)
    assert found.returncode != 0 and found.stdout == ""


def test_the_repository_names_no_registry_host() -> None:
    found = subprocess.run(["git", "grep", "-n", "-I", "-i", "-e", HOSTS[0], "-e", HOSTS[1], "-e", HOSTS[2],
                            "-e", HOSTS[3]], cwd=REPO, capture_output=True, text=True, timeout=30)
    if found.returncode in (0, 1):
        assert found.stdout == "", found.stdout
        return
    # Not a git checkout: read the files themselves (what a checkout would hold: no venv, caches or build output).
    skip = {".git", ".venv", ".cache", "__pycache__", ".ruff_cache", ".pytest_cache", ".hypothesis", "node_modules"}
    hits = []
    for path in REPO.rglob("*"):
        if path.is_file() and not skip.intersection(path.relative_to(REPO).parts) and path.stat().st_size < 2**20:
            text = path.read_bytes().decode(errors="ignore").lower()
            hits += [f"{path}: {host}" for host in HOSTS if host in text]
    assert hits == []
