"""Read model configs written by nestlearn 0.1 (one flat dict) as today's nested tree.

0.1 configs held every layer option at the top level with a prefix (``memory_depth``,
``cms_chunk_sizes``, ``window``, ...). Each maps to one field of one section; an option of a
section the arch does not have did nothing in 0.1 and is dropped. ``memory_dgd=None`` meant
"the arch's default", which is the section's default now, so it is dropped too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# 0.1 field -> (section, field in that section's layer config).
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "window": ("attention", "window"),
    "rope_base": ("attention", "rope_base"),
    "memory_depth": ("memory", "depth"),
    "memory_expansion": ("memory", "expansion"),
    "chunk_size": ("memory", "chunk_size"),
    "memory_momentum": ("memory", "momentum"),
    "memory_weight_decay": ("memory", "weight_decay"),
    "memory_dgd": ("memory", "dgd"),
    "memory_eta_max": ("memory", "eta_max"),
    "memory_chunk_step": ("memory", "chunk_step"),
    "memory_theta_max": ("memory", "theta_max"),
    "memory_normalize_values": ("memory", "normalize_values"),
    "memory_eta_init": ("memory", "eta_init"),
    "memory_theta_init": ("memory", "theta_init"),
    "memory_forget_init": ("memory", "forget_init"),
    "persistent_tokens": ("memory", "persistent_tokens"),
    "inner_chunk_size": ("memory", "inner_chunk_size"),
    "cms_chunk_sizes": ("cms", "chunk_sizes"),
    "cms_hidden": ("cms", "hidden"),
    "cms_mlp": ("cms", "mlp"),
    "cms_variant": ("cms", "variant"),
    "cms_teach_signal": ("cms", "teach_signal"),
    "cms_inner_lr": ("cms", "inner_lr"),
    "cms_frozen": ("cms", "frozen"),
}


def is_flat_model_dict(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is a 0.1 model config (it has a prefixed layer field)."""
    return any(key in FLAT_FIELDS for key in data)


def migrate_flat_model_dict(data: Mapping[str, Any], archs: Mapping[str, Any]
                            ) -> dict[str, Any]:
    """The nested dict of a 0.1 flat model config; ``archs`` is the arch registry, which says
    which sections an arch has. Unknown keys are passed through for the caller to refuse."""
    spec = archs.get(data.get("arch", "transformer"))
    present = {"attention": spec is not None and spec.attention != "none",
               "memory": spec is not None and spec.memory is not None,
               "cms": spec is not None and spec.cms}
    nested: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"attention": {}, "memory": {}, "cms": {}}
    for key, value in data.items():
        if key not in FLAT_FIELDS:
            nested[key] = value
            continue
        section, name = FLAT_FIELDS[key]
        if not present[section] or (key == "memory_dgd" and value is None):
            continue
        if section == "memory" and name not in _memory_fields(spec.memory):
            continue  # e.g. inner_chunk_size of a Titans memory: unused in 0.1
        sections[section][name] = value
    for section, fields in sections.items():
        if present[section]:
            nested[section] = fields
    return nested


def _memory_fields(cls: type) -> set[str]:
    return set(cls.__dataclass_fields__)
