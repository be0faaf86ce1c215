"""The package's layout by role (`modeling_layalign/__init__.py`): the model's files at the top travel as remote code
and import nothing else; the tools live in subpackages; the tools' old module paths still import, with a warning."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import modeling_layalign


PACKAGE = Path(modeling_layalign.__file__).parent
MODEL_FILES = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py"}
TOOL_PACKAGES = ("training", "evaluation", "conversion")


def test_save_pretrained_copies_exactly_the_model_files_as_remote_code(tiny_layalign_folder):
    # (The folder holds a saved model and its saved processor.)
    folder = Path(tiny_layalign_folder)
    assert {path.name for path in folder.glob("*.py")} == MODEL_FILES
    assert all((folder / name).read_text() == (PACKAGE / name).read_text() for name in MODEL_FILES)


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_the_model_files_import_only_each_other_and_libraries(name):
    for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and f"{node.module}.py" in MODEL_FILES, f"{name} imports {'.' * node.level}{node.module}"
        modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            modules.append(node.module)
        assert not [module for module in modules if module.split(".")[0] in ("modeling_layalign", "layalign_demo")], name


def test_every_tool_lives_in_a_role_subpackage_that_imports_the_model_relatively():
    tools = {path.relative_to(PACKAGE).parts[0] for path in PACKAGE.rglob("*.py") if path.parent != PACKAGE}
    assert tools == set(TOOL_PACKAGES)
    for package in TOOL_PACKAGES:
        assert (PACKAGE / package / "__init__.py").is_file()


@pytest.mark.parametrize(
    "old,new,name",
    [
        ("modeling_layalign.data", "modeling_layalign.training.data", "load_mgsm"),
        ("modeling_layalign.convert", "modeling_layalign.conversion.convert", "convert_reference_checkpoint"),
        ("modeling_layalign.ladder", "modeling_layalign.evaluation.ladder", "answer_ladder"),
        ("modeling_layalign.warm_start", "modeling_layalign.training.warm_start", None),
    ],
)
def test_the_tools_old_module_paths_import_the_moved_modules_with_a_warning(old, new, name):
    for module in (old, new):
        sys.modules.pop(module, None)
    with pytest.warns(FutureWarning, match=f"`{old}` moved to `{new}`"):
        module = __import__(old, fromlist=["_"])
    assert module is sys.modules[new] and module.__name__ == new
    if name is not None:
        assert getattr(module, name) is getattr(sys.modules[new], name)


def test_the_old_scoring_names_import_from_the_evaluation_subpackage_with_a_warning():
    from modeling_layalign.evaluation import scoring

    with pytest.warns(FutureWarning, match="`modeling_layalign.evaluation.layalign_target_loss` moved to"):
        from modeling_layalign.evaluation import layalign_target_loss
    assert layalign_target_loss is scoring.layalign_target_loss
    with warnings.catch_warnings(), pytest.raises(ImportError):
        warnings.simplefilter("error")
        from modeling_layalign.evaluation import no_such_name  # noqa: F401


def test_python_dash_m_on_an_old_path_runs_the_moved_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "modeling_layalign.convert", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: python -m modeling_layalign.conversion.convert" in result.stdout
    assert "run `python -m modeling_layalign.conversion.convert`" in result.stderr


def test_no_package_file_outgrows_one_role_and_the_model_class_stays_readable():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= 450, {name: length for name, length in lengths.items() if length > 450}
    source = (PACKAGE / "modeling_layalign.py").read_text()
    model_class = next(
        node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "LayAlignForCausalLM"
    )
    assert model_class.end_lineno - model_class.lineno + 1 < 300
