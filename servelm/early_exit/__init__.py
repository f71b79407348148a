"""Early exit (CALM-style): at decode steps a token whose next-token distribution is already
confident after an intermediate layer takes that layer's logits, and its later layers get KV
propagated from its exit state. See config.py (``early_exit_config``) and forward.py."""
from servelm.early_exit.config import EarlyExitConfig, parse_early_exit_config

__all__ = ["EarlyExitConfig", "parse_early_exit_config"]
