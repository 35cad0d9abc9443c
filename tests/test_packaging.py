"""Shipped recipes, suites and manifests by name; the wheel carries them and works outside the checkout."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import one_error_line  # tests/ is on sys.path under pytest
from PIL import Image

from medclip import __version__, resources
from medclip.data.manifest import load_manifest
from medclip.errors import MedclipError
from medclip.evaluation.suites import load_suite
from medclip.training.config import load_recipe

REPO = Path(__file__).resolve().parent.parent


def test_shipped_files_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resources.resolve("recipes", "demo") == REPO / "pretrain" / "demo.yaml"
    for spelled in ("demo", "demo.yaml", "pretrain/demo.yaml"):
        assert load_recipe(spelled).model.name == "medclip-tiny"
    assert load_suite("unimed21").name == "unimed21" and load_suite("zero_shot/demo.yaml").name == "demo"
    for spelled in ("unimed-chexpert", "datasets_manifests/unimed-chexpert.yaml"):
        manifest = load_manifest(spelled, root=tmp_path)
        assert manifest.name == "unimed-chexpert" and manifest.urls[0] == f"{tmp_path}/chexpert/chexpert-000000.tar"
    assert set(resources.shipped("manifests")) >= {"demo", "medconcept-23m", "unimed-chexpert"}
    assert resources.shipped("recipes")["shared_real"] == REPO / "pretrain" / "shared_real.yaml"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "demo.yaml").write_text("model: {name: medclip-tiny-bert}\ndata: {demo: true}\n")
    assert load_recipe("pretrain/demo.yaml").model.name == "medclip-tiny-bert"  # the local file
    assert load_recipe("demo").model.name == "medclip-tiny"  # a bare name: the shipped recipe


def test_unknown_names_are_one_line_listing_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MedclipError) as err:
        load_recipe("dmeo")
    assert str(err.value) == ("unknown recipe 'dmeo' (not a file, nor a shipped recipe; shipped: demo, "
                              "finetune_full, finetune_lit, finetune_lora, medconcept_siglip, shared_real, "
                              "unimed_vitb16; `medclip list recipes` shows them)")
    with pytest.raises(MedclipError, match=r"^recipe not found: runs/x.yaml \(not a file"):
        load_recipe("runs/x.yaml")
    with pytest.raises(MedclipError, match="^unknown manifest 'unimed-chexpret'"):
        load_manifest("unimed-chexpret")


def test_a_shipped_manifest_needs_a_data_root(monkeypatch):
    monkeypatch.delenv("MEDCLIP_DATA_ROOT", raising=False)
    with pytest.raises(MedclipError, match="manifest unimed-chexpert needs the data root: pass --root DIR"):
        load_manifest("unimed-chexpert")
    monkeypatch.setenv("MEDCLIP_DATA_ROOT", "/data/unimed")
    assert load_manifest("unimed-chexpert").urls[0] == "/data/unimed/chexpert/chexpert-000000.tar"


def test_set_takes_text_yaml_cannot_parse_as_a_string():
    """The demo recipe's own eval.root value, given on the command line as the README does."""
    recipe = load_recipe("demo", ["eval.root={output_dir}/demo_data", "run.steps=7"])
    assert recipe.eval.root == "{output_dir}/demo_data" and recipe.run.steps == 7


# ------------------------------------------------------------------ the built wheel

