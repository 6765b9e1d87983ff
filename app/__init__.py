"""The training application: config, backbones, sharded classifier, trainer, tools (DESIGN.md 2)."""
