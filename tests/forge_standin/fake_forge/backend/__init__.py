"""Stand-in for the parts of Forge's `backend` package that FreeFuse's Forge layer touches.

Written from reading Forge (lllyasviel/stable-diffusion-webui-forge, commit dfdcbab6). Module names,
attribute names, call signatures and data layouts follow Forge; the code is independent and minimal.
Regular packages (with __init__.py), unlike Forge's namespace package, so that the stand-in can never
merge with a real Forge checkout that happens to be on sys.path.
"""

IS_STANDIN = True
