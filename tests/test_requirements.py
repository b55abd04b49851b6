"""The generated requirements.txt pins every package exactly, and each Python from 3.8 to 3.13 installs its pins.

A platform rebuilds a deployed app on every restart or push; the pins make it install what the template's
tests ran, whatever was released since. So these tests check the pinned set, never "the newest": nothing
here reads which releases the registry lists, and a new upstream release cannot turn them red. For each
Python and stack they

- check every line but torch's lower bounds is ``==``, and that the markers leave one line per package;
- let pip resolve the whole file for that Python against the package registry (PyPI, or PIP_INDEX_URL)
  (``pip install --dry-run --python-version``) and check that pip installs exactly the pinned versions,
  with nothing left to chance: a package the pins forgot would show up unpinned.

pip downloads a wheel to read its dependencies where the index serves no separate metadata file, so a
real torch (plus the CUDA wheels it pulls) would cost gigabytes per run. torch is therefore a tiny
stand-in wheel at the lowest version the torch line admits: every pinned package must accept it.

The pins themselves come from scripts/refresh_pins.py; tests/test_pinned_pythons.py installs them for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from cookiecutter.main import cookiecutter
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from pins_for_python import active_lines, pinned_for  # noqa: E402

pytestmark = pytest.mark.timeout(1800)  # the first test waits for every dry run, 18 of them
PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
# The stacks whose every line a page or engine on this machine can run; lmdeploy and vllm need CUDA.
STACKS = ("native", "remote-code", "openai")
GPU_STACKS = ("lmdeploy", "vllm")
# llama-cpp-python exists as an sdist only: pip would build it to resolve; its pins are checked as lines.
BUILT_STACKS = ("llamacpp",)
INDEX = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
STUB = "xlabstub"  # local version label of the stand-in torch wheels
APP_PACKAGES = {"transformers", "accelerate", "safetensors", "sentencepiece", "protobuf", "packaging", "gradio",
                "huggingface-hub", "tokenizers", "numpy", "pydantic", "fastapi"}
PAGE_PACKAGES = {"gradio", "gradio-client", "huggingface-hub", "pydantic", "fastapi", "starlette", "uvicorn", "httpx"}


def minor(python: str) -> int:
    return int(python.split(".")[1])


def active_requirements(text: str, python: str) -> Dict[str, Requirement]:
    """The requirement lines whose markers hold on this Python, by package name; a name twice is an error."""
    chosen: Dict[str, Requirement] = {}
    for requirement in active_lines(text, python):
        name = canonicalize_name(requirement.name)
        assert name not in chosen, f"{name} has two lines for Python {python}: {chosen[name]} and {requirement}"
        chosen[name] = requirement
    return chosen


def exact(requirement: Requirement) -> Version:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} is not pinned exactly"
    return Version(specifier.version)


def torch_floor(chosen: Dict[str, Requirement]) -> Optional[str]:
    """The lowest torch the torch line admits, or None where the stack installs no torch of its own."""
    if "torch" not in chosen:
        return None
    (specifier,) = chosen["torch"].specifier
    assert specifier.operator == ">=", f"{chosen['torch']}: torch gets a lower bound only"
    return str(Version(specifier.version))


@pytest.fixture(scope="session")
def registry() -> str:
    try:
        urllib.request.urlopen(f"{INDEX}/pip/", timeout=60).read()
    except (OSError, urllib.error.URLError) as error:
        pytest.fail(f"the package registry {INDEX} cannot be reached ({error}); these tests prove that the generated"
                    " requirements.txt resolves on every Python and need it (set PIP_INDEX_URL for a mirror)",
                    pytrace=False)
    return INDEX


# ---------------------------------------------------------------- rendering and resolving


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The default app (every platform) for each stack."""
    answers = {"native": {"loader": "native"}, "remote-code": {"loader": "remote-code"},
               "openai": {"engine": "openai", "engine_url": "http://10.0.0.5:23333/v1", "engine_model": "m"},
               "lmdeploy": {"engine": "lmdeploy", "hardware": "a10-24gb"},
               "vllm": {"engine": "vllm", "hardware": "a10-24gb"},
               "llamacpp": {"engine": "llamacpp", "hardware": "cpu"}}
    folders = {}
    for stack, extra in answers.items():
        out = tmp_path_factory.mktemp(f"requirements-{stack}")
        folder = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(out),
                                   extra_context={**extra, "validate_model_repo": False}))
        settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
        assert all(settings[key] == value for key, value in extra.items() if key in settings), settings
        folders[stack] = folder
    return folders


