"""Which variant object (layers/: DoRA, BD-LoRA, MiCA, KaSA, VeLoRA, MonteCLoRA)
an adapter gets on one target, from its config.

The choice lives here, above the layers, so the layer math never reads a config. BD-LoRA's rule is
PEFT's: a pattern of use_bdlora.target_modules_bd_a / _bd_b matches a target when it is a substring of
the module's full name; a target matching neither is plain LoRA, or an error with match_strict.
"""

from __future__ import annotations

from ..config import LoraConfig
from ..errors import LorakitError
from ..layers import BdLora, DoRA, KaSA, MiCA, MonteCLoRA, Variant, VeLoRA


def choose(config: LoraConfig, target: str, r: int) -> tuple[Variant | None, bool | str]:
    """(the variant for adapter `config` on module `target` with rank r, the init to hand LoraLayer.add).

    MiCA initialises its factors itself (after the plain draws), so the layer is told init=False."""
    if config.use_dora:
        return DoRA(), config.init_lora_weights
    if config.monteclora_config is not None:
        return MonteCLoRA(**config.monteclora_config), config.init_lora_weights
    if config.velora_config is not None:
        v = config.velora_config
        return VeLoRA(v.num_groups, v.scale, v.init_type), config.init_lora_weights
    if config.kasa_config is not None:
        return KaSA(), config.init_lora_weights
    if config.init_lora_weights == "mica":
        return MiCA(r), False
    if config.use_bdlora is not None:
        return bdlora_variant(config, target, r), config.init_lora_weights
    return None, config.init_lora_weights


def bdlora_variant(config: LoraConfig, target: str, r: int) -> BdLora | None:
    """BD-LoRA on `target`: a block-diagonal A or B, or None (plain LoRA) when no pattern matches."""
    bd = config.use_bdlora
    on_a = any(p in target for p in bd.target_modules_bd_a or [])
    on_b = any(p in target for p in bd.target_modules_bd_b or [])
    if on_a and on_b:
        raise LorakitError(f"BD-LoRA: target {target!r} matches both target_modules_bd_a and target_modules_bd_b; "
                           "make the patterns pick one factor per module")
    if not (on_a or on_b):
        if bd.match_strict:
            raise LorakitError(f"BD-LoRA: target {target!r} matches neither target_modules_bd_a nor "
                               "target_modules_bd_b; add it to one of them, or set match_strict=False to train it "
                               "as plain LoRA")
        return None
    return BdLora("A" if on_a else "B", bd.nblocks, r)
