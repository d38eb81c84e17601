"""The package's layers import one way: common <- tuner <- unlearning <- baselines / llmeraser / evaluation
<- reporting <- cli; evaluation imports only common; s3t stands alone (that importing peft_mape
replaces nothing in PEFT is tested in test_persistence)."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_mape

PACKAGE = Path(peft_mape.__file__).parent
LAYERS = {"common": 0, "tuner": 1, "unlearning": 2, "baselines": 3, "llmeraser": 3, "trainer": 3, "evaluation": 3, "reporting": 4,
          "cli": 5}
# MAPEModel's unlearn() / unlearn_request() / precompute_retain_statistics() are the user's entry
# points on the PEFT model: they forward, lazily, to the unlearning layer.
ALLOWED_UPWARD = {("tuner/model.py", "unlearning")}


def _imported_layers(path: Path):
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            parts = module.split(".")
            if parts[0] == "peft_mape" and len(parts) > 1:
                yield parts[1]


def test_layers_import_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        layer = rel.parts[0] if len(rel.parts) > 1 else None
        for target in _imported_layers(path):
            if layer == "s3t" and target != "s3t":
                wrong.append(f"{rel} imports {target} (s3t stands alone)")
            elif layer == "evaluation" and target not in ("common", "evaluation"):
                wrong.append(f"{rel} imports {target} (evaluation imports only common)")
            elif layer in LAYERS and target in LAYERS and LAYERS[target] > LAYERS[layer]:
                if (str(rel), target) not in ALLOWED_UPWARD:
                    wrong.append(f"{rel} imports the higher layer {target}")
    assert not wrong, wrong


def test_the_flat_top_level_holds_only_the_public_entry_points():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "methods.py"]


def test_test_and_benchmark_helpers_are_not_in_the_installed_package():
    assert not (PACKAGE / "assets.py").exists() and not (PACKAGE / "profiling.py").exists()
    assert (PACKAGE.parent / "mape_devkit" / "assets.py").exists()
