"""gptlab's Hydra config tree. In a regular install it is the package ``gptlab.conf`` (pyproject.toml
maps this folder there); the entry points find it through ``gptlab.cli.config_dir``."""
