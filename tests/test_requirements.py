"""requirements.txt's torch floor against the torch APIs the code calls: every API below that some
project file uses must exist in the oldest torch that requirements.txt accepts."""

import re
from pathlib import Path

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent

# torch APIs newer than torch 2.0 that the project may call: (regex over the source, release that introduced it)
TORCH_APIS = {
    "torch.get_autocast_dtype": (r"torch\.get_autocast_dtype\(", "2.4"),
    "torch.is_autocast_enabled(device_type)": (r"torch\.is_autocast_enabled\([^)]", "2.4"),
    "torch.compiler.is_compiling": (r"torch\.compiler\.is_compiling\(", "2.3"),
    "nn.Module.compile": (r"\.compile\(\)", "2.2"),
    "torch.compiler.disable": (r"torch\.compiler\.disable", "2.1"),
    "nn.LayerNorm(bias=...)": (r"LayerNorm\([^)]*bias=", "2.1"),
    "torch.utils.flop_counter": (r"torch\.utils\.flop_counter", "2.1"),
}


def torch_requirement():
    """The SpecifierSet of requirements.txt's torch line."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    torch_lines = [line for line in lines if re.match(r"torch\b", line)]
    assert len(torch_lines) == 1, torch_lines
    return SpecifierSet(torch_lines[0][len("torch"):])


def sources():
    files = [*REPO.glob("*.py"), *REPO.glob("tests/*.py"), *REPO.glob("data/*.py")]
    return {f.relative_to(REPO).as_posix(): f.read_text() for f in files if f.name != "test_requirements.py"}


def test_torch_floor_covers_every_torch_api_the_code_calls():
    requirement, code = torch_requirement(), sources()
    used = {api: (since, [f for f, text in code.items() if re.search(pattern, text)])
            for api, (pattern, since) in TORCH_APIS.items()}
    used = {api: (since, files) for api, (since, files) in used.items() if files}
    assert "torch.get_autocast_dtype" in used            # the scan does see the code (uoe.compute_dtype)
    floor = next((f"2.{minor}" for minor in range(15) if requirement.contains(f"2.{minor}.0")), None)  # oldest
    too_new = {api: f"{since} ({', '.join(files)})" for api, (since, files) in used.items()
               if floor is None or Version(since) > Version(floor)}
    assert not too_new, f"requirements.txt accepts torch {floor}, older than these APIs the code calls: {too_new}"


def test_torch_requirement_accepts_the_installed_and_newer_torches():
    requirement = torch_requirement()
    installed = Version(torch.__version__.split("+")[0])
    for version in (installed, Version("2.11.0"), Version("2.14.1")):
        assert requirement.contains(version), f"requirements.txt's torch{requirement} refuses torch {version}"
