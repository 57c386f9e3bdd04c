"""LoRA, LoCon, DoRA, LoHa, LoKr, full-diff and IA3 files: read by content, applied by patching weights in place.

    lora = read_lora("style.safetensors")
    patcher = LoraPatcher(model)
    patcher.apply([LoraUse(lora, unet=0.8, text=0.8)])   # ... generate ...
    patcher.restore()                                      # weights bitwise as loaded
"""
from .formats import Lora, LoraError, LoraLayer, lora_from_tensors, read_lora
from .library import LoraLibrary, addnet_hash
from .patch import ApplyReport, LoraPatcher, LoraUse
from .targets import Target, kohya_names, lora_targets

__all__ = ["ApplyReport", "Lora", "LoraError", "LoraLayer", "LoraLibrary", "LoraPatcher", "LoraUse", "Target",
           "addnet_hash", "kohya_names", "lora_from_tensors", "lora_targets", "read_lora"]
