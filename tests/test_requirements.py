"""The generated requirements.txt installs on every Python from 3.8 to 3.13, for both loaders.

These tests ask the package registry (PyPI, or PIP_INDEX_URL) about the releases it offers today;
they fail, never skip, when it cannot be reached. For each Python and loader they

- evaluate the environment markers with ``packaging`` and check one line per package is left;
- check every remaining line against the releases whose wheels and Requires-Python fit that Python;
- let pip resolve the whole file for that Python (``pip install --dry-run --python-version``).

pip downloads a wheel to read its dependencies where the index serves no separate metadata file, so a
real torch (plus the CUDA wheels it pulls) would cost gigabytes per run. torch is therefore resolved as a
tiny stand-in wheel with the version of the newest torch that the registry offers for that Python: the
markers must admit it, and everything else resolves against it as it would against a preinstalled torch.
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
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from cookiecutter.main import cookiecutter
from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
LOADERS = ("native", "remote-code")
INDEX = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
STUB = "xlabstub"  # local version label of the stand-in torch wheels
COMMON = {"torch", "transformers", "accelerate", "safetensors", "sentencepiece", "protobuf", "packaging", "gradio"}
# Lines that cap a package below its newest release on purpose (see the comments in requirements.txt).
CAPPED = {("native", "huggingface-hub"), ("native", "pydantic"), ("remote-code", "huggingface-hub"),
          ("remote-code", "pydantic"), ("remote-code", "transformers")}


def minor(python: str) -> int:
    return int(python.split(".")[1])


def marker_environment(python: str) -> Dict[str, str]:
    """What pip assumes for ``--python-version X`` on this (Linux) machine."""
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


def active_requirements(text: str, python: str) -> Dict[str, Requirement]:
    """The requirement lines whose markers hold on this Python, by package name; a name twice is an error."""
    chosen: Dict[str, Requirement] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(marker_environment(python)):
            continue
        name = canonicalize_name(requirement.name)
        assert name not in chosen, f"{name} has two lines for Python {python}: {chosen[name]} and {requirement}"
        chosen[name] = requirement
    return chosen


# ---------------------------------------------------------------- the registry


class _Links(HTMLParser):
    """File names and data-requires-python of a PEP 503 HTML project page."""

    def __init__(self) -> None:
        super().__init__()
        self.files: List[dict] = []
        self._attributes: Optional[dict] = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a":
            self._attributes = dict(attrs)

    def handle_data(self, data: str) -> None:
        if self._attributes is not None and data.strip():
            requires = self._attributes.get("data-requires-python")
            self.files.append({"filename": data.strip(), "requires-python": requires,
                               "yanked": "data-yanked" in self._attributes})

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._attributes = None


class Registry:
    """Which releases of a project have a wheel that installs on a given Python (Linux x86_64, CPython)."""

    def __init__(self, index: str) -> None:
        self.index = index
        self._files: Dict[str, List[dict]] = {}

    def files(self, project: str) -> List[dict]:
        name = canonicalize_name(project)
        if name not in self._files:
            request = urllib.request.Request(f"{self.index}/{name}/", headers={
                "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read().decode("utf-8")
                if "json" in response.headers.get("Content-Type", ""):
                    self._files[name] = json.loads(body)["files"]
                else:
                    parser = _Links()
                    parser.feed(body)
                    self._files[name] = parser.files
        return self._files[name]

    def releases(self, project: str, python: str) -> List[Version]:
        """Final releases with a wheel for this Python whose Requires-Python admits it, oldest first."""
        supported = set(tags.cpython_tags((3, minor(python)), platforms=list(tags.platform_tags())))
        supported |= set(tags.compatible_tags((3, minor(python)), platforms=list(tags.platform_tags())))
        found = set()
        for entry in self.files(project):
            filename = entry["filename"]
            if not filename.endswith(".whl") or entry.get("yanked"):
                continue
            try:
                _, version, _, wheel_tags = parse_wheel_filename(filename)
            except (InvalidVersion, ValueError):
                continue
            requires = entry.get("requires-python")
            if version.is_prerelease or version.is_devrelease or not wheel_tags & supported:
                continue
            try:
                if requires and not SpecifierSet(requires).contains(python):
                    continue
            except ValueError:  # an unparsable Requires-Python: pip ignores it too
                pass
            found.add(version)
        return sorted(found)

    def newest(self, project: str, python: str) -> Version:
        releases = self.releases(project, python)
        assert releases, f"the registry offers no {project} wheel for Python {python}"
        return releases[-1]


@pytest.fixture(scope="session")
def registry() -> Registry:
    try:
        urllib.request.urlopen(f"{INDEX}/pip/", timeout=60).read()
    except (OSError, urllib.error.URLError) as error:
        pytest.fail(f"the package registry {INDEX} cannot be reached ({error}); these tests prove that the generated"
                    " requirements.txt resolves on every Python and need it (set PIP_INDEX_URL for a mirror)",
                    pytrace=False)
    return Registry(INDEX)


# ---------------------------------------------------------------- rendering and resolving


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The default app (every platform) for each loader."""
    folders = {}
    for loader in LOADERS:
        out = tmp_path_factory.mktemp(f"requirements-{loader}")
        folder = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(out),
                                   extra_context={"loader": loader, "validate_model_repo": False}))
        assert json.loads((folder / "settings.json").read_text(encoding="utf-8"))["loader"] == loader
        folders[loader] = folder
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


