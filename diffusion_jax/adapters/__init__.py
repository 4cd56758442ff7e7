"""Adapters trained on a frozen base: LoRA factors (lora_train), written out as kohya or
PEFT files (lora_export); `convert/lora.py` reads such files at sampling."""
