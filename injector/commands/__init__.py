"""Subcommands of ``mesh-injector``: one module each, discovered by ``injector.cli``."""