def requirements_text(folder: Path) -> str:
    return (folder / "requirements.txt").read_text(encoding="utf-8")


def stub_torch(folder: Path, version: str) -> Path:
    """A dependency-free wheel named torch, version ``<version>+xlabstub``: pip reads it instead of 3 GB."""
    full = f"{version}+{STUB}"
    wheel = folder / f"torch-{full}-py3-none-any.whl"
    if not wheel.exists():
        info = f"torch-{full}.dist-info"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("torch/__init__.py", "")
            archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {full}\n")
            archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: xlab-tests\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
            archive.writestr(f"{info}/RECORD", "")
    return wheel


# pip install judges wheel tags and the index's Requires-Python by --python-version, but environment markers and
# the Requires-Python inside a wheel's metadata by the Python it runs on (pip download passes the target to its
# resolver; pip install does not). This runs pip with both seen from the target Python.
PIP_FOR_PYTHON = """
import sys
from pip._vendor.packaging import markers
from pip._internal.cli import req_command
python = sys.argv.pop(1)
host = markers.default_environment
markers.default_environment = lambda: dict(host(), python_version=python, python_full_version=python + ".0",
                                           implementation_version=python + ".0")
make_resolver = req_command.RequirementCommand.make_resolver
def make_resolver_for_target(*args, **kwargs):
    kwargs["py_version_info"] = tuple(int(part) for part in python.split("."))
    return make_resolver(*args, **kwargs)
req_command.RequirementCommand.make_resolver = staticmethod(make_resolver_for_target)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def pip_environment() -> Dict[str, str]:
    """This machine's pip settings (extra indexes, find-links, constraints) left out: only INDEX counts."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_DEFAULT_TIMEOUT="60")
    return env