# What a build reads, copied so that the checkout gets no build/ folder (whose stale files would leak).
BUILD_INPUTS = ["medclip", "pretrain", "zero_shot", "datasets_manifests", "docs", "setup.py", "setup.cfg",
                "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, source / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("medclip_torch-*.whl")
    return built


@pytest.mark.integration
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "medclip").rglob("*.py")}
    assert sources <= names, sorted(sources - names)  # every module, including new subpackages
    shipped = {f"medclip/recipes/{p.name}" for p in (REPO / "pretrain").iterdir()}
    shipped |= {f"medclip/suites/{p.name}" for p in (REPO / "zero_shot").glob("*.yaml")}
    shipped |= {f"medclip/manifests/{p.name}" for p in (REPO / "datasets_manifests").glob("*.yaml")}
    shipped |= {f"medclip/model_configs/{p.name}" for p in (REPO / "medclip" / "model_configs").glob("*.json")}
    shipped |= {"medclip/py.typed", "medclip/assets/tiny-bert/vocab.txt"}
    assert shipped <= names, sorted(shipped - names)
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    assert "Name: medclip-torch" in metadata and "Project-URL: Source, " in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # the package index page: pip-user instructions, no make targets, no relative images
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["long_description"] == "file: docs/pypi.md"
    description = metadata.split("\n\n", 1)[1]
    assert "pip install medclip-torch" in description and "make " not in description and "](docs/" not in description


@pytest.mark.integration
def test_wheel_works_outside_the_checkout(wheel, tmp_path):
    """The wheel alone (no checkout on the path), from an empty directory: names resolve, a run trains."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MEDCLIP_DATA_ROOT", None)

    def medclip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medclip", *args], capture_output=True, text=True, cwd=work,
                              env=env, timeout=900)

    version = medclip("--version")
    assert version.returncode == 0 and version.stdout == f"medclip {__version__}\n"
    listing = medclip("list", "recipes", "suites", "manifests", "--paths")
    assert listing.returncode == 0, listing.stderr
    assert f"{site}/medclip/recipes/demo.yaml" in listing.stdout
    assert f"{site}/medclip/suites/unimed21.yaml" in listing.stdout
    check = medclip("data", "check", "unimed-chexpert", "--root", str(work))
    assert check.returncode == 1 and f"FAIL unimed-chexpert: missing shard {work}/chexpert/chexpert-000000.tar" \
        in check.stdout
    suite = medclip("eval", "suite", "unimed21", "--model", "medclip-tiny", "--datasets", "chexpert")  # no model load
    assert suite.returncode == 2
    assert one_error_line(suite.stderr).startswith("medclip: error: suite unimed21 has no dataset chexpert; it has "
                                                   "chexpert-5x200, rsna_pneumonia")
    run = medclip("pretrain", "--config", "demo", "--set", "run.steps=2", "--set", "run.output_dir=runs/demo",
                  "--set", "data.demo_train_samples=128", "--set", "data.demo_val_samples=48",
                  "--set", "data.batch_size=16", "--set", "eval.every_steps=0")
    assert run.returncode == 0, run.stderr
    assert "demo/demo_modality/acc1: " in run.stdout and "exported open_clip hub-format model: runs/demo/export" \
        in run.stdout
    assert (work / "runs" / "demo" / "export" / "open_clip_config.json").is_file()
    assert "Traceback" not in run.stderr
    # README's evaluation of that run, as written; its log (not a terminal) gets no redrawn bars
    suite = medclip("eval", "suite", "demo", "--model", "runs/demo/export", "--root", "runs/demo/demo_data")
    assert suite.returncode == 0, suite.stderr
    assert "runs/demo/export  demo_modality  acc1=" in suite.stdout and "(n=48, skipped=0)" in suite.stdout
    assert (work / "eval_results" / "summary.md").is_file() and "\r" not in suite.stderr


# The core install: setup.cfg's install_requires, nothing of the `train` extra.
CORE_REQUIRES = {"torch", "torchvision", "open-clip-torch", "timm", "transformers", "tokenizers", "scikit-learn",
                 "safetensors", "pyyaml", "tqdm", "pillow", "numpy"}
TRAIN_EXTRA = {"webdataset", "braceexpand", "matplotlib", "pyahocorasick", "imagehash", "peft"}
# Run first in each process: the train extra's modules cannot be imported, as in a core-only install.
WITHOUT_TRAIN_EXTRA = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"webdataset", "braceexpand", "matplotlib", "ahocorasick", "imagehash", "peft"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""
CORE_API = WITHOUT_TRAIN_EXTRA + """
import json, warnings
import medclip
from PIL import Image
warnings.simplefilter("ignore", medclip.RandomWeightsWarning)
encoder = medclip.load("medclip-tiny", device="cpu")
images = [Image.new("RGB", (80, 70), colour) for colour in ("red", "blue", "gray")]
similarity = encoder.encode_image(images) @ encoder.encode_text(["a red image", "a blue image"]).T
print(json.dumps({"medclip": medclip.__file__, "similarity": list(similarity.shape)}))
"""
CORE_CLI = WITHOUT_TRAIN_EXTRA + "from medclip.cli import main\nsys.exit(main(sys.argv[1:]))"


def _requires(wheel: Path) -> dict[str | None, set[str]]:
    """{extra (None for the core): distribution names} from the wheel's Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires: dict[str | None, set[str]] = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist: "):
            spec, _, marker = line[len("Requires-Dist: "):].partition(";")
            extra = re.search(r"extra == \"([^\"]+)\"", marker)
            name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0).lower().replace("_", "-")
            requires.setdefault(extra.group(1) if extra else None, set()).add(name)
    return requires


