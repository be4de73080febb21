"""Hugging Face ``transformers`` integration (the optional extra ``nestlearn[hf]``).

Every nestlearn arch gets a ``PretrainedConfig`` and a ``PreTrainedModel`` + ``GenerationMixin``
class, registered with ``AutoConfig`` and ``AutoModelForCausalLM`` when this package is
imported; :class:`NestlearnCache` carries nestlearn's state through ``generate``;
:func:`stack_levels_from_hf` builds a HOPE model whose CMS levels start from a Llama model's
MLPs. The core of nestlearn never imports ``transformers``. See ``HF.md`` beside this file.
"""

from nestlearn.errors import NestlearnError

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by the release check's fresh venv
    raise NestlearnError(
        "nestlearn.hf needs the package 'transformers'; install it with: "
        "pip install 'nestlearn[hf]'"
    ) from err

from nestlearn.hf.cache import NestlearnCache
from nestlearn.hf.config import NestlearnConfig
from nestlearn.hf.convert import from_hf, load_hf_folder, save_hf_folder, to_hf
from nestlearn.hf.modeling import NestlearnForCausalLM, hf_classes, register_auto_classes
from nestlearn.hf.stacking import (
    stack_hf_folder,
    stack_levels_from_hf,
    transformer_from_llama,
)

register_auto_classes()

__all__ = [
    "NestlearnCache",
    "NestlearnConfig",
    "NestlearnForCausalLM",
    "from_hf",
    "hf_classes",
    "load_hf_folder",
    "register_auto_classes",
    "save_hf_folder",
    "stack_hf_folder",
    "stack_levels_from_hf",
    "to_hf",
    "transformer_from_llama",
]