def dry_run(work: Path, requirements: str, python: str, torch_version: Optional[str], pins: Tuple[str, ...] = ()
            ) -> dict:
    """pip's resolution of requirements.txt for that Python, torch being the stand-in in work's parent folder:
    pip's --report, or an AssertionError with pip's words."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "requirements.txt").write_text(requirements, encoding="utf-8")
    constraints = ((f"torch=={torch_version}+{STUB}",) if torch_version else ()) + pins
    (work / "constraints.txt").write_text("\n".join(constraints) + "\n")
    report = work / "report.json"
    command = [sys.executable, "-c", PIP_FOR_PYTHON, python, "install", "--dry-run", "--quiet", "--ignore-installed",
               "--python-version", python, "--only-binary=:all:", "--target", str(work / "target"),
               "--index-url", INDEX, "--find-links", str(work.parent), "--cache-dir", str(work.parent / "cache"),
               "--report", str(report), "-c", str(work / "constraints.txt"), "-r", str(work / "requirements.txt")]
    result = subprocess.run(command, capture_output=True, text=True, env=pip_environment(), timeout=280)
    if result.returncode != 0 or not report.is_file():
        raise AssertionError(f"pip could not resolve requirements.txt for Python {python} (pins {pins}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(report.read_text(encoding="utf-8"))


def front_matter(readme: Path) -> dict:
    import yaml  # PyYAML comes with gradio and transformers

    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def platform_cases(rendered: Dict[str, Path]) -> Dict[Tuple[str, str], Tuple[str, str, Tuple[str, ...]]]:
    """(platform, stack) -> (Python, preinstalled torch, pins) that the Hugging Face and ModelScope files promise."""
    cases = {}
    for stack in STACKS:
        folder = rendered[stack]
        space = front_matter(folder / "README.md")
        cases[("huggingface", stack)] = (str(space["python_version"]), "", (f"gradio=={space['sdk_version']}",))
        studio = json.loads((folder / "ms_deploy.json").read_text(encoding="utf-8"))
        image = re.fullmatch(r"ubuntu[\d.]+-py3(\d+)-torch([\d.]+)-modelscope[\d.]+", studio["base_image"])
        assert image, studio["base_image"]
        cases[("modelscope", stack)] = (f"3.{image[1]}", image[2], (f"gradio=={studio['sdk_version']}",))
    return cases


@pytest.fixture(scope="session")
def resolutions(rendered: Dict[str, Path], registry: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every dry run, two at a time (pip is CPU-bound here): (python or platform, stack) -> report or error.

    Python 3.11 is the Space's and the studio's Python, so its run takes the studio's preinstalled torch and
    serves both platforms; the other Pythons take the lowest torch their line admits."""
    base = tmp_path_factory.mktemp("dry-run")
    cases = platform_cases(rendered)
    jobs, aliases = {}, {}
    for python in PYTHONS:
        for stack in STACKS:
            floor = torch_floor(active_requirements(requirements_text(rendered[stack]), python))
            jobs[(python, stack)] = (python, floor, ())
    for key, (python, torch_version, pins) in cases.items():
        same = (python, key[1])
        aliases[key] = same
        floor = jobs[same][1]
        jobs[same] = (python, (torch_version or floor) if floor else None, tuple(sorted(set(jobs[same][2] + pins))))
    for _, torch_version, _ in jobs.values():
        if torch_version:
            stub_torch(base, torch_version)  # before the pool: pip must never read a half-written stand-in

    def run(key: Tuple[str, str]) -> object:
        python, torch_version, pins = jobs[key]
        try:
            return dry_run(base / "-".join(key), requirements_text(rendered[key[1]]), python, torch_version, pins)
        except (AssertionError, subprocess.TimeoutExpired) as error:
            return error

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    return {**results, **{key: results[same] for key, same in aliases.items()}}


def installed(report: object) -> Dict[str, Tuple[Version, dict]]:
    if isinstance(report, BaseException):
        raise report
    return {canonicalize_name(item["metadata"]["name"]): (Version(item["metadata"]["version"]), item["metadata"])
            for item in report["install"]}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("stack", STACKS + GPU_STACKS + BUILT_STACKS)
def test_every_line_is_an_exact_pin_but_torch(rendered: Dict[str, Path], stack: str) -> None:
    """The lines a rebuild reads: `==` everywhere, torch's lower bounds aside, and no Jinja left."""
    text = requirements_text(rendered[stack])
    assert "{{" not in text and "{%" not in text
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    assert len(requirements) > 20, "the pins hold every package the app installs, not only the direct ones"
    for requirement in requirements:
        if requirement.name == "torch":
            assert all(spec.operator == ">=" for spec in requirement.specifier), requirement
        else:
            exact(requirement)
    if stack in GPU_STACKS:
        engine = next(requirement for requirement in requirements if requirement.name == stack)
        assert 'sys_platform == "linux"' in str(engine.marker) and 'platform_machine == "x86_64"' in str(engine.marker)
        assert not any(requirement.name == "torch" for requirement in requirements), "the engine brings its torch"
    if stack == "openai":
        assert not {"torch", "transformers"} & {requirement.name for requirement in requirements}
    if stack in BUILT_STACKS:  # the GGUF conversion and the server need no torch
        names = {requirement.name for requirement in requirements}
        assert {"llama-cpp-python", "gguf", "gradio"} <= names and "torch" not in names
        packages = (rendered[stack] / "packages.txt").read_text(encoding="utf-8").split()
        assert "build-essential" in packages, "pip builds llama-cpp-python from source: a C++ compiler is needed"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("python", PYTHONS)
