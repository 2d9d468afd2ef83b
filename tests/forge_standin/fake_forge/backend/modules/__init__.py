"""Stand-in subpackage (see backend/__init__.py)."""
