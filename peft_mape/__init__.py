"""peft-mape: module-aware parameter-efficient machine unlearning for PEFT."""
