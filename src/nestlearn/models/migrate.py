"""Read model configs written by nestlearn 0.1 (one flat dict) as today's nested tree.

0.1 configs held every layer option at the top level with a prefix (``memory_depth``,
``cms_chunk_sizes``, ``window``, ...). Each maps to one field of one section; an option of a
section the arch does not have did nothing in 0.1 and is dropped. ``memory_dgd=None`` meant
"the arch's default", which is the section's default now, so it is dropped too.

Where a default changed after 0.1, the migrated section pins the 0.1 behaviour
(``pin_0_1_memory``): a 0.1 HOPE memory regressed v (``memory_target="v"``) and capped every
memory's learning rate with one ceiling derived from the larger chunk size and expansion; the
models' chunk size and initial gates (``MEMORY_GATE_DEFAULTS`` in ``nestlearn.models.archs``)
were 64, 0.5, 0.5 and 1e-4; a CMS level's step had no ceiling (``chunk_step=None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The memory fields whose model defaults changed after 0.1, at their 0.1 values.
MEMORY_0_1_DEFAULTS: dict[str, Any] = {"chunk_size": 64, "eta_init": 0.5, "theta_init": 0.5,
                                       "forget_init": 1e-4}
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
    if present["cms"]:
        sections["cms"].setdefault("chunk_step", None)  # 0.1 CMS levels had no step ceiling
    if present["memory"]:
        for name, value in MEMORY_0_1_DEFAULTS.items():
            sections["memory"].setdefault(name, value)
    if present["memory"] and "inner_chunk_size" in _memory_fields(spec.memory):
        pin_0_1_memory(sections["memory"], spec.memory_defaults)
    for section, fields in sections.items():
        if present[section]:
            nested[section] = fields
    return nested


def pin_0_1_memory(fields: dict[str, Any], arch_defaults: Mapping[str, Any]) -> None:
    """Pin a migrated self-modifying memory section to what 0.1 computed (see the module doc)."""
    fields.setdefault("memory_target", "v")
    if fields.get("eta_max") is not None:
        return
    # 0.1's fields and defaults: chunks 64, expansions 4, chunk_step 1, theta_max 0.9; the
    # arch set inner_chunk_size 16.
    def get(name: str, default: Any) -> Any:
        return fields.get(name, arch_defaults.get(name, default))

    chunk = max(get("chunk_size", 64), get("inner_chunk_size", 16))
    expansion = max(get("expansion", 4), 4)
    gain = 1.0 / (1.0 - get("theta_max", 0.9)) if get("momentum", True) else 1.0
    fields["eta_max"] = get("chunk_step", 1.0) / (chunk * expansion * gain)


def _memory_fields(cls: type) -> set[str]:
    return set(cls.__dataclass_fields__)