def test_a_missing_train_extra_is_one_line_naming_it(monkeypatch):
    from medclip.data.manifest import expand_urls

    assert expand_urls("s-{0..1}.tar", "") == ["s-0.tar", "s-1.tar"]
    monkeypatch.setitem(sys.modules, "braceexpand", None)  # what `import braceexpand` meets when not installed
    with pytest.raises(MedclipError) as err:
        expand_urls("s-{0..1}.tar", "")
    assert str(err.value) == ("expanding shard URL patterns needs braceexpand, which is not installed: "
                              "pip install 'medclip-torch[train]'")


def test_lora_without_peft_is_one_line_naming_the_extra(monkeypatch):
    import torch

    from medclip.training.config import LoraConfig
    from medclip.training.lora import add_adapters

    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets when not installed
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(MedclipError) as err:
        add_adapters(model, LoraConfig(rank=2))
    assert str(err.value) == ("LoRA fine-tuning (model.lora) needs peft, which is not installed: "
                              "pip install 'medclip-torch[train]'")


@pytest.mark.integration
def test_core_wheel_without_the_train_extra_loads_embeds_and_zero_shots(wheel, tmp_path):
    """The core wheel's dependencies, then the wheel alone (no checkout on the path) with the train extra's
    packages made unimportable: load + embed in Python, `medclip eval zero-shot` as the README writes it
    (2 loader workers); what needs the extra ends in one line naming it."""
    requires = _requires(wheel)
    assert requires[None] == CORE_REQUIRES
    assert requires["train"] == TRAIN_EXTRA
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    work = tmp_path / "empty"
    for label, colour in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
        (work / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (70 + i, 64), colour).save(work / "imgs" / label / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": str(site)}

    api = subprocess.run([sys.executable, "-c", CORE_API], capture_output=True, text=True, cwd=work, env=env,
                         timeout=900)
    assert api.returncode == 0, api.stderr
    report = json.loads(api.stdout.strip().splitlines()[-1])
    assert report == {"medclip": str(site / "medclip" / "__init__.py"), "similarity": [3, 2]}

    def medclip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CORE_CLI, *args], capture_output=True, text=True, cwd=work,
                              env=env, timeout=900)

    zero_shot = ["eval", "zero-shot", "--model", "medclip-tiny", "--reader", "image_folder", "--data", "imgs",
                 "--classes", "red", "blue", "--template", "a {c} image.", "--workers", "2"]
    run = medclip(*zero_shot, "--no-plots")
    assert run.returncode == 0, run.stderr
    assert "imgs  acc1=" in run.stdout and "(n=6, skipped=0)" in run.stdout
    assert json.loads((work / "eval_results" / "medclip-tiny" / "imgs.json").read_text())["n_samples"] == 6
    extra = "pip install 'medclip-torch[train]'"
    plots = medclip(*zero_shot)
    assert plots.returncode == 2 and "(n=6, skipped=0)" in plots.stdout  # the results first, then the line
    assert one_error_line(plots.stderr) == ("medclip: error: plotting (pass --no-plots to skip it) needs matplotlib, "
                                            f"which is not installed: {extra}")
    train = medclip("pretrain", "--config", "demo", "--set", "run.steps=1")
    assert train.returncode == 2 and one_error_line(train.stderr).endswith(f"is not installed: {extra}")
    check = medclip("data", "check", "unimed-chexpert", "--root", str(work))
    assert check.returncode == 2 and one_error_line(check.stderr).endswith(f"is not installed: {extra}")


