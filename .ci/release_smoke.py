"""Smoke test of an installed nestlearn wheel (run by .ci/release-check from outside the tree).

Usage: python release_smoke.py DIST_DIR VENV_DIR
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch

import nestlearn
from nestlearn.data import ByteTokenizer
from nestlearn.models import ModelConfig, build_model, from_pretrained, generate, save_pretrained


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"release smoke test failed: {message}")


def check_archives(dist: Path) -> None:
    wheels = list(dist.glob("nestlearn-*.whl"))
    sdists = list(dist.glob("nestlearn-*.tar.gz"))
    check(len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {dist}")
    version = nestlearn.__version__
    check(wheels[0].name.startswith(f"nestlearn-{version}-"),
          f"wheel {wheels[0].name} does not carry version {version}")
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for required in ("nestlearn/py.typed", "nestlearn/models/MODELS.md",
                     "nestlearn/cli/__init__.py"):
        check(required in names, f"wheel lacks {required}")
    check(not any(name.startswith("tests/") for name in names), "wheel ships tests/")
    with tarfile.open(sdists[0]) as sdist:
        members = {Path(name).relative_to(f"nestlearn-{version}").as_posix()
                   for name in sdist.getnames() if "/" in name}
    for required in ("pyproject.toml", "README.md", "LICENSE", "src/nestlearn/py.typed"):
        check(required in members, f"sdist lacks {required}")


def check_installed(venv: Path) -> None:
    location = Path(nestlearn.__file__).resolve()
    check(venv.resolve() in location.parents, f"nestlearn imported from {location}, not {venv}")
    check((location.parent / "py.typed").is_file(), "installed package lacks py.typed")


def check_model() -> None:
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    config = ModelConfig(arch="hope", vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2,
                         memory={"chunk_size": 8}, cms={"chunk_sizes": (8,)})
    model = build_model(config).eval()
    ids = torch.tensor([tokenizer.encode("release check")])
    logits, _ = model(ids)
    check(logits.shape == (1, ids.shape[1], config.vocab_size), f"logits {tuple(logits.shape)}")
    check(bool(torch.isfinite(logits).all()), "non-finite logits")
    out = generate(model, ids, max_new_tokens=5, temperature=0.0)
    with tempfile.TemporaryDirectory() as folder:
        loaded = from_pretrained(save_pretrained(model, Path(folder) / "model")).eval()
        check(torch.equal(generate(loaded, ids, max_new_tokens=5, temperature=0.0), out),
              "a saved and reloaded model generates differently")


def check_integrations_are_optional() -> None:
    """The wheel without extras brings neither transformers nor lm-eval, and the packages
    that need them name their extra."""
    for module, dependency, extra in (("nestlearn.hf", "transformers", "nestlearn[hf]"),
                                      ("nestlearn.lmeval", "lm_eval", "nestlearn[eval]")):
        check(importlib.util.find_spec(dependency) is None,
              f"{dependency} is installed by the core dependencies")
        try:
            importlib.import_module(module)
        except nestlearn.NestlearnError as err:
            check(extra in str(err), f"unclear error without {dependency}: {err}")
        else:
            check(False, f"{module} imported without {dependency}")


def main() -> None:
    dist, venv = Path(sys.argv[1]), Path(sys.argv[2])
    check_archives(dist)
    check_installed(venv)
    check_model()
    check_integrations_are_optional()
    print(f"release smoke test: nestlearn {nestlearn.__version__} wheel and sdist OK")


if __name__ == "__main__":
    main()
