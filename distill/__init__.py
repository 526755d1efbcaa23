"""distill: turn an expensive teacher LLM into a cheap student model your team owns, with the numbers to prove it.

This package holds the command line, the config and the runtime helpers; the Prefect flows
are ``flows``, the work is ``tasks`` (README "Layout").
"""

from distill import legacy as _legacy

_legacy.install()  # models registered by distill 0.1 name its old module paths (distill/legacy.py)