def test_markers_leave_one_pin_per_package(rendered: Dict[str, Path], python: str, stack: str) -> None:
    """Each Python gets one exact version of each package, within the windows the app is known to work in."""
    chosen = active_requirements(requirements_text(rendered[stack]), python)
    pins = {name: exact(requirement) for name, requirement in chosen.items() if name != "torch"}
    expected = PAGE_PACKAGES | (APP_PACKAGES if stack != "openai" else set())
    assert expected <= set(pins), f"unpinned on Python {python}: {sorted(expected - set(pins))}"
    if minor(python) < 10:  # gradio 4.44 installs today only with these below their 2024 breaking releases
        assert (pins["gradio"].major, pins["gradio"].minor) == (4, 44)
        assert pins["huggingface-hub"] < Version("1.0") and pins["pydantic"] < Version("2.11")
        assert pins["fastapi"] < Version("0.116")
    else:
        assert pins["gradio"] >= Version("5.47.2")
    if stack == "remote-code":  # the window InternLM2's remote code runs in
        assert Version("4.38") <= pins["transformers"] < Version("4.49") and pins["huggingface-hub"] < Version("1.0")
        assert "einops" in pins  # what InternLM2's modeling file imports
    if stack == "native" and minor(python) >= 10:
        assert pins["transformers"] >= Version("5.0")
    if stack != "openai":
        assert torch_floor(chosen), "the transformers engine keeps the platform's torch through a lower bound"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("python", PYTHONS)
def test_pip_installs_exactly_the_pins(rendered: Dict[str, Path], resolutions: dict, python: str,
                                       stack: str) -> None:
    """pip, resolving for that Python, installs the pinned version of every package and no unpinned one."""
    got = installed(resolutions[(python, stack)])
    for name, (version, metadata) in got.items():
        requires = metadata.get("requires_python")
        assert not requires or SpecifierSet(requires).contains(python), f"{name} {version} needs Python {requires}"
    pins = pinned_for(requirements_text(rendered[stack]), python)
    versions = {name: version for name, (version, _) in got.items() if name != "torch"}
    assert versions == {name: Version(version) for name, version in pins.items()}
    # No second torch: only the stand-in, and none of the CUDA wheels a torch from PyPI would pull.
    if stack == "openai":
        assert "torch" not in got
    else:
        assert got["torch"][0].local == STUB
    assert not [name for name in got if name.startswith("nvidia-") or name == "triton"]


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("platform", ["huggingface", "modelscope"])
def test_platform_gradio_and_python_resolve(rendered: Dict[str, Path], resolutions: dict, platform: str,
                                            stack: str) -> None:
    """The Space's sdk_version and python_version, and the studio's gradio, Python and preinstalled torch, all fit
    requirements.txt: the platform installs that gradio beside it and keeps that torch."""
    python, torch_version, pins = platform_cases(rendered)[(platform, stack)]
    got = installed(resolutions[(platform, stack)])
    assert got["gradio"][0] == Version(pins[0].split("==")[1])
    assert got["gradio"][0] == Version(pinned_for(requirements_text(rendered[stack]), python)["gradio"])
    torch = active_requirements(requirements_text(rendered[stack]), python).get("torch")
    if torch_version and torch is not None:
        assert torch.specifier.contains(torch_version), f"{torch} would replace the image's torch {torch_version}"
        assert got["torch"][0].public == torch_version


def test_the_suite_reads_no_newest_release() -> None:
    """A registry's new release must not turn the suite red: no test compares against what it lists today."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\.newest\(", r"releases\[-1\]", r"pip index versions", r"/json\b.*pypi"):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert not offenders
