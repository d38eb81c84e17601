"""The PEFT tuner: ``MAPEConfig`` / ``MAPELayer`` / ``MAPEModel``, the architecture families,
registration with PEFT, saving and the checks on load."""