def dry_run(work: Path, requirements: str, python: str, torch_version: str, pins: Tuple[str, ...] = ()) -> dict:
    """pip's resolution of requirements.txt for that Python, torch being the stand-in in work's parent folder:
    pip's --report, or an AssertionError with pip's words."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "requirements.txt").write_text(requirements, encoding="utf-8")
    (work / "constraints.txt").write_text("\n".join((f"torch=={torch_version}+{STUB}",) + pins) + "\n")
    report = work / "report.json"
    command = [sys.executable, "-c", PIP_FOR_PYTHON, python, "install", "--dry-run", "--quiet", "--ignore-installed",
               "--python-version", python, "--only-binary=:all:", "--target", str(work / "target"),
               "--index-url", INDEX, "--find-links", str(work.parent), "--cache-dir", str(work / "cache"),
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
    """(platform, loader) -> (Python, torch, pins) that the Hugging Face and ModelScope files promise."""
    cases = {}
    for loader, folder in rendered.items():
        space = front_matter(folder / "README.md")
        cases[("huggingface", loader)] = (str(space["python_version"]), "", (f"gradio=={space['sdk_version']}",))
        studio = json.loads((folder / "ms_deploy.json").read_text(encoding="utf-8"))
        image = re.fullmatch(r"ubuntu[\d.]+-py3(\d+)-torch([\d.]+)-modelscope[\d.]+", studio["base_image"])
        assert image, studio["base_image"]
        cases[("modelscope", loader)] = (f"3.{image[1]}", image[2], (f"gradio=={studio['sdk_version']}",))
    return cases


@pytest.fixture(scope="session")
def resolutions(rendered: Dict[str, Path], registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every dry run at once (they wait on the network): (python or platform, loader) -> report or error."""
    base = tmp_path_factory.mktemp("dry-run")
    jobs = {}
    for python in PYTHONS:
        for loader in LOADERS:
            jobs[(python, loader)] = (python, str(registry.newest("torch", python)), ())
    aliases = {}
    for key, (python, torch_version, pins) in platform_cases(rendered).items():
        if not torch_version and (python, key[1]) in jobs:  # the Space: its Python's own run takes its gradio pin
            aliases[key] = (python, key[1])
            jobs[aliases[key]] = jobs[aliases[key]][:2] + (jobs[aliases[key]][2] + pins,)
        else:
            jobs[key] = (python, torch_version or str(registry.newest("torch", python)), pins)
    for _, torch_version, _ in jobs.values():
        stub_torch(base, torch_version)  # before the pool: pip must never read a half-written stand-in

    def run(key: Tuple[str, str]) -> object:
        python, torch_version, pins = jobs[key]
        try:
            return dry_run(base / "-".join(key), requirements_text(rendered[key[1]]), python, torch_version, pins)
        except (AssertionError, subprocess.TimeoutExpired) as error:
            return error

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    return {**results, **{key: results[same] for key, same in aliases.items()}}


def installed(report: object) -> Dict[str, Tuple[Version, dict]]:
    if isinstance(report, BaseException):
        raise report
    return {canonicalize_name(item["metadata"]["name"]): (Version(item["metadata"]["version"]), item["metadata"])
            for item in report["install"]}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("python", PYTHONS)
