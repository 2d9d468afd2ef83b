"""Forge runs this once at start-up (in a subprocess, webui root on PYTHONPATH) to install what is missing.

It is a no-op when everything in requirements.txt is already importable.
"""

import launch

# pip name -> import/metadata name that launch.is_installed checks
REQUIREMENTS = {"scikit-image>=0.21": "skimage"}

for requirement, module in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"FreeFuse requirement: {requirement}")