# The user guide and the pages it links: every fenced `medclip ...` command in them is checked.
DOC_PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300  # issue 26: the README is a user guide; measured tables and detail go to docs/


def _fenced_shell_lines(text: str) -> list[str]:
    """Lines of the fenced ```bash blocks, continuations joined, comments and `[--optional ...]` dropped."""
    lines, in_block = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            in_block = not in_block and line.strip() == "```bash"
        elif in_block:
            lines.append(re.sub(r" \[--[^\]]*\]", "", line.split(" #")[0]))
    return lines


def _documented_commands(text: str) -> list[list[str]]:
    """`medclip ...` lines of the fenced shell blocks, as argv after `medclip`."""
    return [shlex.split(line)[1:] for line in _fenced_shell_lines(text) if line.startswith("medclip ")]


def test_every_docs_page_is_checked():
    assert {"README.md", "docs/pypi.md", "docs/results.md", "docs/benchmarks.md", "docs/grounding.md"} <= set(DOC_PAGES)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_documented_commands_parse_and_their_names_resolve(page):
    from medclip.cli import build_parser

    commands = _documented_commands((REPO / page).read_text())
    if page in ("README.md", "docs/pypi.md"):
        assert len(commands) >= 5
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # an unknown option or command exits here
        if args.command == "pretrain" and not args.config.endswith(".yaml"):
            resources.resolve("recipes", args.config)
        elif args.command == "eval" and args.eval_command == "suite":
            resources.resolve("suites", args.suite)
        elif args.command == "data" and args.data_command == "check":
            for name in args.manifests:
                resources.resolve("manifests", name)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_documented_make_targets_and_bench_commands_exist(page):
    """`make TARGET` in fenced blocks names a Makefile target; `bench/X.py --opt ...` (fenced, or in inline code
    with or without `python`), the command beside a measured figure, names a script defining each option."""
    text = (REPO / page).read_text()
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for line in _fenced_shell_lines(text):
        if line.startswith("make "):
            assert set(line.split()[1:]) <= targets, (page, line)
    joined = "\n".join(_fenced_shell_lines(text)) + "\n" + text
    for script, rest in re.findall(r"(?:python |`)(bench/\w+\.py)([^`\n]*)", joined):
        assert (REPO / script).is_file(), (page, script)
        defined = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", (REPO / script).read_text()))
        assert set(re.findall(r"(?<!\S)--[\w-]+", rest)) <= defined, (page, script, rest)


def _github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", DOC_PAGES)
def test_relative_links_resolve(page):
    """Every relative link (and #fragment) of the guide's pages points at a file (and heading) that exists."""
    path = REPO / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.is_file(), (page, target)
        if fragment:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert fragment in {_github_anchor(h) for h in headings}, (page, target)


def test_readme_is_a_user_guide_linking_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, \
        "README.md is the user guide: move measured tables and detail to a docs/ page it links"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    assert set(DOC_PAGES) - {"README.md"} <= linked, sorted(set(DOC_PAGES) - {"README.md"} - linked)
    assert "docs/grounding_findings.png" in linked