def test_markers_leave_one_line_per_package(rendered: Dict[str, Path], python: str, loader: str) -> None:
    chosen = active_requirements(requirements_text(rendered[loader]), python)
    expected = set(COMMON)
    if minor(python) < 10:
        expected |= {"huggingface-hub", "pydantic"}
    if loader == "remote-code":
        expected |= {"huggingface-hub", "einops"}  # einops: what InternLM2's modeling file imports
    assert set(chosen) == expected
    assert all(spec.operator == ">=" for spec in chosen["torch"].specifier), "torch gets lower bounds only"
    gradio = chosen["gradio"].specifier
    if minor(python) < 10:
        assert gradio.contains("4.44.1") and not gradio.contains("5.0.0")
        assert not chosen["huggingface-hub"].specifier.contains("1.0.0")
        assert not chosen["pydantic"].specifier.contains("2.11.0")
    else:
        assert gradio.contains("6.0.0") and gradio.contains("5.49.1") and not gradio.contains("4.44.1")
    transformers = chosen["transformers"].specifier
    if loader == "remote-code":
        assert transformers.contains("4.38.0") and transformers.contains("4.48.3") and transformers.contains("4.46.3")
        assert not transformers.contains("4.49.0") and not transformers.contains("4.37.2")
        assert not chosen["huggingface-hub"].specifier.contains("1.0.0")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("python", PYTHONS)
def test_every_line_has_a_release_for_that_python(rendered: Dict[str, Path], registry: Registry, python: str,
                                                  loader: str) -> None:
    """A release that fits each line exists as a wheel whose Requires-Python admits this Python; the newest such
    release fits too, unless the line caps it on purpose (the markers mirror what the registry offers)."""
    for name, requirement in active_requirements(requirements_text(rendered[loader]), python).items():
        releases = registry.releases(name, python)
        fitting = [version for version in releases if requirement.specifier.contains(version)]
        assert fitting, f"{requirement} (Python {python}): the registry's wheels for it stop at {releases[-3:]}"
        if (loader, name) not in CAPPED:
            assert requirement.specifier.contains(releases[-1]), \
                f"{requirement} (Python {python}) leaves out {name} {releases[-1]}, the newest for that Python"


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("python", PYTHONS)
def test_pip_resolves_requirements(rendered: Dict[str, Path], registry: Registry, resolutions: dict, python: str,
                                   loader: str) -> None:
    got = installed(resolutions[(python, loader)])
    for name, (version, metadata) in got.items():
        requires = metadata.get("requires_python")
        assert not requires or SpecifierSet(requires).contains(python), f"{name} {version} needs Python {requires}"
    for name, requirement in active_requirements(requirements_text(rendered[loader]), python).items():
        assert name in got, f"{name} was not resolved"
        assert requirement.specifier.contains(got[name][0], prereleases=True), (requirement, got[name][0])
    # No second torch: only the stand-in, and none of the CUDA wheels a torch from PyPI would pull.
    assert got["torch"][0].local == STUB
    assert not [name for name in got if name.startswith("nvidia-") or name == "triton"]
    gradio, transformers = got["gradio"][0], got["transformers"][0]
    if minor(python) < 10:
        assert (gradio.major, gradio.minor) == (4, 44)
        assert got["huggingface-hub"][0] < Version("1.0") and got["pydantic"][0] < Version("2.11")
    else:
        assert gradio.major == 6
    if loader == "remote-code":
        assert Version("4.38") <= transformers < Version("4.49")
    else:
        assert transformers == registry.newest("transformers", python), "native gets the newest transformers"


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("platform", ["huggingface", "modelscope"])
def test_platform_gradio_and_python_resolve(rendered: Dict[str, Path], resolutions: dict, platform: str,
                                            loader: str) -> None:
    """The Space's sdk_version and python_version, and the studio's gradio, Python and preinstalled torch, all fit
    requirements.txt: the platform installs that gradio beside it and keeps that torch."""
    python, torch_version, pins = platform_cases(rendered)[(platform, loader)]
    got = installed(resolutions[(platform, loader)])
    assert got["gradio"][0] == Version(pins[0].split("==")[1])
    torch = active_requirements(requirements_text(rendered[loader]), python)["torch"]
    if torch_version:
        assert torch.specifier.contains(torch_version), f"{torch} would replace the image's torch {torch_version}"


@pytest.mark.parametrize("engine", ["lmdeploy", "vllm", "openai"])
def test_server_engines_install_no_torch_of_their_own_and_gpu_engines_only_on_linux(tmp_path: Path, engine: str):
    """engine=openai's page needs gradio only; lmdeploy/vllm bring their own torch, on Linux x86_64 only."""
    folder = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(tmp_path), extra_context={
        "engine": engine, "engine_url": "http://10.0.0.5:23333/v1", "engine_model": "m", "hardware": "a10-24gb",
        "validate_model_repo": False}))
    chosen = active_requirements(requirements_text(folder), "3.11")
    expected = {"gradio"} | ({engine} if engine != "openai" else set())
    assert set(chosen) == expected
    text = requirements_text(folder)
    if engine != "openai":
        line = next(line for line in text.splitlines() if line.startswith(engine))
        assert 'sys_platform == "linux" and platform_machine == "x86_64"' in line
