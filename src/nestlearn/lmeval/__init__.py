"""lm-evaluation-harness adapter (the optional extra ``nestlearn[eval]``).

Importing this package registers the model name ``nestlearn`` with lm-eval's model registry
(``lm_eval.api.registry.register_model``), so ``lm_eval.simple_evaluate(model="nestlearn",
model_args={"pretrained": RUN_DIR}, tasks=[...])`` evaluates a nestlearn run or model folder.
See ``LMEVAL.md`` beside this file.
"""

from nestlearn.errors import NestlearnError

try:
    import lm_eval  # noqa: F401
except ImportError as err:  # pragma: no cover - only without the extra
    raise NestlearnError(
        "nestlearn.lmeval needs the package 'lm-eval'; install it with: "
        "pip install 'nestlearn[eval]'"
    ) from err

from nestlearn.lmeval.adapter import NestlearnLM, evaluate_tasks

__all__ = ["NestlearnLM", "evaluate_tasks"]
